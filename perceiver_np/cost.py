"""What a configuration costs, as functions of the input length N (``perceiver-np info``).

::

    from perceiver_np import cost
    cost.forward_flops(cfg, n)        # FLOPs per sample by part (2 per multiply-add)
    cost.flops_line(cfg)              # (a, b): total forward FLOPs = a N + b, exactly
    cost.transformer_flops(cfg, n)    # a standard transformer on the same N positions
    cost.crossover(cfg)               # the N from which the Perceiver costs less
    cost.training_bytes_line(cfg)     # (a, b): bytes the backward keeps per sample = a N + b
    cost.param_count(cfg)             # parameters, without allocating them
    cost.inference_extra_bytes(cfg, b, n)   # the inference engine's buffers for a batch of b

The seed doc's complexity table (Perceiver O(N M + M^2) against a transformer's O(N^2)) with
the constants in: the Perceiver's cost is affine in N (input projection, keys/values and the
cross-attention scores are per position; the latents' blocks and the decoder are per sample),
a transformer's is quadratic. Everything here is arithmetic on the config: no array is
allocated, so a configuration of any size is costed in microseconds.
"""

from __future__ import annotations

import math
from typing import Any

from .config import PerceiverConfig, cross_block_shapes, decoder_shapes, self_block_shapes
from .engine import chunk_positions


def forward_flops(cfg: PerceiverConfig, n: int) -> dict[str, int]:
    """FLOPs of one sample's forward at input length n, by part: ``input projection``,
    ``cross-attention`` (all cross blocks: LayerNorm-free products, i.e. q/k/v/out projections,
    scores, weighted sums and the FFN), ``latent self-attention`` (every use of every self
    block), ``decoder`` and ``total``. Element-wise work (LayerNorm, GELU, softmax) is not
    counted: it is O(1) per value against the products' O(width)."""
    d, m = cfg.latent_dim, cfg.num_latents
    parts = {"input projection": 2 * n * cfg.encoder_input_channels * d if cfg.input_projection else 0}
    ffn = ffn_products(cfg)  # the FFN's products per row, in units of width x hidden width
    ckv, qk, v = cfg.kv_channels, cfg.cross_qk, cfg.cross_v
    cross = 2 * (m * d * qk + n * ckv * (qk + v) + m * n * (qk + v) + m * v * d
                 + ffn * m * d * cfg.cross_widening_factor * d)
    parts["cross-attention"] = cross_block_uses(cfg) * cross
    sq, sv = cfg.self_qk, cfg.self_v
    self_ = 2 * (m * d * (2 * sq + sv) + m * m * (sq + sv) + m * sv * d
                 + ffn * m * d * cfg.self_widening_factor * d)
    parts["latent self-attention"] = self_block_uses(cfg) * self_
    dec = 0
    if cfg.decoder == "pool_linear":
        dec = 2 * d * int(cfg.output_dim or 0)
    elif cfg.decoder not in ("pool", "latents"):
        o = cfg.decoder_queries or 1
        cq, dqk, dv = cfg.decoder_query_channels, cfg.decoder_qk, cfg.decoder_v
        dec = 2 * (o * cq * dqk + m * d * (dqk + dv) + o * m * (dqk + dv) + o * dv * cq
                   + (ffn * o * cq * cfg.decoder_widening_factor * cq if cfg.decoder_ffn else 0)
                   + (o * cq * int(cfg.output_dim or 0) if cfg.decoder_output else 0))
    parts["decoder"] = dec
    parts["total"] = sum(parts.values())
    return parts


def flops_line(cfg: PerceiverConfig) -> tuple[int, int]:
    """(a, b) with ``forward_flops(cfg, n)["total"] == a * n + b`` for every n."""
    b = forward_flops(cfg, 0)["total"]
    return forward_flops(cfg, 1)["total"] - b, b


def ffn_products(cfg: PerceiverConfig) -> int:
    """The FFN's two products per row, in units of (width x hidden width): 2 with GELU (up and
    down), 3 with GEGLU (its up projection is twice as wide)."""
    return 3 if cfg.ffn_kind == "geglu" else 2


def self_block_uses(cfg: PerceiverConfig) -> int:
    """How many self blocks the forward runs: ``num_blocks`` uses of each of the ``num_layers``
    blocks (the self steps of ``cfg.schedule``, counted without building it), or the self steps
    of ``block_order``."""
    if cfg.block_order is not None:
        return sum(1 for kind, _ in cfg.block_order if kind == "self")
    return cfg.num_blocks * cfg.num_layers


