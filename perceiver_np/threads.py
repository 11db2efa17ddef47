"""One knob for every thread pool perceiver_np computes on.

::

    perceiver_np.set_num_threads(2)       # or PERCEIVER_NP_NUM_THREADS=2 before the import

Numba's pool runs the kernels (``kernels/``); BLAS's runs NumPy's and SciPy's matrix products
(the layers' projections). The two never run inside each other (no kernel calls BLAS), so
setting both to the core count uses every core without oversubscribing them.

Numba's OpenMP pool waits passively (``OMP_WAIT_POLICY=PASSIVE``, set here unless the
environment already sets it, before Numba starts its pool): with OpenMP's default, its threads
spin after each kernel and a BLAS product started in that window ran at half speed on this
machine's two cores (a diagnostic timing, docs/fast.md). The fast path runs its products on Numba's pool too
(:mod:`perceiver_np.kernels.gemm`), so no pool spins while another computes.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "PERCEIVER_NP_NUM_THREADS"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when Numba's OpenMP pool starts


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in Numba's pool and in every BLAS pool loaded in this process.

    ``n`` may not exceed ``NUMBA_NUM_THREADS`` (the pool Numba was started with, the core count
    by default): Numba cannot grow its pool after start-up.
    """
    import numba
    from threadpoolctl import threadpool_limits

    config: Any = numba.config  # NUMBA_NUM_THREADS is set by Numba at start-up, not declared
    limit = int(config.NUMBA_NUM_THREADS)
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


def apply_environment() -> None:
    """Honour ``PERCEIVER_NP_NUM_THREADS`` when it is set (called on ``import perceiver_np``)."""
    value = os.environ.get(ENV)
    if value is None:
        return
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV}: expected an integer, got {value!r}") from None
    set_num_threads(n)
