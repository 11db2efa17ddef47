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


def assert_same_gradients(got, want, rtol):
    """Every gradient of ``got`` equals ``want`` within ``rtol``, normwise per tensor. One floor
    for all: 1e-3 of the largest gradient, because the key biases' exact gradient is 0 and both
    sides hold only rounding noise there (GOLDEN_GRAD_FLOOR explains the same floor)."""
    import numpy as np

    from perceiver_np.tolerances import GOLDEN_GRAD_FLOOR

    scale = max(np.abs(g).max() for g in want.values())
    for name in want:
        ref = max(np.abs(want[name]).max(), GOLDEN_GRAD_FLOOR * scale)
        assert np.abs(got[name] - want[name]).max() <= rtol * ref, name
