"""Merging SPMs into one file, exactly or compressed; pulling a slice back out; baking into weights.

Exact merge stacks ranks: pack = [U_1 .. U_n] [D_1 .. D_n] with each input's weight and
alpha/rank folded into its up columns (alpha of the pack = its rank, so its own scale is 1).
The file records which rank slice holds which concepts, so every slice keeps its own
Facilitated Transport gate and applying the pack equals applying the inputs side by side. Loaded
as a plain LoRA it gives ``sum_i w_i * delta_i``: linear in each weight, no cross terms (summing
down and up matrices separately, as kohya-style merges do, multiplies them into cross terms).

Compressed merge replaces each layer's summed delta by its best rank-k approximation (SVD in
fp32). One rank block can only have one gate: the compressed pack is gated by the max over all
its concepts, and its file says so.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import ArchitectureMismatch, SPMError, SPMShapeError, SPMValueError
from .metadata import SPMMetadata, Slice
from .safetensors_io import read_file, write_file
from .spm_file import LayerWeights, SPMFile


# -- canonical keys ----------------------------------------------------------------------------

def _canonical_keys(spms: Sequence[SPMFile], arch: str | None) -> list[dict[str, str]]:
    """For each input, file key -> canonical (diffusers-dialect) key; dialects may differ per file."""
    needs = any(not k.startswith("lora_unet_") or "_input_blocks_" in k or "_output_blocks_" in k
                or "_middle_block_" in k for s in spms for k in s.layers)
    if not needs:
        return [{k: k for k in s.layers} for s in spms]
    if arch is None:
        raise SPMShapeError("inputs use LDM-style key names and their architecture is unknown; cannot align them")
    from . import archs
    from .names import resolve, layer_names

    ref = archs.reference_unet(arch)
    names = layer_names(ref)
    return [{k: names[p].key for k, p in resolve(list(s.layers), ref).items()} for s in spms]


def _common_arch(spms: Sequence[SPMFile]) -> str | None:
    archs_ = {s.arch for s in spms if s.arch}
    if len(archs_) > 1:
        raise ArchitectureMismatch(f"cannot merge SPMs of different architectures: {sorted(archs_)}")
    return archs_.pop() if archs_ else None


def _check_inputs(inputs: Sequence[tuple[SPMFile, float]]) -> None:
    if not inputs:
        raise SPMValueError("nothing to merge")
    for spm, w in inputs:
        if not (float(w) == float(w) and abs(float(w)) != float("inf")):
            raise SPMValueError(f"weight {w!r} of {spm.name} is not a finite number")


def _layer_shapes(spm: SPMFile, key: str) -> tuple:
    w = spm.layers[key]
    return (w.out_features, w.in_features, tuple(w.down.shape[2:]))


@dataclass
class _Aligned:
    arch: str | None
    keys: list[str]  # canonical keys, union over inputs
    per_input: list[dict[str, str]]  # canonical -> file key, per input
    shapes: dict[str, tuple]


def _align(spms: Sequence[SPMFile]) -> _Aligned:
    arch = _common_arch(spms)
    canon = _canonical_keys(spms, arch)
    per_input = [{c: k for k, c in m.items()} for m in canon]
    shapes: dict[str, tuple] = {}
    for spm, m in zip(spms, per_input):
        for c, k in m.items():
            shp = _layer_shapes(spm, k)
            if shapes.setdefault(c, shp) != shp:
                raise SPMShapeError(f"{spm.name}: layer {c} is {shp}, another input has {shapes[c]}; they cannot combine")
    return _Aligned(arch, sorted(shapes), per_input, shapes)


# -- exact -------------------------------------------------------------------------------------

def merge_exact(inputs: Sequence[tuple[SPMFile, float]], *, name: str = "pack", description: str = "") -> SPMFile:
    """Stack the inputs' ranks; every input (and every slice of an input pack) keeps its gate."""
    _check_inputs(inputs)
    spms = [s for s, _ in inputs]
    al = _align(spms)
    layers = {}
    for c in al.keys:
        out_f, in_f, kernel = al.shapes[c]
        downs, ups = [], []
        for (spm, w), m in zip(inputs, al.per_input):
            if c in m:
                lw = spm.layers[m[c]]
                d = lw.down.float().reshape(lw.rank, in_f, *kernel)
                u = lw.up.float().reshape(out_f, lw.rank, *([1, 1] if kernel else [])) * (float(w) * lw.scale)
            else:  # this input does not adapt the layer: zero columns keep the slice layout uniform
                d = torch.zeros(spm.rank, in_f, *kernel)
                u = torch.zeros(out_f, spm.rank, *([1, 1] if kernel else []))
            downs.append(d)
            ups.append(u)
        rank = sum(d.shape[0] for d in downs)
        layers[c] = LayerWeights(torch.cat(downs), torch.cat(ups, dim=1), float(rank))
    slices, sources, seen = [], [], set()
    for spm, w in inputs:
        for s in spm.slices():
            label = s.name if spm.metadata.slices is None else f"{spm.name}/{s.name}"
            base, n = label, 1
            while label in seen:  # slice names must stay unique for extract()
                n += 1
                label = f"{base}#{n}"
            seen.add(label)
            slices.append(Slice(label, s.concepts, s.rank))
        sources.append({"name": spm.name, "sha256": spm.sha256, "weight": float(w), "rank": spm.rank})
    targets = list(dict.fromkeys(c for s in slices for c in s.concepts))
    surrogates = {k: v for spm in spms for k, v in spm.metadata.surrogates.items()}
    md = SPMMetadata(targets=targets, surrogates=surrogates, arch=al.arch, name=name, description=description,
                     slices=slices, recipe={"merge": {"method": "exact", "inputs": sources}})
    return SPMFile(layers, md)


