"""The model's attention backends: the tiled kernel ("numba") against the plain path
("numpy"), forward and backward, and which backend each block uses."""

from __future__ import annotations

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.layers import AttentionCache, FlashCache
from perceiver_np.tolerances import FLOAT64_RTOL, float32_forward_rtol

from .helpers import assert_same_run, small_opts

CASES = {
    "seed-small": {},
    "two-cross-shared": {"num_layers": 3, "num_cross_layers": 2, "num_blocks": 2},
    "raw-input-widths": {"input_projection": False, "qk_channels": 6, "v_channels": 10,
                         "cross_heads": 2, "gelu": "tanh"},
    "dropout": {"dropout": 0.3},
}


def _models(opts, rng):
    base = pnp.build(**small_opts(**opts, backend="numpy"))
    for name, v in base.params.items():
        base.params[name] = v + 0.3 * rng.normal(size=v.shape)
    kernel = pnp.Perceiver(base.config.replace(backend="numba"), base.params)
    return base, kernel


@pytest.mark.parametrize("case", list(CASES))
def test_numba_backend_equals_numpy_backend(rng, case):
    plain, kernel = _models(CASES[case], rng)
    x = rng.normal(size=(3, 300, 5))
    mask = rng.random((3, 300)) < 0.7
    mask[1] = False  # one sample with no visible input
    training = plain.config.dropout > 0
    c0, c1 = assert_same_run(plain, kernel, x, rng, FLOAT64_RTOL, mask, training)
    _, dx1 = kernel.backward(rng.normal(size=(3, kernel.config.latent_dim)), c1)
    assert np.all(dx1[~mask] == 0)
    # param_grads (a training step's backward, no dx): backward's grads, bitwise, on both backends
    dy = rng.normal(size=(3, kernel.config.latent_dim))
    for model, cache in ((plain, c0), (kernel, c1)):
        want, _ = model.backward(dy, cache)
        got = model.param_grads(dy, cache)
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_float32_numba_backend_within_float32_rounding(rng):
    m64 = pnp.build(input_dim=287, dtype="float64", backend="numpy")
    m32 = pnp.build(input_dim=287, backend="numba")
    x = rng.normal(size=(2, 2000, 287))
    mask = rng.random((2, 2000)) < 0.9
    y64 = m64(x, mask)
    y32 = m32(x.astype(np.float32), mask)
    self_steps = sum(1 for kind, _ in m64.config.schedule if kind == "self")
    depth = 1 + 12 * m64.config.num_cross_layers + 11 * self_steps + 2
    assert np.abs(y32 - y64).max() / np.abs(y64).max() <= float32_forward_rtol(depth, 2000)


def test_which_backend_each_block_uses(rng):
    x = rng.normal(size=(2, 6, 5))

    def attn_kinds(model, training=False, **kw):
        _, cache = model.forward(x, training=training, rng=np.random.default_rng(0), **kw)
        return [type(step.attn.attn).__name__ for step in cache.steps]

    auto = pnp.build(**small_opts())
    assert auto.config.backend == "auto"
    assert attn_kinds(auto) == ["FlashCache"] * 3  # the latents' self-attentions too
    numba = pnp.build(**small_opts(backend="numba"))
    assert attn_kinds(numba) == ["FlashCache"] * 3
    numpy = pnp.build(**small_opts(backend="numpy"))
    assert attn_kinds(numpy) == ["AttentionCache"] * 3
    # probability dropout needs the probabilities: auto keeps the plain path in training then
    drop = pnp.build(**small_opts(attention_dropout=0.1))
    assert attn_kinds(drop, training=True) == ["AttentionCache"] * 3
    assert attn_kinds(drop, training=False) == ["FlashCache"] * 3
    uniform = pnp.build(**small_opts(masked_rows="uniform"))  # the kernel zeroes rows with no key
    assert attn_kinds(uniform) == ["AttentionCache", "FlashCache", "FlashCache"]
    assert FlashCache.__name__ == "FlashCache" and AttentionCache.__name__ == "AttentionCache"


def test_numba_backend_rejects_attention_dropout():
    with pytest.raises(ValueError, match="backend: 'numba' has no dropout on attention probabilities"):
        pnp.build(**small_opts(backend="numba", attention_dropout=0.1))
    with pytest.raises(ValueError, match="backend: expected one of"):
        pnp.build(**small_opts(backend="torch"))
