"""``POST /spm/v1/gates`` through the stand-in WebUI (tests/miniwebui.py) on the shapes world: the
Test panel's table as JSON, rows as the WebUI makes them, and refusals with their HTTP status."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import miniwebui
from lib_spm import GateSettings, Session
from lib_spm.hosts.webui.rows import PromptTokens, WebUIConcepts
from lib_spm.world.model import load_world
from spm_helpers import random_spm


@pytest.fixture(scope="module")
def world():
    return load_world()


def loaded(world, tmp_path, **cmd_opts):
    models = tmp_path / "models"
    folder = models / "spm"
    folder.mkdir(parents=True, exist_ok=True)
    mod, modules = miniwebui.load(models, **cmd_opts)
    sd = miniwebui.WorldModel(world)
    unet = sd.model.diffusion_model
    random_spm(unet, ["circle"], seed=1, std=0.3, name="circle").save(folder / "circle.safetensors")
    random_spm(unet, ["star"], seed=2, std=0.3, name="star").save(folder / "star.safetensors")
    modules.shared.sd_model = sd
    routes = {}
    app = SimpleNamespace(add_api_route=lambda path, fn, **kw: routes.setdefault(path, (fn, kw)))
    modules.script_callbacks.fire("app_started", None, app)
    fn, kw = routes["/spm/v1/gates"]
    assert kw["methods"] == ["POST"]
    return SimpleNamespace(mod=mod, modules=modules, sd=sd, unet=unet, post=fn)


@pytest.fixture
def webui(world, tmp_path):
    w = loaded(world, tmp_path)
    yield w
    w.mod.ext().shutdown()
    miniwebui.unload()


def runtime_gate(w, text, gate=GateSettings()):
    """The gate the runtime gives a row holding ``text`` (the form test_hosts_webui checks against
    a generation's own gates)."""
    spm = w.mod.ext().library.load("circle")
    tokens = PromptTokens(w.sd)
    with Session(w.unet, [(spm, 1.0)], encoder=WebUIConcepts(w.sd, tokens=tokens), gate=gate) as s:
        return float(s.gates(w.sd.get_learned_conditioning([text]), [tokens.row(text)])[0, 0])


def gate_of(out, spm, prompt, part):
    key = (spm, prompt, part, None)
    (g,) = [g["gate"] for g in out["gates"] if (g["spm"], g["prompt"], g["part"], g["chunk"]) == key]
    return g


def test_the_route_reports_each_and_part_and_edit_as_the_runtime_gates_it(webui):
    prompts = ["a red circle AND a blue square:0.5", "[a green star:a red circle:2]<spm:star:1>"]
    out = webui.post({"prompts": prompts, "spms": ["circle"]})
    parts = [[(p["label"], p["text"]) for p in q["parts"]] for q in out["prompts"]]  # texts as the WebUI encodes them
    assert parts == [[("AND 1", "a red circle"), ("AND 2 (weight 0.5)", " a blue square")],
                     [("steps 1-2", "a green star"), ("steps 3-20", "a red circle")]]
    for i, q in enumerate(out["prompts"]):
        for j, p in enumerate(q["parts"]):
            assert gate_of(out, "circle", i, j) == pytest.approx(runtime_gate(webui, p["text"]), abs=1e-6)
    assert gate_of(out, "circle", 0, 0) == 1.0 > gate_of(out, "circle", 0, 1)
    assert gate_of(out, "circle", 1, 1) == 1.0 > gate_of(out, "circle", 1, 0)
    assert out["settings"] == {"circle": {"ft": True, "factor": 1.0, "metric": "pooled_tokenuni"}}
    assert "AND part" in out["note"] and "tags" in out["note"]
    assert [g["spm"] for g in out["gates"]] == ["circle"] * 4  # a tag chooses no SPM here
    webui.modules.call_queue.queue_lock.acquire(timeout=1)  # the route let the model go again
    webui.modules.call_queue.queue_lock.release()


def test_the_users_gate_settings_apply(webui):
    out = webui.post({"prompts": ["a blue square"], "spms": ["circle"], "ft": False})
    assert gate_of(out, "circle", 0, 0) == 1.0
    g = GateSettings(metric="clipcos", factor=2.0)
    out = webui.post({"prompts": ["a blue square"], "spms": ["circle"], "metric": "clipcos", "factor": 2})
    assert gate_of(out, "circle", 0, 0) == pytest.approx(runtime_gate(webui, "a blue square", g), abs=1e-6)


@pytest.mark.parametrize("body, message", [
    ({"prompts": [], "spms": ["circle"]}, "at least one prompt"),
    ({"prompts": ["a circle"], "spms": ["nothing"]}, "nothing"),
    ({"prompts": ["a circle"], "spms": ["circle"], "metric": "cosine"}, "unknown gate metric"),
    ({"prompts": ["a circle"], "spms": ["circle"], "factor": "lots"}, "FT factor"),
    ({"prompts": ["a circle"], "spm": ["circle"]}, "unknown field"),
    ({"prompts": ["a circle"]}, "at least one SPM"),
    ("a circle", "JSON object"),
])
def test_bad_requests_are_422_with_the_reason(webui, body, message):
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as err:
        webui.post(body)
    assert err.value.status_code == 422 and message in err.value.detail


def test_no_model_loaded_is_422_with_the_reason(webui):
    from fastapi import HTTPException

    webui.modules.shared.sd_model = None
    with pytest.raises(HTTPException) as err:
        webui.post({"prompts": ["a circle"], "spms": ["circle"]})
    assert err.value.status_code == 422 and "no Stable Diffusion model" in err.value.detail


def test_enforced_spms_are_reported_with_the_operators_gate(world, tmp_path):
    w = loaded(world, tmp_path, spm_enforce="star:1")
    try:
        out = w.post({"prompts": ["a green star"], "spms": ["circle"], "ft": False})
        by_spm = {g["spm"]: g for g in out["gates"]}
        assert by_spm["star"]["enforced"] and not by_spm["circle"]["enforced"]
        assert by_spm["star"]["gate"] == 1.0 and out["settings"]["star"]["ft"] is True  # the operator's gate
        assert out["settings"]["circle"]["ft"] is False
    finally:
        w.mod.ext().shutdown()
        miniwebui.unload()


def test_lockdown_turns_the_route_off_with_403(world, tmp_path):
    w = loaded(world, tmp_path, spm_enforce="star:1", spm_lockdown=True)
    try:
        from fastapi import HTTPException

        with pytest.raises(HTTPException) as err:
            w.post({"prompts": ["a green star"], "spms": []})
        assert err.value.status_code == 403 and "--spm-lockdown" in err.value.detail
    finally:
        w.mod.ext().shutdown()
        miniwebui.unload()
