"""Every Numba option of perceiver_np, in one place.

- ``cache=True``: compiled machine code is written next to the module (``__pycache__``) and a
  second process loads it instead of compiling (KERNEL-NOTES: ~0.5 s instead of ~30 s). This is
  why every kernel is defined at module level: kernels made inside a factory are cached but
  never loaded back.
- ``fastmath=FASTMATH``: every fast-math flag except ``reassoc``. ``contract`` fuses
  multiply-adds (FMA), ``nnan``/``ninf`` drop NaN/inf guards, ``arcp``/``afn`` allow reciprocal
  and approximate-function rewrites. ``reassoc`` is left out: it would let LLVM fold the two
  halves of ``fast_exp``'s Cody-Waite reduction back together (losing its accuracy), and the
  kernels need no horizontal reductions in their inner loops (they vectorise across queries or
  keys instead), so nothing is lost without it. ``nnan``/``ninf`` assume no NaN and no infinity:
  the kernels never make one (masked keys are skipped, the running max starts at the finite
  MASK_FILL) and the wrappers' callers pass finite input. The float64 kernel matches the plain
  NumPy path to 1e-12 relative (tests/test_kernels.py).
- ``parallel=True`` on the kernels whose outer loop is a ``prange`` over disjoint outputs.
- ``nogil=True`` so that a caller's own threads are not serialised on the GIL.

Threads: Numba's pool size comes from ``NUMBA_NUM_THREADS`` (default: the core count) and
:func:`numba.set_num_threads`. No kernel calls BLAS inside a parallel region, so BLAS threads
never stack on top of Numba's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
from numba import njit

FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}

#: Decorator for the kernels parallel over disjoint outputs (``prange``).
parallel_kernel = njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
#: Decorator for the serial helpers the kernels call (inlined by LLVM).
serial_kernel = njit(cache=True, fastmath=FASTMATH, nogil=True)

#: Below this many elements, a row or element-wise kernel runs on the calling thread alone:
#: waking the pool costs ~45 us per call here (measured with the passive wait policy), more
#: than the whole kernel's work on such an array (~2 us on one thread for [6, 8]).
PARALLEL_MIN_ELEMENTS = 1 << 15


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
