"""A miniature AUTOMATIC1111 around the shipped shapes world: enough of its generation loop to run
the extension's script the way the WebUI does (written for these tests, not copied).

``load()`` puts the stand-in ``modules`` package (tests/webui_stub) on ``sys.path`` and imports
``scripts/spm.py`` fresh; ``unload()`` takes both away again. ``generate()`` follows
``process_images``: ``before_process``, ``process``, prompt tags parsed and activated,
``process_before_every_sampling``, a denoising loop whose every step fires ``on_cfg_denoiser``
and calls the UNet with the WebUI's row layout (cond rows per ``AND`` sub-prompt, then uncond),
``post_sample``, ``postprocess``, and ``close`` in a ``finally``. Like the WebUI, it swallows
(and reports) what script methods, callbacks and extra networks raise: see ``api_generate``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "webui_stub"


def load(models_path: Path, **cmd_opts):
    """Import the extension's script against the stand-in WebUI; returns (script module, modules)."""
    unload()
    sys.path.insert(0, str(STUB))
    from modules import paths, script_callbacks, shared  # noqa: the stand-in

    shared.reset()
    script_callbacks.clear()
    for k, v in cmd_opts.items():
        setattr(shared.cmd_opts, k, v)
    paths.models_path = str(models_path)
    spec = importlib.util.spec_from_file_location("spm_script_under_test", ROOT / "scripts" / "spm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    script_callbacks.fire("before_ui")  # start-up: extra networks and pages register here (API-only too)
    return mod, sys.modules["modules"]


def unload():
    """Take the stand-in away; like the WebUI reloading scripts, ``script_unloaded`` fires first."""
    callbacks = sys.modules.get("modules.script_callbacks")
    if callbacks is not None:
        callbacks.fire("script_unloaded")
    if str(STUB) in sys.path:
        sys.path.remove(str(STUB))
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]
    stub_fastapi = sys.modules.get("fastapi")
    if stub_fastapi is not None and str(STUB) in str(getattr(stub_fastapi, "__file__", "")):
        del sys.modules["fastapi"]  # the stand-in's, not a real FastAPI another test may import


class LdmStyle:
    """Mixin giving a diffusers UNet the LDM calling convention ``forward(x, timesteps, context, y=None)``."""

    def forward(self, x, timesteps=None, context=None, y=None, **kw):
        return super().forward(x, timesteps, context).sample


def ldm_style(unet: torch.nn.Module) -> torch.nn.Module:
    if isinstance(unet, LdmStyle):
        return unet
    unet.__class__ = type(f"Ldm{type(unet).__name__}", (LdmStyle, type(unet)), {})
    return unet


class WorldModel:
    """``shared.sd_model`` for the shapes world: SD1-style conditioning, LDM UNet convention."""

    is_sd1, is_sd2, is_sdxl = True, False, False
    cond_stage_key = "txt"

    def __init__(self, world):
        from lib_spm.world.model import new_scheduler

        self.world = world
        self.model = SimpleNamespace(diffusion_model=ldm_style(world.unet))
        te = world.text_encoder
        self.cond_stage_model = SimpleNamespace(tokenize=lambda texts: [list(t) for t in te.tokens(list(texts))])
        self.sd_checkpoint_info = SimpleNamespace(title="shapes-world.safetensors [0]")
        self.scheduler = new_scheduler()
        self.alphas_cumprod = self.scheduler.alphas_cumprod

    def get_learned_conditioning(self, texts):
        with torch.no_grad():
            return self.world.text_encoder.encode(list(texts))


def _entry(end, cond):
    return SimpleNamespace(end_at_step=end, cond=cond)


class Processing:
    """The processing object's fields the script and the row reader read."""

    def __init__(self, sd_model, prompts, negatives, steps, parser):
        self.sd_model = sd_model
        self.all_prompts, self.prompts = list(prompts), list(prompts)
        self.negative_prompts = list(negatives)
        self.steps = self.firstpass_steps = steps
        self.is_hr_pass = False
        self.extra_generation_params = {}
        self.comments = {}
        self.closed = False
        self._parser = parser
        self._conds = None

    def comment(self, text):
        self.comments[text] = 1

    def close(self):
        self.closed = True

    def setup_conds(self, hires_steps=None):
        """Encode the schedules; ``hires_steps``: the hires pass's (``hr_prompts``, counted after
        the first pass as the WebUI does)."""
        P = self._parser
        prompts, negatives = (self.hr_prompts, self.hr_negative_prompts) if hires_steps else \
            (self.prompts, self.negative_prompts)
        idx, flat, _ = P.get_multicond_prompt_list(prompts)

        def encoded(schedule):
            return [_entry(e, self.sd_model.get_learned_conditioning([t])[0]) for e, t in schedule]

        def schedules(texts):
            return P.get_learned_conditioning_prompt_schedules(texts, self.firstpass_steps, hires_steps)

        flat_s = [encoded(s) for s in schedules(flat)]
        c = SimpleNamespace(batch=[[SimpleNamespace(schedules=flat_s[i], weight=w) for i, w in image] for image in idx])
        self._conds = (c, [encoded(s) for s in schedules(negatives)])

    def get_conds(self):
        return self._conds


