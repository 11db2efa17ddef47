"""Small shared helpers of the tests."""

from __future__ import annotations


def small_opts(**overrides):
    """A small float64 model's options, quick enough to gradient-check at every entry."""
    opts = dict(
        input_dim=5, latent_dim=8, num_latents=3, num_layers=2, num_cross_layers=1,
        num_heads=2, dropout=0.0, dtype="float64", seed=3,
    )
    opts.update(overrides)
    return opts
