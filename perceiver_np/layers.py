"""Every layer of the Perceiver, forward and backward, in plain NumPy.

One contract for every layer (CS231n ``layers.py``, llm.c)::

    y, cache = <layer>_forward(x, params, **options)
    dx, grads = <layer>_backward(dy, cache)

``params`` is a dict of arrays with layer-local names (``"weight"``, ``"bias"``, ``"gamma"``, ...);
``grads`` has exactly the keys of ``params`` (an empty dict for a layer without parameters).
Layers with several inputs keep the contract with a tuple in place of ``x`` and ``dx``:
``attention_forward(q, k, v, ...)`` returns ``((dq, dk, dv), {})`` from its backward and
``mha_forward(xq, xkv, params, ...)`` returns ``((dxq, dxkv), grads)``. The residual sum needs no
cache: ``residual_backward(dy) -> (dx, dbranch)``.
Functions are pure: nothing is stored between calls, the cache is a small NamedTuple whose
fields state their shapes. Each backward walks its forward in reverse, step by step, with the
same names; docs/backward.md derives every formula used here.

Shapes use the vocabulary of :mod:`perceiver_np.shapes` (B, N, C, M, D, H, dh, dv, O). Weights
are stored ``[in, out]`` so that ``y = x @ W + b``. A layer works in the dtype of its inputs
(float32 or float64); no layer changes dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from scipy.special import erf

from .constants import LN_EPS, MASK_FILL
from .shapes import expect_shape

Params = dict[str, np.ndarray]
#: Where a forward records its intermediate activations under stable names (golden files,
#: docs/verify.md): ``None`` records nothing.
Record = dict[str, np.ndarray] | None


def tap(record: Record, name: str, value: np.ndarray) -> None:
    """Keep a copy of the activation ``value`` as ``record[name]`` (nothing if ``record`` is None).

    A record with a ``rewrite(name, value)`` method first lets it change ``value`` in place, and
    the rest of the forward reads the rewritten value (:mod:`perceiver_np.precision` rounds every
    activation this way)."""
    if record is not None:
        rewrite = getattr(record, "rewrite", None)
        if rewrite is not None:
            rewrite(name, value)
        record[name] = np.array(value, copy=True)

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


# ---------------------------------------------------------------------------------------------
# Linear: y = x @ W + b
# ---------------------------------------------------------------------------------------------


class LinearCache(NamedTuple):
    x: np.ndarray  # [..., in]  the layer's input
    weight: np.ndarray  # [in, out]
    has_bias: bool = True  # params had a "bias" (lucidrains' q/kv projections have none)


def linear_forward(x: np.ndarray, params: Params) -> tuple[np.ndarray, LinearCache]:
    """``y = x @ weight + bias``.  x: [..., in], weight: [in, out], bias: [out] -> y: [..., out].
    Without a ``"bias"`` entry the layer is ``y = x @ weight`` (and its grads have no bias)."""
    w, b = params["weight"], params.get("bias")
    expect_shape("linear x", x, (*x.shape[:-1], w.shape[0]), "[..., in]")
    y = x @ w  # [..., in] -> [..., out]
    if b is not None:
        expect_shape("linear bias", b, (w.shape[1],), "[out]")
        y = y + b
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy: np.ndarray, cache: LinearCache) -> tuple[np.ndarray, Params]:
    """dy: [..., out] -> dx: [..., in]; grads weight [in, out], bias [out] (when it had one)."""
    w = cache.weight
    grads = linear_grads(dy, cache)
    # in the forward pass this was y = x @ W + b
    dx = dy @ w.T  # [..., out] -> [..., in]
    return dx, grads


def linear_grads(dy: np.ndarray, cache: LinearCache) -> Params:
    """dy: [..., out] -> the parameters' half of :func:`linear_backward`: grads weight [in, out],
    bias [out] (when it had one), without dx (for a layer whose input needs no gradient: the
    model's raw input in a training step)."""
    x, w, has_bias = cache
    expect_shape("linear dy", dy, (*x.shape[:-1], w.shape[1]), "[..., out]")
    # in the forward pass this was y = x @ W + b
    x2 = x.reshape(-1, w.shape[0])  # [..., in] -> [R, in]   (R = product of leading axes)
    dy2 = dy.reshape(-1, w.shape[1])  # [..., out] -> [R, out]
    dweight = x2.T @ dy2  # [in, R] @ [R, out] -> [in, out]
    if not has_bias:
        return {"weight": dweight}
    dbias = dy2.sum(axis=0)  # [R, out] -> [out]
    return {"weight": dweight, "bias": dbias}


# ---------------------------------------------------------------------------------------------
# LayerNorm over the last axis: y = gamma * (x - mean) / sqrt(var + eps) + beta
# ---------------------------------------------------------------------------------------------


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # [..., F]  normalised input (x - mean) * rstd
    rstd: np.ndarray  # [..., 1]  1 / sqrt(var + eps), biased variance
    gamma: np.ndarray  # [F]


def layernorm_forward(x: np.ndarray, params: Params) -> tuple[np.ndarray, LayerNormCache]:
    """x: [..., F] -> y: [..., F]; params gamma [F], beta [F]; biased variance, eps = LN_EPS."""
    gamma, beta = params["gamma"], params["beta"]
    expect_shape("layernorm x", x, (*x.shape[:-1], gamma.shape[0]), "[..., F]")
    mean = x.mean(axis=-1, keepdims=True)  # [..., F] -> [..., 1]
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # [..., F] -> [..., 1]
    rstd = 1.0 / np.sqrt(var + x.dtype.type(LN_EPS))
    xhat = xc * rstd
    y = xhat * gamma + beta
    return y, LayerNormCache(xhat, rstd, gamma)


def layernorm_backward(dy: np.ndarray, cache: LayerNormCache) -> tuple[np.ndarray, Params]:
    """dy: [..., F] -> dx: [..., F]; grads gamma [F], beta [F]."""
    xhat, rstd, gamma = cache
    expect_shape("layernorm dy", dy, xhat.shape, "[..., F]")
    lead = tuple(range(dy.ndim - 1))
    # in the forward pass this was y = xhat * gamma + beta
    dgamma = (dy * xhat).sum(axis=lead)  # [..., F] -> [F]
    dbeta = dy.sum(axis=lead)  # [..., F] -> [F]
    dxhat = dy * gamma
    # in the forward pass this was xhat = (x - mean(x)) * rstd(x): both depend on x
    dx = rstd * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )
    return dx, {"gamma": dgamma, "beta": dbeta}


