"""Matrix products on Numba's thread pool: single-threaded BLAS calls on disjoint tiles.

::

    y = matmul(a, w, bias=b)      a [R, K] @ w [K, F] (+ b [F]) -> y [R, F] (w may be a weight's transpose)
    y = matmul(a, w, bias=b, gelu="exact")   GELU(a @ w + b), the GELU on each tile in cache
    z = matmul_residual(a, w, z, b)          z [R, F] += a @ w + b, each tile added in cache
    u = matmul_residual(a, w, z, b, norm=(gamma, beta))   the same, then LN(z) row by row
    g = matmul_tn(a, dy)          a [R, I], dy [R, O] -> a.T @ dy [I, O] (fixed-block partial sums)
    g, s = matmul_tn_sums(a, dy)  -> (a.T @ dy [I, O], dy's column sums [O]): a linear layer's grads
    y = matmul_batched(x, w)      x [B, S, K] (a strided chunk is fine) @ w [K, F] -> y [B, S, F]
    k, v = project_heads(x, [w_k, w_v], H)   x [B, S, K] @ w [K, H*d] -> [B, H, S, d] views each
    k, v = project_input(x, w_in, norm, [w_k, w_v], H)   LN(x @ w_in + b) @ w -> [B, H, S, d] views

Why not ``a @ w`` with BLAS's own threads: an OpenBLAS worker keeps spinning for a while after
each product (its ``THREAD_TIMEOUT``), and a Numba kernel started in that window shares a core
with it (docs/fast.md has the measurement). With every product and every kernel of the engine on
Numba's pool, one pool owns the cores and nothing spins between steps. Each work item is one
BLAS sgemm/dgemm on its own tile of the output (the BLAS of :mod:`perceiver_np.kernels.blas`:
SciPy's, the one ``np.dot`` calls in Numba, held to one thread for the call so that the two
pools never stack; MKL's sequential one; or BLIS's, built without threads): the parallel
loops write disjoint outputs.

The tiles (:func:`tiles`): a BLAS call first copies its rows of ``a`` and its columns of ``w``
into its own layout ("packing"), so every tile that spans all of ``w``'s columns packs all of
``w`` again. Many rows (a batch) are split into row blocks, as the weight is small beside them;
few rows against a wide weight (one sample's 256 latents of 1280 channels) are split into
column blocks, so that the threads pack one part of the weight each instead of all of it each.
The tiles are cut for ``blas.FIXED_TILE_THREADS`` threads whatever the real count, as a
BLAS's bits may depend on a tile's shape (:mod:`perceiver_np.kernels.blas`). The call goes
through the BLAS table with explicit leading dimensions (:func:`_xxgemm`), which also reads a
weight's transpose (``w.T`` in a backward) in place instead of copying it.

``gemm_rows`` is one such call on sub-blocks (offsets and row strides into arrays as they lie,
either operand transposed, ``beta`` 0 or 1): the attention kernel's tile products.

``project_heads`` computes several projections of the same input, tile by tile (with the
LayerNorm before them fused in), each written by BLAS into a [B, S, H*d] buffer whose head-split
view [B, H, S, d] the attention kernel reads as it lies: no scatter into a per-head layout.

The products' epilogues (a bias, bias + GELU, a residual, a residual then the next LayerNorm)
run on each tile right after its product, while it is in cache, instead of as passes of their
own over the whole output: the same formulas as the row kernels of
:mod:`perceiver_np.kernels.rows` (tested equal).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from perceiver_np.shapes import Alloc, OverflowRisk

from . import blas, rows
from ._numba import REDUCTION_BLOCK_ROWS, empty, kernel_array, parallel_kernel, serial_kernel
from .elementwise import bias_gelu_segment
from .rows import moments_scratch, normalize_row

#: Products of fewer multiply-adds than this are one BLAS call on the calling thread (NumPy's
#: ``@``): OpenBLAS itself runs them single-threaded (its SMP threshold, 65536 x 4), so no
#: worker wakes or spins, and waking Numba's pool would cost more than the product.
SMALL_PRODUCT = 1 << 18
#: Fewest rows in one BLAS call: below this the call overhead outweighs splitting further.
MIN_BLOCK_ROWS = 64
#: Fewest columns in one BLAS call, and the multiple every column block is rounded up to
#: (16 float32 = one 64-byte cache line), for the same reason.
MIN_BLOCK_COLS = 64
COL_ALIGN = 16
#: The ``tensor`` of the OverflowRisk a product checked with ``finite=True`` raises (the engine
#: renames it after the block it happened in).
PRODUCT = "product"
#: Rows per work item (at most) of ``project_heads``, ``project_input`` and ``matmul_batched``:
#: the block's LayerNorm output (or input projection) stays in L2 while the products read it
#: (256 x 256 float32 = 256 KiB). Fewer rows (the latents of one sample) are tiled by
#: :func:`tiles`, by rows or by columns.
PROJECT_BLOCK_ROWS = 256
#: Rows per tile (at most) of a product with a bias (:func:`matmul`): the tile stays in L2
#: (512 x 256 float32 = 512 KiB) while the bias is added, at the price of more BLAS calls than
#: one tile per thread (each packs its columns of the weight again).
BIAS_BLOCK_ROWS = 512


#: What :func:`_xxgemm` returns when it did not call BLAS: a size or leading dimension does not
#: fit the 32-bit integers of the BLAS interface, or the table holds no function.
BLAS_REFUSED = -1


@intrinsic
def _xxgemm(typingctx, w_trans, a_trans, m, n, k, w, w_off, ldw, a, a_off, lda,  # pragma: no cover
            out, out_off, ldo, beta):
    """One BLAS gemm in column-major terms, C = op(W) @ op(A) + beta C with op(W) [m, k],
    op(A) [k, n], C [m, n]: W, A and C are the buffers of ``w``, ``a`` and ``out`` from the
    element offsets ``*_off`` on, with leading dimensions ``ldw``, ``lda``, ``ldo``; op(X) = X^T
    when ``x_trans``. The call goes through the table of :mod:`perceiver_np.kernels.blas` (the
    sgemm or dgemm of the BLAS chosen there, Fortran interface: every argument by reference),
    given strides and offsets that ``np.dot`` cannot take. Returns 0 when BLAS was called,
    BLAS_REFUSED when a size or leading dimension is outside 0..2^31-1 or the table is empty."""
    if not (isinstance(w, types.Array) and isinstance(a, types.Array) and isinstance(out, types.Array)
            and w.dtype == a.dtype == out.dtype and w.dtype in (types.float32, types.float64)):
        return None
    sig = types.intc(w_trans, a_trans, m, n, k, w, w_off, ldw, a, a_off, lda, out, out_off, ldo, beta)

    def codegen(context, builder, signature, args):
        tys = signature.args
        i8, i32 = ir.IntType(8), ir.IntType(32)
        void_p, i32_p = i8.as_pointer(), i32.as_pointer()
        intp = context.get_value_type(types.intp)

        def size(i):
            return context.cast(builder, args[i], tys[i], types.intp)

        def data(i, off):
            ary = context.make_array(tys[i])(context, builder, args[i])
            return builder.bitcast(builder.gep(ary.data, [size(off)]), void_p)

        def trans(i):
            flag = builder.select(context.cast(builder, args[i], tys[i], types.boolean),
                                  ir.Constant(i8, ord("T")), ir.Constant(i8, ord("N")))
            return cgutils.alloca_once_value(builder, flag)

        dtype = tys[5].dtype
        sizes = [size(i) for i in (2, 3, 4, 7, 10, 13)]  # m, n, k, ldw, lda, ldo
        fits = cgutils.true_bit
        for v in sizes:
            fits = builder.and_(fits, builder.icmp_unsigned("<=", v, ir.Constant(intp, 0x7FFFFFFF)))
        ints = [cgutils.alloca_once_value(builder, builder.trunc(v, i32)) for v in sizes]
        one = cgutils.alloca_once_value(builder, context.get_constant(dtype, 1.0))
        beta_v = cgutils.alloca_once_value(builder, context.cast(builder, args[14], tys[14], dtype))
        table_ty = ir.ArrayType(void_p, 3)  # [sgemm, dgemm, the BLAS's index]: kernels/blas.py
        table = builder.module.globals.get(blas.TABLE_SYMBOL)
        if table is None:
            table = ir.GlobalVariable(builder.module, table_ty, name=blas.TABLE_SYMBOL)
            table.linkage = "external"
        slot = 0 if dtype == types.float32 else 1  # sgemm, dgemm
        fn = builder.load(builder.gep(table, [ir.Constant(i32, 0), ir.Constant(i32, slot)]))
        fits = builder.and_(fits, builder.icmp_unsigned("!=", fn, ir.Constant(void_p, None)))
        status = cgutils.alloca_once_value(builder, ir.Constant(i32, BLAS_REFUSED))
        fnty = ir.FunctionType(ir.VoidType(), [void_p, void_p, i32_p, i32_p, i32_p, void_p, void_p, i32_p,
                                               void_p, i32_p, void_p, void_p, i32_p])
        with builder.if_then(fits):
            m_, n_, k_, ldw_, lda_, ldo_ = ints
            builder.call(builder.bitcast(fn, fnty.as_pointer()),
                         (trans(0), trans(1), m_, n_, k_, builder.bitcast(one, void_p), data(5, 6), ldw_,
                          data(8, 9), lda_, builder.bitcast(beta_v, void_p), data(11, 12), ldo_))
            builder.store(ir.Constant(i32, 0), status)
        return builder.load(status)

    return sig, codegen


@serial_kernel
def gemm_rows(a_trans, b_trans, m, n, k, a, a_off, lda, b, b_off, ldb,  # pragma: no cover - compiled
              c, c_off, ldc, beta):
    """Row-major C[m, n] = op(A) [m, k] @ op(B) [k, n] + beta C, one single-threaded BLAS call on
    sub-blocks of C-contiguous arrays: A, B, C start at the element offsets ``*_off`` of ``a``,
    ``b``, ``c`` with row strides ``lda``, ``ldb``, ``ldc``; op(X) = X^T when ``x_trans`` (X as it
    lies, [k, m] for A). ``beta`` = 0 overwrites C (its old contents are never read), 1 adds to
    it. In column-major terms, which BLAS speaks, this is C^T = op(B)^T @ op(A)^T. Returns BLAS's
    status (0 = done). The attention kernel's tile products (:mod:`perceiver_np.kernels.attention`)."""
    return _xxgemm(b_trans, a_trans, n, m, k, b, b_off, ldb, a, a_off, lda, c, c_off, ldc, beta)


