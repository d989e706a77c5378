"""The extension in Forge, through the Forge stand-in (tests/forge_stub, modelled on Forge ``dfdcbab6``).

Rows: a table of Forge's layouts (uncond first, cond sub-prompts in reverse, CFG 1 without
uncond, batches, split calls, unequal lengths, prompt editing), each call's inferred texts
compared with the true chunk labels the stand-in's ``calc_cond_uncond_batch`` records. Then the
script end to end on the shapes world with Forge's engine: an SPM changes only the rows whose
prompt names its concept, enforcement fails closed, bad arguments refuse, a model loaded inside
the request keeps the request's SPMs. And the core adapts Forge's non-``nn.Linear`` Linear.
"""

from __future__ import annotations

import copy
import hashlib
from types import SimpleNamespace

import miniwebui
import pytest
import torch
from forge_stub import miniforge
from forge_stub.backend.diffusion_engine.sd15 import ForgeObjects, KModel, Predictor, StableDiffusion, UnetPatcher
from forge_stub.backend.operations import ForgeOperations, use_forge_linears
from models import ldm_tree
from spm_helpers import hook_counts, random_spm

from lib_spm import GateSettings, Session, SPMRuntimeError
from lib_spm.format import archs
from lib_spm.format.names import factor_dtype, is_linear, layer_names, spm_layer_paths
from lib_spm.hosts.webui.args import ApplyArgs, Choice
from lib_spm.hosts.webui.forge import ForgeRows, ForgeTokens
from lib_spm.hosts.webui.model import alphas_cumprod_of, is_forge, model_arch, unet_of
from lib_spm.hosts.webui.rows import _at
from lib_spm.world.model import load_world, new_scheduler


@pytest.fixture(scope="module")
def world():
    return load_world()


def args(*choices, enabled=True, ft=True, factor=1.0, metric="pooled_tokenuni"):
    return ApplyArgs(enabled, ft, factor, metric, tuple(Choice(n, s) for n, s in choices)).as_args()


# -- rows: a table of Forge's layouts ----------------------------------------------------------------

