"""What a configuration costs, as functions of the input length N (``perceiver-np info``).

::

    from perceiver_np import cost
    cost.forward_flops(cfg, n)        # FLOPs per sample by part (2 per multiply-add)
    cost.flops_line(cfg)              # (a, b): total forward FLOPs = a N + b, exactly
    cost.transformer_flops(cfg, n)    # a standard transformer on the same N positions
    cost.crossover(cfg)               # the N from which the Perceiver costs less
    cost.training_bytes_line(cfg)     # (a, b): bytes the backward keeps per sample = a N + b
    cost.inference_extra_bytes(cfg, b, n)   # the fast path's buffers for a batch of b

The seed doc's complexity table (Perceiver O(N M + M^2) against a transformer's O(N^2)) with
the constants in: the Perceiver's cost is affine in N (input projection, keys/values and the
cross-attention scores are per position; the latents' blocks and the decoder are per sample),
a transformer's is quadratic.
"""

from __future__ import annotations

import math
from typing import Any

from .config import PerceiverConfig


def forward_flops(cfg: PerceiverConfig, n: int) -> dict[str, int]:
    """FLOPs of one sample's forward at input length n, by part: ``input projection``,
    ``cross-attention`` (all cross blocks: LayerNorm-free products, i.e. q/k/v/out projections,
    scores, weighted sums and the FFN), ``latent self-attention`` (every use of every self
    block), ``decoder`` and ``total``. Element-wise work (LayerNorm, GELU, softmax) is not
    counted: it is O(1) per value against the products' O(width)."""
    d, m = cfg.latent_dim, cfg.num_latents
    parts = {"input projection": 2 * n * cfg.input_dim * d if cfg.input_projection else 0}
    ckv, qk, v = cfg.kv_channels, cfg.cross_qk_channels, cfg.cross_v_channels
    cross = 2 * (m * d * qk + n * ckv * (qk + v) + m * n * (qk + v) + m * v * d
                 + 2 * m * d * cfg.cross_widening_factor * d)
    parts["cross-attention"] = cfg.num_cross_layers * cross
    sq, sv = cfg.self_qk_channels, cfg.self_v_channels
    self_ = 2 * (m * d * (2 * sq + sv) + m * m * (sq + sv) + m * sv * d
                 + 2 * m * d * cfg.self_widening_factor * d)
    parts["latent self-attention"] = sum(1 for kind, _ in cfg.schedule if kind == "self") * self_
    dec = 0
    if cfg.decoder not in ("pool", "latents"):
        o = cfg.decoder_queries or 1
        cq, dqk, dv = cfg.decoder_query_channels, cfg.decoder_qk, cfg.decoder_v
        dec = 2 * (o * cq * dqk + m * d * (dqk + dv) + o * m * (dqk + dv) + o * dv * cq
                   + 2 * o * cq * cfg.decoder_widening_factor * cq + o * cq * int(cfg.output_dim or 0))
    parts["decoder"] = dec
    parts["total"] = sum(parts.values())
    return parts


def flops_line(cfg: PerceiverConfig) -> tuple[int, int]:
    """(a, b) with ``forward_flops(cfg, n)["total"] == a * n + b`` for every n."""
    b = forward_flops(cfg, 0)["total"]
    return forward_flops(cfg, 1)["total"] - b, b


def transformer_layers(cfg: PerceiverConfig) -> int:
    """The depth of the transformer compared against: one layer per block the Perceiver runs."""
    return len(cfg.schedule)


def transformer_flops(cfg: PerceiverConfig, n: int) -> int:
    """FLOPs per sample of a standard pre-LN transformer on the same input: the same input
    projection, then ``transformer_layers(cfg)`` blocks of width D with full self-attention over
    all n positions (q/k/v/out projections D x D, scores and weighted sums 4 n^2 D, the FFN
    with the self blocks' widening factor): O(N^2)."""
    d = cfg.latent_dim if cfg.input_projection else cfg.input_dim
    proj = 2 * n * cfg.input_dim * d if cfg.input_projection else 0
    layer = 2 * n * d * 4 * d + 4 * n * n * d + 4 * n * d * cfg.self_widening_factor * d
    return proj + transformer_layers(cfg) * layer


def crossover(cfg: PerceiverConfig) -> int:
    """The smallest N from which the Perceiver's forward costs no more than the transformer's
    (``transformer_flops``): the root of alpha N^2 + (beta - a) N - b = 0."""
    a, b = flops_line(cfg)
    t1, t2 = transformer_flops(cfg, 1), transformer_flops(cfg, 2)
    alpha = (t2 - 2 * t1) / 2  # t(n) = alpha n^2 + beta n
    beta = t1 - alpha
    root = ((a - beta) + math.sqrt((beta - a) ** 2 + 4 * alpha * b)) / (2 * alpha)
    n = max(1, math.floor(root))
    while forward_flops(cfg, n)["total"] > transformer_flops(cfg, n):
        n += 1
    return n


def training_bytes_line(cfg: PerceiverConfig) -> tuple[int, int]:
    """(a, b): bytes of the activations a training forward keeps for the backward, per sample,
    ``a N + b`` (measured on the model's own cache at two lengths; every cached array is either
    per position or per sample, so two points determine the line exactly)."""
    import numpy as np

    from .model import Perceiver

    model = Perceiver(cfg)
    sizes = []
    for n in (16, 32):
        x = np.zeros((1, n, cfg.input_dim), dtype=cfg.np_dtype)
        queries = None
        if cfg.decoder == "query" and cfg.query_source == "given":
            queries = np.zeros((1, 1, cfg.decoder_query_channels), dtype=cfg.np_dtype)
        _, cache = model.forward(x, queries=queries)
        sizes.append(cache_bytes(cache))
    a = (sizes[1] - sizes[0]) // 16
    return a, sizes[0] - 16 * a


def cache_bytes(cache: Any) -> int:
    """Bytes of every distinct array a forward's cache holds (what the backward needs)."""
    import numpy as np

    seen: dict[int, int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            if isinstance(base, np.ndarray):
                seen[id(base)] = base.nbytes
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                walk(item)

    walk(cache)
    return sum(seen.values())


def inference_extra_bytes(cfg: PerceiverConfig, batch: int, n: int) -> int:
    """Upper estimate of the fast path's largest buffers beyond the input, for a batch: one
    chunk's h, keys and values (``perceiver_np.fast.CHUNK_ROWS`` rows of ``Ckv + qk + v``; with
    several cross blocks and an input projection, h [B, N, D] is held whole) plus the latents'
    widest activations (the FFN's hidden [B, M, wD] and a few [B, M, D]). Independent of N once
    N exceeds a chunk, with one cross block."""
    from .fast import chunk_positions

    item = 4 if cfg.dtype == "float32" else 8
    rows = batch * min(n, chunk_positions(batch))
    chunk = rows * (cfg.kv_channels + cfg.cross_qk_channels + cfg.cross_v_channels)
    whole_h = batch * n * cfg.latent_dim if (cfg.input_projection and cfg.num_cross_layers > 1) else 0
    latents = batch * cfg.num_latents * cfg.latent_dim * (max(cfg.self_widening_factor,
                                                              cfg.cross_widening_factor) + 6)
    return item * (chunk + whole_h + latents)
