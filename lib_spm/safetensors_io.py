"""Checked safetensors I/O: every byte of the header is validated before any tensor is read.

The safetensors library already refuses code execution; what it does not give is a clear,
specific message for each way a file can be bad, nor a guarantee that a failed write leaves the
user's existing file alone. This module adds both.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load as _st_load

from . import tempfiles
from .errors import SPMFormatError, SPMValueError

# An SPM header is a few hundred KiB even for an SDXL pack of many concepts.
MAX_HEADER_BYTES = 16 * 1024 * 1024

DTYPES = {
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
}

_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise SPMFormatError(
            f"{path.name}: only .safetensors files are accepted (pickled .ckpt/.pt/.bin files can run code)"
        )


def _refuse_pickle(path: Path, head: bytes) -> None:
    # Only once the bytes failed as safetensors: a valid header length can begin with b"\x80\x02".
    if head.startswith(_PICKLE_MAGICS):
        raise SPMFormatError(f"{path.name}: this is a pickle/zip checkpoint renamed to .safetensors; refused")


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Return (tensor entries, metadata, data start) after validating the header completely."""
    path = Path(path)
    _check_suffix(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SPMFormatError(f"{path.name}: file is truncated ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                _refuse_pickle(path, head)
                raise SPMFormatError(f"{path.name}: header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                _refuse_pickle(path, head)
                raise SPMFormatError(f"{path.name}: file is truncated (header says {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise SPMFormatError(f"{path.name}: cannot read file: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _refuse_pickle(path, head)
        raise SPMFormatError(f"{path.name}: header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise SPMFormatError(f"{path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SPMFormatError(f"{path.name}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SPMFormatError(f"{path.name}: malformed header entry for {key!r}")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SPMFormatError(f"{path.name}: tensor {key!r} has dtype {dtype}; SPMs are F16/BF16/F32/F64")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SPMFormatError(f"{path.name}: tensor {key!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise SPMFormatError(f"{path.name}: tensor {key!r} has invalid data offsets")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise SPMFormatError(f"{path.name}: tensor {key!r} points outside the file (truncated?)")
        if end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise SPMFormatError(f"{path.name}: tensor {key!r}: byte size does not match its shape")
        spans.append((begin, end, key))
    spans.sort()
    for (b0, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SPMFormatError(f"{path.name}: tensors {k0!r} and {k1!r} overlap")
    return header, metadata, 8 + n


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors (into memory; no handle stays open) and the metadata of a checked file."""
    path = Path(path)
    header, metadata, _ = read_header(path)
    try:
        tensors = _st_load(path.read_bytes())
    except Exception as e:  # the library's own validation; keep its words, our type
        raise SPMFormatError(f"{path.name}: safetensors refused the file: {e}") from None
    if set(tensors) != set(header):
        raise SPMFormatError(f"{path.name}: tensor list differs from its header")
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SPMValueError(f"{where}: tensor {key!r} contains NaN or Inf")


_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}
_NAMES[torch.uint8] = "U8"


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes, deterministic: sorted metadata and tensor keys (the library's own writer
    orders metadata by hash, so the same SPM would not give the same file twice)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    chunks, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        if t.dtype not in _NAMES:
            raise SPMValueError(f"cannot store {key!r} as {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data must start 8-byte aligned
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def write_file(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write atomically: a temporary file in the same folder, then one rename.

    A failure at any point leaves an existing file at ``path`` untouched.
    """
    path = Path(path)
    _check_suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    check_finite(tensors, path.name)
    blob = serialize(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tempfiles.clean_stale_for(path)  # leftovers of earlier writes of this file that were killed
    fd, tmp = tempfiles.new_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
