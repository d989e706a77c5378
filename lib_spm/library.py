"""The SPM folder: names, listing, loading, and the file operations of the Manage panel.

One :class:`SPMLibrary` owns the folder's state (what is listed, what is loaded); nothing else
caches files. A *name* is the file's path below the folder, posix separators, without
``.safetensors`` (``moderation/nsfw``): the same string the ``<spm:name:strength>`` prompt tag
carries, so a name may hold nothing that leaves the folder or breaks the tag.

Sidecars follow the WebUI's extra networks (``<stem>.png``, ``<stem>.preview.png``, ...,
``<stem>.json``, ``<stem>.txt``, ``<stem>.description.txt``) plus the trainer's
``<stem>.ckpt.safetensors``; rename and delete carry them along.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from .errors import ArchitectureMismatch, SPMError, SPMKeyError, SPMValueError
from .metadata import SPMMetadata
from .safetensors_io import read_file, read_header, write_file
from .spm_file import SPMFile, file_sha256, load_spm, validate

SUFFIX = ".safetensors"
CHECKPOINT_SUFFIX = ".ckpt" + SUFFIX
# The WebUI's find_preview order: <stem>.<ext>, then <stem>.preview.<ext>, for each extension.
PREVIEW_EXTS = ("png", "jpg", "jpeg", "webp", "gif")
PREVIEWS = tuple(s for ext in PREVIEW_EXTS for s in (f".{ext}", f".preview.{ext}"))
SIDECARS = PREVIEWS + (".json", ".txt", ".description.txt", CHECKPOINT_SUFFIX)

MAX_NAME = 200
MAX_PART = 120
MAX_DESCRIPTION = 10_000
_FORBIDDEN = set('\\:<>|"?*')
_BAD_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}  # controls, invisible/bidi marks, line separators
_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)}
_LOADED_MAX = 8  # loaded SPMs kept in memory (an SDXL SPM of rank 1 is ~10 MB)

_FileKey = tuple[int, int, int]  # (mtime_ns, size, inode): an atomic replace changes the inode


@dataclass(frozen=True)
class Entry:
    """One file of the folder as the listing sees it. ``error`` is set when it is no usable SPM."""

    name: str
    path: Path
    targets: tuple[str, ...] = ()  # the concepts gating uses (every slice's, in order)
    surrogates: dict[str, str] = field(default_factory=dict)
    arch: str | None = None
    rank: int | None = None
    alpha: float | None = None
    size_bytes: int = 0
    mtime: float = 0.0
    sha256: str = ""
    description: str = ""
    slices: tuple[str, ...] = ()
    preview: Path | None = None
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # the raw header metadata

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def date(self) -> str:
        return datetime.fromtimestamp(self.mtime).strftime("%Y-%m-%d %H:%M")

    def as_row(self) -> list:
        """name, targets, architecture, rank, size, date, hash: one row of a table."""
        targets = f"error: {self.error}" if self.error else ", ".join(self.targets)
        return [self.name, targets, self.arch or "?", self.rank or "", human_size(self.size_bytes),
                self.date, self.short_hash]


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_name(name: str) -> str:
    """The name itself, or an :class:`SPMValueError` saying why it cannot be one.

    A trailing ``.safetensors`` is forgiven (dropped); everything that could leave the folder,
    break a ``<spm:name:strength>`` tag or trip a filesystem is refused.
    """
    if not isinstance(name, str):
        raise SPMValueError(f"an SPM name must be text, got {type(name).__name__}")
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    shown = repr(name) if len(name) <= 60 else repr(name[:60]) + "..."
    if not name:
        raise SPMValueError("an SPM name cannot be empty")
    if len(name) > MAX_NAME:
        raise SPMValueError(f"SPM name {shown} is longer than {MAX_NAME} characters")
    bad = sorted({c for c in name if c in _FORBIDDEN or unicodedata.category(c) in _BAD_CATEGORIES})
    if bad:
        chars = " ".join(repr(c) for c in bad)
        raise SPMValueError(f"SPM name {shown} contains {chars}; names cannot hold \\ : < > | \" ? * or control characters")
    if name.startswith("/"):
        raise SPMValueError(f"SPM name {shown} is an absolute path; names are relative to the SPM folder")
    for part in name.split("/"):
        if not part:
            raise SPMValueError(f"SPM name {shown} has an empty folder part")
        if part in (".", ".."):
            raise SPMValueError(f"SPM name {shown} has a {part!r} part; names stay inside the SPM folder")
        if part != part.strip(" .") or part != part.strip():
            raise SPMValueError(f"SPM name {shown}: a part cannot begin or end with a space or a dot")
        if len(part) > MAX_PART:
            raise SPMValueError(f"SPM name {shown}: a part is longer than {MAX_PART} characters")
        if part.split(".")[0].upper() in _RESERVED:
            raise SPMValueError(f"SPM name {shown}: {part!r} is a reserved device name on Windows")
    if name.lower().endswith(".ckpt"):
        raise SPMValueError(f"SPM name {shown} ends with .ckpt, which marks training checkpoints")
    return name


def parse_targets(targets: Sequence[str]) -> list[str]:
    """Stripped, de-duplicated targets; refuses empty lists, empty strings and line breaks."""
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise SPMValueError("targets must be a list of strings")
    out: list[str] = []
    for t in targets:
        t = t.strip()
        if not t:
            raise SPMValueError("a target concept cannot be empty")
        if any(unicodedata.category(c) in _BAD_CATEGORIES for c in t):
            raise SPMValueError(f"target {t!r} contains a line break or a control character")
        if t not in out:
            out.append(t)
    if not out:
        raise SPMValueError("an SPM needs at least one target concept")
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _stem(path: Path) -> str:
    return path.name[: -len(SUFFIX)]


def _key(st: os.stat_result) -> _FileKey:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _gating_targets(md: SPMMetadata) -> tuple[str, ...]:
    concepts = md.targets if md.slices is None else [c for s in md.slices for c in s.concepts]
    return tuple(dict.fromkeys(concepts))


class SPMLibrary:
    """The SPM folder. Thread-safe: the UI and generation may use it at once."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._lock = threading.RLock()
        self._entries: dict[Path, tuple[_FileKey, Entry]] = {}
        self._loaded: OrderedDict[Path, tuple[_FileKey, SPMFile]] = OrderedDict()

    # -- names -----------------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The file a name stands for; :class:`SPMValueError` if the name is unsafe."""
        name = check_name(name)
        *folders, last = name.split("/")
        path = self.root.joinpath(*folders, last + SUFFIX)
        if not _inside(path.resolve(), self.root.resolve()):
            raise SPMValueError(f"SPM name {name!r} leads outside the SPM folder (through a link)")
        return path

    def name_of(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return rel[: -len(SUFFIX)]

    def exists(self, name: str) -> bool:
        return self.path_of(name).is_file()

    def unique_name(self, base: str) -> str:
        """``base``, or ``base-1``, ``base-2``... : the first name no file has yet."""
        base = check_name(base)
        name, i = base, 0
        while self.path_of(name).exists():
            i += 1
            name = f"{base}-{i}"
        return name

    # -- listing ---------------------------------------------------------------------------------
    def entries(self, refresh: bool = False) -> list[Entry]:
        """Every SPM below the folder, sorted by name. Unchanged files cost one stat each;
        ``refresh`` re-reads every file."""
        with self._lock:
            if refresh:
                self._entries.clear()
            found = self._scan()
            out = [self._entry(path, st, listing) for path, st, listing in found]
            live = {path for path, _, _ in found}
            for gone in set(self._entries) - live:
                del self._entries[gone]
        return sorted(out, key=lambda e: (e.name.lower(), e.name))

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def get(self, name: str) -> Entry:
        path = self._existing(name)
        with self._lock:
            st = path.stat()
            listing = set(os.listdir(path.parent))
            return self._entry(path, st, listing)

    def _existing(self, name: str) -> Path:
        path = self.path_of(name)
        if not path.is_file():
            raise SPMKeyError(f"no SPM named {check_name(name)!r} in {self.root}")
        return path

    def _scan(self) -> list[tuple[Path, os.stat_result, set[str]]]:
        """(path, stat, names in its folder) of every listable file; links leading out are skipped."""
        root_real = self.root.resolve()
        if not root_real.is_dir():
            return []
        found, seen, stack = [], {root_real}, [self.root]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    items = list(it)
            except OSError:
                continue
            listing = {d.name for d in items}
            for d in items:
                if d.name.startswith("."):
                    continue  # hidden files, and write_file's temporaries
                path = Path(d.path)
                try:
                    if d.is_dir():
                        real = path.resolve()
                        if _inside(real, root_real) and real not in seen:
                            seen.add(real)
                            stack.append(path)
                    elif d.name.endswith(SUFFIX) and not d.name.endswith(CHECKPOINT_SUFFIX) and d.is_file():
                        if d.is_symlink() and not _inside(path.resolve(), root_real):
                            continue
                        found.append((path, d.stat(), listing))
                except OSError:
                    continue  # vanished or unreadable while listing
        return found

    def _entry(self, path: Path, st: os.stat_result, listing: set[str]) -> Entry:
        cached = self._entries.get(path)
        if cached is None or cached[0] != _key(st):
            cached = (_key(st), self._read(path, st))
            self._entries[path] = cached
        stem = _stem(path)
        preview = next((path.with_name(stem + s) for s in PREVIEWS if stem + s in listing), None)
        entry = cached[1]
        return entry if entry.preview == preview else dataclasses.replace(entry, preview=preview)

    def _read(self, path: Path, st: os.stat_result) -> Entry:
        name = self.name_of(path)
        base = dict(name=name, path=path, size_bytes=st.st_size, mtime=st.st_mtime)
        try:
            check_name(name)
            spm = load_spm(path)
        except Exception as e:  # the listing shows a bad file, it never fails because of one
            return self._broken(path, base, e)
        md = spm.metadata
        return Entry(
            **base,
            targets=_gating_targets(md),
            surrogates=dict(md.surrogates),
            arch=spm.arch,
            rank=spm.rank,
            alpha=md.alpha if md.alpha is not None else (next(iter(spm.alphas)) if len(spm.alphas) == 1 else None),
            sha256=spm.sha256 or "",
            description=md.description,
            slices=tuple(s.name for s in spm.slices()),
            metadata=dict(spm.raw_metadata),  # the bytes load_spm read: no second open
        )

    @staticmethod
    def _broken(path: Path, base: dict, error: Exception) -> Entry:
        message = str(error) if isinstance(error, SPMError) else f"{path.name}: cannot read ({error})"
        extra: dict = {}
        try:
            extra["sha256"] = file_sha256(path)
            raw = read_header(path)[1]
            extra["metadata"] = dict(raw)
            md = SPMMetadata.from_dict(raw, path.name)
            extra.update(targets=_gating_targets(md), arch=md.arch, description=md.description)
        except Exception:
            pass  # show what could be read
        return Entry(**base, **extra, error=message)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, name: str, expected_arch: str | None = None) -> SPMFile:
        """The validated SPM (kept while the file is unchanged). Do not mutate the result."""
        path = self._existing(name)
        with self._lock:
            key = _key(path.stat())
            cached = self._loaded.get(path)
            if cached is not None and cached[0] == key:
                self._loaded.move_to_end(path)
                spm = cached[1]
            else:
                spm = load_spm(path)
                self._loaded[path] = (key, spm)
                while len(self._loaded) > _LOADED_MAX:
                    self._loaded.popitem(last=False)
        if expected_arch is not None and spm.arch is not None and spm.arch != expected_arch:
            raise ArchitectureMismatch(f"{path.name} is an {spm.arch} SPM; the model is {expected_arch}")
        return spm

    # -- changing the folder ---------------------------------------------------------------------
    def save(self, spm: SPMFile, name: str, overwrite: bool = False) -> Entry:
        path = self.path_of(name)
        with self._lock:
            if path.exists() and not overwrite:
                raise SPMValueError(f"an SPM named {check_name(name)!r} already exists")
            try:
                spm.save(path, overwrite=overwrite)
            except FileExistsError:
                raise SPMValueError(f"an SPM named {check_name(name)!r} already exists") from None
            self._forget(path)
            return self.get(name)

    def rename(self, old: str, new: str) -> Entry:
        """Move the file and its sidecars; all or nothing, never over an existing file."""
        src = self._existing(old)
        dst = self.path_of(new)
        with self._lock:
            if src == dst:
                raise SPMValueError(f"{check_name(old)!r} already has that name")
            moves = [(src, dst)] + [(s, dst.with_name(_stem(dst) + s.name[len(_stem(src)):]))
                                    for s in self._sidecars(src)]
            taken = [d for _, d in moves if d.exists() or d.is_symlink()]
            if taken:
                raise SPMValueError(f"cannot rename to {check_name(new)!r}: {taken[0].name} already exists")
            created, folder = [], dst.parent  # folders this rename makes, deepest first
            while not folder.exists():
                created.append(folder)
                folder = folder.parent
            done: list[tuple[Path, Path]] = []
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                for s, d in moves:
                    shutil.move(s, d)
                    done.append((s, d))
            except OSError as e:
                for s, d in reversed(done):
                    shutil.move(d, s)
                for d in created:
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                raise SPMValueError(f"cannot rename {check_name(old)!r}: {e.strerror or e}") from None
            self._forget(src)
            self._forget(dst)
            return self.get(new)

    def delete(self, name: str) -> None:
        """Remove the file, then its sidecars (preview, descriptions, training checkpoint)."""
        path = self._existing(name)
        with self._lock:
            sidecars = self._sidecars(path)
            try:
                path.unlink()
            except OSError as e:
                raise SPMValueError(f"cannot delete {check_name(name)!r}: {e.strerror or e}") from None
            finally:
                self._forget(path)
            failed = []
            for s in sidecars:
                try:
                    s.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    failed.append(s.name)
            if failed:
                raise SPMValueError(f"deleted {check_name(name)!r} but could not remove {', '.join(failed)}")

    def edit(self, name: str, *, targets: Sequence[str] | None = None, description: str | None = None) -> Entry:
        """Rewrite the gating targets and/or the description; every tensor stays byte-identical.

        The file is replaced atomically: on any error the original stays as it was.
        """
        path = self._existing(name)
        with self._lock:
            md = copy.deepcopy(self.load(name).metadata)
            if targets is not None:
                md.targets = parse_targets(targets)
                if md.slices is not None:
                    if len(md.slices) > 1:
                        raise SPMValueError(
                            f"{check_name(name)!r} is a pack of {len(md.slices)} slices, each gated by its own "
                            "concepts; merge it again to change them")
                    (s,) = md.slices
                    md.slices = [dataclasses.replace(s, concepts=tuple(md.targets))]
            if description is not None:
                if not isinstance(description, str):
                    raise SPMValueError("the description must be text")
                description = description.strip()
                if len(description) > MAX_DESCRIPTION or "\x00" in description:
                    raise SPMValueError(f"the description must be under {MAX_DESCRIPTION} characters of text")
                md.description = description
            if targets is None and description is None:
                return self.get(name)
            tensors, _ = read_file(path)  # as stored: same keys, dtypes and bytes
            validate(self.load(name).layers, md, path.name)
            try:
                write_file(path, tensors, md.to_dict(), overwrite=True)
            except OSError as e:
                raise SPMValueError(f"cannot rewrite {check_name(name)!r}: {e.strerror or e}") from None
            finally:
                self._forget(path)
            return self.get(name)

    def _sidecars(self, path: Path) -> list[Path]:
        stem = _stem(path)
        return [p for p in (path.with_name(stem + s) for s in SIDECARS) if p.is_file() or p.is_symlink()]

    def _forget(self, path: Path) -> None:
        self._entries.pop(path, None)
        self._loaded.pop(path, None)
