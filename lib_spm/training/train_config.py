"""What a training run is asked to do, and the checkpoint file that remembers it.

Kept apart from the training loop (:mod:`lib_spm.training.trainer`) so that a UI can check a request,
list checkpoints and read their settings without importing the loop. :class:`TrainConfig`
checks its own fields, once: hosts convert what the user typed into numbers and report the
config's :class:`~lib_spm.errors.SPMValueError`.

A checkpoint is a safetensors file (no pickle) next to the SPM it belongs to; its header holds
the format tag, the step reached and the config as JSON, so :func:`read_checkpoint` needs no
tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SPMValueError
from ..format.safetensors_io import read_header
from ..values import number, whole

CHECKPOINT_FORMAT = "sd-webui-spm-train-checkpoint/1"
# How x_t is made: "fresh" denoises new noise with the adapter on every iteration; "pool" draws
# from CFG trajectories shared by many iterations (Trainer docstring, BENCHMARKS.md)
SAMPLINGS = ("fresh", "pool")

# How errors name the numeric fields: the Train panel's labels where it shows the field.
LABELS = {
    "guidance": "Erase guidance", "iterations": "Iterations", "lr": "lr", "warmup": "Warmup",
    "weight_decay": "Weight decay", "rank": "Rank", "alpha": "alpha", "la_strength": "Latent Anchoring strength",
    "anchors": "Anchor count", "max_denoising_steps": "Max denoising steps", "denoise_cfg": "Denoising CFG",
    "batch": "Batch", "seed": "Seed",
}
# Whole-number fields and their least value.
_WHOLE = {"iterations": 1, "rank": 1, "max_denoising_steps": 2, "batch": 1, "anchors": 0, "seed": 0, "warmup": 0}
# Real-valued fields and their range (the two positive ones are checked apart: 0 is refused).
_REAL = {"guidance": (0.0, math.inf), "la_strength": (0.0, math.inf), "weight_decay": (0.0, math.inf),
         "denoise_cfg": (-math.inf, math.inf)}
_POSITIVE = ("lr", "alpha")


@dataclass
class TrainConfig:
    targets: list[str]
    surrogates: dict[str, str] = field(default_factory=dict)  # concept -> surrogate; default ""
    templates: list[str] = field(default_factory=lambda: ["{}"])
    guidance: float = 1.0  # erase guidance g
    iterations: int = 3000
    lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.01
    rank: int = 1
    alpha: float = 1.0
    la_strength: float = 1000.0
    anchors: int = 4
    max_denoising_steps: int = 30
    denoise_cfg: float = 3.0
    batch: int = 1
    sampling: str = "fresh"
    seed: int = 0
    name: str = "spm"
    description: str = ""
    arch: str | None = None

    def __post_init__(self):
        """The one check of a run's settings; numbers are stored as int/float after it."""
        if not self.targets or not all(t.strip() for t in self.targets):
            raise SPMValueError("give at least one non-empty target concept")
        if any("{}" not in t for t in self.templates):
            raise SPMValueError("every prompt template needs a {} for the concept")
        for name, lo in _WHOLE.items():
            setattr(self, name, whole(getattr(self, name), LABELS[name], lo))
        for name, (lo, hi) in _REAL.items():
            setattr(self, name, number(getattr(self, name), LABELS[name], lo, hi))
        for name in _POSITIVE:
            value = number(getattr(self, name), LABELS[name], -math.inf, math.inf)
            if value <= 0:
                raise SPMValueError(f"{LABELS[name]} must be a positive number, not {getattr(self, name)!r}")
            setattr(self, name, value)
        if self.sampling not in SAMPLINGS:
            raise SPMValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {self.sampling!r}")

    def recipe(self) -> dict:
        """The settings an SPM's metadata records as its recipe (what it erases is recorded apart)."""
        d = asdict(self)
        for k in ("targets", "surrogates", "name", "description", "arch"):
            d.pop(k)
        return d


# -- checkpoints -----------------------------------------------------------------------------------

def checkpoint_path(out_path: str | Path) -> Path:
    """Where :func:`~lib_spm.training.trainer.train_spm` keeps the checkpoint of the SPM it writes to ``out_path``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".ckpt.safetensors")


def checkpoint_metadata(cfg: TrainConfig, step: int) -> dict[str, str]:
    """The header of a checkpoint at ``step`` of a run of ``cfg``."""
    return {"format": CHECKPOINT_FORMAT, "step": str(step), "config": json.dumps(asdict(cfg))}


def checkpoint_info(path: str | Path, md: dict[str, str]) -> tuple[TrainConfig, int]:
    """The settings and step a checkpoint's header ``md`` records; refuses other files."""
    if md.get("format") != CHECKPOINT_FORMAT:
        raise SPMValueError(f"{Path(path).name} is not an SPM training checkpoint")
    try:
        fields, step = json.loads(md["config"]), int(md["step"])
    except (KeyError, ValueError) as e:
        raise SPMValueError(f"{Path(path).name}: unreadable training checkpoint header ({e})") from None
    if not isinstance(fields, dict):
        raise SPMValueError(f"{Path(path).name}: unreadable training checkpoint header (config is not an object)")
    try:
        return TrainConfig(**fields), step
    except TypeError as e:  # a field this version does not know, or one missing
        raise SPMValueError(f"{Path(path).name}: training checkpoint settings this version cannot read ({e})") from None


def read_checkpoint(path: str | Path) -> tuple[TrainConfig, int]:
    """The settings and the step of a training checkpoint, from its header alone."""
    _, md, _ = read_header(path)
    return checkpoint_info(path, md)


def resume_differences(cfg: TrainConfig, saved: TrainConfig) -> list[str]:
    """Settings that differ from a checkpoint's (only ``iterations`` may change on resume)."""
    mine, theirs = asdict(cfg), asdict(saved)
    return [k for k in mine if k != "iterations" and mine[k] != theirs[k]]
