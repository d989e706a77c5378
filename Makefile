# One-command set-up: the first `make demo` or `make test` creates .venv with pinned deps.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean-venv

$(STAMP): requirements.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# only for CLIP's BPE vocabulary file; --no-deps keeps torchvision (a CUDA build) out
	$(PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lib_spm demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
