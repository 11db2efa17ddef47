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


def random_model(rng, **overrides):
    """A small float64 model (small_opts with ``overrides``) whose every parameter is moved off
    its initial value, so that no gradient is trivially zero or one."""
    import perceiver_np as pnp

    model = pnp.build(**small_opts(**overrides))
    for name, v in model.params.items():
        model.params[name] = v + 0.3 * rng.normal(size=v.shape)
    return model


def assert_same_run(plain, other, x, rng, rtol, mask=None, training=False):
    """``other`` gives ``plain``'s output, every parameter gradient and dx within ``rtol``
    (normwise) for a random upstream gradient; both draw dropout from one seed. Returns the
    caches (plain, other)."""
    import numpy as np

    y0, c0 = plain.forward(x, mask, training=training, rng=np.random.default_rng(1))
    y1, c1 = other.forward(x, mask, training=training, rng=np.random.default_rng(1))
    assert np.abs(y1 - y0).max() <= rtol * np.abs(y0).max()
    dy = rng.normal(size=y0.shape)
    g0, dx0 = plain.backward(dy, c0)
    g1, dx1 = other.backward(dy, c1)
    assert_same_gradients(g1, g0, rtol)
    assert np.abs(dx1 - dx0).max() <= rtol * np.abs(dx0).max()
    return c0, c1
