"""The tiled Numba kernel against the plain NumPy path: ragged shapes, masks, splits, threads,
float32 and float64; finite differences through the kernel; the memory it does not use."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc

import numba
import numpy as np
import pytest

from perceiver_np import attention as plain
from perceiver_np import kernels
from perceiver_np.constants import MASK_FILL
from perceiver_np.gradcheck import gradcheck
from perceiver_np.kernels.fastexp import fast_exp
from perceiver_np.kernels.gemm import gemm_rows
from perceiver_np.tolerances import (
    GRADCHECK_RTOL,
    KERNEL_FLOAT32_VS_NUMPY,
    KERNEL_FLOAT64_RTOL,
    U32,
    float32_attention_rtol,
)


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-300))


def _inputs(rng, b, h, m, n, dh, dv, dtype=np.float64):
    return tuple(rng.normal(size=s).astype(dtype) for s in [(b, h, m, dh), (b, h, n, dh), (b, h, n, dv)])


def _mask(kind, b, n, rng):
    if kind is None:
        return None
    mask = np.ones((b, n), dtype=bool)
    if kind == "random":
        mask = rng.random((b, n)) < 0.6
        mask[:, 0] = True
    elif kind == "leading":
        mask[:, : max(1, n // 2)] = False
        mask[:, -1] = True
    elif kind == "trailing":
        mask[:, n // 3 + 1:] = False
    elif kind == "fully-masked-sample":
        mask = rng.random((b, n)) < 0.5
        mask[0] = False
    return mask


def _compare_lse(lse, ref):
    finite = ref > MASK_FILL / 2
    assert np.all(lse[~finite] == MASK_FILL)  # no visible key: the sentinel, in both paths
    if finite.any():
        assert _rel(lse[finite], ref[finite]) <= KERNEL_FLOAT64_RTOL


# (B, H, M, N, dh, dv, block_m, block_n): ragged everything, one of each edge
SHAPES = [
    (1, 1, 1, 1, 1, 1, None, None),
    (2, 3, 5, 1, 7, 3, None, None),
    (1, 2, 70, 300, 59, 64, None, None),
    (2, 1, 1, 257, 64, 7, None, None),
    (1, 2, 37, 130, 7, 5, 16, 32),  # several query blocks and key tiles, both ragged
    (3, 1, 9, 64, 64, 64, 4, 64),  # N a multiple of the tile
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s[:6]))
@pytest.mark.parametrize("mask_kind", [None, "random", "leading", "trailing", "fully-masked-sample"])
@pytest.mark.parametrize("n_splits", [1, 3])
def test_float64_kernel_equals_plain_path(rng, shape, mask_kind, n_splits):
    b, h, m, n, dh, dv, bm, bn = shape
    q, k, v = _inputs(rng, b, h, m, n, dh, dv)
    mask = _mask(mask_kind, b, n, rng)
    tiles = {"n_splits": n_splits} if bm is None else {"block_m": bm, "block_n": bn, "n_splits": n_splits}
    o, lse = kernels.attention_forward(q, k, v, mask, **tiles)
    o_ref, lse_ref = plain.attention_forward(q, k, v, mask)
    assert o.dtype == lse.dtype == np.float64
    assert _rel(o, o_ref) <= KERNEL_FLOAT64_RTOL if np.abs(o_ref).max() > 0 else np.all(o == 0)
    _compare_lse(lse, lse_ref)
    do = rng.normal(size=o.shape)
    grads = kernels.attention_backward(do, q, k, v, o, lse, mask, **tiles)
    grads_ref = plain.attention_backward(do, q, k, v, o_ref, lse_ref, mask)
    # the terms of dq and dk are products dO v q k / sqrt(dh): where they cancel (N = 1 gives an
    # exactly zero dk), compare against their size, not the rounding left of them
    terms = np.abs(do).max() * np.abs(v).max() * max(np.abs(q).max(), np.abs(k).max())
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape and g.dtype == np.float64
        err = np.abs(g - g_ref).max() / max(np.abs(g_ref).max(), terms)
        assert err <= KERNEL_FLOAT64_RTOL
    if mask is not None:  # masked keys: exactly zero gradient; no visible key: all zero
        dq, dk, dv = grads
        assert np.all(dk.transpose(0, 2, 1, 3)[~mask] == 0) and np.all(dv.transpose(0, 2, 1, 3)[~mask] == 0)
        dead = ~mask.any(axis=1)
        assert np.all(o[dead] == 0) and np.all(dq[dead] == 0)
    for a in (o, lse, *grads):
        assert np.isfinite(a).all()


@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_float32_kernel_within_float32_rounding(rng, mask_kind):
    b, h, m, n, dh = 2, 2, 70, 1000, 64
    q, k, v = _inputs(rng, b, h, m, n, dh, dh)
    mask = _mask(mask_kind, b, n, rng)
    o64, lse64 = plain.attention_forward(q, k, v, mask)
    do = rng.normal(size=o64.shape)
    g64 = plain.attention_backward(do, q, k, v, o64, lse64, mask)
    q32, k32, v32, do32 = (a.astype(np.float32) for a in (q, k, v, do))
    o, lse = kernels.attention_forward(q32, k32, v32, mask)
    on, lsen = plain.attention_forward(q32, k32, v32, mask)
    g = kernels.attention_backward(do32, q32, k32, v32, o, lse, mask)
    gn = plain.attention_backward(do32, q32, k32, v32, on, lsen, mask)
    assert o.dtype == lse.dtype == np.float32 and all(a.dtype == np.float32 for a in g)
    bound = float32_attention_rtol(n, dh)
    for ours, numpys, exact in [(o, on, o64), *zip(g, gn, g64, strict=True)]:
        err, err_numpy = _rel(ours, exact), _rel(numpys, exact)
        assert err <= bound
        assert err <= KERNEL_FLOAT32_VS_NUMPY * max(err_numpy, U32)


def test_results_do_not_depend_on_threads_and_are_equal_across_splits(rng):
    q, k, v = _inputs(rng, 1, 1, 33, 5000, 16, 16)
    mask = _mask("random", 1, 5000, rng)
    before = numba.get_num_threads()
    try:
        runs = {}
        for threads in (1, before):
            numba.set_num_threads(threads)
            o, lse = kernels.attention_forward(q, k, v, mask, n_splits=2)
            runs[threads] = (o, lse, *kernels.attention_backward(o, q, k, v, o, lse, mask, n_splits=2))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(runs[1], runs[before], strict=True):
        assert np.array_equal(a, b)  # work items are the same whatever runs them
    o1, _ = kernels.attention_forward(q, k, v, mask, n_splits=1)
    assert _rel(o1, runs[1][0]) <= KERNEL_FLOAT64_RTOL


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_head_split_keys_and_values_are_read_where_they_lie(rng, dtype):
    """k and v as the head-split views [B, H, N, d] of [B, N, H*d] projections, and as a chunk of
    a longer input: the same bits as from C-contiguous copies, forward and backward; dk and dv
    come back in k's and v's layout, so merging their heads is a reshape without a copy."""
    b, h, m, n, dh, dv = 2, 3, 5, 300, 4, 6  # three key tiles, the last ragged
    q = rng.normal(size=(b, h, m, dh)).astype(dtype)
    k_rows = rng.normal(size=(b, n + 9, h * dh)).astype(dtype)  # [B, N', H*dh]
    v_rows = rng.normal(size=(b, n + 9, h * dv)).astype(dtype)
    mask = _mask("random", b, n, rng)
    views = [(k_rows[:, :n].reshape(b, n, h, dh).transpose(0, 2, 1, 3),  # [B, N, H*dh] -> [B, H, N, dh]
              v_rows[:, :n].reshape(b, n, h, dv).transpose(0, 2, 1, 3))]
    chunk_k = np.ascontiguousarray(views[0][0].transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)  # other strides
    views.append((chunk_k, np.ascontiguousarray(views[0][1])[:, :, :]))
    for k, v in views:
        kc, vc = np.ascontiguousarray(k), np.ascontiguousarray(v)
        o, lse = kernels.attention_forward(q, k, v, mask, n_splits=2)
        oc, lsec = kernels.attention_forward(q, kc, vc, mask, n_splits=2)
        assert np.array_equal(o, oc) and np.array_equal(lse, lsec)
        do = rng.normal(size=o.shape).astype(dtype)
        grads = kernels.attention_backward(do, q, k, v, o, lse, mask, n_splits=2)
        want = kernels.attention_backward(do, q, kc, vc, oc, lsec, mask, n_splits=2)
        for got, ref in zip(grads, want, strict=True):
            assert np.array_equal(got, ref)
    _, dk, dv_ = kernels.attention_backward(do, q, *views[0], o, lse, mask)
    for grad, d in ((dk, dh), (dv_, dv)):
        merged = grad.transpose(0, 2, 1, 3).reshape(b, n, h * d)  # merge_heads
        assert np.shares_memory(merged, grad) and merged.flags.c_contiguous


def test_many_queries_few_keys(rng):
    # the Perceiver IO decoder's cross-attention: O >> M queries over M latent keys
    q, k, v = _inputs(rng, 1, 2, 3000, 64, 32, 32)
    o, lse = kernels.attention_forward(q, k, v)
    o_ref, lse_ref = plain.attention_forward(q, k, v)
    assert _rel(o, o_ref) <= KERNEL_FLOAT64_RTOL and _rel(lse, lse_ref) <= KERNEL_FLOAT64_RTOL
    g = kernels.attention_backward(o, q, k, v, o, lse)
    g_ref = plain.attention_backward(o, q, k, v, o_ref, lse_ref)
    assert all(_rel(a, r) <= KERNEL_FLOAT64_RTOL for a, r in zip(g, g_ref, strict=True))


def test_finite_differences_through_the_kernel(rng):
    q, k, v = _inputs(rng, 2, 2, 5, 11, 3, 4)
    mask = _mask("random", 2, 11, rng)

    def fn(t):
        return kernels.attention_forward(t["q"], t["k"], t["v"], mask, block_m=2, block_n=4, n_splits=2)[0]

    def grad_fn(t, do):
        o, lse = kernels.attention_forward(t["q"], t["k"], t["v"], mask, block_m=2, block_n=4, n_splits=2)
        dq, dk, dv = kernels.attention_backward(do, t["q"], t["k"], t["v"], o, lse, mask,
                                                block_m=2, block_n=4, n_splits=2)
        return {"q": dq, "k": dk, "v": dv}

    report = gradcheck(fn, grad_fn, {"q": q, "k": k, "v": v})
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


def test_bad_arguments_are_named(rng):
    q, k, v = _inputs(rng, 1, 2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match=r"k: expected shape \[B, H, N, dh\]"):
        kernels.attention_forward(q, k[..., :4], v)
    with pytest.raises(TypeError, match="v: expected dtype float64 like q, got float32"):
        kernels.attention_forward(q, k, v.astype(np.float32))
    with pytest.raises(TypeError, match="mask: expected a bool array"):
        kernels.attention_forward(q, k, v, np.ones((1, 4), dtype=int))
    with pytest.raises(ValueError, match=r"mask: expected shape \[B, N\]"):
        kernels.attention_forward(q, k, v, np.ones((1, 5), dtype=bool))
    with pytest.raises(TypeError, match="q: expected dtype float32 or float64, got int64"):
        kernels.attention_forward(q.astype(np.int64), k, v)
    o, lse = kernels.attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"lse: expected shape \(1, 2, 3\)"):
        kernels.attention_backward(o, q, k, v, o, lse[..., :2])


# --- the pieces ---------------------------------------------------------------------------------


def test_fast_exp_float32_is_accurate_to_two_ulps():
    x = np.linspace(-87.0, 0.0, 400_001, dtype=np.float32)

    @numba.njit
    def run(x, out):
        for i in range(x.size):
            out[i] = fast_exp(x[i])

    out = np.empty_like(x)
    run(x, out)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(out - exact) / exact).max() <= 2 * U32
    tiny = np.array([-1e30, -200.0], dtype=np.float32)
    run(tiny, out[:2])
    assert np.all((out[:2] > 0) & (out[:2] < 1.2e-38))  # clamped, finite, never negative


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_trans,b_trans", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_rows_multiplies_sub_blocks(rng, dtype, a_trans, b_trans):
    """The attention kernel's tile product: row-major C = op(A) @ op(B) + beta C on sub-blocks
    given by offsets and row strides (A at [2, 1] of a [9, 11] array, B at [1, 2] of [8, 10],
    C at [1, 3] of [6, 12]); beta = 0 never reads C (NaN there stays out), beta = 1 adds to it,
    and nothing outside the sub-block of C changes."""
    m, n, k = 5, 7, 3
    big_a, big_b = rng.normal(size=(9, 11)).astype(dtype), rng.normal(size=(8, 10)).astype(dtype)
    a = big_a[2:2 + (k if a_trans else m), 1:1 + (m if a_trans else k)]
    b = big_b[1:1 + (n if b_trans else k), 2:2 + (k if b_trans else n)]
    product = (a.T if a_trans else a).astype(np.float64) @ (b.T if b_trans else b)
    tol = 1e-13 if dtype == np.float64 else 8 * k * U32
    for beta in (0.0, 1.0):
        c = rng.normal(size=(6, 12)).astype(dtype)
        want = c.astype(np.float64)
        want[1:1 + m, 3:3 + n] = product + beta * want[1:1 + m, 3:3 + n]
        if beta == 0.0:
            c[1:1 + m, 3:3 + n] = np.nan
        status = gemm_rows(a_trans, b_trans, m, n, k, big_a, 2 * 11 + 1, 11, big_b, 1 * 10 + 2, 10,
                           c, 1 * 12 + 3, 12, beta)
        assert status == 0
        assert _rel(c, want) <= tol


def test_choose_splits_reaches_the_target_without_the_thread_count():
    assert kernels.choose_splits(1, 1_000_000, target=4) == 4
    assert kernels.choose_splits(8, 1_000_000, target=4) == 1
    assert kernels.choose_splits(1, 3000, target=4) == 1  # too few keys to split
    assert kernels.choose_splits(3, 1_000_000, target=16) == 6  # ceil(16 / 3)


# --- memory ---------------------------------------------------------------------------------------


def test_no_score_matrix_is_allocated(rng):
    b, h, m, n, dh = 1, 4, 256, 1 << 16, 32
    q, k, v = _inputs(rng, b, h, m, n, dh, dh, dtype=np.float32)
    kernels.attention_backward(*_warm(q, k, v))  # compile/load outside the measurement
    tracemalloc.start()
    try:
        o, lse = kernels.attention_forward(q, k, v)
        kernels.attention_backward(o, q, k, v, o, lse)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    inputs = q.nbytes + k.nbytes + v.nbytes
    scores = b * h * m * n * 4
    # the outputs (o, lse, dq, dk, dv) are the size of the inputs; splits and tiles add little
    assert peak <= 1.25 * inputs + (4 << 20)
    assert peak < scores / 2  # where the plain path needs several [B, H, M, N] arrays


def _warm(q, k, v):
    o, lse = kernels.attention_forward(q[:, :, :2], k[:, :, :3], v[:, :, :3])
    return o, q[:, :, :2], k[:, :, :3], v[:, :, :3], o, lse


def test_peak_resident_memory_of_a_large_forward_and_backward():
    # tracemalloc does not see Numba's own allocations inside the kernels: measure the process
    script = textwrap.dedent("""
        import resource, numpy as np
        from perceiver_np import kernels
        rng = np.random.default_rng(0)
        b, h, m, n, dh = 1, 4, 256, 1 << 17, 32
        shapes = [(b, h, m, dh), (b, h, n, dh), (b, h, n, dh)]
        q, k, v = (rng.normal(size=s).astype(np.float32) for s in shapes)
        o, lse = kernels.attention_forward(q[:, :, :2], k[:, :, :3], v[:, :, :3])
        kernels.attention_backward(o, q[:, :, :2], k[:, :, :3], v[:, :, :3], o, lse)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        o, lse = kernels.attention_forward(q, k, v)
        kernels.attention_backward(o, q, k, v, o, lse)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024, q.nbytes + k.nbytes + v.nbytes, b * h * m * n * 4)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    extra, inputs, scores = (int(x) for x in out.stdout.split())
    assert extra <= 1.25 * inputs + (16 << 20), (extra, inputs)
    assert extra < scores / 2