def extract(pack: SPMFile, slice_name: str) -> SPMFile:
    """One slice of an exact pack as an SPM of its own (its merge weight stays folded in)."""
    offset = 0
    for s in pack.slices():
        if s.name == slice_name:
            break
        offset += s.rank
    else:
        raise SPMValueError(f"{pack.name} has no slice {slice_name!r}; it has {[s.name for s in pack.slices()]}")
    if pack.metadata.slices is None:
        raise SPMValueError(f"{pack.name} is not a pack")
    cols = slice(offset, offset + s.rank)
    layers = {}
    for k, lw in pack.layers.items():
        d, u = lw.down[cols].clone(), lw.up[:, cols].clone() * lw.scale
        layers[k] = LayerWeights(d, u, float(s.rank))  # scale 1: the pack's scale is folded into up
    md = SPMMetadata(targets=list(s.concepts), arch=pack.arch, name=slice_name,
                     surrogates={c: v for c, v in pack.metadata.surrogates.items() if c in s.concepts},
                     recipe={"extracted_from": {"name": pack.name, "sha256": pack.sha256, "slice": slice_name}})
    return SPMFile(layers, md)


# -- compressed --------------------------------------------------------------------------------

@dataclass
class CompressReport:
    rank: int
    per_layer_error: dict[str, float]  # relative Frobenius error of each layer's delta
    overall_error: float  # relative error over all layers together


def merge_compressed(inputs: Sequence[tuple[SPMFile, float]], *, rank: int | None = None,
                     error_budget: float | None = None, name: str = "pack", description: str = "") -> tuple[SPMFile, CompressReport]:
    """SVD of each layer's summed delta to ``rank`` columns, or to the smallest rank whose
    relative error stays within ``error_budget`` on every layer (the file then has the largest
    of those ranks, since an SPM has one rank)."""
    if (rank is None) == (error_budget is None):
        raise SPMValueError("give exactly one of rank or error_budget")
    if rank is not None and rank < 1:
        raise SPMValueError("rank must be at least 1")
    if error_budget is not None and not (0 <= error_budget < 1):
        raise SPMValueError("error_budget is a relative error in [0, 1)")
    exact = merge_exact(inputs, name=name)
    svds = {}
    for k, lw in exact.layers.items():
        svds[k] = (*_lowrank_svd(lw), lw)
    if rank is None:
        need = 1
        for U, S, Vh, _ in svds.values():
            tail = S.flip(0).pow(2).cumsum(0).flip(0)  # tail[j] = sum_{i>=j} s_i^2
            total = tail[0] if tail[0] > 0 else torch.tensor(1.0)
            ok = [j for j in range(1, len(S) + 1) if j == len(S) or tail[j] <= (error_budget ** 2) * total]
            need = max(need, ok[0])
        rank = need
    layers, errs, num, den = {}, {}, 0.0, 0.0
    for k, (U, S, Vh, lw) in svds.items():
        r = min(rank, len(S))
        sq = S.sqrt()
        up = U[:, :r] * sq[:r]
        down = sq[:r, None] * Vh[:r]
        if r < rank:  # a narrow layer: pad with zero columns to the file's single rank
            up = torch.cat([up, torch.zeros(up.shape[0], rank - r)], dim=1)
            down = torch.cat([down, torch.zeros(rank - r, down.shape[1])])
        kernel = tuple(lw.down.shape[2:])
        down = down.reshape(rank, lw.in_features, *kernel)
        up = up.reshape(lw.out_features, rank, *([1, 1] if kernel else []))
        layers[k] = LayerWeights(down, up, float(rank))
        t2, tail2 = float(S.pow(2).sum()), float(S[r:].pow(2).sum())
        errs[k] = (tail2 / t2) ** 0.5 if t2 > 0 else 0.0
        num, den = num + tail2, den + t2
    concepts = tuple(exact.metadata.targets)
    md = SPMMetadata(targets=list(concepts), surrogates=exact.metadata.surrogates, arch=exact.arch, name=name,
                     description=description, slices=[Slice("compressed", concepts, rank)],
                     recipe={"merge": {**exact.metadata.recipe["merge"], "method": "compressed", "rank": rank,
                                       "gate": "max over all concepts (one rank block, one gate)",
                                       "overall_relative_error": (num / den) ** 0.5 if den else 0.0}})
    return SPMFile(layers, md), CompressReport(rank, errs, (num / den) ** 0.5 if den else 0.0)


