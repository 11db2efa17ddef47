"""Position encodings: how data becomes Perceiver input, with positions attached.

A Perceiver's attention is permutation invariant, so where each input element sits must be
written into its channels. This module does that the way DeepMind's Perceiver / Perceiver IO
(and Hugging Face's port of it) do::

    pos = linear_positions((h, w))                       # [N, d]  a grid in [-1, 1]^d
    enc = fourier_features(pos, K, max_resolution=R)     # [N, Cp] [pos, sin(pi u), cos(pi u)]
    y, cache = add_position_encoding(x, enc, "concat")   # [B, N, ch] -> [B, N, ch + Cp]

or with a learned table of positions (``init_trainable_position``,
``trainable_position_forward`` / ``trainable_position_backward``), and three helpers that do
all of it for images, sequences and point sets (``image_to_inputs``, ``sequence_to_inputs``,
``points_to_inputs``). docs/position.md explains the formula and the layouts.

Shapes use the vocabulary of :mod:`perceiver_np.shapes` (B batch, N input positions, C the
channels the Perceiver sees), plus these letters of this module:

    d     spatial axes of a position (1 for a sequence, 2 for an image, 3 for a video)
    K     frequency bands per axis (``num_bands``)
    Cp    position channels: ``fourier_channels(d, K, ...)``, or a trainable encoding's width
    ch    data channels before the positions are attached; C = ch + Cp ("concat") or ch ("add")
    h, w  image height and width (lower case: H is the attention heads), N = h * w
    T     sequence length, N = T

The Fourier features are computed in float64 and rounded once to the output dtype, so a
float32 encoding is the float64 one correctly rounded (DeepMind and HF compute in float32; their
float32 values differ from these by float32 rounding of the sine's argument, see the docs).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import DTypeLike

from .shapes import FLOAT_DTYPES, as_real_input, expect_shape

Params = dict[str, np.ndarray]

#: Standard deviation of the normal that trainable position encodings are drawn from before
#: truncation: DeepMind's ``TrainablePositionEncoding(init_scale=0.02)``.
TRAINABLE_INIT_SCALE = 0.02
#: Truncation of that normal, in standard deviations: Haiku's ``TruncatedNormal`` redraws
#: values outside (-2, 2) and does not rescale, so the drawn values lie in (-0.04, 0.04) and
#: their standard deviation is 0.02 * 0.8796 = 0.0176.
TRAINABLE_INIT_TRUNCATION = 2.0

MODES = ("concat", "add")
_F64 = np.dtype(np.float64)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_index_dims(index_dims: Sequence[int]) -> tuple[int, ...]:
    """``index_dims`` as a tuple of positive ints, e.g. (h, w) for an image."""
    if (
        not isinstance(index_dims, (Sequence, np.ndarray))
        or isinstance(index_dims, str)
        or len(index_dims) == 0
    ):
        raise ValueError(
            f"index_dims: expected a non-empty tuple of positive ints, one per axis, got {index_dims!r}"
        )
    if not all(_is_int(n) and int(n) >= 1 for n in index_dims):
        raise ValueError(f"index_dims: every size must be an int >= 1, got {tuple(index_dims)!r}")
    return tuple(int(n) for n in index_dims)


def _check_num_bands(num_bands: int) -> int:
    if not _is_int(num_bands) or int(num_bands) < 1:
        raise ValueError(f"num_bands: expected an int >= 1, got {num_bands!r}")
    return int(num_bands)


def _check_resolution(max_resolution: Sequence[float], d: int | None) -> tuple[float, ...]:
    """``max_resolution`` as a tuple of positive finite numbers, ``d`` of them if ``d`` is given."""
    if not isinstance(max_resolution, (Sequence, np.ndarray)) or isinstance(max_resolution, str):
        raise ValueError(
            "max_resolution: expected a tuple with one number per axis, "
            f"got {max_resolution!r}; write ({max_resolution!r},) for one axis"
        )
    res = tuple(max_resolution)
    if len(res) == 0 or (d is not None and len(res) != d):
        want = "at least 1" if d is None else str(d)
        raise ValueError(
            f"max_resolution: expected {want} entries (one per axis of the positions), got {res!r}"
        )
    ok = all(
        isinstance(r, numbers.Real) and not isinstance(r, bool) and np.isfinite(r) and r > 0
        for r in res
    )
    if not ok:
        raise ValueError(f"max_resolution: every entry must be a finite number > 0, got {res!r}")
    return tuple(float(r) for r in res)


def _check_add(name: str, mode: str, ch: int, cp: int) -> None:
    """The helpers' own message for mode 'add' (the data never sees a ``pos_enc`` argument)."""
    if mode == "add" and ch != cp:
        raise ValueError(
            f"{name}: mode 'add' needs as many data channels as position channels: "
            f"ch = {ch}, Cp = {cp} (fourier_channels); use mode 'concat' or another num_bands"
        )


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected 'concat' or 'add', got {mode!r}")
    return mode


