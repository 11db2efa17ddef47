"""Every layer: the forward against its definition, the backward against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perceiver_np import backends, layers
from perceiver_np.gradcheck import check_layer
from perceiver_np.tolerances import FLOAT64_RTOL, GRADCHECK_RTOL, KERNEL_FLOAT64_RTOL


def _lin(rng, n_in, n_out):
    return {"weight": rng.normal(size=(n_in, n_out)), "bias": rng.normal(size=n_out)}


def _ln_params(rng, f):
    return {"gamma": 1 + 0.3 * rng.normal(size=f), "beta": rng.normal(size=f)}


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(float).tiny))


# --- forward against definitions ---------------------------------------------------------------


def test_linear_forward_is_x_at_w_plus_b(rng):
    x, p = rng.normal(size=(2, 3, 4)), _lin(rng, 4, 5)
    y, _ = layers.linear_forward(x, p)
    want = np.einsum("bni,io->bno", x, p["weight"]) + p["bias"]
    assert _rel(y, want) <= FLOAT64_RTOL


def test_layernorm_forward_normalises(rng):
    x = 3.0 + 2.0 * rng.normal(size=(4, 7, 16))
    y, _ = layers.layernorm_forward(x, {"gamma": np.ones(16), "beta": np.zeros(16)})
    assert np.abs(y.mean(-1)).max() <= 1e-14
    var = x.var(-1)
    # with gamma = 1 the biased variance of y is var / (var + eps)
    assert _rel(y.var(-1), var / (var + layers.LN_EPS)) <= FLOAT64_RTOL


def test_gelu_exact_matches_math_erf_and_tanh_is_close(rng):
    x = np.linspace(-6, 6, 1001)
    exact, _ = layers.gelu_forward(x, approximate="exact")
    want = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert _rel(exact, want) <= FLOAT64_RTOL
    tanh, _ = layers.gelu_forward(x, approximate="tanh")
    gap = np.abs(tanh - exact).max()
    # docs/architecture.md: the two GELUs differ by up to 4.7e-4
    assert 4.0e-4 < gap < 5.0e-4


def test_gelu_rejects_unknown_kind():
    with pytest.raises(ValueError, match="approximate"):
        layers.gelu_forward(np.zeros(3), approximate="sigmoid")


def test_softmax_rows_sum_to_one_and_survive_large_logits(rng):
    x = 1e3 * rng.normal(size=(3, 5, 9))
    p, _ = layers.softmax_forward(x)
    assert np.isfinite(p).all()
    assert np.abs(p.sum(-1) - 1).max() <= 1e-14


def test_dropout_is_identity_at_inference_and_inverted_in_training(rng):
    x = rng.normal(size=(200, 300))
    y, cache = layers.dropout_forward(x, rate=0.25, training=False, rng=None)
    assert y is x and cache.scale is None
    y, cache = layers.dropout_forward(x, rate=0.25, training=True, rng=np.random.default_rng(0))
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01  # 60000 draws: std of the mean is 0.0018
    assert _rel(y[kept], x[kept] / 0.75) <= FLOAT64_RTOL


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        layers.dropout_forward(np.zeros(3), rate=rate, training=True, rng=np.random.default_rng(0))


def test_dropout_needs_a_generator_in_training():
    with pytest.raises(ValueError, match="rng"):
        layers.dropout_forward(np.zeros(3), rate=0.5, training=True, rng=None)


def test_attention_forward_against_einsum(rng):
    q, k, v = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 6, 5)), rng.normal(size=(2, 3, 6, 7))
    o, _ = layers.attention_forward(q, k, v)
    s = np.einsum("bhmd,bhnd->bhmn", q, k) / math.sqrt(5)
    w = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    assert _rel(o, np.einsum("bhmn,bhnv->bhmv", w, v)) <= FLOAT64_RTOL


def test_attention_masked_keys_get_exactly_zero_weight_and_gradient(rng):
    q, k, v = rng.normal(size=(3, 2, 4, 5)), rng.normal(size=(3, 2, 6, 5)), rng.normal(size=(3, 2, 6, 5))
    mask = np.array([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    o, cache = layers.attention_forward(q, k, v, mask)
    p = cache.softmax.p * cache.visible[:, None, None, None]
    assert np.all(p[0][..., ~mask[0]] == 0.0)
    assert np.all(o[1] == 0.0)  # no visible key: zero output (DeepMind)
    (dq, dk, dv), _ = layers.attention_backward(rng.normal(size=o.shape), cache)
    for g in (dq, dk, dv):
        assert np.isfinite(g).all()
    assert np.all(dk[0][:, ~mask[0]] == 0.0) and np.all(dv[0][:, ~mask[0]] == 0.0)
    assert np.all(dq[1] == 0.0) and np.all(dk[1] == 0.0) and np.all(dv[1] == 0.0)
    # the visible rows equal attention over the kept keys alone
    o0, _ = layers.attention_forward(q[:1], k[:1][:, :, mask[0]], v[:1][:, :, mask[0]])
    assert _rel(o[:1], o0) <= FLOAT64_RTOL


# --- backward against finite differences --------------------------------------------------------


def _check(forward, backward, x, params=None, **opts):
    report = check_layer(forward, backward, x, params, **opts)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
    return report


def test_linear_backward(rng):
    _check(layers.linear_forward, layers.linear_backward, rng.normal(size=(2, 3, 4)), _lin(rng, 4, 5))


def test_layernorm_backward(rng):
    _check(layers.layernorm_forward, layers.layernorm_backward,
           rng.normal(size=(2, 3, 6)), _ln_params(rng, 6))


#: Shapes for the numba backend's layers (perceiver_np.backends): the first below
#: kernels.gemm.SMALL_PRODUCT and kernels._numba.PARALLEL_MIN_ELEMENTS (NumPy products,
#: one-thread row kernels), the second above both (products on Numba's pool with fixed-block
#: partial sums, parallel row kernels).
NUMBA_SHAPES = {"small": (2, 3, 6), "parallel": (4, 80, 128)}


@pytest.mark.parametrize("size", list(NUMBA_SHAPES))
def test_linear_backward_numba_backend(rng, size):
    shape = NUMBA_SHAPES[size]
    _check(backends.linear_forward, backends.linear_backward, rng.normal(size=shape),
           _lin(rng, shape[-1], 40))


@pytest.mark.parametrize("size", list(NUMBA_SHAPES))
def test_layernorm_backward_numba_backend(rng, size):
    shape = NUMBA_SHAPES[size]
    _check(backends.layernorm_forward, backends.layernorm_backward, rng.normal(size=shape),
           _ln_params(rng, shape[-1]))


@pytest.mark.parametrize("kind", ["exact", "tanh"])
def test_gelu_backward(rng, kind):
    _check(layers.gelu_forward, layers.gelu_backward, 2 * rng.normal(size=(3, 11)), approximate=kind)


def test_softmax_backward(rng):
    _check(layers.softmax_forward, layers.softmax_backward, rng.normal(size=(2, 3, 7)))


def test_dropout_backward_in_training(rng):
    def fwd(x, p, **kw):
        return layers.dropout_forward(x, rate=0.3, training=True, rng=np.random.default_rng(5))

    report = _check(fwd, layers.dropout_backward, rng.normal(size=(4, 9)), max_entries=64)
    assert report.rows[0].checked == 36  # every entry, dropped ones included


def test_mean_pool_backward(rng):
    _check(layers.mean_pool_forward, layers.mean_pool_backward, rng.normal(size=(2, 5, 3)))


@pytest.mark.parametrize("kind", ["exact", "tanh"])
def test_ffn_backward(rng, kind):
    p = {**{f"up.{k}": v for k, v in _lin(rng, 4, 12).items()},
         **{f"down.{k}": v for k, v in _lin(rng, 12, 4).items()}}
    _check(layers.ffn_forward, layers.ffn_backward, rng.normal(size=(2, 3, 4)), p, gelu=kind)


def test_linear_without_bias_backward(rng):
    """lucidrains' bias-free q/kv projections: y = x @ W, grads keyed {"weight"} only."""
    p = {"weight": rng.normal(size=(4, 5))}
    report = _check(layers.linear_forward, layers.linear_backward, rng.normal(size=(2, 3, 4)), p)
    assert {r.name for r in report.rows} == {"x", "weight"}
    y, _ = layers.linear_forward(np.ones((1, 4)), p)
    assert np.array_equal(y, np.ones((1, 4)) @ p["weight"])


