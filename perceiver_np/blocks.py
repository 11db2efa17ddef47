"""The two blocks of the Perceiver encoder, as public functional units.

Both are pre-LayerNorm transformer blocks (docs/architecture.md)::

    CrossBlock(z, h):  a = z + Drop(MHA(LN_q(z), LN_kv(h)))     (``z +`` only with the query residual)
                       y = a + Drop(FFN(LN_ffn(a)))
    SelfBlock(z):      u = LN(z); a = z + Drop(MHA(u, u))
                       y = a + Drop(FFN(LN_ffn(a)))

They follow the layer contract of :mod:`perceiver_np.layers`; ``params`` uses the block-local
names of the parameter schema (docs/params.md), i.e. the model's names without the
``cross.{i}.`` / ``self.{j}.`` prefix::

    cross: q_norm.gamma|beta [D]  kv_norm.gamma|beta [Ckv]  attn.{q,k,v,out}.weight|bias
           ffn_norm.gamma|beta [D]  ffn.up.weight [D, wD] ...  ffn.down.weight [wD, D] ...
    self:  norm.gamma|beta [D]  attn.{q,k,v,out}.weight|bias  ffn_norm.*  ffn.*

(no ``attn.{q,k,v}.bias`` with ``qkv_bias=False``; ``ffn.up.weight [D, 2wD]`` with GEGLU).

``dropout`` is the rate of the dropout after the attention output projection and after the
FFN down projection; ``attention_dropout`` drops attention probabilities. Both act only with
``training=True`` and draw from ``rng`` in a fixed order (attention, then FFN). ``ops``
(:class:`perceiver_np.layers.LayerOps`; default the plain NumPy functions) picks the
implementation of every projection, LayerNorm, GELU and of the attention
(:func:`perceiver_np.backends.layer_ops` makes the model's); the cache keeps it, so the
backward runs on the same implementations. ``record``
collects every intermediate activation under ``{name}.<step>.out`` (docs/verify.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import (
    PLAIN,
    DropoutCache,
    FFNCache,
    LayerNormCache,
    LayerOps,
    MHACache,
    Params,
    Record,
    dropout_backward,
    dropout_forward,
    ffn_backward,
    ffn_forward,
    mha_backward,
    mha_forward,
    params_under,
    prefixed,
    residual_backward,
    residual_forward,
    tap,
)
from .shapes import expect_shape


class FFNSublayerCache(NamedTuple):
    norm: LayerNormCache  # a [B, M, D]
    ffn: FFNCache  # LN_ffn(a) [B, M, D] -> hidden [B, M, wD]
    drop: DropoutCache  # [B, M, D] or None
    ops: LayerOps  # the implementations the forward used, for the backward


def ffn_sublayer_forward(
    a: np.ndarray,
    params: Params,
    *,
    gelu: str,
    dropout: float,
    training: bool,
    rng: np.random.Generator | None,
    ffn_kind: str = "gelu",
    record: Record = None,
    name: str = "",
    ops: LayerOps = PLAIN,
) -> tuple[np.ndarray, FFNSublayerCache]:
    """The second half of both blocks: a: [B, M, D] -> a + Drop(FFN(LN_ffn(a))): [B, M, D]
    (``ffn_kind``: the FFN's activation, GELU or GEGLU, see :func:`perceiver_np.layers.ffn_forward`)."""
    u, norm = ops.layernorm_forward(a, params_under(params, "ffn_norm"))
    tap(record, f"{name}.ffn_norm.out", u)
    f, ffn = ffn_forward(u, params_under(params, "ffn"), gelu=gelu, kind=ffn_kind, record=record,
                         name=f"{name}.ffn", ops=ops)
    f, drop = dropout_forward(f, rate=dropout, training=training, rng=rng)
    y = residual_forward(a, f)
    tap(record, f"{name}.out", y)
    return y, FFNSublayerCache(norm, ffn, drop, ops)


def ffn_sublayer_backward(dy: np.ndarray, cache: FFNSublayerCache) -> tuple[np.ndarray, Params]:
    """dy: [B, M, D] -> (da: [B, M, D], grads for ``ffn_norm.*`` and ``ffn.*``)."""
    da, df = residual_backward(dy)
    df, _ = dropout_backward(df, cache.drop)
    du, g_ffn = ffn_backward(df, cache.ffn)
    da_norm, g_norm = cache.ops.layernorm_backward(du, cache.norm)
    return da + da_norm, {**prefixed(g_norm, "ffn_norm"), **prefixed(g_ffn, "ffn")}


# ---------------------------------------------------------------------------------------------
# Cross-attention block: latents z [B, M, D] attend to inputs h [B, N, Ckv]
# ---------------------------------------------------------------------------------------------


class CrossBlockCache(NamedTuple):
    q_norm: LayerNormCache  # z [B, M, D]
    kv_norm: LayerNormCache  # h [B, N, Ckv]
    attn: MHACache  # queries [B, M, D], keys/values [B, N, Ckv]
    drop: DropoutCache  # attention output [B, M, D] or None
    use_query_residual: bool
    ffn: FFNSublayerCache | None  # None: a block without its FFN sublayer (``ffn=False``)
    ops: LayerOps  # the implementations the forward used, for the backward


def cross_block_forward(
    z: np.ndarray,
    h: np.ndarray,
    params: Params,
    *,
    num_heads: int,
    mask: np.ndarray | None = None,
    gelu: str = "exact",
    use_query_residual: bool = True,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    training: bool = False,
    rng: np.random.Generator | None = None,
    masked_rows: str = "zero",
    ffn_kind: str = "gelu",
    ffn: bool = True,
    query_mask: np.ndarray | None = None,
    record: Record = None,
    name: str = "cross",
    ops: LayerOps = PLAIN,
) -> tuple[np.ndarray, CrossBlockCache]:
    """z: [B, M, D] latents, h: [B, N, Ckv] inputs, mask: [B, N] bool -> y: [B, M, D].
    ``ffn=False``: the block ends after the attention (y = a; lucidrains' PerceiverIO decoder
    without ``decoder_ff``); ``params`` then has no ``ffn_norm.*`` / ``ffn.*``. ``query_mask``
    [B, M] bool: a False query attends to nothing (:func:`perceiver_np.layers.mha_forward`); the
    rest of its block runs."""
    b, m, d = z.shape
    expect_shape("cross_block h", h, (b, None, params["kv_norm.gamma"].shape[0]), "[B, N, Ckv]")
    zq, q_norm = ops.layernorm_forward(z, params_under(params, "q_norm"))
    tap(record, f"{name}.q_norm.out", zq)
    hk, kv_norm = ops.layernorm_forward(h, params_under(params, "kv_norm"))
    tap(record, f"{name}.kv_norm.out", hk)
    att, attn = mha_forward(
        zq,
        hk,
        params_under(params, "attn"),
        num_heads=num_heads,
        mask=mask,
        attention_dropout=attention_dropout,
        training=training,
        rng=rng,
        masked_rows=masked_rows,
        query_mask=query_mask,
        record=record,
        name=f"{name}.attn",
        ops=ops,
    )  # [B, M, D] x [B, N, Ckv] -> [B, M, D]
    att, drop = dropout_forward(att, rate=dropout, training=training, rng=rng)
    a = residual_forward(z, att) if use_query_residual else att
    tap(record, f"{name}.attn_residual.out", a)
    ffn_cache = None
    if ffn:
        y, ffn_cache = ffn_sublayer_forward(
            a, params, gelu=gelu, dropout=dropout, training=training, rng=rng, ffn_kind=ffn_kind,
            record=record, name=name, ops=ops,
        )
    else:
        y = a
        tap(record, f"{name}.out", y)
    expect_shape("cross_block output", y, (b, m, d), "[B, M, D]")
    return y, CrossBlockCache(q_norm, kv_norm, attn, drop, use_query_residual, ffn_cache, ops)


def cross_block_backward(
    dy: np.ndarray, cache: CrossBlockCache
) -> tuple[tuple[np.ndarray, np.ndarray], Params]:
    """dy: [B, M, D] -> ((dz [B, M, D], d_h [B, N, Ckv]), grads keyed like params)."""
    da, g_ffn = (dy, {}) if cache.ffn is None else ffn_sublayer_backward(dy, cache.ffn)
    # in the forward pass this was a = z + att (or a = att without the query residual)
    if cache.use_query_residual:
        dz, datt = residual_backward(da)
    else:
        dz, datt = np.zeros_like(da), da
    datt, _ = dropout_backward(datt, cache.drop)
    (dzq, d_hk), g_attn = mha_backward(datt, cache.attn)
    # in the forward pass these were zq = LN_q(z), hk = LN_kv(h)
    d_h, g_kv_norm = cache.ops.layernorm_backward(d_hk, cache.kv_norm)
    dz_norm, g_q_norm = cache.ops.layernorm_backward(dzq, cache.q_norm)
    grads = {
        **prefixed(g_q_norm, "q_norm"),
        **prefixed(g_kv_norm, "kv_norm"),
        **prefixed(g_attn, "attn"),
        **g_ffn,
    }
    return (dz + dz_norm, d_h), grads


# ---------------------------------------------------------------------------------------------
# Self-attention block over the latents z [B, M, D]
# ---------------------------------------------------------------------------------------------


class SelfBlockCache(NamedTuple):
    norm: LayerNormCache  # z [B, M, D]
    attn: MHACache  # queries = keys = values = LN(z) [B, M, D]
    drop: DropoutCache  # attention output [B, M, D] or None
    ffn: FFNSublayerCache
    ops: LayerOps  # the implementations the forward used, for the backward


def self_block_forward(
    z: np.ndarray,
    params: Params,
    *,
    num_heads: int,
    gelu: str = "exact",
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    training: bool = False,
    rng: np.random.Generator | None = None,
    ffn_kind: str = "gelu",
    record: Record = None,
    name: str = "self",
    ops: LayerOps = PLAIN,
) -> tuple[np.ndarray, SelfBlockCache]:
    """z: [B, M, D] -> y: [B, M, D]."""
    u, norm = ops.layernorm_forward(z, params_under(params, "norm"))
    tap(record, f"{name}.norm.out", u)
    att, attn = mha_forward(
        u,
        u,
        params_under(params, "attn"),
        num_heads=num_heads,
        attention_dropout=attention_dropout,
        training=training,
        rng=rng,
        record=record,
        name=f"{name}.attn",
        ops=ops,
    )  # [B, M, D] x [B, M, D] -> [B, M, D]
    att, drop = dropout_forward(att, rate=dropout, training=training, rng=rng)
    a = residual_forward(z, att)
    tap(record, f"{name}.attn_residual.out", a)
    y, ffn = ffn_sublayer_forward(
        a, params, gelu=gelu, dropout=dropout, training=training, rng=rng, ffn_kind=ffn_kind,
        record=record, name=name, ops=ops,
    )
    return y, SelfBlockCache(norm, attn, drop, ffn, ops)


def self_block_backward(dy: np.ndarray, cache: SelfBlockCache) -> tuple[np.ndarray, Params]:
    """dy: [B, M, D] -> (dz [B, M, D], grads keyed like params)."""
    da, g_ffn = ffn_sublayer_backward(dy, cache.ffn)
    # in the forward pass this was a = z + att
    dz, datt = residual_backward(da)
    datt, _ = dropout_backward(datt, cache.drop)
    # in the forward pass u fed both the queries and the keys/values: its gradients add
    (du_q, du_kv), g_attn = mha_backward(datt, cache.attn)
    # in the forward pass this was u = LN(z)
    dz_norm, g_norm = cache.ops.layernorm_backward(du_q + du_kv, cache.norm)
    grads = {**prefixed(g_norm, "norm"), **prefixed(g_attn, "attn"), **g_ffn}
    return dz + dz_norm, grads