def _float_dtype(name: str, dtype: DTypeLike) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {dt.name}")
    return dt


def _data(
    name: str, value: object, letters: str, ndim: int, dtype: DTypeLike | None
) -> tuple[np.ndarray, np.dtype]:
    """Validate real-valued data of shape ``letters`` (every axis non-empty) and cast it.

    The output dtype is ``dtype`` if given, else the data's own if it is float32 or float64,
    else float32 (int and uint pixels, float16).
    """
    own = np.asarray(value).dtype
    if dtype is not None:
        out = _float_dtype("dtype", dtype)
    else:
        out = own if own in FLOAT_DTYPES else np.dtype(np.float32)
    arr = as_real_input(name, value, out)  # rejects complex, bool, strings, NaN and inf
    if arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(
            f"{name}: expected shape {letters} with every axis non-empty, got shape {arr.shape}"
        )
    return arr, out


# ---------------------------------------------------------------------------------------------
# Positions and their Fourier features
# ---------------------------------------------------------------------------------------------


def linear_positions(index_dims: Sequence[int]) -> np.ndarray:
    """The positions of a grid, in [-1, 1] along every axis, as float64.

    index_dims = (n_1, ..., n_d) -> pos: [N, d] with N = n_1 * ... * n_d. Axis i takes the
    values ``linspace(-1, 1, n_i)`` (an axis of size 1 sits at -1); the grid is indexed 'ij'
    and flattened row-major, so position p = (i_1 * n_2 + i_2) * n_3 + ... like
    ``x.reshape(B, -1, ch)`` flattens the data. DeepMind's and HF's ``build_linear_positions``
    (float32 there) followed by the same reshape.
    """
    dims = _check_index_dims(index_dims)
    axes = [np.linspace(-1.0, 1.0, n) for n in dims]  # d arrays [n_i]
    grid = np.meshgrid(*axes, indexing="ij")  # d arrays [n_1, ..., n_d]
    pos = np.stack(grid, axis=-1)  # -> [n_1, ..., n_d, d]
    return pos.reshape(-1, len(dims))  # [n_1, ..., n_d, d] -> [N, d]


def fourier_channels(d: int, num_bands: int, concat_pos: bool = True, sine_only: bool = False) -> int:
    """Cp, the width of :func:`fourier_features`: ``d*K*(1 if sine_only else 2) + (d if
    concat_pos else 0)``. ImageNet's d = 2, K = 64: 2*64*2 + 2 = 258."""
    if not _is_int(d) or int(d) < 1:
        raise ValueError(f"d: expected an int >= 1 (axes of a position), got {d!r}")
    k = _check_num_bands(num_bands)
    return int(d) * k * (1 if sine_only else 2) + (int(d) if concat_pos else 0)


def fourier_frequencies(max_resolution: Sequence[float], num_bands: int) -> np.ndarray:
    """f: [d, K] float64, ``f[i] = linspace(1, R_i / 2, K)``: from one cycle over [-1, 1] to
    the Nyquist frequency of R_i samples (R_i / 2 cycles over the axis' length 2)."""
    k = _check_num_bands(num_bands)
    res = _check_resolution(max_resolution, None)
    return np.stack([np.linspace(1.0, r / 2.0, k) for r in res])  # d arrays [K] -> [d, K]