@pytest.mark.parametrize("size", list(NUMBA_SHAPES))
def test_linear_without_bias_numba_backend_equals_plain(rng, size):
    shape = NUMBA_SHAPES[size]
    x, dy = rng.normal(size=shape), rng.normal(size=(*shape[:-1], 40))
    p = {"weight": rng.normal(size=(shape[-1], 40))}
    (y1, c1), (y2, c2) = layers.linear_forward(x, p), backends.linear_forward(x, p)
    (dx1, g1), (dx2, g2) = layers.linear_backward(dy, c1), backends.linear_backward(dy, c2)
    assert set(g1) == set(g2) == {"weight"}
    for a, b in ((y1, y2), (dx1, dx2), (g1["weight"], g2["weight"])):
        assert np.abs(a - b).max() <= KERNEL_FLOAT64_RTOL * np.abs(a).max()


@pytest.mark.parametrize("kind", ["exact", "tanh"])
def test_geglu_backward(rng, kind):
    _check(layers.geglu_forward, layers.geglu_backward, 2 * rng.normal(size=(3, 2, 10)), approximate=kind)


def test_geglu_is_value_times_gelu_of_gate(rng):
    x = rng.normal(size=(2, 8))
    y, _ = layers.geglu_forward(x)
    assert np.array_equal(y, x[:, :4] * layers.gelu_forward(np.ascontiguousarray(x[:, 4:]))[0])
    with pytest.raises(ValueError, match=r"geglu x: expected an even last axis"):
        layers.geglu_forward(np.zeros((2, 5)))


