"""SPM files: load, validate, save. A file on disk becomes an :class:`SPMFile` or a typed error.

Accepted key dialects (normalised inside the reader, as the built-in Lora's factories do):
``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (kohya, the original trainer) and
``<stem>.lora_A.weight`` / ``.lora_B.weight`` (peft). ``<stem>`` is a UNet key in any dialect
of :mod:`lib_spm.format.names`. Nothing else is accepted: an SPM adapts the UNet only.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ArchitectureMismatch, SPMKeyError, SPMShapeError, SPMValueError
from . import archs
from .metadata import Slice, SPMMetadata
from .safetensors_io import Header, check_finite, open_checked, read_tensors, write_file
from .strict_json import show

_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
}
_STEM_PREFIXES = ("lora_unet_", "diffusion_model_")

# The strength range the UI and prompt tags allow (lib_spm/hosts/webui/args.py enforces it).
MAX_STRENGTH = 10.0
# Deltas are applied in the model's dtype, often fp16: its largest finite value.
FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class LayerWeights:
    """One adapted layer: ``delta W = (alpha / rank) * up @ down`` (convolutions: down carries the kernel)."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def delta(self) -> torch.Tensor:
        """The full weight delta in fp32, shaped like the adapted module's weight."""
        up = self.up.float().reshape(self.up.shape[0], self.rank)
        down = self.down.float().reshape(self.rank, -1)
        d = self.scale * (up @ down)
        return d.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class SPMFile:
    layers: dict[str, LayerWeights]  # file key stem -> weights
    metadata: SPMMetadata
    path: Path | None = None
    sha256: str | None = field(default=None, repr=False)
    raw_metadata: dict[str, str] = field(default_factory=dict, repr=False)  # the header's, as read

    @property
    def ungated(self) -> bool:
        """No target concepts (for some slice): it acts on every prompt, Facilitated Transport or not."""
        return self.metadata.ungated

    @property
    def name(self) -> str:
        if self.metadata.name:
            return self.metadata.name
        return self.path.stem if self.path else "spm"

    @property
    def ranks(self) -> set[int]:
        return {w.rank for w in self.layers.values()}

    @property
    def rank(self) -> int:
        (r,) = self.ranks or {0}
        return r

    @property
    def alphas(self) -> set[float]:
        return {w.alpha for w in self.layers.values()}

    @property
    def arch(self) -> str | None:
        return self.metadata.arch

    @property
    def parameter_count(self) -> int:
        return sum(w.down.numel() + w.up.numel() for w in self.layers.values())

    def slices(self) -> list[Slice]:
        return self.metadata.gate_slices(self.rank, self.name)

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for stem, w in self.layers.items():
            out[f"{stem}.lora_down.weight"] = w.down.to(dtype or w.down.dtype).contiguous()
            out[f"{stem}.lora_up.weight"] = w.up.to(dtype or w.up.dtype).contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(w.alpha), dtype=dtype or torch.float32)
        return out

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Validate, then write atomically (an existing file is never half-overwritten)."""
        validate(self.layers, self.metadata, str(path))
        md = self.metadata
        md.rank = self.rank
        if md.alpha is None and len(self.alphas) == 1:
            md.alpha = next(iter(self.alphas))
        return write_file(path, self.tensors(dtype), md.to_dict(), overwrite=overwrite)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _group(items: dict, where: str) -> dict[str, dict]:
    """``{stem: {role: item}}`` from flat keys, normalising dialects; every key must be consumed."""
    groups: dict[str, dict] = {}
    for key, item in items.items():
        stem, dot, part = key.partition(".")
        if stem.startswith(("lora_te", "lora_te1", "lora_te2")):
            raise SPMKeyError(f"{where}: {show(key)} adapts a text encoder; an SPM adapts the UNet only")
        if not dot or part not in _PARTS or not stem.startswith(_STEM_PREFIXES):
            raise SPMKeyError(
                f"{where}: unknown key {show(key)} (expected lora_unet_*.lora_down/lora_up.weight or .alpha)")
        role = _PARTS[part]
        g = groups.setdefault(stem, {})
        if role in g:
            raise SPMKeyError(f"{where}: {show(stem)} has its {role} weights twice (mixed key dialects)")
        g[role] = item
    return groups


def _check_pair(stem: str, g: dict[str, tuple[int, ...]], where: str) -> None:
    """Shapes of one layer's down/up/alpha: a LoRA pair of one rank."""
    if "down" not in g or "up" not in g:
        raise SPMShapeError(f"{where}: layer {show(stem)} lacks its {'up' if 'down' in g else 'down'} weight")
    down, up = g["down"], g["up"]
    if len(down) not in (2, 4) or len(up) != len(down):
        raise SPMShapeError(f"{where}: layer {show(stem)}: down {down} / up {up} are not a LoRA pair")
    if down[0] != up[1] or down[0] == 0:
        raise SPMShapeError(f"{where}: layer {show(stem)}: down rank {down[0]} != up rank {up[1]}")
    if len(up) == 4 and tuple(up[2:]) != (1, 1):
        raise SPMShapeError(f"{where}: layer {show(stem)}: up projection must be 1x1, got {up}")
    if math.prod(down) == 0 or math.prod(up) == 0:
        raise SPMShapeError(f"{where}: layer {show(stem)} is empty (down {down}, up {up})")
    if "alpha" in g and math.prod(g["alpha"]) != 1:
        raise SPMShapeError(f"{where}: layer {show(stem)}: alpha must be a scalar, got shape {g['alpha']}")


