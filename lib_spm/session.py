"""The runtime: one :class:`Session` owns every hook and every piece of state of applied SPMs.

Per UNet call, a forward pre-hook on the UNet reads the conditioning of every batch row, scores
it against each SPM's target concepts once, and turns the scores into one coefficient per rank
column and row. Each adapted layer has a forward hook that adds

    sum_i  g_i[row] * s_i * (alpha_i / rank_i) * U_i D_i x

for all SPMs on that layer in one stacked low-rank product. Weights are never edited and no
attribute is set on any module, so :meth:`Session.detach` restores bit-identical outputs.

Where rows come from (the WebUI's cond..., uncond order, diffusers' uncond, cond order, the
text of each row's prompt) is the host's business: it passes ``conditioning_of`` and
``row_tokens`` callables; the core never assumes a layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Protocol, Sequence

import torch
import torch.nn as nn

from . import archs, functional
from .errors import ArchitectureMismatch, SPMRuntimeError, SPMShapeError, SPMValueError
from .names import factor_dtype, is_linear, layer_names, resolve
from .spm_file import LayerWeights, SPMFile

RowTokens = Sequence["tuple[int, ...] | None"]  # a row's prompt tokens in order, specials excluded


class ConceptEncoder(Protocol):
    """What a host provides so the runtime can score rows against target concepts."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``[n, L, D]``: each text encoded exactly as the UNet receives a prompt's conditioning."""

    def tokens(self, texts: list[str]) -> list[tuple[int, ...]]:
        """Token ids of each text in order, special tokens (start, end, padding) excluded."""


