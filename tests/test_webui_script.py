"""The WebUI script end to end on the shapes world, through a stand-in WebUI (tests/miniwebui.py).

Every generation is checked against the core applied by hand with the rows' true texts: the
script must add nothing and lose nothing on the way (per-row gates, tags, infotext, cleanup).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import miniwebui
from lib_spm import GateSettings, Session, SPMValueError
from lib_spm.errors import SPMRequestError
from lib_spm.hosts.webui.args import SLOTS, ApplyArgs, Choice
from lib_spm.world.model import load_world
from spm_helpers import hook_counts, random_spm

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture
def webui(world, tmp_path):
    """The stand-in WebUI with the script loaded, the world as the model, two SPMs in models/spm."""
    models = tmp_path / "models"
    mod, modules = miniwebui.load(models)
    sd = miniwebui.WorldModel(world)
    modules.shared.sd_model = sd
    folder = models / "spm"
    folder.mkdir(parents=True, exist_ok=True)
    unet = sd.model.diffusion_model
    random_spm(unet, ["circle"], seed=1, std=0.3, name="circle").save(folder / "circle.safetensors")
    random_spm(unet, ["star"], seed=2, std=0.3, name="star").save(folder / "star.safetensors")
    script = mod.SPMScript()
    yield SimpleNamespace(mod=mod, modules=modules, sd=sd, unet=unet, script=script, folder=folder)
    mod.ext().shutdown()
    miniwebui.unload()


def args(*choices, enabled=True, ft=True, factor=1.0, metric="pooled_tokenuni"):
    return ApplyArgs(enabled, ft, factor, metric, tuple(Choice(n, s) for n, s in choices)).as_args()


def run(w, a, prompts, negatives=None, **kw):
    return miniwebui.generate(w.mod, w.modules, w.script, a, prompts, negatives, **kw)


def reference(w, spms, prompts, negatives=None, gate=GateSettings(), steps=4, seed=0, hires_steps=None):
    """The core applied directly, told each row's text: what the script must reproduce."""
    from modules import prompt_parser

    te = w.sd.world.text_encoder
    negatives = negatives if negatives is not None else [""] * len(prompts)
    p = miniwebui.Processing(w.sd, prompts, negatives, steps, prompt_parser)
    p.setup_conds()
    texts, cursor = [], [0]

    def row_tokens(batch):  # the step's rows, walked call by call
        start, cursor[0] = cursor[0], cursor[0] + batch
        assert cursor[0] <= len(texts)
        return [tuple(t) for t in te.tokens(texts[start:cursor[0]])]

    idx, flat, _ = prompt_parser.get_multicond_prompt_list(p.prompts)

    def on_step(params):  # the texts of the step's rows: cond per (image, AND part), then uncond
        sched = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps)
        negs = prompt_parser.get_learned_conditioning_prompt_schedules(negatives, steps)
        step = params.denoiser.step
        cursor[0] = 0
        texts[:] = [next(t for e, t in sched[i] if step <= e) for image in idx for i, _ in image] + \
                   [next(t for e, t in s if step <= e) for s in negs]

    loaded = [(w.mod.ext().library.load(n), s) for n, s in spms]
    with Session(w.unet, loaded, encoder=te, gate=gate, conditioning_of=lambda a, k: k["context"],
                 row_tokens=row_tokens) if loaded else contextlib.nullcontext():
        first = miniwebui.denoise(p, steps, 4.0, seed, on_step, w.modules.shared.opts)
        if not hires_steps:
            return first
        steps = hires_steps  # the hires pass has no prompt editing here: its rows are its prompts
        return first, miniwebui.denoise(p, hires_steps, 4.0, seed + 1, on_step, w.modules.shared.opts)


PROMPTS = ["a red circle", "a blue square on black"]


# -- the API surface --------------------------------------------------------------------------------

def test_the_script_uses_only_the_webui_surface(webui):
    surface = json.loads((FIXTURES / "webui_api_surface.json").read_text())
    base = surface["Script_base_class"]["methods"]
    for name, fn in vars(webui.mod.SPMScript).items():
        if callable(fn) and not name.startswith("_"):
            assert name in base, f"{name} is no Script method in WebUI v1.10.1"
            ours = list(inspect.signature(fn).parameters)
            theirs = [p.strip().split(":")[0].split("=")[0].lstrip("*") for p in base[name].strip("()").split(",")]
            assert ours[: len(theirs)] == theirs[: len(ours)], name
    callbacks = surface["script_callbacks"]["functions"]
    for name in webui.modules.script_callbacks.callbacks:
        assert f"on_{name}" in callbacks