def cross_block_uses(cfg: PerceiverConfig) -> int:
    """How many cross blocks the forward runs: each of the ``num_cross_layers`` once, or the
    cross steps of ``block_order``."""
    if cfg.block_order is not None:
        return sum(1 for kind, _ in cfg.block_order if kind == "cross")
    return cfg.num_cross_layers


def transformer_layers(cfg: PerceiverConfig) -> int:
    """The depth of the transformer compared against: one layer per block the Perceiver runs
    (``len(cfg.schedule)``)."""
    return cross_block_uses(cfg) + self_block_uses(cfg)


def transformer_flops(cfg: PerceiverConfig, n: int) -> int:
    """FLOPs per sample of a standard pre-LN transformer on the same input: the same input
    projection, then ``transformer_layers(cfg)`` blocks of width D with full self-attention over
    all n positions (q/k/v/out projections D x D, scores and weighted sums 4 n^2 D, the FFN
    with the self blocks' widening factor): O(N^2)."""
    d = cfg.latent_dim if cfg.input_projection else cfg.encoder_input_channels
    proj = 2 * n * cfg.encoder_input_channels * d if cfg.input_projection else 0
    layer = 2 * n * d * 4 * d + 4 * n * n * d + 4 * n * d * cfg.self_widening_factor * d
    return proj + transformer_layers(cfg) * layer