# ---------------------------------------------------------------------------------------------
# GELU: exact x * Phi(x), or the tanh approximation
# ---------------------------------------------------------------------------------------------


class GeluCache(NamedTuple):
    x: np.ndarray  # [...]
    approximate: str  # "exact" | "tanh"


def gelu_forward(
    x: np.ndarray, params: Params | None = None, *, approximate: str = "exact"
) -> tuple[np.ndarray, GeluCache]:
    """x: [...] -> y: [...]. ``exact``: x * Phi(x) with the normal CDF Phi (erf);
    ``tanh``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). No parameters."""
    if approximate not in ("exact", "tanh"):
        raise ValueError(f"gelu: approximate must be 'exact' or 'tanh', got {approximate!r}")
    if approximate == "exact":
        y = 0.5 * x * (1.0 + erf(x / x.dtype.type(_SQRT_2)))
    elif approximate == "tanh":
        t = np.tanh(x.dtype.type(_SQRT_2_OVER_PI) * (x + x.dtype.type(_GELU_TANH_C) * x**3))
        y = 0.5 * x * (1.0 + t)
    return y, GeluCache(x, approximate)


def gelu_backward(dy: np.ndarray, cache: GeluCache) -> tuple[np.ndarray, Params]:
    """dy: [...] -> dx: [...]; no parameters, so grads is ``{}``."""
    x, approximate = cache
    expect_shape("gelu dy", dy, x.shape, "[...]")
    if approximate == "exact":
        # d/dx [x Phi(x)] = Phi(x) + x phi(x)
        cdf = 0.5 * (1.0 + erf(x / x.dtype.type(_SQRT_2)))
        pdf = x.dtype.type(_INV_SQRT_2PI) * np.exp(-0.5 * x * x)
        dydx = cdf + x * pdf
    else:
        # y = 0.5 x (1 + t), t = tanh(u), u = k (x + c x^3)
        k, c = x.dtype.type(_SQRT_2_OVER_PI), x.dtype.type(_GELU_TANH_C)
        t = np.tanh(k * (x + c * x**3))
        dudx = k * (1.0 + 3.0 * c * x * x)
        dydx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx
    return dy * dydx, {}


