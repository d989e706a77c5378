"""``python -m lib_spm train``: an SPM trained on the shipped shapes world from a terminal, with
steps and ETA on stderr and a JSON summary on stdout. Real models train in the WebUI's Train tab
or through the Python API (README, "Training"); this command needs no download.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SPMValueError


def surrogate_map(targets: list[str], surrogates: list[str]) -> dict[str, str]:
    """None, one for every target, or one per target in order (like the Train panel's box)."""
    if len(surrogates) == 1:
        surrogates = surrogates * len(targets)
    if surrogates and len(surrogates) != len(targets):
        raise SPMValueError(f"give one --surrogate for all targets, or one per target: {len(targets)} targets, "
                            f"{len(surrogates)} surrogates")
    return {t: s for t, s in zip(targets, surrogates) if s}


def train_world_spm(out: str | Path, targets: list[str], surrogates: list[str], *, sampling: str = "fresh",
                    iterations: int | None = None, anchors: int | None = None, seed: int = 0,
                    checkpoint_every: int = 0, resume: bool = False) -> dict:
    """Train with the world's preset and the measured recipe of ``sampling`` (``SAMPLING_OVERRIDES``:
    pool uses 3 anchors); ``iterations`` and ``anchors`` override them. Returns the summary."""
    from ..progress import Progress
    from ..training.cost import sample_passes_per_iteration
    from ..training.train_config import SAMPLINGS, checkpoint_path
    from ..training.trainer import train_spm
    from ..world.erasure import SAMPLING_OVERRIDES
    from ..world.model import load_world
    from ..world.pipeline import world_backend
    from ..world.presets import apply_preset

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SPMValueError(f"the SPM is written as .safetensors, not {out.name!r}")
    if sampling not in SAMPLINGS:  # before SAMPLING_OVERRIDES is indexed; TrainConfig says the same
        raise SPMValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
    overrides = {**SAMPLING_OVERRIDES[sampling], "seed": seed}
    overrides.update({k: v for k, v in (("iterations", iterations), ("anchors", anchors)) if v is not None})
    cfg = apply_preset("shapes world quick", targets=list(targets), surrogates=surrogate_map(targets, surrogates),
                       name=out.stem, **overrides)
    ckpt = checkpoint_path(out)
    if resume and not ckpt.is_file():
        raise SPMValueError(f"no checkpoint {ckpt.name} next to {out.name} to resume")
    if not resume and out.exists():
        raise SPMValueError(f"{out} exists; choose another path (or --resume its run)")
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = Progress(f"train {cfg.name} ({cfg.sampling})", cfg.iterations)
    try:
        res = train_spm(world_backend(load_world()), cfg, out, on_step=bar.on_train_step,
                        checkpoint_every=checkpoint_every, resume_from=ckpt if resume else None)
    except BaseException:
        if bar.done:  # a run that started says where it stopped; a refused one leaves just its error
            bar.close()
        raise
    bar.close()
    done = len(res.history)
    return {"spm": str(res.spm_path), "steps": res.steps, "sampling": cfg.sampling, "anchors": cfg.anchors,
            "passes_per_iteration": round(sum(h.passes for h in res.history) / done, 2) if done else None,
            "estimated_passes_per_iteration": round(sample_passes_per_iteration(cfg), 2),
            "seconds": round(res.seconds, 1), "checkpoint": str(res.checkpoint_path) if res.checkpoint_path else None}
