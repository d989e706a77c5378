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
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ArchitectureMismatch, SPMError, SPMShapeError, SPMValueError
from ..format.checkpoint_io import FLOAT_DTYPES, Checkpoint, Entry, Planned, all_finite, write_stream, write_tensor
from ..format.metadata import Slice, SPMMetadata
from ..format.spm_file import LayerWeights, SPMFile
from . import tempfiles

# -- canonical keys ----------------------------------------------------------------------------

def _canonical_keys(spms: Sequence[SPMFile], arch: str | None) -> list[dict[str, str]]:
    """For each input, file key -> canonical (diffusers-dialect) key; dialects may differ per file."""
    needs = any(not k.startswith("lora_unet_") or "_input_blocks_" in k or "_output_blocks_" in k
                or "_middle_block_" in k for s in spms for k in s.layers)
    if not needs:
        return [{k: k for k in s.layers} for s in spms]
    if arch is None:
        raise SPMShapeError("inputs use LDM-style key names and their architecture is unknown; cannot align them")
    from ..format import archs
    from ..format.names import layer_names, resolve

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
    note: str = ""  # set when the rank asked for was more than the deltas have


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
    note = ""
    true_rank = max([1] + [len(S) for _, S, _, _ in svds.values()])
    if rank is not None and rank > true_rank:
        # more columns than the deltas have would only be zeros (947 MB of them for 100000)
        note = (f"rank {rank} is more than the merged deltas have: {true_rank} (the inputs' ranks sum to "
                f"{exact.rank}, and no layer exceeds min(in, out)); wrote rank {true_rank}")
        rank = true_rank
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
    return SPMFile(layers, md), CompressReport(rank, errs, (num / den) ** 0.5 if den else 0.0, note)


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
#
# A checkpoint is streamed: its header is checked (every adapted weight present, float, of the
# right shape) before anything is written; then each tensor is either copied byte for byte (the
# text encoder, the VAE, int64 position_ids, anything not adapted) or read, baked in fp32 and
# written, one at a time, into a temporary published only when complete. Peak memory is a few
# copies of the largest adapted weight, not of the checkpoint (BENCHMARKS.md, "Bake memory").

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _bake_pack(inputs: Sequence[tuple[SPMFile, float]]) -> SPMFile:
    """The inputs as one exact pack: low-rank factors only; each delta is built when its weight is."""
    _check_inputs(inputs)
    return merge_exact(inputs)


def _check_fits(entry: Entry, lw: LayerWeights) -> None:
    """The weight can take the layer's delta: a float tensor of its shape (1x1 kernels may be
    present on one side only: linear and 1x1-convolution projections are the same map)."""
    shape = (lw.out_features, lw.in_features, *lw.down.shape[2:])
    squeeze = (lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s)
    if squeeze(tuple(entry.shape)) != squeeze(shape):
        raise ArchitectureMismatch(f"{entry.name} is {entry.shape}, the SPM needs {shape}")
    if entry.dtype not in FLOAT_DTYPES:
        raise ArchitectureMismatch(f"{entry.name} holds {entry.dtype}, not float weights; it cannot be baked")


def _write_baked(ckpt: Checkpoint, dst: Path, targets: dict[str, LayerWeights]) -> dict:
    """Stream ``ckpt`` to ``dst``: ``targets`` baked, every other tensor copied unchanged."""
    stats = {"max_abs_delta": 0.0}

    def baked(entry: Entry, lw: LayerWeights, out) -> None:
        w = ckpt.read(entry)
        new = w.to(torch.promote_types(w.dtype, torch.float32))  # fp32 math (fp64 stays fp64)
        d = lw.delta().reshape(entry.shape)
        new += d
        stats["max_abs_delta"] = max(stats["max_abs_delta"], float(d.abs().max()))
        del d
        new = new.to(w.dtype)
        if not all_finite(new):  # judged in the dtype that is written
            raise SPMValueError(f"baking gives non-finite values in {entry.name} ({entry.dtype})")
        write_tensor(out, new)

    plan = [Planned(e.name, e.dtype, e.shape,
                    partial(baked, e, targets[e.name]) if e.name in targets else partial(ckpt.copy, e))
            for e in ckpt.entries.values()]
    write_stream(dst, plan, ckpt.metadata, mode=ckpt.mode)  # readable by whoever could read the source
    return {"layers": len(targets), **stats}


