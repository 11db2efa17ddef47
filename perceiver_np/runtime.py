"""Process-wide tuning, only when asked for: importing perceiver_np changes nothing process-wide.

::

    import perceiver_np
    perceiver_np.runtime.tune()          # what the CLI and the benchmarks do first
    perceiver_np.runtime.tune(threads=2, keep_memory=False)
    perceiver_np.runtime.tune(blas="mkl")   # the kernels' products on MKL (pip install 'perceiver_np[mkl]')
    perceiver_np.runtime.tune(blas="auto")  # on the BLAS kernels.blas.preferred() names for this CPU

:func:`tune` makes up to four process-wide settings (docs/fast.md has the diagnosis;
docs/performance.md the benchmark's figures):

- ``threads``: Numba's pool and every BLAS pool use that many threads
  (:func:`perceiver_np.threads.set_num_threads`); default ``PERCEIVER_NP_NUM_THREADS`` if set.
- ``passive_wait`` (off by default): Numba's OpenMP pool is started with
  ``OMP_WAIT_POLICY=PASSIVE``, so its threads sleep at once after each kernel instead of
  spinning a while first (libgomp's default). For a process that also runs other thread pools
  (OpenMP or BLAS threads of another library) between perceiver_np's kernels: a spinning pool
  takes their cores. perceiver_np's own products run on Numba's pool, so its engine is faster
  with the default (docs/fast.md). libgomp reads the variable once, when it is loaded; ``tune``
  sets it, starts Numba's pool, and puts ``os.environ`` back as it was, so child processes
  inherit nothing. It has no effect when libgomp was already loaded (reported in the result).
- ``keep_memory``: glibc keeps freed memory for reuse (:mod:`perceiver_np.memory`); default
  on unless ``PERCEIVER_NP_KEEP_MEMORY=0``.
- ``blas``: the BLAS every product of the kernels calls, "scipy" (SciPy's, OpenBLAS in its
  wheels; what an untuned process uses), "mkl" (the ``mkl`` wheel, on MKL's sequential
  threading layer, a setting of MKL's that is process-wide), "blis" (the ``blis`` wheel, on
  the widest kernels the CPU runs), or "auto": the one :func:`perceiver_np.kernels.blas.preferred`
  names by a fixed rule on the CPU (MKL on Intel, BLIS on another CPU with full-width AVX-512,
  else SciPy's; among those installed): :mod:`perceiver_np.kernels.blas`; default
  ``PERCEIVER_NP_BLAS`` if set, else unchanged.

Environment values are never fatal: a value that cannot be used is reported with a
:class:`RuntimeWarning` naming the variable and ignored (or clamped to the allowed range).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from . import memory, threads
from .threads import get_num_threads, set_num_threads

THREADS_ENV = threads.ENV
MEMORY_ENV = memory.ENV
BLAS_ENV = "PERCEIVER_NP_BLAS"
#: The ``blas`` value (and PERCEIVER_NP_BLAS value) that means kernels.blas.preferred().
AUTO = "auto"
#: The package each optional BLAS comes from, for messages (each is also an extra of perceiver_np).
PACKAGES = {"mkl": "MKL", "blis": "BLIS"}


@dataclass(frozen=True)
class Tuned:
    """What :func:`tune` did."""

    threads: dict[str, int]  # the thread counts afterwards (threads.get_num_threads())
    passive_wait: bool  # Numba's OpenMP pool was started with OMP_WAIT_POLICY=PASSIVE
    keep_memory: bool  # glibc keeps freed memory (memory.keeping)
    blas: str  # the BLAS the kernels call (kernels.blas.current().name)


def env_threads() -> int | None:
    """``PERCEIVER_NP_NUM_THREADS`` as a thread count, or None when unset or unusable (with a
    RuntimeWarning naming the value); clamped to 1..NUMBA_NUM_THREADS."""
    value = os.environ.get(THREADS_ENV)
    if value is None or value.strip() == "":
        return None
    try:
        n = int(value)
    except ValueError:
        warnings.warn(f"{THREADS_ENV}={value!r} is not an integer; ignored", RuntimeWarning, stacklevel=3)
        return None
    limit = threads.max_threads()
    if not 1 <= n <= limit:
        clamped = min(max(n, 1), limit)
        warnings.warn(f"{THREADS_ENV}={value!r} is outside 1..{limit} (NUMBA_NUM_THREADS); using {clamped}",
                      RuntimeWarning, stacklevel=3)
        return clamped
    return n


def env_keep_memory() -> bool:
    """``PERCEIVER_NP_KEEP_MEMORY``: "0" (or false/no/off) turns the setting off, "1" (or
    true/yes/on) or unset leaves it on; anything else warns and counts as unset."""
    value = os.environ.get(MEMORY_ENV)
    if value is None:
        return True
    word = value.strip().lower()
    if word in ("0", "false", "no", "off"):
        return False
    if word not in ("1", "true", "yes", "on", ""):
        warnings.warn(f"{MEMORY_ENV}={value!r} is not 0 or 1; ignored (freed memory is kept)",
                      RuntimeWarning, stacklevel=3)
    return True


def env_blas() -> str | None:
    """``PERCEIVER_NP_BLAS`` when it names a BLAS that can be used here ("auto" resolved), else
    None (unset, or with a RuntimeWarning naming the value: not one of kernels.blas.CHOICES or
    "auto", or its package not installed)."""
    from perceiver_np.kernels import blas

    value = os.environ.get(BLAS_ENV)
    if value is None or value.strip() == "":
        return None
    name = value.strip().lower()
    if name == AUTO:
        return blas.preferred()
    if name not in blas.CHOICES:
        warnings.warn(f"{BLAS_ENV}={value!r} is not one of {', '.join((*blas.CHOICES, AUTO))}; ignored",
                      RuntimeWarning, stacklevel=3)
        return None
    if name not in blas.available():
        warnings.warn(f"{BLAS_ENV}={value!r}: {PACKAGES[name]} is not installed "
                      f"(pip install 'perceiver_np[{name}]'); ignored", RuntimeWarning, stacklevel=3)
        return None
    return name


def _start_pool_passive() -> bool:
    """Start Numba's thread pool with OMP_WAIT_POLICY=PASSIVE in the environment, then restore
    the environment. True if the pool started here (so the policy applied)."""
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return False
    before = os.environ.get("OMP_WAIT_POLICY")
    if before is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        parallel._launch_threads()
    finally:
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    return before is None or before.upper() == "PASSIVE"


def tune(
    threads: int | None = None, *, passive_wait: bool = False, keep_memory: bool | None = None,
    blas: str | None = None,
) -> Tuned:
    """Apply the process-wide settings of the module docstring; returns what was done. A bad
    ``blas`` raises (ValueError naming the choices, ImportError when its package is not
    installed); ``blas="auto"`` takes :func:`perceiver_np.kernels.blas.preferred`."""
    from perceiver_np.kernels import blas as blas_lib

    n = env_threads() if threads is None else threads
    passive = _start_pool_passive() if passive_wait else False
    if n is not None:
        set_num_threads(n)
    keep = env_keep_memory() if keep_memory is None else bool(keep_memory)
    if keep:
        memory.keep_freed_memory(True)
    chosen = env_blas() if blas is None else blas
    if chosen == AUTO:
        chosen = blas_lib.preferred()
    if chosen is not None:
        blas_lib.use(chosen)
    return Tuned(get_num_threads(), passive, memory.keeping, blas_lib.current().name)