@serial_kernel
def _tile_product(a, r0, r1, w, c0, c1, out, o_off, ldo):  # pragma: no cover - compiled
    """The tile of ``out`` at flat element ``o_off`` (row stride ``ldo``) = a[r0:r1] @ w[:, c0:c1]
    (a [R, K] C-contiguous, w [K, F] C- or F-contiguous: the transpose of a C-contiguous
    weight is read as it lies, without a copy). Returns BLAS's status (0 = done)."""
    k = a.shape[1]
    if w.strides[1] == w.itemsize:  # C-contiguous (or a single row or column: either reading)
        return gemm_rows(False, False, r1 - r0, c1 - c0, k, a, r0 * k, k, w, c0, w.shape[1],
                         out, o_off, ldo, 0.0)
    # w = W^T for a C-contiguous W [F, K]: op(B) = W^T read from W's rows c0:c1
    return gemm_rows(False, True, r1 - r0, c1 - c0, k, a, r0 * k, k, w, c0 * k, k, out, o_off, ldo, 0.0)


#: A tile's status when BLAS succeeded but the tile holds NaN or infinity (``check``).
NONFINITE = 1


@serial_kernel
def _nonfinite(a, r0, r1, c0, c1, exp_mask):  # pragma: no cover - compiled
    """How many entries of a[r0:r1, c0:c1] (a C-contiguous 2-D float array) are NaN or +-inf:
    those whose exponent bits (``exp_mask[0]``, an unsigned integer of the float's width) are all
    set. Integer operations on the entries' bits: no fast-math flag can assume them away, and the
    loop vectorises."""
    bits = a.view(exp_mask.dtype)
    mask = exp_mask[0]
    count = 0
    for r in range(r0, r1):
        row = bits[r, c0:c1]
        for c in range(row.shape[0]):
            count += np.int32((row[c] & mask) == mask)
    return count


def exponent_mask(dtype: np.dtype) -> np.ndarray:
    """The exponent bits of ``dtype`` (float32 or float64), as the 1-element unsigned array that
    :func:`_nonfinite` takes."""
    if np.dtype(dtype) == np.float32:
        return np.array([0x7F800000], dtype=np.uint32)
    return np.array([0x7FF0000000000000], dtype=np.uint64)


