"""DeepMind's query_mask semantics (``query_masking="attention"``): a masked query attends to
nothing, and the rest of the decoder still runs on it, so its output is the output projection's
bias pushed through the residual, the MLP and the final Linear, not 0. Held against DeepMind's
own Haiku code (vendored in tests/third_party) in float64: the outputs to FLOAT64_RTOL and every
gradient (parameters and input, by jax.vjp) to INTEROP_GRAD_RTOL; perceiver_np's default
(``"output"``) zeroes the masked outputs instead, also tested; and the backward of both against
finite differences."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import interop, presets
from perceiver_np.gradcheck import check_model
from perceiver_np.tolerances import FLOAT64_RTOL, GRADCHECK_RTOL, INTEROP_GRAD_RTOL

from .helpers import assert_same_gradients, small_opts

ENCODER = dict(num_z_channels=8, z_index_dim=4, num_blocks=1, num_self_attends_per_block=2,
               num_self_attend_heads=2, num_cross_attend_heads=2, cross_attention_shape_for_attn="q")
DECODER = dict(output_num_channels=3, output_index_dims=(5,), num_z_channels=8, num_heads=2,
               use_query_residual=True, trainable_position_encoding_kwargs=dict(num_channels=6))
QUERY_MASK = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)


def model_of(query_masking: str | None = None) -> pnp.Perceiver:
    opts = presets.from_deepmind(ENCODER, DECODER, input_dim=5)
    if query_masking is not None:
        opts["query_masking"] = query_masking
    model = pnp.build(**opts, dtype="float64", seed=3)
    rng = np.random.default_rng(4)
    return pnp.Perceiver(model.config,
                         {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in model.params.items()})


def test_presets_follow_their_library():
    assert presets.deepmind()["query_masking"] == "attention"
    assert presets.hf()["query_masking"] == "output"
    assert model_of().config.query_masking == "attention"
    with pytest.raises(ValueError, match="query_masking: expected one of"):
        pnp.build(**small_opts(query_masking="queries"))


def test_the_two_semantics():
    x = np.random.default_rng(0).standard_normal((3, 7, 5))
    ours_dm, ours = model_of("attention"), model_of("output")
    y_dm, y = ours_dm(x, query_mask=QUERY_MASK), ours(x, query_mask=QUERY_MASK)
    full = ours(x)
    assert np.array_equal(y, full * QUERY_MASK[..., None])  # "output": masked outputs exactly 0
    assert np.array_equal(y_dm[QUERY_MASK], full[QUERY_MASK])  # unmasked queries are unchanged
    masked = y_dm[~QUERY_MASK]
    assert np.abs(masked).min() > 0  # not 0: the bias, residual, MLP and final Linear still act
    # a masked query's output does not depend on the latents: the same for every sample
    assert np.abs(y_dm[1, 1] - y_dm[0, 1]).max() <= FLOAT64_RTOL * np.abs(y_dm[0, 1]).max()


@pytest.mark.parametrize("query_masking", ["attention", "output"])
def test_query_masked_gradients_against_finite_differences(query_masking):
    model = pnp.build(**small_opts(decoder="query", num_outputs=5, output_dim=2, num_layers=1,
                                   decoder_query_residual=True, query_masking=query_masking))
    rng = np.random.default_rng(1)
    model = pnp.Perceiver(model.config,
                          {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in model.params.items()})
    x = rng.standard_normal((3, 4, 5))
    report = check_model(model, x, None, query_mask=QUERY_MASK, max_entries=4)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


def test_query_mask_equals_deepmind():
    reason = "DeepMind's decoder needs jax and dm-haiku: pip install -e '.[compare]'"
    jax = pytest.importorskip("jax", reason=reason)
    hk = pytest.importorskip("haiku", reason=reason)
    deepmind = importlib.import_module("tests.third_party.deepmind_perceiver.perceiver")
    model = model_of()
    x = np.random.default_rng(2).standard_normal((3, 7, 5))
    mask = np.arange(7) < np.array([[7], [4], [2]])

    def forward(inputs: Any, input_mask: Any, query_mask: Any) -> Any:
        net = deepmind.Perceiver(encoder=deepmind.PerceiverEncoder(**ENCODER),
                                 decoder=deepmind.BasicDecoder(**DECODER))
        return net(inputs, is_training=False, input_mask=input_mask, query_mask=query_mask)

    fn = hk.transform(forward)
    tree = interop.to_haiku(model)
    with jax.enable_x64(True):
        def run(params: Any, inputs: Any) -> Any:
            return fn.apply(params, jax.random.PRNGKey(0), inputs, mask, QUERY_MASK.astype(np.int32))

        y_dm, vjp = jax.vjp(run, tree, x)
        y, cache = model.forward(x, mask, query_mask=QUERY_MASK)
        assert np.abs(y - np.asarray(y_dm)).max() <= FLOAT64_RTOL * np.abs(y).max()
        dy = np.random.default_rng(3).standard_normal(y.shape)
        g_tree, g_x = vjp(dy)
    grads, dx = model.backward(dy, cache)
    names = interop.haiku_name_map(model.config)
    want = {ours: np.asarray(g_tree[module][param]) for ours, (module, param) in names.items()}
    assert_same_gradients({**grads, "x": dx}, {**want, "x": np.asarray(g_x)}, INTEROP_GRAD_RTOL)
