"""Temporary files and folders that are written next to their destination, then published.

Every temporary is named ``.<destination name>.<pid>-<8 random>.spm-tmp``: hidden, so listings
skip it; recognisable, so a later run can tell its own leftovers (from a ``kill -9`` or a power
cut mid-write) from anything a user keeps; and carrying the writer's process id, so it can tell a
dead writer's leftover from a live writer's work.

A temporary is stale, and :func:`clean_stale` removes it, when it matches that pattern exactly and

- its writer's process is gone (checked on POSIX only) and nothing in it changed for
  ``GRACE_S`` (one minute: a writer in another PID namespace sharing the folder, a container,
  looks dead from here, but a live writer keeps touching its file), or
- nothing in it changed for ``ABANDONED_S`` (a day), whoever wrote it: the writer's PID may have
  been reused, or (Windows) cannot be checked.

Nothing else is ever removed: not other hidden files, not the destination, not a temporary of
another name.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

SUFFIX = ".spm-tmp"
GRACE_S = 60.0
ABANDONED_S = 24 * 3600.0
_RANDOM = 8  # characters tempfile puts between prefix and suffix
_PATTERN = re.compile(r"\.(?P<dest>.+)\.(?P<pid>[0-9]{1,10})-[a-z0-9_]{%d}%s" % (_RANDOM, re.escape(SUFFIX)))
# bytes a temporary's name adds to its destination's: ".", ".", pid (<= 10 digits), "-", random, suffix
EXTRA_NAME_BYTES = 2 + 10 + 1 + _RANDOM + len(SUFFIX)


def _prefix(dst: Path) -> str:
    return f".{dst.name}.{os.getpid()}-"


def new_file(dst: str | os.PathLike) -> tuple[int, Path]:
    """(open fd, path) of a fresh temporary next to ``dst``, created exclusively."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(dst), suffix=SUFFIX, dir=dst.parent)
    return fd, Path(tmp)


def new_folder(dst: str | os.PathLike) -> Path:
    """A fresh, empty temporary folder next to ``dst`` (never an existing one)."""
    dst = Path(dst)
    return Path(tempfile.mkdtemp(prefix=_prefix(dst), suffix=SUFFIX, dir=dst.parent))


def owner(name: str) -> tuple[str, int] | None:
    """(destination name, writer pid) when ``name`` is one of our temporaries, else None."""
    m = _PATTERN.fullmatch(name)
    return (m["dest"], int(m["pid"])) if m else None


def _process_gone(pid: int) -> bool | None:
    """True/False where it can be known; None where it cannot (Windows: os.kill would kill)."""
    if os.name != "posix":
        return None
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; no process has so large an id
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _last_change(path: Path) -> float:
    """Newest mtime in ``path`` (itself, or anything under it for a folder); links not followed."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
                except OSError:
                    pass
    return newest


def is_stale(path: Path, now: float | None = None) -> bool:
    found = owner(path.name)
    if found is None:
        return False
    try:
        age = (time.time() if now is None else now) - _last_change(path)
    except OSError:
        return False
    if age >= ABANDONED_S:
        return True
    return age >= GRACE_S and _process_gone(found[1]) is True


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return False  # another cleaner was first
    except OSError:
        return False  # not ours to force: leave it


def clean_stale(folder: str | os.PathLike, dest_name: str | None = None) -> list[Path]:
    """Remove the stale temporaries in ``folder`` (only those for ``dest_name`` when given).

    Returns what was removed. Never raises for a folder that cannot be read.
    """
    folder = Path(folder)
    removed = []
    try:
        with os.scandir(folder) as it:
            names = [d.name for d in it if d.name.endswith(SUFFIX)]
    except OSError:
        return removed
    for name in names:
        found = owner(name)
        if found is None or (dest_name is not None and found[0] != dest_name):
            continue
        path = folder / name
        if is_stale(path) and _remove(path):
            removed.append(path)
    return removed


def clean_stale_for(dst: str | os.PathLike) -> list[Path]:
    """What a write to ``dst`` calls first: its own stale temporaries, from runs that died."""
    dst = Path(dst)
    return clean_stale(dst.parent, dst.name)


def publish(tmp: Path, dst: Path) -> None:
    """Move a finished temporary to ``dst``, never replacing anything there.

    A hard link is the one portable no-replace rename; where the file system has none (FAT,
    some network shares) the fallback checks first, which leaves a moment's race.
    """
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "appeared while writing; left untouched", str(dst)) from None
    except OSError:
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "appeared while writing; left untouched", str(dst)) from None
        os.rename(tmp, dst)
        return
    os.unlink(tmp)


def publish_folder(tmp: Path, dst: Path) -> None:
    """Move a finished temporary folder to ``dst`` if nothing is there (a rename would replace
    an empty folder on POSIX; the check leaves a moment's race, no portable call closes it)."""
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "appeared while writing; left untouched", str(dst))
    os.rename(tmp, dst)


def discard(path: Path) -> None:
    """Remove a temporary this run made (a failed write); quiet when it is already gone."""
    _remove(path)