@pytest.mark.parametrize("kind", ["exact", "tanh"])
def test_ffn_geglu_backward(rng, kind):
    p = {**{f"up.{k}": v for k, v in _lin(rng, 4, 24).items()},
         **{f"down.{k}": v for k, v in _lin(rng, 12, 4).items()}}
    _check(layers.ffn_forward, layers.ffn_backward, rng.normal(size=(2, 3, 4)), p, gelu=kind, kind="geglu")


def test_residual_backward_copies_the_gradient(rng):
    dy = rng.normal(size=(2, 3))
    dx, dr = layers.residual_backward(dy)
    assert dx is dy and dr is dy
    with pytest.raises(ValueError, match="residual branch"):
        layers.residual_forward(np.zeros((2, 3)), np.zeros((3,)))


def _attention_check(rng, mask, dropout=0.0, m=4, n=6, dh=5, dv=3, heads=2):
    q = rng.normal(size=(mask.shape[0] if mask is not None else 2, heads, m, dh))
    k = rng.normal(size=(q.shape[0], heads, n, dh))
    v = rng.normal(size=(q.shape[0], heads, n, dv))
    tensors = {"q": q, "k": k, "v": v}

    def fwd(x, p, **kw):
        return layers.attention_forward(x, p["k"], p["v"], mask, dropout=dropout,
                                        training=dropout > 0, rng=np.random.default_rng(9))

    def bwd(do, cache):
        (dq, dk, dv_), _ = layers.attention_backward(do, cache)
        return dq, {"k": dk, "v": dv_}

    return _check(fwd, bwd, tensors["q"], {"k": k, "v": v})


def test_attention_backward_unmasked(rng):
    _attention_check(rng, None)


def test_attention_backward_masked_with_a_fully_masked_sample(rng):
    mask = np.array([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=bool)
    _attention_check(rng, mask)


def test_attention_backward_with_probability_dropout(rng):
    _attention_check(rng, np.array([[1, 1, 0, 1, 1, 1], [1] * 6], dtype=bool), dropout=0.4)


def _mha_params(rng, cq, ckv, qk, v, dout):
    p = {}
    for name, (i, o) in {"q": (cq, qk), "k": (ckv, qk), "v": (ckv, v), "out": (v, dout)}.items():
        p.update({f"{name}.{k}": a for k, a in _lin(rng, i, o).items()})
    return p


def test_mha_cross_backward(rng):
    p = _mha_params(rng, cq=4, ckv=6, qk=6, v=9, dout=4)
    xkv = rng.normal(size=(2, 5, 6))
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=bool)

    def fwd(xq, pp, **kw):
        return layers.mha_forward(xq, pp["xkv"], {k: v for k, v in pp.items() if k != "xkv"},
                                  num_heads=3, mask=mask)

    def bwd(dy, cache):
        (dxq, dxkv), grads = layers.mha_backward(dy, cache)
        return dxq, {"xkv": dxkv, **grads}

    report = _check(fwd, bwd, rng.normal(size=(2, 3, 4)), {"xkv": xkv, **p})
    # the key bias shifts every logit of a row equally: exactly zero gradient in exact arithmetic
    assert {r.name for r in report.rows} >= {"k.bias", "xkv", "x"}


def test_mha_rejects_heads_that_do_not_divide(rng):
    p = _mha_params(rng, cq=4, ckv=4, qk=6, v=6, dout=4)
    with pytest.raises(ValueError, match="num_heads"):
        layers.mha_forward(np.zeros((1, 2, 4)), np.zeros((1, 3, 4)), p, num_heads=4)


def test_shape_errors_name_the_argument(rng):
    p = _lin(rng, 4, 5)
    with pytest.raises(ValueError, match=r"linear x: expected shape \[\.\.\., in\]"):
        layers.linear_forward(np.zeros((2, 3)), p)
    _, cache = layers.linear_forward(np.zeros((2, 4)), p)
    with pytest.raises(ValueError, match="linear dy"):
        layers.linear_backward(np.zeros((2, 4)), cache)