def fourier_features(
    pos: np.ndarray,
    num_bands: int,
    *,
    max_resolution: Sequence[float],
    concat_pos: bool = True,
    sine_only: bool = False,
) -> np.ndarray:
    """DeepMind's ``generate_fourier_features``, channel for channel.

    pos: [N, d] (any real numbers; grids from :func:`linear_positions` lie in [-1, 1]),
    max_resolution: d numbers R_i -> features: [N, Cp], Cp = :func:`fourier_channels`.

    With ``f = fourier_frequencies(max_resolution, K)`` ([d, K]) and ``u[p, i*K + k] =
    pos[p, i] * f[i, k]`` (dim-major: all K bands of axis 0, then of axis 1, ...)::

        features = [pos (if concat_pos)] ++ sin(pi u) ++ cos(pi u) (cos omitted if sine_only)

    Computed in float64; the result is float32 if ``pos`` is float32, float64 otherwise.
    """
    arr = as_real_input("pos", pos, _F64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"pos: expected shape [N, d] with d >= 1, got shape {arr.shape}")
    n, d = arr.shape
    k = _check_num_bands(num_bands)
    f = fourier_frequencies(_check_resolution(max_resolution, d), k)  # [d, K]
    u = arr[:, :, None] * f[None, :, :]  # [N, d, 1] * [1, d, K] -> [N, d, K]
    u = u.reshape(n, d * k)  # [N, d, K] -> [N, d*K], dim-major
    parts = [arr] if concat_pos else []  # [N, d]
    parts.append(np.sin(np.pi * u))  # [N, d*K]
    if not sine_only:
        parts.append(np.cos(np.pi * u))  # [N, d*K]
    features = np.concatenate(parts, axis=-1)  # -> [N, Cp]
    out = np.float32 if np.asarray(pos).dtype == np.float32 else np.float64
    return features.astype(out, copy=False)


def fourier_position_encoding(
    index_dims: Sequence[int],
    num_bands: int,
    *,
    max_resolution: Sequence[float] | None = None,
    concat_pos: bool = True,
    sine_only: bool = False,
    dtype: DTypeLike = np.float32,
) -> np.ndarray:
    """The Fourier features of a grid: index_dims (n_1, ..., n_d) -> [N, Cp] in ``dtype``.

    ``fourier_features(linear_positions(index_dims), ...)``; ``max_resolution`` defaults to
    ``index_dims`` (DeepMind's ``FourierPositionEncoding``). Computed in float64, rounded once.
    """
    dims = _check_index_dims(index_dims)
    out = _float_dtype("dtype", dtype)
    res = dims if max_resolution is None else max_resolution
    features = fourier_features(
        linear_positions(dims), num_bands, max_resolution=res, concat_pos=concat_pos,
        sine_only=sine_only,
    )  # [N, d] -> [N, Cp]
    return features.astype(out, copy=False)


def lucidrains_fourier_encoding(
    index_dims: Sequence[int], num_bands: int, max_freq: float, *, dtype: DTypeLike = np.float32,
) -> np.ndarray:
    """lucidrains' ``fourier_encode`` of a grid, channel for channel: index_dims (n_1, ..., n_d)
    -> [N, d * (2K + 1)] in ``dtype`` (what perceiver-pytorch's ``Perceiver`` appends to its data
    with ``fourier_encode_data=True``).

    The grid is :func:`linear_positions`'. One frequency set for every axis,
    ``f = linspace(1, max_freq / 2, K)`` (DeepMind's is per axis, up to its resolution), and the
    channels axis-major, each axis' block ``[sin(pi x f), cos(pi x f), x]`` (DeepMind's order is
    ``[pos of every axis, sin of every axis, cos of every axis]``)::

        features[p] = [sin(pi x_0 f), cos(pi x_0 f), x_0, sin(pi x_1 f), cos(pi x_1 f), x_1, ...]

    Computed in float64, rounded once (perceiver-pytorch computes in the data's dtype).
    """
    k = _check_num_bands(num_bands)
    if isinstance(max_freq, bool) or not isinstance(max_freq, (int, float)) or not 0 < max_freq < np.inf:
        raise ValueError(f"max_freq: expected a positive finite number, got {max_freq!r}")
    pos = linear_positions(index_dims)  # [N, d]
    n, d = pos.shape
    f = np.linspace(1.0, max_freq / 2.0, k)  # [K]
    u = pos[:, :, None] * f * np.pi  # [N, d, 1] * [K] -> [N, d, K] (their order of products)
    blocks = np.concatenate([np.sin(u), np.cos(u), pos[:, :, None]], axis=-1)  # -> [N, d, 2K + 1]
    return blocks.reshape(n, d * (2 * k + 1)).astype(_float_dtype("dtype", dtype), copy=False)


#: Argument sets whose features :func:`shared_fourier_position_encoding` keeps (each up to
#: N x Cp values: 50,176 x 258 float32 = 52 MB for a 224 x 224 image).
SHARED_FOURIER_ENTRIES = 4


