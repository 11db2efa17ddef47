"""Atomic file writes, shared by checkpoints, golden files and parameter files, and the removal
of the temporary files that killed writes leave behind.

A write goes to ``.<name>.<16 hex digits>.tmp`` next to the target, then is renamed onto it. The
writer holds an exclusive ``fcntl.flock`` on that file for as long as it writes, so a cleaner
(:func:`remove_stale_temps`) can tell a live save from the leftover of a killed one: it deletes
only the temporary files it can lock, and the kernel drops the lock of a process that died.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: stale temps are recognised by age instead
    fcntl = None  # type: ignore[assignment]

#: Where ``fcntl.flock`` is unavailable (non-POSIX) or unsupported by the file system, a temporary
#: file counts as stale only when it has not been written for this long. A live save writes its
#: file continuously (and on Windows an open file cannot be deleted at all), so an hour without a
#: write means the writer is gone, with a wide margin for slow disks and huge checkpoints.
STALE_TEMP_AGE_SECONDS = 3600.0

#: A target name longer than this (in bytes) is shortened in its temp's name and told apart by a
#: digest of the whole name: ``.<name>.<16 hex>.tmp`` must fit in 255 bytes (NAME_MAX).
_MAX_NAME_IN_TEMP = 200
#: How often atomic_write makes a new temp when a cleaner deleted its fresh one before it could
#: lock it (a race of microseconds; more than one retry means something else is wrong).
_CREATE_ATTEMPTS = 5


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(file)`` into a fresh temporary file next to ``path``, flush, fsync, rename onto
    ``path``, fsync the directory (where the platform allows). On any failure, KeyboardInterrupt
    included, the temporary file is removed and ``path`` is untouched: a crash mid-save never
    destroys the previous file. The temporary file gets mode 0o666 minus the umask.

    The temporary file is exclusively ``flock``-ed while it is written. Before writing, stale
    temporary files of ``path`` (those of earlier writes that were killed) are removed with
    :func:`remove_stale_temps`; those of writes still running in other processes are kept."""
    path = Path(path)
    directory = path.parent
    remove_stale_temps(path)
    fd, tmp = _create_locked_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:  # closing it releases the lock
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # renamed while still locked: no cleaner can take it first
                os.replace(tmp, path)
        if fcntl is None:  # Windows cannot rename a file that is open
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed ``np.savez`` of ``arrays``, written with :func:`atomic_write`."""

    def write(f: IO[bytes]) -> None:
        savez: Any = np.savez  # looked up at call time; typed Any: names may not be kwargs
        savez(f, **arrays)

    atomic_write(path, write)


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls of ``path`` left behind,
    and return the paths deleted. Never raises: whatever cannot be listed, opened, locked or
    deleted is left alone.

    Only temporary files of this target are candidates (``.<name>.<16 hex>.tmp``; not those of
    other files in the directory). Each is opened and locked with a non-blocking exclusive
    ``flock``: a file whose writer is alive stays locked and is kept; a killed writer's lock was
    released by the kernel, so its file is deleted. Without ``flock`` (non-POSIX, or a file system
    without locks) a candidate is deleted only when it was last written more than
    :data:`STALE_TEMP_AGE_SECONDS` ago."""
    path = Path(path)
    pattern = re.compile(re.escape(_temp_prefix(path.name)) + r"[0-9a-f]{16}\.tmp")
    try:
        with os.scandir(path.parent) as it:
            names = sorted(e.name for e in it if pattern.fullmatch(e.name))
    except OSError:
        return []
    removed = []
    for name in names:
        candidate = path.parent / name
        if _remove_if_stale(candidate):
            removed.append(candidate)
    return removed


def _temp_prefix(name: str) -> str:
    """``.<name>.``, or for a long name ``.<its first bytes>~<digest of all of it>.``."""
    if len(os.fsencode(name)) <= _MAX_NAME_IN_TEMP:
        return f".{name}."
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    short = name
    while len(os.fsencode(short)) > 100:
        short = short[:-1]
    return f".{short}~{digest}."


def _new_temp_path(path: Path) -> Path:
    return path.parent / f"{_temp_prefix(path.name)}{secrets.token_hex(8)}.tmp"


def _create_locked_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file for ``path``, opened for writing and exclusively locked.

    A cleaner in another process may lock and delete the file between its creation and our
    lock; then the name no longer leads to our file, and a new one is made."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_CREATE_ATTEMPTS):
        tmp = _new_temp_path(path)
        fd = os.open(tmp, flags, 0o666)
        try:
            if _lock_fresh(fd, tmp):
                return fd, tmp
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, f"could not create a temporary file next to {path}: each was "
                  f"deleted before it could be locked ({_CREATE_ATTEMPTS} attempts)")


def _lock_fresh(fd: int, tmp: Path) -> bool:
    """Lock our new file (blocking: a cleaner holds a lock for microseconds). False when a
    cleaner deleted it first."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return True  # no locks on this file system: cleaners fall back to the file's age
        raise
    try:
        now = os.stat(tmp)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_if_stale(candidate: Path) -> bool:
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(candidate, flags)
    except OSError:
        return False  # gone already, a directory, a symlink, or not ours to touch
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if not _stale(fd, st):
            return False
        try:
            now = os.stat(candidate, follow_symlinks=False)
        except OSError:
            return False
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # the name was taken by another file since it was opened
        os.unlink(candidate)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases our lock


def _stale(fd: int, st: os.stat_result) -> bool:
    """Whether the open candidate's writer is gone: we get its lock (and keep it until the fd is
    closed), or, without locks, it has not been written for STALE_TEMP_AGE_SECONDS."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False  # a live writer holds it
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                return False
    return time.time() - st.st_mtime > STALE_TEMP_AGE_SECONDS
