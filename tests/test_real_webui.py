"""Opt-in smoke test against a real AUTOMATIC1111 checkout (skipped unless SPM_WEBUI_PATH is set).

    SPM_WEBUI_PATH=~/stable-diffusion-webui [SPM_WEBUI_PYTHON=.../venv/bin/python]
    [SPM_WEBUI_CKPT_DIR=folder with a checkpoint] [SPM_WEBUI_ARCH=sd1|sd2|sdxl] make test

Starts the WebUI API-only (``--nowebui``) with a throw-away ``--data-dir`` whose ``extensions/``
holds a link to this checkout, and an SPM folder with a random SPM for the model; checks the
extension loaded (its route answers, the script is listed) and, when a checkpoint folder is
given, that a txt2img request with the script's args succeeds and records the SPM in its infotext.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEBUI = os.environ.get("SPM_WEBUI_PATH")

pytestmark = pytest.mark.skipif(not WEBUI, reason="set SPM_WEBUI_PATH to a WebUI checkout to run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, data=None, timeout=600):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_extension_loads_and_applies_in_a_real_webui(tmp_path):
    webui = Path(WEBUI).expanduser()
    python = os.environ.get("SPM_WEBUI_PYTHON") or str(webui / "venv" / "bin" / "python")
    data = tmp_path / "data"
    (data / "extensions").mkdir(parents=True)
    (data / "extensions" / "sd-webui-spm").symlink_to(ROOT, target_is_directory=True)
    from dataclasses import replace

    from lib_spm import archs
    from spm_helpers import random_spm

    arch = os.environ.get("SPM_WEBUI_ARCH", "sd1")
    spm = random_spm(archs.reference_unet(arch), ["cat"], std=0.01, name="smoke")
    (tmp_path / "spm").mkdir()
    replace(spm, metadata=replace(spm.metadata, arch=arch)).save(tmp_path / "spm" / "smoke.safetensors")
    port = _free_port()
    cmd = [python, "webui.py", "--nowebui", "--api", "--skip-torch-cuda-test", "--no-download-sd-model",
           "--data-dir", str(data), "--port", str(port), "--spm-dir", str(tmp_path / "spm")]
    ckpt = os.environ.get("SPM_WEBUI_CKPT_DIR")
    if ckpt:
        cmd += ["--ckpt-dir", ckpt]
    log = open(tmp_path / "webui.log", "w")
    proc = subprocess.Popen(cmd, cwd=webui, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "webui.log").read_text()[-4000:]
            try:
                listed = _get(f"{base}/spm/v1/models", timeout=5)
                break
            except (OSError, ValueError):  # not listening yet
                assert time.time() < deadline, "the WebUI did not start within 10 minutes"
                time.sleep(3)
        assert [m["name"] for m in listed] == ["smoke"] and listed[0]["error"] is None
        scripts = _get(f"{base}/sdapi/v1/scripts", timeout=30)
        assert "concept erasure (spm)" in scripts["txt2img"] + scripts["img2img"] or \
            "concept erasure (spm)" in json.dumps(scripts).lower()
        if ckpt:
            bad = urllib.request.Request(f"{base}/sdapi/v1/txt2img", data=json.dumps({
                "prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                "alwayson_scripts": {"Concept erasure (SPM)": {"args": [True, True, "x"]}}}).encode(),
                headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(bad, timeout=600)
            out = _get(f"{base}/sdapi/v1/txt2img", {
                "prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                "alwayson_scripts": {"Concept erasure (SPM)": {"args": [True, True, 1.0, "pooled_tokenuni", "smoke", 1.0]}}})
            assert out["images"]
            info = json.loads(out["info"])
            assert "SPM: smoke:1" in info["infotexts"][0]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
