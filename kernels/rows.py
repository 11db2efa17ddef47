"""Row-wise fused kernels of the fast inference path (perceiver_np.fast), parallel over rows.

Each kernel does in one pass over a [R, F] array what the plain path does in several, with the
plain path's formulas (tested equal, tests/test_engine.py)::

    layernorm(x, gamma, beta, bias=None, out=None)   out = LN(x + bias)            [R, F]
    residual_layernorm(z, t, bias, gamma, beta, out=None)  z += t + bias; LN(z) [R, F]
    residual(z, t, bias)                            z += t + bias                 [R, F]
    bias_gelu(h, bias, approximate)                 h = GELU(h + bias)            [R, F]
    merge_heads(o, bias, visible)                   -> [B*M, H*dv]: o[b, h, i, e] (+ bias[h*dv + e])
    layernorm_train(x, gamma, beta)                 -> y, xhat [R, F], rstd [R, 1]  (training)
    layernorm_backward(dy, xhat, rstd, gamma)       -> dx [R, F], dgamma [F], dbeta [F]
    max_abs(x)                                      -> max |x| over every entry   (any shape)

LN is the plain path's LayerNorm: ``(x - mean) / sqrt(var + LN_EPS) * gamma + beta`` with the
biased variance. The row's mean and variance are summed in float64 whatever the dtype (two
passes over the row, which is in L1, each a pairwise sum in a fixed order), so float32 rows are
normalised at least as accurately as by the plain path's float32 reductions. ``out`` may be
``x`` itself: a row is read whole before any of it is written. Wrappers check shapes and dtypes
and take contiguous arrays only, so no kernel ever sees a broadcast or a strided view.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from perceiver_np.constants import LN_EPS
from perceiver_np.shapes import Alloc

from ._numba import (
    REDUCTION_BLOCK_ROWS,
    empty,
    exact_parallel_kernel,
    kernel_array,
    parallel_kernel,
    serial_kernel,
    threads_for,
)
from .elementwise import bias_gelu_segment

#: Rows per work item of the row kernels: each item allocates the moments' scratch once
#: (:func:`moments_scratch`) and normalises its rows one after the other.
ROWS_PER_ITEM = 64


@serial_kernel
def moments_scratch(f):  # pragma: no cover - compiled
    """The float64 scratch [2, P] that :func:`_moments` needs for rows of ``f`` entries, P the
    smallest power of two >= max(f, 2). One per work item: a kernel allocates it once and
    passes it to every row it normalises."""
    p = 2
    while p < f:
        p *= 2
    return np.empty((2, p), dtype=np.float64)


@serial_kernel
def _pairwise_sum(buf):  # pragma: no cover - compiled
    """The sum of buf[0] (float64, P entries, P a power of two), pairwise: the upper half is
    added entry by entry to the lower half, into the other row of ``buf``, until one entry is
    left. The order of every addition is fixed by P alone, and each halving is one element-wise
    loop, which vectorises (a running sum would be one chain of dependent additions, which
    FASTMATH, without ``reassoc``, may not split). ``buf`` is used up."""
    src = 0
    half = buf.shape[1] // 2
    while half >= 1:
        a = buf[src]
        b = buf[1 - src]
        for j in range(half):  # [2 half] -> [half]
            b[j] = a[j] + a[j + half]
        src = 1 - src
        half //= 2
    return buf[src, 0]


@serial_kernel
def _moments(x, r, bias, has_bias, buf):  # pragma: no cover - compiled
    """(mean, rstd) of row r of x (+ bias when has_bias), in float64: two passes over the row
    (in L1), each filling buf[0] (the entries, then the squared deviations; zeros past the
    row's end) and summing it with :func:`_pairwise_sum`. rstd = 1 / sqrt(biased variance +
    LN_EPS). ``buf``: :func:`moments_scratch` of x's row length."""
    f = x.shape[1]
    a = buf[0]
    if has_bias:
        for j in range(f):
            a[j] = np.float64(x[r, j] + bias[j])
    else:
        for j in range(f):
            a[j] = np.float64(x[r, j])
    a[f:] = 0.0
    mean = _pairwise_sum(buf) / f
    a = buf[0]
    if has_bias:
        for j in range(f):
            d = np.float64(x[r, j] + bias[j]) - mean
            a[j] = d * d
    else:
        for j in range(f):
            d = np.float64(x[r, j]) - mean
            a[j] = d * d
    a[f:] = 0.0
    return mean, 1.0 / np.sqrt(_pairwise_sum(buf) / f + np.float64(LN_EPS))