def crossover(cfg: PerceiverConfig) -> int:
    """The smallest N from which the Perceiver's forward costs no more than the transformer's
    (``transformer_flops``): the root of alpha N^2 + (beta - a) N - b = 0."""
    a, b = flops_line(cfg)
    t1, t2 = transformer_flops(cfg, 1), transformer_flops(cfg, 2)
    alpha = (t2 - 2 * t1) // 2  # t(n) = alpha n^2 + beta n, integers (exact for any widths)
    beta = t1 - alpha
    n = max(1, ((a - beta) + math.isqrt((beta - a) ** 2 + 4 * alpha * b)) // (2 * alpha))
    while forward_flops(cfg, n)["total"] > transformer_flops(cfg, n):
        n += 1
    return n


def param_count(cfg: PerceiverConfig) -> int:
    """The number of parameters (``Perceiver(cfg).param_count``), by arithmetic on the block
    shapes: no parameter is allocated and the schema is not listed, so any size or depth works."""
    def block(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(s) for s in shapes.values())

    d = cfg.latent_dim
    total = cfg.num_latents * d + cfg.num_cross_layers * block(cross_block_shapes(cfg))
    total += cfg.num_layers * block(self_block_shapes(cfg))
    total += ((cfg.encoder_input_channels * d + d if cfg.input_projection else 0)
              + (2 * d if cfg.final_norm else 0))
    if cfg.decoder not in ("pool", "latents"):
        total += block(decoder_shapes(cfg))
    return total


def training_bytes_line(cfg: PerceiverConfig) -> tuple[int, int]:
    """(a, b): bytes of the arrays a forward's cache keeps for the backward, per sample,
    ``a N + b``, counted from the config alone: nothing is allocated, so any size works.

    Exactly :func:`cache_bytes` of the cache of ``Perceiver(cfg).forward(x)`` for one sample
    without a mask (tests/test_cost.py checks it against real caches): every cached array is
    either per position (a) or per sample (b); the parameters, which the cache refers to but
    does not copy, are not counted. Training with dropout adds its masks (per sample), which are
    not counted either."""
    d, m = cfg.latent_dim, cfg.num_latents
    # the input projection's x [N, C + P] (with the input's Fourier features, input_fourier)
    per_position = cfg.encoder_input_channels if cfg.input_projection else 0
    per_sample = 0
    acts = ffn_activations(cfg)
    # every cross block: LN_kv's xhat [N, Ckv], rstd [N] and output [N, Ckv] (the key/value
    # projections' input), the keys [N, qk] and values [N, v], and on the plain attention path
    # the probabilities [H, M, N]; and its query side
    ckv, qk, v, heads = cfg.kv_channels, cfg.cross_qk, cfg.cross_v, cfg.cross_num_heads
    flash = cfg.attention_backend("cross", False) == "numba"
    crosses = cross_block_uses(cfg)
    per_position += crosses * (2 * ckv + 1 + qk + v + (0 if flash else heads * m))
    per_sample += crosses * _query_side(m, d, qk, v, heads, acts * cfg.cross_widening_factor, flash)
    # every use of a self block: its query side, keys, values (and probabilities)
    qk, v, heads = cfg.self_qk, cfg.self_v, cfg.num_heads
    flash = cfg.attention_backend("self", False) == "numba"
    per_sample += self_block_uses(cfg) * (_query_side(m, d, qk, v, heads, acts * cfg.self_widening_factor,
                                                      flash)
                                          + m * (qk + v) + (0 if flash else heads * m * m))
    if cfg.final_norm:  # xhat [M, D], rstd [M]
        per_sample += m * d + m
    if cfg.decoder == "pool_linear":  # LN's xhat [D] and rstd [1], the output projection's input [D]
        per_sample += 2 * d + 1
    elif cfg.decoder not in ("pool", "latents"):  # a cross block from O queries to the M latents
        o = cfg.decoder_queries or 1
        cq, qk, v, heads = cfg.decoder_query_channels, cfg.decoder_qk, cfg.decoder_v, cfg.decoder_heads
        flash = cfg.attention_backend("cross", False) == "numba"
        per_sample += (_query_side(o, cq, qk, v, heads, acts * cfg.decoder_widening_factor, flash)
                       + 2 * m * d + m + m * (qk + v)  # LN_kv of the latents, keys, values
                       + (0 if flash else heads * o * m)
                       + (o * cq if cfg.decoder_output else 0))  # the output projection's input
        if not cfg.decoder_ffn:  # no LN_ffn (xhat, rstd, output) and no FFN activations
            per_sample -= 2 * o * cq + o + acts * o * cfg.decoder_widening_factor * cq
    item = cfg.np_dtype.itemsize
    return item * per_position, item * per_sample


def ffn_activations(cfg: PerceiverConfig) -> int:
    """What an FFN's cache keeps per row, in units of its hidden width wD: GELU's pre-activation
    and output (2); GEGLU's pre-activation [2wD], its gate half copied, the gate's GELU and the
    gated product (5)."""
    return 5 if cfg.ffn_kind == "geglu" else 2


def _query_side(rows: int, width: int, qk: int, v: int, heads: int, ffn_values: int, flash: bool) -> int:
    """The values a block's cache keeps on its query side, for ``rows`` queries of ``width``
    channels: the two LayerNorms' xhat and rstd and their outputs (the query projection's and
    the FFN's input), the queries [rows, qk], the merged heads [rows, v] (the output
    projection's input), the FFN's activations, ``ffn_values`` per row and channel
    (:func:`ffn_activations` times the widening factor);
    with the kernel (``flash``) also its log-sum-exp [H, rows] and output o [H, rows, v / H],
    of which the merged heads are a view when merging needs no copy (one head, one row or one
    channel per head)."""
    acts = 2 * (2 * rows * width + rows) + rows * (qk + v) + rows * ffn_values * width
    if flash:
        acts += heads * rows + (rows * v if heads > 1 and rows > 1 and v > heads else 0)
    return acts


def cache_bytes(cache: Any) -> int:
    """Bytes of every distinct array a forward's cache holds (what the backward needs), the
    model's parameters left out: the cache refers to them (``params_used``), it does not copy
    them, and they are the model's memory whatever the batch."""
    import numpy as np

    seen: dict[int, int] = {}
    params = {id(p if p.base is None else p.base) for p in getattr(cache, "params_used", ())}

    def walk(obj: Any) -> None:
        if isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            if isinstance(base, np.ndarray) and id(base) not in params:
                seen[id(base)] = base.nbytes
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                walk(item)

    walk(cache)
    return sum(seen.values())


def inference_extra_bytes(cfg: PerceiverConfig, batch: int, n: int) -> int:
    """Upper estimate of the inference engine's largest buffers beyond the input, for a batch: one
    chunk's h, keys and values (``perceiver_np.engine.CHUNK_ROWS`` rows of ``Ckv + qk + v``; with
    several cross blocks and an input projection, h [B, N, D] is held whole) plus the latents'
    widest activations (the FFN's hidden [B, M, wD] and a few [B, M, D]). Independent of N once
    N exceeds a chunk, with one cross block. An upper estimate also for a cross block that runs
    folded (:func:`perceiver_np.engine.folds`), which keeps no per-position buffer at all."""

    item = 4 if cfg.dtype == "float32" else 8
    rows = batch * min(n, chunk_positions(batch))
    chunk = rows * (cfg.kv_channels + cfg.cross_qk + cfg.cross_v)
    whole_h = batch * n * cfg.latent_dim if (cfg.input_projection and cfg.num_cross_layers > 1) else 0
    hidden = max(cfg.self_widening_factor, cfg.cross_widening_factor) * (2 if cfg.ffn_kind == "geglu" else 1)
    latents = batch * cfg.num_latents * cfg.latent_dim * (hidden + 6)
    return item * (chunk + whole_h + latents)
