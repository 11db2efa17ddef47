"""The layers around Hugging Face's published Perceivers (perceiver_np.prep_layers): every
backward against finite differences, forward and backward against torch and HF's own code."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from perceiver_np import prep_layers as pl
from perceiver_np.gradcheck import check_layer, gradcheck
from perceiver_np.tolerances import GRADCHECK_RTOL, PREP_TORCH_FLOAT64_RTOL

ROOT = Path(__file__).resolve().parents[1]


def _check(forward, backward, x, params=None, **opts):
    report = check_layer(forward, backward, x, params, **opts)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
    return report


def _rel(a, b):
    """Normwise relative difference max|a - b| / max|b|."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(float).tiny))


def _distinct(rng, shape, gap=0.1):
    """Values at least ``gap`` apart (a permutation of a grid): no tie, and no finite-difference
    step (at most 1e-2) changes which entry of a window is the maximum."""
    n = int(np.prod(shape))
    return (rng.permutation(n) - n / 2).reshape(shape) * gap


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="comparing with torch needs torch (pip install .[compare])")


@pytest.fixture(scope="module")
def mp(torch):
    return pytest.importorskip(
        "transformers.models.perceiver.modeling_perceiver",
        reason="the comparison with Hugging Face needs transformers (pip install .[compare])",
    )


def _t(torch, a, grad=True):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


# --- embedding and the tied decoder --------------------------------------------------------------


def test_embedding_backward_by_finite_differences(rng):
    ids = np.array([[0, 3, 3, 1], [4, 3, 0, 0]])  # repeated ids: their gradients must add

    def fn(t):
        return pl.embedding_forward(ids, t)[0]

    def grad_fn(t, dy):
        _, cache = pl.embedding_forward(ids, t)
        dx, grads = pl.embedding_backward(dy, cache)
        assert dx is None  # ids are integers: no input gradient
        return grads

    report = gradcheck(fn, grad_fn, {"weight": rng.normal(size=(6, 3))}, max_entries=18)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int8])