@serial_kernel
def normalize_row(x, r, bias, has_bias, gamma, beta, out, r_out, buf):  # pragma: no cover - compiled
    """out[r_out] = LN(x[r] + bias) (+ bias only when has_bias): the LayerNorm of one row of
    x [R, F], the one formula every kernel that normalises uses. ``out`` may be ``x`` with
    r_out = r: the row is read whole (its moments) before any of it is written. ``buf``:
    :func:`moments_scratch` of F.

    In place, the row is rewritten through one view of it: read and written through two arrays
    that overlap, the loop would run its scalar copy (the compiler's overlap check fails), with
    the same bits but several times slower."""
    mean, rstd = _moments(x, r, bias, has_bias, buf)
    m, rs = x.dtype.type(mean), x.dtype.type(rstd)
    f = x.shape[1]
    if x[r:].ctypes.data == out[r_out:].ctypes.data:  # in place
        row = x[r]
        if has_bias:
            for j in range(f):
                row[j] = (row[j] + bias[j] - m) * rs * gamma[j] + beta[j]
        else:
            for j in range(f):
                row[j] = (row[j] - m) * rs * gamma[j] + beta[j]
    elif has_bias:
        for j in range(f):
            out[r_out, j] = (x[r, j] + bias[j] - m) * rs * gamma[j] + beta[j]
    else:
        for j in range(f):
            out[r_out, j] = (x[r, j] - m) * rs * gamma[j] + beta[j]