# Unrelated prompts the calibrated metrics measure each concept against: the concept's mean
# similarity to these is what "unrelated" means for it (its gate is 0 there).
REFERENCE_PROMPTS = (
    "a photo", "a picture of something", "an object", "a landscape with trees", "a city street at night",
    "a portrait of a person", "a bowl of food on a table", "an animal in a field", "a room with furniture",
    "an abstract pattern", "a drawing", "a close-up", "a view of the sky", "a building", "a vehicle on a road",
)


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = True
    factor: float = 1.0
    # calibrated by default: in the shapes world it kept preservation at 1.0 where the published
    # "clipcos_tokenuni" (still available) let the SPM act on unrelated prompts (BENCHMARKS.md)
    metric: str = "pooled_tokenuni"
    reference_prompts: tuple[str, ...] = REFERENCE_PROMPTS  # for the calibrated metrics only

    def __post_init__(self):
        if self.metric not in functional.METRICS:
            raise SPMValueError(f"unknown gate metric {self.metric!r}; choose one of {functional.METRICS}")
        if not (0.0 <= self.factor < float("inf")):
            raise SPMValueError(f"facilitate factor {self.factor} must be a non-negative number")


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
        mode: str = "linear",
    ):
        if mode not in ("linear", "original"):
            raise SPMValueError(f"mode must be 'linear' or 'original' (the published code's gamma^2), not {mode!r}")
        if gate.enabled and encoder is None:
            raise SPMValueError("Facilitated Transport needs a concept encoder; pass encoder= or disable gating")
        self.unet = unet
        self.gate = gate
        self.mode = mode
        self._encoder = encoder
        self._conditioning_of = conditioning_of
        self._row_tokens = row_tokens
        self._applied: list[_Applied] = []
        self._slice_concepts: list[tuple[str, ...]] = []
        self._slice_labels: list[str] = []
        col = 0
        for spm, strength in spms:
            _check_strength(strength)
            ids = []
            for s in spm.slices():
                self._slice_concepts.append(tuple(s.concepts))
                self._slice_labels.append(f"{spm.name}:{s.name}" if spm.metadata.slices else spm.name)
                ids += [len(self._slice_concepts) - 1] * s.rank
            self._applied.append(_Applied(spm, float(strength), slice(col, col + spm.rank), ids))
            col += spm.rank
        self._col_slice = torch.tensor([i for a in self._applied for i in a.slice_ids], dtype=torch.long)
        self._layers: dict[str, _Layer] = {}
        self._handles: list = []
        self._token: object | None = None  # identifies the hooks of the current attach
        self._coef: torch.Tensor | None = None  # [B, R] of the current UNet call
        self._coef_cache: dict = {}  # SPM group -> its [B, R_group] coefficients (None: all off) this call
        self.last_gates: torch.Tensor | None = None  # [B, slices] of the last UNet call, on its device
        self._concepts: list[str] = []
        self._concept_embeds: torch.Tensor | None = None
        self._concept_tokens: list[tuple[int, ...]] = []
        self._groups: list[list[int]] = []
        self._calibration: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- public ---------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

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
        if self.gate.enabled:
            self._prepare_concepts()
        # hooks act only while their token is the session's: one registered in the instant before
        # its handle could be recorded (an interrupt there) can leak, but never acts
        token = self._token = object()
        self._layers = layers
        try:
            self._handles.append(self.unet.register_forward_pre_hook(
                partial(self._on_unet_call, token), with_kwargs=True))
            for layer in layers.values():
                self._handles.append(layer.module.register_forward_hook(partial(self._on_layer, token, layer)))
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
        model_dim = archs.unet_context_dim(self.unet)
        model_arch = archs.arch_from_context_dim(model_dim) if model_dim else None
        per_path: dict[str, list[tuple[int, LayerWeights]]] = {}
        names = layer_names(self.unet)
        for i, a in enumerate(self._applied):
            if a.spm.arch and model_arch and a.spm.arch != model_arch:
                raise ArchitectureMismatch(f"{a.spm.name} is an {a.spm.arch} SPM; this UNet is {model_arch}")
            for key, path in resolve(list(a.spm.layers), self.unet, names).items():
                per_path.setdefault(path, []).append((i, a.spm.layers[key]))
        layers = {}
        for path, entries in per_path.items():
            module = self.unet.get_submodule(path)
            downs, ups = [], []
            for i, w in entries:
                d, u, conv = _fit(module, w, f"{self._applied[i].spm.name} @ {path}")
                downs.append(d)
                ups.append(u.float() * (w.scale if self.mode == "linear" else entries[0][1].scale))
            if self.mode == "original" and len({d.shape[0] for d in downs}) > 1:
                raise SPMShapeError(f"original mode sums SPM weights and needs equal ranks at {path}")
            ref = module.weight
            layers[path] = _Layer(
                module=module,
                group=tuple(i for i, _ in entries),
                cols=torch.cat([torch.arange(self._applied[i].columns.start, self._applied[i].columns.stop)
                                for i, _ in entries]),
                down=torch.cat([d.float() for d in downs]).to(ref.device, factor_dtype(module)),
                up=torch.cat(ups, dim=1).to(ref.device, factor_dtype(module)),
                conv=conv,
            )
        return layers

    def _prepare_concepts(self) -> None:
        concepts = sorted({c for cs in self._slice_concepts for c in cs})
        self._concepts = concepts
        index = {c: i for i, c in enumerate(concepts)}
        self._groups = [[index[c] for c in cs] for cs in self._slice_concepts]
        if concepts:
            embeds = self._encoder.encode(concepts)
            if embeds.dim() != 3 or embeds.shape[0] != len(concepts):
                raise SPMShapeError(f"concept encoder returned {tuple(embeds.shape)} for {len(concepts)} concepts")
            self._concept_embeds = embeds.detach()
            self._concept_tokens = [tuple(t) for t in self._encoder.tokens(concepts)]
            if self.gate.metric in functional.CALIBRATED:
                self._calibration = self._calibrate()

    def _calibrate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's encoding, and each concept's score against unrelated prompts."""
        null = self._encoder.encode([""]).detach()
        refs = list(self.gate.reference_prompts)
        if not refs:
            return null, torch.zeros(len(self._concepts))
        ref_embeds, ref_tokens = self._encoder.encode(refs).detach(), self._encoder.tokens(refs)
        raw = functional.pooled_cosine(ref_embeds, [len(t) for t in ref_tokens], self._concept_embeds,
                                       [len(t) for t in self._concept_tokens], null)
        # a reference that shares a word with the concept is not unrelated to it; the floor is the
        # mean over the rest (the max let one odd reference shut the gate on synonyms, measured)
        keep = (functional.token_overlap(ref_tokens, self._concept_tokens) == 0).float()
        floor = (raw * keep).sum(0) / keep.sum(0).clamp_min(1)
        return null, floor.clamp(min=0.0)

    # -- hooks ----------------------------------------------------------------------------------
    def gates(self, cond: torch.Tensor, rows: RowTokens | None = None) -> torch.Tensor:
        """``[B, slices]``: the gate of every slice for every row of a conditioning batch."""
        B = cond.shape[0]
        if not self.gate.enabled or not self._concepts:
            return torch.ones(B, len(self._slice_concepts), device=cond.device)
        if rows is not None and len(rows) != B:
            raise SPMRuntimeError(f"host gave prompts for {len(rows)} rows, the UNet call has {B}")
        with torch.no_grad():
            scores = functional.concept_scores(
                self.gate.metric, cond.detach(), self._concept_embeds.to(cond.device),
                rows if rows is not None else [None] * B, self._concept_tokens, self._calibration,
            )
        return functional.slice_gates(scores, self._groups, self.gate.factor)

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
        if self.mode == "linear":
            delta = functional.lowrank_bypass(x, down, up, coef, layer.conv)
        else:
            delta = functional.original_bypass(x, down, up, coef, len(layer.group), 1.0, layer.conv)
        return output + delta


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


def _fit(module: nn.Module, w: LayerWeights, where: str):
    """Shape an SPM layer's factors for the module they adapt, or raise ArchitectureMismatch."""
    down, up = w.down, w.up
    if is_linear(module):
        if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
            raise ArchitectureMismatch(f"{where}: a {tuple(down.shape[2:])} convolution factor on a Linear layer")
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        if (down.shape[1], up.shape[0]) != (module.in_features, module.out_features):
            raise ArchitectureMismatch(
                f"{where}: SPM layer is {down.shape[1]}->{up.shape[0]}, "
                f"the model's is {module.in_features}->{module.out_features}"
            )
        return down, up, None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ArchitectureMismatch(f"{where}: grouped or non-zero-padded convolutions cannot be adapted")
        if down.dim() == 2:
            if tuple(module.kernel_size) != (1, 1):
                raise ArchitectureMismatch(f"{where}: a linear factor on a {module.kernel_size} convolution")
            down, up = down[:, :, None, None], up[:, :, None, None]
        if (down.shape[1], up.shape[0]) != (module.in_channels, module.out_channels) or tuple(
            down.shape[2:]
        ) != tuple(module.kernel_size):
            raise ArchitectureMismatch(
                f"{where}: SPM layer {tuple(down.shape)} / {tuple(up.shape)} does not fit Conv2d "
                f"{module.in_channels}->{module.out_channels} kernel {tuple(module.kernel_size)}"
            )
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        return down, up, conv
    raise ArchitectureMismatch(f"{where}: cannot adapt a {type(module).__name__}")