def test_embedding_equals_torch(torch, rng, dtype):
    ids = rng.integers(0, 7, size=(3, 9)).astype(dtype)
    weight = rng.normal(size=(7, 5))
    y, cache = pl.embedding_forward(ids, {"weight": weight})
    wt = _t(torch, weight)
    yt = torch.nn.functional.embedding(torch.from_numpy(ids.astype(np.int64)), wt)
    assert np.array_equal(y, yt.detach().numpy())  # a gather: exact
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    _, g = pl.embedding_backward(dy, cache)
    assert _rel(g["weight"], wt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


def test_embedding_decoder_backward(rng):
    p = {"weight": rng.normal(size=(7, 4)), "bias": rng.normal(size=7)}
    _check(pl.embedding_decoder_forward, pl.embedding_decoder_backward, rng.normal(size=(2, 3, 4)), p)


def test_embedding_decoder_equals_hugging_face(torch, mp, rng):
    b, n, c, v = 2, 5, 4, 9
    h, weight, bias = rng.normal(size=(b, n, c)), rng.normal(size=(v, c)), rng.normal(size=v)
    decoder = mp.PerceiverEmbeddingDecoder(mp.PerceiverConfig(vocab_size=v)).double()
    embedding = torch.nn.Embedding(v, c).double()
    with torch.no_grad():
        decoder.bias.copy_(torch.from_numpy(bias))
        embedding.weight.copy_(torch.from_numpy(weight))
    ht = _t(torch, h)
    yt = decoder(ht, embedding)
    y, cache = pl.embedding_decoder_forward(h, {"weight": weight, "bias": bias})
    assert _rel(y, yt.detach().numpy()) <= PREP_TORCH_FLOAT64_RTOL
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    dh, g = pl.embedding_decoder_backward(dy, cache)
    assert _rel(dh, ht.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert _rel(g["weight"], embedding.weight.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert _rel(g["bias"], decoder.bias.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


def test_tied_weight_gradient_is_the_sum_of_both_uses(torch, rng):
    # logits = embed(ids) @ W^T + b with one W: torch's autograd adds the two uses' gradients
    ids, weight, bias = rng.integers(0, 6, size=(2, 4)), rng.normal(size=(6, 3)), rng.normal(size=6)
    e, emb = pl.embedding_forward(ids, {"weight": weight})
    logits, dec = pl.embedding_decoder_forward(e, {"weight": weight, "bias": bias})
    dy = rng.normal(size=logits.shape)
    de, g_dec = pl.embedding_decoder_backward(dy, dec)
    _, g_emb = pl.embedding_backward(de, emb)
    wt = _t(torch, weight)
    lt = torch.nn.functional.embedding(torch.from_numpy(ids), wt) @ wt.T + torch.from_numpy(bias)
    lt.backward(torch.from_numpy(dy))
    assert _rel(g_dec["weight"] + g_emb["weight"], wt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert _rel(g_dec["weight"], wt.grad.numpy()) > 1e-3  # either gradient alone is wrong


# --- conv ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [(1, 1), (2, 2), (3, 3), (7, 7), (2, 4), (4, 3), (5, 2)])
def test_same_padding_equals_hugging_face(mp, kernel):
    conv = mp.Conv2dSamePadding(2, 3, kernel_size=kernel, stride=2)
    left, right, top, bottom = conv.zero_pad_2d.padding  # nn.ZeroPad2d's order
    assert pl.same_padding(kernel) == (top, bottom, left, right)


def test_same_padding_values():
    assert pl.same_padding((7, 7)) == (3, 3, 3, 3)
    assert pl.same_padding((2, 4)) == (0, 1, 1, 2)  # even: one more after than before
    assert pl.same_padding((1, 3)) == (0, 0, 1, 1)


#: (kernel, stride, padding, bias): odd and even kernels, stride 1 and 2, symmetric,
#: asymmetric and HF's same padding, with and without bias (HF's 7x7 conv has none).
CONV_CASES = [
    ((3, 3), (1, 1), (1, 1, 1, 1), True),
    ((2, 4), (2, 2), (0, 1, 2, 1), False),
    ((7, 7), (2, 2), (3, 3, 3, 3), False),
    ((1, 1), (2, 2), (0, 0, 0, 0), True),
    ((3, 2), (2, 1), (2, 0, 1, 3), True),
    ((4, 4), (2, 2), (1, 2, 1, 2), False),
]


def _conv_params(rng, cin, cout, kernel, bias):
    p = {"weight": rng.normal(size=(cout, cin, *kernel))}
    if bias:
        p["bias"] = rng.normal(size=cout)
    return p


@pytest.mark.parametrize("kernel, stride, padding, bias", CONV_CASES)
def test_conv2d_backward(rng, kernel, stride, padding, bias):
    x = rng.normal(size=(2, 2, 7, 6))
    report = _check(pl.conv2d_forward, pl.conv2d_backward, x, _conv_params(rng, 2, 3, kernel, bias),
                    stride=stride, padding=padding)
    assert {r.name for r in report.rows} == {"x", "weight", *(["bias"] if bias else [])}


@pytest.mark.parametrize("kernel, stride, padding, bias", CONV_CASES)
def test_conv2d_equals_torch(torch, rng, kernel, stride, padding, bias):
    x, p = rng.normal(size=(2, 3, 9, 8)), _conv_params(rng, 3, 4, kernel, bias)
    y, cache = pl.conv2d_forward(x, p, stride=stride, padding=padding)
    xt, wt = _t(torch, x), _t(torch, p["weight"])
    bt = _t(torch, p["bias"]) if bias else None
    top, bottom, left, right = padding
    yt = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (left, right, top, bottom)), wt, bt,
                                    stride=stride)
    assert _rel(y, yt.detach().numpy()) <= PREP_TORCH_FLOAT64_RTOL
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    dx, g = pl.conv2d_backward(dy, cache)
    assert _rel(dx, xt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert _rel(g["weight"], wt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert sorted(g) == sorted(p)
    if bias:
        assert _rel(g["bias"], bt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


# --- batch norm, ReLU ------------------------------------------------------------------------------


def _bn(rng, c):
    p = {"weight": 1 + 0.3 * rng.normal(size=c), "bias": rng.normal(size=c)}
    return p, rng.normal(size=c), 0.5 + rng.random(c)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5), (2, 4, 3, 5)])
def test_batchnorm_backward(rng, shape):
    p, mean, var = _bn(rng, shape[1])
    _check(pl.batchnorm_forward, pl.batchnorm_backward, rng.normal(size=shape), p,
           running_mean=mean, running_var=var)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5), (2, 4, 3, 5)])
