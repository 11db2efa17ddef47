"""Freed memory kept for reuse: glibc's malloc told not to hand large blocks back at once.

::

    perceiver_np.memory.keep_freed_memory()   # explicit (Linux with glibc); nothing on import
    perceiver_np.runtime.tune()               # the same, unless PERCEIVER_NP_KEEP_MEMORY=0

By default glibc serves every allocation above an adaptive threshold (128 KiB to 32 MiB) with a
fresh ``mmap`` and unmaps it on ``free``, and trims the heap's free top. A model's forward and
backward allocate and free activations of tens to hundreds of MiB on every call, so each call
faults its memory in afresh, page by page, and the kernel zeroes it (docs/fast.md has the
measurement; benchmarks/bench_model.py measures torch with and without the setting). With
:func:`keep_freed_memory`, blocks up to 1 GiB come from the heap and freed memory stays mapped
for the next call: the process's resident size then stays near its high-water mark instead of
falling back between calls. The peak is unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

ENV = "PERCEIVER_NP_KEEP_MEMORY"
#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations up to this size come from the heap (mallopt takes an int: at most 2**31 - 1).
MMAP_THRESHOLD = 1 << 30
#: Free memory at the heap's top is returned to the system only beyond this.
TRIM_THRESHOLD = 2**31 - 1
#: glibc's own defaults, restored by ``keep_freed_memory(False)`` (its adaptive threshold,
#: once a value is set, does not come back).
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_TRIM_THRESHOLD = 128 * 1024

keeping = False  # whether this process has applied keep_freed_memory(True)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory(enable: bool = True) -> bool:
    """Keep (``True``) or return (``False``) freed memory; returns whether glibc accepted it
    (``False`` without glibc, where nothing changes)."""
    global keeping
    libc = _libc()
    if libc is None:
        return False
    mmap_t, trim_t = ((MMAP_THRESHOLD, TRIM_THRESHOLD) if enable
                      else (_DEFAULT_MMAP_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_t)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_t))
    keeping = enable and ok
    return ok
