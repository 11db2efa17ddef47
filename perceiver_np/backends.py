"""Where the fast backend of every op lives: the kernels under the plain layers' signatures.

::

    ops = layer_ops(cfg, "cross", training=True)    # a layers.LayerOps for one block
    y, cache = layers.mha_forward(zq, h, p, num_heads=H, ops=ops)
    eng = engine_ops("numba")                        # the inference engine's ops
    k, v = eng.project_input(x_c, w_in, (gamma, beta, b_in), [w_k, w_v], H)  # LN(x_c @ w_in + b_in) @ w

Two backends, one signature per op, tested equal (tests/test_backends.py, tests/test_engine.py):

- ``"numpy"``: the plain functions of :mod:`perceiver_np.layers` and :mod:`perceiver_np.attention`
  (the teaching code), and for the inference engine their compositions below, written out in a
  line or two each;
- ``"numba"``: the parallel kernels of :mod:`perceiver_np.kernels` (products on Numba's thread
  pool, fused row kernels, the tiled attention kernel).

:data:`PLAIN_LSE` is the plain path with the ``(o, lse)`` attention of
:mod:`perceiver_np.attention` in place of the one that keeps its probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import attention as plain_attention
from . import layers
from .config import PerceiverConfig
from .kernels import attention as kernel_attention
from .kernels import elementwise as elementwise
from .kernels import gemm as gemm
from .kernels import rows as rows
from .layers import GeluCache, LayerNormCache, LayerOps, LinearCache, Params
from .shapes import ChunkState, expect_shape
from .workspace import Alloc, step_alloc

# ---------------------------------------------------------------------------------------------
# the training ops of the numba backend, under the layers' contract
# ---------------------------------------------------------------------------------------------
# Each op hands its kernels ``step_alloc()``: inside a training step (workspace.StepArena.step,
# which train.train_step runs) the kernels' outputs come from the step's arena, the same memory
# every step; elsewhere they are new arrays.


def linear_forward(x: np.ndarray, params: Params) -> tuple[np.ndarray, LinearCache]:
    """:func:`perceiver_np.layers.linear_forward` with the product on Numba's pool."""
    w, b = params["weight"], params.get("bias")
    expect_shape("linear x", x, (*x.shape[:-1], w.shape[0]), "[..., in]")
    if b is not None:
        expect_shape("linear bias", b, (w.shape[1],), "[out]")
    # the bias is added to each tile of the product while it is in cache
    x2 = x.reshape(-1, w.shape[0])  # [..., in] -> [R, in]
    y = gemm.matmul(x2, w, bias=b, alloc=step_alloc())  # [R, in] @ [in, out] -> [R, out]
    y = y.reshape(*x.shape[:-1], w.shape[1])  # [R, out] -> [..., out]
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy: np.ndarray, cache: LinearCache) -> tuple[np.ndarray, Params]:
    """:func:`perceiver_np.layers.linear_backward` with the products on Numba's pool."""
    x, w = cache.x, cache.weight
    grads = linear_grads(dy, cache)
    dy2 = dy.reshape(-1, w.shape[1])  # [..., out] -> [R, out]
    dx = gemm.matmul(dy2, w.T, alloc=step_alloc()).reshape(x.shape)  # [R, out] @ [out, in] -> [..., in]
    return dx, grads


def linear_grads(dy: np.ndarray, cache: LinearCache) -> Params:
    """:func:`perceiver_np.layers.linear_grads` with the product on Numba's pool."""
    x, w, has_bias = cache
    expect_shape("linear dy", dy, (*x.shape[:-1], w.shape[1]), "[..., out]")
    x2 = x.reshape(-1, w.shape[0])  # [..., in] -> [R, in]
    dy2 = dy.reshape(-1, w.shape[1])  # [..., out] -> [R, out]
    if not has_bias:
        return {"weight": gemm.matmul_tn(x2, dy2, alloc=step_alloc())}  # [in, R] @ [R, out] -> [in, out]
    # the bias gradient, dy's column sums, taken block by block with the weight's
    dweight, dbias = gemm.matmul_tn_sums(x2, dy2, alloc=step_alloc())  # -> [in, out], [out]
    return {"weight": dweight, "bias": dbias}