def _check_size(stem: str, g: dict[str, tuple[int, ...]], limits: archs.LayerLimits, where: str) -> None:
    """No factor larger than the largest weight of any supported UNet, no width it does not have."""
    down, up = g["down"], g["up"]
    ins, outs, kernel = down[1], up[0], max(down[2:], default=1)
    if ins > limits.max_in or outs > limits.max_out or kernel > limits.max_kernel:
        raise SPMShapeError(
            f"{where}: layer {show(stem)} is {outs}x{ins} (kernel {kernel}); no supported UNet has a layer "
            f"wider than {limits.max_out}x{limits.max_in} (kernel {limits.max_kernel})")
    if max(math.prod(down), math.prod(up)) > limits.max_weight:
        raise SPMShapeError(
            f"{where}: layer {show(stem)} at rank {down[0]} is larger than the largest UNet weight "
            f"({limits.max_weight} values)")


def check_header(header: Header, where: str) -> None:
    """Judge an SPM from its header alone (keys, pairs, sizes), before a tensor byte is read.

    A checkpoint dropped into the SPM folder fails here on its keys, an oversized tensor on its size.
    """
    shapes = {k: e.shape for k, e in header.entries.items()}
    groups = _group(shapes, where)
    limits = archs.any_arch_limits()
    if len(groups) > limits.layers:
        raise SPMShapeError(f"{where}: {len(groups)} layers; no supported UNet has more than {limits.layers}")
    for stem, g in groups.items():
        _check_pair(stem, g, where)
        _check_size(stem, g, limits, where)


def parse_state_dict(tensors: dict[str, torch.Tensor], where: str = "state dict") -> dict[str, LayerWeights]:
    """Group flat tensors into layers, normalising key dialects; every key must be consumed."""
    layers = {}
    for stem, g in sorted(_group(tensors, where).items()):
        _check_pair(stem, {role: tuple(t.shape) for role, t in g.items()}, where)
        down, up = g["down"], g["up"]
        if "alpha" in g:
            alpha = float(g["alpha"].float().item())
        else:
            alpha = float(down.shape[0])  # kohya/WebUI convention: no alpha means scale 1
        layers[stem] = LayerWeights(down, up, alpha)
    return layers


def _delta_bound(w: LayerWeights) -> float:
    """An upper bound of max |scale * up @ down| in fp64, without forming the product:
    |sum_k u_ik d_kj| <= sum_k max_i |u_ik| * max_j |d_kj| (exact at rank 1)."""
    up = w.up.double().reshape(w.up.shape[0], w.rank).abs().amax(dim=0)
    down = w.down.double().reshape(w.rank, -1).abs().amax(dim=1)
    return abs(w.scale) * float(up @ down)