def denoise(p, steps, cfg, seed, on_step, opts):
    """The sampler: DDIM over the world's schedule, one CFGDenoiser.forward per step."""
    model = p.sd_model
    unet = model.model.diffusion_model
    sched = model.scheduler
    sched.set_timesteps(steps)
    from lib_spm.world.model import LATENT

    B = len(p.prompts)
    x = torch.randn((B, *LATENT), generator=torch.Generator().manual_seed(seed))
    c, uc = p.get_conds()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            step = i + 1

            def pick(schedule):
                return next((e for e in schedule if step <= e.end_at_step), schedule[0])

            cond = torch.stack([pick(cp.schedules).cond for image in c.batch for cp in image])
            uncond = torch.stack([pick(s).cond for s in uc])
            weights = [[cp.weight for cp in image] for image in c.batch]
            denoiser = SimpleNamespace(p=p, step=step, image_cfg_scale=None,
                                       sampler=SimpleNamespace(sampler_extra_args={"cond": c, "uncond": uc}))
            on_step(SimpleNamespace(text_cond=cond, text_uncond=uncond, denoiser=denoiser, sampling_step=i,
                                    total_sampling_steps=steps))
            reps = [len(w) for w in weights]
            x_in = torch.cat([x.repeat_interleave(torch.tensor(reps), 0), x])
            ctx = torch.cat([cond, uncond])
            if opts.batch_cond_uncond:
                eps = unet(x_in, t.expand(x_in.shape[0]), context=ctx)
            else:
                eps = torch.cat([unet(x_in[a:a + B], t.expand(min(B, x_in.shape[0] - a)), context=ctx[a:a + B])
                                 for a in range(0, x_in.shape[0], B)])
            e_c, e_u = eps[: cond.shape[0]], eps[cond.shape[0]:]
            out, row = [], 0
            for b, w in enumerate(weights):
                guided = e_u[b].clone()
                for wk in w:
                    guided += cfg * wk * (e_c[row] - e_u[b])
                    row += 1
                out.append(guided)
            x = sched.step(torch.stack(out), t, x).prev_sample
    return x


def generate(script_mod, modules, script, args, prompts, negatives=None, *, steps=4, cfg=4.0, seed=0,
             fail_at_step=None, hires_steps=None, load_model=None, others=()):
    """One txt2img run as ``process_images`` makes it. Returns (latents, p); with ``hires_steps``
    a second pass (the hires fix, without upscaling) follows and latents are (first, second).

    Script methods run through the stand-in ``ScriptRunner`` and callbacks through
    ``script_callbacks``, which report and swallow what they raise, as the WebUI's do; only what
    is raised inside the UNet call (or the sampler) ends the run. ``load_model``: a model loaded
    after ``before_process`` (a checkpoint override, a lazy first load), with its callback.
    ``others``: (script, args) of other always-on scripts, run before this one.
    """
    shared, script_callbacks, extra_networks = modules.shared, modules.script_callbacks, modules.extra_networks
    from modules import prompt_parser, scripts

    negatives = negatives if negatives is not None else [""] * len(prompts)
    runner = scripts.ScriptRunner([*others, (script, args)])
    p = Processing(shared.sd_model, prompts, negatives, steps, prompt_parser)
    p.scripts, p.script_args = runner, runner.script_args
    with closing(p):
        runner.before_process(p)
        if load_model is not None:
            shared.sd_model = p.sd_model = load_model
            script_callbacks.fire("model_loaded", load_model)
        runner.process(p)
        runner.before_process_batch(p, batch_number=0, prompts=p.prompts)
        p.prompts, data = extra_networks.parse_prompts(p.prompts)
        extra_networks.activate(p, data)
        runner.process_batch(p, batch_number=0, prompts=p.prompts)
        p.setup_conds()
        runner.process_before_every_sampling(p)

        def on_step(params):
            if fail_at_step is not None and params.sampling_step == fail_at_step:
                raise RuntimeError("sampling failed")
            script_callbacks.fire("cfg_denoiser", params)

        latents = denoise(p, steps, cfg, seed, on_step, shared.opts)
        if hires_steps:
            p.is_hr_pass = True
            p.hr_prompts, p.hr_negative_prompts = list(p.prompts), list(p.negative_prompts)
            p.setup_conds(hires_steps)
            runner.process_before_every_sampling(p)
            latents = (latents, denoise(p, hires_steps, cfg, seed + 1, on_step, shared.opts))
        runner.post_sample(p, scripts.PostSampleArgs(latents))
        extra_networks.deactivate(p, data)
        runner.postprocess(p, SimpleNamespace(images=[]))
    return latents, p


def api_generate(script_mod, modules, script, args, *a, **kw):
    """``generate`` behind the WebUI API: (status, body).

    The request's ``alwayson_scripts`` args are laid over the script's UI defaults as
    ``Api.init_script_args`` does (extra args are dropped, missing ones keep their defaults), and
    an exception that ends the run becomes ``{"error", "detail", "body", "errors"}`` with
    ``vars(e)``'s ``status_code`` (else 500), as ``handle_exception`` answers."""
    from lib_spm.hosts.webui.args import ApplyArgs

    d = script_mod.ext().default_args()
    defaults = ApplyArgs(False, d["ft"], d["factor"], d["metric"]).as_args()
    args = list(args)[: len(defaults)] + defaults[len(args):]
    try:
        latents, p = generate(script_mod, modules, script, args, *a, **kw)
    except Exception as e:
        return vars(e).get("status_code", 500), {"error": type(e).__name__, "detail": vars(e).get("detail", ""),
                                                 "body": vars(e).get("body", ""), "errors": str(e)}
    return 200, {"latents": latents, "info": dict(p.extra_generation_params), "comments": dict(p.comments), "p": p}
