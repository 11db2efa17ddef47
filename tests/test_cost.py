"""perceiver_np.cost: the FLOP and memory models ``perceiver-np info`` prints."""

from __future__ import annotations

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import cost

from .helpers import small_opts

CONFIGS = {
    "seed": {"input_dim": 287},
    "io-query-decoder": small_opts(decoder="query", num_outputs=7, output_dim=3, num_cross_layers=2,
                                   num_layers=3),
    "raw-input": small_opts(input_projection=False, cross_heads=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_are_affine_in_n_and_add_up(name):
    cfg = pnp.build(**CONFIGS[name]).config
    a, b = cost.flops_line(cfg)
    for n in (1, 7, 1000, 123_457):
        parts = cost.forward_flops(cfg, n)
        assert parts["total"] == a * n + b
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_seed_flops_by_hand():
    """The seed config (C 287, D 256, M 64, 4 self layers, widening 4), counted by hand."""
    cfg = pnp.build(input_dim=287).config
    n, d, m = 1000, 256, 64
    parts = cost.forward_flops(cfg, n)
    assert parts["input projection"] == 2 * n * 287 * d
    assert parts["cross-attention"] == 2 * (m * d * d + n * d * 2 * d + m * n * 2 * d + m * d * d
                                           + 2 * m * d * 4 * d)
    assert parts["latent self-attention"] == 4 * 2 * (m * d * 3 * d + m * m * 2 * d + m * d * d
                                                     + 2 * m * d * 4 * d)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_crossover_is_where_the_costs_cross(name):
    cfg = pnp.build(**CONFIGS[name]).config
    n = cost.crossover(cfg)
    assert cost.forward_flops(cfg, n)["total"] <= cost.transformer_flops(cfg, n)
    if n > 1:
        assert cost.forward_flops(cfg, n - 1)["total"] > cost.transformer_flops(cfg, n - 1)
    big = 100 * n
    assert cost.transformer_flops(cfg, big) > 10 * cost.forward_flops(cfg, big)["total"]


@pytest.mark.parametrize("name", ["seed", "io-query-decoder"])
def test_training_memory_line_predicts_the_cache(name):
    """Fitted at N = 16 and 32, the line must give the cache's size at another N exactly."""
    cfg = pnp.build(**CONFIGS[name]).config
    a, b = cost.training_bytes_line(cfg)
    model = pnp.Perceiver(cfg)
    _, cache = model.forward(np.zeros((1, 77, cfg.input_dim), dtype=cfg.np_dtype))
    assert cost.cache_bytes(cache) == a * 77 + b
    assert a > 0 and b > 0
