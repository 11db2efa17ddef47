"""Position encodings: hand-computed values, Hugging Face's functions, gradients, helpers, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from perceiver_np import position as P
from perceiver_np.gradcheck import check_layer
from perceiver_np.tolerances import (
    FOURIER_FLOAT64_ATOL,
    GRADCHECK_RTOL,
    LINEAR_POSITIONS_FLOAT32_ATOL,
    SAMPLE_SIGMAS,
)

R2 = math.sqrt(2.0) / 2.0  # sin(pi/4)


def _maxabs(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --- the formula, by hand -------------------------------------------------------------------------


def test_linear_positions_1d_and_2d_layout():
    assert np.array_equal(P.linear_positions((3,)), [[-1.0], [0.0], [1.0]])
    # (2, 3): 'ij' grid flattened row-major: the last axis moves fastest
    want = [[-1, -1], [-1, 0], [-1, 1], [1, -1], [1, 0], [1, 1]]
    pos = P.linear_positions((2, 3))
    assert pos.dtype == np.float64 and np.array_equal(pos, want)
    assert np.array_equal(P.linear_positions((1,)), [[-1.0]])  # a lone position sits at -1


def test_golden_1d_three_positions_three_bands():
    # index_dims (3,), K = 3, R = 3 (the default): f = linspace(1, R/2, K) = [1, 1.25, 1.5]
    # pos = [-1, 0, 1]; u = pos * f; features = [pos, sin(pi u) x3, cos(pi u) x3], 1 + 2*3 = 7
    #   pos -1: u = [-1, -1.25, -1.5]  sin = [0, +R2, 1]    cos = [-1, -R2, 0]
    #   pos  0: u = [0, 0, 0]          sin = [0, 0, 0]      cos = [1, 1, 1]
    #   pos  1: u = [1, 1.25, 1.5]     sin = [0, -R2, -1]   cos = [-1, -R2, 0]
    # with sin(-1.25 pi) = -sin(pi + pi/4) = +sqrt(2)/2, cos(1.25 pi) = -sqrt(2)/2
    want = np.array([
        [-1.0, 0.0, R2, 1.0, -1.0, -R2, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        [1.0, 0.0, -R2, -1.0, -1.0, -R2, 0.0],
    ])
    assert np.array_equal(P.fourier_frequencies((3,), 3), [[1.0, 1.25, 1.5]])
    got = P.fourier_position_encoding((3,), 3, dtype=np.float64)
    assert got.shape == (3, P.fourier_channels(1, 3)) == (3, 7)
    assert _maxabs(got, want) <= FOURIER_FLOAT64_ATOL
    # the variants drop columns: no pos; no cos
    only_sin = P.fourier_position_encoding((3,), 3, concat_pos=False, sine_only=True, dtype=np.float64)
    assert _maxabs(only_sin, want[:, 1:4]) <= FOURIER_FLOAT64_ATOL


def test_golden_2d_dim_major_order():
    # index_dims (2, 3), K = 2, R = (3, 5): f[0] = [1, 1.5], f[1] = [1, 2.5]
    # u = [x0*1, x0*1.5, x1*1, x1*2.5]: all bands of axis 0, then all of axis 1 (dim-major)
    # columns: x0, x1, sin(pi x0), sin(1.5 pi x0), sin(pi x1), sin(2.5 pi x1), then the 4 cosines
    #   x0 = -1: sin(pi x0) = 0, sin(-1.5 pi) = 1;   cos(pi x0) = -1, cos(1.5 pi) = 0  (x0 = 1: 0, -1; -1, 0)
    #   x1 = -1: sin = 0, sin(-2.5 pi) = -1;  cos = -1, cos(2.5 pi) = 0
    #   x1 =  0: sin = 0, 0;                  cos = 1, 1
    #   x1 =  1: sin = 0, 1;                  cos = -1, 0
    want = np.array([
        [-1, -1, 0, 1, 0, -1, -1, 0, -1, 0],
        [-1, 0, 0, 1, 0, 0, -1, 0, 1, 1],
        [-1, 1, 0, 1, 0, 1, -1, 0, -1, 0],
        [1, -1, 0, -1, 0, -1, -1, 0, -1, 0],
        [1, 0, 0, -1, 0, 0, -1, 0, 1, 1],
        [1, 1, 0, -1, 0, 1, -1, 0, -1, 0],
    ], dtype=np.float64)
    got = P.fourier_position_encoding((2, 3), 2, max_resolution=(3, 5), dtype=np.float64)
    assert got.shape == (6, 2 * 2 * 2 + 2)
    assert _maxabs(got, want) <= FOURIER_FLOAT64_ATOL


def test_imagenet_channel_count():
    # d = 2, K = 64, R = (224, 224): 2 * 64 * (sin + cos) + 2 positions = 258
    assert P.fourier_channels(2, 64) == 258
    assert P.fourier_channels(2, 64, concat_pos=False) == 256
    assert P.fourier_channels(2, 64, sine_only=True) == 130
    f = P.fourier_frequencies((224, 224), 64)
    assert f.shape == (2, 64) and f[0, 0] == 1.0 and f[1, -1] == 112.0  # up to Nyquist R/2
    enc = P.fourier_features(P.linear_positions((4, 4)), 64, max_resolution=(224, 224))
    assert enc.shape == (16, 258)


def test_float32_encoding_is_the_float64_one_rounded_once():
    e64 = P.fourier_position_encoding((7, 9), 8, max_resolution=(224, 224), dtype=np.float64)
    e32 = P.fourier_position_encoding((7, 9), 8, max_resolution=(224, 224))
    assert e32.dtype == np.float32 and np.array_equal(e32, e64.astype(np.float32))
    pos32 = P.linear_positions((7, 9)).astype(np.float32)
    assert P.fourier_features(pos32, 3, max_resolution=(7, 9)).dtype == np.float32


def test_lucidrains_layout_is_a_permutation():
    # lucidrains/perceiver-pytorch: per axis [sin(pi x f_1..K), cos(pi x f_1..K), x], axes after
    # one another, with one max_freq for every axis: DeepMind's with R_i = max_freq, permuted
    d, k, max_freq = 2, 3, 10.0
    pos = P.linear_positions((4, 5))
    scales = np.linspace(1.0, max_freq / 2, k)
    x = pos[..., None] * scales * np.pi  # [N, d, K]
    luc = np.concatenate([np.sin(x), np.cos(x), pos[..., None]], axis=-1).reshape(len(pos), -1)
    ours = P.fourier_features(pos, k, max_resolution=(max_freq,) * d)
    # our channel of (axis i, band k): pos i -> i, sin -> d + i*K + k, cos -> d + d*K + i*K + k
    perm = [c for i in range(d) for c in
            [d + i * k + j for j in range(k)] + [d + d * k + i * k + j for j in range(k)] + [i]]
    assert sorted(perm) == list(range(ours.shape[1]))
    assert np.array_equal(ours[:, perm], luc)


# --- Hugging Face -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch", reason="comparison with Hugging Face needs torch")
    mp = pytest.importorskip(
        "transformers.models.perceiver.modeling_perceiver",
        reason="comparison with Hugging Face needs transformers (pip install .[compare])",
    )
    return torch, mp


@pytest.fixture
def torch64(hf):
    """torch's default dtype float64 while a test runs: HF's frequency linspace takes it."""
    torch, mp = hf
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch, mp
    torch.set_default_dtype(old)


HF_CASES = [
    ((7,), 4, None, True, False),
    ((50,), 64, (224,), True, False),
    ((5, 6), 3, (224, 224), False, False),
    ((16, 16), 64, (224, 224), True, False),
    ((6, 4), 5, (6, 4), True, True),
    ((4, 3, 5), 2, (9, 17, 33), True, False),
    ((3, 4, 2), 6, (16, 16, 16), False, True),
]


@pytest.mark.parametrize("index_dims, k, res, concat_pos, sine_only", HF_CASES)
def test_fourier_features_equal_hugging_face(torch64, index_dims, k, res, concat_pos, sine_only):
    torch, mp = torch64
    res = index_dims if res is None else res
    pos = P.linear_positions(index_dims)  # [N, d] float64
    ours = P.fourier_features(pos, k, max_resolution=res, concat_pos=concat_pos, sine_only=sine_only)
    theirs = mp.generate_fourier_features(
        torch.from_numpy(np.stack([pos, pos])), k, max_resolution=res, concat_pos=concat_pos,
        sine_only=sine_only,
    ).numpy()
    assert theirs.dtype == np.float64
    theirs = theirs[1] if theirs.ndim == 3 else theirs  # HF drops the batch axis without concat_pos
    assert _maxabs(ours, theirs) <= FOURIER_FLOAT64_ATOL


@pytest.mark.parametrize("index_dims", [(1,), (7,), (224,), (2, 3), (5, 8), (3, 4, 2), (1, 6, 3)])
def test_linear_positions_equal_hugging_face(hf, index_dims):
    _, mp = hf
    theirs = mp.build_linear_positions(index_dims).numpy()  # float32, [n_1, ..., n_d, d]
    theirs = theirs.reshape(-1, len(index_dims))  # as HF's _check_or_build_spatial_positions
    assert _maxabs(P.linear_positions(index_dims), theirs) <= LINEAR_POSITIONS_FLOAT32_ATOL


def test_hugging_face_image_preprocessor_layout(torch64):
    # pixels flattened row-major, data channels first, then HF's Fourier features of its own
    # (float32) positions; everything else float64
    torch, mp = torch64
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, 5, 4, 3))  # [B, h, w, ch]
    fourier = {"num_bands": 4, "max_resolution": (5, 4), "concat_pos": True, "sine_only": False}
    prep = mp.PerceiverImagePreprocessor(
        mp.PerceiverConfig(), prep_type="pixels", spatial_downsample=1,
        position_encoding_type="fourier", fourier_position_encoding_kwargs=fourier,
    )
    theirs = prep(torch.from_numpy(images.transpose(0, 3, 1, 2)))[0].detach().numpy()
    ours = P.image_to_inputs(images, num_bands=4)
    assert ours.shape == theirs.shape == (2, 20, 3 + P.fourier_channels(2, 4))
    assert np.array_equal(ours[..., :3], theirs[..., :3])
    hf_pos = mp.build_linear_positions((5, 4)).numpy().reshape(-1, 2).astype(np.float64)
    want = P.fourier_features(hf_pos, 4, max_resolution=(5, 4))
    assert _maxabs(theirs[1, :, 3:], want) <= FOURIER_FLOAT64_ATOL


# --- combining, and the trainable encoding's backward ------------------------------------------------


def _check(forward, backward, x, params=None, **opts):
    report = check_layer(forward, backward, x, params, **opts)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
    return report


@pytest.mark.parametrize("mode, cp", [("concat", 4), ("add", 3)])
def test_trainable_position_backward(rng, mode, cp):
    params = {"pos": rng.normal(size=(5, cp))}
    report = _check(P.trainable_position_forward, P.trainable_position_backward,
                    rng.normal(size=(3, 5, 3)), params, mode=mode, max_entries=64)
    assert {r.name: r.checked for r in report.rows} == {"x": 45, "pos": 5 * cp}


@pytest.mark.parametrize("mode, per_sample", [("concat", False), ("add", False), ("concat", True)])
def test_add_position_encoding_backward(rng, mode, per_sample):
    shape = (2, 4, 3) if per_sample else (4, 3)
    pos_enc = rng.normal(size=shape)

    def fwd(x, p, **kw):
        return P.add_position_encoding(x, pos_enc, mode)

    report = _check(fwd, P.add_position_encoding_backward, rng.normal(size=(2, 4, 3)), max_entries=64)
    assert report.rows[0].checked == 24


def test_trainable_gradient_is_the_batch_sum(rng):
    x, pos = rng.normal(size=(3, 5, 2)), rng.normal(size=(5, 4))
    y, cache = P.trainable_position_forward(x, {"pos": pos}, mode="concat")
    assert np.array_equal(y[..., :2], x) and all(np.array_equal(y[b, :, 2:], pos) for b in range(3))
    dy = rng.normal(size=y.shape)
    dx, g = P.trainable_position_backward(dy, cache)
    assert np.array_equal(dx, dy[..., :2]) and np.array_equal(g["pos"], dy[..., 2:].sum(axis=0))
    y, cache = P.trainable_position_forward(x, {"pos": pos[:, :2]}, mode="add")
    dx, g = P.trainable_position_backward(dy[..., :2], cache)
    assert np.array_equal(dx, dy[..., :2]) and np.array_equal(g["pos"], dy[..., :2].sum(axis=0))


def test_init_trainable_position_is_deepminds_truncated_normal():
    n, cp = 200, 64  # 12800 draws
    p = P.init_trainable_position(n, cp, np.random.default_rng(0), dtype=np.float64)
    assert set(p) == {"pos"} and p["pos"].shape == (n, cp) and p["pos"].dtype == np.float64
    v = p["pos"].ravel()
    assert np.abs(v).max() < 2 * 0.02  # truncated at two standard deviations
    # Haiku's TruncatedNormal(0.02) does not rescale: std = 0.02 * std of N(0, 1) on (-2, 2)
    tn = stats.truncnorm(-2.0, 2.0, scale=0.02)
    sigma, kurt = tn.std(), tn.stats(moments="k") + 3.0
    se_std = sigma * math.sqrt((kurt - 1.0) / (4.0 * v.size))  # delta method for the sample std
    assert abs(v.std() - sigma) <= SAMPLE_SIGMAS * se_std
    assert abs(v.mean()) <= SAMPLE_SIGMAS * sigma / math.sqrt(v.size)
    again = P.init_trainable_position(n, cp, np.random.default_rng(0))
    assert again["pos"].dtype == np.float32 and np.array_equal(again["pos"], p["pos"].astype(np.float32))


# --- helpers ---------------------------------------------------------------------------------------


def test_image_to_inputs_shapes_and_channels(rng):
    images = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    x = P.image_to_inputs(images, num_bands=6, max_resolution=(224, 224))
    enc = P.fourier_position_encoding((5, 7), 6, max_resolution=(224, 224))
    assert x.shape == (2, 35, 3 + enc.shape[1]) and x.dtype == np.float32
    assert np.array_equal(x[0, 2 * 7 + 4, :3], images[0, 2, 4])  # pixel (i, j) at i*w + j
    assert np.array_equal(x[..., :3], images.reshape(2, 35, 3).astype(np.float32))
    assert np.array_equal(x[0, :, 3:], enc) and np.array_equal(x[1, :, 3:], enc)
    # add mode: ch must equal Cp = 2*1*2 + 2 = 6
    six = rng.normal(size=(1, 4, 4, 6))
    y = P.image_to_inputs(six, num_bands=1, mode="add")
    assert y.dtype == np.float64
    assert np.array_equal(y, six.reshape(1, 16, 6) + P.fourier_position_encoding((4, 4), 1, dtype=np.float64))


def test_sequence_to_inputs_shapes_and_channels(rng):
    seq = rng.normal(size=(3, 10, 2))
    x = P.sequence_to_inputs(seq, num_bands=5, sine_only=True, dtype=np.float32)
    enc = P.fourier_position_encoding((10,), 5, sine_only=True)
    assert x.shape == (3, 10, 2 + 1 + 5) and x.dtype == np.float32
    assert np.array_equal(x[..., :2], seq.astype(np.float32)) and np.array_equal(x[2, :, 2:], enc)


def test_points_to_inputs_per_sample_positions(rng):
    feats = rng.normal(size=(2, 6, 3))
    coords = rng.uniform(-1, 1, size=(2, 6, 3))
    coords[0, 0] = [-1.0, 1.0, 0.0]  # the ends of the range are allowed
    x = P.points_to_inputs(feats, coords, num_bands=4, max_resolution=(8, 8, 8))
    assert x.shape == (2, 6, 3 + P.fourier_channels(3, 4))
    for b in range(2):
        want = P.fourier_features(coords[b], 4, max_resolution=(8, 8, 8))
        assert np.array_equal(x[b, :, 3:], want) and np.array_equal(x[b, :, :3], feats[b])
    # points on the pixel grid give exactly image_to_inputs
    images = rng.normal(size=(2, 3, 4, 1))
    grid = np.broadcast_to(P.linear_positions((3, 4)), (2, 12, 2))
    got = P.points_to_inputs(images.reshape(2, 12, 1), grid, num_bands=2, max_resolution=(3, 4))
    assert np.array_equal(got, P.image_to_inputs(images, num_bands=2))


# --- errors ----------------------------------------------------------------------------------------


def _bad_inputs():
    ok3, ok4 = np.zeros((1, 2, 3)), np.zeros((1, 2, 2, 3))
    coords = np.zeros((1, 2, 2))
    return [
        (lambda: P.linear_positions(()), ValueError, "index_dims"),
        (lambda: P.linear_positions((3, 0)), ValueError, "index_dims"),
        (lambda: P.linear_positions((2.5,)), ValueError, "index_dims"),
        (lambda: P.fourier_features(np.zeros((4, 2)), 0, max_resolution=(4, 4)), ValueError, "num_bands"),
        (lambda: P.fourier_features(np.zeros((4, 2)), 3, max_resolution=(4,)), ValueError,
         r"max_resolution: expected 2 entries"),
        (lambda: P.fourier_features(np.zeros((4, 1)), 3, max_resolution=16), ValueError, r"write \(16,\)"),
        (lambda: P.fourier_features(np.zeros((4, 2)), 3, max_resolution=(4, -1)), ValueError, "> 0"),
        (lambda: P.fourier_features(np.zeros(4), 3, max_resolution=(4,)), ValueError,
         r"pos: expected shape \[N, d\]"),
        (lambda: P.fourier_features(np.zeros((4, 1), complex), 3, max_resolution=(4,)), TypeError, "pos"),
        (lambda: P.fourier_features(np.full((4, 1), np.nan), 3, max_resolution=(4,)), ValueError, "NaN"),
        (lambda: P.fourier_position_encoding((4,), 2, dtype=np.int32), TypeError, "dtype"),
        (lambda: P.fourier_channels(0, 4), ValueError, "d:"),
        (lambda: P.add_position_encoding(ok3, np.zeros((2, 4)), "add"), ValueError,
         r"ch = 3 .* Cp = 4"),
        (lambda: P.add_position_encoding(ok3, np.zeros((5, 4))), ValueError,
         r"pos_enc: expected shape \[N, Cp\] = \(2, \?\)"),
        (lambda: P.add_position_encoding(ok3, np.zeros((2, 4), np.float32)), TypeError,
         "pos_enc: expected dtype float64"),
        (lambda: P.add_position_encoding(ok3, np.zeros((2, 4)), "sum"), ValueError, "mode"),
        (lambda: P.add_position_encoding(np.zeros((2, 3)), np.zeros((2, 4))), ValueError,
         r"x: expected shape \[B, N, ch\]"),
        (lambda: P.add_position_encoding(ok3.astype(int), np.zeros((2, 4))), TypeError,
         "x: expected a float"),
        (lambda: P.trainable_position_forward(ok3, {"pos": np.zeros(4)}), ValueError, r"params\['pos'\]"),
        (lambda: P.init_trainable_position(4, 8, 0), TypeError, "rng"),
        (lambda: P.init_trainable_position(0, 8, np.random.default_rng(0)), ValueError, "n:"),
        (lambda: P.image_to_inputs(ok3, num_bands=2), ValueError, r"images: expected shape \[B, h, w, ch\]"),
        (lambda: P.image_to_inputs(np.zeros((1, 0, 2, 3)), num_bands=2), ValueError, "non-empty"),
        (lambda: P.image_to_inputs(ok4.astype(bool), num_bands=2), TypeError, "images"),
        (lambda: P.image_to_inputs(ok4, num_bands=2, mode="add"), ValueError,
         r"images: mode 'add' .* ch = 3, Cp = 10"),
        (lambda: P.image_to_inputs(ok4, num_bands=2, max_resolution=(4,)), ValueError, "max_resolution"),
        (lambda: P.sequence_to_inputs(ok4, num_bands=2), ValueError, r"seq: expected shape \[B, T, ch\]"),
        (lambda: P.sequence_to_inputs(ok3 + 1j, num_bands=2), TypeError, "seq"),
        (lambda: P.points_to_inputs(ok3, coords + 1.5, num_bands=2, max_resolution=(4, 4)), ValueError,
         r"coords: expected values in \[-1, 1\]"),
        (lambda: P.points_to_inputs(ok3, np.zeros((1, 3, 2)), num_bands=2, max_resolution=(4, 4)),
         ValueError, r"coords: expected shape \[B, N, d\] = \(1, 2, d\)"),
        (lambda: P.points_to_inputs(ok3, coords, num_bands=2, max_resolution=(4,)), ValueError,
         "max_resolution: expected 2 entries"),
        (lambda: P.points_to_inputs(ok3, coords.astype(str), num_bands=2, max_resolution=(4, 4)),
         TypeError, "coords"),
    ]


@pytest.mark.parametrize("call, exc, match", _bad_inputs())
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backward_checks_dy(rng):
    _, cache = P.add_position_encoding(np.zeros((2, 3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"position dy: expected shape \[B, N, C\] = \(2, 3, 9\)"):
        P.add_position_encoding_backward(np.zeros((2, 3, 4)), cache)


def test_shared_fourier_features_equal_fresh_ones_and_are_read_only():
    from perceiver_np.position import fourier_position_encoding, shared_fourier_position_encoding

    a = shared_fourier_position_encoding((5, 7), 4, max_resolution=[224, 224], dtype="float64")
    b = shared_fourier_position_encoding([5, 7], 4, max_resolution=(224.0, 224.0), dtype=np.float64)
    assert a is b  # one computation for equal argument sets, however they are spelled
    np.testing.assert_array_equal(a, fourier_position_encoding((5, 7), 4, max_resolution=(224, 224),
                                                               dtype=np.float64))
    assert not a.flags.writeable
    with pytest.raises(ValueError, match="num_bands"):
        shared_fourier_position_encoding((5, 7), 0)
