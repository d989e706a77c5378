"""The script's gradio side with real gradio 3.41.2 (.venv-ui): accordion, paste-back, settings, tab."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_PY = ROOT / ".venv-ui" / "bin" / "python"


@pytest.mark.skipif(bool(os.environ.get("SPM_SKIP_BROWSER")), reason="SPM_SKIP_BROWSER is set")
def test_accordion_settings_and_tab_build_with_gradio_3_41():
    assert UI_PY.exists(), "no .venv-ui: run `make ui-env` (make test does)"
    r = subprocess.run([str(UI_PY), str(ROOT / "tests" / "ui_venv" / "check_webui_ui.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["ok"] is True
