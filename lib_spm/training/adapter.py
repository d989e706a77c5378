"""A trainable SPM on a UNet: low-rank factors as parameters, applied by forward hooks.

The training counterpart of :class:`~lib_spm.runtime.session.Session`: same layer math
(:func:`~lib_spm.runtime.functional.lowrank_bypass`), same hook discipline (nothing stamped on modules,
``detach`` leaves no trace), plus an ``enabled`` switch so frozen predictions come from the
same UNet with the adapter off — the base model is never copied.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn

from ..format.metadata import SPMMetadata
from ..format.names import layer_kind, layer_names, spm_layer_paths
from ..format.spm_file import LayerWeights, SPMFile
from ..runtime import functional


class TrainableAdapter(nn.Module):
    def __init__(self, unet: nn.Module, *, rank: int = 1, alpha: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self._unet = [unet]  # a list keeps the UNet out of this module's parameters
        names = layer_names(unet)
        self.paths = spm_layer_paths(unet)
        self.keys = [names[p].key for p in self.paths]
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self._conv: list[dict | None] = []
        for path in self.paths:
            m = unet.get_submodule(path)
            dev = m.weight.device
            if layer_kind(m) == "conv":
                down = torch.empty(rank, m.in_channels, *m.kernel_size)
                up = torch.zeros(m.out_channels, rank, 1, 1)
                self._conv.append(dict(stride=m.stride, padding=m.padding, dilation=m.dilation))
            else:
                down = torch.empty(rank, m.in_features)
                up = torch.zeros(m.out_features, rank)
                self._conv.append(None)
            bound = 1 / math.sqrt(down[0].numel())  # kaiming_uniform(a=sqrt(5)), as LoRA inits
            down.uniform_(-bound, bound, generator=generator)
            self.down.append(nn.Parameter(down.to(dev)))
            self.up.append(nn.Parameter(up.to(dev)))  # up starts at 0: the adapter starts as identity
        self.enabled = True
        self._handles: list = []

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    def attach(self) -> "TrainableAdapter":
        if not self._handles:
            for i, path in enumerate(self.paths):
                self._handles.append(self.unet.get_submodule(path).register_forward_hook(partial(self._hook, i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def disabled(self):
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def _hook(self, i: int, module, args, output):
        if not self.enabled:
            return None
        x = args[0]
        down, up = self.down[i].to(output.dtype), self.up[i].to(output.dtype)
        coef = torch.full((x.shape[0], self.rank), self.scale, dtype=output.dtype, device=output.device)
        return output + functional.lowrank_bypass(x.to(output.dtype), down, up, coef, self._conv[i])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, d, u in zip(self.keys, self.down, self.up):
            out[f"{key}.lora_down.weight"] = d.detach().float().cpu()
            out[f"{key}.lora_up.weight"] = u.detach().float().cpu()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, d, u in zip(self.keys, self.down, self.up):
                d.copy_(tensors[f"{key}.lora_down.weight"])
                u.copy_(tensors[f"{key}.lora_up.weight"])

    def to_spm(self, metadata: SPMMetadata) -> SPMFile:
        layers = {k: LayerWeights(d.detach().float().cpu().clone(), u.detach().float().cpu().clone(), self.alpha)
                  for k, d, u in zip(self.keys, self.down, self.up)}
        metadata.rank, metadata.alpha = self.rank, self.alpha
        return SPMFile(layers, metadata)