def layernorm_forward(x: np.ndarray, params: Params) -> tuple[np.ndarray, LayerNormCache]:
    """:func:`perceiver_np.layers.layernorm_forward` in one parallel pass over the rows."""
    gamma, beta = params["gamma"], params["beta"]
    expect_shape("layernorm x", x, (*x.shape[:-1], gamma.shape[0]), "[..., F]")
    f = gamma.shape[0]
    y2, xhat2, rstd2 = rows.layernorm_train(x.reshape(-1, f), gamma, beta,
                                            alloc=step_alloc())  # [..., F] -> [R, F]
    return y2.reshape(x.shape), LayerNormCache(xhat2.reshape(x.shape), rstd2.reshape(*x.shape[:-1], 1),
                                               gamma)


def layernorm_backward(dy: np.ndarray, cache: LayerNormCache) -> tuple[np.ndarray, Params]:
    """:func:`perceiver_np.layers.layernorm_backward` in one parallel pass over the rows."""
    xhat, rstd, gamma = cache
    expect_shape("layernorm dy", dy, xhat.shape, "[..., F]")
    f = gamma.shape[0]
    dx2, dgamma, dbeta = rows.layernorm_backward(dy.reshape(-1, f), xhat.reshape(-1, f),
                                                 rstd.reshape(-1, 1), gamma, alloc=step_alloc())
    return dx2.reshape(dy.shape), {"gamma": dgamma, "beta": dbeta}


def gelu_forward(
    x: np.ndarray, params: Params | None = None, *, approximate: str = "exact"
) -> tuple[np.ndarray, GeluCache]:
    """:func:`perceiver_np.layers.gelu_forward` in the parallel element-wise kernel."""
    if approximate not in ("exact", "tanh"):
        raise ValueError(f"gelu: approximate must be 'exact' or 'tanh', got {approximate!r}")
    return elementwise.gelu_forward(x, approximate, alloc=step_alloc()), GeluCache(x, approximate)


def gelu_backward(dy: np.ndarray, cache: GeluCache) -> tuple[np.ndarray, Params]:
    """:func:`perceiver_np.layers.gelu_backward` in the parallel element-wise kernel."""
    expect_shape("gelu dy", dy, cache.x.shape, "[...]")
    return elementwise.gelu_backward(dy, cache.x, cache.approximate, alloc=step_alloc()), {}


def attention_forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The tiled kernel's (o, lse) attention (:func:`perceiver_np.kernels.attention.attention_forward`)."""
    return kernel_attention.attention_forward(q, k, v, mask, alloc=step_alloc())


