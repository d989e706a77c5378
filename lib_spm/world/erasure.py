"""Erasure measured in the shapes world: train SPMs, generate, count with the classifier.

- erase rate: share of target-prompt samples in which the classifier no longer finds the target
  shape;
- preservation: accuracy (shape and colour both right) on non-target prompts with the SPM,
  relative to the unadapted model on the same seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..format.spm_file import SPMFile, load_spm
from ..runtime.gating import GateSettings
from ..training.train_config import TrainConfig
from ..training.trainer import train_spm
from . import data
from .pipeline import WorldPipeline, prompt_labels, world_backend

# What works in this world (BENCHMARKS.md): the published recipe's anchor weight of 1000 drowns
# the erase term here (circle-vs-empty predictions differ by only a few hundredths), and erase
# guidance 5 was needed for >= 95% erasure (guidance 3 / 200 iterations reached 75%).
WORLD_RECIPE = dict(lr=1e-2, warmup=10, la_strength=100.0, anchors=4, max_denoising_steps=20, denoise_cfg=3.0,
                    iterations=250, guidance=5.0, rank=1, alpha=1.0, templates=["{}", "a {}"])
# Per training sampling: "pool" (Trainer docstring) with 3 anchors, which keeps it under 12 UNet
# passes per iteration (2.2 trajectory + 1 target + 3 anchors frozen + 4 live; BENCHMARKS.md).
SAMPLING_OVERRIDES = {"fresh": dict(sampling="fresh"), "pool": dict(sampling="pool", anchors=3)}
# The original trainer's schedule (SPM_METHOD.md), run through the same code for cost comparison.
ORIGINAL_RECIPE = dict(lr=1e-4, warmup=50, la_strength=1000.0, anchors=4, max_denoising_steps=30, denoise_cfg=3.0,
                       iterations=3000, rank=1, alpha=1.0, templates=["{}"])


def target_prompts(shape: str, words: Sequence[str] | None = None) -> list[str]:
    words = words or [shape]
    return [f"a {c} {w}" for w in words for c in data.COLOUR_NAMES]


def other_prompts(exclude: Sequence[str]) -> list[str]:
    return [f"a {c} {s}" for s in data.SHAPES if s not in exclude for c in data.COLOUR_NAMES]


def train_concept(pipe: WorldPipeline, concept: str, out: str | Path, *, seed: int = 0, progress: bool = False,
                  **overrides) -> SPMFile:
    """Train an SPM erasing ``concept``; ``progress`` shows steps and ETA on stderr."""
    from ..progress import Progress

    return train_concept_run(pipe, concept, out, seed=seed, progress=progress, **overrides)[0]


def train_concept_run(pipe: WorldPipeline, concept: str, out: str | Path, *, seed: int = 0, progress: bool = False,
                      **overrides) -> tuple[SPMFile, dict]:
    """:func:`train_concept` plus its cost: UNet passes and seconds per iteration, total seconds."""
    from ..progress import Progress

    cfg = TrainConfig(targets=[concept], name=f"erase_{concept}", seed=seed, **{**WORLD_RECIPE, **overrides})
    bar = Progress(f"training erase_{concept} ({cfg.sampling})", cfg.iterations) if progress else None
    res = train_spm(world_backend(pipe.world), cfg, out, on_step=bar.on_train_step if bar else None)
    if bar:
        bar.close()
    cost = {"sampling": cfg.sampling, "iterations": res.steps,
            "passes_per_iteration": round(sum(h.passes for h in res.history) / len(res.history), 2),
            "seconds_per_iteration": round(res.seconds / res.steps, 3), "train_seconds": round(res.seconds, 1)}
    return load_spm(res.spm_path), cost


@dataclass
class Measurement:
    erase_rate: float
    preservation: float
    target_found: float  # share of target samples showing the target shape
    base_other_accuracy: float
    other_accuracy: float
    per_prompt: dict


def _correct(pipe: WorldPipeline, prompts: Sequence[str], n: int, seed: int, **gen) -> tuple[torch.Tensor, torch.Tensor]:
    expanded = [p for p in prompts for _ in range(n)]
    if not expanded:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)
    shapes, colours = pipe.classify(pipe.generate(expanded, seed=seed, **gen))
    want_s = torch.tensor([prompt_labels(p)[0] for p in expanded])
    want_c = torch.tensor([prompt_labels(p)[1] for p in expanded])
    return shapes == want_s, (shapes == want_s) & (colours == want_c)


def measure(pipe: WorldPipeline, spms: Sequence[tuple[SPMFile, float]], targets: Sequence[str],
            others: Sequence[str], *, gate: GateSettings = GateSettings(), n: int = 16, seed: int = 0,
            base_cache: dict | None = None, **gen) -> Measurement:
    """Erase rate on ``targets`` and preservation on ``others`` with ``spms`` applied."""
    key = (tuple(others), n, seed, tuple(sorted(gen.items())))
    if base_cache is not None and key in base_cache:
        base_ok = base_cache[key]
    else:
        base_ok = _correct(pipe, others, n, seed, **gen)[1]
        if base_cache is not None:
            base_cache[key] = base_ok
    with pipe.applied(spms, gate):
        t_shape, _ = _correct(pipe, targets, n, seed, **gen)
        o_shape, o_ok = _correct(pipe, others, n, seed, **gen)
    per_prompt = {p: {"target_found": t_shape[i * n : (i + 1) * n].float().mean().item()} for i, p in enumerate(targets)}
    for i, p in enumerate(others):
        per_prompt[p] = {"accuracy": o_ok[i * n : (i + 1) * n].float().mean().item(),
                         "base_accuracy": base_ok[i * n : (i + 1) * n].float().mean().item()}
    base_acc = base_ok.float().mean().item() if len(base_ok) else 0.0
    acc = o_ok.float().mean().item() if len(o_ok) else 0.0
    found = t_shape.float().mean().item() if len(t_shape) else 0.0
    return Measurement(1 - found, acc / base_acc if base_acc else 0.0, found, base_acc, acc, per_prompt)


def training_cost(pipe: WorldPipeline, recipe: dict, iterations: int = 5, seed: int = 0) -> dict:
    """UNet sample-passes and seconds per iteration of a recipe, measured on a few iterations."""
    import tempfile

    cfg = TrainConfig(targets=["circle"], seed=seed, **{**recipe, "iterations": iterations})
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        res = train_spm(world_backend(pipe.world), cfg, Path(d) / "cost.safetensors")
        secs = time.time() - t0
    passes = sum(h.passes for h in res.history) / len(res.history)
    return {"passes_per_iteration": round(passes, 1), "seconds_per_iteration": round(secs / iterations, 3),
            "iterations": recipe["iterations"], "est_total_seconds": round(secs / iterations * recipe["iterations"], 1)}