# -- applying -------------------------------------------------------------------------------------

def test_accordion_applies_every_row_by_its_own_prompt(webui):
    got, p = run(webui, args(("circle", 1.0)), PROMPTS)
    want = reference(webui, [("circle", 1.0)], PROMPTS)
    plain = reference(webui, [], PROMPTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    change = (got - plain).flatten(1).norm(dim=1)
    assert change[0] > 0.1 and change[1] < 0.1 * change[0]  # the square barely moves
    assert p.extra_generation_params["SPM"] == "circle:1"
    assert p.extra_generation_params["SPM FT"] == "pooled_tokenuni x1"
    assert len(p.extra_generation_params["SPM hashes"].split(": ")[1]) == 10
    assert hook_counts(webui.unet) == 0 and p.closed


@pytest.mark.parametrize("prompts,negatives", [
    (["a red circle AND a green star :0.5", "a blue square"], None),
    (["a [red circle:blue square:2]", "a yellow star"], ["ugly", "[blurry:dark:3]"]),
])
def test_and_prompt_editing_and_negatives_gate_each_row(webui, prompts, negatives):
    a = args(("circle", 1.0), ("star", 0.8))
    got, _ = run(webui, a, prompts, negatives)
    want = reference(webui, [("circle", 1.0), ("star", 0.8)], prompts, negatives)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_hires_pass_is_gated_by_its_own_rows(webui):
    (first, second), _ = run(webui, args(("circle", 1.0)), PROMPTS, hires_steps=3)
    want_first, want_second = reference(webui, [("circle", 1.0)], PROMPTS, hires_steps=3)
    torch.testing.assert_close(first, want_first, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, want_second, rtol=0, atol=1e-5)
    _, plain = reference(webui, [], PROMPTS, hires_steps=3)
    assert (second - plain)[0].norm() > 0.1  # the SPM was on during the second pass too
    assert hook_counts(webui.unet) == 0


def test_batch_cond_uncond_off_gives_the_same_images(webui):
    a = args(("circle", 1.0))
    together, _ = run(webui, a, PROMPTS)
    webui.modules.shared.opts.batch_cond_uncond = False
    apart, _ = run(webui, a, PROMPTS)
    # other batch sizes move fp32 convolutions by ~1e-4; a row gated wrongly moves by > 0.1
    torch.testing.assert_close(apart, together, rtol=0, atol=2e-3)
    wrong = reference(webui, [("circle", 1.0)], PROMPTS, gate=GateSettings(enabled=False))
    assert (wrong - apart).abs().max() > 0.05


def test_prompt_tag_applies_without_the_accordion(webui):
    got, p = run(webui, args(enabled=False), ["a red circle <spm:circle:0.5>", "a blue square on black"])
    assert p.prompts == ["a red circle ", "a blue square on black"]
    want = reference(webui, [("circle", 0.5)], ["a red circle ", "a blue square on black"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert p.extra_generation_params["SPM"] == "circle:0.5"  # what acted, tags included


def test_prompt_tag_overrides_the_accordion_strength_for_that_spm(webui):
    got, p = run(webui, args(("circle", 1.0)), ["a red circle <spm:circle:0.25>", "a blue square on black"])
    want = reference(webui, [("circle", 0.25)], ["a red circle ", "a blue square on black"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert p.extra_generation_params["SPM"] == "circle:0.25"  # the strength that acted


def test_ft_off_applies_to_every_row(webui):
    got, _ = run(webui, args(("circle", 1.0), ft=False), PROMPTS)
    want = reference(webui, [("circle", 1.0)], PROMPTS, gate=GateSettings(enabled=False))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_disabled_accordion_changes_nothing(webui):
    got, p = run(webui, args(("circle", 1.0), enabled=False), PROMPTS)
    torch.testing.assert_close(got, reference(webui, [], PROMPTS), rtol=0, atol=0)
    assert p.extra_generation_params == {}


# -- what cannot be applied -------------------------------------------------------------------------

def test_spm_for_another_architecture_is_skipped_with_a_warning(webui):
    spm = webui.mod.ext().library.load("star")
    sdxl = replace(spm, metadata=replace(spm.metadata, arch="sdxl"))
    sdxl.save(webui.folder / "xl.safetensors")
    got, p = run(webui, args(("xl", 1.0), ("circle", 1.0)), PROMPTS)
    torch.testing.assert_close(got, reference(webui, [("circle", 1.0)], PROMPTS), rtol=0, atol=1e-5)
    assert any("'xl' skipped" in c and "sdxl" in c for c in p.comments)
    params = p.extra_generation_params
    assert params["SPM"] == "circle:1" and "xl" not in params["SPM hashes"]  # only what acted
    assert params["SPM skipped"].startswith("xl: it is for sdxl")


def test_missing_spm_in_a_tag_is_skipped_with_a_warning(webui):
    got, p = run(webui, args(enabled=False), ["a red circle <spm:nothere:1>"])
    torch.testing.assert_close(got, reference(webui, [], ["a red circle "]), rtol=0, atol=0)
    assert any("'nothere' skipped" in c for c in p.comments)
    assert "SPM" not in p.extra_generation_params  # never claims it applied
    assert p.extra_generation_params["SPM skipped"] == "nothere: no such SPM file"


BAD_ARGS = [
    (["yes please"], "enabled must be true or false"),
    ([True, True, 1.0, "pooled_tokenuni", "circle", "strong"], "must be a number"),
    ([True, True, float("nan")], "between"),
    ([True, True, 1.0, "cosine"], "unknown FT metric"),
    ([True, "maybe"], "true or false"),
    ([True, True, 1.0, "pooled_tokenuni", 3, 1.0], "name must be a string"),
]


@pytest.mark.parametrize("bad,message", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_bad_api_args_are_refused_and_change_nothing(webui, bad, message):
    before = {k: v.clone() for k, v in webui.unet.state_dict().items()}
    status, body = miniwebui.api_generate(webui.mod, webui.modules, webui.script, bad, PROMPTS)
    assert status == 422 and body["error"] == "SPMRequestError", body
    assert message in body["errors"] and body["errors"].startswith("Concept erasure (SPM): ")
    assert hook_counts(webui.unet) == 0
    assert all(torch.equal(before[k], v) for k, v in webui.unet.state_dict().items())


def test_args_must_be_a_list_of_at_most_the_script_s_args():
    with pytest.raises(SPMValueError, match="must be a list"):
        ApplyArgs.parse("circle")
    # (through the API the WebUI itself drops extra args: init_script_args copies as many as fit)
    with pytest.raises(SPMValueError, match="at most"):
        ApplyArgs.parse([True, True, 1.0, "pooled_tokenuni"] + ["circle", 1.0] * (SLOTS + 1))


def test_api_args_may_leave_out_trailing_slots(webui):
    got, _ = run(webui, [True, True, 1.0, "pooled_tokenuni", "circle"], PROMPTS)
    torch.testing.assert_close(got, reference(webui, [("circle", 1.0)], PROMPTS), rtol=0, atol=1e-5)


# -- cleanup --------------------------------------------------------------------------------------

def test_an_error_during_sampling_does_not_outlive_the_next_generation(webui):
    # The WebUI has no hook on failure (and we do not replace p.close): what a failed generation
    # attached goes when the next one begins, before it calls the UNet.
    with pytest.raises(RuntimeError, match="sampling failed"):
        run(webui, args(("circle", 1.0)), PROMPTS, fail_at_step=1)
    got, _ = run(webui, args(), PROMPTS)
    torch.testing.assert_close(got, reference(webui, [], PROMPTS), rtol=0, atol=0)
    assert hook_counts(webui.unet) == 0
    assert not webui.mod.ext().controller.attached


def test_a_refusal_ends_its_generation_when_it_is_raised(webui):
    with pytest.raises(SPMRequestError):
        run(webui, args(("circle", -1e9)), PROMPTS)
    assert hook_counts(webui.unet) == 0
    assert not webui.mod.ext().controller.attached


def test_checkpoint_change_moves_to_the_new_model(webui, world):
    run(webui, args(("circle", 1.0)), PROMPTS)
    webui.modules.script_callbacks.fire("model_loaded", webui.sd)
    other = miniwebui.WorldModel(world)  # a new model object (same weights): caches must not carry over
    webui.modules.shared.sd_model = other
    got, _ = run(webui, args(("circle", 1.0)), PROMPTS)
    torch.testing.assert_close(got, reference(webui, [("circle", 1.0)], PROMPTS), rtol=0, atol=1e-5)
    assert webui.mod.ext().controller._model_state[0] is other


def test_unloading_the_script_detaches_mid_generation(webui):
    from modules import prompt_parser

    p = miniwebui.Processing(webui.sd, PROMPTS, ["", ""], 4, prompt_parser)
    a = args(("circle", 1.0))
    webui.script.before_process(p, *a)
    p.setup_conds()
    webui.script.process_before_every_sampling(p, *a)
    assert hook_counts(webui.unet) > 0
    webui.modules.script_callbacks.fire("script_unloaded")
    assert hook_counts(webui.unet) == 0


# -- infotext, XYZ, cards, API ------------------------------------------------------------------------

def test_infotext_pastes_back_to_the_same_settings(webui):
    a = ApplyArgs(True, True, 1.5, "clipcos_tokenuni", (Choice("circle", 0.7), Choice("star", -0.5)))
    _, p = run(webui, a.as_args(), PROMPTS, steps=1)
    assert ApplyArgs.from_infotext(p.extra_generation_params).as_args() == a.as_args()
    assert ApplyArgs.from_infotext({"SPM": "circle:oops"}) is None  # unreadable: pasting still works
    assert ApplyArgs.from_infotext({}) is None
    _, p = run(webui, ApplyArgs(True, False, choices=(Choice("circle", 1.0),)).as_args(), PROMPTS, steps=1)
    assert ApplyArgs.from_infotext(p.extra_generation_params).ft is False
    # an SPM the pasted prompt holds as a tag comes back with the prompt, not in the accordion
    tagged = {"SPM": "circle:0.7, star:0.5", "Prompt": "a red circle <spm:star:0.5>"}
    assert [c.name for c in ApplyArgs.from_infotext(tagged).choices] == ["circle"]
    assert ApplyArgs.from_infotext({"SPM": "star:0.5", "Prompt": "<spm:star:0.5>"}) is None


def test_xyz_axes_set_strength_model_and_factor(webui):
    axis = lambda label, kind, apply, choices=None: SimpleNamespace(label=label, apply=apply, choices=choices)  # noqa
    xyz = SimpleNamespace(axis_options=[], AxisOption=axis)
    webui.modules.scripts.scripts_data[:] = [SimpleNamespace(script_class=SimpleNamespace(__module__="xyz_grid.py"),
                                                             module=xyz)]
    webui.modules.script_callbacks.fire("before_ui")
    labels = {o.label: o for o in xyz.axis_options}
    assert set(labels) == {"[SPM] Strength", "[SPM] Model", "[SPM] FT factor"}
    assert labels["[SPM] Model"].choices() == ["circle", "star"]
    from modules import prompt_parser

    p = miniwebui.Processing(webui.sd, PROMPTS, ["", ""], 4, prompt_parser)
    labels["[SPM] Model"].apply(p, "circle", None)
    labels["[SPM] Strength"].apply(p, 0.5, None)
    webui.script.before_process(p, *args(enabled=False))
    p.setup_conds()
    webui.script.process_before_every_sampling(p, *args(enabled=False))
    assert p.extra_generation_params["SPM"] == "circle:0.5"
    webui.mod.ext().controller.end(p)


def test_extra_network_cards_insert_the_tag(webui):
    (webui.folder / "circle.txt").write_text("erases circles")
    (webui.folder / "circle.png").write_bytes(b"png")
    (webui.folder / "star.png").symlink_to("/etc/hostname")  # a preview leading out is never shown
    page = webui.modules.ui_extra_networks.pages[-1]
    items = {i["name"]: i for i in page.list_items()}
    assert set(items) == {"circle", "star"}
    assert items["circle"]["prompt"] == '"<spm:circle:" + opts.extra_networks_default_multiplier + ">"'
    assert items["circle"]["description"] == "erases circles"
    assert "circle.png" in items["circle"]["preview"] and items["star"]["preview"] is None
    assert "circle" in items["circle"]["search_terms"]
    assert items["circle"]["metadata"]["spm_targets"]
    assert webui.modules.extra_networks.registry["spm"].name == "spm"


def test_api_route_lists_spms(webui):
    routes = {}
    app = SimpleNamespace(add_api_route=lambda path, fn, **kw: routes.setdefault(path, (fn, kw)))
    webui.modules.script_callbacks.fire("app_started", None, app)
    fn, kw = routes["/spm/v1/models"]
    assert kw["methods"] == ["GET"] and kw["dependencies"] == []
    assert [m["name"] for m in fn()] == ["circle", "star"]


def test_spm_dir_flag_and_default_folder(world, tmp_path):
    mod, _ = miniwebui.load(tmp_path / "models", spm_dir=str(tmp_path / "mine"))
    try:
        assert mod.ext().library.root == (tmp_path / "mine").resolve() or mod.ext().library.root == tmp_path / "mine"
    finally:
        miniwebui.unload()
    mod, _ = miniwebui.load(tmp_path / "models")
    try:
        assert Path(mod.ext().library.root).resolve() == (tmp_path / "models" / "spm").resolve()
    finally:
        miniwebui.unload()


# -- moderation -------------------------------------------------------------------------------------

@contextlib.contextmanager
def operator_webui(world, tmp_path, enforce: str, arch: str | None = None):
    """The stand-in WebUI started with ``--spm-enforce``; its folder holds "circle" (or "xl", for ``arch``)."""
    models = tmp_path / "models"
    mod, modules = miniwebui.load(models, spm_enforce=enforce)
    try:
        modules.shared.sd_model = sd = miniwebui.WorldModel(world)
        (models / "spm").mkdir(parents=True)
        name = "xl" if arch else "circle"
        spm = random_spm(sd.model.diffusion_model, ["circle"], seed=1, std=0.3, name=name)
        if arch:
            spm = replace(spm, metadata=replace(spm.metadata, arch=arch))
        spm.save(models / "spm" / f"{name}.safetensors")
        yield SimpleNamespace(mod=mod, modules=modules, sd=sd, unet=sd.model.diffusion_model, script=mod.SPMScript())
    finally:
        miniwebui.unload()


def test_enforced_spm_applies_whatever_the_user_chooses(world, tmp_path):
    with operator_webui(world, tmp_path, "circle:1") as w:
        want = reference(w, [("circle", 1.0)], PROMPTS)
        for user in (args(enabled=False), args(("circle", 0.0), factor=0.0)):
            got, p = run(w, user, PROMPTS)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert p.extra_generation_params["SPM enforced"] == "circle:1"
            assert "SPM" not in p.extra_generation_params  # the user's zero-strength choice did not act
        assert hook_counts(w.unet) == 2  # only the guard (pre- and post-hook) stays while enforcing


def test_generation_is_refused_when_no_enforced_spm_fits(world, tmp_path):
    with operator_webui(world, tmp_path, "xl", arch="sdxl") as w:
        status, body = miniwebui.api_generate(w.mod, w.modules, w.script, args(enabled=False), PROMPTS)
        assert status == 503 and "none of the enforced SPMs" in body["errors"]
        assert hook_counts(w.unet) == 2


def test_spm_whose_layers_do_not_fit_is_skipped_and_the_rest_still_act(webui):
    """A file of no architecture label whose shapes do not fit the model: the session with both
    fails, placement names the one that does not fit, and the other acts alone."""
    wide = random_spm(webui.unet, ["star"], seed=3, name="wide")
    key = next(iter(wide.layers))
    w = wide.layers[key]
    w.down = torch.zeros(w.down.shape[0], w.down.shape[1] * 2, *w.down.shape[2:])
    wide.save(webui.folder / "wide.safetensors")
    got, p = run(webui, args(("circle", 1.0), ("wide", 1.0)), PROMPTS)
    torch.testing.assert_close(got, reference(webui, [("circle", 1.0)], PROMPTS), rtol=0, atol=1e-5)
    skipped = p.extra_generation_params["SPM skipped"]
    assert skipped.startswith("wide: wide @ ") and "SPM layer" in skipped, skipped
    assert p.extra_generation_params["SPM"] == "circle:1"
    assert hook_counts(webui.unet) == 0
