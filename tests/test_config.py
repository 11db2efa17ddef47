"""Options: defaults, validation with errors that name the fields, the block schedule."""

from __future__ import annotations

import dataclasses

import pytest

import perceiver_np as pnp


def test_defaults_are_edifices():
    cfg = pnp.PerceiverConfig(input_dim=287)
    assert (cfg.latent_dim, cfg.num_latents, cfg.num_layers, cfg.num_cross_layers,
            cfg.num_heads, cfg.dropout) == (256, 64, 4, 1, 4, 0.1)
    assert pnp.recommended_defaults() == {
        "latent_dim": 256, "num_latents": 64, "num_layers": 4, "num_cross_layers": 1,
        "num_heads": 4, "dropout": 0.1,
    }
    assert pnp.build(input_dim=287, **pnp.recommended_defaults()).config == cfg
    assert (cfg.dtype, cfg.gelu, cfg.input_projection, cfg.use_query_residual) == (
        "float32", "exact", True, True)


def test_output_size():
    assert pnp.output_size() == 256
    assert pnp.output_size(latent_dim=32) == 32
    assert pnp.output_size(input_dim=3, latent_dim=12, num_heads=3) == 12
    assert pnp.build(input_dim=3, latent_dim=12, num_heads=3)(
        __import__("numpy").zeros((2, 5, 3))).shape == (2, 12)
    with pytest.raises(TypeError, match="unknown option"):
        pnp.output_size(latent_dims=3)


def test_config_round_trips_and_is_frozen():
    cfg = pnp.PerceiverConfig(input_dim=7, qk_channels=8, cross_heads=2)
    assert pnp.PerceiverConfig(**dataclasses.asdict(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.latent_dim = 3  # type: ignore[misc]


def test_derived_widths():
    cfg = pnp.PerceiverConfig(input_dim=6, latent_dim=8, num_heads=2, input_projection=False, cross_heads=3)
    assert (cfg.kv_channels, cfg.cross_qk, cfg.cross_v) == (6, 6, 6)
    assert (cfg.self_qk, cfg.self_v, cfg.cross_num_heads) == (8, 8, 3)
    cfg = cfg.replace(qk_channels=12, v_channels=6)
    assert (cfg.cross_qk, cfg.cross_v, cfg.self_qk) == (12, 6, 12)


def test_schedule_interleaves_like_edifice():
    cfg = pnp.PerceiverConfig(input_dim=3, num_layers=4, num_cross_layers=3)
    assert cfg.self_groups == ((0,), (1,), (2, 3))
    assert cfg.schedule == (("cross", 0), ("self", 0), ("cross", 1), ("self", 1),
                            ("cross", 2), ("self", 2), ("self", 3))
    cfg = pnp.PerceiverConfig(input_dim=3, num_layers=5, num_cross_layers=2, num_blocks=2)
    assert cfg.self_groups == ((0, 1), (2, 3, 4))
    assert cfg.schedule == (("cross", 0), ("self", 0), ("self", 1), ("self", 0), ("self", 1),
                            ("cross", 1), ("self", 2), ("self", 3), ("self", 4),
                            ("self", 2), ("self", 3), ("self", 4))


@pytest.mark.parametrize(
    "opts,error,match",
    [
        ({}, TypeError, "input_dim: required"),
        ({"input_dim": 3, "latent_dims": 4}, TypeError, r"unknown option\(s\) \['latent_dims'\]"),
        ({"input_dim": 0}, ValueError, "input_dim: expected a positive integer, got 0"),
        ({"input_dim": 3, "latent_dim": -4}, ValueError, "latent_dim: expected a positive integer"),
        ({"input_dim": 3, "num_latents": 2.0}, ValueError, "num_latents: expected a positive integer"),
        ({"input_dim": 3, "num_heads": True}, ValueError, "num_heads: expected a positive integer"),
        ({"input_dim": 3, "num_layers": 1, "num_cross_layers": 2}, ValueError,
         r"num_layers \(1\) < num_cross_layers \(2\)"),
        ({"input_dim": 3, "dropout": 1.0}, ValueError, r"dropout: expected a rate in \[0, 1\)"),
        ({"input_dim": 3, "dropout": -0.1}, ValueError, "dropout: expected a rate"),
        ({"input_dim": 3, "attention_dropout": 2}, ValueError, "attention_dropout: expected a rate"),
        ({"input_dim": 3, "num_heads": 3}, ValueError,
         r"num_heads \(cross_heads defaults to it\): 3 heads do not divide the cross qk width 256 "
         r"\(defaults to latent_dim\)"),
        ({"input_dim": 3, "cross_heads": 2, "num_heads": 3}, ValueError,
         r"num_heads: 3 heads do not divide the self qk width 256"),
        ({"input_dim": 287, "input_projection": False}, ValueError,
         r"num_heads \(cross_heads defaults to it\): 4 heads do not divide the cross qk width 287 "
         r"\(defaults to input_dim"),
        ({"input_dim": 3, "qk_channels": 6}, ValueError, r"qk width 6 \(qk_channels\)"),
        ({"input_dim": 3, "v_channels": 6}, ValueError, r"v width 6 \(v_channels\)"),
        ({"input_dim": 3, "qk_channels": 0}, ValueError, "qk_channels: expected a positive integer or None"),
        ({"input_dim": 3, "gelu": "relu"}, ValueError, "gelu: expected one of"),
        ({"input_dim": 3, "dtype": "float16"}, ValueError, "dtype: expected one of"),
        ({"input_dim": 3, "final_norm": 1}, ValueError, "final_norm: expected True or False"),
        ({"input_dim": 3, "num_blocks": 0}, ValueError, "num_blocks: expected a positive integer"),
        ({"input_dim": 3, "seed": -1}, ValueError, "seed: expected a non-negative integer"),
    ],
)
def test_bad_options_are_rejected_by_name(opts, error, match):
    with pytest.raises(error, match=match):
        pnp.build(**opts)
    if "input_dim" in opts:
        with pytest.raises(error, match=match):
            pnp.param_count(**opts)