# ---------------------------------------------------------------------------------------------
# GEGLU: the value half of the input times the GELU of its gate half
# ---------------------------------------------------------------------------------------------


class GegluCache(NamedTuple):
    value: np.ndarray  # [..., F]  the first half of the input
    gate: np.ndarray  # [..., F]  GELU of the second half
    act: GeluCache  # the second half [..., F]


def geglu_forward(
    x: np.ndarray, params: Params | None = None, *, approximate: str = "exact",
    gelu: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, GegluCache]:
    """x: [..., 2F] -> y = x[..., :F] * GELU(x[..., F:]): [..., F] (Shazeer's GEGLU, as
    lucidrains' ``x, gates = x.chunk(2, dim=-1); x * gelu(gates)``). No parameters.
    ``gelu``: the GELU's implementation (default :func:`gelu_forward`)."""
    gelu = gelu_forward if gelu is None else gelu
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"geglu x: expected an even last axis [..., 2F], got shape {x.shape}")
    value = x[..., : width // 2]  # [..., 2F] -> [..., F]
    gate_in = x[..., width // 2:].copy()  # [..., 2F] -> [..., F], contiguous
    gate, act = gelu(gate_in, approximate=approximate)
    return value * gate, GegluCache(value, gate, act)


def geglu_backward(
    dy: np.ndarray, cache: GegluCache, gelu_grad: Callable[..., Any] | None = None
) -> tuple[np.ndarray, Params]:
    """dy: [..., F] -> dx: [..., 2F]; no parameters, so grads is ``{}``. ``gelu_grad``: the
    GELU backward's implementation (default :func:`gelu_backward`)."""
    value, gate, act = cache
    expect_shape("geglu dy", dy, value.shape, "[..., F]")
    backward = gelu_backward if gelu_grad is None else gelu_grad
    # in the forward pass this was y = value * gate, gate = GELU(gate_in)
    dvalue = dy * gate
    dgate_in, _ = backward(dy * value, act)
    return np.concatenate([dvalue, dgate_in], axis=-1), {}  # [..., F] x 2 -> [..., 2F]


# ---------------------------------------------------------------------------------------------
# Softmax over the last axis
# ---------------------------------------------------------------------------------------------


class SoftmaxCache(NamedTuple):
    p: np.ndarray  # [..., K] the probabilities


def softmax_forward(
    x: np.ndarray, params: Params | None = None
) -> tuple[np.ndarray, SoftmaxCache]:
    """x: [..., K] -> p: [..., K], ``p = exp(x - max x) / sum exp(x - max x)``."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # the max shift makes exp() never overflow
    p = e / e.sum(axis=-1, keepdims=True)
    return p, SoftmaxCache(p)


def softmax_backward(dy: np.ndarray, cache: SoftmaxCache) -> tuple[np.ndarray, Params]:
    """dy: [..., K] -> dx: [..., K], ``dx = p * (dy - sum(dy * p))``."""
    (p,) = cache
    expect_shape("softmax dy", dy, p.shape, "[..., K]")
    dx = p * (dy - (dy * p).sum(axis=-1, keepdims=True))
    return dx, {}


# ---------------------------------------------------------------------------------------------
# Dropout (inverted): y = x * keep / (1 - rate), identity at inference
# ---------------------------------------------------------------------------------------------


class DropoutCache(NamedTuple):
    scale: np.ndarray | None  # [...] keep / (1 - rate) per element; None when dropout is off


def dropout_forward(
    x: np.ndarray,
    params: Params | None = None,
    *,
    rate: float,
    training: bool,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, DropoutCache]:
    """x: [...] -> y: [...]. In training with ``rate > 0`` each element is kept with
    probability ``1 - rate`` (one ``rng.random`` draw per element) and scaled by
    ``1 / (1 - rate)`` so the expectation is unchanged; otherwise the identity."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")
    if not training or rate == 0.0:
        return x, DropoutCache(None)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            "rng: dropout in training needs an explicit numpy.random.Generator, "
            f"got {type(rng).__name__}"
        )
    keep = rng.random(x.shape) >= rate
    scale = keep.astype(x.dtype) / x.dtype.type(1.0 - rate)
    return x * scale, DropoutCache(scale)


