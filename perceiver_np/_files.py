"""Atomic file writes, shared by checkpoints, golden files and parameter files."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(file)`` into a fresh temporary file next to ``path``, flush, fsync, rename onto
    ``path``, fsync the directory (where the platform allows). On any failure, KeyboardInterrupt
    included, the temporary file is removed and ``path`` is untouched: a crash mid-save never
    destroys the previous file. The temporary file gets mode 0o666 minus the umask."""
    directory = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp = directory / f".{path.name[:100]}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
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
