"""Property tests over shapes (hypothesis): for any small configuration, including N = 1,
M = 1, one head and fully masked samples, the forward equals the independent spec, nothing is
NaN, and the backward matches finite differences."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import perceiver_np as pnp
from perceiver_np.gradcheck import check_model
from perceiver_np.tolerances import FLOAT64_RTOL, GRADCHECK_RTOL

from .spec_model import spec_forward


@st.composite
def configs(draw):
    heads = draw(st.integers(1, 2))
    num_cross = draw(st.integers(1, 2))
    opts = dict(
        input_dim=draw(st.integers(1, 4)),
        latent_dim=heads * draw(st.integers(1, 3)),
        num_latents=draw(st.integers(1, 3)),
        num_layers=num_cross + draw(st.integers(0, 1)),
        num_cross_layers=num_cross,
        num_heads=heads,
        cross_heads=draw(st.sampled_from([None, 1])),
        num_blocks=draw(st.integers(1, 2)),
        gelu=draw(st.sampled_from(["exact", "tanh"])),
        input_projection=draw(st.booleans()),
        use_query_residual=draw(st.booleans()),
        cross_widening_factor=draw(st.integers(1, 2)),
        self_widening_factor=draw(st.integers(1, 2)),
        dropout=0.0,
        dtype="float64",
        seed=draw(st.integers(0, 1000)),
    )
    if not opts["input_projection"]:
        opts["cross_heads"] = 1  # the raw input width need not divide by the heads
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 5))
    mask = np.array(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n),
                                  min_size=batch, max_size=batch)), dtype=bool)
    use_mask = draw(st.booleans())
    return opts, batch, n, (mask if use_mask else None), draw(st.integers(0, 2**31))


@given(configs())
def test_any_small_model_is_right(case):
    opts, batch, n, mask, seed = case
    model = pnp.build(**opts)
    rng = np.random.default_rng(seed)
    for name, v in model.params.items():  # random everything, not the init's zeros and ones
        model.params[name] = v + 0.3 * rng.normal(size=v.shape)
    x = rng.normal(size=(batch, n, opts["input_dim"]))
    y = model(x, mask)
    assert np.isfinite(y).all()
    want = spec_forward(model.config, model.params, x, mask)
    assert np.abs(y - want).max() <= FLOAT64_RTOL * max(np.abs(want).max(), 1e-300)
    report = check_model(model, x, mask, max_entries=6, seed=seed % 1000)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
