"""Opt-in tests against a real AUTOMATIC1111 or Forge checkout (skipped unless SPM_WEBUI_PATH is set).

    SPM_WEBUI_PATH=~/stable-diffusion-webui [SPM_WEBUI_PYTHON=.../venv/bin/python]
    [SPM_WEBUI_CKPT_DIR=folder with one checkpoint] [SPM_WEBUI_ARCH=sd1|sd2|sdxl]
    [SPM_WEBUI_FLAVOUR=a1111|forge]
    [SPM_WEBUI_ARGS="--use-cpu all --precision full --no-half"] .venv/bin/python -m pytest tests/test_real_webui.py

Forge (``SPM_WEBUI_FLAVOUR=forge``, e.g. ``SPM_WEBUI_ARGS="--always-cpu --all-in-fp32"``) loads its
model lazily on the first generation, so what start-up says about the model is looked for
after one request.

Each test starts the WebUI API-only (``--nowebui``) with a throw-away ``--data-dir`` whose
``extensions/`` links this checkout, and an SPM folder holding ``snoopy`` (targets "snoopy"),
``snoopy_copy`` (its weights under another name), ``anti`` (its negation) and ``xl`` (an SPM of
the other architecture). Servers are shared by the tests that start them with the same flags.

The real WebUI swallows what script hooks raise, so these check what a client actually gets:
refusals are HTTP errors naming the cause with no image, enforced SPMs survive every user input
that could weaken them, and the infotext lists exactly what acted. Without a checkpoint folder
only the start-up checks run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEBUI = os.environ.get("SPM_WEBUI_PATH")
CKPT = os.environ.get("SPM_WEBUI_CKPT_DIR")
ARCH = os.environ.get("SPM_WEBUI_ARCH", "sd1")
FLAVOUR = os.environ.get("SPM_WEBUI_FLAVOUR", "a1111")
TITLE = "Concept erasure (SPM)"

pytestmark = pytest.mark.skipif(not WEBUI, reason="set SPM_WEBUI_PATH to a WebUI checkout to run")
needs_model = pytest.mark.skipif(not CKPT, reason="set SPM_WEBUI_CKPT_DIR to generate images")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, data=None, timeout=900) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _spm_folder(folder: Path) -> None:
    from spm_helpers import random_spm

    from lib_spm.format import archs
    from lib_spm.format.spm_file import LayerWeights

    folder.mkdir()
    spm = random_spm(archs.reference_unet(ARCH), ["snoopy"], std=0.05, name="snoopy")
    spm = replace(spm, metadata=replace(spm.metadata, arch=ARCH))
    spm.save(folder / "snoopy.safetensors")
    replace(spm, metadata=replace(spm.metadata, name="snoopy_copy")).save(folder / "snoopy_copy.safetensors")
    anti = {k: LayerWeights(w.down, -w.up, w.alpha) for k, w in spm.layers.items()}
    replace(spm, layers=anti, metadata=replace(spm.metadata, name="anti", targets=["cat"])).save(
        folder / "anti.safetensors")
    other = "sdxl" if ARCH != "sdxl" else "sd1"
    xl = random_spm(archs.reference_unet(other), ["snoopy"], std=0.05, name="xl")
    replace(xl, metadata=replace(xl.metadata, arch=other)).save(folder / "xl.safetensors")


class Server:
    def __init__(self, tmp: Path, flags: tuple[str, ...]):
        webui = Path(WEBUI).expanduser()
        python = os.environ.get("SPM_WEBUI_PYTHON") or str(webui / "venv" / "bin" / "python")
        data = tmp / "data"
        (data / "extensions").mkdir(parents=True)
        (data / "extensions" / "sd-webui-spm").symlink_to(ROOT, target_is_directory=True)
        _spm_folder(tmp / "spm")
        port = _free_port()
        cmd = [python, "webui.py", "--nowebui", "--api", "--skip-torch-cuda-test", "--no-download-sd-model",
               "--data-dir", str(data), "--port", str(port), "--spm-dir", str(tmp / "spm"),
               *shlex.split(os.environ.get("SPM_WEBUI_ARGS", "")), *flags]
        if CKPT:
            cmd += ["--ckpt-dir", CKPT]
        self.log_path = tmp / "webui.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=webui, stdout=self._log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 900
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                status, self.listed = _request(f"{self.base}/spm/v1/models", timeout=5)
                if status == 200:
                    break
            except (OSError, ValueError):  # not listening yet
                pass
            assert time.time() < deadline, "the WebUI did not start within 15 minutes"
            time.sleep(3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def txt2img(self, prompt="a photo of snoopy", args=None, **kw) -> tuple[int, dict]:
        body = {"prompt": prompt, "steps": 3, "width": 64, "height": 64, "seed": 42, "sampler_name": "Euler",
                "save_images": False, **kw}
        if args is not None:
            body["alwayson_scripts"] = {TITLE: {"args": args}}
        return _request(f"{self.base}/sdapi/v1/txt2img", body)

    def image(self, *a, **kw):
        status, out = self.txt2img(*a, **kw)
        assert status == 200, (out, self.log())
        return pixels(out), json.loads(out["info"])

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _errors(out) -> str:
    """The message of an API error: A1111 answers it as ``errors``, Forge as ``message``."""
    return out.get("errors") or out.get("message") or ""


def pixels(out):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB")).astype("float32")


def diff(a, b) -> float:
    return float(abs(a - b).mean())


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """``servers(*flags)``: a WebUI started with those flags. One runs at a time (each holds a
    full-size model in memory); the tests are ordered so each set of flags starts once."""
    running: dict[tuple, Server] = {}

    def get(*flags):
        if flags not in running:
            for s in running.values():
                s.close()
            running.clear()
            running[flags] = Server(tmp_path_factory.mktemp("webui"), flags)
        return running[flags]

    yield get
    for s in running.values():
        s.close()


BARE = {}  # the unmoderated image of the default prompt, from the first server without flags


def args(*choices, enabled=True, ft=True, factor=1.0, metric="pooled_tokenuni"):
    out = [enabled, ft, factor, metric]
    for name, strength in choices:
        out += [name, strength]
    return out


# -- start-up ----------------------------------------------------------------------------------------

def test_the_extension_loads_lists_its_spms_and_its_script(servers):
    s = servers()
    assert sorted(m["name"] for m in s.listed) == ["anti", "snoopy", "snoopy_copy", "xl"]
    assert all(m["error"] is None for m in s.listed)
    _, scripts = _request(f"{s.base}/sdapi/v1/scripts", timeout=30)
    assert TITLE.lower() in json.dumps(scripts).lower()


# -- applying and infotext --------------------------------------------------------------------------

@needs_model
def test_an_spm_acts_on_its_concept_and_the_infotext_says_exactly_what_acted(servers):
    s = servers()
    bare, info = s.image(args=args(enabled=False))
    BARE["snoopy"] = bare
    assert not any(k.startswith("SPM") for k in info["extra_generation_params"])
    on, info = s.image(args=args(("snoopy", 1.0)))
    assert diff(on, bare) > 0.5
    assert 'SPM: "snoopy:1"' in info["infotexts"][0] and 'SPM hashes: "snoopy: ' in info["infotexts"][0]
    other_bare, _ = s.image("a photo of a cat", args=args(enabled=False))
    other_on, _ = s.image("a photo of a cat", args=args(("snoopy", 1.0)))
    assert diff(other_on, other_bare) < diff(on, bare) / 4  # FT: another prompt barely moves
    # a tag's strength replaces the accordion's, and is what the infotext records
    tagged, info = s.image("a photo of snoopy <spm:snoopy:0.5>", args=args(("snoopy", 1.0)))
    assert info["extra_generation_params"]["SPM"] == "snoopy:0.5"
    only_tag, info = s.image("a photo of snoopy <spm:snoopy:0.5>", args=args(enabled=False))
    assert info["extra_generation_params"]["SPM"] == "snoopy:0.5" and diff(only_tag, tagged) < 1e-3
    # skipped SPMs are never claimed: another architecture's, a tag naming no file
    _, info = s.image("a photo of snoopy <spm:nothere>", args=args(("xl", 1.0), ("snoopy", 1.0)))
    params = info["extra_generation_params"]
    assert params["SPM"] == "snoopy:1" and "xl" not in params["SPM hashes"]
    assert "xl: it is for" in params["SPM skipped"] and "nothere: no such SPM file" in params["SPM skipped"]



@needs_model
def test_each_row_of_a_batch_is_gated_by_its_own_prompt(servers):
    """One batch, two prompts: the WebUI's prompt matrix script puts "a photo of a cat" and "a photo
    of a cat, snoopy" in one batch at one seed. The SPM must change only the row naming snoopy."""
    s = servers()
    matrix = {"prompt": "a photo of a cat|snoopy", "batch_size": 2, "script_name": "prompt matrix",
              "script_args": [False, False, "positive", "comma", 0]}

    def rows(a):
        status, out = s.txt2img(args=a, **matrix)
        assert status == 200 and len(out["images"]) == 3, (_errors(out), s.log())  # the grid, then each row
        return [pixels({"images": [im]}) for im in out["images"][1:]]

    bare, on = rows(args(enabled=False)), rows(args(("snoopy", 1.0)))
    assert diff(on[0], bare[0]) == 0.0  # "a photo of a cat": gated off, pixel-identical
    assert diff(on[1], bare[1]) > 0.5  # "a photo of a cat, snoopy": the SPM acts