def shared_fourier_position_encoding(
    index_dims: Sequence[int],
    num_bands: int,
    *,
    max_resolution: Sequence[float] | None = None,
    concat_pos: bool = True,
    sine_only: bool = False,
    dtype: DTypeLike = np.float32,
) -> np.ndarray:
    """:func:`fourier_position_encoding`, computed once per argument set and shared, read-only
    (a model that asks for the same grid at every call computes it once): the features of the
    last :data:`SHARED_FOURIER_ENTRIES` argument sets are kept."""
    res = None if max_resolution is None else tuple(float(r) for r in max_resolution)
    return _shared_fourier(tuple(_check_index_dims(index_dims)), int(_check_num_bands(num_bands)), res,
                           bool(concat_pos), bool(sine_only), _float_dtype("dtype", dtype).str)


@functools.lru_cache(maxsize=SHARED_FOURIER_ENTRIES)
def _shared_fourier(dims: tuple[int, ...], num_bands: int, res: tuple[float, ...] | None, concat_pos: bool,
                    sine_only: bool, dtype: str) -> np.ndarray:
    features = fourier_position_encoding(dims, num_bands, max_resolution=res, concat_pos=concat_pos,
                                         sine_only=sine_only, dtype=np.dtype(dtype))
    features.setflags(write=False)
    return features


# ---------------------------------------------------------------------------------------------
# Attaching an encoding to the data: concatenate or add
# ---------------------------------------------------------------------------------------------


class PositionCache(NamedTuple):
    x_shape: tuple[int, int, int]  # (B, N, ch) of the data
    width: int  # C of the output: ch + Cp ("concat") or ch ("add")
    mode: str  # "concat" | "add"


def add_position_encoding(
    x: np.ndarray, pos_enc: np.ndarray, mode: str = "concat"
) -> tuple[np.ndarray, PositionCache]:
    """Attach a position encoding to the data.

    x: [B, N, ch], pos_enc: [N, Cp] (shared by the batch) or [B, N, Cp] (one per sample), both
    float32 or both float64 -> y: [B, N, ch + Cp] with ``mode="concat"`` (data channels first,
    as DeepMind and HF), or y = x + pos_enc: [B, N, ch] with ``mode="add"`` (needs Cp = ch).
    Returns ``(y, cache)`` for :func:`add_position_encoding_backward`; the encoding is a
    constant here (its gradient is :func:`trainable_position_backward`'s business).
    """
    _check_mode(mode)
    if not isinstance(x, np.ndarray) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"x: expected a float32 or float64 numpy.ndarray, got {type(x).__name__}"
            + (f" of dtype {x.dtype.name}" if isinstance(x, np.ndarray) else "")
        )
    if x.ndim != 3:
        raise ValueError(f"x: expected shape [B, N, ch], got shape {x.shape}")
    if not isinstance(pos_enc, np.ndarray):
        raise TypeError(f"pos_enc: expected a numpy.ndarray, got {type(pos_enc).__name__}")
    if pos_enc.dtype != x.dtype:
        raise TypeError(
            f"pos_enc: expected dtype {x.dtype.name} (the dtype of x), got {pos_enc.dtype.name}; "
            "build it with dtype=x.dtype"
        )
    b, n, ch = x.shape
    if pos_enc.ndim == 2:
        expect_shape("pos_enc", pos_enc, (n, None), "[N, Cp]")
    else:
        expect_shape("pos_enc", pos_enc, (b, n, None), "[B, N, Cp] or [N, Cp]")
    cp = pos_enc.shape[-1]
    if mode == "add":
        if cp != ch:
            raise ValueError(
                f"pos_enc: mode 'add' needs as many position channels as data channels: "
                f"x has ch = {ch} (shape {x.shape}), pos_enc has Cp = {cp} (shape {pos_enc.shape})"
            )
        y = x + pos_enc  # [B, N, ch] + [N, ch] or [B, N, ch] -> [B, N, ch]
    else:
        pos_b = np.broadcast_to(pos_enc, (b, n, cp))  # [N, Cp] -> [B, N, Cp] (a view)
        y = np.concatenate([x, pos_b], axis=-1)  # [B, N, ch] ++ [B, N, Cp] -> [B, N, ch + Cp]
    return y, PositionCache((b, n, ch), int(y.shape[-1]), mode)


