"""Threads: the one thread knob, nothing process-wide on import, BLAS's thread counts never
leaked by concurrent calls, and results bitwise independent of the thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import perceiver_np as pnp
from perceiver_np.kernels import gemm


def _blas_threads() -> dict[str, int]:
    return {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("PERCEIVER_NP_") and k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=300)


def test_set_num_threads_sets_numba_and_blas():
    before = numba.get_num_threads()
    try:
        pnp.set_num_threads(1)
        threads = pnp.get_num_threads()
        assert threads["numba"] == 1
        blas = [v for k, v in threads.items() if k.startswith("blas:")]
        assert blas and all(v == 1 for v in blas)
    finally:
        pnp.set_num_threads(before)
    assert pnp.get_num_threads()["numba"] == before


@pytest.mark.parametrize("bad", [0, -1, 10**6, 1.5, True])
def test_bad_thread_counts(bad):
    with pytest.raises(ValueError, match="n: expected an integer from 1 to NUMBA_NUM_THREADS"):
        pnp.set_num_threads(bad)


IMPORT_AND_RUN = """
import json, os, warnings
warnings.simplefilter("error")                      # a warning at import would fail here
env = dict(os.environ)
from threadpoolctl import threadpool_info
import numpy as np
before = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
import perceiver_np as pnp
model = pnp.build(input_dim=4, latent_dim=16, num_latents=8, num_layers=1)
model(np.ones((2, 3000, 4), dtype=np.float32))       # the fast path, every kernel loaded
after = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
print(json.dumps({"env_same": dict(os.environ) == env, "keeping": pnp.memory.keeping,
                  "blas_same": all(after[f] == n for f, n in before.items())}))
"""


@pytest.mark.parametrize("env", [
    {},
    {"PERCEIVER_NP_NUM_THREADS": "4000"},          # more than the cores
    {"PERCEIVER_NP_NUM_THREADS": "two"},
    {"PERCEIVER_NP_NUM_THREADS": "-1"},
    {"PERCEIVER_NP_KEEP_MEMORY": "false"},
    {"PERCEIVER_NP_KEEP_MEMORY": "maybe"},
])
def test_import_and_a_call_change_nothing_process_wide_whatever_the_environment(env):
    """Importing perceiver_np and running the fast path leave os.environ (no OMP_WAIT_POLICY),
    glibc's malloc (not told to keep memory) and every BLAS thread count as they were, and no
    environment value can make the import fail or warn."""
    out = _run(IMPORT_AND_RUN, **env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"env_same": True, "keeping": False, "blas_same": True}


def test_freed_memory_goes_back_to_the_system_after_import():
    """The 900 MB reproducer at a smaller size: with nothing tuned, freeing a 300 MB array
    returns it (RSS falls back), as it does without perceiver_np."""
    code = """
