"""The one small matrix product every tile of the attention kernel is made of.

``matmul_acc(a, b, c)`` adds ``a @ b`` into ``c`` for a tile-sized ``a [R, J]``, ``b [J, W]``,
``c [R, W]`` whose rows of ``b`` and ``c`` are contiguous (``a`` may be any strided view, e.g.
a transpose). It is register-blocked 4 x 4 (docs/kernel.md): four rows of ``c`` are updated
from four rows of ``b`` in one pass over the contiguous axis ``W``, with the 16 coefficients of
``a`` held in registers. Per vector of ``W`` that is 16 fused multiply-adds for 8 loads and 4
stores, so the loop is bound by the FMA units rather than by L1 stores, as a plain
``c[r] += a[r, j] * b[j]`` loop (1 FMA, 2 loads, 1 store) is. LLVM vectorises the ``W`` loop.
Calling BLAS per tile is no faster (call overhead, a fresh result per call) and would put BLAS
threads inside the kernels' parallel loops.
"""

from __future__ import annotations

from ._numba import serial_kernel


@serial_kernel
def matmul_acc(a, b, c):  # pragma: no cover - compiled
    """c[r, w] += sum_j a[r, j] * b[j, w].  a: [R, J], b: [J, W], c: [R, W]."""
    n_rows, n_inner = a.shape
    width = b.shape[1]
    r = 0
    while r + 4 <= n_rows:
        c0, c1, c2, c3 = c[r], c[r + 1], c[r + 2], c[r + 3]
        j = 0
        while j + 4 <= n_inner:
            b0, b1, b2, b3 = b[j], b[j + 1], b[j + 2], b[j + 3]
            a00, a01, a02, a03 = a[r, j], a[r, j + 1], a[r, j + 2], a[r, j + 3]
            a10, a11, a12, a13 = a[r + 1, j], a[r + 1, j + 1], a[r + 1, j + 2], a[r + 1, j + 3]
            a20, a21, a22, a23 = a[r + 2, j], a[r + 2, j + 1], a[r + 2, j + 2], a[r + 2, j + 3]
            a30, a31, a32, a33 = a[r + 3, j], a[r + 3, j + 1], a[r + 3, j + 2], a[r + 3, j + 3]
            for w in range(width):
                x0, x1, x2, x3 = b0[w], b1[w], b2[w], b3[w]
                c0[w] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                c1[w] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                c2[w] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                c3[w] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3
            j += 4
        while j < n_inner:  # ragged inner dimension
            bj = b[j]
            a0, a1, a2, a3 = a[r, j], a[r + 1, j], a[r + 2, j], a[r + 3, j]
            for w in range(width):
                x = bj[w]
                c0[w] += a0 * x
                c1[w] += a1 * x
                c2[w] += a2 * x
                c3[w] += a3 * x
            j += 1
        r += 4
    while r < n_rows:  # ragged rows
        cr = c[r]
        for j in range(n_inner):
            arj = a[r, j]
            bj = b[j]
            for w in range(width):
                cr[w] += arj * bj[w]
        r += 1
