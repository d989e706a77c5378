"""Write SPM files exactly as the original trainer (Con6924/SPM) does, for tests and demos.

The original saves ``SPMNetwork.state_dict()``: for every Linear/Conv2d inside a
``Transformer2DModel`` of a diffusers UNet, ``lora_unet_<path>.lora_down.weight`` (Conv2d: with
the layer's kernel), ``.lora_up.weight`` (Conv2d: 1x1) and an fp32 scalar ``.alpha`` buffer,
all cast to the save dtype, with metadata ``{"prompts", "rank", "alpha"}`` and nothing else.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .archs import unet_layout
from .names import spm_layer_paths


def zoo_state_dict(
    unet: nn.Module, *, rank: int = 1, alpha: float = 1.0, seed: int = 0, std: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random (seeded) weights in the original layout for a diffusers UNet."""
    if unet_layout(unet) != "diffusers":
        raise ValueError("the original trainer only ever wrote files for diffusers UNets")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in spm_layer_paths(unet):
        m = unet.get_submodule(path)
        stem = "lora_unet_" + path.replace(".", "_")
        if isinstance(m, nn.Conv2d):
            r = min(rank, m.in_channels, m.out_channels)
            down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, r, 1, 1, generator=g)
        else:
            r = rank
            down = torch.randn(r, m.in_features, generator=g)
            up = torch.randn(m.out_features, r, generator=g)
        sd[f"{stem}.lora_down.weight"] = (down * std).to(dtype)
        sd[f"{stem}.lora_up.weight"] = (up * std).to(dtype)
        sd[f"{stem}.alpha"] = torch.tensor(float(alpha)).to(dtype)
    return sd


def write_zoo_file(
    path: str | os.PathLike, unet: nn.Module, prompts: list[str], *, rank: int = 1, alpha: float = 1.0,
    seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32,
) -> None:
    sd = zoo_state_dict(unet, rank=rank, alpha=alpha, seed=seed, std=std, dtype=dtype)
    save_file(sd, str(path), {"prompts": ",".join(prompts), "rank": str(rank), "alpha": str(float(alpha))})