def dropout_backward(dy: np.ndarray, cache: DropoutCache) -> tuple[np.ndarray, Params]:
    """dy: [...] -> dx: [...]: the same elements are dropped and the kept ones scaled."""
    (scale,) = cache
    if scale is None:
        return dy, {}
    expect_shape("dropout dy", dy, scale.shape, "[...]")
    return dy * scale, {}


# ---------------------------------------------------------------------------------------------
# Residual: y = x + branch(x); the gradient flows unchanged into both summands
# ---------------------------------------------------------------------------------------------


def residual_forward(x: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """x: [...], branch: [...] -> y = x + branch: [...] (no cache needed)."""
    expect_shape("residual branch", branch, x.shape, "[...]")
    return x + branch


def residual_backward(dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dy: [...] -> (dx, dbranch), both equal to dy."""
    return dy, dy


# ---------------------------------------------------------------------------------------------
# Mean pool over the latents: [B, M, D] -> [B, D]
# ---------------------------------------------------------------------------------------------


class MeanPoolCache(NamedTuple):
    shape: tuple[int, ...]  # (B, M, D) of the input


def mean_pool_forward(
    x: np.ndarray, params: Params | None = None
) -> tuple[np.ndarray, MeanPoolCache]:
    """x: [B, M, D] -> y: [B, D], the mean over the M latents."""
    if x.ndim != 3:
        raise ValueError(f"mean_pool x: expected shape [B, M, D], got {x.shape}")
    return x.mean(axis=1), MeanPoolCache(x.shape)  # [B, M, D] -> [B, D]


def mean_pool_backward(dy: np.ndarray, cache: MeanPoolCache) -> tuple[np.ndarray, Params]:
    """dy: [B, D] -> dx: [B, M, D]: every latent receives dy / M."""
    b, m, d = cache.shape
    expect_shape("mean_pool dy", dy, (b, d), "[B, D]")
    dx = np.broadcast_to(dy[:, None, :] / dy.dtype.type(m), (b, m, d)).copy()  # [B, D] -> [B, M, D]
    return dx, {}


# ---------------------------------------------------------------------------------------------
# Feed-forward network: y = GELU(x @ W_up + b_up) @ W_down + b_down, or with GEGLU
# ---------------------------------------------------------------------------------------------


class FFNCache(NamedTuple):
    up: LinearCache  # x [..., D], weight [D, wD] (GEGLU: [D, 2wD])
    act: GeluCache | GegluCache  # pre-activation [..., wD] (GEGLU: [..., 2wD])
    down: LinearCache  # activation [..., wD], weight [wD, D]
    ops: LayerOps  # the implementations the forward used, for the backward


def ffn_forward(
    x: np.ndarray,
    params: Params,
    *,
    gelu: str = "exact",
    kind: str = "gelu",
    record: Record = None,
    name: str = "ffn",
    ops: LayerOps | None = None,
) -> tuple[np.ndarray, FFNCache]:
    """x: [..., D] -> y: [..., D] through a hidden width wD.
    params: ``up.weight [D, wD]``, ``up.bias [wD]``, ``down.weight [wD, D]``, ``down.bias [D]``.
    ``kind="geglu"``: ``up`` is [D, 2wD] and the activation :func:`geglu_forward` (value half
    times GELU of the gate half) instead of GELU.
    ``ops``: the products' and the GELU's implementation (:class:`LayerOps`; None: this module's)."""
    ops = PLAIN if ops is None else ops
    if kind not in ("gelu", "geglu"):
        raise ValueError(f"ffn kind: expected 'gelu' or 'geglu', got {kind!r}")
    pre, up = ops.linear_forward(x, params_under(params, "up"))  # [..., D] -> [..., wD] (GEGLU: 2wD)
    tap(record, f"{name}.up.out", pre)
    act: GeluCache | GegluCache
    if kind == "geglu":
        a, act = geglu_forward(pre, approximate=gelu, gelu=ops.gelu_forward)  # [..., 2wD] -> [..., wD]
    else:
        a, act = ops.gelu_forward(pre, approximate=gelu)
    tap(record, f"{name}.act.out", a)
    y, down = ops.linear_forward(a, params_under(params, "down"))  # [..., wD] -> [..., D]
    tap(record, f"{name}.down.out", y)
    return y, FFNCache(up, act, down, ops)


def ffn_backward(dy: np.ndarray, cache: FFNCache) -> tuple[np.ndarray, Params]:
    """dy: [..., D] -> dx: [..., D]; grads keyed like ffn_forward's params."""
    ops = cache.ops
    # in the forward pass this was y = GELU(x @ W_up + b_up) @ W_down + b_down, step by step
    da, g_down = ops.linear_backward(dy, cache.down)  # [..., D] -> [..., wD]
    if isinstance(cache.act, GegluCache):
        dpre, _ = geglu_backward(da, cache.act, ops.gelu_backward)  # [..., wD] -> [..., 2wD]
    else:
        dpre, _ = ops.gelu_backward(da, cache.act)
    dx, g_up = ops.linear_backward(dpre, cache.up)  # [..., wD] (GEGLU: 2wD) -> [..., D]
    return dx, {**prefixed(g_up, "up"), **prefixed(g_down, "down")}


# ---------------------------------------------------------------------------------------------
# Scaled dot-product attention over heads (the plain path: the scores are materialised)
# ---------------------------------------------------------------------------------------------


class AttentionCache(NamedTuple):
    q: np.ndarray  # [B, H, M, dh]
    k: np.ndarray  # [B, H, N, dh]
    v: np.ndarray  # [B, H, N, dv]
    mask: np.ndarray | None  # [B, N] bool, True = keep
    visible: np.ndarray | None  # [B] bool: the sample has at least one visible key
    softmax: SoftmaxCache  # p [B, H, M, N]
    drop: DropoutCache  # dropout on the probabilities, [B, H, M, N] or None
    p_dropped: np.ndarray  # [B, H, M, N] the weights that multiplied v
    scale: float


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
    *,
    dropout: float = 0.0,
    training: bool = False,
    rng: np.random.Generator | None = None,
    masked_rows: str = "zero",
    record: Record = None,
    name: str = "attn",
) -> tuple[np.ndarray, AttentionCache]:
    """Softmax attention of M queries over N keys, per batch and head.

    q: [B, H, M, dh], k: [B, H, N, dh], v: [B, H, N, dv], mask: [B, N] bool (True = keep)
    -> o: [B, H, M, dv]. ``scale`` defaults to 1/sqrt(dh). Masked keys get exactly zero
    weight; a sample with no visible key gets all-zero weights, so o = 0 (DeepMind,
    ``masked_rows="zero"``), or, with ``masked_rows="uniform"``, equal weights over all its
    keys, as Hugging Face's additive ``finfo.min`` mask makes it (every logit of the row rounds
    to the same constant). The backward is the derivative of this forward: such a row does not
    depend on q or k (zero dq, dk; dv = dO / N). Autograd through HF's addition instead returns
    P * (dP - delta) for it, which is not the derivative of HF's own (constant) forward.
    ``dropout`` drops attention probabilities (after the softmax) in training.
    """
    b, h, _, dh = q.shape  # q: [B, H, M, dh]
    n = k.shape[2]
    expect_shape("attention k", k, (b, h, n, dh), "[B, H, N, dh]")
    expect_shape("attention v", v, (b, h, n, None), "[B, H, N, dv]")
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    s = (q @ k.transpose(0, 1, 3, 2)) * q.dtype.type(scale)  # [B,H,M,dh] @ [B,H,dh,N] -> [B,H,M,N]
    visible = None
    if mask is not None:
        expect_shape("attention mask", mask, (b, n), "[B, N]")
        s = np.where(mask[:, None, None, :], s, s.dtype.type(MASK_FILL))
    tap(record, f"{name}.scores", s)
    p, softmax = softmax_forward(s)
    if masked_rows not in ("zero", "uniform"):
        raise ValueError(f"masked_rows: expected 'zero' or 'uniform', got {masked_rows!r}")
    if mask is not None and masked_rows == "zero":
        visible = np.asarray(mask.any(axis=-1))  # [B, N] -> [B]
        p = p * visible[:, None, None, None]  # a row with no visible key attends to nothing
    tap(record, f"{name}.probs", p)
    p_dropped, drop = dropout_forward(p, rate=dropout, training=training, rng=rng)
    o = p_dropped @ v  # [B,H,M,N] @ [B,H,N,dv] -> [B,H,M,dv]
    return o, AttentionCache(q, k, v, mask, visible, softmax, drop, p_dropped, scale)


def attention_backward(
    do: np.ndarray, cache: AttentionCache
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], Params]:
    """do: [B, H, M, dv] -> ((dq [B,H,M,dh], dk [B,H,N,dh], dv [B,H,N,dv]), {})."""
    q, k, v, mask, visible, softmax, drop, p_dropped, scale = cache
    expect_shape("attention do", do, (*q.shape[:3], v.shape[3]), "[B, H, M, dv]")
    # in the forward pass this was o = p_dropped @ v
    dp_dropped = do @ v.transpose(0, 1, 3, 2)  # [B,H,M,dv] @ [B,H,dv,N] -> [B,H,M,N]
    dv = p_dropped.transpose(0, 1, 3, 2) @ do  # [B,H,N,M] @ [B,H,M,dv] -> [B,H,N,dv]
    # in the forward pass this was p_dropped = dropout(p)
    dp, _ = dropout_backward(dp_dropped, drop)
    if visible is not None:
        # in the forward pass this was p = p * visible
        dp = dp * visible[:, None, None, None]
    # in the forward pass this was p = softmax(s)
    ds, _ = softmax_backward(dp, softmax)
    if mask is not None:
        # in the forward pass this was s = where(mask, s, MASK_FILL): a constant has no gradient
        ds = np.where(mask[:, None, None, :], ds, ds.dtype.type(0))
    # in the forward pass this was s = scale * q @ k^T
    ds = ds * ds.dtype.type(scale)
    dq = ds @ k  # [B,H,M,N] @ [B,H,N,dh] -> [B,H,M,dh]
    dk = ds.transpose(0, 1, 3, 2) @ q  # [B,H,N,M] @ [B,H,M,dh] -> [B,H,N,dh]
    return (dq, dk, dv), {}


# ---------------------------------------------------------------------------------------------
# Multi-head attention: projections, heads, attention, output projection
# ---------------------------------------------------------------------------------------------


class FlashCache(NamedTuple):
    """The cache of attention through the FlashAttention interface ``(o, lse)``: only the
    log-sum-exp is kept besides the inputs and the output; the backward recomputes P from it."""

    q: np.ndarray  # [B, H, M, dh]
    k: np.ndarray  # [B, H, N, dh]
    v: np.ndarray  # [B, H, N, dv]
    o: np.ndarray  # [B, H, M, dv]
    lse: np.ndarray  # [B, H, M]
    mask: np.ndarray | None  # [B, N] bool


class MHACache(NamedTuple):
    q: LinearCache  # xq [B, M, Cq], weight [Cq, qk]
    k: LinearCache  # xkv [B, N, Ckv], weight [Ckv, qk]
    v: LinearCache  # xkv [B, N, Ckv], weight [Ckv, v]
    attn: AttentionCache | FlashCache  # per-head tensors: probabilities kept, or only lse
    out: LinearCache  # merged heads [B, M, v], weight [v, Dout]
    num_heads: int
    ops: LayerOps  # the implementations the forward used, for the backward
    query_mask: np.ndarray | None = None  # [B, M] bool: False rows attended to nothing


def split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """[B, L, H*d] -> [B, H, L, d]: head h owns channels [h*d, (h+1)*d)."""
    b, length, width = x.shape
    return x.reshape(b, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[B, H, L, d] -> [B, L, H*d], the inverse of :func:`split_heads`."""
    b, h, length, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, length, h * d)


def mha_forward(
    xq: np.ndarray,
    xkv: np.ndarray,
    params: Params,
    *,
    num_heads: int,
    mask: np.ndarray | None = None,
    attention_dropout: float = 0.0,
    training: bool = False,
    rng: np.random.Generator | None = None,
    masked_rows: str = "zero",
    query_mask: np.ndarray | None = None,
    record: Record = None,
    name: str = "attn",
    ops: LayerOps | None = None,
) -> tuple[np.ndarray, MHACache]:
    """Multi-head attention of queries from ``xq`` over keys/values from ``xkv``.

    xq: [B, M, Cq], xkv: [B, N, Ckv], mask: [B, N] -> y: [B, M, Dout].
    ``query_mask`` [B, M] bool (DeepMind's ``query_mask``): a False query attends to nothing,
    its merged heads are 0, so its output is the output projection's bias.
    params: ``q.weight [Cq, qk]``, ``k.weight [Ckv, qk]``, ``v.weight [Ckv, v]``,
    ``out.weight [v, Dout]`` and their biases. The logit scale is 1/sqrt(qk / H).
    ``ops`` (:class:`LayerOps`; None: this module's plain functions): the projections'
    implementation, and the attention's: with ``ops.attention_forward`` None, :func:`attention_forward`
    above (materialises the [B, H, M, N] probabilities, supports their dropout and
    ``masked_rows="uniform"``); else that function of the ``(o, lse)`` interface (the plain
    :mod:`perceiver_np.attention` or the tiled kernel), which keeps only ``lse`` and zeroes rows
    with no visible key. ``masked_rows``: see :func:`attention_forward`.
    """
    ops = PLAIN if ops is None else ops
    qk_width, v_width = params["q.weight"].shape[1], params["v.weight"].shape[1]
    if qk_width % num_heads or v_width % num_heads:
        raise ValueError(
            f"num_heads: {num_heads} must divide the qk width {qk_width} and v width {v_width}"
        )
    q, q_cache = ops.linear_forward(xq, params_under(params, "q"))  # [B, M, Cq] -> [B, M, qk]
    k, k_cache = ops.linear_forward(xkv, params_under(params, "k"))  # [B, N, Ckv] -> [B, N, qk]
    v, v_cache = ops.linear_forward(xkv, params_under(params, "v"))  # [B, N, Ckv] -> [B, N, v]
    for part, value in (("q", q), ("k", k), ("v", v)):
        tap(record, f"{name}.{part}.out", value)
    qh = split_heads(q, num_heads)  # [B, M, qk] -> [B, H, M, dh]
    kh = split_heads(k, num_heads)  # [B, N, qk] -> [B, H, N, dh]
    vh = split_heads(v, num_heads)  # [B, N, v] -> [B, H, N, dv]
    attn: AttentionCache | FlashCache
    if ops.attention_forward is None:
        o, attn = attention_forward(
            qh, kh, vh, mask, dropout=attention_dropout, training=training, rng=rng,
            masked_rows=masked_rows, record=record, name=name,
        )
    else:
        if masked_rows != "zero":
            raise ValueError(f"masked_rows: the (o, lse) attention of backend {ops.name!r} zeroes rows "
                             f"with no visible key; masked_rows={masked_rows!r} needs the probabilities path")
        if training and attention_dropout > 0:
            raise ValueError(
                f"attention_dropout: the (o, lse) attention of backend {ops.name!r} keeps no "
                f"probabilities to drop; attention_dropout={attention_dropout} in training needs the "
                "probabilities path"
            )
        # the queries made contiguous once, here, and kept so for the backward; the keys and
        # values stay the head-split views of the projections' [B, N, H*d] outputs, which the
        # (o, lse) attention reads where they lie (the input side is never copied per head)
        qh = np.ascontiguousarray(qh)
        lse: np.ndarray
        o, lse = ops.attention_forward(qh, kh, vh, mask)  # [B, H, M, dv], [B, H, M]
        attn = FlashCache(qh, kh, vh, o, lse, mask)
    o = merge_heads(o)  # [B, H, M, dv] -> [B, M, v]
    if query_mask is not None:
        expect_shape("attention query_mask", query_mask, o.shape[:2], "[B, M]")
        o = o * query_mask[..., None]  # a masked query's row attends to nothing
    tap(record, f"{name}.heads.out", o)
    y, out = ops.linear_forward(o, params_under(params, "out"))  # [B, M, v] -> [B, M, Dout]
    tap(record, f"{name}.out", y)
    return y, MHACache(q_cache, k_cache, v_cache, attn, out, num_heads, ops, query_mask)


def mha_backward(
    dy: np.ndarray, cache: MHACache
) -> tuple[tuple[np.ndarray, np.ndarray], Params]:
    """dy: [B, M, Dout] -> ((dxq [B, M, Cq], dxkv [B, N, Ckv]), grads keyed like params)."""
    h, ops = cache.num_heads, cache.ops
    # in the forward pass this was y = merge_heads(o) @ W_out + b_out
    do, g_out = ops.linear_backward(dy, cache.out)  # [B, M, Dout] -> [B, M, v]
    if cache.query_mask is not None:
        # in the forward pass this was o = o * query_mask: masked rows pass no gradient back
        do = do * cache.query_mask[..., None]
    do_h = split_heads(do, h)  # [B, M, v] -> [B, H, M, dv]
    # in the forward pass this was o = attention(q, k, v)
    if isinstance(cache.attn, AttentionCache):
        (dq, dk, dv), _ = attention_backward(do_h, cache.attn)
    else:
        a, backward = cache.attn, ops.attention_backward
        assert backward is not None  # a FlashCache comes from ops with the (o, lse) attention
        dq, dk, dv = backward(do_h, a.q, a.k, a.v, a.o, a.lse, a.mask)
    # in the forward pass these were q, k, v = linear(xq), linear(xkv), linear(xkv)
    dxq, g_q = ops.linear_backward(merge_heads(dq), cache.q)  # [B,H,M,dh] -> [B,M,qk] -> [B,M,Cq]
    dxk, g_k = ops.linear_backward(merge_heads(dk), cache.k)  # [B,H,N,dh] -> [B,N,qk] -> [B,N,Ckv]
    dxv, g_v = ops.linear_backward(merge_heads(dv), cache.v)  # [B,H,N,dv] -> [B,N,v] -> [B,N,Ckv]
    grads = {
        **prefixed(g_q, "q"),
        **prefixed(g_k, "k"),
        **prefixed(g_v, "v"),
        **prefixed(g_out, "out"),
    }
    # xk and xv are one input: its gradient is the sum of both paths, added into dxk (a new
    # array of this call's, which nothing else holds), so no third [B, N, Ckv] array is made
    dxk += dxv
    return (dxq, dxk), grads


# ---------------------------------------------------------------------------------------------
# Parameter-dict helpers: layer-local names <-> prefixed names
# ---------------------------------------------------------------------------------------------


def params_under(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix.``, with the prefix removed (layer-local names)."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in params.items() if k.startswith(head)}


def prefixed(params: Params, prefix: str) -> Params:
    """``params`` with every key put under ``prefix.`` (the inverse of :func:`params_under`)."""
    return {f"{prefix}.{k}": v for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# The implementations a block runs on
# ---------------------------------------------------------------------------------------------


class LayerOps(NamedTuple):
    """The implementations of the ops the blocks compose, one signature per op: this module's
    plain NumPy functions (:data:`PLAIN`), or the parallel kernels' versions built in
    :mod:`perceiver_np.backends` (tested equal). The layers take them as an argument instead of
    importing the kernels, so that this module stays plain NumPy."""

    name: str  # "numpy" | "numba"
    linear_forward: Callable[..., Any]  # (x, params) -> (y, LinearCache)
    linear_backward: Callable[..., Any]  # (dy, LinearCache) -> (dx, grads)
    linear_grads: Callable[..., Any]  # (dy, LinearCache) -> grads (linear_backward without dx)
    layernorm_forward: Callable[..., Any]  # (x, params) -> (y, LayerNormCache)
    layernorm_backward: Callable[..., Any]  # (dy, LayerNormCache) -> (dx, grads)
    gelu_forward: Callable[..., Any]  # (x, *, approximate) -> (y, GeluCache)
    gelu_backward: Callable[..., Any]  # (dy, GeluCache) -> (dx, {})
    #: the (o, lse) attention, (q, k, v, mask) -> (o, lse), and its backward
    #: (do, q, k, v, o, lse, mask) -> (dq, dk, dv); None: :func:`attention_forward` above,
    #: which keeps the probabilities
    attention_forward: Callable[..., Any] | None
    attention_backward: Callable[..., Any] | None


#: This module's plain NumPy functions, with the attention that keeps its probabilities.
PLAIN = LayerOps("numpy", linear_forward, linear_backward, linear_grads, layernorm_forward,
                 layernorm_backward, gelu_forward, gelu_backward, None, None)
