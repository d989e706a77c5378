"""Helpers shared by the runtime tests: in-memory SPMs for any UNet, the merged-weights oracle and
the published code's arithmetic to compare against."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lib_spm.format.metadata import Slice, SPMMetadata
from lib_spm.format.names import layer_names, resolve, spm_layer_paths
from lib_spm.format.spm_file import LayerWeights, SPMFile


def random_spm(
    unet: nn.Module, concepts: list[str], *, rank: int = 1, alpha: float = 1.0, seed: int = 0,
    std: float = 0.2, dialect: str = "key", name: str | None = None, slices: list[Slice] | None = None,
    every: int = 1,
) -> SPMFile:
    """An SPM over the UNet's transformer layers (every ``every``-th), keys in the chosen dialect."""
    g = torch.Generator().manual_seed(seed)
    names = layer_names(unet)
    layers = {}
    for path in spm_layer_paths(unet)[::every]:
        m = unet.get_submodule(path)
        if isinstance(m, nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * std
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * std
        else:
            down = torch.randn(rank, m.in_features, generator=g) * std
            up = torch.randn(m.out_features, rank, generator=g) * std
        layers[getattr(names[path], dialect)] = LayerWeights(down, up, alpha)
    md = SPMMetadata(targets=list(concepts), rank=rank, alpha=alpha, name=name or "-".join(concepts), slices=slices)
    return SPMFile(layers, md)


def merged(unet: nn.Module, terms: list[tuple[SPMFile, float]]) -> nn.Module:
    """A copy of the UNet with ``sum coef * delta`` added to its weights (fp32 math)."""
    model = copy.deepcopy(unet)
    with torch.no_grad():
        for spm, coef in terms:
            for key, path in resolve(list(spm.layers), model).items():
                w = model.get_submodule(path).weight
                w += (coef * spm.layers[key].delta()).reshape(w.shape).to(w.dtype)
    return model


def published(unet: nn.Module, terms: list[tuple[SPMFile, float]]) -> nn.Module:
    """A copy of the UNet with the published code's arithmetic: it scales both factors of every
    SPM by its coefficient and sums them before applying, ``W + scale (sum_i c_i U_i)(sum_j c_j D_j)``
    (gamma^2 for one SPM, cross terms for several; equal ranks, the first SPM's alpha/rank).
    The reference the runtime is compared against; the runtime itself never computes it."""
    model = copy.deepcopy(unet)
    first = terms[0][0]
    with torch.no_grad():
        for key, path in resolve(list(first.layers), model).items():
            ups = [c * spm.layers[key].up.float().reshape(spm.layers[key].up.shape[0], -1) for spm, c in terms]
            downs = [c * spm.layers[key].down.float().reshape(spm.layers[key].rank, -1) for spm, c in terms]
            w = model.get_submodule(path).weight
            w += (first.layers[key].scale * (sum(ups) @ sum(downs))).reshape(w.shape).to(w.dtype)
    return model


def merged_columns(unet: nn.Module, spm: SPMFile, column_coefs: torch.Tensor) -> nn.Module:
    """Merge with a separate coefficient per rank column (slices of one pack gated differently)."""
    model = copy.deepcopy(unet)
    with torch.no_grad():
        for key, path in resolve(list(spm.layers), model).items():
            lw = spm.layers[key]
            up = lw.up.float().reshape(lw.up.shape[0], -1) * column_coefs * lw.scale
            d = (up @ lw.down.float().reshape(lw.rank, -1))
            w = model.get_submodule(path).weight
            w += d.reshape(w.shape).to(w.dtype)
    return model


def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
