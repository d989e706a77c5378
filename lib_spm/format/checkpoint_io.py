"""Model checkpoints as streams: the header first, then one tensor at a time, in and out.

A checkpoint is several GB and holds tensors of any safetensors dtype (int64 ``position_ids``,
bool masks, fp8); the strict SPM reader (``safetensors_io``) is for SPM files only. Here the
header is parsed and checked before any tensor byte is read, one tensor is read with a plain
``readinto`` (no memory map, whose touched pages would count against the process), and the
output is written in order to a temporary that is published only when complete. Peak memory is
a few copies of the largest tensor that changes, whatever the file's size.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from ..errors import SPMFormatError
from ..operations import tempfiles

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_COPY_CHUNK = 8 << 20

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_TORCH = {**FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _TORCH[_name] = getattr(torch, _attr)
DTYPE_NAMES = {dt: name for name, dt in _TORCH.items()}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # the safetensors name: F16, I64, BOOL, ...
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    nbytes: int


class Checkpoint:
    """An open checkpoint: its checked header, and the one handle all its tensors are read from
    (so header and tensors come from the same file even if the path is replaced meanwhile)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:  # non-blocking: opening a FIFO must not wait for a writer (no effect on a regular file)
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise _refuse(self.path, f"cannot read file: {e.strerror or e}") from None
        self.file: BinaryIO = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _refuse(self.path, "not a regular file")
            self.mode = stat.S_IMODE(st.st_mode)
            self.entries, self.metadata = _read_header(self.path, self.file, st.st_size)
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def read(self, entry: Entry) -> torch.Tensor:
        """One tensor, read into fresh memory of its own."""
        if entry.dtype not in _TORCH:
            raise SPMFormatError(f"{entry.name}: dtype {entry.dtype} is not supported by this torch")
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            self.file.seek(entry.begin)
            if self.file.readinto(buf.numpy()) != entry.nbytes:
                raise SPMFormatError(f"{entry.name}: file ended early (was it changed while being read?)")
        return buf.view(_TORCH[entry.dtype]).reshape(entry.shape)

    def copy(self, entry: Entry, out: BinaryIO) -> None:
        """Copy a tensor's bytes unchanged, in bounded chunks (no tensor is built)."""
        buf = bytearray(min(_COPY_CHUNK, entry.nbytes))
        view, left = memoryview(buf), entry.nbytes
        self.file.seek(entry.begin)
        while left:
            n = self.file.readinto(view[: min(left, len(buf))])
            if not n:
                raise SPMFormatError(f"{entry.name}: file ended early (was it changed while being read?)")
            out.write(view[:n])
            left -= n


def _refuse(path: Path, why: str) -> SPMFormatError:
    return SPMFormatError(f"{path.name}: {why}")


def _read_header(path: Path, f: BinaryIO, size: int) -> tuple[dict[str, Entry], dict[str, str] | None]:
    """Parse and check a header; no tensor byte is read."""
    try:
        head = f.read(8)
        if len(head) < 8:
            raise _refuse(path, f"file is truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _refuse(path, f"not a safetensors file (header length {n}, file {size} bytes)")
        raw = f.read(n)
    except OSError as e:
        raise _refuse(path, f"cannot read file: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _refuse(path, f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _refuse(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise _refuse(path, "__metadata__ must map strings to strings")
    entries = [_entry(path, k, v, 8 + n, size - 8 - n) for k, v in header.items()]
    entries.sort(key=lambda e: e.begin)
    return {e.name: e for e in entries}, metadata


def _entry(path: Path, key: str, v, start: int, data_len: int) -> Entry:
    if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(path, f"malformed header entry for {key!r}")
    dtype, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
        raise _refuse(path, f"tensor {key!r} has an unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _refuse(path, f"tensor {key!r} has an invalid shape")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
        raise _refuse(path, f"tensor {key!r} has invalid data offsets")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise _refuse(path, f"tensor {key!r} points outside the file (truncated?)")
    if end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
        raise _refuse(path, f"tensor {key!r}: byte size does not match its shape")
    return Entry(key, dtype, tuple(shape), start + begin, end - begin)


# IEEE exponent bits: all set means Inf or NaN. Testing them on an integer view is exact and
# several times faster than torch.isfinite on fp16 on the CPU (which a full bake does ~1e9 times).
_EXPONENT = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
             torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def all_finite(t: torch.Tensor) -> bool:
    """No Inf or NaN in a float tensor, judged in its own dtype."""
    if t.dtype not in _EXPONENT:
        return bool(torch.isfinite(t).all())
    int_dtype, mask = _EXPONENT[t.dtype]
    bits = t.contiguous().view(int_dtype) & mask
    return not bool((bits == mask).any())


def write_tensor(out: BinaryIO, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    if t.numel():
        out.write(t.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class Planned:
    """One output tensor: its header entry and what writes exactly ``nbytes`` of it."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_BYTES[self.dtype]


def header_bytes(plan: Iterable[Planned], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for p in plan:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data must start 8-byte aligned
    return struct.pack("<Q", len(head)) + head


def write_stream(dst: str | os.PathLike, plan: list[Planned], metadata: dict[str, str] | None,
                 *, mode: int | None = None) -> Path:
    """Write a safetensors file tensor by tensor: header first (all offsets known from the
    plan), then each tensor in plan order, to a temporary next to ``dst``; fsync, then publish
    without replacing anything. Any failure (an interrupt included) removes the temporary.
    ``mode``: the new file's permission bits (a temporary is created private, 0600)."""
    dst = Path(dst)
    tempfiles.clean_stale_for(dst)
    fd, tmp = tempfiles.new_file(dst)
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(header_bytes(plan, metadata))
            for p in plan:
                at = out.tell()
                p.write(out)
                if out.tell() - at != p.nbytes:
                    raise SPMFormatError(f"{p.name}: wrote {out.tell() - at} bytes, its header says {p.nbytes}")
            out.flush()
            os.fsync(out.fileno())
        tempfiles.publish(tmp, dst)
    except BaseException:
        tempfiles.discard(tmp)
        raise
    return dst