BAD = [
    (args(("does_not_exist", 1.0)), "no SPM named 'does_not_exist'"),
    (args(("../snoopy", 1.0)), "'..' part"),
    (args(("snoopy", "strong")), "must be a number"),
    (args(("snoopy", None)), "must be a number"),
    (args(("snoopy", True)), "must be a number"),
    (args(("snoopy", 100)), "between -10 and 10"),
    ([True, True, 1.0, "bogus"], "unknown FT metric"),
    ([True, "maybe"], "true or false"),
]


@needs_model
@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_fail_the_request_naming_them(servers, bad, message):
    status, out = servers().txt2img(args=bad)
    assert status == 422 and message in _errors(out), out
    assert "images" not in out


@needs_model
@pytest.mark.parametrize("tag,message", [("<spm:snoopy:strong>", "must be a number"),
                                         ("<spm:snoopy:nan>", "between"), ("<spm:../x:1>", "'..' part")])
def test_a_malformed_tag_fails_the_request(servers, tag, message):
    status, out = servers().txt2img(f"a photo of snoopy {tag}", args=args(enabled=False))
    assert status == 422 and message in _errors(out), out


# -- moderation --------------------------------------------------------------------------------------

BYPASSES = [
    ("a photo of snoopy", args(("snoopy", -1.0))),
    ("a photo of snoopy", args(("snoopy_copy", -1.0))),
    ("a photo of snoopy <spm:snoopy:-1>", args(enabled=False)),
    ("a photo of snoopy <spm:snoopy_copy:-1>", args(enabled=False)),
    ("a photo of snoopy <spm:snoopy_copy:-0.5> <spm:snoopy_copy:-0.5>", args(enabled=False)),
    ("a photo of snoopy", args(("anti", 1.0))),
    ("a photo of snoopy", args(("snoopy", 0.0), ft=False, factor=0.0)),
]