def _check_new_file(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve():
        raise SPMValueError("baking never overwrites the source checkpoint; choose another output")
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} exists")
    if dst.suffix.lower() != ".safetensors":
        raise SPMValueError(f"{dst.name}: the baked checkpoint is written as .safetensors; name it so")


def bake_ldm_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, inputs: Sequence[tuple[SPMFile, float]],
                        *, arch: str | None = None) -> dict:
    """Write a new single-file LDM checkpoint (as the WebUI loads it) with the deltas added.

    Refuses to overwrite ``src`` or an existing ``dst``; every name, shape and dtype is checked
    before writing. Returns {"layers": n, "max_abs_delta": x}.
    """
    src, dst = Path(src), Path(dst)
    if src.suffix.lower() != ".safetensors":
        raise SPMValueError("only .safetensors checkpoints can be baked")
    _check_new_file(src, dst)
    pack = _bake_pack(inputs)
    arch = arch or pack.arch
    if arch is None:
        raise SPMValueError("architecture unknown: pass arch= to bake")
    from ..format import archs
    from ..format.names import layer_names

    ref_names = {n.key: n for n in layer_names(archs.reference_unet(arch)).values()}
    with Checkpoint(src) as ckpt:
        targets = {}
        for key, lw in pack.layers.items():
            name = ref_names.get(key)
            if name is None:
                raise SPMShapeError(f"{key} is not a layer of an {arch} UNet")
            wkey = f"model.diffusion_model.{name.ldm}.weight"
            if wkey not in ckpt.entries:
                raise ArchitectureMismatch(f"{src.name} has no {wkey}: not an {arch} checkpoint")
            _check_fits(ckpt.entries[wkey], lw)
            targets[wkey] = lw
        return _write_baked(ckpt, dst, targets)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def bake_diffusers_folder(src: str | os.PathLike, dst: str | os.PathLike, inputs: Sequence[tuple[SPMFile, float]]) -> dict:
    """Copy a diffusers model folder to ``dst`` with the deltas added to ``unet`` weights.

    The copy is built in a fresh temporary folder next to ``dst`` and renamed into place when
    complete; nothing that exists is deleted or overwritten. Other weight files of the UNet
    (``.bin``, ``.fp16`` variants) would stay unbaked, so they are left out and listed.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} exists")
    weights = src / "unet" / DIFFUSERS_WEIGHTS
    if not weights.is_file():
        raise SPMValueError(f"{src} is not a diffusers folder with unet/{DIFFUSERS_WEIGHTS}")
    if _inside(dst.parent.resolve() / dst.name, src.resolve()):
        raise SPMValueError(f"{dst} is inside the source folder {src}; the copy would contain itself")
    pack = _bake_pack(inputs)
    skipped: list[str] = []

    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder) != src / "unet":
            return []
        out = [n for n in names if n.startswith("diffusion_pytorch_model")]
        skipped.extend(f"unet/{n}" for n in out if n != DIFFUSERS_WEIGHTS)
        return out

    with Checkpoint(weights) as ckpt:
        # resolve forward: each checkpoint weight's file key, then look the SPM's keys up
        by_key = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in ckpt.entries if k.endswith(".weight")}
        targets = {}
        for key, lw in pack.layers.items():
            wkey = by_key.get(key)
            if wkey is None:
                raise ArchitectureMismatch(f"{weights.name} has no weight for {key}")
            _check_fits(ckpt.entries[wkey], lw)
            targets[wkey] = lw
        dst.parent.mkdir(parents=True, exist_ok=True)
        tempfiles.clean_stale_for(dst)
        tmp = tempfiles.new_folder(dst)
        try:
            shutil.copytree(src, tmp, ignore=ignore, dirs_exist_ok=True)
            rep = _write_baked(ckpt, tmp / "unet" / DIFFUSERS_WEIGHTS, targets)
            tempfiles.publish_folder(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {**rep, **({"not_copied": sorted(skipped)} if skipped else {})}


__all__ = ["merge_exact", "merge_compressed", "extract", "bake_ldm_checkpoint", "bake_diffusers_folder",
           "CompressReport", "SPMError"]
