"""Tiled attention on the CPU: FlashAttention's online softmax in Numba.

::

    o, lse = attention_forward(q, k, v, mask=None, scale=None)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, mask=None, scale=None)

Same signatures, shapes and semantics as :mod:`perceiver_np.attention` (the plain NumPy path,
tested equal): q [B, H, M, dh], k [B, H, N, dh], v [B, H, N, dv], mask [B, N] bool (True = keep),
o [B, H, M, dv], lse [B, H, M]. The [B, H, M, N] scores are never materialised: the extra memory
is a few tiles per thread plus O(B·H·M·(dv + 2)) per split of N, independent of N.

Vocabulary (FlashAttention): ``block_m`` queries by ``block_n`` keys per tile; per query the
running max ``m_i``, the running sum ``l_i`` and the output accumulator ``acc``;
``lse = m_i + log(l_i)``; in the backward ``delta = rowsum(dO * O)``.

Passes:

1. ``_forward_partial`` (parallel over batch x head x query block x split of N): stream over
   the key tiles of one split with the online softmax; write the split's (m_i, l_i, acc).
2. ``_forward_merge`` (parallel over batch x head x query): merge the splits' states exactly,
   ``m = max_s m_s``, ``l = sum_s l_s exp(m_s - m)``, ``acc = sum_s acc_s exp(m_s - m)``;
   ``o = acc / l``, ``lse = m + log l``. With one split pass 1 does this last step itself
   (the same arithmetic, :func:`_finish`) and pass 2 does not run.
3. ``_backward_delta`` (parallel over batch x head): ``delta = rowsum(dO * O)``.
4. ``_backward_partial`` (parallel over batch x split of N): for each key tile of the split
   and each head, loop over all query blocks recomputing ``P = exp(S - lse)``; accumulate the tile's
   ``dV += P^T dO`` and ``dK += scale dS^T Q`` (written once: disjoint rows per work item) and
   the split's own partial ``dQ += scale dS K``.
5. ``_backward_sum_dq`` (parallel over batch x head): ``dQ = sum_s dQ_s``.

``input_attention_forward`` (the engine's folded cross-attention, docs/fast.md) is pass 1 and 2
with one head whose keys are also its values and are made from the raw input tile by tile:
``_input_attention_partial`` projects and normalises each key tile in cache just before the
tile products, so nothing of the input side is written to memory.

k and v may be the head-split views of [B, N, H*d] arrays (read where they lie); dk and dv then
come back in that layout. The forward reads q in such a view too (entry by entry, into its
scaled transposed block); the backward copies it C-contiguous. Every parallel loop writes
disjoint outputs; the reductions over splits are passes of their own.
Each tile product is one single-threaded BLAS call (:func:`perceiver_np.kernels.gemm.gemm_rows`)
on the operands as they lie or on scratch allocated once per work item; the wrappers hold BLAS
to one thread while the kernels run (``gemm.single_threaded_blas``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from perceiver_np.constants import MASK_FILL
from perceiver_np.shapes import Alloc, ChunkState, check_attention_args

from ._numba import empty, kernel_array, parallel_kernel, rows_array, serial_kernel
from .fastexp import fast_exp
from .gemm import (
    NONFINITE,
    _check_status,
    _input_and_weight,
    _nonfinite,
    check_blas,
    exponent_mask,
    gemm_rows,
    reads_in_place,
    single_threaded_blas,
)
from .rows import _vector, moments_scratch, normalize_row

#: Queries per tile of the forward. The score tile is held as S^T[block_n, block_m] so that the
#: contiguous query axis is innermost; the wider it is, the more work each coefficient loaded in
#: the tile products does (docs/kernel.md, "Choices", has the measurements).
FORWARD_BLOCK_M = 256
#: Keys per tile of the forward (docs/kernel.md: the size hardly matters between 64 and 256).
FORWARD_BLOCK_N = 128
#: Keys per tile of :func:`input_attention_forward`, whose tiles are made from the raw input
#: first (docs/kernel.md: 256 was the fastest of 64-512 at the seed's shapes).
INPUT_BLOCK_N = 256
#: Queries per block of the backward, which holds S[block_m, block_n] (the ordinary orientation
#: is the faster one there, docs/kernel.md) and dP of the same size.
BACKWARD_BLOCK_M = 64
#: Keys per tile of the backward: the rows of dK and dV a work item owns at a time.
BACKWARD_BLOCK_N = 128
#: A split of N gets at least this many keys, so that merging is cheap next to streaming.
MIN_KEYS_PER_SPLIT = 2048
#: Work items the forward and backward aim for when B * H * (query blocks) is small: the keys
#: are split until there are this many (two per thread on up to 8 threads). A constant, not
#: the thread count, so that the same sums are added in the same order on any machine setting.
SPLIT_TARGET_ITEMS = 16


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@serial_kernel
def _tile_has_visible(mask, b, t0, t1):  # pragma: no cover - compiled
    for t in range(t0, t1):
        if mask[b, t]:
            return True
    return False


@serial_kernel
def _row(a):  # pragma: no cover - compiled
    """Elements from one row of a [B, H, L, d] array to the next (d for a C-contiguous array, H*d
    for the head-split view of a [B, L, H*d] one)."""
    return a.strides[2] // a.itemsize


@serial_kernel
def _head(a, b, h):  # pragma: no cover - compiled
    """The element offset of a[b, h, 0, 0] from a[0, 0, 0, 0] (any strides)."""
    return b * (a.strides[0] // a.itemsize) + h * (a.strides[1] // a.itemsize)


@serial_kernel
def _softmax_state(bm, dv, neg):  # pragma: no cover - compiled
    """The online softmax's state for bm queries before any key, in the dtype of ``neg`` (the
    mask fill): the running max m_i [bm] at ``neg``, m_new and alpha [bm] scratch, the running
    sum l_i [bm] at 0 in float64 (it sums N terms), the unnormalised output acc [dv, bm] at 0."""
    m_i = np.full(bm, neg)
    m_new = np.empty_like(m_i)
    alpha = np.empty_like(m_i)  # exp(m_old - m_new), the rescale of one tile
    l_i = np.zeros(bm, dtype=np.float64)
    acc = np.zeros((dv, bm), dtype=m_i.dtype)  # acc[e, i]
    return m_i, m_new, alpha, l_i, acc


@serial_kernel
def _softmax_tile(tile, mask, has_mask, b, t0, m_i, m_new, alpha, l_i, acc):  # pragma: no cover - compiled
    """One key tile's step of the online softmax, in place: ``tile`` = S^T [bt, bm] of the
    tile's keys t0.. (rows) against the block's queries becomes P^T = exp(S^T - m_i), masked keys
    exactly 0 (keys of sample b whose mask is False); the running max m_i, the running sum l_i
    [bm] and the accumulator acc [dv, bm] are first rescaled to the new max. m_new, alpha: [bm]
    scratch. The caller then adds V_tile^T @ P^T to acc."""
    bt, bm = tile.shape
    dv = acc.shape[0]
    # running max over the visible keys of the tile
    m_new[:] = m_i
    for t in range(bt):
        if has_mask and not mask[b, t0 + t]:
            continue
        row = tile[t]
        for i in range(bm):
            m_new[i] = max(m_new[i], row[i])
    # rescale what was kept so far by exp(m_old - m_new) <= 1: exact, never overflows
    for i in range(bm):
        alpha[i] = fast_exp(m_i[i] - m_new[i])
        l_i[i] *= alpha[i]
        m_i[i] = m_new[i]
    for e in range(dv):
        a = acc[e]
        for i in range(bm):
            a[i] *= alpha[i]
    # P^T = exp(S^T - m_i), masked keys exactly 0; l_i += column sums of P^T
    for t in range(bt):
        row = tile[t]
        if has_mask and not mask[b, t0 + t]:
            row[:] = 0.0
            continue
        for i in range(bm):
            p = fast_exp(row[i] - m_i[i])
            row[i] = p
            l_i[i] += p


@serial_kernel
def _end_split(m_i, l_i, acc, n_splits, sp, b, h, m0, part_m, part_l, part_acc, o, lse,  # pragma: no cover
               neg):
    """The end of a work item of pass 1, for its queries m0.. of head h of sample b: with one
    split, o and lse at once (:func:`_finish`, pass 2's last step); else the split's state
    (m_i, l_i, acc [dv, bm]) into part_m, part_l, part_acc at split ``sp`` for pass 2."""
    bm = m_i.shape[0]
    if n_splits == 1:  # the whole of N: o and lse now, no pass 2
        for i in range(bm):
            _finish(m_i[i], l_i[i], acc[:, i], o[b, h, m0 + i], lse, b, h, m0 + i, neg)
        return
    for i in range(bm):
        part_m[sp, b, h, m0 + i] = m_i[i]
        part_l[sp, b, h, m0 + i] = l_i[i]
    for e in range(acc.shape[0]):
        for i in range(bm):
            part_acc[sp, b, h, e, m0 + i] = acc[e, i]


@parallel_kernel
def _forward_partial(q, k, v, mask, has_mask, scale, block_m, block_n, n_splits,
                     part_m, part_l, part_acc, o, lse, status):  # pragma: no cover - compiled
    """Pass 1. part_m: [S, B, H, M]; part_l: [S, B, H, M] float64; part_acc: [S, B, H, dv, M]
    (queries innermost); status: [work items], nonzero where a BLAS call failed. With one split
    (n_splits = 1) there is nothing to merge: the work item finishes its queries itself, with
    pass 2's arithmetic (:func:`_finish`), into o [B, H, M, dv] and lse [B, H, M], and the
    part_* arrays are not used."""
    nb, nh, m_len, dh = q.shape
    n_len = k.shape[2]
    dv = v.shape[3]
    n_mblocks = (m_len + block_m - 1) // block_m
    split_len = (n_len + n_splits - 1) // n_splits
    neg = q.dtype.type(MASK_FILL)
    k_row, v_row = _row(k), _row(v)  # elements from one key's row to the next
    for work in prange(nb * nh * n_mblocks * n_splits):
        sp = work % n_splits
        mb = (work // n_splits) % n_mblocks
        h = (work // (n_splits * n_mblocks)) % nh
        b = work // (n_splits * n_mblocks * nh)
        m0 = mb * block_m
        bm = min(block_m, m_len - m0)
        n0 = sp * split_len
        n1 = min(n_len, n0 + split_len)
        kb, vb = _head(k, b, h), _head(v, b, h)  # element offsets of k[b, h, 0, 0], v[b, h, 0, 0]
        failed = 0
        # scratch, once per work item
        q_t = np.empty((dh, bm), dtype=q.dtype)  # q_t[d, i] = scale * q[m0 + i, d]
        for i in range(bm):
            for d in range(dh):
                q_t[d, i] = q[b, h, m0 + i, d] * scale
        s_t = np.empty((block_n, bm), dtype=q.dtype)  # S^T of one key tile, then P^T
        m_i, m_new, alpha, l_i, acc = _softmax_state(bm, dv, neg)
        for t0 in range(n0, n1, block_n):
            t1 = min(n1, t0 + block_n)
            bt = t1 - t0
            if has_mask and not _tile_has_visible(mask, b, t0, t1):
                continue  # no visible key in this tile: it changes nothing
            tile = s_t[:bt]
            # S^T = K_tile @ (scale Q)^T   [bt, dh] @ [dh, bm] -> [bt, bm]
            failed |= gemm_rows(False, False, bt, bm, dh, k, kb + t0 * k_row, k_row, q_t, 0, bm,
                                s_t, 0, bm, 0.0)
            _softmax_tile(tile, mask, has_mask, b, t0, m_i, m_new, alpha, l_i, acc)
            # acc += V_tile^T @ P^T   [dv, bt] @ [bt, bm] -> [dv, bm]
            failed |= gemm_rows(True, False, dv, bm, bt, v, vb + t0 * v_row, v_row, s_t, 0, bm,
                                acc, 0, bm, 1.0)
        status[work] = failed
        _end_split(m_i, l_i, acc, n_splits, sp, b, h, m0, part_m, part_l, part_acc, o, lse, neg)


@serial_kernel
def _finish(m, ell, acc, o_row, lse, b, h, i, neg):  # pragma: no cover - compiled
    """One query's end of the forward: o_row [dv] = acc [dv] / ell and lse[b, h, i] = m + log ell
    (ell > 0), or a zero row and lse = ``neg`` when no key was visible (ell = 0: the accumulator
    is zero already). ``acc`` holds the query's unnormalised output, already weighted to the
    running max m (pass 2 weights each split's by exp(m_s - m) first)."""
    if ell > 0.0:
        inv = 1.0 / ell
        for e in range(o_row.shape[0]):
            o_row[e] = acc[e] * inv
        lse[b, h, i] = m + np.log(ell)
    else:
        for e in range(o_row.shape[0]):
            o_row[e] = acc[e]
        lse[b, h, i] = neg


@parallel_kernel
def _forward_merge(part_m, part_l, part_acc, o, lse):  # pragma: no cover - compiled
    """Pass 2. Merge the splits' (m_i, l_i, acc) exactly; o: [B, H, M, dv], lse: [B, H, M].
    Parallel over every query of every batch x head (one sample's one head, B = H = 1, is the
    streaming encoder's case): each query's row of o is its own output."""
    n_splits, nb, nh, m_len = part_m.shape
    dv = o.shape[3]
    neg = o.dtype.type(MASK_FILL)
    for bhi in prange(nb * nh * m_len):
        i = bhi % m_len
        b = bhi // (nh * m_len)
        h = (bhi // m_len) % nh
        m = part_m[0, b, h, i]
        for sp in range(1, n_splits):
            m = max(m, part_m[sp, b, h, i])
        ell = 0.0
        row = o[b, h, i]  # [dv]: the splits' weighted sum, then the output
        for e in range(dv):
            row[e] = 0.0
        for sp in range(n_splits):
            w = fast_exp(part_m[sp, b, h, i] - m)
            ell += part_l[sp, b, h, i] * w
            for e in range(dv):
                row[e] += part_acc[sp, b, h, e, i] * w
        _finish(m, ell, row, row, lse, b, h, i, neg)


@parallel_kernel
def _merge_chunk(m_run, l_run, acc, o_c, lse_c):  # pragma: no cover - compiled
    """Fold one chunk of keys' (o_c, lse_c) into the running state, in float64:
    m = max(m, lse_c); l = l exp(m_old - m) + exp(lse_c - m); acc = acc exp(m_old - m) + exp(lse_c - m) o_c.
    m_run, l_run: [B, H, M] float64; acc: [B, H, M, dv] float64; o_c [B, H, M, dv], lse_c [B, H, M]."""
    nb, nh, m_len = m_run.shape
    dv = acc.shape[3]
    for bh in prange(nb * nh):
        b = bh // nh
        h = bh % nh
        for i in range(m_len):
            lc = np.float64(lse_c[b, h, i])
            m_new = max(m_run[b, h, i], lc)
            alpha = np.exp(m_run[b, h, i] - m_new)
            w = np.exp(lc - m_new)
            l_run[b, h, i] = l_run[b, h, i] * alpha + w
            for e in range(dv):
                acc[b, h, i, e] = acc[b, h, i, e] * alpha + w * o_c[b, h, i, e]
            m_run[b, h, i] = m_new


def merge_chunk(state: ChunkState, o_c: np.ndarray, lse_c: np.ndarray) -> None:
    """Fold one chunk's ``attention_forward`` result (o_c [B, H, M, dv], lse_c [B, H, M]) into
    ``state``, in place: a softmax over the union of the chunks' keys is the
    exp(lse)-weighted mean of the chunks' softmaxes (the merge of pass 2, across calls). The
    plain twin, and ``chunk_state`` / ``finish_chunks`` that both use, are in
    :mod:`perceiver_np.attention`."""
    expect = state.acc.shape
    if o_c.shape != expect or lse_c.shape != expect[:3]:
        raise ValueError(f"o_c, lse_c: expected shapes {expect} and {expect[:3]}, got {o_c.shape} "
                         f"and {lse_c.shape}")
    _merge_chunk(state.m, state.l, state.acc, kernel_array(o_c), kernel_array(lse_c))


# ---------------------------------------------------------------------------------------------
# Forward, the keys and values made from the raw input in cache
# ---------------------------------------------------------------------------------------------


@parallel_kernel
def _input_attention_partial(x, w_in, gamma, beta, bias, has_bias, q, scale, mask, has_mask, block_n,
                             n_splits, part_m, part_l, part_acc, o, lse, status, check,
                             exp_mask):  # pragma: no cover - compiled
    """Pass 1 of :func:`input_attention_forward`, parallel over batch x split of N: pass 1 of
    :func:`_forward_partial` with one head, all Q queries in one block, and each key tile
    made in cache from the raw input first, h = LN(x[b, tile] @ w_in + bias), which is the
    tile's keys and its values at once. x [B, N, C] (row stride x.strides[1]: a chunk of a
    longer input is read as it lies), w_in [C, D], gamma, beta, bias [D], q [B, Q, D];
    part_m, part_l [S, B, 1, Q], part_acc [S, B, 1, D, Q]; o [B, 1, Q, D], lse [B, 1, Q];
    status[work item]: a failed BLAS call's code, or NONFINITE when ``check`` finds NaN or
    infinity in h (what the input projection made of finite x)."""
    nb, n_len, c_in = x.shape
    d = w_in.shape[1]
    q_len = q.shape[1]
    sx0, sx1 = x.strides[0] // x.itemsize, x.strides[1] // x.itemsize
    split_len = (n_len + n_splits - 1) // n_splits
    neg = x.dtype.type(MASK_FILL)
    for work in prange(nb * n_splits):
        sp = work % n_splits
        b = work // n_splits
        n0 = sp * split_len
        n1 = min(n_len, n0 + split_len)
        failed = 0
        # scratch, once per work item
        q_t = np.empty((d, q_len), dtype=x.dtype)  # q_t[e, i] = scale * q[b, i, e]
        for i in range(q_len):
            for e in range(d):
                q_t[e, i] = q[b, i, e] * scale
        h_t = np.empty((block_n, d), dtype=x.dtype)  # one key tile: h = LN(x @ w_in + bias)
        buf = moments_scratch(d)
        s_t = np.empty((block_n, q_len), dtype=x.dtype)  # S^T of one key tile, then P^T
        m_i, m_new, alpha, l_i, acc = _softmax_state(q_len, d, neg)
        for t0 in range(n0, n1, block_n):
            t1 = min(n1, t0 + block_n)
            bt = t1 - t0
            if has_mask and not _tile_has_visible(mask, b, t0, t1):
                continue  # no visible key in this tile: it changes nothing
            tile = s_t[:bt]
            # h = x[b, t0:t1] @ W_in   [bt, C] @ [C, D] -> [bt, D]; then LN(h + bias) in place
            failed = gemm_rows(False, False, bt, d, c_in, x, b * sx0 + t0 * sx1, sx1, w_in, 0, d,
                               h_t, 0, d, 0.0)
            if failed != 0:
                break
            for r in range(bt):
                normalize_row(h_t, r, bias, has_bias, gamma, beta, h_t, r, buf)
            if check and _nonfinite(h_t, 0, bt, 0, d, exp_mask) > 0:
                failed = NONFINITE
                break
            # S^T = H_tile @ (scale Q)^T   [bt, D] @ [D, Q] -> [bt, Q]
            failed = gemm_rows(False, False, bt, q_len, d, h_t, 0, d, q_t, 0, q_len, s_t, 0, q_len, 0.0)
            if failed != 0:
                break
            _softmax_tile(tile, mask, has_mask, b, t0, m_i, m_new, alpha, l_i, acc)
            # acc += H_tile^T @ P^T (the values are the keys)   [D, bt] @ [bt, Q] -> [D, Q]
            failed = gemm_rows(True, False, d, q_len, bt, h_t, 0, d, s_t, 0, q_len, acc, 0, q_len, 1.0)
            if failed != 0:
                break
        status[work] = failed
        _end_split(m_i, l_i, acc, n_splits, sp, b, 0, 0, part_m, part_l, part_acc, o, lse, neg)


def input_attention_forward(
    x: np.ndarray,
    w_in: np.ndarray,
    norm: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    q: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
    *,
    block_n: int = INPUT_BLOCK_N,
    n_splits: int | None = None,
    alloc: Alloc | None = None,
    finite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Attention to keys that are also the values and are made from the raw input:
    h = LN(x @ w_in + bias) [B, N, D] (``norm`` = (gamma, beta, bias or None)), then
    ``attention_forward(q[:, None], h[:, None], h[:, None], mask, scale)`` -> (o [B, 1, Q, D],
    lse [B, 1, Q]), with each tile of h made in cache and never written out (the folded cross
    attention of :func:`perceiver_np.engine.cross_block`). x [B, N, C] (a strided chunk of a
    longer input is read as it lies), w_in [C, D], q [B, Q, D], mask [B, N] bool (True = keep).
    Equal to that composition up to rounding (tested against the plain twin). Buffers from
    ``alloc`` as :func:`attention_forward`'s; ``finite``: NaN or infinity in h raises the
    OverflowRisk of a checked product (:func:`perceiver_np.kernels.gemm.raise_nonfinite_product`)."""
    x, w_in = _input_and_weight(x, w_in, "w_in", "C", "D")
    b, n, _ = x.shape
    d = w_in.shape[1]
    if not isinstance(q, np.ndarray) or q.dtype != x.dtype:
        got = q.dtype.name if isinstance(q, np.ndarray) else type(q).__name__
        raise TypeError(f"q: expected dtype {x.dtype.name} like x, got {got}")
    if q.ndim != 3 or q.shape[0] != b or q.shape[2] != d or q.shape[1] == 0:
        raise ValueError(f"q: expected shape ({b}, Q, {d}) [B, Q, D], got {q.shape}")
    if n == 0:
        raise ValueError(f"x: every size must be positive, got {x.shape}")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            got = mask.dtype.name if isinstance(mask, np.ndarray) else type(mask).__name__
            raise TypeError(f"mask: expected a bool array (True = keep), got {got}")
        if mask.shape != (b, n):
            raise ValueError(f"mask: expected shape ({b}, {n}) [B, N], got {mask.shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number, got {scale}")
    gamma, beta = _vector("gamma", norm[0], d, x.dtype), _vector("beta", norm[1], d, x.dtype)
    bias = None if norm[2] is None else _vector("bias", norm[2], d, x.dtype)
    if not reads_in_place(x):
        x = kernel_array(x)  # a read-only chunk (of a memory map), or one not read by rows: copied
    q_len = q.shape[1]
    q = kernel_array(q)
    has_mask = mask is not None
    mask_arr = kernel_array(mask) if mask is not None else np.ones((1, 1), dtype=np.bool_)
    if n_splits is None:
        n_splits = choose_splits(b, n)  # a work item is one sample's split
    n_splits = max(1, min(int(n_splits), n))
    parts = 0 if n_splits == 1 else n_splits  # one split: pass 1 writes o and lse
    part_m = empty(alloc, "part_m", (parts, b, 1, q_len), x.dtype)
    part_l = empty(alloc, "part_l", (parts, b, 1, q_len), np.float64)
    part_acc = empty(alloc, "part_acc", (parts, b, 1, d, q_len), x.dtype)
    o = empty(alloc, "o", (b, 1, q_len, d), x.dtype)
    lse = empty(alloc, "lse", (b, 1, q_len), x.dtype)
    status = np.zeros(b * n_splits, dtype=np.int32)
    with single_threaded_blas():
        _input_attention_partial(x, w_in, gamma, beta, gamma if bias is None else bias, bias is not None,
                                 q, x.dtype.type(scale), mask_arr, has_mask, block_n, n_splits, part_m,
                                 part_l, part_acc,
                                 o, lse, status, finite, exponent_mask(x.dtype))
    _check_status(status)
    if parts:
        _forward_merge(part_m, part_l, part_acc, o, lse)
    return o, lse


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@parallel_kernel
def _backward_delta(do, o, delta):  # pragma: no cover - compiled
    """Pass 3. delta[b, h, i] = sum_e dO[b, h, i, e] * O[b, h, i, e]."""
    nb, nh, m_len, dv = do.shape
    for bh in prange(nb * nh):
        b = bh // nh
        h = bh % nh
        for i in range(m_len):
            s = 0.0
            for e in range(dv):
                s += do[b, h, i, e] * o[b, h, i, e]
            delta[b, h, i] = s


@parallel_kernel
def _backward_partial(do, q, k, v, lse, delta, mask, has_mask, scale, block_m, block_n,
                      n_splits, dq_part, dk, dv_out, status):  # pragma: no cover - compiled
    """Pass 4. dq_part: [S, B, H, M, dh] float64; dk, dv_out: [B, H, N, dh|dv], rows written once;
    status: [work items], nonzero where a BLAS call failed.

    A work item is one sample's split of the keys, all heads: for each key tile, the heads one
    after the other, so that a tile's keys of every head are read while in cache (in the
    head-split layout one key's heads share its row). A key tile's contribution to dQ is summed
    in the inputs' dtype (block_n terms) and added to the float64 partial, so that dQ's sum over
    all N keys does not grow float32 rounding as N."""
    nb, nh, m_len, dh = q.shape
    n_len = k.shape[2]
    dv = v.shape[3]
    split_len = (n_len + n_splits - 1) // n_splits
    k_row, dk_row, dv_row = _row(k), _row(dk), _row(dv_out)  # elements from one key's row to the next
    for work in prange(nb * n_splits):
        sp = work % n_splits
        b = work // n_splits
        n0 = sp * split_len
        n1 = min(n_len, n0 + split_len)
        failed = 0
        dq_part[sp, b] = 0.0  # [H, M, dh], this split's own partial dQ of every head
        # scratch, once per work item
        q_s = np.empty((nh, m_len, dh), dtype=q.dtype)  # scale * q of every head
        for h in range(nh):
            for i in range(m_len):
                for d in range(dh):
                    q_s[h, i, d] = q[b, h, i, d] * scale
        k_t = np.empty((dh, block_n), dtype=q.dtype)  # k_t[d, t] = k[t0 + t, d]
        v_t = np.empty((dv, block_n), dtype=q.dtype)  # v_t[e, t] = v[t0 + t, e]
        keep = np.empty(block_n, dtype=q.dtype)  # 1 for a visible key, 0 for a masked one
        p = np.empty((block_m, block_n), dtype=q.dtype)  # P of one tile, then dS
        dp = np.empty((block_m, block_n), dtype=q.dtype)  # dP of one tile
        dq_tile = np.empty((block_m, dh), dtype=q.dtype)  # one tile's dQ, before the float64 sum
        for t0 in range(n0, n1, block_n):
            t1 = min(n1, t0 + block_n)
            bt = t1 - t0
            for h in range(nh):  # rows owned by this work item
                dk[b, h, t0:t1] = 0.0
                dv_out[b, h, t0:t1] = 0.0
            if has_mask and not _tile_has_visible(mask, b, t0, t1):
                continue  # masked keys get exactly zero gradient
            # a ragged last tile is padded with zero keys that are also masked (keep = 0), so
            # every row the inner loops touch is contiguous and of one length (they vectorise)
            # and the padding adds 0
            for t in range(block_n):
                visible = t < bt and not (has_mask and not mask[b, t0 + t])
                keep[t] = 1.0 if visible else 0.0
            for h in range(nh):
                kb, dkb, dvb = _head(k, b, h), _head(dk, b, h), _head(dv_out, b, h)  # offsets of [b, h, 0, 0]
                qb = (b * nh + h) * m_len * dh  # of q[b, h, 0, 0] (C-contiguous)
                ob = (b * nh + h) * m_len * dv  # of do[b, h, 0, 0] (C-contiguous)
                dq = dq_part[sp, b, h]  # [M, dh]
                # K and V of the tile transposed, full block_n wide (zero padding)
                for t in range(block_n):
                    for d in range(dh):
                        k_t[d, t] = k[b, h, t0 + t, d] if t < bt else 0.0
                    for e in range(dv):
                        v_t[e, t] = v[b, h, t0 + t, e] if t < bt else 0.0
                for m0 in range(0, m_len, block_m):
                    bm = min(block_m, m_len - m0)
                    p_b = p[:bm]  # [bm, block_n]
                    dp_b = dp[:bm]
                    # S = (scale Q) @ K^T   [bm, dh] @ [dh, block_n] -> [bm, block_n]
                    failed |= gemm_rows(False, False, bm, block_n, dh, q_s, (h * m_len + m0) * dh, dh,
                                        k_t, 0, block_n, p, 0, block_n, 0.0)
                    # P = exp(S - lse), masked and padding keys exactly 0
                    for i in range(bm):
                        li = lse[b, h, m0 + i]
                        row = p_b[i]
                        for t in range(block_n):
                            row[t] = fast_exp(row[t] - li) * keep[t]
                    # dV += P^T @ dO   [bt, bm] @ [bm, dv] -> [bt, dv]
                    failed |= gemm_rows(True, False, bt, dv, bm, p, 0, block_n, do, ob + m0 * dv, dv,
                                        dv_out, dvb + t0 * dv_row, dv_row, 1.0)
                    # dP = dO @ V^T   [bm, dv] @ [dv, block_n] -> [bm, block_n]
                    failed |= gemm_rows(False, False, bm, block_n, dv, do, ob + m0 * dv, dv,
                                        v_t, 0, block_n, dp, 0, block_n, 0.0)
                    # dS = scale * P * (dP - delta), in place of P
                    for i in range(bm):
                        di = delta[b, h, m0 + i]
                        row = p_b[i]
                        drow = dp_b[i]
                        for t in range(block_n):
                            row[t] = row[t] * (drow[t] - di) * scale
                    # dQ += dS @ K   [bm, bt] @ [bt, dh] -> [bm, dh]
                    dq_b = dq_tile[:bm]
                    failed |= gemm_rows(False, False, bm, dh, bt, p, 0, block_n, k, kb + t0 * k_row, k_row,
                                        dq_tile, 0, dh, 0.0)
                    for i in range(bm):
                        for d in range(dh):
                            dq[m0 + i, d] += dq_b[i, d]
                    # dK += dS^T @ Q   [bt, bm] @ [bm, dh] -> [bt, dh]
                    failed |= gemm_rows(True, False, bt, dh, bm, p, 0, block_n, q, qb + m0 * dh, dh,
                                        dk, dkb + t0 * dk_row, dk_row, 1.0)
        status[work] = failed


@parallel_kernel
def _backward_sum_dq(dq_part, dq):  # pragma: no cover - compiled
    """Pass 5. dq = sum over splits of dq_part."""
    n_splits, nb, nh, m_len, dh = dq_part.shape
    for bh in prange(nb * nh):
        b = bh // nh
        h = bh % nh
        for i in range(m_len):
            for d in range(dh):
                s = dq_part[0, b, h, i, d]
                for sp in range(1, n_splits):
                    s += dq_part[sp, b, h, i, d]
                dq[b, h, i, d] = s


# ---------------------------------------------------------------------------------------------
# Wrappers: validate, allocate, choose tiles and splits
# ---------------------------------------------------------------------------------------------


def choose_splits(parallel_items: int, n: int, target: int = SPLIT_TARGET_ITEMS) -> int:
    """Splits of N so that ``parallel_items * splits`` reaches ``target`` work items where N
    allows it, each split holding at least MIN_KEYS_PER_SPLIT keys. Never from the thread
    count: the splits decide the order of the sums, so the results are bitwise the same on
    any number of threads."""
    if parallel_items >= target:
        return 1
    want = -(-target // parallel_items)  # ceil
    return max(1, min(want, n // MIN_KEYS_PER_SPLIT))


def _prepare(q, k, v, mask, scale, q_view=False):
    """The checked arguments as the kernels take them; ``q_view``: q too is read as it lies
    (the forward reads it entry by entry; the backward's tile products need it C-contiguous)."""
    scale = check_attention_args(q, k, v, mask, scale)
    q = rows_array(q) if q_view else kernel_array(q)
    k, v = rows_array(k), rows_array(v)  # read as they lie: a head-split view is not copied
    has_mask = mask is not None
    mask_arr = kernel_array(mask) if has_mask else np.ones((1, 1), dtype=np.bool_)
    return q, k, v, mask_arr, has_mask, q.dtype.type(scale)


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
    *,
    block_m: int = FORWARD_BLOCK_M,
    block_n: int = FORWARD_BLOCK_N,
    n_splits: int | None = None,
    alloc: Alloc | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (o [B, H, M, dv], lse [B, H, M]) in the inputs' dtype. ``n_splits`` (default: chosen
    from N and the work items, never from the thread count) splits N into work items; the result
    does not depend on it beyond rounding. Every buffer (the splits' partial states, o and lse)
    comes from ``alloc`` when given (:func:`perceiver_np.kernels._numba.empty`)."""
    q, k, v, mask_arr, has_mask, sc = _prepare(q, k, v, mask, scale, q_view=True)
    b, h, m, _ = q.shape
    n, dv = k.shape[2], v.shape[3]
    n_mblocks = math.ceil(m / block_m)
    if n_splits is None:
        n_splits = choose_splits(b * h * n_mblocks, n)
    n_splits = max(1, min(int(n_splits), n))
    parts = 0 if n_splits == 1 else n_splits  # one split: pass 1 writes o and lse, no partial states
    part_m = empty(alloc, "part_m", (parts, b, h, m), q.dtype)
    part_l = empty(alloc, "part_l", (parts, b, h, m), np.float64)
    part_acc = empty(alloc, "part_acc", (parts, b, h, dv, m), q.dtype)
    o = empty(alloc, "o", (b, h, m, dv), q.dtype)
    lse = empty(alloc, "lse", (b, h, m), q.dtype)
    status = np.zeros(b * h * n_mblocks * n_splits, dtype=np.int32)
    with single_threaded_blas():
        _forward_partial(q, k, v, mask_arr, has_mask, sc, block_m, block_n, n_splits,
                         part_m, part_l, part_acc, o, lse, status)
    check_blas(status)
    if parts:
        _forward_merge(part_m, part_l, part_acc, o, lse)
    return o, lse


def _heads_like(alloc: Alloc | None, name: str, a: np.ndarray, d: int) -> np.ndarray:
    """An output [B, H, N, d] in the head layout of ``a`` [B, H, N, .]: the head-split view of
    a new [B, N, H, d] array when ``a`` is such a view (so that merging the heads back is free),
    else C-contiguous."""
    b, h, n, _ = a.shape
    if h > 1 and a.strides[1] < a.strides[2]:  # heads inside a row: [B, N, H, .] transposed
        return empty(alloc, name, (b, n, h, d), a.dtype).transpose(0, 2, 1, 3)  # [B, N, H, d] -> [B, H, N, d]
    return empty(alloc, name, (b, h, n, d), a.dtype)


def attention_backward(
    do: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    lse: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
    *,
    block_m: int = BACKWARD_BLOCK_M,
    block_n: int = BACKWARD_BLOCK_N,
    n_splits: int | None = None,
    alloc: Alloc | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (dq [B, H, M, dh], dk [B, H, N, dh], dv [B, H, N, dv]) in the inputs' dtype; every
    buffer (delta, the splits' partial dq, dq, dk, dv) from ``alloc`` when given. dk and dv
    come in the head layout of k and v: the head-split view of a [B, N, H*d] array when k and v
    are such views (:func:`perceiver_np.kernels._numba.rows_array`), else C-contiguous."""
    q, k, v, mask_arr, has_mask, sc = _prepare(q, k, v, mask, scale)
    b, h, m, dh = q.shape
    n, dv = k.shape[2], v.shape[3]
    for name, arr, shape in (("do", do, (b, h, m, dv)), ("o", o, (b, h, m, dv)),
                             ("lse", lse, (b, h, m))):
        if not isinstance(arr, np.ndarray) or arr.dtype != q.dtype:
            got = arr.dtype.name if isinstance(arr, np.ndarray) else type(arr).__name__
            raise TypeError(f"{name}: expected dtype {q.dtype.name} like q, got {got}")
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    do, o, lse = (kernel_array(a) for a in (do, o, lse))
    if n_splits is None:
        n_splits = choose_splits(b, n)  # a work item is one sample's split, all heads
    n_splits = max(1, min(int(n_splits), n))
    delta = empty(alloc, "delta", (b, h, m), q.dtype)
    _backward_delta(do, o, delta)
    dq_part = empty(alloc, "dq_part", (n_splits, b, h, m, dh), np.float64)
    dk, dv_out = _heads_like(alloc, "dk", k, dh), _heads_like(alloc, "dv", v, dv)
    status = np.zeros(b * n_splits, dtype=np.int32)
    with single_threaded_blas():
        _backward_partial(do, q, k, v, lse, delta, mask_arr, has_mask, sc, block_m, block_n,
                          n_splits, dq_part, dk, dv_out, status)
    check_blas(status)
    dq = empty(alloc, "dq", (b, h, m, dh), q.dtype)
    _backward_sum_dq(dq_part, dq)
    return dq, dk, dv_out
