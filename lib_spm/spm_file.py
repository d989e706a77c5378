"""SPM files: load, validate, save. A file on disk becomes an :class:`SPMFile` or a typed error.

Accepted key dialects (normalised inside the reader, as the built-in Lora's factories do):
``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (kohya, the original trainer) and
``<stem>.lora_A.weight`` / ``.lora_B.weight`` (peft). ``<stem>`` is a UNet key in any dialect
of :mod:`lib_spm.names`. Nothing else is accepted: an SPM adapts the UNet only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import archs
from .errors import ArchitectureMismatch, SPMKeyError, SPMShapeError, SPMValueError
from .metadata import SPMMetadata, Slice
from .safetensors_io import check_finite, read_file, write_file

_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
}
_STEM_PREFIXES = ("lora_unet_", "diffusion_model_")


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


def parse_state_dict(tensors: dict[str, torch.Tensor], where: str = "state dict") -> dict[str, LayerWeights]:
    """Group flat tensors into layers, normalising key dialects; every key must be consumed."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, dot, part = key.partition(".")
        if stem.startswith(("lora_te", "lora_te1", "lora_te2")):
            raise SPMKeyError(f"{where}: {key!r} adapts a text encoder; an SPM adapts the UNet only")
        if not dot or part not in _PARTS or not stem.startswith(_STEM_PREFIXES):
            raise SPMKeyError(f"{where}: unknown key {key!r} (expected lora_unet_*.lora_down/lora_up.weight or .alpha)")
        role = _PARTS[part]
        g = groups.setdefault(stem, {})
        if role in g:
            raise SPMKeyError(f"{where}: {stem!r} has its {role} weights twice (mixed key dialects)")
        g[role] = t
    layers = {}
    for stem, g in sorted(groups.items()):
        if "down" not in g or "up" not in g:
            raise SPMShapeError(f"{where}: layer {stem!r} lacks its {'up' if 'down' in g else 'down'} weight")
        down, up = g["down"], g["up"]
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise SPMShapeError(f"{where}: layer {stem!r}: down {tuple(down.shape)} / up {tuple(up.shape)} are not a LoRA pair")
        if down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise SPMShapeError(f"{where}: layer {stem!r}: down rank {down.shape[0]} != up rank {up.shape[1]}")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise SPMShapeError(f"{where}: layer {stem!r}: up projection must be 1x1, got {tuple(up.shape)}")
        if "alpha" in g:
            a = g["alpha"]
            if a.numel() != 1:
                raise SPMShapeError(f"{where}: layer {stem!r}: alpha must be a scalar, got shape {tuple(a.shape)}")
            alpha = float(a.float().item())
        else:
            alpha = float(down.shape[0])  # kohya/WebUI convention: no alpha means scale 1
        layers[stem] = LayerWeights(down, up, alpha)
    return layers


def validate(layers: dict[str, LayerWeights], md: SPMMetadata, where: str) -> None:
    if not layers:
        raise SPMShapeError(f"{where}: no layers")
    check_finite({k: w.down for k, w in layers.items()}, where)
    check_finite({k: w.up for k, w in layers.items()}, where)
    for stem, w in layers.items():
        if not (0 < w.alpha < float("inf")):  # also false for NaN
            raise SPMValueError(f"{where}: layer {stem!r}: alpha {w.alpha} must be a positive finite number")
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
    """Read and fully validate an SPM file. Raises an :class:`~lib_spm.errors.SPMError` subclass."""
    path = Path(path)
    tensors, raw_md = read_file(path)
    md = SPMMetadata.from_dict(raw_md, path.name)
    layers = parse_state_dict(tensors, path.name)
    validate(layers, md, path.name)
    if md.arch is None:
        dim = archs.context_dim_of_layers({k: tuple(w.down.shape) for k, w in layers.items()})
        md.arch = archs.arch_from_context_dim(dim) if dim is not None else None
    if expected_arch is not None and md.arch is not None and md.arch != expected_arch:
        raise ArchitectureMismatch(f"{path.name} is an {md.arch} SPM; the model is {expected_arch}")
    return SPMFile(layers, md, path, file_sha256(path))