def _delta_max(w: LayerWeights) -> float:
    """max |delta| exactly, in fp64, a block of output rows at a time (memory near one block)."""
    up = w.up.double().reshape(w.up.shape[0], w.rank)
    down = w.down.double().reshape(w.rank, -1)
    rows = max(1, (1 << 22) // down.shape[1])
    return abs(w.scale) * max(float((up[i:i + rows] @ down).abs().max()) for i in range(0, up.shape[0], rows))


def check_usable(layers: dict[str, LayerWeights], where: str) -> None:
    """Refuse weights that are finite on disk but overflow where they are used.

    The runtime casts ``down`` and ``scale * up`` to the model's dtype and adds up to
    ``MAX_STRENGTH * delta`` to a layer's output; the WebUI usually runs fp16. So each factor must
    fit fp16, and so must the delta at the strongest strength. A trained delta is a small fraction
    of the weight it adjusts (|values| well below 1): the fp16 bound (6550 per element at strength
    10) only refuses files that would turn images into NaN, and computing in a wider dtype would
    hide their breakage rather than make them useful.
    """
    for stem, w in layers.items():
        big_down = float(w.down.double().abs().max())
        big_up = float(w.up.double().abs().max()) * abs(w.scale)
        if big_down > FP16_MAX or big_up > FP16_MAX:
            raise SPMValueError(
                f"{where}: layer {show(stem)} holds values up to {max(big_down, big_up):.3g}, beyond fp16's "
                f"{FP16_MAX:.0f}: it would overflow in a half-precision model")
        if _delta_bound(w) * MAX_STRENGTH > FP16_MAX and _delta_max(w) * MAX_STRENGTH > FP16_MAX:
            raise SPMValueError(
                f"{where}: layer {show(stem)}: its weight change reaches {_delta_max(w):.3g}, which overflows "
                f"fp16 at strength {MAX_STRENGTH:g}")


def validate(layers: dict[str, LayerWeights], md: SPMMetadata, where: str) -> None:
    if not layers:
        raise SPMShapeError(f"{where}: no layers")
    check_finite({k: w.down for k, w in layers.items()}, where)
    check_finite({k: w.up for k, w in layers.items()}, where)
    for stem, w in layers.items():
        if not (0 < w.alpha < float("inf")):  # also false for NaN
            raise SPMValueError(f"{where}: layer {show(stem)}: alpha {w.alpha} must be a positive finite number")
    check_usable(layers, where)
    ranks = {w.rank for w in layers.values()}
    if len(ranks) != 1:
        raise SPMShapeError(f"{where}: layers have different ranks {sorted(ranks)}; an SPM has one rank")
    (rank,) = ranks
    if md.slices is not None:
        total = sum(s.rank for s in md.slices)
        if total != rank:
            raise SPMShapeError(f"{where}: slices cover rank {total}, layers have rank {rank}")
    elif md.rank is not None and md.rank != rank:
        raise SPMShapeError(f"{where}: metadata says rank {md.rank}, layers have rank {rank}")
    dim = archs.context_dim_of_layers({k: tuple(w.down.shape) for k, w in layers.items()})
    shape_arch = archs.arch_from_context_dim(dim) if dim is not None else None
    if md.arch is not None and shape_arch is not None and md.arch != shape_arch:
        raise ArchitectureMismatch(
            f"{where}: metadata says {md.arch} but its cross-attention reads {dim}-wide text ({shape_arch})"
        )


def load_spm(path: str | os.PathLike, *, expected_arch: str | None = None) -> SPMFile:
    """Read and fully validate an SPM file. Raises an :class:`~lib_spm.errors.SPMError` subclass.

    One open: the header is judged (keys, sizes, metadata) before any tensor byte is read, then
    exactly the declared tensors are read from the same descriptor and hashed as they come, so
    metadata, tensors and sha256 are one version of the file.
    """
    path = Path(path)
    with open_checked(path) as (f, header):
        md = SPMMetadata.from_dict(header.metadata, path.name)
        check_header(header, path.name)
        hasher = hashlib.sha256()
        tensors = read_tensors(f, header, path.name, hasher)
    layers = parse_state_dict(tensors, path.name)
    validate(layers, md, path.name)
    if md.arch is None:
        dim = archs.context_dim_of_layers({k: tuple(w.down.shape) for k, w in layers.items()})
        md.arch = archs.arch_from_context_dim(dim) if dim is not None else None
    if expected_arch is not None and md.arch is not None and md.arch != expected_arch:
        raise ArchitectureMismatch(f"{path.name} is an {md.arch} SPM; the model is {expected_arch}")
    return SPMFile(layers, md, path, hasher.hexdigest(), dict(header.metadata))
