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


#: Configurations whose caches differ in kind: every decoder and query source, the plain and
#: the kernel attention paths, shared self blocks, one head, one channel per head, float32.
MEMORY_CONFIGS = {
    **CONFIGS,
    "float32": small_opts(dtype="float32"),
    "plain-path": small_opts(backend="numpy", decoder="classification", output_dim=4, decoder_heads=2),
    "kernel-everywhere": small_opts(backend="numba", qk_channels=2, v_channels=2, cross_heads=2),
    "uniform-masked-rows": small_opts(masked_rows="uniform", num_heads=1),
    "shared-self-blocks": small_opts(num_cross_layers=2, num_layers=4, num_blocks=2, final_norm=False),
    "classification": small_opts(decoder="classification", output_dim=4, cross_widening_factor=2),
    "query-decoder": small_opts(decoder="query", num_outputs=5, output_dim=3, decoder_heads=4,
                                decoder_qk_channels=8, decoder_v_channels=4, query_dim=6,
                                decoder_widening_factor=2),
    "fourier-queries": small_opts(decoder="query", query_source="fourier", output_index_dims=(3, 2),
                                  output_dim=2, decoder_heads=2),
    "given-queries": small_opts(decoder="query", query_source="given", query_dim=6, output_dim=2),
    "latents": small_opts(decoder="latents", num_latents=1, qk_channels=4, v_channels=6),
    # the ports' switches (lucidrains, krasserm): GEGLU, no q/k/v biases, per-kind widths, a
    # block order with a tied block, Fourier input features, the pooled classifier head, a
    # decoder without its FFN and one without its output projection
    "lucidrains": small_opts(ffn_kind="geglu", qkv_bias=False, input_projection=False, cross_heads=1,
                             cross_qk_channels=6, self_qk_channels=4, masked_rows="uniform",
                             final_norm=False, decoder="pool_linear", output_dim=3, num_cross_layers=2,
                             num_layers=2, input_fourier="lucidrains", input_index_dims=(4,),
                             input_num_bands=2, block_order=(("cross", 0), ("self", 0), ("cross", 1),
                                                             ("self", 1), ("cross", 1), ("self", 1))),
    "fourier-projected": small_opts(input_fourier="lucidrains", input_index_dims=(2, 2), input_num_bands=1),
    "io-no-ffn": small_opts(decoder="query", query_source="given", query_dim=6, output_dim=2,
                            decoder_ffn=False, ffn_kind="geglu"),
    "classification-no-ffn": small_opts(decoder="classification", output_dim=2,
                               decoder_ffn=False),
    "io-raw": small_opts(decoder="query", num_outputs=3, decoder_output=False, ffn_kind="geglu"),
}


@pytest.mark.parametrize("name", list(MEMORY_CONFIGS))
def test_training_memory_line_is_the_cache(name):
    """Counted from the config, the line gives the size of a real forward's cache at any N."""
    cfg = pnp.build(**MEMORY_CONFIGS[name]).config
    a, b = cost.training_bytes_line(cfg)
    model = pnp.Perceiver(cfg)
    queries = None
    if cfg.decoder == "query" and cfg.query_source == "given":
        queries = np.zeros((1, 1, cfg.decoder_query_channels), dtype=cfg.np_dtype)
    for n in (1, 16, 77):
        if cfg.input_fourier != "none":  # the grid fixes N: a grid of n positions, same axes
            dims = (n,) + (1,) * (len(cfg.input_index_dims or ()) - 1)
            model = pnp.Perceiver(cfg.replace(input_index_dims=dims))
        _, cache = model.forward(np.zeros((1, n, cfg.input_dim), dtype=cfg.np_dtype), queries=queries)
        assert cost.cache_bytes(cache) == a * n + b, n
    assert a > 0 and b > 0
    assert cost.param_count(cfg) == model.param_count


def test_costs_need_no_model(monkeypatch):
    """A model of 8 TiB and one of 10^9 blocks: costed from the config, nothing allocated."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(pnp.Perceiver, "__init__", no_model)
    for opts in ({"input_dim": 287, "latent_dim": 10**9}, {"input_dim": 287, "num_layers": 10**9,
                                                          "num_cross_layers": 10**6, "num_blocks": 7}):
        cfg = pnp.PerceiverConfig(**opts)
        a, b = cost.training_bytes_line(cfg)
        assert a > 0 and b > 0
        assert cost.forward_flops(cfg, 4096)["total"] > 0
        n = cost.crossover(cfg)
        assert cost.forward_flops(cfg, n)["total"] <= cost.transformer_flops(cfg, n)
        assert cost.inference_extra_bytes(cfg, 32, 4096) > 0
        assert cost.param_count(cfg) > 10**9


@pytest.mark.parametrize("name", list(MEMORY_CONFIGS))
def test_depth_counts_match_the_schedule(name):
    cfg = pnp.build(**MEMORY_CONFIGS[name]).config
    assert cost.transformer_layers(cfg) == len(cfg.schedule)
    assert cost.self_block_uses(cfg) == sum(kind == "self" for kind, _ in cfg.schedule)
