"""``process_images`` as Forge runs it, on the stand-in engine (``backend.diffusion_engine.sd15``)
and the A1111 stand-in's ``modules`` (tests/webui_stub, loaded by ``miniwebui.load``).

Differences from ``miniwebui.generate`` that matter to the extension: the model may be loaded
lazily after ``before_process`` (``forge_model_reload`` in ``process_images_inner``, firing
``model_loaded``); ``forge_objects`` are shallow copies renewed per batch; at CFG 1 there is no
uncond (``p.uc`` is None, and ``text_uncond`` too); each step fires ``on_cfg_denoiser`` and then
runs Forge's ``sampling_function`` (rows: uncond first, cond sub-prompts in reverse, split when
memory is short).
"""

from __future__ import annotations

from contextlib import closing
from types import SimpleNamespace

import torch

import miniwebui

from .backend.sampling.sampling_function import sampling_function


class FakeInitialModel:
    """``shared.sd_model`` until the first generation loads the real one (Forge
    ``modules/sd_models.py``): no UNet, no ``forge_objects``."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class Processing(miniwebui.Processing):
    def __init__(self, sd_model, prompts, negatives, steps, parser, cfg_scale):
        super().__init__(sd_model, prompts, negatives, steps, parser)
        self.cfg_scale = cfg_scale

    def get_conds(self):
        c, uc = super().get_conds()
        return c, (None if self.cfg_scale == 1 else uc)  # Forge skips the negative prompt at CFG 1


def denoise(p, steps, cfg, seed, on_step, *, max_chunks=None, record=None):
    from lib_spm.world.model import LATENT

    model = p.sd_model
    patcher = model.forge_objects.unet
    patcher.model_options = {"transformer_options": {}, "max_chunks": max_chunks,
                             **({"record": record} if record is not None else {})}
    sched = model.scheduler
    sched.set_timesteps(steps)
    B = len(p.prompts)
    x = torch.randn((B, *LATENT), generator=torch.Generator().manual_seed(seed))
    c, uc = p.get_conds()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            step = i + 1

            def pick(schedule):
                return next((e for e in schedule if step <= e.end_at_step), schedule[0])

            conds = [pick(cp.schedules).cond for image in c.batch for cp in image]
            n = max(x.shape[0] for x in conds)  # reconstruct_multicond_batch pads with the last token
            cond = torch.stack([torch.cat([x, x[-1:].repeat(n - x.shape[0], 1)]) for x in conds])
            uncond = torch.stack([pick(s).cond for s in uc]) if uc is not None else None
            composition, row = [], 0
            for image in c.batch:
                composition.append([(row + k, cp.weight) for k, cp in enumerate(image)])
                row += len(image)
            denoiser = SimpleNamespace(p=p, step=step,
                                       sampler=SimpleNamespace(sampler_extra_args={"cond": c, "uncond": uc}))
            params = SimpleNamespace(x=x, image_cond=None, sigma=t, sampling_step=i, total_sampling_steps=steps,
                                     text_cond=cond, text_uncond=uncond, denoiser=denoiser)
            on_step(params)
            patcher.model_options["step"] = step
            eps = sampling_function(patcher, params, cfg, composition, t)
            x = sched.step(eps, t, x).prev_sample
    return x


def generate(script_mod, modules, script, args, prompts, negatives=None, *, steps=3, cfg=4.0, seed=0,
             load_model=None, max_chunks=None, record=None):
    """One txt2img run; returns (latents, p). ``load_model``: the engine Forge loads lazily inside
    the request (after ``before_process``). ``record`` receives each UNet call's true chunk labels."""
    shared, script_callbacks, extra_networks = modules.shared, modules.script_callbacks, modules.extra_networks
    from modules import prompt_parser, scripts

    negatives = negatives if negatives is not None else [""] * len(prompts)
    runner = scripts.ScriptRunner([(script, args)])
    p = Processing(shared.sd_model, prompts, negatives, steps, prompt_parser, cfg)
    p.scripts, p.script_args = runner, runner.script_args
    with closing(p):
        runner.before_process(p)
        if load_model is not None:
            shared.sd_model = p.sd_model = load_model
            script_callbacks.fire("model_loaded", load_model)
        sd = p.sd_model
        sd.forge_objects = sd.forge_objects_original.shallow_copy()
        runner.process(p)
        runner.before_process_batch(p, batch_number=0, prompts=p.prompts)
        p.prompts, data = extra_networks.parse_prompts(p.prompts)
        extra_networks.activate(p, data)
        sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
        runner.process_batch(p, batch_number=0, prompts=p.prompts)
        p.setup_conds()
        runner.process_before_every_sampling(p)
        latents = denoise(p, steps, cfg, seed, lambda params: script_callbacks.fire("cfg_denoiser", params),
                          max_chunks=max_chunks, record=record)
        runner.post_sample(p, scripts.PostSampleArgs(latents))
        extra_networks.deactivate(p, data)
        runner.postprocess(p, SimpleNamespace(images=[]))
    return latents, p


def api_generate(script_mod, modules, script, args, *a, **kw):
    """``generate`` behind the API: (status, body), as ``miniwebui.api_generate`` answers."""
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