@needs_model
def test_no_user_input_weakens_an_enforced_spm(servers):
    bare = BARE.get("snoopy")
    if bare is None:
        bare, _ = servers().image(args=args(enabled=False))
    s = servers("--spm-enforce", "snoopy:1")
    enforced, info = s.image(args=args(enabled=False))
    assert diff(enforced, bare) > 0.5
    assert info["extra_generation_params"]["SPM enforced"] == "snoopy:1"
    for prompt, a in BYPASSES:
        status, out = s.txt2img(prompt, args=a)
        if status == 200:
            assert diff(pixels(out), enforced) < 1e-3, (prompt, a)
        else:
            assert status == 422 and ("negative strengths are refused" in _errors(out)
                                      or "undoes" in _errors(out)), (prompt, a, out)


@needs_model
def test_lockdown_refuses_user_spms(servers):
    s = servers("--spm-enforce", "snoopy:1", "--spm-lockdown")
    status, out = s.txt2img(args=args(("snoopy_copy", 1.0)))
    assert status == 422 and "turned off user SPMs" in _errors(out), out
    _, info = s.image(args=args(enabled=False))
    assert info["extra_generation_params"]["SPM enforced"] == "snoopy:1"


@needs_model
@pytest.mark.parametrize("enforce,message", [
    ("does_not_exist:1", "enforced SPM 'does_not_exist' cannot be used"),
    ("xl:1", "none of the enforced SPMs (xl) fits"),
])
def test_an_enforced_spm_that_cannot_act_refuses_every_generation(servers, enforce, message):
    s = servers("--spm-enforce", enforce)
    if FLAVOUR == "forge" and enforce.startswith("xl"):
        s.txt2img(args=args(enabled=False))  # Forge loads the model (and checks it) on the first request
    assert "EVERY GENERATION WILL BE REFUSED" in s.log()  # said loudly at start-up (or model load)
    for a in (args(enabled=False), args(("snoopy", 1.0)), None):
        status, out = s.txt2img(args=a)
        assert status == 503 and message in _errors(out) and "images" not in out, out
