"""The SPM folder: names, listing, loading, and the file operations of the Manage panel.

One :class:`SPMLibrary` owns the folder's state (what is listed, what is loaded); nothing else
caches files. A *name* is the file's path below the folder, posix separators, without
``.safetensors`` (``moderation/nsfw``): the same string the ``<spm:name:strength>`` prompt tag
carries, so a name may hold nothing that leaves the folder or breaks the tag.

Names are Unicode NFC: a file spelled in another form (NFD, as some macOS tools write) answers to
its NFC name; when two files spell one name, the listing shows one entry, the NFC-spelled file if
there is one (it is the one the name opens), with an error saying so. A name's longest file name
(a sidecar's hidden temporary) must fit the file system's limit in bytes, checked before anything
is created, and Windows device names (``CON``, ``COM¹``, ``CONIN$``...) are refused on every host.

Sidecars follow the WebUI's extra networks (``<stem>.png``, ``<stem>.preview.png``, ...,
``<stem>.json``, ``<stem>.txt``, ``<stem>.description.txt``) plus the trainer's
``<stem>.ckpt.safetensors``. One file can be claimed by two SPMs (``x.preview.png`` is a preview of
``x`` and of ``x.preview``): :func:`sidecar_claims` says who claims what. A file is shown for its
longest claimant (the WebUI's own lookup finds it first for that one); rename and delete carry along
or remove only files that no other SPM claims, so they never lose a file another SPM may own.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import stat
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from ..errors import ArchitectureMismatch, SPMError, SPMFolderError, SPMKeyError, SPMNameError, SPMValueError
from ..format.metadata import SPMMetadata
from ..format.safetensors_io import read_file, read_header, write_file
from ..format.spm_file import SPMFile, file_sha256, load_spm, validate
from . import tempfiles

SUFFIX = ".safetensors"
CHECKPOINT_SUFFIX = ".ckpt" + SUFFIX
# The WebUI's find_preview order: <stem>.<ext>, then <stem>.preview.<ext>, for each extension.
PREVIEW_EXTS = ("png", "jpg", "jpeg", "webp", "gif")
PREVIEWS = tuple(s for ext in PREVIEW_EXTS for s in (f".{ext}", f".preview.{ext}"))
SIDECARS = PREVIEWS + (".json", ".txt", ".description.txt", CHECKPOINT_SUFFIX)

MAX_NAME = 200
MAX_PART = 120
MAX_DESCRIPTION = 10_000
# One file name on ext4, btrfs, XFS, APFS and NTFS (NTFS counts UTF-16 units, never more than UTF-8 bytes).
NAME_MAX_BYTES = 255
# Each file a name makes gets a hidden temporary next to it while it is written atomically
# (lib_spm/operations/tempfiles.py: ".<file>.<pid>-<random>.spm-tmp").
TEMP_RESERVE = tempfiles.EXTRA_NAME_BYTES
_DERIVED_BYTES = max(len(s.encode()) for s in (SUFFIX, *SIDECARS)) + TEMP_RESERVE  # 17 + 29
_FORBIDDEN = set('\\:<>|"?*')
_BAD_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}  # controls, invisible/bidi marks, line separators
# Windows device names: any case, any extension, and the superscript digits Windows also maps.
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    d + i for d in ("COM", "LPT") for i in "0123456789\u00b9\u00b2\u00b3"}
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
        try:
            return datetime.fromtimestamp(self.mtime).strftime("%Y-%m-%d %H:%M")
        except (OverflowError, OSError, ValueError):  # a file dated beyond what the platform can show
            return "?"

    def as_row(self) -> list:
        """name, targets, architecture, rank, size, date, hash: one row of a table."""
        targets = f"error: {self.error}" if self.error else ", ".join(self.targets) or UNGATED
        return [self.name, targets, self.arch or "?", self.rank or "", human_size(self.size_bytes),
                self.date, self.short_hash]


UNGATED = "(none: ungated, acts on every prompt)"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 60 else repr(name[:60]) + "..."


def check_name(name: str, name_max: int = NAME_MAX_BYTES) -> str:
    """The name in Unicode NFC, or an :class:`SPMNameError` saying why it cannot be one.

    A trailing ``.safetensors`` is forgiven (dropped); everything that could leave the folder,
    break a ``<spm:name:strength>`` tag or trip a filesystem is refused. ``name_max`` is the
    folder's limit on one file name, in bytes.
    """
    if not isinstance(name, str):
        raise SPMNameError(f"an SPM name must be text, got {type(name).__name__}")
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    shown = _shown(name)
    if not name:
        raise SPMNameError("an SPM name cannot be empty")
    if len(name) > MAX_NAME:
        raise SPMNameError(f"SPM name {shown} is longer than {MAX_NAME} characters")
    bad = sorted({c for c in name if c in _FORBIDDEN or unicodedata.category(c) in _BAD_CATEGORIES})
    if bad:
        chars = " ".join(repr(c) for c in bad)
        raise SPMNameError(f"SPM name {shown} contains {chars}; names cannot hold \\ : < > | \" ? * or control characters")
    name = unicodedata.normalize("NFC", name)  # after the surrogate check: normalising needs valid text
    shown = _shown(name)
    if name.startswith("/"):
        raise SPMNameError(f"SPM name {shown} is an absolute path; names are relative to the SPM folder")
    limit = name_max - _DERIVED_BYTES
    for part in name.split("/"):
        if not part:
            raise SPMNameError(f"SPM name {shown} has an empty folder part")
        if part in (".", ".."):
            raise SPMNameError(f"SPM name {shown} has a {part!r} part; names stay inside the SPM folder")
        if part != part.strip(" .") or part != part.strip():
            raise SPMNameError(f"SPM name {shown}: a part cannot begin or end with a space or a dot")
        if len(part) > MAX_PART:
            raise SPMNameError(f"SPM name {shown}: a part is longer than {MAX_PART} characters")
        size = len(part.encode("utf-8"))
        if size > limit:
            raise SPMNameError(
                f"SPM name {shown}: a part is {size} bytes in UTF-8, over the {limit} that leave room for "
                f"its sidecar and temporary file names within the folder's {name_max}-byte limit")
        if part.split(".")[0].rstrip(" ").upper() in _RESERVED:
            raise SPMNameError(f"SPM name {shown}: {part!r} is a reserved device name on Windows")
    if name.lower().endswith(".ckpt"):
        raise SPMNameError(f"SPM name {shown} ends with .ckpt, which marks training checkpoints")
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


def _is_spm_file(filename: str) -> bool:
    """Whether a file name in the folder is one the listing shows as an SPM."""
    return filename.endswith(SUFFIX) and not filename.endswith(CHECKPOINT_SUFFIX) and not filename.startswith(".")


def sidecar_claims(filename: str, listing: Collection[str]) -> tuple[str, ...]:
    """The stems of the SPMs in a folder (``listing``: the names in it) that claim ``filename`` as a
    sidecar, longest first: ``x.preview.png`` is claimed by ``x.preview`` (as ``.png``) and by
    ``x`` (as ``.preview.png``) when both SPMs exist."""
    stems = {filename[: -len(s)] for s in SIDECARS if filename.endswith(s) and len(filename) > len(s)}
    return tuple(sorted((t for t in stems if _is_spm_file(t + SUFFIX) and t + SUFFIX in listing),
                        key=len, reverse=True))


def sidecars_of(stem: str, listing: Collection[str], *, alone: bool, suffixes: Sequence[str] = SIDECARS) -> list[str]:
    """The sidecar names of SPM ``stem`` present in ``listing``, in ``suffixes`` order. With ``alone``,
    only the files no other SPM claims (what rename and delete may move or remove); without, the
    files it is the longest claimant of (what it shows)."""
    out = []
    for s in suffixes:
        claims = sidecar_claims(stem + s, listing) if stem + s in listing else ()
        if claims and claims[0] == stem and (len(claims) == 1 or not alone):
            out.append(stem + s)
    return out


@contextmanager
def _folder_errors(action: str, name: str) -> Iterator[None]:
    """Turn a failed file operation into a one-line :class:`SPMFolderError`."""
    try:
        yield
    except OSError as e:
        where = f" ({Path(e.filename).name})" if e.strerror and e.filename else ""
        raise SPMFolderError(f"cannot {action} {_shown(name)}: {e.strerror or e}{where}") from None


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
        """The file a name stands for; :class:`SPMNameError` if the name is unsafe."""
        name = check_name(name, self._name_max())
        path = self._spelled(name)
        try:
            inside = _inside(path.resolve(), self.root.resolve())
        except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13)
            raise SPMNameError(f"SPM name {_shown(name)} cannot be resolved: {e}") from None
        if not inside:
            raise SPMNameError(f"SPM name {_shown(name)} leads outside the SPM folder (through a link)")
        return path

    def name_of(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return unicodedata.normalize("NFC", rel[: -len(SUFFIX)])

    def exists(self, name: str) -> bool:
        path = self.path_of(name)
        with _folder_errors("look up", name):
            return path.is_file()

    def _name_max(self) -> int:
        """The folder's limit on one file name in bytes (some encrypted file systems allow 143)."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return min(NAME_MAX_BYTES, os.pathconf(folder, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
            return NAME_MAX_BYTES

    def _spelled(self, name: str) -> Path:
        """The path of an NFC ``name`` as the folder spells it: the NFC spelling when it exists,
        else the one file or folder whose name normalises to it (two such: refused)."""
        *folders, last = name.split("/")
        path = self.root
        for part in (*folders, last + SUFFIX):
            exact = path / part
            if os.path.lexists(exact):
                path = exact
                continue
            try:
                spellings = [n for n in os.listdir(path) if unicodedata.normalize("NFC", n) == part]
            except OSError:  # the folder does not exist yet, or is no folder
                spellings = []
            if len(spellings) > 1:
                raise SPMNameError(f"SPM name {_shown(name)}: {len(spellings)} files spell {part!r} in different "
                                   "Unicode forms; rename or remove all but one outside the WebUI")
            path = path / (spellings[0] if spellings else part)
        return path

    def unique_name(self, base: str) -> str:
        """``base``, or ``base-1``, ``base-2``... : the first name no file has yet."""
        base = check_name(base)
        name, i = base, 0
        while os.path.lexists(self.path_of(name)):
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
            spellings: dict[str, list] = {}
            for item in found:
                spellings.setdefault(self.name_of(item[0]), []).append(item)
            out = [self._one_of(name, group) for name, group in spellings.items()]
            live = {path for path, _, _ in found}
            for gone in set(self._entries) - live:
                del self._entries[gone]
        return sorted(out, key=lambda e: (e.name.lower(), e.name))

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def get(self, name: str) -> Entry:
        path = self._existing(name)
        with self._lock, _folder_errors("read", name):
            st = path.stat()
            listing = set(os.listdir(path.parent))
            return self._entry(path, st, listing)

    def _existing(self, name: str) -> Path:
        path = self.path_of(name)
        with _folder_errors("read", name):
            found = path.is_file()
        if not found:
            raise SPMKeyError(f"no SPM named {_shown(check_name(name))} in the SPM folder")  # no server path for API clients
        return path

    def _one_of(self, name: str, spellings: list) -> Entry:
        """The entry of a name that one or more files spell (NFC and NFD): the NFC-spelled file
        answers to the name (see :meth:`path_of`), and a second spelling is flagged."""
        spellings.sort(key=lambda item: (item[0].relative_to(self.root).as_posix() != name + SUFFIX, str(item[0])))
        entry = self._entry(*spellings[0])
        if len(spellings) == 1:
            return entry
        return dataclasses.replace(entry, error=(
            f"{len(spellings)} files spell the name {_shown(name)} in different Unicode forms (NFC/NFD); "
            "rename or remove all but one outside the WebUI"))

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
                    elif _is_spm_file(d.name) and d.is_file():
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
        preview = self._preview(path, listing)
        entry = cached[1]
        return entry if entry.preview == preview else dataclasses.replace(entry, preview=preview)

    def _preview(self, path: Path, listing: set[str]) -> Path | None:
        """The first preview the SPM shows (the WebUI's order) that is a file inside the folder:
        a link leading out is never handed to the page."""
        root = self.root.resolve()
        for f in sidecars_of(_stem(path), listing, alone=False, suffixes=PREVIEWS):
            candidate = path.with_name(f)
            try:
                real = candidate.resolve()
                if _inside(real, root) and real.is_file():
                    return candidate
            except (OSError, RuntimeError):  # a link loop or an unreadable link
                continue
        return None

    def _read(self, path: Path, st: os.stat_result) -> Entry:
        name = self.name_of(path)
        base = dict(name=name, path=path, size_bytes=st.st_size, mtime=st.st_mtime)
        try:
            check_name(name)
            spm = load_spm(path)
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
        except Exception as e:  # the listing shows a bad file, it never fails because of one
            return self._broken(path, base, e)

    @staticmethod
    def _broken(path: Path, base: dict, error: Exception) -> Entry:
        """What could be read of a file that is no usable SPM, with its error as one line."""
        if isinstance(error, SPMError):
            message = str(error)
        elif isinstance(error, RecursionError):
            message = f"{path.name}: cannot read (nested too deeply)"
        else:
            message = f"{path.name}: cannot read ({type(error).__name__}: {error})"
        message = " ".join(message.split())[:1000]  # one line, whatever the error said
        extra: dict = {}
        try:
            extra["sha256"] = file_sha256(path)
            raw = read_header(path)[1]
            extra["metadata"] = dict(raw)
            md = SPMMetadata.from_dict(raw, path.name)
            extra.update(targets=tuple(str(t) for t in _gating_targets(md)), arch=md.arch,
                         description=str(md.description))
        except Exception:
            pass  # show what could be read
        return Entry(**base, **extra, error=message)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, name: str, expected_arch: str | None = None) -> SPMFile:
        """The validated SPM (kept while the file is unchanged). Do not mutate the result."""
        path = self._existing(name)
        with self._lock:
            with _folder_errors("read", name):
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
        name = check_name(name)
        with self._lock:
            with _folder_errors("save", name):
                if os.path.lexists(path) and not overwrite:
                    raise SPMValueError(f"an SPM named {_shown(name)} already exists")
                try:
                    spm.save(path, overwrite=overwrite)
                except FileExistsError as e:
                    if e.filename is not None:  # a folder of the name is a file: not this SPM
                        raise
                    raise SPMValueError(f"an SPM named {_shown(name)} already exists") from None
                finally:
                    self._forget(path)
            return self.get(name)

    def rename(self, old: str, new: str) -> Entry:
        """Move the file and the sidecars only it claims; all or nothing, never over an existing file."""
        src = self._existing(old)
        dst = self.path_of(new)
        old, new = check_name(old), check_name(new)
        with self._lock:
            if src == dst:
                raise SPMValueError(f"{_shown(old)} already has that name")
            with _folder_errors("rename", old):
                moves = [(src, dst)] + [(s, dst.with_name(_stem(dst) + s.name[len(_stem(src)):]))
                                        for s in self._sidecars(src)]
                taken = [d for _, d in moves if os.path.lexists(d)]
            if taken:
                raise SPMValueError(f"cannot rename to {_shown(new)}: {taken[0].name} already exists")
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
                raise SPMFolderError(f"cannot rename {_shown(old)}: {e.strerror or e}") from None
            finally:
                self._forget(src)
                self._forget(dst)
            return self.get(new)

    def delete(self, name: str) -> None:
        """Remove the file, then the sidecars only it claims (preview, descriptions, checkpoint)."""
        path = self._existing(name)
        name = check_name(name)
        with self._lock:
            with _folder_errors("delete", name):
                sidecars = self._sidecars(path)
                try:
                    path.unlink()
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
                raise SPMFolderError(f"deleted {_shown(name)} but could not remove {', '.join(failed)}")

    def edit(self, name: str, *, targets: Sequence[str] | None = None, description: str | None = None) -> Entry:
        """Rewrite the gating targets and/or the description; every tensor stays byte-identical.

        The file is replaced atomically, keeping its permissions: on any error the original stays
        as it was. A link inside the folder is written through, so it stays a link.
        """
        path = self._existing(name)
        name = check_name(name)
        with self._lock:
            md = copy.deepcopy(self.load(name).metadata)
            if targets is not None:
                md.targets = parse_targets(targets)
                if md.slices is not None:
                    if len(md.slices) > 1:
                        raise SPMValueError(
                            f"{_shown(name)} is a pack of {len(md.slices)} slices, each gated by its own "
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
            with _folder_errors("rewrite", name):
                real = path.resolve()
                mode = stat.S_IMODE(real.stat().st_mode)
                try:
                    write_file(real, tensors, md.to_dict(), overwrite=True)
                finally:
                    self._forget(path)
                # the atomic writer's temporary is created 0600; give the new file the old one's mode
                os.chmod(real, mode)
            return self.get(name)

    def _sidecars(self, path: Path) -> list[Path]:
        """The sidecars rename and delete carry: files (or links) no other SPM claims."""
        listing = set(os.listdir(path.parent))
        found = [path.with_name(f) for f in sidecars_of(_stem(path), listing, alone=True)]
        return [p for p in found if p.is_symlink() or p.is_file()]

    def _forget(self, path: Path) -> None:
        self._entries.pop(path, None)
        self._loaded.pop(path, None)