# --- against PyTorch's scaled_dot_product_attention -------------------------------------------------


def test_kernel_equals_torch_sdpa(rng):
    torch = pytest.importorskip("torch", reason="torch is the compare extra: pip install -e '.[compare]'")
    b, h, m, n, dh = 2, 3, 17, 300, 24
    q, k, v = _inputs(rng, b, h, m, n, dh, dh)
    mask = _mask("random", b, n, rng)  # every sample keeps some keys: torch gives NaN otherwise
    o, lse = kernels.attention_forward(q, k, v, mask)
    do = rng.normal(size=o.shape)
    dq, dk, dv = kernels.attention_backward(do, q, k, v, o, lse, mask)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    to = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(mask)[:, None, None, :]  # True = take part
    )
    to.backward(torch.from_numpy(do))
    assert _rel(o, to.detach().numpy()) <= KERNEL_FLOAT64_RTOL
    for ours, theirs in ((dq, tq.grad), (dk, tk.grad), (dv, tv.grad)):
        assert _rel(ours, theirs.numpy()) <= KERNEL_FLOAT64_RTOL


# --- the fast path's element-wise kernels ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["exact", "tanh"])
def test_fast_gelu_equals_the_plain_gelu(rng, kind):
    from perceiver_np import backends, layers
    from perceiver_np.tolerances import float32_forward_rtol

    x = 3 * rng.normal(size=(7, 1001))
    x[0, :6] = [-40.0, -9.0, -1e-3, 0.0, 9.0, 40.0]
    dy = rng.normal(size=x.shape)
    y, c = layers.gelu_forward(x, approximate=kind)
    dx, _ = layers.gelu_backward(dy, c)
    y_fast, c_fast = backends.gelu_forward(x, approximate=kind)
    dx_fast, _ = backends.gelu_backward(dy, c_fast)
    assert _rel(y_fast, y) <= KERNEL_FLOAT64_RTOL and _rel(dx_fast, dx) <= KERNEL_FLOAT64_RTOL
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    y32, c32 = backends.gelu_forward(x32, approximate=kind)
    dx32, _ = backends.gelu_backward(dy32, c32)
    assert y32.dtype == dx32.dtype == np.float32
    # a handful of dependent float32 operations (polynomial, exp, products): 8 of them, width 10
    bound = float32_forward_rtol(8, 10)
    assert _rel(y32, y) <= bound and _rel(dx32, dx) <= bound
    assert np.isfinite(y32).all() and np.isfinite(dx32).all()


def test_fast_gelu_backward_equals_finite_differences(rng):
    from perceiver_np import backends
    from perceiver_np.gradcheck import check_layer

    for kind in ("exact", "tanh"):
        report = check_layer(backends.gelu_forward, backends.gelu_backward, 2 * rng.normal(size=(3, 17)),
                             approximate=kind)
        assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
