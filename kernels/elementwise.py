"""Element-wise kernels of the inference engine: GELU forward and backward, parallel and vectorised.

``gelu_forward(x, approximate)`` and ``gelu_backward(dy, x, approximate)`` compute exactly the
formulas of :func:`perceiver_np.layers.gelu_forward` / ``gelu_backward`` (tested equal):
exact ``x * Phi(x)`` or the tanh approximation, in the input's dtype, over all cores.

The plain path's exact GELU calls ``scipy.special.erf``, a scalar routine, and on a float32
[32 x 64 x 1024] activation it costs as much as the matrix products around it. Here, in float32,
``Phi(x) = erfc(-x / sqrt 2) / 2`` with Numerical Recipes' ``erfcc`` (a Chebyshev fit,
fractional error below 1.2e-7 everywhere) evaluated with the vectorisable ``fast_exp``, and
``tanh(u) = 1 - 2 / (exp(2u) + 1)`` (u clamped to [-15, 15], where tanh is +-1 in float32);
in float64, ``math.erf`` and ``math.tanh`` (the precise path).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange
from numba.extending import overload

from perceiver_np.shapes import Alloc

from ._numba import empty, exact_parallel_kernel, kernel_array, parallel_kernel, serial_kernel, threads_for
from .fastexp import fast_exp

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K = math.sqrt(2.0 / math.pi)
_C = 0.044715
#: Numerical Recipes (2nd ed., §6.2) erfcc coefficients, t = 1 / (1 + z / 2).
_ERFCC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
          -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def phi_cdf(x):
    """Phi(x), the standard normal CDF; inside Numba-compiled code the float32 version is the
    vectorisable one."""
    return 0.5 * (1.0 + math.erf(x * _SQRT_HALF))


@overload(phi_cdf)
def _phi_cdf_overload(x):  # pragma: no cover - compiled
    from numba import types

    if x == types.float32:
        c = tuple(np.float32(v) for v in _ERFCC)
        half, one, two, s = np.float32(0.5), np.float32(1.0), np.float32(2.0), np.float32(_SQRT_HALF)

        def impl(x):
            z = -x * s  # Phi(x) = erfc(z) / 2
            a = abs(z)
            t = one / (one + half * a)
            poly = c[9]
            poly = poly * t + c[8]
            poly = poly * t + c[7]
            poly = poly * t + c[6]
            poly = poly * t + c[5]
            poly = poly * t + c[4]
            poly = poly * t + c[3]
            poly = poly * t + c[2]
            poly = poly * t + c[1]
            poly = poly * t + c[0]
            erfc_a = t * fast_exp(-a * a + poly)
            erfc_z = erfc_a if z >= 0 else two - erfc_a
            return half * erfc_z

        return impl
    return lambda x: 0.5 * (1.0 + math.erf(x * _SQRT_HALF))


def tanh_any(u):
    return math.tanh(u)


@overload(tanh_any)
def _tanh_overload(u):  # pragma: no cover - compiled
    from numba import types

    if u == types.float32:
        one, two, limit = np.float32(1.0), np.float32(2.0), np.float32(15.0)

        def impl(u):
            u = min(max(u, -limit), limit)  # tanh(15) rounds to 1 in float32; exp stays finite
            return one - two / (fast_exp(two * u) + one)

        return impl
    return lambda u: math.tanh(u)


def exp_any(u):
    return math.exp(u)


@overload(exp_any)
def _exp_overload(u):  # pragma: no cover - compiled
    return lambda u: fast_exp(u)


def gelu_exact(v):
    """GELU(v) = v * Phi(v), in v's dtype inside compiled code (Phi: :func:`phi_cdf`)."""
    return v * phi_cdf(v)


def gelu_tanh(v):
    """The tanh form of GELU, 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))); inside compiled
    code in v's dtype (float32 constants for a float32 v)."""
    return 0.5 * v * (1.0 + math.tanh(_K * (v + _C * v * v * v)))


@overload(gelu_exact)
def _gelu_exact_overload(v):  # pragma: no cover - compiled
    return lambda v: v * phi_cdf(v)


@overload(gelu_tanh)
def _gelu_tanh_overload(v):  # pragma: no cover - compiled
    from numba import types

    dt = np.float32 if v == types.float32 else np.float64
    k, c, half, one = dt(_K), dt(_C), dt(0.5), dt(1.0)

    def impl(v):
        return half * v * (one + tanh_any(k * (v + c * v * v * v)))

    return impl


@serial_kernel
def gelu_segment(x, y, tanh_form):  # pragma: no cover - compiled
    """y[j] = GELU(x[j]) along 1-D segments x, y (y may be x). One loop per form, so that
    each vectorises."""
    if tanh_form:
        for j in range(x.shape[0]):
            y[j] = gelu_tanh(x[j])
    else:
        for j in range(x.shape[0]):
            y[j] = gelu_exact(x[j])


@serial_kernel
def bias_gelu_segment(h, bias, tanh_form):  # pragma: no cover - compiled
    """h[j] = GELU(h[j] + bias[j]) in place along a 1-D segment (a row, or a tile's part of
    one): the loops of :func:`gelu_segment` on one array (a distinct output array that is in
    fact the input would defeat the compiler's vectorised loop, which checks for overlap)."""
    if tanh_form:
        for j in range(h.shape[0]):
            h[j] = gelu_tanh(h[j] + bias[j])
    else:
        for j in range(h.shape[0]):
            h[j] = gelu_exact(h[j] + bias[j])


@serial_kernel
def _gelu_backward_segment(dy, x, dx, tanh_form):  # pragma: no cover - compiled
    """dx[j] = dy[j] * GELU'(x[j]) along 1-D segments; one loop per form, as gelu_segment."""
    k, c, half = x.dtype.type(_K), x.dtype.type(_C), x.dtype.type(0.5)
    one, three = x.dtype.type(1.0), x.dtype.type(3.0)
    inv = x.dtype.type(_INV_SQRT_2PI)
    if tanh_form:
        for j in range(x.shape[0]):
            v = x[j]
            t = tanh_any(k * (v + c * v * v * v))
            dx[j] = dy[j] * (half * (one + t) + half * v * (one - t * t) * k * (one + three * c * v * v))
    else:
        for j in range(x.shape[0]):
            v = x[j]
            dx[j] = dy[j] * (phi_cdf(v) + v * inv * exp_any(-half * v * v))


#: Entries per work item of the element-wise kernels.
ELEMENTWISE_BLOCK = 4096


@parallel_kernel
def _gelu_forward(x, y, step, tanh_form):  # pragma: no cover - compiled
    """y = GELU(x) over flat contiguous arrays, ``step`` entries per work item."""
    n = x.size
    for block in prange((n + step - 1) // step):
        lo = block * step
        hi = min(n, lo + step)
        gelu_segment(x[lo:hi], y[lo:hi], tanh_form)


@parallel_kernel
def _gelu_backward(dy, x, dx, step, tanh_form):  # pragma: no cover - compiled
    """dx = dy * GELU'(x) over flat contiguous arrays, ``step`` entries per work item."""
    n = x.size
    for block in prange((n + step - 1) // step):
        lo = block * step
        hi = min(n, lo + step)
        _gelu_backward_segment(dy[lo:hi], x[lo:hi], dx[lo:hi], tanh_form)


def gelu_forward(x: np.ndarray, approximate: str = "exact", *, alloc: Alloc | None = None) -> np.ndarray:
    """x: [...] -> GELU(x): [...], in x's dtype (float32 or float64); from ``alloc`` when given."""
    xc = kernel_array(x)
    y = empty(alloc, "y", xc.shape, xc.dtype)
    with threads_for(xc.size):
        _gelu_forward(xc.reshape(-1), y.reshape(-1), ELEMENTWISE_BLOCK, approximate == "tanh")
    return y


def gelu_backward(dy: np.ndarray, x: np.ndarray, approximate: str = "exact", *,
                  alloc: Alloc | None = None) -> np.ndarray:
    """dy, x: [...] -> dx = dy * GELU'(x): [...]; from ``alloc`` when given."""
    xc, dyc = kernel_array(x), kernel_array(np.asarray(dy, dtype=x.dtype))
    dx = empty(alloc, "dx", xc.shape, xc.dtype)
    with threads_for(xc.size):
        _gelu_backward(dyc.reshape(-1), xc.reshape(-1), dx.reshape(-1), ELEMENTWISE_BLOCK,
                       approximate == "tanh")
    return dx


@exact_parallel_kernel
def _adamw_update(p, g, m, v, p_out, m_out, v_out, decay, b1, one_minus_b1, b2, one_minus_b2,
                  bias2_sqrt, eps, step_size, step):  # pragma: no cover - compiled
    """One AdamW step over flat arrays, each operation in the dtype and in the order of
    :func:`perceiver_np.optim.adamw`'s rule (``decay`` is 1 for a tensor the mask keeps)."""
    n = p.size
    for block in prange((n + step - 1) // step):
        for j in range(block * step, min(n, block * step + step)):
            pj = p[j] * decay  # times 1 (no decay) is exact
            gj = g[j]
            mj = b1 * m[j] + one_minus_b1 * gj
            vj = b2 * v[j] + one_minus_b2 * (gj * gj)
            denom = np.sqrt(vj) / bias2_sqrt + eps
            p_out[j] = pj - step_size * (mj / denom)
            m_out[j] = mj
            v_out[j] = vj


def adamw_update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, decay: float, b1: float,
                 b2: float, eps: float, bias2_sqrt: float, step_size: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p, g, m, v: [...] of one dtype -> (new p, new m, new v), new arrays: AdamW's update of one
    tensor in one pass, bitwise :func:`perceiver_np.optim.adamw`'s NumPy rule. The Python
    floats are rounded to the dtype as NumPy rounds a Python scalar beside an array:
    ``decay`` = 1 - lr * weight_decay (1: no decay), ``bias2_sqrt`` = sqrt(1 - b2^t),
    ``step_size`` = lr / (1 - b1^t)."""
    dt = p.dtype.type
    pc, gc, mc, vc = (kernel_array(a).reshape(-1) for a in (p, g, m, v))
    new_p, new_m, new_v = (np.empty(p.shape, dtype=p.dtype) for _ in range(3))
    with threads_for(p.size):
        _adamw_update(pc, gc, mc, vc, new_p.reshape(-1), new_m.reshape(-1), new_v.reshape(-1), dt(decay),
                      dt(b1), dt(1.0 - b1), dt(b2), dt(1.0 - b2), dt(bias2_sqrt), dt(eps), dt(step_size),
                      ELEMENTWISE_BLOCK)
    return new_p, new_m, new_v