class _TextModel:
    """An engine whose encodings are seeded by the text (77 tokens; 154 for texts saying LONG)."""

    def __init__(self, unet):
        sched = new_scheduler()
        self.scheduler = sched
        self.forge_objects = ForgeObjects(unet=UnetPatcher(KModel(unet, Predictor(sched.alphas_cumprod))))

    def get_learned_conditioning(self, texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            out.append(torch.randn(154 if "LONG" in t else 77, 8, generator=g))
        return torch.stack(out) if len({o.shape for o in out}) == 1 else out


class _ZeroUNet(torch.nn.Module):
    def forward(self, x, timesteps=None, context=None, control=None, transformer_options={}, **kw):
        return torch.zeros_like(x)


ROW_CASES = {
    "one image": (["a cat"], None, 4.0, None),
    "CFG 1 (no uncond)": (["a cat"], None, 1.0, None),
    "batch 2": (["a cat", "a dog"], ["blurry", "dark"], 4.0, None),
    "batch 2 split per chunk": (["a cat", "a dog"], ["blurry", "dark"], 4.0, 1),
    "AND": (["a cat AND a hat"], ["blurry"], 4.0, None),
    "AND, batch 2, 3 parts, split": (["a AND b :0.5 AND c", "d AND e AND f"], None, 7.0, 2),
    "AND at CFG 1, split": (["a AND b", "c AND d"], None, 1.0, 1),
    "AND, unequal counts (Forge keeps the shortest)": (["a AND b", "c"], None, 4.0, None),
    "identical sub-prompts": (["a cat AND a cat"], ["a cat"], 4.0, None),
    "prompt editing": (["a [cat:dog:2] AND [red:blue:1] hat"], ["[x:y:2]"], 4.0, None),
    "unequal lengths concatenate": (["LONG a cat"], ["blurry"], 4.0, None),
    "unequal lengths, split": (["LONG a AND b"], ["blurry"], 4.0, 1),
}


@pytest.mark.parametrize("prompts,negatives,cfg,max_chunks", ROW_CASES.values(), ids=ROW_CASES.keys())
def test_forge_rows_label_every_call_with_its_true_texts(tmp_path, prompts, negatives, cfg, max_chunks):
    mod, modules = miniwebui.load(tmp_path)
    try:
        from modules import prompt_parser

        negatives = negatives or [""] * len(prompts)
        unet = _ZeroUNet()
        sd = _TextModel(unet)
        rows = ForgeRows(lambda t: (t,), opts=modules.shared.opts, parser=prompt_parser)
        seen = []

        def pre(module, a, kw):
            ctx = rows.conditioning_of(a, kw)
            seen.append(rows.next_call(ctx.shape[0]))

        unet.register_forward_pre_hook(pre, with_kwargs=True)
        p = miniforge.Processing(sd, prompts, negatives, 3, prompt_parser, cfg)
        p.setup_conds()
        record = []
        miniforge.denoise(p, 3, cfg, 0, rows.on_cfg_denoiser, max_chunks=max_chunks, record=record)

        idx, flat, _ = prompt_parser.get_multicond_prompt_list(prompts)
        cond_s = prompt_parser.get_learned_conditioning_prompt_schedules(flat, 3)
        neg_s = prompt_parser.get_learned_conditioning_prompt_schedules(negatives, 3)
        parts = min(len(i) for i in idx)

        def truth(step, label):
            if label[0] == "uncond":
                return [_at(s, step) for s in neg_s]
            return [_at(cond_s[image[label[1]][0]], step) for image in idx]

        want = [sum((truth(step, lab) for lab in labels), []) for step, labels in record]
        assert seen == want
        calls_per_step = len(record) // 3
        assert calls_per_step == -(-(parts + (cfg != 1)) // (max_chunks or 99))  # the layout really split
        assert all(s is not None for s in seen)
    finally:
        miniwebui.unload()


def test_forge_rows_give_up_on_calls_they_cannot_place(tmp_path):
    mod, modules = miniwebui.load(tmp_path)
    try:
        from modules import prompt_parser

        rows = ForgeRows(lambda t: (t,), opts=modules.shared.opts, parser=prompt_parser)
        ctx = torch.zeros(2, 77, 8)
        rows.conditioning_of((), {"context": ctx})  # no transformer_options: not calc_cond_uncond_batch
        assert rows.next_call(2) is None
        rows.conditioning_of((), {"context": ctx, "transformer_options": {"cond_or_uncond": [0]}})
        assert rows.next_call(2) is None  # no step seen (no on_cfg_denoiser)
    finally:
        miniwebui.unload()


# -- the script end to end in Forge ------------------------------------------------------------------

@pytest.fixture
def forge(world, tmp_path):
    """The stand-in Forge with the script loaded and its engine not loaded yet (Forge loads it
    lazily inside the first request); SPMs "circle", "star" and "xl" (for SDXL) in models/spm."""
    models = tmp_path / "models"
    folder = models / "spm"
    folder.mkdir(parents=True)
    sd = StableDiffusion(world)
    unet = sd.forge_objects.unet.model.diffusion_model
    circle = random_spm(unet, ["circle"], seed=1, std=0.3, name="circle")
    circle.save(folder / "circle.safetensors")
    random_spm(unet, ["star"], seed=2, std=0.3, name="star").save(folder / "star.safetensors")
    from dataclasses import replace

    replace(circle, metadata=replace(circle.metadata, arch="sdxl", name="xl")).save(folder / "xl.safetensors")
    handles = []
    yield SimpleNamespace(models=models, sd=sd, unet=unet, handles=handles)
    for h in handles:
        h.remove()
    miniwebui.unload()


def _load(f, **cmd_opts):
    mod, modules = miniwebui.load(f.models, **cmd_opts)
    modules.shared.sd_model = miniforge.FakeInitialModel()  # until the first generation loads the model
    return SimpleNamespace(mod=mod, modules=modules, script=mod.SPMScript())


def _api(w, f, a, prompts, first=False, **kw):
    return miniforge.api_generate(w.mod, w.modules, w.script, a, prompts, load_model=f.sd if first else None, **kw)


def test_forge_model_is_found_through_forge_objects(world):
    sd = StableDiffusion(world)
    assert is_forge(sd) and not hasattr(sd, "model")
    assert unet_of(sd) is sd.forge_objects.unet.model.diffusion_model
    assert model_arch(sd) == "sd1"
    assert alphas_cumprod_of(sd) is sd.forge_objects.unet.model.predictor.alphas_cumprod
    with pytest.raises(SPMRuntimeError, match="Forge has not loaded a model yet"):
        unet_of(type("FakeInitialModel", (), {"cond_stage_model": None})())
    assert ForgeTokens(sd).chunks("a red circle") == [tuple(world.tokenizer("a red circle",
                                                                              add_special_tokens=False).input_ids)]


CASES = {  # prompts, cfg, which rows name "circle"
    "batch 2": (["a red circle", "a blue star"], 4.0, [True, False]),
    "CFG 1": (["a blue star", "a red circle"], 1.0, [False, True]),
    "AND": (["a blue star AND a red circle", "a blue star AND a green square"], 4.0, [True, False]),
}


@pytest.mark.parametrize("prompts,cfg,named", CASES.values(), ids=CASES.keys())
def test_an_spm_changes_only_the_rows_naming_its_concept(forge, prompts, cfg, named):
    w = _load(forge)
    gates = []
    status, base = _api(w, forge, args(enabled=False), prompts, first=True, cfg=cfg)
    assert status == 200, base

    tokens = ForgeTokens(forge.sd)
    parts = [p.split(" AND ") for p in prompts]

    def after(module, a, kw, out):  # the user session's gates of each call, and those of its true rows
        session = w.mod.ext().controller._gen.attached[0].session
        flags, ctx = kw["transformer_options"]["cond_or_uncond"], kw["context"]
        order = ([None] if cfg != 1 else []) + list(reversed(range(min(map(len, parts)))))  # Forge's layout
        assert flags == [0 if j is not None else 1 for j in order]
        texts = sum(([""] * len(prompts) if j is None else [image[j] for image in parts] for j in order), [])
        true = session.gates(ctx, [tokens.row(t) for t in texts])
        blind = session.gates(ctx, None)  # the cosine alone, what unplaced rows get
        gates.append((flags, session.last_gates.clone(), true, blind))

    forge.handles.append(forge.unet.register_forward_hook(after, with_kwargs=True))
    status, body = _api(w, forge, args(("circle", 1.0)), prompts, cfg=cfg)
    assert status == 200, body
    assert body["info"]["SPM"] == "circle:1"
    diff = (body["latents"] - base["latents"]).abs().flatten(1).amax(1)
    assert [bool(d > 1e-3) for d in diff] == named
    assert all(d == 0 for d, n in zip(diff, named) if not n)  # untouched rows are exactly the base
    assert all(torch.equal(g, true) for _, g, true, _ in gates)  # every row gated by its own text
    assert any(not torch.equal(true, blind) for _, _, true, blind in gates)  # (which the cosine alone is not)
    flags, g, _, _ = gates[-1]
    assert flags[0] == (1 if cfg != 1 else 0)  # uncond first, when there is one
    B = len(prompts)
    if cfg != 1:
        assert float(g[:B].max()) == 0.0  # the empty negative prompts: gated off
    assert hook_counts(forge.unet) == 1  # only the test's own hook is left
    w.mod.ext().shutdown()


def test_a_model_loaded_inside_the_request_keeps_its_spms(forge):
    w = _load(forge)
    status, body = _api(w, forge, args(("circle", 1.0)), ["a red circle"], first=True)
    assert status == 200, body
    assert body["info"].get("SPM") == "circle:1" and "SPM skipped" not in body["info"]
    status, base = _api(w, forge, args(enabled=False), ["a red circle"])
    assert (body["latents"] - base["latents"]).abs().max() > 1e-3
    w.mod.ext().shutdown()


@pytest.mark.parametrize("bad,message,code", [
    (args(("does_not_exist", 1.0)), "no SPM named 'does_not_exist'", 422),
    (args(("circle", float("nan"))), "between", 422),
    ([True, True, 1.0, "bogus"], "unknown FT metric", 422),
])
def test_bad_arguments_refuse_in_forge(forge, bad, message, code):
    w = _load(forge)
    status, body = _api(w, forge, bad, ["a red circle"], first=True)
    assert status == code and message in body["errors"] and "latents" not in body, body
    assert hook_counts(forge.unet) == 0
    w.mod.ext().shutdown()


def test_enforcement_acts_in_forge_and_fails_closed_when_it_cannot(forge, caplog):
    w = _load(forge, spm_enforce="circle:1")
    status, body = _api(w, forge, args(enabled=False), ["a red circle"], first=True)
    assert status == 200 and body["info"]["SPM enforced"] == "circle:1", body
    assert "cannot guard" not in caplog.text  # Forge's placeholder model has no UNet to guard
    w.mod.ext().shutdown()
    miniwebui.unload()
    w = _load(forge, spm_enforce="xl:1")
    finished = []
    forge.handles.append(forge.unet.register_forward_hook(lambda *a: finished.append(1)))
    status, body = _api(w, forge, args(enabled=False), ["a red circle"], first=True)
    assert status == 503 and "none of the enforced SPMs (xl) fits the loaded sd1 model" in body["errors"], body
    assert "latents" not in body and finished == []
    w.mod.ext().shutdown()


# -- the core adapts Forge's Linear ------------------------------------------------------------------

def test_forge_linear_is_adapted_by_what_it_is():
    plain = ldm_tree("sd15")
    forge = use_forge_linears(copy.deepcopy(plain))
    assert not any(isinstance(m, torch.nn.Linear) for m in forge.modules())
    assert any(isinstance(m, ForgeOperations.Linear) for m in forge.modules())
    assert layer_names(forge).keys() == layer_names(plain).keys()
    assert spm_layer_paths(forge) == spm_layer_paths(plain)
    assert archs.unet_context_dim(forge) == archs.unet_context_dim(plain)
    assert archs.layer_limits(forge) == archs.layer_limits(plain)
    assert not is_linear(torch.nn.Conv2d(2, 2, 1)) and not is_linear(torch.nn.LayerNorm(4))


@pytest.mark.parametrize("storage,manual_cast", [(None, False), (torch.float8_e4m3fn, True)])
def test_forge_linear_with_an_spm_matches_nn_linear(world, storage, manual_cast):
    """Same outputs as on nn.Linear layers; fp8-stored weights (cast per call) keep fp32 factors."""
    plain = copy.deepcopy(world.unet)
    spm = random_spm(plain, ["circle"], seed=1, std=0.3)
    forge = use_forge_linears(copy.deepcopy(plain), storage, manual_cast)
    if storage is not None:  # the reference computes with the same rounded weights
        for (_, a), (_, b) in zip(plain.named_modules(), forge.named_modules()):
            if isinstance(a, torch.nn.Linear):
                a.weight.data = b.weight.data.float()
                if a.bias is not None:
                    a.bias.data = b.bias.data.float()
    x, t, ctx = torch.randn(2, 12, 16, 16), torch.tensor([10, 10]), world.text_encoder.encode(["a red circle"] * 2)
    with torch.no_grad():
        outs = []
        for unet in (plain, forge):
            with Session(unet, [(spm, 1.0)], gate=GateSettings(enabled=False)) as s:
                outs.append(unet(x, t, ctx).sample)
                if unet is forge:
                    layer = next(iter(s._layers.values()))
                    assert layer.down.dtype == torch.float32 == factor_dtype(layer.module)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        assert hook_counts(forge) == 0


# -- training against Forge's loaded model ---------------------------------------------------------

class _ForgeTrainModel:
    """A Forge engine as far as training reads it: a tiny SD1 UNet (Forge Linear layers) in
    ``forge_objects``, the predictor's schedule, conditioning encoded under inference mode."""

    def __init__(self, v: bool = False):
        from diffusers import DDPMScheduler
        from models import tiny_sd1

        base = tiny_sd1(True)
        with torch.inference_mode():  # as Forge loads its model: every weight an inference tensor
            cls = type("IntegratedUNet2DConditionModel", (_LdmForward, type(base)),
                       {"_supports_gradient_checkpointing": False})  # Forge's UNet has no such switch
            unet = cls.from_config(base.config)
            unet.load_state_dict(base.state_dict())
            use_forge_linears(unet.eval())
        acp = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
        predictor = Predictor(acp)
        predictor.prediction_type = "v_prediction" if v else "epsilon"
        self.forge_objects = ForgeObjects(unet=UnetPatcher(KModel(unet, predictor)))
        self.is_sd1 = True
        for name, m in unet.named_modules():  # Forge's BasicTransformerBlock: n = norm1(x); ...; x += n
            if name.endswith(".norm1"):
                m.register_forward_hook(_adds_in_place)

    @torch.inference_mode()
    def get_learned_conditioning(self, texts):
        from models import ToyEncoder

        return ToyEncoder().encode(list(texts)) * 4


def _adds_in_place(module, args, output):
    if args[0].requires_grad:
        args[0].add_(0)  # bumps the version of a tensor autograd saved, as Forge's ``x += n`` does


class _LdmForward:
    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        return super().forward(x, timesteps, context).sample


@pytest.mark.parametrize("v", [False, True], ids=["eps", "v"])
def test_training_runs_on_forges_loaded_model_and_leaves_it_as_it_was(tmp_path, v):
    from lib_spm import load_spm
    from lib_spm.hosts.webui.trainer import WebUIBackend
    from lib_spm.training.trainer import TrainConfig, train_spm

    sd = _ForgeTrainModel(v)
    unet = unet_of(sd)
    assert all(p.is_inference() for p in unet.parameters())
    before = {k: t.clone() for k, t in unet.state_dict().items()}
    be = WebUIBackend(sd, resolution=64, previews=False)
    assert be.arch == "sd1" and be.parameterization == ("v" if v else "eps") and be.dtype == torch.float32
    assert torch.equal(be.alphas_cumprod, sd.forge_objects.unet.model.predictor.alphas_cumprod.float())
    cfg = TrainConfig(targets=["circle"], iterations=2, lr=1e-2, warmup=1, max_denoising_steps=3, anchors=1,
                      la_strength=10.0, arch=be.arch, name="no_circle")
    res = train_spm(be, cfg, tmp_path / "x.safetensors")  # inference-mode conditioning must not break backward
    spm = load_spm(res.spm_path)
    assert res.steps == 2 and any(lw.up.abs().sum() > 0 for lw in spm.layers.values())
    assert len(spm.layers) == len(spm_layer_paths(unet))  # Forge's Linear layers were trained too
    assert all(torch.equal(before[k], t) for k, t in unet.state_dict().items())
    assert hook_counts(unet) == sum(n.endswith(".norm1") for n, _ in unet.named_modules())  # the stand-in's own


def test_the_test_panels_gate_route_scores_prompts_through_forges_text_engine(forge):
    """POST /spm/v1/gates in Forge: prompts tokenized by Forge's engine (it has no cond_stage_model)."""
    w = _load(forge)
    _api(w, forge, args(enabled=False), ["a red circle"], first=True)  # Forge loads its model here
    routes = {}
    app = SimpleNamespace(add_api_route=lambda path, fn, **kw: routes.setdefault(path, (fn, kw)))
    w.modules.script_callbacks.fire("app_started", None, app)
    post = routes["/spm/v1/gates"][0]
    out = post({"prompts": ["a red circle", "a blue star AND a red circle"], "spms": ["circle"]})
    gates = {(g["prompt"], g["part"]): g["gate"] for g in out["gates"]}
    assert gates[(0, 0)] > 0.9 and gates[(1, 0)] < gates[(0, 0)] and gates[(1, 1)] > 0.9, out
    w.mod.ext().shutdown()