#: What :func:`_matmul_tiles` does to a tile t = a[r0:r1] @ w[:, c0:c1] while it is in cache
#: (the step that would otherwise be a pass of its own over the whole output):
EPI_NONE = 0  # out = t
EPI_BIAS = 1  # out = t + bias
EPI_GELU = 2  # out = GELU(t + bias), exact (rows.bias_gelu's formula)
EPI_GELU_TANH = 3  # out = GELU(t + bias), tanh form
EPI_RESIDUAL = 4  # out = t; z += out + bias (rows.residual's formula)
EPI_RESIDUAL_NORM = 5  # z += t + bias, then out = LN(z) (rows.residual_layernorm's): whole rows only
#: The epilogues that rework the tile itself: tiles of at most BIAS_BLOCK_ROWS rows, so that it
#: stays in L2 meanwhile. The residual ones read it once, as they add it to z: one tile per
#: thread, each packing the weight once.
EPI_BIASED = (EPI_BIAS, EPI_GELU, EPI_GELU_TANH)


@parallel_kernel
def _matmul_tiles(a, w, out, row_block, col_block, status, check, exp_mask,  # pragma: no cover - compiled
                  epilogue, bias, z, gamma, beta):
    """out[r0:r1, c0:c1] = a[r0:r1] @ w[:, c0:c1] for each tile of row_block x col_block, then
    the tile's ``epilogue`` (EPI_*) while it is in cache (a [R, K], w [K, F], out and z [R, F],
    bias, gamma, beta [F]; z, gamma, beta only read by the residual epilogues, whose tiles span
    whole rows for EPI_RESIDUAL_NORM). status[item] = that tile's BLAS status, or NONFINITE when
    ``check`` and the tile's result (out's tile, or z's for the residual epilogues) holds NaN or
    infinity."""
    r, f = out.shape
    n_cols = (f + col_block - 1) // col_block
    for item in prange(status.shape[0]):
        r0 = (item // n_cols) * row_block
        c0 = (item % n_cols) * col_block
        r1, c1 = min(r, r0 + row_block), min(f, c0 + col_block)
        done = _tile_product(a, r0, r1, w, c0, c1, out, r0 * f + c0, f)
        if done == 0 and epilogue != EPI_NONE:
            buf = moments_scratch(f if epilogue == EPI_RESIDUAL_NORM else 1)  # LN's sums (RESIDUAL_NORM)
            b = bias[c0:c1]
            for i in range(r0, r1):
                row = out[i, c0:c1]
                if epilogue == EPI_BIAS:
                    for c in range(c1 - c0):
                        row[c] += b[c]
                elif epilogue == EPI_GELU or epilogue == EPI_GELU_TANH:
                    bias_gelu_segment(row, b, epilogue == EPI_GELU_TANH)
                else:  # the residual: z += t + bias
                    zr = z[i, c0:c1]
                    for c in range(c1 - c0):
                        zr[c] += row[c] + b[c]
                    if epilogue == EPI_RESIDUAL_NORM:  # the row's t is used up: out[i] = LN(z[i])
                        normalize_row(z, i, bias, False, gamma, beta, out, i, buf)
        result = z if epilogue >= EPI_RESIDUAL else out
        if done == 0 and check and _nonfinite(result, r0, r1, c0, c1, exp_mask) > 0:
            done = NONFINITE
        status[item] = done


@parallel_kernel
def _matmul_tn_partial(a, b, part, sums, has_sums, block, status):  # pragma: no cover - compiled
    """part[t] = a[lo:hi].T @ b[lo:hi] for the t-th block of rows (a [R, I], b [R, O] and
    part [T, I, O] C-contiguous), and when ``has_sums`` sums[t] = b[lo:hi]'s column sums
    (sums [T, O], in the dtype, rows added in order, while the block is in cache): one partial
    sum per work item, summed by the caller (a pass of its own). status[t] = the block's BLAS
    status (0 = done)."""
    r, i_len = a.shape
    o_len = b.shape[1]
    for t in prange(part.shape[0]):
        lo = t * block
        hi = min(r, lo + block)
        done = 0
        if lo < hi:  # [hi - lo, I]^T @ [hi - lo, O] -> [I, O]
            done = gemm_rows(True, False, i_len, o_len, hi - lo, a, lo * i_len, i_len, b, lo * o_len, o_len,
                             part, t * i_len * o_len, o_len, 0.0)
        else:
            part[t][:] = 0.0
        if has_sums:
            s = sums[t]
            s[:] = 0.0
            for i in range(lo, hi):
                row = b[i]
                for c in range(row.shape[0]):
                    s[c] += row[c]
        status[t] = done


@parallel_kernel
def _matmul_batched(x, w, out, block, status):  # pragma: no cover - compiled
    """out[b, lo:hi] = x[b, lo:hi] @ w for each block of rows of each sample; x [B, S, K] may
    be a strided view (a chunk of a longer input): each block is copied contiguous first.
    w [K, F] and out [B, S, F] C-contiguous; status[item] = the block's BLAS status."""
    nb, s = x.shape[0], x.shape[1]
    k, f = w.shape
    n_blocks = (s + block - 1) // block
    for item in prange(nb * n_blocks):
        b = item // n_blocks
        lo = (item % n_blocks) * block
        hi = min(s, lo + block)
        xb = np.ascontiguousarray(x[b, lo:hi])  # [hi - lo, K]
        status[item] = gemm_rows(False, False, hi - lo, f, k, xb, 0, k, w, 0, f,
                                 out, (b * s + lo) * f, f, 0.0)


@parallel_kernel
def _head_products(a, w, out, heads, k, f, w_trans, block, status, check,  # pragma: no cover - compiled
                   exp_mask):
    """out[:, h*f:(h+1)*f] = a[:, h*k:(h+1)*k] @ W_h for every head h, one block of ``block``
    rows of one head per work item, BLAS reading the operands where they lie: W_h = w[:, h*f:(h+1)*f]
    (w [k, H*f]), or with ``w_trans`` W_h = w[:, h*k:(h+1)*k]^T (w [f, H*k]). a [R, H*k],
    out [R, H*f] C-contiguous; status[item] as in :func:`_project_heads`."""
    r_len = a.shape[0]
    n_blocks = (r_len + block - 1) // block
    ldw = w.shape[1]
    for item in prange(heads * n_blocks):
        h = item // n_blocks
        lo = (item % n_blocks) * block
        hi = min(r_len, lo + block)
        a_off, o_off = lo * heads * k + h * k, lo * heads * f + h * f
        if w_trans:  # op(B) = B^T, B = w[:, h*k:(h+1)*k] read as [f, k]
            done = gemm_rows(False, True, hi - lo, f, k, a, a_off, heads * k, w, h * k, ldw,
                             out, o_off, heads * f, 0.0)
        else:
            done = gemm_rows(False, False, hi - lo, f, k, a, a_off, heads * k, w, h * f, ldw,
                             out, o_off, heads * f, 0.0)
        if done == 0 and check and _nonfinite(out, lo, hi, h * f, (h + 1) * f, exp_mask) > 0:
            done = NONFINITE
        status[item] = done


@parallel_kernel
def _project_heads(x, w0, w1, w2, out0, out1, out2, n_out,  # pragma: no cover - compiled
                   row_block, col_block, norm, gamma, beta, bias, has_bias, status, check, exp_mask):
    """For each tile of row_block rows of x and col_block columns of [w0 | w1 | w2][:, :n_out
    weights] (the columns of every projection, one after the other): u = LN(x[lo:hi] + bias)
    when ``norm`` (else u = x[lo:hi]), then for each w_j that the tile's columns [c0, c1) reach,
    out_j[lo:hi, a0:a1] = u @ w_j[:, a0:a1] (the part in the tile), written by BLAS where it
    belongs. x [R, K], w_j [K, F_j], out_j [R, F_j]; gamma, beta, bias [K]; status[item] = the
    tile's first non-zero BLAS status, or NONFINITE when ``check`` and a product holds NaN or
    infinity. The LayerNorm is fused here (the caller asks for it only with one column block,
    so each row is normalised once): u stays in cache and never goes back to memory."""
    rows, k = x.shape
    total = w0.shape[1] + (w1.shape[1] if n_out > 1 else 0) + (w2.shape[1] if n_out > 2 else 0)
    n_cols = (total + col_block - 1) // col_block
    for item in prange(status.shape[0]):
        lo = (item // n_cols) * row_block
        hi = min(rows, lo + row_block)
        c0 = (item % n_cols) * col_block
        c1 = c0 + col_block
        if norm:
            u = np.empty((hi - lo, k), dtype=x.dtype)  # the block's LN output, in L2
            buf = moments_scratch(k)
            for r in range(lo, hi):
                normalize_row(x, r, bias, has_bias, gamma, beta, u, r - lo, buf)
        else:
            u = x[lo:hi]
        worst = 0
        first = 0  # the first column of w_j in the concatenation
        for j in range(n_out):
            w = w0 if j == 0 else (w1 if j == 1 else w2)
            out = out0 if j == 0 else (out1 if j == 1 else out2)
            f = w.shape[1]
            a0 = max(c0, first) - first
            a1 = min(c1, first + f) - first
            first += f
            if a0 >= a1:
                continue
            done = _tile_product(u, 0, hi - lo, w, a0, a1, out, lo * f + a0, f)  # [hi - lo, a1 - a0]
            if done == 0 and check and _nonfinite(out, lo, hi, a0, a1, exp_mask) > 0:
                done = NONFINITE
            worst = done if worst == 0 else worst
        status[item] = worst


@parallel_kernel
def _project_input(x, w_in, w0, w1, out0, out1, n_out, block, gamma, beta, bias, has_bias,  # pragma: no cover
                   status, check, exp_mask):
    """The whole key/value side of a cross block, one block of ``block`` rows of one sample per
    work item: h = x[b, lo:hi] @ w_in (x read as it lies: row stride x.strides[1], a chunk of a
    longer input), u = LN(h + bias) in place, then out_j[b, lo:hi] = u @ w_j for each of the
    n_out projections, written by BLAS straight into the rows of out_j [B, S, F_j] (whose
    head-split view is the attention kernel's [B, H, S, d_j]). h and u are one [block, D]
    buffer that stays in L2: the input projection never goes back to memory. x [B, S, C]
    (last stride the item size), w_in [C, D], gamma, beta, bias [D], w_j [D, F_j];
    status[item] as in :func:`_project_heads`."""
    nb, s = x.shape[0], x.shape[1]
    d = w_in.shape[1]
    sx0, sx1 = x.strides[0] // x.itemsize, x.strides[1] // x.itemsize
    n_blocks = (s + block - 1) // block
    for item in prange(nb * n_blocks):
        b = item // n_blocks
        lo = (item % n_blocks) * block
        hi = min(s, lo + block)
        h = np.empty((hi - lo, d), dtype=x.dtype)  # [rows, C] @ [C, D] -> [rows, D], in L2
        done = gemm_rows(False, False, hi - lo, d, x.shape[2], x, b * sx0 + lo * sx1, sx1,
                         w_in, 0, d, h, 0, d, 0.0)
        buf = moments_scratch(d)
        for r in range(hi - lo):  # LN(h + bias), in place
            normalize_row(h, r, bias, has_bias, gamma, beta, h, r, buf)
        for j in range(n_out):
            w = w0 if j == 0 else w1
            out = out0 if j == 0 else out1
            f = w.shape[1]
            if done == 0:  # [rows, D] @ [D, F_j] -> rows b*S + lo .. b*S + hi of out_j [B*S, F_j]
                done = gemm_rows(False, False, hi - lo, f, d, h, 0, d, w, 0, f, out, (b * s + lo) * f, f, 0.0)
                if done == 0 and check and _nonfinite(out.reshape(nb * s, f), b * s + lo, b * s + hi,
                                                      0, f, exp_mask) > 0:
                    done = NONFINITE
        status[item] = done


class _BlasLimit:
    """Every loaded BLAS on one thread while at least one thread is inside
    :func:`single_threaded_blas`; the first to enter saves the counts, the last to leave puts
    them back (a count under a lock, so overlapping calls from several threads never restore
    one another's limit).

    OpenBLAS (pthreads) is set through its own ``openblas_set_num_threads``, called directly:
    threadpoolctl's ``limit`` obeys only the first thread that ever limited OpenBLAS and silently
    ignores every other thread (its "controlling thread" rule), so a limit set by the main thread
    and restored by a worker stayed at one thread for good. The direct call is process-wide
    from any thread, which is exactly the semantics the count needs. Other BLAS libraries (MKL,
    BLIS, OpenBLAS on OpenMP) go through threadpoolctl's per-library controllers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0  # threads inside single_threaded_blas, over all threads
        self.saved: list[int] = []  # each library's count before the first of them entered
        self.libs: list[tuple[Callable[[], int], Callable[[int], object]]] | None = None

    def _find(self) -> list[tuple[Callable[[], int], Callable[[int], object]]]:
        """(get, set) of every BLAS library loaded, after the one Numba's np.dot calls."""
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls: load it first)
        from threadpoolctl import ThreadpoolController

        libs = []
        for lib in ThreadpoolController().lib_controllers:
            if lib.user_api != "blas":
                continue
            direct = _openblas_calls(lib) if lib.internal_api == "openblas" else None
            if direct is not None:
                libs.append(direct)
            else:
                libs.append((lib.get_num_threads, lib.set_num_threads))
        return libs

    def enter(self) -> None:
        with self.lock:
            if self.libs is None:
                self.libs = self._find()
            if self.users == 0:
                self.saved = [int(get() or 1) for get, _ in self.libs]
                for _, set_ in self.libs:
                    set_(1)
            self.users += 1

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.libs is not None:
                for (_, set_), n in zip(self.libs, self.saved, strict=True):
                    set_(n)


def _openblas_calls(lib: Any) -> tuple[Callable[[], int], Callable[[int], object]] | None:
    """OpenBLAS's own get/set functions (any of its symbol prefixes and suffixes), or None for
    an OpenBLAS whose threads are OpenMP's (per-thread limits: threadpoolctl handles it)."""
    if getattr(lib, "threading_layer", None) == "openmp":
        return None
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            get = getattr(lib.dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib.dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, set_.restype = ctypes.c_int, None
                set_.argtypes = [ctypes.c_int]
                return get, set_
    return None


_blas_limit = _BlasLimit()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Every loaded BLAS on one thread for the duration; the counts it had before are back
    once no thread is inside any more (:class:`_BlasLimit`)."""
    _blas_limit.enter()
    try:
        yield
    finally:
        _blas_limit.leave()


def tiles(rows: int, cols: int, threads: int, max_row_block: int | None = None) -> tuple[int, int]:
    """(row_block, col_block) of the product [rows, K] @ [K, cols] on ``threads`` threads, one
    tile per thread: of the splits rows x columns = threads, the one that uses the most threads
    once the blocks' minimums apply (MIN_BLOCK_ROWS, MIN_BLOCK_COLS), then the one whose BLAS
    calls pack the fewest elements. A BLAS call copies ("packs") its rows of ``a`` and its
    columns of ``w`` before it multiplies, so n_c column blocks pack a's rows n_c times and n_r
    row blocks pack w n_r times: the cost is n_c * rows + n_r * cols (per row of w). Few rows
    against a wide weight (one sample's latents: 256 rows of 1280) split by columns, many rows
    (a batch) by rows. ``max_row_block`` caps the rows of a tile (then there may be more tiles
    than threads)."""
    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    for n_c in range(1, threads + 1):
        if threads % n_c:
            continue
        row_block = max(MIN_BLOCK_ROWS, math.ceil(rows / (threads // n_c)))
        if max_row_block is not None:
            row_block = min(row_block, max_row_block)
        col_block = max(MIN_BLOCK_COLS, COL_ALIGN * math.ceil(cols / n_c / COL_ALIGN))
        n_r_used, n_c_used = math.ceil(rows / row_block), math.ceil(cols / col_block)
        key = (-min(threads, n_r_used * n_c_used), n_c_used * rows + n_r_used * cols)
        if best is None or key < best[0]:
            best = (key, (row_block, col_block))
    assert best is not None
    return best[1]


def _items(rows: int, cols: int, row_block: int, col_block: int) -> int:
    return math.ceil(rows / row_block) * math.ceil(cols / col_block)


def check_blas(status: np.ndarray) -> None:
    """Raise for a work item whose BLAS calls failed (``status``: one entry per item, nonzero
    where a call returned nonzero)."""
    failed = status[status != 0]
    if failed.size:
        raise RuntimeError(f"BLAS: a gemm call was refused (status {int(failed[0])}): a size or "
                           "leading dimension beyond 2^31 - 1, which the BLAS interface's 32-bit "
                           f"integers cannot hold, or no {blas.current().name} gemm in the table")


def _check_status(status: np.ndarray) -> None:
    """Raise for a tile whose BLAS call failed, then for one that holds NaN or infinity."""
    check_blas(status[status != NONFINITE])
    if status.any():
        raise_nonfinite_product()


def raise_nonfinite_product() -> None:
    """The error of a product checked with ``finite=True`` whose output holds NaN or infinity."""
    raise OverflowRisk(PRODUCT, "a product's output holds NaN or infinity")


def _expect_finite(out: np.ndarray) -> np.ndarray:
    if not np.isfinite(out).all():
        raise_nonfinite_product()
    return out


def _threads() -> int:
    """The thread count the tiles are cut for: blas.FIXED_TILE_THREADS, whatever Numba's is, so
    that a product makes the same BLAS calls on any number of threads (a BLAS's bits may depend
    on a tile's shape: :mod:`perceiver_np.kernels.blas`). One function, so tests can cut the
    tiles for another count."""
    return blas.FIXED_TILE_THREADS


def _check(name: str, a: np.ndarray, ndim: int, letters: str, dtype: np.dtype | None = None,
           *, transposed: bool = False) -> np.ndarray:
    """``a`` checked and as the kernels take it (:func:`kernel_array`); ``transposed``: the
    transpose of such an array (a weight's ``w.T`` in a backward) is taken as it is, no copy."""
    if not isinstance(a, np.ndarray) or a.ndim != ndim:
        got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name}: expected an array {letters}, got {got}")
    if a.dtype not in (np.float32, np.float64) or (dtype is not None and a.dtype != dtype):
        raise TypeError(f"{name}: expected dtype {dtype or 'float32 or float64'}, got {a.dtype.name}")
    if transposed and not a.flags.c_contiguous:
        return kernel_array(a.T).T
    return kernel_array(a)


def _product_args(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a [R, K] and w [K, F], checked and as the kernels take them."""
    a = _check("a", a, 2, "[R, K]")
    w = _check("w", w, 2, "[K, F]", a.dtype, transposed=True)
    if w.shape[0] != a.shape[1]:
        raise ValueError(f"w: expected shape ({a.shape[1]}, F) to match a {a.shape}, got {w.shape}")
    return a, w


def _tiled_product(a: np.ndarray, w: np.ndarray, out: np.ndarray, epilogue: int, bias: np.ndarray,
                   finite: bool, *, z: np.ndarray | None = None,
                   norm: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """out = a @ w on Numba's pool, tile by tile, each tile's ``epilogue`` done in cache."""
    rows_, f = a.shape[0], w.shape[1]
    if epilogue == EPI_RESIDUAL_NORM:  # whole rows per tile: a row's LayerNorm needs all of it
        row_block, col_block = max(MIN_BLOCK_ROWS, math.ceil(rows_ / _threads())), f
    else:
        cap = BIAS_BLOCK_ROWS if epilogue in EPI_BIASED else None
        row_block, col_block = tiles(rows_, f, _threads(), cap)
    status = np.zeros(_items(rows_, f, row_block, col_block), dtype=np.int32)
    gamma, beta = norm if norm is not None else (bias, bias)
    with single_threaded_blas():
        _matmul_tiles(a, w, out, row_block, col_block, status, finite, exponent_mask(a.dtype), epilogue,
                      bias, out if z is None else z, gamma, beta)
    _check_status(status)


def matmul(a: np.ndarray, w: np.ndarray, *, bias: np.ndarray | None = None, gelu: str | None = None,
           alloc: Alloc | None = None, finite: bool = False) -> np.ndarray:
    """a: [R, K] @ w: [K, F] (+ bias [F]) -> [R, F], in a's dtype (the output from ``alloc``'s
    "out" when given: :func:`perceiver_np.kernels._numba.empty`). The bias is added to each tile
    right after its product, while the tile is in cache (tiles of at most BIAS_BLOCK_ROWS rows),
    the same float additions as ``a @ w + bias``; ``gelu`` ("exact" or "tanh", with a bias):
    GELU(a @ w + bias), :func:`perceiver_np.kernels.rows.bias_gelu`'s formula on each tile.
    ``finite``: raise OverflowRisk(PRODUCT) when the output holds NaN or infinity (each tile
    looked at while in cache): with a finite ``a``, a non-finite entry of ``w`` always shows in
    its column of the output (NaN or inf times anything, 0 included, is NaN or inf, and GELU
    keeps NaN and infinity non-finite), and so does an overflow."""
    a, w = _product_args(a, w)
    if gelu not in (None, "exact", "tanh"):
        raise ValueError(f"gelu: expected None, 'exact' or 'tanh', got {gelu!r}")
    if gelu is not None and bias is None:
        raise ValueError("bias: expected the bias [F] added before the GELU, got None")
    epilogue = EPI_NONE if bias is None else (EPI_BIAS if gelu is None else
                                              EPI_GELU if gelu == "exact" else EPI_GELU_TANH)
    bias_arr = rows._vector("bias", bias, w.shape[1], a.dtype) if bias is not None else np.zeros(1, a.dtype)
    out = empty(alloc, "out", (a.shape[0], w.shape[1]), a.dtype)
    if a.shape[0] * a.shape[1] * w.shape[1] < SMALL_PRODUCT:
        np.matmul(a, w, out=out)
        if gelu is not None:
            rows.bias_gelu(out, bias_arr, gelu)
        elif bias is not None:
            out += bias_arr
        return _expect_finite(out) if finite else out
    _tiled_product(a, w, out, epilogue, bias_arr, finite)
    return out


def matmul_residual(a: np.ndarray, w: np.ndarray, z: np.ndarray, bias: np.ndarray, *,
                    norm: tuple[np.ndarray, np.ndarray] | None = None, alloc: Alloc | None = None,
                    finite: bool = False) -> np.ndarray:
    """A sublayer's output added to its residual stream: z: [R, F] += a: [R, K] @ w: [K, F]
    + bias [F], in place, each tile added while it is in cache
    (:func:`perceiver_np.kernels.rows.residual`'s formula, ``z += t + bias``). Returns z; with
    ``norm`` = (gamma, beta), LN(z) [R, F] instead, each row normalised right after its update
    (:func:`perceiver_np.kernels.rows.residual_layernorm`'s formula): the next sublayer's input.
    The product, then LN(z), go to ``alloc``'s "out" when given. ``finite``: as :func:`matmul`'s,
    on the updated z."""
    a, w = _product_args(a, w)
    z = rows._rows("z", z, w.shape[1], a.dtype, inplace=True)
    if z.shape[0] != a.shape[0]:
        raise ValueError(f"z: expected shape ({a.shape[0]}, {w.shape[1]}) to match a {a.shape}, "
                         f"got {z.shape}")
    f = w.shape[1]
    bias = rows._vector("bias", bias, f, a.dtype)
    if norm is not None:
        norm = (rows._vector("gamma", norm[0], f, a.dtype), rows._vector("beta", norm[1], f, a.dtype))
    out = empty(alloc, "out", z.shape, a.dtype)
    if a.shape[0] * a.shape[1] * f < SMALL_PRODUCT:
        np.matmul(a, w, out=out)
        if norm is None:
            rows.residual(z, out, bias)
        else:
            rows.residual_layernorm(z, out, bias, norm[0], norm[1], out=out)
        if finite:
            _expect_finite(z)
        return z if norm is None else out
    _tiled_product(a, w, out, EPI_RESIDUAL if norm is None else EPI_RESIDUAL_NORM, bias, finite,
                   z=z, norm=norm)
    return z if norm is None else out


def _tn(a: np.ndarray, b: np.ndarray, alloc: Alloc | None,
        sums: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`matmul_tn`, and ``b``'s column sums when ``sums`` (else None)."""
    a = _check("a", a, 2, "[R, I]")
    b = _check("b", b, 2, "[R, O]", a.dtype)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"b: expected {a.shape[0]} rows like a, got shape {b.shape}")
    if a.shape[0] * a.shape[1] * b.shape[1] < SMALL_PRODUCT:
        return a.T @ b, (b.sum(axis=0) if sums else None)
    items = math.ceil(a.shape[0] / REDUCTION_BLOCK_ROWS)
    part = empty(alloc, "part", (items, a.shape[1], b.shape[1]), a.dtype)
    part_sums = empty(alloc, "part_sums", (items, b.shape[1]), a.dtype) if sums else np.zeros((1, 1), a.dtype)
    status = np.zeros(items, dtype=np.int32)
    with single_threaded_blas():
        _matmul_tn_partial(a, b, part, part_sums, sums, REDUCTION_BLOCK_ROWS, status)
    check_blas(status)
    total = part[0] if items == 1 else part.sum(axis=0)
    if not sums:
        return total, None
    return total, (part_sums[0].copy() if items == 1 else part_sums.sum(axis=0))


def matmul_tn(a: np.ndarray, b: np.ndarray, *, alloc: Alloc | None = None) -> np.ndarray:
    """a: [R, I], b: [R, O] -> a.T @ b: [I, O] (a weight's gradient: a sum over the R rows),
    as one partial product per block of REDUCTION_BLOCK_ROWS rows, then their sum in block
    order: bitwise the same on any number of threads. The partial products come from
    ``alloc``'s "part" when given (then the result may be a view of it: one block)."""
    return _tn(a, b, alloc, False)[0]


def matmul_tn_sums(a: np.ndarray, b: np.ndarray, *,
                   alloc: Alloc | None = None) -> tuple[np.ndarray, np.ndarray]:
    """a: [R, I], b: [R, O] -> (a.T @ b [I, O], b.sum(axis=0) [O]): a linear layer's weight and
    bias gradients from its input and upstream gradient. :func:`matmul_tn`, with each block's
    column sums of ``b`` taken while the block is in cache after its product, then added in
    block order like the products: bitwise the same on any number of threads."""
    total, sums = _tn(a, b, alloc, True)
    assert sums is not None
    return total, sums


def _input_and_weight(x: np.ndarray, w: np.ndarray, w_name: str, k: str,
                      f: str) -> tuple[np.ndarray, np.ndarray]:
    """x [B, S, k] (checked, any strides: not copied here) and the weight w [k, f] that
    multiplies it (checked and as the kernels take it); ``k``, ``f``: the axes' letters."""
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"x: expected an array [B, S, {k}], got {got}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype.name}")
    w = _check(w_name, w, 2, f"[{k}, {f}]", x.dtype)
    if w.shape[0] != x.shape[2]:
        raise ValueError(f"{w_name}: expected shape ({x.shape[2]}, {f}) to match x {x.shape}, got {w.shape}")
    return x, w


def matmul_batched(x: np.ndarray, w: np.ndarray, *, alloc: Alloc | None = None) -> np.ndarray:
    """x: [B, S, K] (any strides; each sample's rows are read a block at a time) @ w: [K, F]
    -> [B, S, F] contiguous, in x's dtype (from ``alloc``'s "out" when given)."""
    x, w = _input_and_weight(x, w, "w", "K", "F")
    if not (x.flags.writeable and x.dtype.isnative):
        x = kernel_array(x)  # a read-only chunk (of a memory map): copied, one chunk at a time
    b, s, _ = x.shape
    out = empty(alloc, "out", (b, s, w.shape[1]), x.dtype)
    if b * s * x.shape[2] * w.shape[1] < SMALL_PRODUCT:
        return np.matmul(x, w, out=out)
    status = np.zeros(b * math.ceil(s / PROJECT_BLOCK_ROWS), dtype=np.int32)
    with single_threaded_blas():
        _matmul_batched(x, w, out, PROJECT_BLOCK_ROWS, status)
    check_blas(status)
    return out


def project_heads(
    x: np.ndarray, weights: list[np.ndarray], heads: int,
    norm: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None, *, alloc: Alloc | None = None,
    finite: bool = False,
) -> list[np.ndarray]:
    """x: [B, S, K] @ each w_j: [K, H*d_j] (one to three of them) -> [B, H, S, d_j] each: the
    projections of every head, each returned as the head-split view of a [B, S, H*d_j] buffer
    (from ``alloc``'s "out0", "out1", "out2" when given), the layout the attention kernel reads
    queries, keys and values in. ``norm`` = (gamma, beta, bias or None): project LN(x + bias)
    instead, the LayerNorm fused into the product (:func:`perceiver_np.kernels.rows.layernorm`'s
    formula, block by block). ``finite``: as :func:`matmul`'s."""
    x = _check("x", x, 3, "[B, S, K]")
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"weights: expected 1 to 3 matrices, got {len(weights)}")
    ws = [_check(f"weights[{j}]", w, 2, "[K, H*d]", x.dtype) for j, w in enumerate(weights)]
    b, s, k = x.shape
    for j, w in enumerate(ws):
        if w.shape[0] != k or w.shape[1] % heads:
            raise ValueError(f"weights[{j}]: expected shape ({k}, H*d) with H = {heads}, got {w.shape}")
    if norm is not None:
        gamma = rows._vector("gamma", norm[0], k, x.dtype)
        beta = rows._vector("beta", norm[1], k, x.dtype)
        bias = None if norm[2] is None else rows._vector("bias", norm[2], k, x.dtype)
    outs = [empty(alloc, f"out{j}", (b * s, w.shape[1]), x.dtype) for j, w in enumerate(ws)]
    x2 = x.reshape(b * s, k)  # [B, S, K] -> [B*S, K]
    if b * s * k * sum(w.shape[1] for w in ws) < SMALL_PRODUCT:
        u = x2 if norm is None else rows.layernorm(x2, gamma, beta, bias)
        for w, out in zip(ws, outs, strict=True):
            np.matmul(u, w, out=out)
            if finite:
                _expect_finite(out)
        return _head_views(outs, b, s, heads)
    padded = outs + [outs[0]] * (3 - len(outs))  # unused beyond len(ws)
    w_pad = ws + [ws[0]] * (3 - len(ws))
    cols = sum(w.shape[1] for w in ws)
    row_block, col_block = tiles(b * s, cols, _threads(), PROJECT_BLOCK_ROWS)
    if norm is not None and col_block < cols:  # several column blocks: normalise each row once
        x2 = rows.layernorm(x2, gamma, beta, bias, out=empty(alloc, "norm", x2.shape, x.dtype))
        norm = None
    if norm is None:
        gamma = beta = np.zeros(k, dtype=x.dtype)  # unused
        bias = None
    status = np.zeros(_items(b * s, cols, row_block, col_block), dtype=np.int32)
    with single_threaded_blas():
        _project_heads(x2, w_pad[0], w_pad[1], w_pad[2], padded[0], padded[1], padded[2],
                       len(outs), row_block, col_block, norm is not None, gamma, beta,
                       gamma if bias is None else bias, bias is not None, status, finite,
                       exponent_mask(x.dtype))
    _check_status(status)
    return _head_views(outs, b, s, heads)


def head_products(a: np.ndarray, w: np.ndarray, heads: int, *, transpose_w: bool = False,
                  alloc: Alloc | None = None, finite: bool = False) -> np.ndarray:
    """a: [R, H*k] -> [R, H*f]: each head's k columns of a times that head's own weight, the
    heads' outputs side by side: W_h = w[:, h*f:(h+1)*f] for w [k, H*f], or, with
    ``transpose_w``, W_h = (w[:, h*k:(h+1)*k])^T for w [f, H*k] (a key or query weight applied
    from the other side: the folded cross-attention's queries, :func:`perceiver_np.engine.fold_queries`).
    One block-diagonal product without the zeros and without copies (output from ``alloc``'s
    "out" when given); ``finite``: as :func:`matmul`'s."""
    a = _check("a", a, 2, "[R, H*k]")
    w = _check("w", w, 2, "[f, H*k]" if transpose_w else "[k, H*f]", a.dtype)
    r, ak = a.shape
    if heads < 1 or ak % heads:
        raise ValueError(f"a: expected shape (R, H*k) with H = {heads}, got {a.shape}")
    k = ak // heads
    if transpose_w:
        if w.shape[1] != ak:
            raise ValueError(f"w: expected shape (f, {ak}) [f, H*k], got {w.shape}")
        f = w.shape[0]
    else:
        if w.shape[0] != k or w.shape[1] % heads:
            raise ValueError(f"w: expected shape ({k}, H*f) with H = {heads}, got {w.shape}")
        f = w.shape[1] // heads
    out = empty(alloc, "out", (r, heads * f), a.dtype)
    if r * ak * f < SMALL_PRODUCT:  # on the calling thread, as every small product
        for h in range(heads):  # [R, k] @ [k, f] -> [R, f]
            w_h = w[:, h * k:(h + 1) * k].T if transpose_w else w[:, h * f:(h + 1) * f]
            np.matmul(a[:, h * k:(h + 1) * k], w_h, out=out[:, h * f:(h + 1) * f])
        return _expect_finite(out) if finite else out
    status = np.zeros(heads * math.ceil(r / PROJECT_BLOCK_ROWS), dtype=np.int32)
    with single_threaded_blas():
        _head_products(a, w, out, heads, k, f, transpose_w, PROJECT_BLOCK_ROWS, status, finite,
                       exponent_mask(a.dtype))
    _check_status(status)
    return out


def _head_views(outs: list[np.ndarray], b: int, s: int, heads: int) -> list[np.ndarray]:
    """Each [B*S, H*d_j] buffer as its head-split view [B, H, S, d_j] (no copy)."""
    # [B*S, H*d_j] -> [B, S, H, d_j] -> [B, H, S, d_j]
    return [out.reshape(b, s, heads, -1).transpose(0, 2, 1, 3) for out in outs]


def reads_in_place(x: np.ndarray) -> bool:
    """Whether the kernels that take an input x [B, S, C] row by row (:func:`project_input`,
    :func:`perceiver_np.kernels.attention.input_attention_forward`) read it where it lies: a
    writeable, aligned, native-order array whose rows are contiguous and do not overlap (a
    chunk of a longer input is); any other x they copy C-contiguous first."""
    return bool(x.flags.writeable and x.dtype.isnative and x.flags.aligned and x.strides[2] == x.itemsize
                and x.strides[0] > 0 and x.strides[1] >= x.shape[2] * x.itemsize)


def project_input(
    x: np.ndarray, w_in: np.ndarray, norm: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    weights: list[np.ndarray], heads: int, *, alloc: Alloc | None = None, finite: bool = False,
) -> list[np.ndarray]:
    """A cross block's keys and values from its raw input: x: [B, S, C] (a strided chunk of a
    longer input is read as it lies) -> for each w_j: [D, H*d_j] (one or two of them)
    LN(x @ w_in + bias) @ w_j, returned as the head-split view [B, H, S, d_j] of a [B, S, H*d_j]
    buffer (from ``alloc``'s "out0", "out1" when given), the layout the attention kernel reads
    keys and values in. ``norm`` = (gamma, beta, bias or None) of the LayerNorm over D. Equal
    to ``project_heads(matmul_batched(x, w_in), weights, heads, norm)`` up to rounding (tested),
    with the input projection, its LayerNorm and the projections done tile by tile in cache.
    ``finite``: as :func:`matmul`'s, on the outputs."""
    x, w_in = _input_and_weight(x, w_in, "w_in", "C", "D")
    if not 1 <= len(weights) <= 2:
        raise ValueError(f"weights: expected 1 or 2 matrices, got {len(weights)}")
    b, s, _ = x.shape
    d = w_in.shape[1]
    ws = [_check(f"weights[{j}]", w, 2, "[D, H*d]", x.dtype) for j, w in enumerate(weights)]
    for j, w in enumerate(ws):
        if w.shape[0] != d or w.shape[1] % heads:
            raise ValueError(f"weights[{j}]: expected shape ({d}, H*d) with H = {heads}, got {w.shape}")
    gamma = rows._vector("gamma", norm[0], d, x.dtype)
    beta = rows._vector("beta", norm[1], d, x.dtype)
    bias = None if norm[2] is None else rows._vector("bias", norm[2], d, x.dtype)
    if not reads_in_place(x):
        x = kernel_array(x)  # a read-only chunk (of a memory map), or one not read by rows: copied
    outs = [empty(alloc, f"out{j}", (b, s, w.shape[1]), x.dtype) for j, w in enumerate(ws)]
    status = np.zeros(b * math.ceil(s / PROJECT_BLOCK_ROWS), dtype=np.int32)
    with single_threaded_blas():
        _project_input(x, w_in, ws[0], ws[-1], outs[0], outs[-1], len(ws), PROJECT_BLOCK_ROWS,
                       gamma, beta, gamma if bias is None else bias, bias is not None, status, finite,
                       exponent_mask(x.dtype))
    _check_status(status)
    return _head_views([out.reshape(b * s, -1) for out in outs], b, s, heads)
