"""Every Numba option of perceiver_np, in one place.

- ``cache=True``: compiled machine code is written next to the module (``__pycache__``) and a
  second process loads it instead of compiling (docs/kernel.md has the compile and load times).
  This is why every kernel is defined at module level: kernels made inside a factory are cached but
  never loaded back. Numba keys each cached kernel on its own module's source file, not on this
  one: after changing an option here, delete the cached files (``*.nbi``, ``*.nbc`` under
  ``kernels/__pycache__``), or the kernels of the unchanged modules load with the old options.
- ``fastmath=FASTMATH``: every fast-math flag except ``reassoc`` and ``arcp``. ``contract``
  fuses multiply-adds (FMA), ``nnan``/``ninf`` drop NaN/inf guards, ``afn`` allows
  approximate-function rewrites. ``reassoc`` is left out: it would let LLVM fold the two
  halves of ``fast_exp``'s Cody-Waite reduction back together (losing its accuracy), and the
  kernels need no horizontal reductions in their inner loops (they vectorise across queries or
  keys instead), so nothing is lost without it. ``arcp`` is left out because it made results
  depend on where the arrays lie in memory: it lets LLVM turn a division in a vectorised loop
  into a reciprocal estimate refined by one Newton step, while the scalar copy of the same loop
  (which runs the last few entries, and the whole loop when the output may overlap the input:
  in place, or two small arrays allocated next to each other) keeps the true division. The
  same GELU input then rounded 1 ulp apart from one call to the next; without ``arcp`` both
  copies of a loop give the same bits (tests/test_reliability.py holds GELU and its backward,
  bias + GELU and the LayerNorm to the same bits in place, out of place and one entry over, and
  the residual add, residual + LayerNorm and LayerNorm's training forward and backward to the
  same bits one entry over).
  ``nnan``/``ninf`` assume no NaN and no infinity: the kernels never make one (masked keys are
  skipped, the running max starts at the finite MASK_FILL) and the wrappers' callers pass
  finite input. The float64 kernel matches the plain
  NumPy path to 1e-12 relative (tests/test_kernels.py).
- ``error_model="numpy"``: a division by zero gives inf or NaN as in NumPy instead of raising
  ZeroDivisionError. An exception cannot leave a parallel region cleanly (it surfaced as
  ``SystemError: ... returned a result with an exception set``), and the callers check their
  inputs and parameters for non-finite values before any kernel runs, so the kernels never
  need to raise.
- ``parallel=True`` on the kernels whose outer loop is a ``prange`` over disjoint outputs.
- ``nogil=True`` so that a caller's own threads are not serialised on the GIL.

Threads: Numba's pool size comes from ``NUMBA_NUM_THREADS`` (default: the core count) and
:func:`numba.set_num_threads`. The products in :mod:`perceiver_np.kernels.gemm` call BLAS
inside a parallel region, each on its own rows, with every BLAS held to one thread for the call
(``gemm.single_threaded_blas``), so BLAS threads never stack on top of Numba's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit

from perceiver_np.shapes import Alloc

FASTMATH = {"nnan", "ninf", "nsz", "contract", "afn"}

#: Decorator for the kernels parallel over disjoint outputs (``prange``).
parallel_kernel = njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
#: Decorator for the serial helpers the kernels call (inlined by LLVM).
serial_kernel = njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
#: Decorator for the kernels that must round every operation exactly as NumPy does (the
#: optimizer's update, bitwise its plain twin's): no fast-math flag at all, so no FMA
#: contraction and IEEE division and square root, in the vectorised and the scalar copy alike.
exact_parallel_kernel = njit(parallel=True, cache=True, nogil=True, error_model="numpy")

#: Below this many elements, a row or element-wise kernel runs on the calling thread alone:
#: waking the pool costs more than the whole kernel's work on such an array (docs/fast.md).
PARALLEL_MIN_ELEMENTS = 1 << 15

#: Every sum over rows that is split into work items (a weight's gradient, LayerNorm's dgamma
#: and dbeta) uses blocks of this many rows, never one block per thread: the partial sums and
#: the order they are added in are the same on any number of threads, so every gradient is
#: bitwise independent of the thread count (tests/test_threads.py). 1024 rows keep each
#: block's product large enough for BLAS (1024 x 256 x 256 multiply-adds) and give two or more
#: items from B * M = 2048 rows (the seed's latents at B = 32) on.
REDUCTION_BLOCK_ROWS = 1024


@contextlib.contextmanager
def threads_for(elements: int) -> Iterator[None]:
    """Run the kernels called inside on one thread when ``elements`` is small (Numba's thread
    count is per calling thread, so other threads are not affected)."""
    if elements >= PARALLEL_MIN_ELEMENTS:
        yield
        return
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


def empty(alloc: Alloc | None, name: str, shape: tuple[int, ...],
          dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised output: ``np.empty(shape, dtype)``, or ``alloc(name, shape, dtype)``
    when the caller hands in an allocator (the engine's workspace,
    :mod:`perceiver_np.workspace`, which gives the same memory back on the next call)."""
    if alloc is None:
        return np.empty(shape, dtype=dtype)
    out = alloc(name, shape, dtype)
    if out.shape != tuple(shape) or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"alloc: {name!r} expected a C-contiguous {np.dtype(dtype).name} array "
                         f"{tuple(shape)}, got {out.dtype.name} {out.shape}")
    return out


def rows_array(a: np.ndarray) -> np.ndarray:
    """``a`` as the attention kernel reads keys and values: as it lies when its rows are
    contiguous and do not overlap (last stride the item size, the row stride at least a row,
    other strides positive: the head-split view [B, H, N, d] of a [B, N, H*d] array, a chunk of
    a longer input), writeable, aligned and in native byte order; else :func:`kernel_array`'s
    C-contiguous copy. Such a view is another Numba type (layout "A") than a C-contiguous
    array: one more compiled signature, never a copy per call."""
    s, n = a.strides, a.shape
    if (a.ndim == 4 and s[3] == a.itemsize and s[2] >= n[3] * a.itemsize
            and all(st > 0 or size == 1 for st, size in zip(s, n, strict=True))
            and a.flags.writeable and a.flags.aligned and a.dtype.isnative):
        return a
    return kernel_array(a)


def kernel_array(a: np.ndarray) -> np.ndarray:
    """``a`` as every kernel takes an array it reads: C-contiguous, writeable, native byte
    order; returned as is when it already is, else copied. Numba types a read-only array (a
    memory map opened with mode "r", ``np.broadcast_to``, an array marked read-only) or a
    byte-swapped one as another type and would compile every kernel again for it (on the first
    masked ``predict`` from a memory-mapped mask, say); the copy keeps every call on the
    signatures compiled once."""
    if a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative:
        return a
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C")