def attention_backward(
    do: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray, lse: np.ndarray,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tiled kernel's backward (:func:`perceiver_np.kernels.attention.attention_backward`)."""
    return kernel_attention.attention_backward(do, q, k, v, o, lse, mask, alloc=step_alloc())


#: The plain path with the (o, lse) attention of perceiver_np.attention (no probabilities kept).
PLAIN_LSE = layers.PLAIN._replace(attention_forward=plain_attention.attention_forward,
                                  attention_backward=plain_attention.attention_backward)
#: Every op on the kernels, attention through the tiled kernel.
NUMBA = LayerOps("numba", linear_forward, linear_backward, linear_grads, layernorm_forward,
                 layernorm_backward, gelu_forward, gelu_backward, attention_forward, attention_backward)
#: The kernels for every op but the attention, which keeps its probabilities.
NUMBA_PROBABILITIES = NUMBA._replace(attention_forward=None, attention_backward=None)


def layer_ops(cfg: PerceiverConfig, kind: str, training: bool) -> LayerOps:
    """The ops a block of ``kind`` ("cross" | "self" | "model": the input projection, the final
    LayerNorm and the decoder's output projection) runs on: ``cfg.backend`` decides the
    products, LayerNorms and GELU, and :meth:`PerceiverConfig.attention_backend` the attention."""
    if cfg.backend == "numpy":
        return layers.PLAIN
    if kind == "model":
        return NUMBA
    return NUMBA if cfg.attention_backend(kind, training) == "numba" else NUMBA_PROBABILITIES


# ---------------------------------------------------------------------------------------------
# the inference engine's ops: the kernels' signatures, and their plain twins
# ---------------------------------------------------------------------------------------------


class EngineOps(NamedTuple):
    """The ops of the inference engine (:mod:`perceiver_np.engine`), one signature each: the
    kernels' (:mod:`perceiver_np.kernels`), and plain NumPy twins of them built from the layers."""

    name: str
    # ``alloc=`` (:mod:`perceiver_np.workspace`) names where an op's outputs and scratch come
    # from; the plain twins take it and allocate afresh (they are for reading and checking).
    # ``finite=True``: the product's output is checked for NaN and infinity (OverflowRisk of
    # ``gemm.PRODUCT``), which is how the engine checks its weights (engine.product_weights)
    # (a [R, K], w [K, F], *, bias [F], gelu, alloc, finite) -> [R, F] = GELU?(a @ w + bias)
    matmul: Callable[..., np.ndarray]
    # (a [R, K], w [K, F], z [R, F], bias [F], *, norm, alloc, finite): z += a @ w + bias in
    # place -> z, or LN(z) with norm = (gamma, beta)
    matmul_residual: Callable[..., np.ndarray]
    matmul_batched: Callable[..., np.ndarray]  # (x [B, S, K], w [K, F], *, alloc) -> [B, S, F]
    # (x [B, S, K], [w_j], H, norm, *, alloc, finite) -> [B, H, S, d_j] each
    project_heads: Callable[..., list[np.ndarray]]
    # (a [R, H*k], w, H, *, transpose_w, alloc, finite) -> [R, H*f]: each head's columns times its weight
    head_products: Callable[..., np.ndarray]
    # (x [B, S, C], w_in [C, D], norm, [w_j], H, *, alloc, finite) -> [B, H, S, d_j] each:
    # LN(x @ w_in + bias) @ w_j, a cross block's keys and values from its raw input
    project_input: Callable[..., list[np.ndarray]]
    layernorm: Callable[..., np.ndarray]  # (x [R, F], gamma, beta, bias=None, out=None) -> [R, F]
    bias_gelu: Callable[..., np.ndarray]  # h [R, F] = GELU(h + bias), in place
    # (o [B, H, M, dv], bias [H*dv] or None, visible [B] or None, *, alloc) -> [B*M, H*dv]
    merge_heads: Callable[..., np.ndarray]
    attention_forward: Callable[..., tuple[np.ndarray, np.ndarray]]  # (q, k, v, mask, *, alloc) -> (o, lse)
    # (x [B, N, C], w_in [C, D], norm, q [B, Q, D], mask, scale, *, alloc, finite) -> (o [B, 1, Q, D],
    # lse [B, 1, Q]): attention to the keys and values h = LN(x @ w_in + bias) (the folded cross-attention)
    input_attention: Callable[..., tuple[np.ndarray, np.ndarray]]
    chunk_state: Callable[..., ChunkState]  # (B, H, M, dv, alloc) -> an empty running state
    merge_chunk: Callable[..., None]  # (state, o_c, lse_c): fold one chunk's attention in
    finish_chunks: Callable[..., np.ndarray]  # (state, dtype, alloc) -> o [B, H, M, dv]
    max_abs: Callable[[np.ndarray], float]  # x (any shape) -> max |x|: the input's range check


def _layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bias: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Plain twin of :func:`perceiver_np.kernels.rows.layernorm`: out = LN(x + bias)."""
    y, _ = layers.layernorm_forward(x if bias is None else x + bias, {"gamma": gamma, "beta": beta})
    if out is None:
        return y
    out[...] = y
    return out


def _merge_heads(o: np.ndarray, bias: np.ndarray | None, visible: np.ndarray | None, *,
                 alloc: Alloc | None = None) -> np.ndarray:
    """Plain twin of :func:`perceiver_np.kernels.rows.merge_heads`."""
    b, h, m, dv = o.shape
    if bias is not None:
        bv = bias.reshape(h, dv)[None, :, None, :]  # [H*dv] -> [1, H, 1, dv]
        o = o + (bv if visible is None else np.where(visible[:, None, None, None], bv, o.dtype.type(0.0)))
    return layers.merge_heads(o).reshape(b * m, h * dv)  # [B, H, M, dv] -> [B, M, H*dv] -> [B*M, H*dv]


def _bias_gelu(h: np.ndarray, bias: np.ndarray, approximate: str = "exact") -> np.ndarray:
    """Plain twin of :func:`perceiver_np.kernels.rows.bias_gelu`."""
    h[...] = layers.gelu_forward(h + bias, approximate=approximate)[0]
    return h


def _project_heads(x: np.ndarray, weights: list[np.ndarray], heads: int,
                   norm: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None, *,
                   alloc: Alloc | None = None, finite: bool = False) -> list[np.ndarray]:
    """Plain twin of :func:`perceiver_np.kernels.gemm.project_heads`."""
    u = x if norm is None else _layernorm(x, norm[0], norm[1], norm[2])
    # [B, S, K] @ [K, H*d] -> [B, S, H*d] -> [B, H, S, d]
    return [np.ascontiguousarray(layers.split_heads(_matmul(u, w, finite=finite), heads)) for w in weights]


def _project_input(x: np.ndarray, w_in: np.ndarray, norm: tuple[np.ndarray, np.ndarray, np.ndarray | None],
                   weights: list[np.ndarray], heads: int, *, alloc: Alloc | None = None,
                   finite: bool = False) -> list[np.ndarray]:
    """Plain twin of :func:`perceiver_np.kernels.gemm.project_input`."""
    h = _matmul(x, w_in)  # [B, S, C] -> [B, S, D]
    return _project_heads(h, weights, heads, norm, finite=finite)


def _head_products(a: np.ndarray, w: np.ndarray, heads: int, *, transpose_w: bool = False,
                   alloc: Alloc | None = None, finite: bool = False) -> np.ndarray:
    """Plain twin of :func:`perceiver_np.kernels.gemm.head_products`."""
    k = a.shape[1] // heads
    f = w.shape[0] if transpose_w else w.shape[1] // heads
    outs = []
    for h in range(heads):
        w_h = w[:, h * k:(h + 1) * k].T if transpose_w else w[:, h * f:(h + 1) * f]  # [k, f]
        outs.append(a[:, h * k:(h + 1) * k] @ w_h)  # [R, k] @ [k, f] -> [R, f]
    return _finite(np.concatenate(outs, axis=1), finite)  # [R, H*f]


def _matmul_batched(a: np.ndarray, w: np.ndarray, *, alloc: Alloc | None = None,
                    finite: bool = False) -> np.ndarray:
    """Plain twin of :func:`perceiver_np.kernels.gemm.matmul_batched`."""
    return _finite(a @ w, finite)


def _matmul(a: np.ndarray, w: np.ndarray, *, bias: np.ndarray | None = None, gelu: str | None = None,
            alloc: Alloc | None = None, finite: bool = False) -> np.ndarray:
    """Plain twin of :func:`perceiver_np.kernels.gemm.matmul`: a linear layer, then GELU."""
    y = a @ w if bias is None else layers.linear_forward(a, {"weight": w, "bias": bias})[0]
    if gelu is not None:
        with np.errstate(invalid="ignore", over="ignore"):  # GELU(-inf) = NaN: found by the check
            y = layers.gelu_forward(y, approximate=gelu)[0]
    return _finite(y, finite)


def _finite(y: np.ndarray, finite: bool) -> np.ndarray:
    """y, after raising the OverflowRisk of a checked product (``finite``) that holds NaN or inf."""
    if finite and not np.isfinite(y).all():
        gemm.raise_nonfinite_product()
    return y


def _matmul_residual(a: np.ndarray, w: np.ndarray, z: np.ndarray, bias: np.ndarray, *,
                     norm: tuple[np.ndarray, np.ndarray] | None = None, alloc: Alloc | None = None,
                     finite: bool = False) -> np.ndarray:
    """Plain twin of :func:`perceiver_np.kernels.gemm.matmul_residual`: z += a linear layer's
    output (its residual), then the next sublayer's LayerNorm."""
    z += layers.linear_forward(a, {"weight": w, "bias": bias})[0]
    _finite(z, finite)
    return z if norm is None else _layernorm(z, norm[0], norm[1])


def _attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, *,
                       alloc: Alloc | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plain twin of :func:`perceiver_np.kernels.attention.attention_forward`."""
    return plain_attention.attention_forward(q, k, v, mask)


def _input_attention(x: np.ndarray, w_in: np.ndarray, norm: tuple[np.ndarray, np.ndarray, np.ndarray | None],
                     q: np.ndarray, mask: np.ndarray | None, scale: float | None = None, *,
                     alloc: Alloc | None = None, finite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Plain twin of :func:`perceiver_np.kernels.attention.input_attention_forward`."""
    h = _layernorm(_matmul(x, w_in), norm[0], norm[1], norm[2])  # [B, N, C] -> [B, N, D]
    _finite(h, finite)
    keys = h[:, None]  # [B, N, D] -> [B, 1, N, D]: the keys, and the values
    return plain_attention.attention_forward(q[:, None], keys, keys, mask, scale)  # [B, 1, Q, D], [B, 1, Q]


def _chunk_state(b: int, h: int, m: int, dv: int, alloc: Alloc | None = None) -> ChunkState:
    """:func:`perceiver_np.attention.chunk_state`, allocated afresh (the plain twins keep nothing)."""
    return plain_attention.chunk_state(b, h, m, dv)


def _finish_chunks(state: ChunkState, dtype: np.dtype, alloc: Alloc | None = None) -> np.ndarray:
    """:func:`perceiver_np.attention.finish_chunks`, allocated afresh."""
    return plain_attention.finish_chunks(state, dtype)


def _max_abs(x: np.ndarray) -> float:
    """Plain twin of :func:`perceiver_np.kernels.rows.max_abs` (NaN when an entry is NaN)."""
    return float(np.maximum(np.max(x), -np.min(x)))


PLAIN_ENGINE = EngineOps(
    "numpy", _matmul, _matmul_residual, _matmul_batched, _project_heads, _head_products, _project_input,
    _layernorm,
    _bias_gelu, _merge_heads, _attention_forward, _input_attention, _chunk_state, plain_attention.merge_chunk,
    _finish_chunks, _max_abs,
)
NUMBA_ENGINE = EngineOps(
    "numba", gemm.matmul, gemm.matmul_residual, gemm.matmul_batched, gemm.project_heads, gemm.head_products,
    gemm.project_input,
    rows.layernorm, rows.bias_gelu, rows.merge_heads,
    kernel_attention.attention_forward, kernel_attention.input_attention_forward, plain_attention.chunk_state,
    kernel_attention.merge_chunk,
    plain_attention.finish_chunks, rows.max_abs,
)


def engine_ops(backend: str) -> EngineOps:
    """The inference engine's ops: the plain twins for ``"numpy"``, the kernels otherwise."""
    return PLAIN_ENGINE if backend == "numpy" else NUMBA_ENGINE