def add_position_encoding_backward(dy: np.ndarray, cache: PositionCache) -> tuple[np.ndarray, Params]:
    """dy: [B, N, C] -> (dx [B, N, ch], {}): the data's slice of dy ("concat") or dy ("add")."""
    b, n, ch = cache.x_shape
    expect_shape("position dy", dy, (b, n, cache.width), "[B, N, C]")
    if cache.mode == "add":
        # in the forward pass this was y = x + pos_enc
        return dy, {}
    # in the forward pass this was y = concatenate([x, pos_enc]): x's channels come first
    dx = np.ascontiguousarray(dy[..., :ch])  # [B, N, ch + Cp] -> [B, N, ch]
    return dx, {}


# ---------------------------------------------------------------------------------------------
# Trainable position encoding: a learned [N, Cp] table
# ---------------------------------------------------------------------------------------------


def init_trainable_position(
    n: int, channels: int, rng: np.random.Generator, dtype: DTypeLike = np.float32
) -> Params:
    """params ``{"pos": [N, Cp]}`` with N = ``n``, Cp = ``channels``: DeepMind's
    ``TrainablePositionEncoding`` initialisation, Haiku's ``TruncatedNormal(stddev=0.02)``.

    Each entry is ``0.02 * z`` with z standard normal conditioned on |z| < 2 (drawn in float64,
    redrawn until inside, then cast), so entries lie in (-0.04, 0.04) with std 0.0176. HF draws
    a plain normal with std 0.02 instead (``initializer_range``).
    """
    if not (_is_int(n) and int(n) >= 1):
        raise ValueError(f"n: expected an int >= 1 (positions, N), got {n!r}")
    if not (_is_int(channels) and int(channels) >= 1):
        raise ValueError(f"channels: expected an int >= 1 (Cp), got {channels!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    out = _float_dtype("dtype", dtype)
    z = rng.standard_normal((int(n), int(channels)))  # [N, Cp]
    outside = np.abs(z) >= TRAINABLE_INIT_TRUNCATION
    while outside.any():  # rejection: each redraw lands inside with probability 0.954
        z[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(z) >= TRAINABLE_INIT_TRUNCATION
    return {"pos": (TRAINABLE_INIT_SCALE * z).astype(out)}


def trainable_position_forward(
    x: np.ndarray, params: Params, *, mode: str = "concat"
) -> tuple[np.ndarray, PositionCache]:
    """x: [B, N, ch], params ``pos [N, Cp]`` -> y: [B, N, ch + Cp] ("concat") or [B, N, ch]
    ("add", Cp = ch): :func:`add_position_encoding` with the learned table."""
    if "pos" not in params:
        raise KeyError(f"params: expected the key 'pos' (the [N, Cp] table), got keys {sorted(params)}")
    pos = params["pos"]
    if not isinstance(pos, np.ndarray) or pos.ndim != 2:
        raise ValueError(
            f"params['pos']: expected an array of shape [N, Cp], got {getattr(pos, 'shape', pos)!r}"
        )
    return add_position_encoding(x, pos, mode)


def trainable_position_backward(dy: np.ndarray, cache: PositionCache) -> tuple[np.ndarray, Params]:
    """dy: [B, N, C] -> (dx [B, N, ch], {"pos": dpos [N, Cp]}).

    Every sample saw the same table, so its gradient sums over the batch: ``dpos = sum_b dy``
    ("add") or ``sum_b dy[..., ch:]``, the position channels ("concat").
    """
    dx, _ = add_position_encoding_backward(dy, cache)
    ch = cache.x_shape[2]
    if cache.mode == "add":
        # in the forward pass this was y = x + broadcast(pos)
        dpos = dy.sum(axis=0)  # [B, N, Cp] -> [N, Cp]
    else:
        # in the forward pass this was y = concatenate([x, broadcast(pos)])
        dpos = dy[..., ch:].sum(axis=0)  # [B, N, ch + Cp] -> [B, N, Cp] -> [N, Cp]
    return dx, {"pos": dpos}


# ---------------------------------------------------------------------------------------------
# Data -> Perceiver inputs
# ---------------------------------------------------------------------------------------------


def image_to_inputs(
    images: np.ndarray,
    *,
    num_bands: int,
    max_resolution: Sequence[float] | None = None,
    concat_pos: bool = True,
    sine_only: bool = False,
    mode: str = "concat",
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """images: [B, h, w, ch] (channels last, any real dtype) -> x: [B, N, C], N = h*w.

    Pixels are flattened row-major (pixel (i, j) is position i*w + j), each with the Fourier
    features of ``linear_positions((h, w))``; ``max_resolution`` defaults to (h, w).
    ``mode="concat"``: C = ch + Cp; ``mode="add"``: C = ch (needs ch = Cp). The dtype is
    ``dtype``, else the images' own if float32/float64, else float32.
    """
    _check_mode(mode)
    arr, out = _data("images", images, "[B, h, w, ch]", 4, dtype)
    return _grid_to_inputs("images", arr, out, num_bands, max_resolution, concat_pos, sine_only, mode)


def sequence_to_inputs(
    seq: np.ndarray,
    *,
    num_bands: int,
    max_resolution: Sequence[float] | None = None,
    concat_pos: bool = True,
    sine_only: bool = False,
    mode: str = "concat",
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """seq: [B, T, ch] -> x: [B, N, C], N = T, with the 1-D Fourier features of
    ``linear_positions((T,))``; ``max_resolution`` defaults to (T,). Modes and dtype as
    :func:`image_to_inputs`."""
    _check_mode(mode)
    arr, out = _data("seq", seq, "[B, T, ch]", 3, dtype)
    return _grid_to_inputs("seq", arr, out, num_bands, max_resolution, concat_pos, sine_only, mode)


def _grid_to_inputs(
    name: str,
    arr: np.ndarray,
    out: np.dtype,
    num_bands: int,
    max_resolution: Sequence[float] | None,
    concat_pos: bool,
    sine_only: bool,
    mode: str,
) -> np.ndarray:
    """arr: [B, *index_dims, ch] on a regular grid -> [B, N, C] with the grid's Fourier features."""
    index_dims, ch = arr.shape[1:-1], arr.shape[-1]
    _check_add(name, mode, ch, fourier_channels(len(index_dims), num_bands, concat_pos, sine_only))
    enc = fourier_position_encoding(
        index_dims, num_bands, max_resolution=max_resolution, concat_pos=concat_pos,
        sine_only=sine_only, dtype=out,
    )  # [N, Cp]
    x = arr.reshape(arr.shape[0], -1, ch)  # [B, *index_dims, ch] -> [B, N, ch]
    y, _ = add_position_encoding(x, enc, mode)  # [B, N, ch] -> [B, N, C]
    return y


def points_to_inputs(
    features: np.ndarray,
    coords: np.ndarray,
    *,
    num_bands: int,
    max_resolution: Sequence[float],
    concat_pos: bool = True,
    sine_only: bool = False,
    mode: str = "concat",
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """features: [B, N, ch], coords: [B, N, d] in [-1, 1] -> x: [B, N, C].

    Each sample's points carry the Fourier features of their own coordinates
    (``fourier_features`` per sample; DeepMind vmaps it over the batch). ``max_resolution``
    (d numbers) has no default: points have no grid to take it from. Modes and dtype as
    :func:`image_to_inputs` (the dtype follows ``features``).
    """
    _check_mode(mode)
    x, out = _data("features", features, "[B, N, ch]", 3, dtype)
    c = as_real_input("coords", coords, _F64)
    b, n, _ = x.shape
    if c.ndim != 3 or c.shape[:2] != (b, n) or c.shape[2] == 0:
        raise ValueError(
            f"coords: expected shape [B, N, d] = ({b}, {n}, d) with d >= 1 "
            f"(B, N from features {x.shape}), got shape {c.shape}"
        )
    outside = np.abs(c) > 1.0
    if outside.any():
        first = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(
            f"coords: expected values in [-1, 1], got {c[first]!r} at index {first} "
            f"(range [{c.min()!r}, {c.max()!r}]); rescale them, e.g. 2 * (p - lo) / (hi - lo) - 1"
        )
    d = c.shape[2]
    _check_add("features", mode, x.shape[2], fourier_channels(d, num_bands, concat_pos, sine_only))
    flat = c.reshape(b * n, d)  # [B, N, d] -> [B*N, d]
    enc = fourier_features(
        flat, num_bands, max_resolution=max_resolution, concat_pos=concat_pos, sine_only=sine_only
    )  # [B*N, d] -> [B*N, Cp]
    enc = enc.reshape(b, n, -1).astype(out, copy=False)  # [B*N, Cp] -> [B, N, Cp]
    y, _ = add_position_encoding(x, enc, mode)  # [B, N, ch] -> [B, N, C]
    return y
