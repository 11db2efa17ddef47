"""Perceiver IO decoders: the query decoder (trainable, Fourier or caller-supplied queries, with
a query mask) and the classification decoder, against the spec and finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.gradcheck import check_model
from perceiver_np.tolerances import FLOAT64_RTOL, GRADCHECK_RTOL

from .helpers import assert_same_run, random_model, small_opts
from .spec_model import spec_forward

DECODERS = {
    "classification": {"decoder": "classification", "output_dim": 3},
    "query-trainable": {"decoder": "query", "output_dim": 2, "num_outputs": 5, "decoder_heads": 2},
    "query-residual-widened": {"decoder": "query", "output_dim": 2, "num_outputs": 4, "query_dim": 6,
                               "decoder_query_residual": True, "decoder_widening_factor": 2,
                               "decoder_qk_channels": 4, "decoder_v_channels": 6, "decoder_heads": 2},
    "query-given": {"decoder": "query", "output_dim": 2, "query_source": "given", "query_dim": 3},
    "dropout": {"decoder": "classification", "output_dim": 4, "dropout": 0.2},
}


_model = random_model


def _queries(model, rng, batch, o=6):
    if model.config.query_source == "given" and model.config.decoder == "query":
        return rng.normal(size=(batch, o, model.config.decoder_query_channels))
    return None


@pytest.mark.parametrize("case", list(DECODERS))
def test_decoder_forward_equals_spec_and_backward_equals_finite_differences(rng, case):
    model = _model(rng, **DECODERS[case])
    x = rng.normal(size=(2, 4, 5))
    mask = np.array([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=bool)
    q = _queries(model, rng, 2)
    y = model(x, mask, queries=q)
    want = spec_forward(model.config, model.params, x, mask, queries=q)
    assert y.shape == want.shape
    assert np.abs(y - want).max() <= FLOAT64_RTOL * np.abs(want).max()
    report = check_model(model, x, mask, training=model.config.dropout > 0, max_entries=12, queries=q)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


def test_query_mask_zeroes_outputs_and_their_gradients(rng):
    model = _model(rng, **DECODERS["query-trainable"])
    x = rng.normal(size=(2, 4, 5))
    qmask = np.array([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)
    y, cache = model.forward(x, query_mask=qmask)
    assert np.all(y[~qmask] == 0)
    want = spec_forward(model.config, model.params, x, query_mask=qmask)
    assert np.abs(y - want).max() <= FLOAT64_RTOL * np.abs(want).max()
    dy = rng.normal(size=y.shape)
    grads, _ = model.backward(dy, cache)
    dy_masked = np.where(qmask[..., None], dy, 0.0)
    grads2, _ = model.backward(dy_masked, cache)
    assert all(np.array_equal(grads[k], grads2[k]) for k in grads)
    report = check_model(model, x, training=False, max_entries=8, query_mask=qmask)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


def test_many_queries_decoder_through_the_kernel_equals_plain_path(rng):
    # O >> M: the decoder's cross-attention is the input cross-attention turned around
    opts = {**DECODERS["query-trainable"], "num_outputs": 700}
    plain = _model(rng, **opts, backend="numpy")
    kernel = pnp.Perceiver(plain.config.replace(backend="numba"), plain.params)
    x = rng.normal(size=(2, 9, 5))
    _, c1 = assert_same_run(plain, kernel, x, rng, FLOAT64_RTOL)
    assert type(c1.head.block.attn.attn).__name__ == "FlashCache"


def test_decoder_schema_and_counts():
    cfg = pnp.PerceiverConfig(**small_opts(**DECODERS["query-residual-widened"]))
    shapes = pnp.param_shapes(cfg)
    cq, d = 6, 8
    assert shapes["decoder.queries"] == (4, cq)
    assert shapes["decoder.q_norm.gamma"] == (cq,) and shapes["decoder.kv_norm.gamma"] == (d,)
    assert shapes["decoder.attn.q.weight"] == (cq, 4) and shapes["decoder.attn.k.weight"] == (d, 4)
    assert shapes["decoder.attn.v.weight"] == (d, 6) and shapes["decoder.attn.out.weight"] == (6, cq)
    assert shapes["decoder.ffn.up.weight"] == (cq, 2 * cq) and shapes["decoder.output.weight"] == (cq, 2)
    model = pnp.Perceiver(cfg)
    assert model.param_count == pnp.param_count(**small_opts(**DECODERS["query-residual-widened"]))
    assert pnp.output_size(decoder="classification", output_dim=10) == 10
    given = pnp.PerceiverConfig(**small_opts(**DECODERS["query-given"]))
    assert "decoder.queries" not in pnp.param_shapes(given)


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"decoder": "classification"}, "output_dim: decoder 'classification' needs"),
        ({"decoder": "query", "output_dim": 2}, "num_outputs: trainable output queries"),
        ({"decoder": "query", "output_dim": 2, "query_source": "given"}, "query_dim: caller-supplied"),
        ({"decoder": "query", "output_dim": 2, "query_source": "fourier"}, "output_index_dims"),
        ({"decoder": "mlp", "output_dim": 2}, "decoder: expected one of"),
        ({"decoder": "classification", "output_dim": 2, "decoder_heads": 3}, "decoder_heads: 3 heads"),
    ],
)
def test_bad_decoder_options(opts, match):
    with pytest.raises(ValueError, match=match):
        pnp.build(**small_opts(**opts))


def test_bad_decoder_calls(rng):
    x = rng.normal(size=(2, 4, 5))
    given = pnp.build(**small_opts(**DECODERS["query-given"]))
    with pytest.raises(ValueError, match="queries: query_source='given' needs queries"):
        given(x)
    with pytest.raises(ValueError, match=r"queries: expected shape \[B, O, Cq\]"):
        given(x, queries=np.zeros((2, 3, 4)))
    trainable = pnp.build(**small_opts(**DECODERS["query-trainable"]))
    with pytest.raises(ValueError, match="queries: query_source='trainable' makes its own"):
        trainable(x, queries=np.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match=r"query_mask: expected shape \[B, O\] = \(2, 5\)"):
        trainable(x, query_mask=np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"decoder 'pool' has no output queries"):
        pnp.build(**small_opts())(x, query_mask=np.ones((2, 4), dtype=bool))
    _, cache = trainable.forward(x)
    with pytest.raises(ValueError, match=r"dy: expected shape \[B, O, out\]"):
        trainable.backward(np.zeros((2, 2)), cache)


def test_fourier_queries_are_the_fourier_features_of_the_output_grid(rng):
    from perceiver_np.position import fourier_position_encoding

    fourier = _model(rng, decoder="query", output_dim=2, query_source="fourier",
                     output_index_dims=(7,), query_num_bands=3)
    enc = fourier_position_encoding((7,), 3, dtype=np.float64)  # [7, 1 + 2*3]
    assert fourier.config.decoder_query_channels == enc.shape[1] == 7
    assert "decoder.queries" not in fourier.params
    given = pnp.Perceiver(fourier.config.replace(query_source="given", output_index_dims=None,
                                                 query_dim=enc.shape[1]), fourier.params)
    x = rng.normal(size=(2, 4, 5))
    q = np.broadcast_to(enc, (2, *enc.shape))
    assert np.array_equal(fourier(x), given(x, queries=q))
    report = check_model(fourier, x, max_entries=6)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