def _lowrank_svd(lw: LayerWeights):
    """SVD of scale * up @ down through its factors: QR both, then an R x R SVD (exact, and
    cheap where the full delta is 2560 x 320 but its rank is a handful)."""
    up = lw.up.float().reshape(lw.out_features, lw.rank) * lw.scale
    down = lw.down.float().reshape(lw.rank, -1)
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    um, S, vmh = torch.linalg.svd(ru @ rd.T)
    return qu @ um, S, (qd @ vmh.T).T


# -- bake ----------------------------------------------------------------------------------------

def _deltas(inputs: Sequence[tuple[SPMFile, float]]) -> tuple[str | None, dict[str, torch.Tensor]]:
    """Canonical key -> summed fp32 delta (gate 1, each input at its weight)."""
    _check_inputs(inputs)
    pack = merge_exact(inputs)
    return pack.arch, {k: lw.delta() for k, lw in pack.layers.items()}


def _baked(w: torch.Tensor, d: torch.Tensor, name: str) -> torch.Tensor:
    """``w + d`` in fp32, returned in ``w``'s dtype, checked finite in the dtype that gets written."""
    if tuple(w.shape) != tuple(d.shape):
        raise ArchitectureMismatch(f"{name} is {tuple(w.shape)}, the SPM needs {tuple(d.shape)}")
    new = (w.float() + d).to(w.dtype)
    if not torch.isfinite(new).all():
        raise SPMValueError(f"baking gives non-finite values in {name} ({w.dtype})")
    return new


def bake_ldm_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, inputs: Sequence[tuple[SPMFile, float]],
                        *, arch: str | None = None) -> dict:
    """Write a new single-file LDM checkpoint (as the WebUI loads it) with the deltas added.

    Refuses to overwrite ``src`` or an existing ``dst``; everything is checked before writing.
    Returns {"layers": n, "max_abs_delta": x}.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise SPMValueError("baking never overwrites the source checkpoint; choose another output")
    if dst.exists():
        raise FileExistsError(f"{dst} exists")
    spm_arch, deltas = _deltas(inputs)
    arch = arch or spm_arch
    if arch is None:
        raise SPMValueError("architecture unknown: pass arch= to bake")
    from . import archs
    from .names import layer_names

    ref_names = {n.key: n for n in layer_names(archs.reference_unet(arch)).values()}
    tensors, md = read_file(src) if src.suffix == ".safetensors" else (None, None)
    if tensors is None:
        raise SPMValueError("only .safetensors checkpoints can be baked")
    out = dict(tensors)
    biggest = 0.0
    for key, d in deltas.items():
        name = ref_names.get(key)
        if name is None:
            raise SPMShapeError(f"{key} is not a layer of an {arch} UNet")
        wkey = f"model.diffusion_model.{name.ldm}.weight"
        if wkey not in tensors:
            raise ArchitectureMismatch(f"{src.name} has no {wkey}: not an {arch} checkpoint")
        out[wkey] = _baked(tensors[wkey], d, wkey)
        biggest = max(biggest, float(d.abs().max()))
    write_file(dst, out, md)
    return {"layers": len(deltas), "max_abs_delta": biggest}


def bake_diffusers_folder(src: str | os.PathLike, dst: str | os.PathLike, inputs: Sequence[tuple[SPMFile, float]]) -> dict:
    """Copy a diffusers model folder to ``dst`` with the deltas added to ``unet`` weights."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists")
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise SPMValueError(f"{src} is not a diffusers folder with unet/diffusion_pytorch_model.safetensors")
    _, deltas = _deltas(inputs)
    tensors, md = read_file(weights)
    # resolve forward: each checkpoint weight's file key, then look the SPM's keys up
    by_key = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in tensors if k.endswith(".weight")}
    out, biggest = dict(tensors), 0.0
    for key, d in deltas.items():
        wkey = by_key.get(key)
        if wkey is None:
            raise ArchitectureMismatch(f"{weights.name} has no weight for {key}")
        out[wkey] = _baked(tensors[wkey], d, wkey)
        biggest = max(biggest, float(d.abs().max()))
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("diffusion_pytorch_model.safetensors"))
        write_file(tmp / "unet" / "diffusion_pytorch_model.safetensors", out, md)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"layers": len(deltas), "max_abs_delta": biggest}


__all__ = ["merge_exact", "merge_compressed", "extract", "bake_ldm_checkpoint", "bake_diffusers_folder",
           "CompressReport", "SPMError"]
