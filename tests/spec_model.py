"""An independent forward of the Perceiver, written straight from docs/architecture.md.

It shares no code with perceiver_np (no layers, no blocks, no schedule): einsum for every
contraction, its own LayerNorm, GELU, masking and interleaving. The gradient checks prove that
each backward matches its forward; this file proves the forward is the architecture.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def _ln(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * g + b


def _gelu(x, kind):
    if kind == "exact":
        return x * 0.5 * (1 + erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _mha(xq, xkv, p, pre, heads, mask):
    q = np.einsum("bmc,ce->bme", xq, p[pre + "q.weight"]) + p[pre + "q.bias"]
    k = np.einsum("bnc,ce->bne", xkv, p[pre + "k.weight"]) + p[pre + "k.bias"]
    v = np.einsum("bnc,ce->bne", xkv, p[pre + "v.weight"]) + p[pre + "v.bias"]
    dh, dv = q.shape[-1] // heads, v.shape[-1] // heads
    outs = []
    for hh in range(heads):
        qh = q[..., hh * dh:(hh + 1) * dh]
        kh = k[..., hh * dh:(hh + 1) * dh]
        vh = v[..., hh * dv:(hh + 1) * dv]
        s = np.einsum("bmd,bnd->bmn", qh, kh) / math.sqrt(dh)
        if mask is not None:
            s = np.where(mask[:, None, :], s, -1e30)
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        if mask is not None:  # DeepMind: rows with no visible key output zero
            w = np.where(mask.any(-1)[:, None, None], w, 0.0)
        outs.append(np.einsum("bmn,bnd->bmd", w, vh))
    o = np.concatenate(outs, axis=-1)
    return np.einsum("bmv,vd->bmd", o, p[pre + "out.weight"]) + p[pre + "out.bias"]


def _ffn(u, p, pre, kind):
    hdn = _gelu(u @ p[pre + "up.weight"] + p[pre + "up.bias"], kind)
    return hdn @ p[pre + "down.weight"] + p[pre + "down.bias"]


def spec_forward(cfg, p, x, mask=None, queries=None, query_mask=None):
    """Inference forward (no dropout): x [B, N, C] -> [B, D] (or the decoder's output), float64."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    x = x.astype(np.float64)
    h = x @ p["input_proj.weight"] + p["input_proj.bias"] if cfg.input_projection else x
    z = np.repeat(p["latents"][None], x.shape[0], axis=0)
    cross_heads = cfg.num_heads if cfg.cross_heads is None else cfg.cross_heads
    spc = max(cfg.num_layers // cfg.num_cross_layers, 1)
    j = 0
    for c in range(cfg.num_cross_layers):
        pre = f"cross.{c}."
        att = _mha(_ln(z, p[pre + "q_norm.gamma"], p[pre + "q_norm.beta"]),
                   _ln(h, p[pre + "kv_norm.gamma"], p[pre + "kv_norm.beta"]),
                   p, pre + "attn.", cross_heads, mask)
        z = z + att if cfg.use_query_residual else att
        u = _ln(z, p[pre + "ffn_norm.gamma"], p[pre + "ffn_norm.beta"])
        z = z + _ffn(u, p, pre + "ffn.", cfg.gelu)
        n_self = cfg.num_layers - spc * (cfg.num_cross_layers - 1) if c == cfg.num_cross_layers - 1 else spc
        group = list(range(j, j + n_self))
        j += n_self
        for _ in range(cfg.num_blocks):
            for s in group:
                pre = f"self.{s}."
                u = _ln(z, p[pre + "norm.gamma"], p[pre + "norm.beta"])
                z = z + _mha(u, u, p, pre + "attn.", cfg.num_heads, None)
                u = _ln(z, p[pre + "ffn_norm.gamma"], p[pre + "ffn_norm.beta"])
                z = z + _ffn(u, p, pre + "ffn.", cfg.gelu)
    if cfg.final_norm:
        z = _ln(z, p["final_norm.gamma"], p["final_norm.beta"])
    if cfg.decoder == "pool":
        return z.mean(axis=1)
    # Perceiver IO decoder (docs/architecture.md): queries cross-attend to the latents, then Linear
    if queries is None:
        queries = np.repeat(p["decoder.queries"][None], x.shape[0], axis=0)
    queries = queries.astype(np.float64)
    pre = "decoder."
    att = _mha(_ln(queries, p[pre + "q_norm.gamma"], p[pre + "q_norm.beta"]),
               _ln(z, p[pre + "kv_norm.gamma"], p[pre + "kv_norm.beta"]),
               p, pre + "attn.", cfg.decoder_heads, None)
    u = queries + att if cfg.decoder_query_residual else att
    u = u + _ffn(_ln(u, p[pre + "ffn_norm.gamma"], p[pre + "ffn_norm.beta"]), p, pre + "ffn.", cfg.gelu)
    y = np.einsum("boc,ck->bok", u, p[pre + "output.weight"]) + p[pre + "output.bias"]
    if query_mask is not None:
        y = np.where(query_mask[..., None], y, 0.0)
    return y[:, 0] if cfg.decoder == "classification" else y
