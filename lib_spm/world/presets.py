"""The Train panel's presets where the shapes world may be the model: the real-model presets
(:mod:`lib_spm.training.presets`) and the recipe measured in this world (:data:`~lib_spm.world.erasure.WORLD_RECIPE`)."""

from __future__ import annotations

from ..training import presets
from ..training.presets import Preset
from ..training.train_config import TrainConfig
from .erasure import WORLD_RECIPE

# WORLD_RECIPE is measured in BENCHMARKS.md; the world renders 32 px.
WORLD_PRESET = Preset(
    "What erases a shape in the shipped shapes world in about a minute on a CPU: lr 1e-2, "
    "erase guidance 5, anchor weight 100, 250 steps.", WORLD_RECIPE, 32, ("circle",))

PRESETS: dict[str, Preset] = {**presets.PRESETS, "shapes world quick": WORLD_PRESET}


def apply_preset(name: str, /, **overrides) -> TrainConfig:
    """:func:`lib_spm.training.presets.apply_preset` over :data:`PRESETS`."""
    return presets.apply_preset(name, PRESETS, **overrides)
