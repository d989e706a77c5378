"""Run by test_webui_ui.py with .venv-ui's python (real gradio 3.41.2): the script's accordion,
its paste-back, its settings and the WebUI's SPM tab build, against the stand-in WebUI."""

import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import gradio as gr  # noqa: E402

import miniwebui  # noqa: E402
from lib_spm.hosts.webui.args import SLOTS, ApplyArgs, Choice  # noqa: E402
from lib_spm.world.model import load_world  # noqa: E402
from spm_helpers import random_spm  # noqa: E402

out = {}
tmp = Path(tempfile.mkdtemp())
mod, modules = miniwebui.load(tmp / "models")
sd = miniwebui.WorldModel(load_world())
modules.shared.sd_model = sd
(tmp / "models" / "spm").mkdir(parents=True, exist_ok=True)
random_spm(sd.model.diffusion_model, ["circle"], name="circle").save(tmp / "models" / "spm" / "circle.safetensors")

script = mod.SPMScript()
with gr.Blocks() as demo:
    components = script.ui(False)
out["components"] = [type(c).__name__ for c in components]
assert len(components) == 4 + 2 * SLOTS, out
assert type(components[0]).__name__ == "InputAccordion"
names = components[4]
out["choices"] = [c[0] if isinstance(c, (list, tuple)) else c for c in names.choices]
assert out["choices"] == ["None", "circle"], out

want = ApplyArgs(True, True, 2.0, "clipcos", (Choice("circle", 0.5), Choice("star", -1.0)))
infotext = {"SPM": "circle:0.5, star:-1", "SPM FT": "clipcos x2", "SPM enforced": "nsfw:1"}
pasted = [fn(infotext) for _, fn in script.infotext_fields]
assert [c for c, _ in script.infotext_fields] == components
assert pasted == want.as_args(), pasted
assert ApplyArgs.parse(pasted) == want

modules.script_callbacks.fire("ui_settings")
labels = modules.shared.opts.data_labels
assert set(labels) == {"spm_ft_default", "spm_ft_factor", "spm_ft_metric"}, labels
assert all(info.section == ("spm", "Concept erasure (SPM)") for info in labels.values())

(tab, title, elem_id), = modules.script_callbacks.fire("ui_tabs")[0]
assert isinstance(tab, gr.Blocks) and (title, elem_id) == ("SPM", "spm")
ids = {getattr(b, "elem_id", None) for b in tab.blocks.values()}
for need in ("spm_train_start", "spm_manage_table", "spm_merge_run", "spm_library_changed",
             "spm_test_run", "spm_test_table", "spm_test_spms", "spm_test_no_images"):
    assert need in ids, need
# the Train panel's Sampling choice: fresh by default, and one of the Train button's inputs, after the anchors
by_id = {getattr(b, "elem_id", None): b for b in tab.blocks.values()}
sampling = by_id["spm_train_sampling"]
out["sampling"] = [c[0] if isinstance(c, (list, tuple)) else c for c in sampling.choices]
assert out["sampling"] == ["fresh", "pool"] and sampling.value == "fresh", out
train_inputs = next(d["inputs"] for d in tab.dependencies
                    if by_id["spm_train_start"]._id in [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]])
assert train_inputs.index(sampling._id) == train_inputs.index(by_id["spm_train_anchors"]._id) + 1, train_inputs
assert "(fresh sampling)" in by_id["spm_train_estimate"].value, by_id["spm_train_estimate"].value
no_images = next(b.value for b in tab.blocks.values() if getattr(b, "elem_id", None) == "spm_test_no_images")
assert "Gates only in the WebUI" in no_images, no_images  # the WebUI's Test panel says it makes no images

# /spm/v1/gates served by a real FastAPI app over HTTP: the table, and 422 with the reason
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

app = FastAPI()
modules.script_callbacks.fire("app_started", None, app)
client = TestClient(app)
r = client.post("/spm/v1/gates", json={"prompts": ["a red circle", "a blue square"], "spms": ["circle"]})
assert r.status_code == 200, r.text
out["api_gates"] = [g["gate"] for g in r.json()["gates"]]
assert out["api_gates"][0] == 1.0 > out["api_gates"][1], out
for body, why in [({"prompts": [], "spms": ["circle"]}, "at least one prompt"), (["a circle"], ""),
                  ({"prompts": ["a circle"], "spms": ["../x"]}, "..")]:
    r = client.post("/spm/v1/gates", json=body)
    assert r.status_code == 422 and why in json.dumps(r.json()["detail"]), (body, r.status_code, r.text)
mod.ext().shutdown()

# an operator's locked server: the enforced SPMs shown locked, the tab read-only (no handler writes)
mod, modules = miniwebui.load(tmp / "models", spm_enforce="circle:1", spm_lockdown=True)
modules.shared.sd_model = sd
script = mod.SPMScript()
with gr.Blocks() as locked_demo:
    components = script.ui(False)
assert len(components) == 4 + 2 * SLOTS  # the args keep their layout for the API
html = [b.value for b in locked_demo.blocks.values() if type(b).__name__ == "HTML" and b.value]
assert any("Always applied" in h and "circle:1" in h for h in html), html
(tab, _, _), = modules.script_callbacks.fire("ui_tabs")[0]
ids = {getattr(b, "elem_id", None) for b in tab.blocks.values()}
assert "spm_manage_table" in ids and "spm_read_only" in ids, ids
assert "spm_test_locked" in ids, ids  # the Test panel is off under lockdown, and says why
for gone in ("spm_train_start", "spm_merge_run", "spm_manage_rename", "spm_manage_delete", "spm_manage_save",
             "spm_test_run", "spm_test_table"):
    assert gone not in ids, gone
app = FastAPI()
modules.script_callbacks.fire("app_started", None, app)
r = TestClient(app).post("/spm/v1/gates", json={"prompts": ["a red circle"], "spms": ["circle"]})
assert r.status_code == 403 and "--spm-lockdown" in r.json()["detail"], r.text
out["ok"] = True
mod.ext().shutdown()
print(json.dumps(out))