def test_batchnorm_equals_torch_in_eval_mode(torch, rng, shape):
    c = shape[1]
    p, mean, var = _bn(rng, c)
    module = (torch.nn.BatchNorm2d(c) if len(shape) == 4 else torch.nn.BatchNorm1d(c)).double().eval()
    with torch.no_grad():
        for name, value in (("weight", p["weight"]), ("bias", p["bias"]), ("running_mean", mean),
                            ("running_var", var)):
            getattr(module, name).copy_(torch.from_numpy(value))
    x = rng.normal(size=shape)
    xt = _t(torch, x)
    yt = module(xt)
    y, cache = pl.batchnorm_forward(x, p, running_mean=mean, running_var=var, eps=module.eps)
    assert _rel(y, yt.detach().numpy()) <= PREP_TORCH_FLOAT64_RTOL
    dy = rng.normal(size=shape)
    yt.backward(torch.from_numpy(dy))
    dx, g = pl.batchnorm_backward(dy, cache)
    assert _rel(dx, xt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert _rel(g["weight"], module.weight.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert _rel(g["bias"], module.bias.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


def test_relu_backward(rng):
    x = rng.normal(size=(3, 7))
    x = np.where(np.abs(x) < 0.05, 0.5, x)  # no finite-difference step crosses the kink
    _check(pl.relu_forward, pl.relu_backward, x)


def test_relu_equals_torch_including_zero(torch, rng):
    x = np.array([[-1.5, 0.0, 2.0, -0.0, 3.0]])
    xt = _t(torch, x)
    yt = torch.relu(xt)
    dy = rng.normal(size=x.shape)
    yt.backward(torch.from_numpy(dy))
    y, cache = pl.relu_forward(x)
    dx, _ = pl.relu_backward(dy, cache)
    assert np.array_equal(y, yt.detach().numpy()) and np.array_equal(dx, xt.grad.numpy())
    assert dx[0, 1] == 0.0  # at x = 0 the gradient is 0, as torch's


# --- max pool -----------------------------------------------------------------------------------------


#: (kernel, stride, padding): HF's (3, 2, none), overlapping and not, odd and even kernels,
#: symmetric and asymmetric padding
POOL_CASES = [
    ((3, 3), (2, 2), (0, 0, 0, 0)),
    ((2, 2), (2, 2), (0, 0, 0, 0)),
    ((2, 3), (1, 2), (0, 0, 0, 0)),
    ((3, 3), (2, 2), (1, 1, 1, 1)),
    ((3, 2), (2, 1), (2, 0, 1, 0)),
]


@pytest.mark.parametrize("kernel, stride, padding", POOL_CASES)
def test_maxpool2d_backward(rng, kernel, stride, padding):
    _check(pl.maxpool2d_forward, pl.maxpool2d_backward, _distinct(rng, (2, 2, 7, 6)),
           kernel=kernel, stride=stride, padding=padding)


def _torch_pool(torch, xt, kernel, stride, padding):
    top, bottom, left, right = padding
    if top == bottom and left == right and 2 * top <= kernel[0] and 2 * left <= kernel[1]:
        return torch.nn.MaxPool2d(kernel, stride, padding=(top, left))(xt)  # torch's own padding
    padded = torch.nn.functional.pad(xt, (left, right, top, bottom), value=-float("inf"))
    return torch.nn.MaxPool2d(kernel, stride)(padded)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kernel, stride, padding", POOL_CASES)
def test_maxpool2d_equals_torch(torch, rng, kernel, stride, padding, ties):
    # with ties (values in {0, 1, 2}: most windows hold several maxima) the gradient must go to
    # the first maximum in row-major window order, as torch's CPU kernel; finite differences are
    # undefined there, so torch's autograd is the reference
    shape = (2, 3, 9, 8)
    x = rng.integers(0, 3, size=shape).astype(np.float64) if ties else rng.normal(size=shape)
    y, cache = pl.maxpool2d_forward(x, kernel=kernel, stride=stride, padding=padding)
    xt = _t(torch, x)
    yt = _torch_pool(torch, xt, kernel, stride, padding)
    assert np.array_equal(y, yt.detach().numpy())
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    dx, _ = pl.maxpool2d_backward(dy, cache)
    assert _rel(dx, xt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


def test_maxpool2d_tie_goes_to_the_first_maximum():
    x = np.array([[[[1.0, 5.0, 5.0], [5.0, 0.0, 5.0]]]])  # one 2x3 window, four maxima
    _, cache = pl.maxpool2d_forward(x, kernel=(2, 3), stride=(1, 1))
    dx, _ = pl.maxpool2d_backward(np.array([[[[2.0]]]]), cache)
    assert np.array_equal(dx, [[[[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]]])


def test_hugging_face_conv_downsample_pools_without_padding(mp):
    pool = mp.Conv2DDownsample(in_channels=3, out_channels=4).max_pool
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 0, False)


def test_conv_downsample_equals_hugging_face(torch, mp, rng):
    # HF's Conv2DDownsample (eval): 7x7 stride-2 same-padded bias-free conv, batch norm, ReLU,
    # 3x3 stride-2 max pool, composed from this module's layers; forward and every gradient
    module = mp.Conv2DDownsample(in_channels=3, out_channels=4).double().eval()
    bn = {"weight": 1 + 0.3 * rng.normal(size=4), "bias": rng.normal(size=4)}
    mean, var = rng.normal(size=4), 0.5 + rng.random(4)
    with torch.no_grad():
        module.conv.weight.normal_(generator=torch.Generator().manual_seed(0))
        for name, value in (*bn.items(), ("running_mean", mean), ("running_var", var)):
            getattr(module.batchnorm, name).copy_(torch.from_numpy(value))
    x = rng.normal(size=(2, 3, 17, 18))
    weight = module.conv.weight.detach().numpy().copy()
    f, c_conv = pl.conv2d_forward(x, {"weight": weight}, stride=(2, 2), padding=pl.same_padding((7, 7)))
    f, c_bn = pl.batchnorm_forward(f, bn, running_mean=mean, running_var=var)
    f, c_relu = pl.relu_forward(f)
    y, c_pool = pl.maxpool2d_forward(f, kernel=(3, 3), stride=(2, 2))
    xt = _t(torch, x)
    yt = module(xt)
    assert y.shape == tuple(yt.shape) == (2, 4, 4, 4)  # 17x18 -> conv 9x9 -> pool 4x4
    assert _rel(y, yt.detach().numpy()) <= PREP_TORCH_FLOAT64_RTOL
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    d, _ = pl.maxpool2d_backward(dy, c_pool)
    d, _ = pl.relu_backward(d, c_relu)
    d, g_bn = pl.batchnorm_backward(d, c_bn)
    dx, g_conv = pl.conv2d_backward(d, c_conv)
    assert _rel(dx, xt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    assert _rel(g_conv["weight"], module.conv.weight.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL
    for name in ("weight", "bias"):
        assert _rel(g_bn[name], getattr(module.batchnorm, name).grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


# --- space to depth, patches, pixels -----------------------------------------------------------------


S2D_CASES = [((2, 3, 4, 6), 1, 1), ((2, 3, 4, 6), 1, 2), ((1, 2, 8, 4), 1, 4),
             ((2, 2, 3, 4, 6), 1, 2), ((1, 4, 2, 2, 4), 2, 1), ((1, 2, 27, 3, 5), 2, 1),
             ((2, 4, 3, 4, 4), 2, 2)]


@pytest.mark.parametrize("shape, ts, bs", S2D_CASES)
def test_space_to_depth_equals_hugging_face(torch, mp, rng, shape, ts, bs):
    x = rng.normal(size=shape)
    y, cache = pl.space_to_depth_forward(x, temporal_block=ts, spatial_block=bs)
    xt = _t(torch, x)
    yt = mp.space_to_depth(xt, temporal_block_size=ts, spatial_block_size=bs)
    assert np.array_equal(y, yt.detach().numpy())  # a permutation: exact
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    dx, _ = pl.space_to_depth_backward(dy, cache)
    assert np.array_equal(dx, xt.grad.numpy())
    assert np.array_equal(pl.space_to_depth_backward(y, cache)[0], x)  # the inverse permutation


@pytest.mark.parametrize("shape, ts, bs", [((2, 3, 4, 6), 1, 2), ((1, 4, 2, 2, 4), 2, 2)])
def test_space_to_depth_backward(rng, shape, ts, bs):
    _check(pl.space_to_depth_forward, pl.space_to_depth_backward, rng.normal(size=shape),
           temporal_block=ts, spatial_block=bs)


def _torch_patches(torch, xt, size):
    # the reference of the optical-flow colab: TF 'SAME' padding, unfold, NHWC patch order
    b, _, h, w = xt.shape
    total = size - 1
    xp = torch.nn.functional.pad(xt, (total // 2, total - total // 2, total // 2, total - total // 2))
    patches = xp.unfold(2, size, 1).unfold(3, size, 1)  # [B, C, H, W, size, size]
    return patches.permute(0, 4, 5, 1, 2, 3).reshape(b, -1, h, w)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_extract_patches_equals_torch_reference(torch, rng, size):
    x = rng.normal(size=(2, 3, 5, 6))
    y, cache = pl.extract_patches_forward(x, size=size)
    xt = _t(torch, x)
    yt = _torch_patches(torch, xt, size)
    assert np.array_equal(y, yt.detach().numpy())
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    dx, _ = pl.extract_patches_backward(dy, cache)
    assert _rel(dx, xt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


def test_extract_patches_channel_order(rng):
    x = rng.normal(size=(1, 3, 4, 5))
    y, _ = pl.extract_patches_forward(x, size=3)
    i, j, c = 0, 2, 1  # patch row 0 (above), column 2 (right), channel 1, at pixel (2, 3)
    assert y[0, (i * 3 + j) * 3 + c, 2, 3] == x[0, c, 2 - 1 + i, 3 - 1 + j]
    assert y[0, (0 * 3 + 0) * 3 + 2, 0, 0] == 0.0  # outside the image: zero padding


@pytest.mark.parametrize("size", [2, 3])
def test_extract_patches_backward(rng, size):
    _check(pl.extract_patches_forward, pl.extract_patches_backward, rng.normal(size=(2, 2, 4, 5)),
           size=size)


def test_subsample_pixels_slices_batch_and_channels_as_hugging_face(torch, mp, rng):
    # HF's prep_type="pixels" on 4-D input runs inputs[::s, ::s]: on NCHW that keeps every s-th
    # sample and every s-th channel, and the image whole
    x = rng.normal(size=(4, 3, 5, 6))  # [B, C, H, W]
    fourier = {"num_bands": 2, "max_resolution": (5, 6), "concat_pos": True, "sine_only": False}
    prep = mp.PerceiverImagePreprocessor(
        mp.PerceiverConfig(), prep_type="pixels", spatial_downsample=2,
        position_encoding_type="fourier", fourier_position_encoding_kwargs=fourier)
    theirs = prep(torch.from_numpy(x))[2].numpy()  # inputs without positions, [B', H*W, C']
    y, _ = pl.subsample_pixels_forward(x, spatial=2)
    assert y.shape == (2, 2, 5, 6)
    assert np.array_equal(y.transpose(0, 2, 3, 1).reshape(2, 30, 2), theirs)


@pytest.mark.parametrize("shape, spatial, temporal", [((4, 3, 5, 6), 2, 1), ((3, 5, 3, 5, 4), 2, 3),
                                                      ((2, 4, 2, 6, 5), 3, 2)])
def test_subsample_pixels_equals_hugging_face_slicing(torch, rng, shape, spatial, temporal):
    x = rng.normal(size=shape)
    y, cache = pl.subsample_pixels_forward(x, spatial=spatial, temporal=temporal)
    xt = _t(torch, x)
    s, t = spatial, temporal  # the lines of PerceiverImagePreprocessor.forward
    yt = xt[::s, ::s] if x.ndim == 4 else xt[:, ::t, :, ::s, ::s]
    assert np.array_equal(y, yt.detach().numpy())
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    assert np.array_equal(pl.subsample_pixels_backward(dy, cache)[0], xt.grad.numpy())


@pytest.mark.parametrize("shape, spatial, temporal", [((4, 3, 5, 6), 2, 1), ((2, 5, 2, 5, 4), 2, 3)])
def test_subsample_pixels_backward(rng, shape, spatial, temporal):
    _check(pl.subsample_pixels_forward, pl.subsample_pixels_backward, rng.normal(size=shape),
           spatial=spatial, temporal=temporal)


# --- concatenation and the trainable padding ---------------------------------------------------------


def _concat_fwd(x, p, *, axis):
    return pl.concat_forward([x, p["b"], p["c"]], axis=axis)


def _concat_bwd(dy, cache):
    (dx, db, dc), grads = pl.concat_backward(dy, cache)
    assert grads == {}
    return dx, {"b": db, "c": dc}


@pytest.mark.parametrize("axis, shapes", [(-1, [(2, 3, 4), (2, 3, 1), (2, 3, 5)]),
                                          (1, [(2, 3, 4), (2, 6, 4), (2, 1, 4)])])
def test_concat_backward(rng, axis, shapes):
    x, b, c = (rng.normal(size=s) for s in shapes)
    y, _ = _concat_fwd(x, {"b": b, "c": c}, axis=axis)
    assert np.array_equal(y, np.concatenate([x, b, c], axis=axis))
    _check(_concat_fwd, _concat_bwd, x, {"b": b, "c": c}, axis=axis)


@pytest.mark.parametrize("pad_width", [1, 3])
def test_pad_channels_backward(rng, pad_width):
    _check(pl.pad_channels_forward, pl.pad_channels_backward, rng.normal(size=(2, 3, 4)),
           {"pad": rng.normal(size=(1, pad_width))}, width=4 + pad_width)


def test_pad_channels_of_zero_width_is_the_identity(rng):
    # the widest modality with min_padding_size=0 gets a [1, 0] pad
    x = rng.normal(size=(2, 3, 4))
    y, cache = pl.pad_channels_forward(x, {"pad": np.zeros((1, 0))}, width=4)
    dx, g = pl.pad_channels_backward(y, cache)
    assert np.array_equal(y, x) and np.array_equal(dx, x) and g["pad"].shape == (1, 0)


def test_pad_channels_equals_hugging_face_code(torch, rng):
    b, n, c, width = 2, 5, 3, 7
    x, pad = rng.normal(size=(b, n, c)), rng.normal(size=(1, width - c))
    xt, padt = _t(torch, x), _t(torch, pad)
    # PerceiverMultimodalPreprocessor.forward
    pos_enc = padt.expand(b, -1, -1)
    yt = torch.cat([xt, torch.broadcast_to(pos_enc, [b, n, width - c])], dim=2)
    y, cache = pl.pad_channels_forward(x, {"pad": pad}, width=width)
    assert np.array_equal(y, yt.detach().numpy())
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    dx, g = pl.pad_channels_backward(dy, cache)
    assert np.array_equal(dx, xt.grad.numpy())
    assert _rel(g["pad"], padt.grad.numpy()) <= PREP_TORCH_FLOAT64_RTOL


# --- float32 keeps its dtype ----------------------------------------------------------------------


def test_layers_keep_float32(rng):
    x = rng.normal(size=(1, 2, 6, 6)).astype(np.float32)
    w = {"weight": rng.normal(size=(3, 2, 3, 3)).astype(np.float32)}
    y, cache = pl.conv2d_forward(x, w, stride=(2, 2), padding=(1, 1, 1, 1))
    dx, g = pl.conv2d_backward(y, cache)
    assert y.dtype == dx.dtype == g["weight"].dtype == np.float32
    y, cache = pl.maxpool2d_forward(x, padding=(1, 1, 1, 1))
    assert y.dtype == pl.maxpool2d_backward(y, cache)[0].dtype == np.float32


# --- bad input ----------------------------------------------------------------------------------------


def _bad_cases():
    x4, w = np.zeros((1, 3, 4, 4)), {"weight": np.zeros((2, 3, 3, 3))}
    bn = {"weight": np.ones(3), "bias": np.zeros(3)}
    emb = {"weight": np.zeros((5, 2))}
    return [
        ("ids", lambda: pl.embedding_forward(np.array([[0, 5]]), emb), ValueError, r"ids.*\[0, 5\).*got 5"),
        ("ids", lambda: pl.embedding_forward(np.array([[-1, 2]]), emb), ValueError, r"ids.*got -1"),
        ("ids", lambda: pl.embedding_forward(np.array([[0.0, 1.0]]), emb), TypeError, "ids.*integer"),
        ("ids", lambda: pl.embedding_forward(np.array([0, 1]), emb), ValueError, r"ids.*\[B, N\]"),
        ("h", lambda: pl.embedding_decoder_forward(np.zeros((2, 3, 4)), {"weight": np.zeros((5, 3)),
                                                                           "bias": np.zeros(5)}),
         ValueError, r"params\['weight'\].*\[V, C\]"),
        ("x", lambda: pl.conv2d_forward(np.zeros((3, 4, 4)), w), ValueError, r"conv2d x.*\[B, Cin, H, W\]"),
        ("x", lambda: pl.conv2d_forward(np.zeros((1, 2, 4, 4)), w), ValueError,
         r"conv2d x.*\(\?, 3, \?, \?\)"),
        ("x", lambda: pl.conv2d_forward(x4.astype(np.float32), w), TypeError, r"params\['weight'\].*float32"),
        ("x", lambda: pl.conv2d_forward(x4.astype(int), w), TypeError, "conv2d x.*float"),
        ("bias", lambda: pl.conv2d_forward(x4, {**w, "bias": np.zeros(3)}), ValueError, r"params\['bias'\]"),
        ("params", lambda: pl.conv2d_forward(x4, {**w, "b": np.zeros(2)}), ValueError, "unexpected keys"),
        ("stride", lambda: pl.conv2d_forward(x4, w, stride=(0, 1)), ValueError, "conv2d stride"),
        ("padding", lambda: pl.conv2d_forward(x4, w, padding=(1, 1)), ValueError, "conv2d padding"),
        ("x", lambda: pl.conv2d_forward(np.zeros((1, 3, 2, 2)), w), ValueError, "conv2d x.*smaller than"),
        ("x", lambda: pl.batchnorm_forward(np.zeros((1, 2, 4, 4)), bn, running_mean=np.zeros(3),
                                           running_var=np.ones(3)), ValueError, r"params\['weight'\]"),
        ("x", lambda: pl.batchnorm_forward(np.zeros(3), bn, running_mean=np.zeros(3),
                                           running_var=np.ones(3)), ValueError, "batchnorm x"),
        ("running_var", lambda: pl.batchnorm_forward(x4, bn, running_mean=np.zeros(3),
                                                     running_var=-np.ones(3)), ValueError, "running_var"),
        ("running_mean", lambda: pl.batchnorm_forward(x4, bn, running_mean=np.zeros(4),
                                                      running_var=np.ones(3)), ValueError, "running_mean"),
        ("x", lambda: pl.maxpool2d_forward(np.zeros((3, 4, 4))), ValueError, r"maxpool2d x.*\[B, C, H, W\]"),
        ("padding", lambda: pl.maxpool2d_forward(x4, padding=(3, 0, 0, 0)), ValueError, "maxpool2d padding"),
        ("params", lambda: pl.relu_forward(x4, {"weight": x4}), ValueError, "relu params"),
        ("x", lambda: pl.space_to_depth_forward(np.zeros((1, 3, 4, 6)), spatial_block=4), ValueError,
         r"space_to_depth x.*\(1, 3, 4, 6\).*temporal_block 1, spatial_block 4"),
        ("x", lambda: pl.space_to_depth_forward(np.zeros((1, 3, 3, 4, 4)), temporal_block=2), ValueError,
         r"space_to_depth x.*temporal_block 2"),
        ("x", lambda: pl.space_to_depth_forward(np.zeros((3, 4, 4))), ValueError, "space_to_depth x"),
        ("x", lambda: pl.space_to_depth_forward(x4, temporal_block=2), ValueError, "space_to_depth x"),
        ("x", lambda: pl.extract_patches_forward(np.zeros((3, 4, 4))), ValueError, "extract_patches x"),
        ("size", lambda: pl.extract_patches_forward(x4, size=0), ValueError, "extract_patches size"),
        ("xs", lambda: pl.concat_forward([np.zeros((2, 3)), np.zeros((3, 3))], axis=1), ValueError,
         r"concat xs\[1\]"),
        ("xs", lambda: pl.concat_forward([np.zeros((2, 3)), np.zeros((2, 3), np.float32)]), TypeError,
         r"concat xs\[1\].*float32"),
        ("axis", lambda: pl.concat_forward([np.zeros((2, 3))], axis=2), ValueError, "concat axis"),
        ("pad", lambda: pl.pad_channels_forward(np.zeros((2, 3, 4)), {"pad": np.zeros((1, 2))}, width=7),
         ValueError, r"params\['pad'\]"),
        ("width", lambda: pl.pad_channels_forward(np.zeros((2, 3, 4)), {"pad": np.zeros((1, 0))}, width=3),
         ValueError, "pad_channels width"),
        ("x", lambda: pl.subsample_pixels_forward(np.zeros((2, 3, 4))), ValueError, "subsample_pixels x"),
        ("x", lambda: pl.subsample_pixels_forward(x4, temporal=2), ValueError, "subsample_pixels x"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, error, match = case
    with pytest.raises(error, match=match):
        call()


def test_backward_checks_the_upstream_gradient_shape(rng):
    _, cache = pl.conv2d_forward(rng.normal(size=(1, 2, 5, 5)), {"weight": rng.normal(size=(3, 2, 3, 3))})
    with pytest.raises(ValueError, match="conv2d dy"):
        pl.conv2d_backward(np.zeros((1, 3, 4, 4)), cache)
    _, cache = pl.space_to_depth_forward(rng.normal(size=(1, 2, 4, 4)), spatial_block=2)
    with pytest.raises(ValueError, match="space_to_depth dy"):
        pl.space_to_depth_backward(np.zeros((1, 2, 2, 4)), cache)


# --- plain NumPy ------------------------------------------------------------------------------------


def test_prep_layers_are_plain_numpy():
    tree = ast.parse((ROOT / "perceiver_np" / "prep_layers.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("numba" in m or "kernels" in m for m in modules), modules
    assert modules <= {"__future__", "collections.abc", "typing", "numpy", ".shapes"}, modules
