"""The gradient checker itself: it must pass right backwards and flag wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from perceiver_np import layers
from perceiver_np.gradcheck import check_layer, gradcheck
from perceiver_np.tolerances import GRADCHECK_RTOL


def test_flags_a_layernorm_backward_missing_a_term(rng):
    def wrong_backward(dy, cache):
        xhat, rstd, gamma = cache.xhat, cache.rstd, cache.gamma
        dxhat = dy * gamma
        dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True))  # forgot the variance term
        return dx, {"gamma": (dy * xhat).sum((0, 1)), "beta": dy.sum((0, 1))}

    p = {"gamma": 1 + 0.3 * rng.normal(size=6), "beta": rng.normal(size=6)}
    report = check_layer(layers.layernorm_forward, wrong_backward, rng.normal(size=(2, 3, 6)), p)
    assert report.worst.name == "x"
    assert report.max_rel_error > 1e-2
    assert report.rows[1].max_rel_error <= GRADCHECK_RTOL  # gamma's gradient was right


def test_all_ones_upstream_gradient_would_hide_the_bug(rng):
    # why the checker draws a random upstream gradient: with dy = 1 the true dx of LayerNorm
    # (gamma = 1) is exactly 0, and the wrong backward above also gives 0.
    _, cache = layers.layernorm_forward(rng.normal(size=(2, 6)), {"gamma": np.ones(6), "beta": np.zeros(6)})
    dx, _ = layers.layernorm_backward(np.ones((2, 6)), cache)
    assert np.abs(dx).max() < 1e-12


def test_samples_large_tensors_and_checks_small_ones_whole(rng):
    report = check_layer(layers.linear_forward, layers.linear_backward, rng.normal(size=(3, 40)),
                         {"weight": rng.normal(size=(40, 2)), "bias": rng.normal(size=2)},
                         max_entries=16)
    checked = {r.name: r.checked for r in report.rows}
    assert checked == {"x": 16, "weight": 16, "bias": 2}
    assert "worst:" in str(report)


def test_rejects_float32_and_wrong_gradient_shapes(rng):
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda t: t["a"], lambda t, dy: {"a": dy}, {"a": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="expected shape"):
        gradcheck(lambda t: t["a"], lambda t, dy: {"a": dy[:2]}, {"a": np.zeros(3)})


def test_does_not_modify_the_callers_arrays(rng):
    a = rng.normal(size=5)
    before = a.copy()
    gradcheck(lambda t: t["a"] ** 2, lambda t, dy: {"a": 2 * t["a"] * dy}, {"a": a})
    assert np.array_equal(a, before)
