"""Does an SPM fit a UNet, and where: each file key's module path, or why it has none.

Asked by the runtime before it hooks anything, by the built-in Lora check against a reference
UNet and by hosts choosing which of several SPMs to attach. Holds no state, hooks nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from ..errors import ArchitectureMismatch, SPMError, SPMKeyError, UnresolvedKeysError
from ..format import archs
from ..format.names import LayerName, layer_kind, layer_names, resolve
from ..format.spm_file import LayerWeights, SPMFile


@dataclass(frozen=True)
class LayerPlace:
    """One file key: the module it names (None: none) and why its factors do not fit there."""

    key: str
    path: str | None
    problem: str | None = None

    @property
    def fits(self) -> bool:
        return self.path is not None and self.problem is None


@dataclass(frozen=True)
class Placement:
    """Where an SPM's layers go in one UNet, in file order. ``error``: the first reason it cannot
    be applied, typed as the runtime raises it; None when every layer fits."""

    name: str
    layers: tuple[LayerPlace, ...]
    error: SPMError | None = None

    @property
    def fits(self) -> bool:
        return self.error is None

    @property
    def paths(self) -> dict[str, str]:
        """File key -> module path, for every key that names a module."""
        return {p.key: p.path for p in self.layers if p.path is not None}

    def check(self) -> "Placement":
        """Raise the reason it does not fit; return self when it fits."""
        if self.error is not None:
            raise self.error
        return self


def placement(
    spm: SPMFile | Mapping[str, LayerWeights], unet: nn.Module, *, names: dict[str, LayerName] | None = None,
) -> Placement:
    """Does ``spm`` (a file, or its layers by key) fit ``unet``, and where.

    Judged in the order the runtime refuses: the file's architecture label against the UNet's
    text width (a model of no known architecture is judged by shapes alone), every key naming
    a module (:class:`UnresolvedKeysError`; two keys for one module: :class:`SPMKeyError`), then
    each layer's shapes (:class:`ArchitectureMismatch`). ``names`` (``layer_names(unet)``) saves
    the model walk when placing several files.
    """
    is_file = isinstance(spm, SPMFile)
    layers = spm.layers if is_file else dict(spm)
    name = spm.name if is_file else "SPM"
    label = _label_mismatch(spm, unet) if is_file else None
    try:
        paths, unresolved = _resolve(list(layers), unet, layer_names(unet) if names is None else names)
    except SPMKeyError as e:
        return Placement(name, (), label or e)
    modules = dict(unet.named_modules())  # get_submodule is slow on diffusers models (their __getattr__)
    places = tuple(LayerPlace(key, paths.get(key), None if key not in paths else
                              misfit(modules[paths[key]], w)) for key, w in layers.items())
    mismatch = next((ArchitectureMismatch(f"{name} @ {p.path}: {p.problem}") for p in places if p.problem), None)
    return Placement(name, places, label or unresolved or mismatch)


def fit(module: nn.Module, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """An SPM layer's factors shaped for the module they adapt (2-D for a Linear, 4-D for a
    Conv2d) and the convolution's settings (None for a Linear); ArchitectureMismatch, saying
    why, where they do not fit."""
    problem = misfit(module, w)
    if problem is not None:
        raise ArchitectureMismatch(problem)
    down, up = w.down, w.up
    if layer_kind(module) == "linear":
        return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1), None
    if down.dim() == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return down, up, dict(stride=module.stride, padding=module.padding, dilation=module.dilation)


def misfit(module: nn.Module, w: LayerWeights) -> str | None:
    """Why an SPM layer's factors do not fit ``module``; None when they do. Reads shapes only."""
    down, up = tuple(w.down.shape), tuple(w.up.shape)
    kind = layer_kind(module)
    if kind == "linear":
        if len(down) == 4 and down[2:] != (1, 1):
            return f"a {down[2:]} convolution factor on a Linear layer"
        n_in = math.prod(down[1:])
        if (n_in, up[0]) != (module.in_features, module.out_features):
            return f"SPM layer is {n_in}->{up[0]}, the model's is {module.in_features}->{module.out_features}"
        return None
    if kind == "conv":
        if module.groups != 1 or module.padding_mode != "zeros":
            return "grouped or non-zero-padded convolutions cannot be adapted"
        kernel = tuple(module.kernel_size)
        if len(down) == 2:
            if kernel != (1, 1):
                return f"a linear factor on a {module.kernel_size} convolution"
            down, up = (*down, 1, 1), (*up, 1, 1)
        if (down[1], up[0]) != (module.in_channels, module.out_channels) or down[2:] != kernel:
            return (f"SPM layer {down} / {up} does not fit Conv2d "
                    f"{module.in_channels}->{module.out_channels} kernel {kernel}")
        return None
    return f"cannot adapt a {type(module).__name__}"


def _label_mismatch(spm: SPMFile, unet: nn.Module) -> ArchitectureMismatch | None:
    model_arch = archs.unet_arch(unet)
    if spm.arch and model_arch and spm.arch != model_arch:
        return ArchitectureMismatch(f"{spm.name} is an {spm.arch} SPM; this UNet is {model_arch}")
    return None


def _resolve(keys: list[str], unet: nn.Module, names) -> tuple[dict[str, str], UnresolvedKeysError | None]:
    """Paths of the keys that name a module, and the error listing those that name none."""
    try:
        return resolve(keys, unet, names), None
    except UnresolvedKeysError as e:
        missing = set(e.keys)
        return resolve([k for k in keys if k not in missing], unet, names), e
