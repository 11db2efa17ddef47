"""The streaming encoder: inputs of any length, never held whole.

::

    y = encode_stream(model, chunks)               # chunks: [B, n_i, C] arrays, one pass per cross block
    y = encode_stream(model, np.load("x.npy", mmap_mode="r"), chunk_size=65536)

Inference only. Each cross-attention keeps, per latent and head, the online-softmax state of
docs/kernel.md, running max ``m_i``, running sum ``l_i`` and accumulator ``acc``, and folds
the input in chunk by chunk: the input projection, the key/value LayerNorm and projections and
the scores of one chunk at a time. Extra memory grows with the chunk, not with N. The result
equals :meth:`Perceiver.forward` up to rounding (tests/test_stream.py). With
``num_cross_layers > 1`` the input is streamed once per cross block, so ``chunks`` must then be
an array (memory-mapped or not) or a callable returning a fresh iterable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .blocks import ffn_sublayer_forward, self_block_forward
from .layers import (
    MASK_FILL,
    Params,
    layernorm_forward,
    linear_forward,
    merge_heads,
    split_heads,
    sub,
)
from .model import Perceiver
from .shapes import as_mask, as_real_input, expect_shape

Chunks = np.ndarray | Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


def _passes(
    source: Any, chunk_size: int, name: str = "chunks", letters: str = "[B, N, C]"
) -> Callable[[], Iterator[np.ndarray]]:
    """A function returning a fresh iterator over the chunks (an array is cut along N)."""
    if isinstance(source, np.ndarray):
        if source.ndim != letters.count(",") + 1:
            raise ValueError(f"{name}: expected an array {letters}, got shape {source.shape}")
        return lambda: (source[:, i:i + chunk_size] for i in range(0, source.shape[1], chunk_size))
    if callable(source):
        return lambda: iter(source())
    once = iter(source)
    used = [False]

    def single() -> Iterator[np.ndarray]:
        if used[0]:
            raise ValueError(f"{name}: an iterator can be streamed once, but this model has several "
                             "cross blocks; pass an array or a callable returning a fresh iterable")
        used[0] = True
        return once

    return single


def _cross_block_stream(
    model: Perceiver, i: int, z: np.ndarray, chunks: Iterator[np.ndarray],
    masks: Iterator[np.ndarray] | None,
) -> tuple[np.ndarray, int]:
    """Cross block ``i`` over the streamed input: z [B, M, D] -> ([B, M, D], N seen)."""
    cfg = model.config
    p: Params = sub(model.params, f"cross.{i}")
    heads = cfg.cross_num_heads
    dt = cfg.np_dtype
    zq, _ = layernorm_forward(z, sub(p, "q_norm"))
    q, _ = linear_forward(zq, sub(p, "attn.q"))  # [B, M, D] -> [B, M, qk]
    qh = split_heads(q, heads)  # [B, M, qk] -> [B, H, M, dh]
    scale = dt.type(1.0 / math.sqrt(qh.shape[-1]))
    b, _, m_len, _ = qh.shape
    dv = cfg.cross_v_channels // heads
    m_i = np.full((b, heads, m_len, 1), MASK_FILL, dtype=dt)  # running max
    l_i = np.zeros((b, heads, m_len, 1), dtype=np.float64)  # running sum (float64: N terms)
    acc = np.zeros((b, heads, m_len, dv), dtype=np.float64)  # running P V
    n_seen = 0
    for x in chunks:
        x = as_real_input("chunk", x, dt)
        expect_shape("chunk", x, (b, None, cfg.input_dim), "[B, n, C]")
        n = x.shape[1]
        keep = None
        if masks is not None:
            mask_chunk = next(masks, None)
            if mask_chunk is None:
                raise ValueError("mask_chunks: fewer mask chunks than input chunks")
            keep = as_mask(mask_chunk, b, n, name="mask chunk", letters="[B, n]")
        h = x
        if cfg.input_projection:
            h, _ = linear_forward(x, sub(model.params, "input_proj"))  # [B, n, C] -> [B, n, D]
        hk, _ = layernorm_forward(h, sub(p, "kv_norm"))
        k, _ = linear_forward(hk, sub(p, "attn.k"))  # [B, n, Ckv] -> [B, n, qk]
        v, _ = linear_forward(hk, sub(p, "attn.v"))  # [B, n, Ckv] -> [B, n, v]
        s = (qh @ split_heads(k, heads).transpose(0, 1, 3, 2)) * scale  # [B, H, M, n]
        if keep is not None:
            s = np.where(keep[:, None, None, :], s, dt.type(MASK_FILL))
        m_new = np.maximum(m_i, s.max(axis=-1, keepdims=True))
        e = np.exp(s - m_new)  # [B, H, M, n]
        if keep is not None:
            e = e * keep[:, None, None, :]  # masked keys: exactly 0
        alpha = np.exp(m_i - m_new)  # rescale what was kept: exp(m_old - m_new) <= 1
        l_i = l_i * alpha + e.sum(axis=-1, keepdims=True)
        acc = acc * alpha + e @ split_heads(v, heads)  # [B,H,M,n] @ [B,H,n,dv] -> [B,H,M,dv]
        m_i = m_new
        n_seen += n
    if n_seen == 0:
        raise ValueError("chunks: the input is empty (N = 0)")
    o = np.where(l_i > 0, acc / np.where(l_i > 0, l_i, 1.0), 0.0).astype(dt)  # no visible key: 0
    att, _ = linear_forward(merge_heads(o), sub(p, "attn.out"))  # [B, M, v] -> [B, M, D]
    a = z + att if cfg.use_query_residual else att
    y, _ = ffn_sublayer_forward(a, p, gelu=cfg.gelu, dropout=0.0, training=False, rng=None,
                                backend=cfg.elementwise_backend)
    return y, n_seen


def encode_stream(
    model: Perceiver,
    chunks: Chunks,
    mask_chunks: Chunks | None = None,
    *,
    chunk_size: int = 65536,
) -> np.ndarray:
    """Inference over a streamed input: the output of ``model(x, mask)`` for the concatenation
    ``x`` of ``chunks`` (and ``mask`` of ``mask_chunks``, bool [B, n_i], True = keep)."""
    cfg = model.config
    if cfg.masked_rows != "zero":
        raise ValueError("masked_rows: the streaming encoder zeroes rows with no visible key; "
                         f"got {cfg.masked_rows!r}")
    if cfg.decoder == "query" and cfg.query_source == "given":
        raise ValueError("decoder: the streaming encoder makes its own queries; query_source "
                         "'given' needs model.forward")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size}")
    passes = _passes(chunks, chunk_size)
    mask_passes = None if mask_chunks is None else _passes(mask_chunks, chunk_size, "mask_chunks", "[B, N]")
    first_pass = passes()
    first = next(first_pass, None)
    if first is None:
        raise ValueError("chunks: the input is empty (N = 0)")
    batch = np.asarray(first).shape[0]
    latents = model.params["latents"]
    z = np.broadcast_to(latents, (batch, *latents.shape))  # [M, D] -> [B, M, D]
    n_total = None
    for step, (kind, i) in enumerate(cfg.schedule):
        if kind == "cross":
            stream = _chain(first, first_pass) if step == 0 else passes()
            masks = None if mask_passes is None else mask_passes()
            z, n = _cross_block_stream(model, i, z, stream, masks)
            if n_total is not None and n != n_total:
                raise ValueError(f"chunks: the input changed length between passes ({n_total} then {n})")
            n_total = n
        else:
            z, _ = self_block_forward(z, sub(model.params, f"self.{i}"), num_heads=cfg.num_heads,
                                      gelu=cfg.gelu, backend=cfg.attention_backend("self", False),
                                      ffn_backend=cfg.elementwise_backend)
    if cfg.final_norm:
        z, _ = layernorm_forward(z, sub(model.params, "final_norm"))
    return model.decode(z)[0]  # the head reads the latents only: the model's own


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest
