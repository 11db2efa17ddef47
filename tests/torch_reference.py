"""An independent PyTorch reference of the Perceiver as perceiver_np defines it.

Written from the published architecture (docs/architecture.md) and the docs (``docs/architecture.md``,
``docs/params.md``), not from perceiver_np's code: plain functions over a dict of torch tensors
keyed exactly like ``model.params`` (weights ``[in, out]``, so ``y = x @ W + b``). Gradients come
from torch autograd, so a test can hold perceiver_np's hand-written backward against them.

::

    h = x @ W_in + b_in                     (input_projection; else h = x)
    z = broadcast(latents [M, D])           [B, M, D]
    for c in cross blocks:                  spc = max(L // n_cross, 1); the last group takes the rest
        z = CrossBlock_c(z, h, mask)
        run the group's self blocks num_blocks times in a row (the repeats share weights)
    z = LN_final(z)                         (final_norm)
    pool:            y = mean_M(z)                                    [B, D]
    query:           y = CrossBlock_dec(queries, z) @ W_out + b_out   [B, O, out]
    classification:  the same with one query, y[:, 0]                 [B, out]

Nothing here draws random numbers: this is inference (dropout is the identity).

``fused=True`` computes the same functions with torch's own kernels (``F.linear``,
``F.layer_norm``, ``F.gelu``, ``F.scaled_dot_product_attention``): the model a PyTorch user would
write, and the baseline of benchmarks/bench_model.py. tests/test_torch_reference.py holds the two
variants equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

#: LayerNorm epsilon (docs/architecture.md), with the biased variance.
LN_EPS = 1e-5

Getter = Callable[[str], torch.Tensor]


def self_groups(num_layers: int, num_cross_layers: int) -> list[list[int]]:
    """The global self-block indices run after each cross block (docs/architecture.md)."""
    if num_layers < num_cross_layers:
        raise ValueError("num_layers < num_cross_layers")
    spc = max(num_layers // num_cross_layers, 1)
    groups, start = [], 0
    for c in range(num_cross_layers):
        last = c == num_cross_layers - 1
        n_self = num_layers - spc * (num_cross_layers - 1) if last else spc
        groups.append(list(range(start, start + n_self)))
        start += n_self
    return groups


# ---- layers ------------------------------------------------------------------------------------


def linear(x: torch.Tensor, get: Getter, name: str, fused: bool = False) -> torch.Tensor:
    """``x @ W + b`` with ``W = <name>.weight [in, out]``, ``b = <name>.bias [out]``."""
    if fused:
        return torch.addmm(get(f"{name}.bias"), x.reshape(-1, x.shape[-1]),
                           get(f"{name}.weight")).reshape(*x.shape[:-1], -1)
    return x @ get(f"{name}.weight") + get(f"{name}.bias")


def layer_norm(x: torch.Tensor, get: Getter, name: str, fused: bool = False) -> torch.Tensor:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` over the last axis, biased variance."""
    if fused:
        return F.layer_norm(x, x.shape[-1:], get(f"{name}.gamma"), get(f"{name}.beta"), LN_EPS)
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return get(f"{name}.gamma") * (x - mean) / torch.sqrt(var + LN_EPS) + get(f"{name}.beta")


def gelu(x: torch.Tensor, kind: str, fused: bool = False) -> torch.Tensor:
    """``"exact"``: x Phi(x) with the erf; ``"tanh"``: the tanh approximation."""
    if fused and kind in ("exact", "tanh"):
        return F.gelu(x, approximate="none" if kind == "exact" else "tanh")
    if kind == "exact":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if kind == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"gelu: unknown kind {kind!r}")


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*d] -> [B, H, S, d]: head h owns channels [h*d, (h+1)*d)."""
    b, s, width = t.shape
    if width % heads:
        raise ValueError(f"{heads} heads do not divide width {width}")
    return t.reshape(b, s, heads, width // heads).transpose(1, 2)


def mha(
    xq: torch.Tensor,
    xkv: torch.Tensor,
    get: Getter,
    name: str,
    heads: int,
    mask: torch.Tensor | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Multi-head attention: queries from xq [B, M, Cq], keys/values from xkv [B, N, Ckv].

    ``mask`` [B, N] bool, True = keep. Masked keys get weight exactly 0; a sample with no visible
    key gets all-zero weights, so its output is the output projection's bias.
    """
    q = split_heads(linear(xq, get, f"{name}.q", fused), heads)  # [B, H, M, dh]
    k = split_heads(linear(xkv, get, f"{name}.k", fused), heads)  # [B, H, N, dh]
    v = split_heads(linear(xkv, get, f"{name}.v", fused), heads)  # [B, H, N, dv]
    if fused:
        keep = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, N]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, H, M, dv]
        if mask is not None:  # no visible key: SDPA gives NaN, the definition 0
            o = torch.where(mask.any(dim=-1)[:, None, None, None], o, torch.zeros_like(o))
        b, h, m, dv = o.shape
        return linear(o.transpose(1, 2).reshape(b, m, h * dv), get, f"{name}.out", fused)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, M, N], 1/sqrt(qk/H)
    if mask is None:
        p = torch.softmax(scores, dim=-1)
    else:
        keep = mask[:, None, None, :]  # [B, 1, 1, N]
        # A finite fill, not -inf: a fully masked row then softmaxes to a harmless uniform row
        # (no NaN in the forward or in autograd's backward), which the where below zeroes.
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        p = torch.softmax(scores, dim=-1)
        any_key = mask.any(dim=-1)[:, None, None, None]  # [B, 1, 1, 1]
        p = torch.where(any_key, p, torch.zeros_like(p))
    o = p @ v  # [B, H, M, dv]
    b, h, m, dv = o.shape
    o = o.transpose(1, 2).reshape(b, m, h * dv)  # merge heads: [B, M, H*dv]
    return linear(o, get, f"{name}.out")


def ffn(x: torch.Tensor, get: Getter, name: str, gelu_kind: str, fused: bool = False) -> torch.Tensor:
    up = linear(x, get, f"{name}.up", fused)
    return linear(gelu(up, gelu_kind, fused), get, f"{name}.down", fused)


# ---- blocks ------------------------------------------------------------------------------------


def cross_block(
    z: torch.Tensor,
    h: torch.Tensor,
    get: Getter,
    prefix: str,
    *,
    heads: int,
    mask: torch.Tensor | None,
    query_residual: bool,
    gelu_kind: str,
    fused: bool = False,
) -> torch.Tensor:
    """Pre-LN cross block: z [B, M, D] attends to h [B, N, Ckv] -> [B, M, D]."""
    att = mha(
        layer_norm(z, get, f"{prefix}.q_norm", fused), layer_norm(h, get, f"{prefix}.kv_norm", fused),
        get, f"{prefix}.attn", heads, mask, fused,
    )
    a = z + att if query_residual else att
    u = layer_norm(a, get, f"{prefix}.ffn_norm", fused)
    return a + ffn(u, get, f"{prefix}.ffn", gelu_kind, fused)


def self_block(
    z: torch.Tensor, get: Getter, prefix: str, *, heads: int, gelu_kind: str, fused: bool = False
) -> torch.Tensor:
    """Pre-LN self block: [B, M, D] -> [B, M, D]."""
    u = layer_norm(z, get, f"{prefix}.norm", fused)
    a = z + mha(u, u, get, f"{prefix}.attn", heads, fused=fused)
    return a + ffn(layer_norm(a, get, f"{prefix}.ffn_norm", fused), get, f"{prefix}.ffn", gelu_kind, fused)


# ---- the model ---------------------------------------------------------------------------------


def forward(
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_layers: int = 4,
    num_cross_layers: int = 1,
    num_heads: int = 4,
    cross_heads: int | None = None,
    num_blocks: int = 1,
    use_query_residual: bool = True,
    gelu: str = "exact",
    input_projection: bool = True,
    final_norm: bool = True,
    decoder: str = "pool",
    decoder_heads: int = 1,
    decoder_query_residual: bool = False,
    queries: torch.Tensor | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """x [B, N, C], mask [B, N] bool (True = keep) or None -> y ([B, D], [B, out] or [B, O, out]).

    The option names and defaults are perceiver_np's (and Edifice's, for the seed's options).
    Widths (qk/v channels, widening factors, output and query widths) follow from the shapes
    of ``params``. Every entry of ``params`` must be used exactly as the schema says: an unused
    or missing name is a KeyError, so the reference also pins the parameter names.
    ``queries`` [B, O, Cq] or [O, Cq] replaces ``decoder.queries`` (caller-supplied queries).
    """
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        return params[name]

    h = linear(x, get, "input_proj", fused) if input_projection else x  # [B, N, C] -> [B, N, D]
    latents = get("latents")  # [M, D]
    z = latents.expand(x.shape[0], *latents.shape)  # [B, M, D]
    cross_h = num_heads if cross_heads is None else cross_heads
    for c, group in enumerate(self_groups(num_layers, num_cross_layers)):
        z = cross_block(
            z, h, get, f"cross.{c}", heads=cross_h, mask=mask,
            query_residual=use_query_residual, gelu_kind=gelu, fused=fused,
        )
        for _ in range(num_blocks):  # the repeats share the group's weights
            for j in group:
                z = self_block(z, get, f"self.{j}", heads=num_heads, gelu_kind=gelu, fused=fused)
    if final_norm:
        z = layer_norm(z, get, "final_norm", fused)
    if decoder == "pool":
        y = z.mean(dim=1)  # [B, D]
    elif decoder in ("query", "classification"):
        q = get("decoder.queries") if queries is None else queries
        if q.ndim == 2:
            q = q.expand(x.shape[0], *q.shape)  # [O, Cq] -> [B, O, Cq]
        u = cross_block(
            q, z, get, "decoder", heads=decoder_heads, mask=None,
            query_residual=decoder_query_residual, gelu_kind=gelu, fused=fused,
        )  # [B, O, Cq]
        y = linear(u, get, "decoder.output", fused)  # [B, O, out]
        if decoder == "classification":
            if y.shape[1] != 1:
                raise ValueError(f"classification decodes one query, got {y.shape[1]}")
            y = y[:, 0]
    else:
        raise ValueError(f"decoder: unknown {decoder!r}")
    unused = sorted(set(params) - used)
    if unused:
        raise KeyError(f"parameters the reference never used: {unused}")
    return y