import numpy as np, perceiver_np
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss(); a = np.ones(300 * 2**20 // 8); del a
print(rss() - base)
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 50.0  # MiB still held after freeing 300 MiB


def test_tune_is_explicit_warns_on_bad_values_and_leaves_no_environment_behind():
    code = """
import json, os, warnings
import perceiver_np as pnp
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tuned = pnp.runtime.tune(passive_wait=os.environ.get("PASSIVE") == "1")
print(json.dumps({"threads": tuned.threads["numba"], "passive": tuned.passive_wait,
                  "keep": tuned.keep_memory, "omp_env": os.environ.get("OMP_WAIT_POLICY"),
                  "warnings": [str(w.message) for w in caught]}))
"""
    glibc = pnp.memory._libc() is not None
    out = _run(code, PERCEIVER_NP_NUM_THREADS="4000")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    limit = pnp.threads.max_threads()
    assert got["threads"] == limit and not got["passive"] and got["keep"] == glibc and got["omp_env"] is None
    assert got["warnings"] == [f"PERCEIVER_NP_NUM_THREADS='4000' is outside 1..{limit} "
                               f"(NUMBA_NUM_THREADS); using {limit}"]
    out = _run(code, PERCEIVER_NP_NUM_THREADS="two", PERCEIVER_NP_KEEP_MEMORY="0")
    got = json.loads(out.stdout)
    assert got["keep"] is False
    assert got["warnings"] == ["PERCEIVER_NP_NUM_THREADS='two' is not an integer; ignored"]
    out = _run(code, PERCEIVER_NP_KEEP_MEMORY="maybe")
    got = json.loads(out.stdout)
    assert got["warnings"] == [
        "PERCEIVER_NP_KEEP_MEMORY='maybe' is not 0 or 1; ignored (freed memory is kept)"]
    got = json.loads(_run(code, PASSIVE="1").stdout)  # asked for: the pool starts passive
    assert got["passive"] and got["omp_env"] is None


@pytest.mark.parametrize("order", ["first-in-first-out", "first-in-last-out"])
def test_blas_limit_survives_any_interleaving_of_threads(rng, order):
    """The failing interleaving of the reliability issue, forced: the main thread enters the
    one-thread BLAS limit, a worker enters, then they leave in either order. Afterwards every
    BLAS library has its thread count of before (a worker's restore used to be ignored by
    threadpoolctl's controlling-thread rule, leaving BLAS on one thread for good)."""
    a, w = rng.normal(size=(600, 64)), rng.normal(size=(64, 48))
    gemm.matmul(a, w)  # every BLAS involved is loaded
    before = _blas_threads()
    entered, release = threading.Event(), threading.Event()

    def worker() -> None:
        with gemm.single_threaded_blas():
            entered.set()
            release.wait(30)

    main = gemm.single_threaded_blas()
    main.__enter__()
    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(30)
    assert all(n == 1 for n in _blas_threads().values())
    if order == "first-in-first-out":
        main.__exit__(None, None, None)
        assert all(n == 1 for n in _blas_threads().values())  # the worker still holds it
        release.set()
        t.join(30)
    else:
        release.set()
        t.join(30)
        assert all(n == 1 for n in _blas_threads().values())  # the main thread still holds it
        main.__exit__(None, None, None)
    assert _blas_threads() == before


def test_concurrent_model_calls_leave_blas_thread_counts_as_they_were():
    model = pnp.build(input_dim=8, latent_dim=64, num_latents=32, num_layers=1)
    x = np.random.default_rng(0).standard_normal((4, 3000, 8)).astype(np.float32)
    want = model(x)
    before = _blas_threads()
    results: list[np.ndarray] = []
    t = threading.Thread(target=lambda: results.extend(model(x) for _ in range(3)))
    t.start()
    results.extend(model(x) for _ in range(3))
    t.join(120)
    assert _blas_threads() == before
    assert all(np.array_equal(r, want) for r in results)  # and every result is the same, bitwise


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_are_bitwise_independent_of_the_thread_count(dtype):
    """Every parameter gradient and dx of a training step, with 1 and with all threads, equal
    bit for bit: each sum over rows or keys is split into the same fixed blocks and added in
    the same order whatever the thread count (REDUCTION_BLOCK_ROWS, SPLIT_TARGET_ITEMS). The
    shapes reach every split path: 2 x 4200 input rows (> one reduction block, > one key split)."""
    if pnp.threads.max_threads() < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2 to compare thread counts")
    model = pnp.build(input_dim=8, latent_dim=32, num_latents=16, num_layers=1, cross_heads=1,
                      num_heads=2, dropout=0.0, dtype=dtype)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4200, 8)).astype(dtype)
    mask = np.ones((2, 4200), dtype=bool)
    mask[1, 3000:] = False
    dy = rng.standard_normal((2, 32)).astype(dtype)
    runs = []
    before = numba.get_num_threads()
    try:
        for n in (1, pnp.threads.max_threads()):
            pnp.set_num_threads(n)
            y, cache = model.forward(x, mask, training=True)
            grads, dx = model.backward(dy, cache)
            runs.append((y, grads, dx, model(x, mask)))
    finally:
        pnp.set_num_threads(before)
    (y1, g1, dx1, i1), (y2, g2, dx2, i2) = runs
    assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2) and np.array_equal(i1, i2)
    differ = [k for k in g1 if not np.array_equal(g1[k], g2[k])]
    assert differ == []


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_layernorm_projection_is_bitwise_independent_of_the_thread_count(dtype, monkeypatch):
    """``project_heads(..., norm=)`` fuses the LayerNorm into the product when one tile spans
    every column and normalises the rows in a pass of their own otherwise, a choice the tile
    plan makes (gemm.tiles, for gemm._threads()). Both run rows.normalize_row, so the two give
    the same bits: one sample's latents against a wide weight split by rows for 1 thread and
    by columns for more, each run on that many threads."""
    if pnp.threads.max_threads() < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2 to compare thread counts")
    from perceiver_np.kernels import rows

    rng = np.random.default_rng(11)
    b, s, k, f, heads = 1, 256, 512, 1280, 4
    x = rng.standard_normal((b, s, k)).astype(dtype)
    ws = [(0.05 * rng.standard_normal((k, f))).astype(dtype) for _ in range(2)]
    gamma, beta, bias = rng.standard_normal((3, k)).astype(dtype)
    cols, most = 2 * f, pnp.threads.max_threads()
    assert gemm.tiles(b * s, cols, 1, gemm.PROJECT_BLOCK_ROWS)[1] == cols  # fused
    assert gemm.tiles(b * s, cols, most, gemm.PROJECT_BLOCK_ROWS)[1] < cols  # a pass of its own
    runs = []
    before = numba.get_num_threads()
    try:
        for n in (1, most):
            pnp.set_num_threads(n)
            monkeypatch.setattr(gemm, "_threads", lambda n=n: n)  # the tiles cut for n threads
            runs.append([o.copy() for o in gemm.project_heads(x, ws, heads, (gamma, beta, bias))])
    finally:
        pnp.set_num_threads(before)
    normed = rows.layernorm(x.reshape(b * s, k), gamma, beta, bias).reshape(b, s, k)
    apart = gemm.project_heads(normed, ws, heads)
    for fused, split, want in zip(*runs, apart, strict=True):
        np.testing.assert_array_equal(fused, want)
        np.testing.assert_array_equal(split, want)
