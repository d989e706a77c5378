"""The noise schedule arithmetic the trainer and its previews share: DDIM's "leading" timesteps,
one deterministic DDIM step, and v-prediction turned into the noise prediction.

``alphas_cumprod`` is the model's [T] cumulative product of ``1 - beta``; ``a`` below is its
value at a timestep (a scalar or a tensor that broadcasts over the batch).
"""

from __future__ import annotations

import torch


def leading_timesteps(steps: int, train_steps: int) -> torch.Tensor:
    """``steps`` timesteps spaced ``train_steps // steps`` apart, highest first, as diffusers'
    DDIM spaces them with ``timestep_spacing="leading"`` and ``steps_offset=1`` (SD's config);
    clamped into [0, train_steps - 1]."""
    if steps < 1 or train_steps < 1:
        raise ValueError(f"need at least one step of at least one, not {steps} of {train_steps}")
    return (torch.arange(steps) * (train_steps // steps) + 1).flip(0).clamp(max=train_steps - 1)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """DDIM with eta 0: from ``x`` at cumulative alpha ``a`` to ``a_prev`` along ``eps``."""
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def eps_from_v(v: torch.Tensor, x: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise prediction a v-prediction model's output ``v`` at ``(x_t, t)`` stands for:
    ``eps = sqrt(a) v + sqrt(1 - a) x_t`` with ``a = alphas_cumprod[t]`` per batch row."""
    a = alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))
    return a.sqrt() * v + (1 - a).sqrt() * x
