# One-command set-up: the first `make demo` or `make test` creates .venv with pinned deps.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The browser test's own venv: gradio 3.41.2 needs numpy<2, pydantic<2 and an old fastapi/httpx,
# which cannot share .venv. It serves the SPM tab; Playwright drives Debian's Chromium.
UI_VENV := .venv-ui
UI_PY := $(UI_VENV)/bin/python
UI_STAMP := $(UI_VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: demo test test-browser ui-env clean-venv

$(STAMP): requirements.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# only for CLIP's BPE vocabulary file; --no-deps keeps torchvision (a CUDA build) out
	$(PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

$(UI_STAMP): requirements-ui.txt
	rm -rf $(UI_VENV)
	$(PYTHON) -m venv $(UI_VENV)
	$(UI_PY) -m pip install --quiet --upgrade pip
	# torch first and alone: the local CPU build (any other torch request pulls GBs)
	$(UI_PY) -m pip install --quiet torch==2.13.0
	$(UI_PY) -m pip install --quiet -r requirements-ui.txt
	$(UI_PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $(UI_STAMP)

# Debian's Chromium for Playwright (CI runs as root; never `playwright install`, no download of a browser)
$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

ui-env: $(UI_STAMP) $(CHROMIUM)

demo: $(STAMP)
	$(PY) -m lib_spm demo --out demo_out

# SPM_SKIP_BROWSER=1 make test: for developers without root or Chromium; CI never sets it
test: $(STAMP) $(if $(SPM_SKIP_BROWSER),,ui-env)
	$(PY) -m pytest -q tests

# the browser test alone; SPM_SCREENSHOTS=docs/screenshots refreshes the README's screenshots
test-browser: $(STAMP) ui-env
	$(PY) -m pytest -q -m browser tests

clean-venv:
	rm -rf $(VENV) $(UI_VENV)
