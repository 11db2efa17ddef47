"""The cross- and self-attention blocks as functional units: forward/backward on their own
parameter subsets, gradient-checked over their options."""

from __future__ import annotations

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.config import cross_block_shapes, self_block_shapes
from perceiver_np.gradcheck import gradcheck
from perceiver_np.tolerances import FLOAT64_RTOL, GRADCHECK_RTOL

from .helpers import small_opts


def _params(rng, shapes):
    out = {}
    for name, shape in shapes.items():
        scale = 1.0 if name.endswith(("gamma",)) else 0.0
        out[name] = scale + (0.3 if name.endswith(("gamma", "beta")) else 0.5) * rng.normal(size=shape)
    return out


CROSS_CASES = {
    "seed": {},
    "no-query-residual": {"use_query_residual": False},
    "tanh-gelu": {"gelu": "tanh"},
    "raw-input-widths": {"input_projection": False, "qk_channels": 6, "v_channels": 10, "cross_heads": 2},
    "dropout": {"dropout": 0.3, "attention_dropout": 0.2},
}


@pytest.mark.parametrize("case", list(CROSS_CASES))
def test_cross_block_backward(rng, case):
    cfg = pnp.PerceiverConfig(**small_opts(**CROSS_CASES[case]))
    params = _params(rng, cross_block_shapes(cfg))
    z = rng.normal(size=(3, cfg.num_latents, cfg.latent_dim))
    h = rng.normal(size=(3, 4, cfg.kv_channels))
    mask = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    training = cfg.dropout > 0

    def run(t):
        return pnp.cross_block_forward(
            t["z"], t["h"], {k: v for k, v in t.items() if k not in "zh"},
            num_heads=cfg.cross_num_heads, mask=mask, gelu=cfg.gelu,
            use_query_residual=cfg.use_query_residual, dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout, training=training,
            rng=np.random.default_rng(4))

    def grad_fn(t, dy):
        (dz, dh), grads = pnp.cross_block_backward(dy, run(t)[1])
        assert set(grads) == set(params)
        return {"z": dz, "h": dh, **grads}

    report = gradcheck(lambda t: run(t)[0], grad_fn, {"z": z, "h": h, **params})
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


@pytest.mark.parametrize("case", ["seed", "tanh-gelu", "dropout", "widths"])
def test_self_block_backward(rng, case):
    extra = {"widths": {"qk_channels": 4, "v_channels": 6}}.get(case, CROSS_CASES.get(case, {}))
    cfg = pnp.PerceiverConfig(**small_opts(**extra))
    params = _params(rng, self_block_shapes(cfg))
    z = rng.normal(size=(2, cfg.num_latents, cfg.latent_dim))
    training = cfg.dropout > 0

    def run(t):
        return pnp.self_block_forward(
            t["z"], {k: v for k, v in t.items() if k != "z"}, num_heads=cfg.num_heads,
            gelu=cfg.gelu, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
            training=training, rng=np.random.default_rng(4))

    def grad_fn(t, dy):
        dz, grads = pnp.self_block_backward(dy, run(t)[1])
        assert set(grads) == set(params)
        return {"z": dz, **grads}

    report = gradcheck(lambda t: run(t)[0], grad_fn, {"z": z, **params})
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


def test_cross_block_without_query_residual_ignores_z_except_through_its_norm(rng):
    cfg = pnp.PerceiverConfig(**small_opts(use_query_residual=False))
    params = _params(rng, cross_block_shapes(cfg))
    z = rng.normal(size=(1, cfg.num_latents, cfg.latent_dim))
    h = rng.normal(size=(1, 4, cfg.kv_channels))
    y1, _ = pnp.cross_block_forward(z, h, params, num_heads=2, use_query_residual=False)
    # LN_q(z) is invariant to shifting each latent by a constant: without the residual, so is y
    y2, _ = pnp.cross_block_forward(z + 1.5, h, params, num_heads=2, use_query_residual=False)
    assert np.abs(y1 - y2).max() <= FLOAT64_RTOL * np.abs(y1).max()
    y3, _ = pnp.cross_block_forward(z + 1.5, h, params, num_heads=2, use_query_residual=True)
    assert np.abs(y1 - y3).max() > 1e-1
