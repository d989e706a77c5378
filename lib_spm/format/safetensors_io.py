"""Checked safetensors I/O: every byte of the header is validated before any tensor is read.

The safetensors library already refuses code execution; what it does not give is a clear,
specific message for each way a file can be bad, nor a guarantee that a failed write leaves the
user's existing file alone. This module adds both, and reads each file through one descriptor:
header, tensors and hash come from the same bytes even while another process ``os.replace``s it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from ..errors import SPMFormatError, SPMValueError
from ..operations import tempfiles
from . import strict_json
from .strict_json import show

# An SPM header is a few hundred KiB even for an SDXL pack of many concepts.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_DIMS = 8  # no model weight has more; bounds the work of judging a shape

DTYPES = {
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
}

_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data start
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A judged header: the tensors in file order, the metadata, and where the data starts."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    prefix: bytes  # the length field and the JSON exactly as read: hashed before the data

    def as_dict(self) -> dict[str, dict]:
        return {k: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
                for k, e in self.entries.items()}


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise SPMFormatError(
            f"{path.name}: only .safetensors files are accepted (pickled .ckpt/.pt/.bin files can run code)"
        )


def _refuse_pickle(path: Path, head: bytes) -> None:
    # Only once the bytes failed as safetensors: a valid header length can begin with b"\x80\x02".
    if head.startswith(_PICKLE_MAGICS):
        raise SPMFormatError(f"{path.name}: this is a pickle/zip checkpoint renamed to .safetensors; refused")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path) -> tuple[int, int]:
    """An fd open for reading on a regular file, and its size; special files are never opened.

    ``stat`` first, so a FIFO or device is refused without an open (opening one can block or have
    side effects); ``O_NONBLOCK`` and an ``fstat`` of the opened fd as well, for a path that was
    swapped for a special file in between.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SPMFormatError(f"{path.name}: is {_kind(st.st_mode)}, not a file; refused unopened")
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except OSError as e:
        raise SPMFormatError(f"{path.name}: cannot read file: {e.strerror or e}") from None
    except ValueError:  # a NUL in the path
        raise SPMFormatError(f"{show(path.name)}: not a usable file name") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SPMFormatError(f"{path.name}: is {_kind(st.st_mode)}, not a file; refused")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SPMFormatError(f"{path.name}: file is shorter than it was a moment ago (changed while reading?)")
    return data


def _judge_header(path: Path, f: BinaryIO, size: int) -> Header:
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
    raw = _read_exact(f, n, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _refuse_pickle(path, head)
        raise SPMFormatError(f"{path.name}: header is not valid JSON (UnicodeDecodeError)") from None
    try:
        header = strict_json.loads(text, f"{path.name}: header")
    except SPMFormatError:
        if not text.lstrip().startswith("{"):  # a JSON object that went wrong is no pickle
            _refuse_pickle(path, head)
        raise
    if not isinstance(header, dict):
        raise SPMFormatError(f"{path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SPMFormatError(f"{path.name}: __metadata__ must map strings to strings")
    entries = {key: _judge_entry(path, key, entry) for key, entry in header.items()}
    _judge_layout(path, entries, size - 8 - n)
    return Header(entries, metadata, 8 + n, head + raw)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _judge_entry(path: Path, key: str, entry) -> TensorEntry:
    shown = show(key)
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SPMFormatError(f"{path.name}: malformed header entry for {shown}")
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        what = show(dtype) if isinstance(dtype, str) else f"a JSON {strict_json.type_name(dtype)}"
        raise SPMFormatError(f"{path.name}: tensor {shown} has dtype {what}; SPMs are F16/BF16/F32/F64")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape)):
        raise SPMFormatError(f"{path.name}: tensor {shown} has an invalid shape")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
        raise SPMFormatError(f"{path.name}: tensor {shown} has invalid data offsets")
    return TensorEntry(dtype, tuple(shape), offs[0], offs[1])


def _judge_layout(path: Path, entries: dict[str, TensorEntry], data_len: int) -> None:
    """Tensors tile the data exactly, as the safetensors library itself requires.

    Bytes after the last tensor are refused by size, unread: a file much larger than its header
    declares (an SPM followed by a gigabyte of zeros) costs nothing to judge.
    """
    for key, e in entries.items():
        if not 0 <= e.begin <= e.end <= data_len:
            raise SPMFormatError(f"{path.name}: tensor {show(key)} points outside the file (truncated?)")
        if e.end - e.begin != e.numel * DTYPES[e.dtype][1]:
            raise SPMFormatError(f"{path.name}: tensor {show(key)}: byte size does not match its shape")
    spans = sorted((e.begin, e.end, k) for k, e in entries.items())
    pos, prev = 0, None
    for begin, end, key in spans:
        if begin < pos:
            raise SPMFormatError(f"{path.name}: tensors {show(prev)} and {show(key)} overlap")
        if begin > pos:
            raise SPMFormatError(f"{path.name}: {begin - pos} unused bytes before tensor {show(key)}")
        pos, prev = end, key
    if pos != data_len:
        raise SPMFormatError(
            f"{path.name}: {data_len - pos} bytes follow the last tensor; a safetensors file ends with its "
            "data (refused unread)")


@contextmanager
def open_checked(path: str | os.PathLike) -> Iterator[tuple[BinaryIO, Header]]:
    """Open once and judge the header; yield the open file (positioned at the data) and the header.

    Read the tensors with :func:`read_tensors` from the same file object, so that header, data and
    hash all come from one version of the file.
    """
    path = Path(path)
    _check_suffix(path)
    fd, size = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        try:
            header = _judge_header(path, f, size)
        except OSError as e:
            raise SPMFormatError(f"{path.name}: cannot read file: {e.strerror or e}") from None
        yield f, header


def read_tensors(f: BinaryIO, header: Header, where: str, hasher=None, keys=None) -> dict[str, torch.Tensor]:
    """The declared byte ranges only, each into its own buffer; ``hasher`` sees the prefix and data."""
    if hasher is not None:
        hasher.update(header.prefix)
    out = {}
    try:
        f.seek(header.data_start)
        for key, e in sorted(header.entries.items(), key=lambda kv: kv[1].begin):
            buf = bytearray(e.end - e.begin)
            if f.readinto(buf) != len(buf):
                raise SPMFormatError(f"{where}: file is shorter than it was a moment ago (changed while reading?)")
            if hasher is not None:
                hasher.update(buf)
            if keys is None or key in keys:
                dtype = DTYPES[e.dtype][0]
                t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                out[key] = t.reshape(e.shape)
    except OSError as e:
        raise SPMFormatError(f"{where}: cannot read file: {e.strerror or e}") from None
    return out


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Return (tensor entries, metadata, data start) after validating the header completely.

    Reads the header only: listing a folder of large files costs their headers, not their data.
    """
    with open_checked(path) as (_, header):
        return header.as_dict(), dict(header.metadata), header.data_start


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors (into memory; no handle stays open) and the metadata of a checked file."""
    path = Path(path)
    with open_checked(path) as (f, header):
        tensors = read_tensors(f, header, path.name)
    return tensors, dict(header.metadata)


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
