"""``backend.operations.ForgeOperations.Linear``: an ``nn.Module`` (not ``nn.Linear``) holding
``in_features``/``out_features``, a ``weight`` (stored in any dtype, fp8 included) and casting
it to the input's dtype per call when ``parameters_manual_cast`` is on."""

from __future__ import annotations

import torch


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.weight = None
            self.scale_weight = None
            self.bias = None
            self.parameters_manual_cast = False

        def forward(self, x):
            weight, bias = self.weight, self.bias
            if self.parameters_manual_cast:
                weight = weight.to(device=x.device, dtype=x.dtype)
                bias = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
            return torch.nn.functional.linear(x, weight, bias)


def forge_linear(layer: torch.nn.Linear, dtype: torch.dtype | None = None, manual_cast: bool = False):
    """A ForgeOperations.Linear with the weights of an ``nn.Linear`` (as Forge's loader fills it)."""
    out = ForgeOperations.Linear(layer.in_features, layer.out_features)
    out.weight = torch.nn.Parameter(layer.weight.detach().to(dtype or layer.weight.dtype), requires_grad=False)
    if layer.bias is not None:
        out.bias = torch.nn.Parameter(layer.bias.detach().to(dtype or layer.bias.dtype), requires_grad=False)
    out.parameters_manual_cast = manual_cast
    return out


def use_forge_linears(model: torch.nn.Module, dtype: torch.dtype | None = None, manual_cast: bool = False):
    """Swap every ``nn.Linear`` of a model for a ForgeOperations.Linear (in place); returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, forge_linear(child, dtype, manual_cast))
    return model
