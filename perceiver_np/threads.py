"""One knob for every thread pool perceiver_np computes on.

::

    perceiver_np.set_num_threads(2)       # or perceiver_np.runtime.tune() with PERCEIVER_NP_NUM_THREADS=2

Numba's pool runs the kernels (``kernels/``); BLAS's runs NumPy's and SciPy's matrix products
(the layers' projections). The two never run inside each other (no kernel calls BLAS), so
setting both to the core count uses every core without oversubscribing them.

Importing perceiver_np changes no thread setting: :func:`set_num_threads` (or
:func:`perceiver_np.runtime.tune`, which also reads ``PERCEIVER_NP_NUM_THREADS`` and can start
Numba's OpenMP pool with a passive wait policy) is an explicit call. The inference engine runs its
products on Numba's pool too (:mod:`perceiver_np.kernels.gemm`), so no pool spins while another
computes.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "PERCEIVER_NP_NUM_THREADS"


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in Numba's pool and in every BLAS pool loaded in this process.

    ``n`` may not exceed ``NUMBA_NUM_THREADS`` (the pool Numba was started with, the core count
    by default): Numba cannot grow its pool after start-up.
    """
    import numba
    from threadpoolctl import threadpool_limits

    limit = max_threads()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"n: expected an integer from 1 to NUMBA_NUM_THREADS = {limit}, got {n!r}")
    numba.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")


def get_num_threads() -> dict[str, int]:
    """The threads of Numba's pool and of each loaded BLAS library, by name."""
    import numba
    from threadpoolctl import threadpool_info

    out = {"numba": int(numba.get_num_threads())}
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            out[f"blas:{pool.get('internal_api')}:{os.path.basename(pool.get('filepath', ''))}"] = int(
                pool["num_threads"]
            )
    return out


def max_threads() -> int:
    """``NUMBA_NUM_THREADS``: the size Numba's pool was started with (the core count by
    default), the most :func:`set_num_threads` accepts."""
    import numba

    config: Any = numba.config  # NUMBA_NUM_THREADS is set by Numba at start-up, not declared
    return int(config.NUMBA_NUM_THREADS)
