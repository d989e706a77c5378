"""The SPM tab in a real browser: gradio 3.41.2 serves it on the shapes world (``python -m lib_spm ui``)
from .venv-ui, and Playwright drives Debian's Chromium through train, manage, merge and test (drive.py).

Both run as subprocesses of .venv-ui's Python, since gradio 3.41 cannot share the main venv.
Missing .venv-ui or Chromium fails the test (``make ui-env`` builds both); developers without
them can opt out with SPM_SKIP_BROWSER=1. SPM_SCREENSHOTS=docs/screenshots keeps the screenshots
for the README.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI_PYTHON = ROOT / ".venv-ui" / "bin" / "python"
CHROMIUM = Path("/usr/bin/chromium")
SERVER_START_S = 240  # imports torch, diffusers and gradio on a busy CPU
DRIVE_S = 900  # the whole browser flow; drive.py's own waits are shorter

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """End a process started in its own session, and everything it started."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
    proc.wait(timeout=20)


def _wait_for_server(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the UI server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the UI server did not answer on {url} within {SERVER_START_S} s:\n{_tail(log)}")


@pytest.fixture()
def ui_env():
    if os.environ.get("SPM_SKIP_BROWSER"):
        pytest.skip("SPM_SKIP_BROWSER is set")
    missing = [str(p) for p in (UI_PYTHON, CHROMIUM) if not p.exists()]
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}: run `make ui-env` (or `make test`, which "
                    "builds them), or set SPM_SKIP_BROWSER=1 to leave this test out")
    return UI_PYTHON


def test_train_manage_merge_rename_delete_in_chromium(ui_env, tmp_path):
    spm_dir = tmp_path / "spm"
    shots = Path(os.environ.get("SPM_SCREENSHOTS") or tmp_path / "screenshots")
    if not shots.is_absolute():
        shots = ROOT / shots
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "NO_PROXY": "127.0.0.1,localhost"}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(ui_env), "-m", "lib_spm", "ui", "--spm-dir", str(spm_dir), "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_server(server, url, log)
        result_path = tmp_path / "result.json"
        # its own session, so a timeout ends Playwright's driver and Chromium with it
        drive = subprocess.Popen([str(ui_env), str(ROOT / "tests" / "browser" / "drive.py"), "--url", url,
                                  "--result", str(result_path), "--shots", str(shots)],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        try:
            output, code = drive.communicate(timeout=DRIVE_S)[0][-6000:], drive.returncode
        except subprocess.TimeoutExpired:
            _stop(drive)
            output, code = f"drive.py ran past {DRIVE_S} s", None
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        report = (f"drive.py exit {code}\n{json.dumps(result, indent=1)[-6000:]}\n{output}\n"
                  f"--- server log ---\n{_tail(log)}")
        assert code == 0 and result.get("ok"), report
    finally:
        _stop(server)

    steps = [s["name"] for s in result["steps"] if s["ok"]]
    assert len(steps) == 8 and all(s["ok"] for s in result["steps"]), report
    files = sorted(p.relative_to(spm_dir).as_posix() for p in spm_dir.rglob("*") if p.is_file())
    assert "circle_small.safetensors" in files, files
    assert not any(f.startswith(("circle_test", "circle_renamed")) for f in files), files  # sidecars too
    assert not (tmp_path / "x.safetensors").exists()  # "../x" was refused, not written beside the folder
    assert "'..'" in result["notes"]["hostile_message"] or ".." in result["notes"]["hostile_message"]
    assert "circle_renamed" in result["dialogs"][-1]
    # the Test panel: one gate per prompt, shown as the table's text; the target opens it fully
    (target, shown_t), (other, shown_o) = result["notes"]["test_gates"]
    assert float(target) == 1.0 and shown_t == "1.00", result["notes"]
    assert 0.0 <= float(other) < float(target) and shown_o == f"{float(other):.2f}", result["notes"]
    assert "a red circle" in result["notes"]["test_table"] and "circle_small" in result["notes"]["test_table"]
    assert result["notes"]["test_images"] >= 4  # without/with for each prompt
    shots_taken = {Path(p).name for p in result["screenshots"]}
    assert {"train.png", "manage.png", "merge.png", "test.png"} <= shots_taken, shots_taken
    print(f"\nbrowser flow: {json.dumps({s['name']: s['seconds'] for s in result['steps']})}", file=sys.stderr)
