"""The runtime: one :class:`Session` owns every hook and every piece of state of applied SPMs.

Per UNet call, a forward pre-hook on the UNet reads the conditioning of every batch row, scores
it against each SPM's target concepts once, and turns the scores into one coefficient per rank
column and row. Each adapted layer has a forward hook that adds

    sum_i  g_i[row] * s_i * (alpha_i / rank_i) * U_i D_i x

for all SPMs on that layer in one stacked low-rank product. Weights are never edited and no
attribute is set on any module, so :meth:`Session.detach` restores bit-identical outputs.
Which layers an SPM adapts is :func:`~lib_spm.runtime.placement.placement`'s answer; the gates ``g``
come from a :class:`~lib_spm.runtime.gating.ConceptGate`.

Where rows come from (the WebUI's cond..., uncond order, diffusers' uncond, cond order, the
text of each row's prompt) is the host's business: it passes ``conditioning_of`` and
``row_tokens`` callables; the core never assumes a layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..errors import SPMRuntimeError, SPMValueError
from ..format.names import factor_dtype, layer_names
from ..format.spm_file import LayerWeights, SPMFile
from . import functional
from .gating import ConceptEncoder, ConceptGate, GateSettings, RowTokens
from .placement import fit, placement


def default_conditioning(args: tuple, kwargs: dict) -> torch.Tensor:
    """The text conditioning of a UNet call: diffusers ``encoder_hidden_states``, LDM ``context``."""
    for name in ("encoder_hidden_states", "context"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    if len(args) >= 3 and isinstance(args[2], torch.Tensor):
        return args[2]
    raise SPMRuntimeError("cannot find the text conditioning of this UNet call")


@dataclass
class _Layer:
    module: nn.Module
    group: tuple[int, ...]  # indices of the SPMs on this layer
    cols: torch.Tensor  # their global rank columns, in stacking order
    down: torch.Tensor  # stacked [R, in] / [R, in, kh, kw]
    up: torch.Tensor  # stacked [out, R] / [out, R, 1, 1], alpha/rank folded in per column
    conv: dict | None
    cache: dict = field(default_factory=dict)  # (device, dtype) -> (down, up); "cols" -> cols on the device
    hook_id: int | None = None  # the id of this layer's forward hook while attached

    def weights(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        w = self.cache.get(key)
        if w is None:
            w = self.cache[key] = (self.down.to(*key), self.up.to(*key))
        return w


@dataclass
class _Applied:
    spm: SPMFile
    strength: float
    columns: slice  # global rank columns of this SPM
    slice_ids: list[int]  # global slice index of each of its rank columns


class Session:
    """Apply any number of SPMs to one UNet. Use as a context manager or attach()/detach()."""

    def __init__(
        self,
        unet: nn.Module,
        spms: Sequence[tuple[SPMFile, float]],
        *,
        encoder: ConceptEncoder | None = None,
        gate: GateSettings = GateSettings(),
        conditioning_of: Callable[[tuple, dict], torch.Tensor] = default_conditioning,
        row_tokens: Callable[[int], RowTokens | None] | None = None,
    ):
        self.unet = unet
        self._conditioning_of = conditioning_of
        self._row_tokens = row_tokens
        self._applied: list[_Applied] = []
        slice_concepts: list[tuple[str, ...]] = []
        self._slice_labels: list[str] = []
        col = 0
        for spm, strength in spms:
            _check_strength(strength)
            ids = []
            for s in spm.slices():
                slice_concepts.append(tuple(s.concepts))
                self._slice_labels.append(f"{spm.name}:{s.name}" if spm.metadata.slices else spm.name)
                ids += [len(slice_concepts) - 1] * s.rank
            self._applied.append(_Applied(spm, float(strength), slice(col, col + spm.rank), ids))
            col += spm.rank
        self._gate = ConceptGate(gate, slice_concepts, encoder)
        self._col_slice = torch.tensor([i for a in self._applied for i in a.slice_ids], dtype=torch.long)
        self._layers: dict[str, _Layer] = {}
        self._handles: list = []
        self._token: object | None = None  # identifies the hooks of the current attach
        self._coef: torch.Tensor | None = None  # [B, R] of the current UNet call
        self._coef_cache: dict = {}  # SPM group -> its [B, R_group] coefficients (None: all off) this call
        self.last_gates: torch.Tensor | None = None  # [B, slices] of the last UNet call, on its device

    # -- public ---------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def gate(self) -> GateSettings:
        return self._gate.settings

    @property
    def slice_labels(self) -> list[str]:
        return list(self._slice_labels)

    @property
    def layer_paths(self) -> list[str]:
        """Module paths of the adapted layers (empty while detached)."""
        return list(self._layers)

    def set_strength(self, index: int, strength: float) -> None:
        _check_strength(strength)
        self._applied[index].strength = float(strength)

    def attach(self) -> "Session":
        """Validate everything, then register hooks. On any error, a KeyboardInterrupt included,
        nothing stays attached: each handle is recorded the moment it exists and the failure
        removes every recorded one."""
        if self.attached:
            raise SPMRuntimeError("session is already attached")
        layers = self._build_layers()
        self._gate.prepare()
        # hooks act only while their token is the session's: one registered in the instant before
        # its handle could be recorded (an interrupt there) can leak, but never acts
        token = self._token = object()
        self._layers = layers
        try:
            self._handles.append(self.unet.register_forward_pre_hook(
                partial(self._on_unet_call, token), with_kwargs=True))
            for layer in layers.values():
                # first of the layer's forward hooks: the output it sees is one nobody else has seen
                handle = layer.module.register_forward_hook(partial(self._on_layer, token, layer), prepend=True)
                self._handles.append(handle)
                layer.hook_id = handle.id
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        self._token = None
        while self._handles:  # pop one by one: an interrupt here leaves only unremoved handles recorded
            self._handles[-1].remove()
            self._handles.pop()
        self._layers = {}
        self._coef = None
        self._coef_cache = {}

    def __enter__(self) -> "Session":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- building -------------------------------------------------------------------------------
    def _build_layers(self) -> dict[str, _Layer]:
        names = layer_names(self.unet)
        per_path: dict[str, list[tuple[int, LayerWeights]]] = {}
        for i, a in enumerate(self._applied):
            for key, path in placement(a.spm, self.unet, names=names).check().paths.items():
                per_path.setdefault(path, []).append((i, a.spm.layers[key]))
        layers, modules = {}, dict(self.unet.named_modules())
        for path, entries in per_path.items():
            module = modules[path]
            fitted = [fit(module, w) for _, w in entries]  # placement checked that they fit
            ref = module.weight
            layers[path] = _Layer(
                module=module,
                group=tuple(i for i, _ in entries),
                cols=torch.cat([torch.arange(self._applied[i].columns.start, self._applied[i].columns.stop)
                                for i, _ in entries]),
                down=torch.cat([d.float() for d, _, _ in fitted]).to(ref.device, factor_dtype(module)),
                up=torch.cat([u.float() * w.scale for (_, u, _), (_, w) in zip(fitted, entries)], dim=1)
                .to(ref.device, factor_dtype(module)),
                conv=fitted[0][2],
            )
        return layers

    # -- hooks ----------------------------------------------------------------------------------
    def gates(self, cond: torch.Tensor, rows: RowTokens | None = None) -> torch.Tensor:
        """``[B, slices]``: the gate of every slice for every row of a conditioning batch."""
        return self._gate.gates(cond, rows)

    def _on_unet_call(self, token, module, args, kwargs):
        """Everything a layer hook needs for this call, computed once on the model's device.

        Layer hooks must not wait for the device (a GPU would stall ~200 times per call), so the
        per-group coefficient slices are built here, in each group's weight dtype.
        """
        if token is not self._token:
            return None  # a hook of an earlier, interrupted attach
        cond = self._conditioning_of(args, kwargs)
        B = cond.shape[0]
        gates = self.gates(cond, self._row_tokens(B) if self._row_tokens else None)
        self.last_gates = gates
        device = gates.device
        strength = torch.tensor([a.strength for a in self._applied for _ in a.slice_ids], device=device)
        coef = gates.index_select(1, self._col_slice.to(device)) * strength
        per_group: dict = {}
        for layer in self._layers.values():
            if layer.group not in per_group:
                per_group[layer.group] = _group_coef(coef, layer)
        self._coef, self._coef_cache = coef, per_group
        return None

    def _on_layer(self, token, layer: _Layer, module, args, output):
        if token is not self._token:
            return None
        if self._coef is None:
            raise SPMRuntimeError("an adapted layer ran outside a call of the UNet the session is attached to")
        x = args[0]
        coef = self._coef_cache[layer.group]
        if coef is None:
            return None  # every row gated off (known on CPU only): the output is exactly the base output
        if coef.shape[0] != x.shape[0]:
            if self.gate.enabled:
                raise SPMRuntimeError(f"layer input has {x.shape[0]} rows, the UNet call had {coef.shape[0]}")
            coef = coef[:1].expand(x.shape[0], -1)
        down, up = layer.weights(output)
        if coef.dtype != down.dtype:
            coef = coef.to(down.dtype)  # a layer run in another dtype than its weights (autocast)
        x = x.to(down.dtype)
        if layer.conv is None and _sole_owner(layer, module, output, down):
            return functional.add_lowrank_bypass_(output, x, down, up, coef)
        return output + functional.lowrank_bypass(x, down, up, coef, layer.conv)


def _sole_owner(layer: _Layer, module: nn.Module, output, down: torch.Tensor) -> bool:
    """Whether the layer's output may be added into in place: a tensor that fills its whole
    storage (not a slice of something larger), of the factors' dtype, that no other hook has seen
    yet (ours runs first: no global forward hooks, none prepended after ours) and that autograd
    and inference mode let us change.

    In place saves streaming two output-sized tensors through memory per adapted layer; anything
    unusual takes the out-of-place sum, which gives the same numbers.
    """
    return (
        type(output) is torch.Tensor
        and output.dtype == down.dtype
        and output.is_contiguous()
        and output.untyped_storage().nbytes() == output.numel() * output.element_size()
        and not (output.requires_grad and torch.is_grad_enabled())
        and (not output.is_inference() or torch.is_inference_mode_enabled())
        and not nn.modules.module._global_forward_hooks
        and next(iter(module._forward_hooks), None) == layer.hook_id
    )


def _group_coef(coef: torch.Tensor, layer: _Layer) -> torch.Tensor | None:
    """``[B, R_group]`` of one SPM group in its layers' dtype; None when every row is gated off.

    Whether all are off is asked only of CPU tensors: on an accelerator it would wait for the
    device, and a zero coefficient gives the same output as skipping.
    """
    cols = layer.cache.get("cols")
    if cols is None or cols.device != coef.device:
        cols = layer.cache["cols"] = layer.cols.to(coef.device)
    out = coef.index_select(1, cols).to(layer.down.dtype)
    if out.device.type == "cpu" and not bool(out.any()):
        return None
    return out


def _check_strength(strength: float) -> None:
    s = float(strength)
    if s != s or s in (float("inf"), float("-inf")):
        raise SPMValueError(f"strength {strength!r} is not a finite number")