@parallel_kernel
def _layernorm_rows(x, bias, has_bias, gamma, beta, out):  # pragma: no cover - compiled
    """out[r] = LN(x[r] + bias) for every row r of x [R, F]; out may alias x."""
    rows = x.shape[0]
    for item in prange((rows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        buf = moments_scratch(x.shape[1])
        for r in range(item * ROWS_PER_ITEM, min(rows, (item + 1) * ROWS_PER_ITEM)):
            normalize_row(x, r, bias, has_bias, gamma, beta, out, r, buf)


@parallel_kernel
def _residual_layernorm_rows(z, t, bias, gamma, beta, out):  # pragma: no cover - compiled
    """z[r] += t[r] + bias, then out[r] = LN(z[r]), for every row r of z [R, F]; out may
    alias t (row r of t is read before row r of out is written)."""
    rows, f = z.shape
    for item in prange((rows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        buf = moments_scratch(f)
        for r in range(item * ROWS_PER_ITEM, min(rows, (item + 1) * ROWS_PER_ITEM)):
            for j in range(f):
                z[r, j] += t[r, j] + bias[j]
            normalize_row(z, r, bias, False, gamma, beta, out, r, buf)


@parallel_kernel
def _residual_rows(z, t, bias):  # pragma: no cover - compiled
    """z[r] += t[r] + bias for every row r of z [R, F]."""
    rows, f = z.shape
    for r in prange(rows):
        for j in range(f):
            z[r, j] += t[r, j] + bias[j]


@parallel_kernel
def _bias_gelu_rows(h, bias, tanh_form):  # pragma: no cover - compiled
    """h[r] = GELU(h[r] + bias) in place, for every row r of h [R, F]."""
    for r in prange(h.shape[0]):
        bias_gelu_segment(h[r], bias, tanh_form)


@parallel_kernel
def _layernorm_train_rows(x, gamma, beta, y, xhat, rstd):  # pragma: no cover - compiled
    """y[r] = LN(x[r]), keeping xhat[r] = (x[r] - mean) * rstd[r] for the backward."""
    rows, f = x.shape
    for item in prange((rows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        buf = moments_scratch(f)
        for r in range(item * ROWS_PER_ITEM, min(rows, (item + 1) * ROWS_PER_ITEM)):
            mean, rs = _moments(x, r, gamma, False, buf)
            rstd[r, 0] = rs
            m, rs_t = x.dtype.type(mean), x.dtype.type(rs)
            for j in range(f):
                xh = (x[r, j] - m) * rs_t
                xhat[r, j] = xh
                y[r, j] = xh * gamma[j] + beta[j]


@parallel_kernel
def _merge_heads_rows(o, bias, has_bias, visible, has_visible, out):  # pragma: no cover - compiled
    """out[b*M + i, h*dv:(h+1)*dv] = o[b, h, i] (+ bias[h*dv:(h+1)*dv] when has_bias and the
    sample b saw a key: visible[b], or always without has_visible), for every row b*M + i."""
    nb, nh, m, dv = o.shape
    for row in prange(nb * m):
        b = row // m
        i = row - b * m
        add = has_bias and (visible[b] or not has_visible)
        for h in range(nh):
            if add:
                for e in range(dv):
                    out[row, h * dv + e] = o[b, h, i, e] + bias[h * dv + e]
            else:
                for e in range(dv):
                    out[row, h * dv + e] = o[b, h, i, e]


@serial_kernel
def _backward_sums(dy, xhat, gamma, r, buf):  # pragma: no cover - compiled
    """(sum_j g_j, sum_j g_j xhat[r, j]) with g = dy[r] * gamma, in float64, each a pairwise
    sum in a fixed order (:func:`_pairwise_sum`, which says why). ``buf``:
    :func:`moments_scratch` of the row length."""
    f = dy.shape[1]
    a = buf[0]
    for j in range(f):
        a[j] = np.float64(dy[r, j]) * gamma[j]
    a[f:] = 0.0
    s1 = _pairwise_sum(buf)
    a = buf[0]
    for j in range(f):
        a[j] = np.float64(dy[r, j]) * gamma[j] * xhat[r, j]
    a[f:] = 0.0
    return s1, _pairwise_sum(buf)


@parallel_kernel
def _layernorm_backward_rows(dy, xhat, rstd, gamma, dx, dgamma_part, dbeta_part, block):  # pragma: no cover
    """Per row: dxhat = dy * gamma, dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
    per work item t (a block of rows): its own partial sums dgamma_part[t] = sum dy xhat and
    dbeta_part[t] = sum dy (summed by the caller: a pass of their own)."""
    rows, f = dy.shape
    for t in prange(dgamma_part.shape[0]):
        for j in range(f):
            dgamma_part[t, j] = 0.0
            dbeta_part[t, j] = 0.0
        buf = moments_scratch(f)
        for r in range(t * block, min(rows, (t + 1) * block)):
            s1, s2 = _backward_sums(dy, xhat, gamma, r, buf)
            for j in range(f):
                dgamma_part[t, j] += dy[r, j] * xhat[r, j]
                dbeta_part[t, j] += dy[r, j]
            m1, m2 = dy.dtype.type(s1 / f), dy.dtype.type(s2 / f)
            rs = rstd[r, 0]
            for j in range(f):
                dx[r, j] = rs * (dy[r, j] * gamma[j] - m1 - xhat[r, j] * m2)


def _rows(name: str, a: np.ndarray, f: int | None = None, dtype: np.dtype | None = None,
          inplace: bool = False) -> np.ndarray:
    """Check that ``a`` is a float [R, F] array (of width f, of dtype) and return it as the
    kernels take it (:func:`kernel_array`). An array the kernel updates (``inplace``) must
    already be C-contiguous and writeable: a copy would lose the update."""
    if not isinstance(a, np.ndarray) or a.ndim != 2:
        got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name}: expected a 2-D array [R, F], got {got}")
    if a.dtype not in (np.float32, np.float64) or (dtype is not None and a.dtype != dtype):
        raise TypeError(f"{name}: expected dtype {dtype or 'float32 or float64'}, got {a.dtype.name}")
    if f is not None and a.shape[1] != f:
        raise ValueError(f"{name}: expected F = {f} columns, got shape {a.shape}")
    if inplace:
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError(f"{name}: expected a writeable C-contiguous array (updated in place)")
        return a
    return kernel_array(a)


def _vector(name: str, a: np.ndarray, f: int, dtype: np.dtype) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.shape != (f,):
        got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name}: expected shape ({f},), got {got}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype.name}, got {a.dtype.name}")
    return kernel_array(a)


def layernorm(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """x: [R, F] -> LN(x + bias): [R, F] (into ``out``, which may be ``x``)."""
    x = _rows("x", x)
    f, dt = x.shape[1], x.dtype
    gamma, beta = _vector("gamma", gamma, f, dt), _vector("beta", beta, f, dt)
    has_bias = bias is not None
    b = _vector("bias", bias, f, dt) if bias is not None else gamma
    out = np.empty_like(x) if out is None else _rows("out", out, f, dt, inplace=True)
    if out.shape != x.shape:
        raise ValueError(f"out: expected shape {x.shape}, got {out.shape}")
    with threads_for(x.size):
        _layernorm_rows(x, b, has_bias, gamma, beta, out)
    return out


def residual_layernorm(
    z: np.ndarray, t: np.ndarray, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """z: [R, F] += t [R, F] + bias [F] in place; returns LN(z): [R, F] (into ``out``, which
    may be ``t``: a row of t is read before that row of out is written)."""
    z = _rows("z", z, inplace=True)
    f, dt = z.shape[1], z.dtype
    t = _rows("t", t, f, dt)
    if t.shape != z.shape:
        raise ValueError(f"t: expected shape {z.shape}, got {t.shape}")
    out = np.empty_like(z) if out is None else _rows("out", out, f, dt, inplace=True)
    if out.shape != z.shape:
        raise ValueError(f"out: expected shape {z.shape}, got {out.shape}")
    with threads_for(z.size):
        _residual_layernorm_rows(z, t, _vector("bias", bias, f, dt), _vector("gamma", gamma, f, dt),
                                 _vector("beta", beta, f, dt), out)
    return out


def residual(z: np.ndarray, t: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """z: [R, F] += t [R, F] + bias [F] in place; returns z."""
    z = _rows("z", z, inplace=True)
    t = _rows("t", t, z.shape[1], z.dtype)
    if t.shape != z.shape:
        raise ValueError(f"t: expected shape {z.shape}, got {t.shape}")
    with threads_for(z.size):
        _residual_rows(z, t, _vector("bias", bias, z.shape[1], z.dtype))
    return z


def bias_gelu(h: np.ndarray, bias: np.ndarray, approximate: str = "exact") -> np.ndarray:
    """h: [R, F] = GELU(h + bias [F]) in place; returns h."""
    if approximate not in ("exact", "tanh"):
        raise ValueError(f"approximate: expected 'exact' or 'tanh', got {approximate!r}")
    h = _rows("h", h, inplace=True)
    with threads_for(h.size):
        _bias_gelu_rows(h, _vector("bias", bias, h.shape[1], h.dtype), approximate == "tanh")
    return h


def merge_heads(o: np.ndarray, bias: np.ndarray | None, visible: np.ndarray | None, *,
                alloc: Alloc | None = None) -> np.ndarray:
    """o: [B, H, M, dv] -> [B*M, H*dv], the heads side by side (the output projection's input),
    plus the value bias [H*dv] when given: on every row, or only on the samples whose
    ``visible`` [B] is True (a row that saw no key stays 0). From ``alloc``'s "out" when given."""
    o = kernel_array(o)
    if o.ndim != 4:
        raise ValueError(f"o: expected an array [B, H, M, dv], got {o.shape}")
    b, h, m, dv = o.shape
    has_bias = bias is not None
    bias_arr = _vector("bias", bias, h * dv, o.dtype) if bias is not None else np.zeros(1, o.dtype)
    has_visible = visible is not None
    vis = np.ascontiguousarray(visible, dtype=np.bool_) if visible is not None else np.ones(1, np.bool_)
    if has_visible and vis.shape != (b,):
        raise ValueError(f"visible: expected shape ({b},), got {vis.shape}")
    out = empty(alloc, "out", (b * m, h * dv), o.dtype)
    with threads_for(o.size):
        _merge_heads_rows(o, bias_arr, has_bias, vis, has_visible, out)
    return out


def layernorm_train(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, alloc: Alloc | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: [R, F] -> (y = LN(x) [R, F], xhat [R, F], rstd [R, 1]): the plain path's
    ``layernorm_forward`` and its cache in one pass (the three from ``alloc`` when given)."""
    x = _rows("x", x)
    f, dt = x.shape[1], x.dtype
    y, xhat = empty(alloc, "y", x.shape, dt), empty(alloc, "xhat", x.shape, dt)
    rstd = empty(alloc, "rstd", (x.shape[0], 1), dt)
    with threads_for(x.size):
        _layernorm_train_rows(x, _vector("gamma", gamma, f, dt), _vector("beta", beta, f, dt), y, xhat, rstd)
    return y, xhat, rstd


def layernorm_backward(
    dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, gamma: np.ndarray, *,
    alloc: Alloc | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dy, xhat: [R, F], rstd: [R, 1] -> (dx [R, F], dgamma [F], dbeta [F]); the sums over rows
    are partials over fixed blocks of REDUCTION_BLOCK_ROWS rows first (in the dtype), added in
    block order: the same on any number of threads. dx from ``alloc`` when given."""
    dy = _rows("dy", dy)
    f, dt = dy.shape[1], dy.dtype
    xhat = _rows("xhat", xhat, f, dt)
    if xhat.shape != dy.shape or rstd.shape != (dy.shape[0], 1):
        raise ValueError(f"xhat, rstd: expected shapes {dy.shape} and ({dy.shape[0]}, 1), got "
                         f"{xhat.shape} and {rstd.shape}")
    block = REDUCTION_BLOCK_ROWS
    items = max(1, -(-dy.shape[0] // block))
    dx = empty(alloc, "dx", dy.shape, dt)
    dgamma, dbeta = np.empty((items, f), dtype=dt), np.empty((items, f), dtype=dt)
    with threads_for(dy.size):
        _layernorm_backward_rows(dy, xhat, kernel_array(np.asarray(rstd, dtype=dt)),
                                 _vector("gamma", gamma, f, dt), dx, dgamma, dbeta, block)
    return dx, dgamma.sum(axis=0), dbeta.sum(axis=0)


#: Entries per work item of :func:`max_abs` (256 KiB of float32).
SCAN_BLOCK = 1 << 16
#: Entries per work item of :func:`sum_squares`: its float64 scratch, [2, SQUARES_BLOCK], is 64 KiB.
SQUARES_BLOCK = 1 << 12


@exact_parallel_kernel
def _block_sum_squares(x, block, out):  # pragma: no cover - compiled
    """out[item] = the sum of float64(x[j])^2 over the item's ``block`` entries of the flat x,
    pairwise (:func:`_pairwise_sum`, zeros past x's end): the order of every addition is fixed
    by the block's position in x alone. Compiled without fast-math, so that a NaN or an
    infinity, or a square that overflows float64, comes out as such."""
    n = x.shape[0]
    for item in prange(out.shape[0]):
        lo = item * block
        part = x[lo:min(n, lo + block)]  # indices from 0: no wrap-around test in the loop
        buf = moments_scratch(block)
        a = buf[0]
        for j in range(part.shape[0]):
            v = np.float64(part[j])
            a[j] = v * v
        a[part.shape[0]:] = 0.0
        out[item] = _pairwise_sum(buf)


def sum_squares(x: np.ndarray) -> float:
    """The sum of x^2 over every entry of a float array of any shape, in float64, in one
    parallel pass (no float64 copy of x): pairwise within blocks of SQUARES_BLOCK entries, then
    over the blocks, so the result depends on x alone, never on the thread count. NaN when an
    entry is NaN, infinite when one is or when the sum overflows float64."""
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        got = x.dtype.name if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x: expected a float32 or float64 array, got {got}")
    flat = kernel_array(x).reshape(-1)  # [...] -> [S]
    out = np.empty(-(-flat.size // SQUARES_BLOCK), dtype=np.float64)  # [blocks]
    with threads_for(flat.size):
        _block_sum_squares(flat, SQUARES_BLOCK, out)
    with np.errstate(over="ignore", invalid="ignore"):  # reported by the result: inf or NaN
        return float(np.sum(out))


@parallel_kernel
def _max_magnitude(bits, block, mask, out):  # pragma: no cover - compiled
    """out[i] = the largest ``bits & mask`` over block i of ``bits`` [S] (blocks of ``block``
    entries): the floats' magnitudes (sign bit cleared: ``mask`` is ``mask[0]``, every bit but
    the sign) compared as unsigned integers, which orders non-negative IEEE floats exactly as
    their values (and puts NaN above infinity, so a NaN comes out as NaN, not skipped by a
    comparison). Disjoint outputs, one pass over the data."""
    n = bits.shape[0]
    m = mask[0]
    for item in prange(out.shape[0]):
        lo = item * block
        part = bits[lo:min(n, lo + block)]  # indices from 0: no wrap-around test in the loop
        top = part[0] & m
        for i in range(part.shape[0]):
            top = max(top, part[i] & m)
        out[item] = top


def max_abs(x: np.ndarray) -> float:
    """max |x| over every entry of a float array of any shape, one parallel pass over a
    contiguous x (equal to ``max(np.max(x), -np.min(x))`` for finite x, tested; NaN when an
    entry is NaN). A strided or read-only x (a memory map) is read by NumPy instead of copied
    (a read-only array is another Numba type: it would compile the kernel again)."""
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        got = x.dtype.name if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x: expected a float32 or float64 array, got {got}")
    if x.size == 0:
        raise ValueError("x: expected at least one entry, got an empty array")
    if not (x.flags.c_contiguous and x.flags.writeable and x.dtype.isnative):
        return float(np.maximum(np.max(x), -np.min(x)))  # NaN when one is NaN, as below
    unsigned = np.dtype(np.uint32) if x.dtype == np.float32 else np.dtype(np.uint64)
    magnitude = (1 << (8 * x.itemsize - 1)) - 1  # 0x7FFF...
    bits = x.reshape(-1).view(unsigned)  # [...] -> [S], the same memory
    mask = np.array([magnitude], dtype=unsigned)  # every bit but the sign
    out = np.empty(-(-bits.size // SCAN_BLOCK), dtype=unsigned)
    with threads_for(bits.size):
        _max_magnitude(bits, SCAN_BLOCK, mask, out)
    return float(out.max().view(x.dtype))
