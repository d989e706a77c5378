"""What a training run costs in UNet sample-passes, before it runs: the trainer's own count
(:attr:`~lib_spm.training.trainer.TrainStatus.passes`), in expectation.

Kept next to the loop it mirrors; ``tests/test_ui_train.py`` runs tiny trainings of both samplings
and checks these figures against the passes the trainer reports, so the two cannot drift apart.
"""

from __future__ import annotations

from .train_config import TrainConfig
from .trainer import POOL_TRAJECTORIES


def _anchor_count(cfg: TrainConfig) -> int:
    return cfg.anchors if cfg.la_strength > 0 else 0


def _named_share(cfg: TrainConfig) -> float:
    """Share of the drawn prompts whose surrogate is not "" (prompts are uniform over concept x
    template, so it is the share of targets with a surrogate): their eps_n needs a pool pass."""
    return sum(1 for t in cfg.targets if cfg.surrogates.get(t)) / len(cfg.targets)


def pool_refill_passes(cfg: TrainConfig) -> int:
    """Passes a whole "pool" run spends making pools, refill by refill as ``Trainer._pool_draw``
    sizes them: ``POOL_TRAJECTORIES`` trajectories of S-1 tuples each at 2*S passes, the last one
    no bigger than the run still needs."""
    s, need = cfg.max_denoising_steps, cfg.iterations * cfg.batch
    drawn = total = 0
    while drawn < need:
        left = (cfg.iterations - drawn // cfg.batch) * cfg.batch  # the trainer counts iterations left
        trajectories = max(1, min(POOL_TRAJECTORIES, -(-left // (s - 1))))
        total += 2 * trajectories * s
        drawn += trajectories * (s - 1)
    return total


def sample_passes_per_iteration(cfg: TrainConfig) -> float:
    """Mean UNet sample-passes per iteration of a whole run of ``cfg``, counted as the trainer
    counts them (forward rows only: denoising, frozen and the adapter's forward pass).

    fresh: CFG denoising to a step uniform in [1, S-1] (2*B*S/2 on average), 2+k frozen rows
    and 1+k adapter rows per latent. pool: the run's refills spread over its iterations, one
    frozen target row, one more where the surrogate is not "", k anchors, and 1+k adapter rows.
    """
    b, k = cfg.batch, _anchor_count(cfg)
    live = (1 + k) * b
    if cfg.sampling == "fresh":
        return b * cfg.max_denoising_steps + (2 + k) * b + live
    frozen = b + _named_share(cfg) * b + k * b
    return pool_refill_passes(cfg) / cfg.iterations + frozen + live


def adapter_passes_per_iteration(cfg: TrainConfig) -> int:
    """The adapter's forward rows per iteration (the ones a backward pass follows)."""
    return (1 + _anchor_count(cfg)) * cfg.batch
