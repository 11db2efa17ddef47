"""The fast inference path: what ``model(x)`` runs (unless ``backend="numpy"``).

::

    z = perceiver_np.fast.encode(model, x, mask)    # [B, M, D], no caches
    y = model.decode(z)[0]                           # = model(x, mask) = model.forward(x, mask)[0]

The same function as :meth:`Perceiver.forward` in inference (tested equal: float64 to
FAST_FLOAT64_RTOL, float32 within its bound, tests/test_fast.py), computed with fewer passes
over memory. Every projection is one BLAS call on 2-D (or batched) operands writing straight into
the layout the next step reads, and everything between two products is one fused, parallel
row kernel (:mod:`perceiver_np.kernels.rows`)::

    h  = x_c @ W_in                                per chunk of the input, [B, n, C] -> [B, n, D]
    k, v = LN_kv(h + b_in) @ [W_k | W_v]           per 256 rows: LN into a block buffer, one
                                                   product, scattered into [B, H, n, dh|dv]
    o, lse = tiled attention kernel                per chunk, merged over the chunks
    o  = o + b_v   (rows with a visible key)       [B, H, M, dv]
    z += merge(o) @ W_out + b_out; u = LN_ffn(z)   one pass (z owned, updated in place)
    g  = GELU(u @ W_up + b_up)                     bias and GELU in one pass, in place
    z += g @ W_down + b_down                       one pass

Two biases are moved, not dropped from the math:

- ``b_k`` adds ``q . b_k`` to every score of a query's row; the softmax is invariant to that, so
  the keys are used without it (exactly so in exact arithmetic, and masked keys are skipped, not
  shifted). Its gradient is exactly 0 (docs/backward.md).
- ``b_v``: ``P (V + 1 b_v^T) = P V + b_v`` because a softmax row sums to 1; added once per
  output row instead of once per key, and only on rows that see a key (a row with no visible
  key is 0, as on the plain path).

The latents' self-attention is batched the same way, and the decoder is the model's own
(:meth:`Perceiver.decode`, whose attention already runs through the kernel).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .kernels import ChunkState, attention_forward, chunk_state, finish_chunks, gemm, merge_chunk, rows
from .layers import Params, sub
from .shapes import expect_finite_output, expect_shape

#: Rows (batch x positions) per chunk of the cross-attentions' input side: a [16384, 256]
#: float32 buffer is 16 MiB, under glibc's largest mmap threshold (32 MiB), so a freed chunk's
#: buffers are reused by the next chunk rather than unmapped and faulted in again (diagnosed ad
#: hoc: unchunked [B*N, D] buffers made the projections' time vary by +50% between runs).
CHUNK_ROWS = 16384


def _owned(z: np.ndarray) -> np.ndarray:
    """The latents a fast block updates in place: a writeable C-contiguous [B, M, D] array."""
    if not (isinstance(z, np.ndarray) and z.ndim == 3 and z.flags.c_contiguous and z.flags.writeable):
        raise ValueError("z: expected a writeable C-contiguous array [B, M, D] (the fast blocks "
                         "update the latents in place)")
    return z


def attention_tail(
    z: np.ndarray, o: np.ndarray, visible: np.ndarray | None, p: Params, *, query_residual: bool,
    gelu: str,
) -> np.ndarray:
    """Everything after the attention core of a block, on owned latents z [B, M, D] (updated in
    place when ``query_residual``): the value bias, the output projection and residual, and the
    FFN sublayer. o: [B, H, M, dv] -> [B, M, D]."""
    b, h, m, dv = o.shape
    d = p["attn.out.weight"].shape[1]
    if query_residual:
        expect_shape("z", _owned(z), (b, m, d), "[B, M, D]")
    bv = p["attn.v.bias"].reshape(h, dv)  # [H*dv] -> [H, dv]
    if visible is None:
        o += bv[None, :, None, :]
    else:
        o += np.where(visible[:, None, None, None], bv[None, :, None, :], o.dtype.type(0.0))
    merged = np.ascontiguousarray(o.transpose(0, 2, 1, 3)).reshape(b * m, h * dv)  # [B*M, H*dv]
    t = gemm.matmul(merged, p["attn.out.weight"])  # [B*M, H*dv] -> [B*M, D]
    if not query_residual:
        z = np.zeros((b, m, d), dtype=o.dtype)
    z2 = z.reshape(b * m, d)
    u = rows.residual_layernorm(z2, t, p["attn.out.bias"], p["ffn_norm.gamma"], p["ffn_norm.beta"])
    g = gemm.matmul(u, p["ffn.up.weight"])  # [B*M, D] -> [B*M, wD]
    rows.bias_gelu(g, p["ffn.up.bias"], gelu)
    t = gemm.matmul(g, p["ffn.down.weight"])  # [B*M, wD] -> [B*M, D]
    rows.residual(z2, t, p["ffn.down.bias"])
    return z


Chunk = tuple[np.ndarray, "np.ndarray | None"]  # (x_c [B, n, C], mask_c [B, n] bool or None)


def cross_block(
    z: np.ndarray, chunks: Iterable[Chunk], p: Params, *, num_heads: int,
    in_weight: np.ndarray | None, in_bias: np.ndarray | None, use_query_residual: bool, gelu: str,
) -> tuple[np.ndarray, int]:
    """z: [B, M, D] owned latents (updated in place) attend to an input that arrives in chunks
    along N -> (z [B, M, D], N).

    The incoming pieces (x_c [B, n, C], views into a longer array are fine, with their masks
    mask_c [B, n]) are cut to ``chunk_positions(B)`` positions. Per chunk: ``h = x_c @ in_weight``
    (when given), the keys and values of ``LN_kv(h + in_bias)`` in the kernel's layout (the
    LayerNorm fused into their product), the kernel's ``(o_c, lse_c)``, folded into the running
    float64 state (:func:`perceiver_np.kernels.merge_chunk`). Every buffer is chunk-sized, so
    the input side's extra memory does not grow with N, and a freed chunk's memory is reused by
    the next one instead of being faulted in afresh."""
    b, m, d = _owned(z).shape
    zq = rows.layernorm(z.reshape(b * m, d), p["q_norm.gamma"], p["q_norm.beta"]).reshape(b, m, d)
    (q,) = gemm.project_heads(zq, [p["attn.q.weight"]], num_heads)  # [B, M, D] -> [B, H, M, dh]
    q += p["attn.q.bias"].reshape(num_heads, -1)[None, :, None, :]
    ckv = p["kv_norm.gamma"].shape[0]
    dv = p["attn.v.weight"].shape[1] // num_heads
    state: ChunkState | None = None  # made at the second chunk: one chunk needs no merging
    first: tuple[np.ndarray, np.ndarray] | None = None
    visible = np.zeros(b, dtype=bool)  # [B]: the sample saw a key
    n_total = 0
    size = chunk_positions(b)
    for x_c, mask_c in (piece for chunk in chunks for piece in chunks_of(*chunk, size)):
        n = x_c.shape[1]
        if in_weight is not None:
            h = gemm.matmul_batched(x_c, in_weight)  # [B, n, C] -> [B, n, D] (b_in in the LN)
        else:
            h = np.ascontiguousarray(x_c)  # [B, n, Ckv]
        expect_shape("cross input chunk", h, (b, n, ckv), "[B, n, Ckv]")
        k, v = gemm.project_heads(h, [p["attn.k.weight"], p["attn.v.weight"]], num_heads,
                                  norm=(p["kv_norm.gamma"], p["kv_norm.beta"], in_bias))
        # LN_kv(h + b_in) fused into the product, [B, n, Ckv] -> [B, H, n, dh] (no b_k) and
        # [B, H, n, dv] (b_v after the attention)
        o_c, lse_c = attention_forward(q, k, v, mask_c)  # [B, H, M, dv], [B, H, M]
        if first is None:
            first = (o_c, lse_c)
        else:
            if state is None:
                state = chunk_state(b, num_heads, m, dv)
                merge_chunk(state, *first)
            merge_chunk(state, o_c, lse_c)
        visible |= True if mask_c is None else mask_c.any(axis=1)
        n_total += n
    if n_total == 0:
        raise ValueError("chunks: the input is empty (N = 0)")
    assert first is not None
    o = first[0] if state is None else finish_chunks(state, z.dtype)  # [B, H, M, dv]
    return attention_tail(z, o, visible, p, query_residual=use_query_residual, gelu=gelu), n_total


def chunks_of(x: np.ndarray, mask: np.ndarray | None, size: int) -> list[Chunk]:
    """x [B, N, C] and mask [B, N] cut along N into views of ``size`` positions."""
    return [(x[:, i:i + size], None if mask is None else mask[:, i:i + size])
            for i in range(0, x.shape[1], size)]


def chunk_positions(b: int) -> int:
    """Positions per chunk for a batch of b: CHUNK_ROWS rows of every [B*n, ·] buffer."""
    return max(1, CHUNK_ROWS // b)


def self_block(z: np.ndarray, p: Params, *, num_heads: int, gelu: str) -> np.ndarray:
    """z: [B, M, D] owned latents, updated in place -> [B, M, D]."""
    b, m, d = _owned(z).shape
    u = rows.layernorm(z.reshape(b * m, d), p["norm.gamma"], p["norm.beta"]).reshape(b, m, d)
    q, k, v = gemm.project_heads(u, [p["attn.q.weight"], p["attn.k.weight"], p["attn.v.weight"]],
                                 num_heads)  # [B, M, D] -> [B, H, M, dh|dh|dv] (no b_k, b_v later)
    q += p["attn.q.bias"].reshape(num_heads, -1)[None, :, None, :]
    o, _ = attention_forward(q, k, v)  # [B, H, M, dv]
    return attention_tail(z, o, None, p, query_residual=True, gelu=gelu)


def encode(model, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The encoder up to (and including) the final LayerNorm: x [B, N, C] -> z [B, M, D].

    ``x`` and ``mask`` as validated by :meth:`Perceiver.forward`. Every cross block reads its
    input chunk by chunk (:func:`cross_block` cuts it); with several cross blocks the input
    projection is computed once for all of them, so h [B, N, D] is then held whole."""
    cfg, p = model.config, model.params
    b = x.shape[0]
    crosses = sum(1 for kind, _ in cfg.schedule if kind == "cross")
    source, in_weight = x, (p["input_proj.weight"] if cfg.input_projection else None)
    if cfg.input_projection and crosses > 1:
        source, in_weight = gemm.matmul_batched(x, p["input_proj.weight"]), None  # [B, N, D]
    in_bias = p["input_proj.bias"] if cfg.input_projection else None
    z = np.repeat(p["latents"][None], b, axis=0)  # [M, D] -> [B, M, D], owned
    for kind, i in cfg.schedule:
        if kind == "cross":
            z, _ = cross_block(z, [(source, mask)], sub(p, f"cross.{i}"),
                               num_heads=cfg.cross_num_heads, in_weight=in_weight, in_bias=in_bias,
                               use_query_residual=cfg.use_query_residual, gelu=cfg.gelu)
        else:
            z = self_block(z, sub(p, f"self.{i}"), num_heads=cfg.num_heads, gelu=cfg.gelu)
        expect_finite_output(f"{kind}.{i} output", z)
    return final_norm(model, z)


def final_norm(model, z: np.ndarray) -> np.ndarray:
    """The final LayerNorm (when the config has one), in place: z [B, M, D] -> [B, M, D]."""
    cfg, p = model.config, model.params
    if cfg.final_norm:
        z2 = z.reshape(-1, z.shape[-1])
        rows.layernorm(z2, p["final_norm.gamma"], p["final_norm.beta"], out=z2)
    expect_shape("encoded latents", z, (None, cfg.num_latents, cfg.latent_dim), "[B, M, D]")
    return z
