"""Scaled dot-product attention with the FlashAttention interface, in plain NumPy.

::

    o, lse = attention_forward(q, k, v, mask=None, scale=None)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, mask=None, scale=None)

q: [B, H, M, dh], k: [B, H, N, dh], v: [B, H, N, dv], mask: [B, N] bool (True = keep) or None,
o: [B, H, M, dv], lse: [B, H, M] = log-sum-exp of each query's scaled scores over its visible
keys (MASK_FILL for a query with no visible key). The backward recomputes the probabilities
from ``lse`` instead of keeping them, exactly like the tiled kernel
``perceiver_np.kernels.attention_forward``/``attention_backward``, which has the same
signatures and is tested equal to these functions. This plain path materialises the
[B, H, M, N] scores; the kernel never does.

The semantics are those of :func:`perceiver_np.layers.attention_forward` (the teaching path,
which keeps the probabilities in its cache): masked keys get exactly zero weight and gradient,
a query with no visible key gets zero output and zero gradients.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .layers import MASK_FILL
from .shapes import expect_shape


def check_attention_args(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float | None
) -> float:
    """Validate the shapes and dtypes shared by both paths; return the scale to use."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype.name}")
        if a.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype.name} like q, got {a.dtype.name}")
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [B, H, M, dh], got {q.shape}")
    b, h, m, dh = q.shape
    if k.ndim != 4:
        raise ValueError(f"k: expected shape [B, H, N, dh], got {k.shape}")
    n = k.shape[2]
    expect_shape("k", k, (b, h, n, dh), "[B, H, N, dh]")
    expect_shape("v", v, (b, h, n, None), "[B, H, N, dv]")
    if min(b, h, m, n, dh, v.shape[3]) == 0:
        raise ValueError(f"q, k, v: every size must be positive, got q {q.shape}, v {v.shape}")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            got = mask.dtype.name if isinstance(mask, np.ndarray) else type(mask).__name__
            raise TypeError(f"mask: expected a bool array (True = keep), got {got}")
        expect_shape("mask", mask, (b, n), "[B, N]")
    if scale is None:
        return 1.0 / math.sqrt(dh)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number, got {scale}")
    return float(scale)


def _scores(q: np.ndarray, k: np.ndarray, mask: np.ndarray | None, scale: float) -> np.ndarray:
    s = (q @ k.transpose(0, 1, 3, 2)) * q.dtype.type(scale)  # [B,H,M,dh] @ [B,H,dh,N] -> [B,H,M,N]
    if mask is not None:
        s = np.where(mask[:, None, None, :], s, s.dtype.type(MASK_FILL))
    return s


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (o [B, H, M, dv], lse [B, H, M]). See the module docstring."""
    scale = check_attention_args(q, k, v, mask, scale)
    s = _scores(q, k, mask, scale)
    m = s.max(axis=-1, keepdims=True)  # [B, H, M, 1]
    e = np.exp(s - m)
    ell = e.sum(axis=-1, keepdims=True)  # [B, H, M, 1]
    p = e / ell
    lse = (m + np.log(ell))[..., 0]  # [B, H, M, 1] -> [B, H, M]
    if mask is not None:
        visible = np.asarray(mask.any(axis=-1))  # [B, N] -> [B]
        p = p * visible[:, None, None, None]
        lse = np.where(visible[:, None, None], lse, lse.dtype.type(MASK_FILL))
    return p @ v, lse  # [B,H,M,N] @ [B,H,N,dv] -> [B,H,M,dv]


def attention_backward(
    do: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    lse: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (dq [B, H, M, dh], dk [B, H, N, dh], dv [B, H, N, dv])."""
    scale = check_attention_args(q, k, v, mask, scale)
    expect_shape("do", do, (*q.shape[:3], v.shape[3]), "[B, H, M, dv]")
    expect_shape("o", o, do.shape, "[B, H, M, dv]")
    expect_shape("lse", lse, q.shape[:3], "[B, H, M]")
    # in the forward pass this was p = exp(s - lse): recompute it instead of storing it
    p = np.exp(_scores(q, k, mask, scale) - lse[..., None])  # [B, H, M, N]
    if mask is not None:
        p = p * np.asarray(mask.any(axis=-1))[:, None, None, None]  # rows with no visible key: 0
    dv = p.transpose(0, 1, 3, 2) @ do  # [B,H,N,M] @ [B,H,M,dv] -> [B,H,N,dv]
    dp = do @ v.transpose(0, 1, 3, 2)  # [B,H,M,dv] @ [B,H,dv,N] -> [B,H,M,N]
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
    delta = (do * o).sum(axis=-1, keepdims=True)  # [B, H, M, 1]
    ds = p * (dp - delta) * p.dtype.type(scale)
    dq = ds @ k  # [B,H,M,N] @ [B,H,N,dh] -> [B,H,M,dh]
    dk = ds.transpose(0, 1, 3, 2) @ q  # [B,H,N,M] @ [B,H,M,dh] -> [B,H,N,dh]
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The layer contract around the (o, lse) interface, for either implementation
# ---------------------------------------------------------------------------------------------

#: The implementations of the (o, lse) interface: this module's plain NumPy functions, or the
#: tiled Numba kernel of ``perceiver_np.kernels`` (imported on first use: it loads Numba).
FLASH_BACKENDS = ("numpy", "numba")


class FlashCache(NamedTuple):
    q: np.ndarray  # [B, H, M, dh]
    k: np.ndarray  # [B, H, N, dh]
    v: np.ndarray  # [B, H, N, dv]
    o: np.ndarray  # [B, H, M, dv]
    lse: np.ndarray  # [B, H, M]
    mask: np.ndarray | None  # [B, N] bool
    backend: str  # "numpy" | "numba"


def _implementation(backend: str) -> tuple[Any, Any]:
    if backend == "numpy":
        return attention_forward, attention_backward
    if backend == "numba":
        from .kernels import attention_backward as kernel_backward
        from .kernels import attention_forward as kernel_forward

        return kernel_forward, kernel_backward
    raise ValueError(f"backend: expected one of {FLASH_BACKENDS}, got {backend!r}")


def flash_forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
    *, backend: str = "numba",
) -> tuple[np.ndarray, FlashCache]:
    """The (o, lse) attention under the layer contract: -> (o [B, H, M, dv], cache). Only
    ``lse`` [B, H, M] is kept besides the inputs and output; the backward recomputes P."""
    forward, _ = _implementation(backend)
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    o, lse = forward(q, k, v, mask)
    return o, FlashCache(q, k, v, o, lse, mask, backend)


def flash_backward(
    do: np.ndarray, cache: FlashCache
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """do: [B, H, M, dv] -> ((dq, dk, dv), {})."""
    _, backward = _implementation(cache.backend)
    do = np.ascontiguousarray(do)
    return backward(do, cache.q, cache.k, cache.v, cache.o, cache.lse, cache.mask), {}
