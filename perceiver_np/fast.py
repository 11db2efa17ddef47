"""The fast inference path: what ``model(x)`` runs (unless ``backend="numpy"``).

::

    y = perceiver_np.fast.forward(model, x, mask)      # = model.forward(x, mask)[0], no caches

The same function as :meth:`Perceiver.forward` in inference (tested equal: float64 to
FLOAT64_RTOL, float32 within its bound, tests/test_fast.py), computed with fewer passes over
memory. Every projection is one BLAS call on 2-D (or batched) operands writing straight into
the layout the next step reads, and everything between two products is one fused, parallel
row kernel (:mod:`perceiver_np.kernels.rows`)::

    h  = x @ W_in                                  [B*N, C] -> [B*N, D]      (BLAS)
    hk = LN_kv(h + b_in)                           one pass, in place when h is not needed again
    k  = hk @ W_k  per head                        [B, 1, N, Ckv] @ [H, Ckv, dh] -> [B, H, N, dh]
    v  = hk @ W_v  per head                        -> [B, H, N, dv]          (the kernel's layout)
    o, lse = tiled attention kernel                [B, H, M, dv]
    o  = o + b_v   (rows with a visible key)
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

import numpy as np

from .kernels import attention_forward, gemm, rows
from .layers import Params, sub
from .shapes import expect_shape


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


def cross_block(
    z: np.ndarray, hk: np.ndarray, p: Params, *, num_heads: int, mask: np.ndarray | None,
    use_query_residual: bool, gelu: str,
) -> np.ndarray:
    """z: [B, M, D] owned latents (updated in place), hk: [B, N, Ckv] the inputs already through
    this block's kv LayerNorm, mask [B, N] bool -> [B, M, D]."""
    b, m, d = _owned(z).shape
    expect_shape("hk", hk, (b, None, p["kv_norm.gamma"].shape[0]), "[B, N, Ckv]")
    zq = rows.layernorm(z.reshape(b * m, d), p["q_norm.gamma"], p["q_norm.beta"]).reshape(b, m, d)
    (q,) = gemm.project_heads(zq, [p["attn.q.weight"]], num_heads)  # [B, M, D] -> [B, H, M, dh]
    q += p["attn.q.bias"].reshape(num_heads, -1)[None, :, None, :]
    k, v = gemm.project_heads(hk, [p["attn.k.weight"], p["attn.v.weight"]], num_heads)
    # [B, N, Ckv] -> [B, H, N, dh] (no b_k) and [B, H, N, dv] (b_v after the attention)
    o, _ = attention_forward(q, k, v, mask)  # [B, H, M, dv]
    del k, v
    visible = None if mask is None else mask.any(axis=1)  # [B]
    return attention_tail(z, o, visible, p, query_residual=use_query_residual, gelu=gelu)


def self_block(z: np.ndarray, p: Params, *, num_heads: int, gelu: str) -> np.ndarray:
    """z: [B, M, D] owned latents, updated in place -> [B, M, D]."""
    b, m, d = _owned(z).shape
    u = rows.layernorm(z.reshape(b * m, d), p["norm.gamma"], p["norm.beta"]).reshape(b, m, d)
    q, k, v = gemm.project_heads(u, [p["attn.q.weight"], p["attn.k.weight"], p["attn.v.weight"]],
                                 num_heads)  # [B, M, D] -> [B, H, M, dh|dh|dv] (no b_k, b_v later)
    q += p["attn.q.bias"].reshape(num_heads, -1)[None, :, None, :]
    o, _ = attention_forward(q, k, v)  # [B, H, M, dv]
    return attention_tail(z, o, None, p, query_residual=True, gelu=gelu)


def encode(model, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:  # noqa: ANN001
    """The encoder up to (and including) the final LayerNorm: x [B, N, C] -> z [B, M, D].

    ``x`` and ``mask`` as validated by :meth:`Perceiver.forward`."""
    cfg, p = model.config, model.params
    b, n, c = x.shape
    if cfg.input_projection:
        h = gemm.matmul(x.reshape(b * n, c), p["input_proj.weight"])  # [B*N, C] -> [B*N, D]; b_in below
        h_bias = p["input_proj.bias"]
        owned = True
    else:
        h = np.ascontiguousarray(x).reshape(b * n, c)
        h_bias = None
        owned = False
    uses = sum(1 for kind, _ in cfg.schedule if kind == "cross")
    latents = p["latents"]
    z = np.repeat(latents[None], b, axis=0)  # [M, D] -> [B, M, D], owned
    for kind, i in cfg.schedule:
        if kind == "cross":
            uses -= 1
            q = sub(p, f"cross.{i}")
            in_place = owned and uses == 0  # h is not read again: normalise it where it lies
            hk = rows.layernorm(h, q["kv_norm.gamma"], q["kv_norm.beta"], bias=h_bias,
                                out=h if in_place else None)  # [B*N, Ckv]
            z = cross_block(z, hk.reshape(b, n, -1), q, num_heads=cfg.cross_num_heads, mask=mask,
                            use_query_residual=cfg.use_query_residual, gelu=cfg.gelu)
            del hk
        else:
            z = self_block(z, sub(p, f"self.{i}"), num_heads=cfg.num_heads, gelu=cfg.gelu)
    if cfg.final_norm:
        d = z.shape[-1]
        z = rows.layernorm(z.reshape(-1, d), p["final_norm.gamma"], p["final_norm.beta"],
                           out=z.reshape(-1, d)).reshape(z.shape)
    expect_shape("encoded latents", z, (b, cfg.num_latents, cfg.latent_dim), "[B, M, D]")
    return z
