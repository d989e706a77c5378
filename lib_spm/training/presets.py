"""Named training recipes for real models, as data: the published ones. The shapes world's own
recipe lives with the world (:mod:`lib_spm.world.presets`).

Each number says where it comes from. Sources:
- "original": the paper's code, Con6924/SPM ``configs/snoopy/{config,prompt}.yaml`` (``pikachu``
  is identical) and ``train_spm.py`` (denoising CFG ``guidance_scale=3``). The public code ships
  no separate style or nudity config; its ``demo.ipynb`` defaults, which the model zoo's Van Gogh
  and Nudity SPMs are presented with, are the same numbers, so those presets repeat them.
- "civitai": CivitAI's fork, civitai/SPM ``configs/<name>/{config,prompt}.yaml``. Its README
  (``seeds/civitai_spm_readme.md``) gives only VRAM (SD1.5 20 GB, SDXL 48 GB); every training
  number below is from the config files.
- What this trainer cannot reproduce, in every published recipe: AdamW8bit (we use AdamW),
  ``cosine_with_restarts`` with 3 cycles (we use one cosine after warmup), ``dynamic_resolution``
  (random buckets; we train at one resolution), bf16 training (the adapter trains in fp32).
  ``weight_decay`` is not set in any config (bitsandbytes' AdamW8bit default is 0.01, ours too).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import SPMValueError
from .train_config import TrainConfig


@dataclass(frozen=True)
class Preset:
    description: str  # one line, for the UI
    config: dict  # TrainConfig field overrides
    resolution: int  # training resolution in pixels (a host setting, not a TrainConfig field)
    targets: tuple[str, ...] = ()  # the concept the source config erases (an example to start from)
    surrogates: dict = field(default_factory=dict)


# Con6924/SPM configs/snoopy: rank 1, alpha 1.0 (network); iterations 3000, lr 1e-4,
# lr_warmup_steps 500, max_denoising_steps 30, batch_size 1 (train); prompt.yaml: guidance_scale
# 1.0, la_strength 1000, sampling_batch_size 4 (anchors), resolution 512, no neutral (surrogate "")
# and use_template false (templates: the concept alone); train_spm.py: denoising CFG 3.
_ORIGINAL = dict(rank=1, alpha=1.0, iterations=3000, lr=1e-4, warmup=500, max_denoising_steps=30, batch=1,
                 guidance=1.0, la_strength=1000.0, anchors=4, templates=["{}"], denoise_cfg=3.0)

# civitai/SPM configs/sd15_child_to_adult: rank 2, alpha 1.0; iterations 5000, lr 1e-4, warmup 500,
# max_denoising_steps 20, batch_size 1; prompt.yaml: guidance_scale 1.5, la_strength 100,
# sampling_batch_size 4, resolution 512, neutral "adult"; train_spm.py: denoising CFG 3.
_CIVITAI_SD15 = dict(rank=2, alpha=1.0, iterations=5000, lr=1e-4, warmup=500, max_denoising_steps=20, batch=1,
                     guidance=1.5, la_strength=100.0, anchors=4, templates=["{}"], denoise_cfg=3.0)

# civitai/SPM configs/sdxl_bikini_to_turtleneck: rank 2, alpha 1.0; iterations 5000, lr 2e-4,
# warmup 500, max_denoising_steps 20, batch_size 1; prompt.yaml: guidance_scale 2.0, la_strength
# 400, sampling_batch_size 1, resolution 1024, neutral "turtleneck"; train_spm_xl.py: CFG 3.
# configs/pony_rating_explicit_to_rating_safe has the same numbers, plus clip_skip 2 (a setting
# of the host's text encoder, not of training).
_CIVITAI_SDXL = dict(rank=2, alpha=1.0, iterations=5000, lr=2e-4, warmup=500, max_denoising_steps=20, batch=1,
                     guidance=2.0, la_strength=400.0, anchors=1, templates=["{}"], denoise_cfg=3.0)


PRESETS: dict[str, Preset] = {
    "original: character": Preset(
        "The paper's recipe for objects and characters (Snoopy, Pikachu): rank 1, 3000 steps, "
        "anchor weight 1000. SD1.x at 512 px.", _ORIGINAL, 512),
    "original: style": Preset(
        "The paper's recipe for artistic styles (Van Gogh, Picasso): published with the same numbers "
        "as for characters. SD1.x at 512 px.", _ORIGINAL, 512),
    "original: nudity": Preset(
        "The paper's recipe for explicit content: the same numbers as for characters, target "
        "\"nudity\". SD1.x at 512 px.", _ORIGINAL, 512, ("nudity",)),
    "civitai: SD1.5": Preset(
        "CivitAI's SD1.5 moderation recipe (child -> adult): rank 2, 5000 steps, erase guidance 1.5, "
        "anchor weight 100, 512 px.", _CIVITAI_SD15, 512, ("child",), {"child": "adult"}),
    "civitai: SDXL": Preset(
        "CivitAI's SDXL recipe (bikini -> turtleneck): rank 2, 5000 steps, lr 2e-4, erase guidance 2, "
        "anchor weight 400, one anchor, 1024 px.", _CIVITAI_SDXL, 1024, ("bikini",), {"bikini": "turtleneck"}),
    "civitai: Pony": Preset(
        "CivitAI's Pony Diffusion V6 XL recipe (rating_explicit -> rating_safe): the SDXL numbers; "
        "CivitAI trained with CLIP skip 2.", _CIVITAI_SDXL, 1024, ("rating_explicit",),
        {"rating_explicit": "rating_safe"}),
}


def preset(name: str, table: Mapping[str, Preset] = PRESETS) -> Preset:
    if name not in table:
        raise SPMValueError(f"unknown preset {name!r}; presets: {', '.join(table)}")
    return table[name]


def apply_preset(name: str, /, table: Mapping[str, Preset] = PRESETS, **overrides) -> TrainConfig:
    """A TrainConfig from a preset of ``table``, with ``overrides`` (any TrainConfig field) on top.

    ``name`` is positional-only, so ``name=`` sets the SPM's name. The preset's example concept
    fills ``targets``/``surrogates`` only when none are given.
    """
    p = preset(name, table)
    fields = copy.deepcopy(p.config)  # the tables stay as written
    if "targets" not in overrides and p.targets:
        fields.update(targets=list(p.targets), surrogates=dict(p.surrogates))
    fields.update(overrides)
    unknown = set(fields) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise SPMValueError(f"not training settings: {', '.join(sorted(unknown))}")
    fields.setdefault("targets", [])
    return TrainConfig(**fields)
