"""The layers that Hugging Face's published Perceivers put around the Perceiver, in plain NumPy.

The input preparation of PerceiverForMaskedLM (byte embedding), ...ImageClassificationLearned
(a 1x1 conv), ...Fourier (pixels), ...ConvProcessing (7x7 conv, batch norm, ReLU, max pool),
...OpticalFlow (3x3 patches, space-to-depth) and ...MultimodalAutoencoding (space-to-depth,
trainable channel padding, concatenation of the modalities), and the masked-LM output (the
decoder tied to the input embedding). The same contract as :mod:`perceiver_np.layers`::

    y, cache = <layer>_forward(x, params, **options)
    dx, grads = <layer>_backward(dy, cache)

``grads`` has exactly the keys of ``params`` (``{}`` for a layer without parameters). Each
function reproduces the Hugging Face code it is named after in
``transformers/models/perceiver/modeling_perceiver.py``, including its surprises (see
:func:`same_padding`, :func:`maxpool2d_forward` and :func:`subsample_pixels_forward`).

Images are NCHW, as in torch, and weights have torch's layout (a conv weight is
``[Cout, Cin, kh, kw]``, an embedding ``[V, C]``), so a Hugging Face state dict maps 1:1.
Letters besides those of :mod:`perceiver_np.shapes`: Cin / Cout conv channels, H / W image
height and width (here H is not the heads), kh / kw kernel size, Ho / Wo output size, T frames,
V vocabulary size, P padding channels, bs / ts the spatial / temporal block of space-to-depth.
Padding is always ``(top, bottom, left, right)``. A layer works in the dtype of its input
(float32 or float64), and its parameters must have that dtype (no silent cast).
docs/backward.md derives every backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .shapes import FLOAT_DTYPES, expect_shape

Params = dict[str, np.ndarray]
Pair = tuple[int, int]
Pads = tuple[int, int, int, int]  # (top, bottom, left, right)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _float_input(name: str, x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype.name}")
    return x


def _array(name: str, value: object, dtype: np.dtype | None, shape: Sequence[int | None],
           letters: str) -> np.ndarray:
    """``value`` as a float array of ``shape``, and of ``dtype`` (the input's) unless None."""
    arr = _float_input(name, value)
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype.name} like the input, got {arr.dtype.name}")
    expect_shape(name, arr, shape, letters)
    return arr


def _param(layer: str, params: Mapping[str, np.ndarray], key: str, dtype: np.dtype | None,
           shape: Sequence[int | None], letters: str) -> np.ndarray:
    """``params[key]``: an array of ``dtype`` and ``shape`` (see :func:`_array`)."""
    name = f"{layer} params[{key!r}]"
    if key not in params:
        raise ValueError(f"{name}: missing; the layer needs {letters}")
    return _array(name, params[key], dtype, shape, letters)


def _keys(layer: str, params: Mapping[str, np.ndarray] | None, allowed: Sequence[str]) -> None:
    """Refuse keys the layer does not use (a mis-keyed state dict fails here, not silently)."""
    extra = sorted(set(params or {}) - set(allowed))
    if extra:
        raise ValueError(f"{layer} params: unexpected keys {extra}; the layer takes {sorted(allowed)}")


def _ints(name: str, value: object, n: int, low: int) -> tuple[int, ...]:
    """A tuple of ``n`` Python ints, each >= ``low``."""
    ok = isinstance(value, (tuple, list)) and len(value) == n and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low for v in value)
    if not ok:
        what = "positive" if low > 0 else "non-negative"
        raise ValueError(f"{name}: expected a tuple of {n} {what} ints, got {value!r}")
    assert isinstance(value, (tuple, list))
    return tuple(int(v) for v in value)


def _pair(name: str, value: object) -> Pair:
    a, b = _ints(name, value, 2, 1)
    return a, b


def _pads(name: str, value: object) -> Pads:
    t, b, l, r = _ints(name, value, 4, 0)  # noqa: E741
    return t, b, l, r


def _block(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Padding and sliding windows, shared by conv, max pool and patches
# ---------------------------------------------------------------------------------------------


def _pad(x: np.ndarray, pads: Pads, fill: float) -> np.ndarray:
    """[B, C, H, W] -> [B, C, top + H + bottom, left + W + right], the border filled with ``fill``."""
    t, b, l, r = pads  # noqa: E741
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=fill)


def _crop(xp: np.ndarray, pads: Pads, hw: Pair) -> np.ndarray:
    """The inverse of :func:`_pad`: [B, C, Hp, Wp] -> [B, C, H, W]."""
    t, _, l, _ = pads  # noqa: E741
    return xp[:, :, t:t + hw[0], l:l + hw[1]]


def _windows(xp: np.ndarray, kernel: Pair, stride: Pair) -> np.ndarray:
    """A view [B, C, Hp, Wp] -> [B, C, Ho, Wo, kh, kw]: ``out[b, c, ho, wo, i, j] =
    xp[b, c, ho*sh + i, wo*sw + j]``, with Ho = (Hp - kh) // sh + 1 (torch's floor)."""
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=(2, 3))  # [B,C,Hp-kh+1,Wp-kw+1,kh,kw]
    return win[:, :, ::stride[0], ::stride[1]]  # -> [B, C, Ho, Wo, kh, kw]


def _windows_adjoint(dwin: np.ndarray, padded_hw: Pair, stride: Pair) -> np.ndarray:
    """The adjoint of :func:`_windows` (col2im): [B, C, Ho, Wo, kh, kw] -> [B, C, Hp, Wp]. Each
    window entry is added to the pixel it was read from; pixels in several windows sum."""
    b, c, ho, wo, kh, kw = dwin.shape
    sh, sw = stride
    dxp = np.zeros((b, c, *padded_hw), dtype=dwin.dtype)
    for i in range(kh):  # one strided slice per kernel tap (kh * kw of them), never per pixel
        for j in range(kw):
            dxp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += dwin[..., i, j]
    return dxp


def _padded_hw(layer: str, x: np.ndarray, pads: Pads, kernel: Pair) -> Pair:
    hp, wp = x.shape[2] + pads[0] + pads[1], x.shape[3] + pads[2] + pads[3]
    if hp < kernel[0] or wp < kernel[1]:
        raise ValueError(f"{layer} x: the padded image {hp}x{wp} (shape {x.shape}, padding {pads}) "
                         f"is smaller than the kernel {kernel[0]}x{kernel[1]}")
    return hp, wp


# ---------------------------------------------------------------------------------------------
# Embedding: y[b, n] = weight[ids[b, n]]
# ---------------------------------------------------------------------------------------------


class EmbeddingCache(NamedTuple):
    ids: np.ndarray  # [B, N] intp, the rows looked up
    vocab: int  # V, the rows of the table


def embedding_forward(ids: np.ndarray, params: Params) -> tuple[np.ndarray, EmbeddingCache]:
    """ids: int [B, N] (any integer dtype, values in [0, V)), weight [V, C] -> y: [B, N, C],
    row ``ids[b, n]`` of the table (torch's ``nn.Embedding``)."""
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        got = ids.dtype.name if isinstance(ids, np.ndarray) else type(ids).__name__
        raise TypeError(f"embedding ids: expected an integer numpy.ndarray, got {got}")
    if ids.ndim != 2:
        raise ValueError(f"embedding ids: expected shape [B, N], got {ids.shape}")
    _keys("embedding", params, ["weight"])
    weight = _param("embedding", params, "weight", None, (None, None), "[V, C]")
    vocab = weight.shape[0]
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"embedding ids: expected values in [0, V) = [0, {vocab}), "
                         f"got {ids[where]} at index {where}")
    idx = ids.astype(np.intp, copy=False)
    y = weight[idx]  # [B, N] -> [B, N, C]
    return y, EmbeddingCache(idx, vocab)


def embedding_backward(dy: np.ndarray, cache: EmbeddingCache) -> tuple[None, Params]:
    """dy: [B, N, C] -> (None, {"weight": [V, C]}). The input gradient is None: the ids are
    integers, nothing to differentiate. Row v of the weight gradient is the sum of dy over every
    position that looked up v (a scatter-add: a repeated id adds, it does not overwrite)."""
    ids, vocab = cache
    expect_shape("embedding dy", dy, (*ids.shape, None), "[B, N, C]")
    dweight = np.zeros((vocab, dy.shape[-1]), dtype=dy.dtype)
    # in the forward pass this was y = weight[ids]
    np.add.at(dweight, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))  # [B*N, C] -> [V, C]
    return None, {"weight": dweight}


# ---------------------------------------------------------------------------------------------
# Embedding decoder (masked LM): logits = h @ weight^T + bias, weight tied to the embedding
# ---------------------------------------------------------------------------------------------


class EmbeddingDecoderCache(NamedTuple):
    h: np.ndarray  # [B, N, C]
    weight: np.ndarray  # [V, C]


def embedding_decoder_forward(h: np.ndarray, params: Params) -> tuple[np.ndarray, EmbeddingDecoderCache]:
    """h: [B, N, C], weight [V, C] (the input embedding's table), bias [V] -> logits [B, N, V]
    = h @ weight^T + bias (HF's PerceiverEmbeddingDecoder)."""
    h = _float_input("embedding_decoder h", h)
    if h.ndim != 3:
        raise ValueError(f"embedding_decoder h: expected shape [B, N, C], got {h.shape}")
    _keys("embedding_decoder", params, ["weight", "bias"])
    b, n, c = h.shape
    weight = _param("embedding_decoder", params, "weight", h.dtype, (None, c), "[V, C]")
    vocab = weight.shape[0]
    bias = _param("embedding_decoder", params, "bias", h.dtype, (vocab,), "[V]")
    logits = h.reshape(-1, c) @ weight.T + bias  # [B*N, C] @ [C, V] -> [B*N, V]
    return logits.reshape(b, n, vocab), EmbeddingDecoderCache(h, weight)  # -> [B, N, V]


def embedding_decoder_backward(dy: np.ndarray, cache: EmbeddingDecoderCache) -> tuple[np.ndarray, Params]:
    """dy: [B, N, V] -> dh [B, N, C]; grads weight [V, C], bias [V]. With the weight tied to the
    embedding, the model adds this weight gradient to the embedding's."""
    h, weight = cache
    b, n, c = h.shape
    expect_shape("embedding_decoder dy", dy, (b, n, weight.shape[0]), "[B, N, V]")
    # in the forward pass this was logits = h @ weight^T + bias
    dy2 = dy.reshape(-1, weight.shape[0])  # [B, N, V] -> [B*N, V]
    dh = (dy2 @ weight).reshape(b, n, c)  # [B*N, V] @ [V, C] -> [B*N, C] -> [B, N, C]
    dweight = dy2.T @ h.reshape(-1, c)  # [V, B*N] @ [B*N, C] -> [V, C]
    return dh, {"weight": dweight, "bias": dy2.sum(axis=0)}  # bias: [B*N, V] -> [V]


# ---------------------------------------------------------------------------------------------
# Conv2d: zero padding, then y[b, o] = sum over (c, i, j) of weight[o, c, i, j] * window
# ---------------------------------------------------------------------------------------------


def same_padding(kernel: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of HF's ``Conv2dSamePadding`` for ``kernel = (kh, kw)``.

    HF builds ``nn.ZeroPad2d`` (which takes (left, right, top, bottom)) from
    ``kernel_size[::-1]``, each k giving ``(k // 2 + k % 2 - 1, k // 2)``: ``(k - 1) // 2``
    before and ``k // 2`` after, so an even kernel pads one more at the bottom / right.
    It depends on neither the stride nor the image size, so at stride 2 it is not TensorFlow's
    'SAME' (a 7x7 stride-2 conv on a 224 image: HF pads 3 and 3, TF would pad 2 and 3).
    """
    kh, kw = _pair("same_padding kernel", kernel)
    return (kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2


class Conv2dCache(NamedTuple):
    cols: np.ndarray  # [B, Ho, Wo, Cin*kh*kw] the im2col matrix of the padded input
    weight: np.ndarray  # [Cout, Cin, kh, kw]
    x_hw: Pair  # (H, W) of the input
    padded_hw: Pair  # (Hp, Wp) = (top + H + bottom, left + W + right)
    stride: Pair  # (sh, sw)
    padding: Pads  # (top, bottom, left, right)
    has_bias: bool


def conv2d_forward(
    x: np.ndarray, params: Params, *, stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> tuple[np.ndarray, Conv2dCache]:
    """x: [B, Cin, H, W], weight [Cout, Cin, kh, kw], optional bias [Cout] -> y: [B, Cout, Ho, Wo],
    Ho = (top + H + bottom - kh) // sh + 1 (torch's ``F.conv2d`` on the zero-padded input). Params
    without ``"bias"`` make a bias-free conv (HF's 7x7 conv). im2col, then one matmul."""
    x = _float_input("conv2d x", x)
    _keys("conv2d", params, ["weight", "bias"])
    weight = _param("conv2d", params, "weight", x.dtype, (None, None, None, None), "[Cout, Cin, kh, kw]")
    cout, cin, kh, kw = weight.shape
    expect_shape("conv2d x", x, (None, cin, None, None), "[B, Cin, H, W]")
    has_bias = "bias" in params
    bias = _param("conv2d", params, "bias", x.dtype, (cout,), "[Cout]") if has_bias else None
    strides, pads = _pair("conv2d stride", stride), _pads("conv2d padding", padding)
    padded_hw = _padded_hw("conv2d", x, pads, (kh, kw))
    xp = _pad(x, pads, 0.0)  # [B, Cin, H, W] -> [B, Cin, Hp, Wp]
    win = _windows(xp, (kh, kw), strides)  # -> [B, Cin, Ho, Wo, kh, kw] (a view)
    b, _, ho, wo = win.shape[:4]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(b, ho, wo, cin * kh * kw)  # -> [B, Ho, Wo, Cin*kh*kw]
    y = cols.reshape(-1, cin * kh * kw) @ weight.reshape(cout, -1).T  # [R, K] @ [K, Cout] -> [R, Cout]
    if bias is not None:
        y = y + bias
    y = y.reshape(b, ho, wo, cout).transpose(0, 3, 1, 2)  # [R, Cout] -> [B, Cout, Ho, Wo]
    return y, Conv2dCache(cols, weight, (x.shape[2], x.shape[3]), padded_hw, strides, pads, has_bias)


def conv2d_backward(dy: np.ndarray, cache: Conv2dCache) -> tuple[np.ndarray, Params]:
    """dy: [B, Cout, Ho, Wo] -> dx: [B, Cin, H, W]; grads weight [Cout, Cin, kh, kw] (and bias
    [Cout] when the forward had one)."""
    cols, weight, x_hw, padded_hw, stride, pads, has_bias = cache
    b, ho, wo, k = cols.shape
    cout, cin, kh, kw = weight.shape
    expect_shape("conv2d dy", dy, (b, cout, ho, wo), "[B, Cout, Ho, Wo]")
    # in the forward pass this was y = cols @ W^T (+ bias), W = weight as [Cout, K]
    dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, cout)  # [B, Cout, Ho, Wo] -> [R, Cout]
    grads = {"weight": (dy2.T @ cols.reshape(-1, k)).reshape(weight.shape)}  # [Cout, R] @ [R, K]
    if has_bias:
        grads["bias"] = dy2.sum(axis=0)  # [R, Cout] -> [Cout]
    dcols = dy2 @ weight.reshape(cout, k)  # [R, Cout] @ [Cout, K] -> [R, K]
    # in the forward pass this was cols = windows of the padded input (im2col)
    dwin = dcols.reshape(b, ho, wo, cin, kh, kw).transpose(0, 3, 1, 2, 4, 5)  # -> [B, Cin, Ho, Wo, kh, kw]
    dxp = _windows_adjoint(dwin, padded_hw, stride)  # col2im -> [B, Cin, Hp, Wp]
    # in the forward pass this was xp = zero-pad(x)
    return _crop(dxp, pads, x_hw), grads  # -> [B, Cin, H, W]


# ---------------------------------------------------------------------------------------------
# Batch norm at inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
# ---------------------------------------------------------------------------------------------


class BatchNormCache(NamedTuple):
    xhat: np.ndarray  # [B, C, ...] (x - running_mean) / sqrt(running_var + eps)
    scale: np.ndarray  # [1, C, 1, ...] weight / sqrt(running_var + eps), shaped to broadcast


def batchnorm_forward(
    x: np.ndarray, params: Params, *, running_mean: np.ndarray, running_var: np.ndarray,
    eps: float = 1e-5,
) -> tuple[np.ndarray, BatchNormCache]:
    """x: [B, C, H, W] (or [B, C], [B, C, L]) -> y: same shape; params weight [C], bias [C].
    Inference mode (torch's ``BatchNorm2d.eval()``): the statistics are the running ones, model
    buffers that are not trained, so they are options and get no gradient. Per channel, an
    affine map."""
    x = _float_input("batchnorm x", x)
    if not 2 <= x.ndim <= 4:
        raise ValueError(f"batchnorm x: expected shape [B, C, H, W], [B, C] or [B, C, L], got {x.shape}")
    _keys("batchnorm", params, ["weight", "bias"])
    c = x.shape[1]
    weight = _param("batchnorm", params, "weight", x.dtype, (c,), "[C]")
    bias = _param("batchnorm", params, "bias", x.dtype, (c,), "[C]")
    mean = _array("batchnorm running_mean", running_mean, x.dtype, (c,), "[C]")
    var = _array("batchnorm running_var", running_var, x.dtype, (c,), "[C]")
    if not eps > 0 or not np.all(var + eps > 0):
        raise ValueError(f"batchnorm running_var: running_var + eps must be > 0, got eps {eps} and "
                         f"running_var down to {var.min()}")
    bshape = (1, c) + (1,) * (x.ndim - 2)  # [C] -> [1, C, 1, ...], broadcast over B and space
    rstd = 1.0 / np.sqrt(var + x.dtype.type(eps))  # [C]
    xhat = (x - mean.reshape(bshape)) * rstd.reshape(bshape)
    y = xhat * weight.reshape(bshape) + bias.reshape(bshape)
    return y, BatchNormCache(xhat, (weight * rstd).reshape(bshape))


def batchnorm_backward(dy: np.ndarray, cache: BatchNormCache) -> tuple[np.ndarray, Params]:
    """dy: [B, C, ...] -> dx: [B, C, ...]; grads weight [C], bias [C]."""
    xhat, scale = cache
    expect_shape("batchnorm dy", dy, xhat.shape, "[B, C, ...]")
    axes = (0, *range(2, dy.ndim))  # every axis but the channels
    # in the forward pass this was y = xhat * weight + bias, xhat = (x - mean) * rstd
    dweight = (dy * xhat).sum(axis=axes)  # [B, C, ...] -> [C]
    dbias = dy.sum(axis=axes)  # [B, C, ...] -> [C]
    return dy * scale, {"weight": dweight, "bias": dbias}


# ---------------------------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------------------------


class ReluCache(NamedTuple):
    positive: np.ndarray  # [...] bool, x > 0


def relu_forward(x: np.ndarray, params: Params | None = None) -> tuple[np.ndarray, ReluCache]:
    """x: [...] -> max(x, 0): [...]. No parameters."""
    x = _float_input("relu x", x)
    _keys("relu", params, [])
    positive = x > 0
    return np.where(positive, x, x.dtype.type(0)), ReluCache(positive)


def relu_backward(dy: np.ndarray, cache: ReluCache) -> tuple[np.ndarray, Params]:
    """dy: [...] -> dx = dy where x > 0, else 0 (at x = 0 too, as torch)."""
    expect_shape("relu dy", dy, cache.positive.shape, "[...]")
    return np.where(cache.positive, dy, dy.dtype.type(0)), {}


# ---------------------------------------------------------------------------------------------
# Max pool: y[b, c, ho, wo] = max of the window
# ---------------------------------------------------------------------------------------------


class MaxPoolCache(NamedTuple):
    argmax: np.ndarray  # [B, C, Ho, Wo] intp, i*kw + j of the window's first maximum
    kernel: Pair  # (kh, kw)
    x_hw: Pair  # (H, W) of the input
    padded_hw: Pair  # (Hp, Wp)
    stride: Pair
    padding: Pads  # (top, bottom, left, right)


def maxpool2d_forward(
    x: np.ndarray, params: Params | None = None, *, kernel: tuple[int, int] = (3, 3),
    stride: tuple[int, int] = (2, 2), padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> tuple[np.ndarray, MaxPoolCache]:
    """x: [B, C, H, W] -> y: [B, C, Ho, Wo], Ho = (top + H + bottom - kh) // sh + 1 (torch's
    ``nn.MaxPool2d``, floor mode). The padding is -inf and must be smaller than the kernel, so
    that every window holds an input pixel. HF's Conv2DDownsample uses ``nn.MaxPool2d(3, 2)``
    with no padding (DeepMind's original pools with 'SAME' padding): a 112x112 map becomes
    55x55, not 56x56. No parameters."""
    x = _float_input("maxpool2d x", x)
    if x.ndim != 4:
        raise ValueError(f"maxpool2d x: expected shape [B, C, H, W], got {x.shape}")
    _keys("maxpool2d", params, [])
    kernel_, strides = _pair("maxpool2d kernel", kernel), _pair("maxpool2d stride", stride)
    pads = _pads("maxpool2d padding", padding)
    if max(pads[:2]) >= kernel_[0] or max(pads[2:]) >= kernel_[1]:
        raise ValueError(f"maxpool2d padding: each pad must be smaller than the kernel {kernel_}, got {pads}")
    padded_hw = _padded_hw("maxpool2d", x, pads, kernel_)
    xp = _pad(x, pads, -np.inf)  # [B, C, H, W] -> [B, C, Hp, Wp]
    win = _windows(xp, kernel_, strides)  # -> [B, C, Ho, Wo, kh, kw]
    flat = win.reshape(*win.shape[:4], -1)  # -> [B, C, Ho, Wo, kh*kw], row-major window order
    argmax = flat.argmax(axis=-1)  # the FIRST maximum of each window (torch's CPU tie rule)
    y = flat.max(axis=-1)  # -> [B, C, Ho, Wo]
    return y, MaxPoolCache(argmax, kernel_, (x.shape[2], x.shape[3]), padded_hw, strides, pads)


def maxpool2d_backward(dy: np.ndarray, cache: MaxPoolCache) -> tuple[np.ndarray, Params]:
    """dy: [B, C, Ho, Wo] -> dx: [B, C, H, W]: each output's gradient goes to its window's first
    maximum; a pixel that is the maximum of several overlapping windows gets their sum."""
    argmax, (kh, kw), x_hw, padded_hw, stride, pads = cache
    expect_shape("maxpool2d dy", dy, argmax.shape, "[B, C, Ho, Wo]")
    # in the forward pass this was y = flat[..., argmax]
    dflat = np.zeros((*dy.shape, kh * kw), dtype=dy.dtype)  # [B, C, Ho, Wo, kh*kw]
    np.put_along_axis(dflat, argmax[..., None], dy[..., None], axis=-1)
    # in the forward pass this was flat = windows of the padded input
    dxp = _windows_adjoint(dflat.reshape(*dy.shape, kh, kw), padded_hw, stride)  # -> [B, C, Hp, Wp]
    return _crop(dxp, pads, x_hw), {}  # -> [B, C, H, W]


# ---------------------------------------------------------------------------------------------
# Space to depth (HF's space_to_depth): blocks of pixels (and frames) become channels
# ---------------------------------------------------------------------------------------------


class SpaceToDepthCache(NamedTuple):
    x_shape: tuple[int, ...]  # [B, C, H, W] or [B, T, C, H, W]
    moved_shape: tuple[int, ...]  # [B, H/bs, W/bs, bs, bs, C] or [B, T/ts, H/bs, W/bs, ts, bs, bs, C]
    perm: tuple[int, ...]  # the forward's transpose of the split input


def space_to_depth_forward(
    x: np.ndarray, params: Params | None = None, *, temporal_block: int = 1, spatial_block: int = 1,
) -> tuple[np.ndarray, SpaceToDepthCache]:
    """HF's ``space_to_depth``: [B, C, H, W] -> [B, H/bs, W/bs, bs*bs*C] and
    [B, T, C, H, W] -> [B, T/ts, H/bs, W/bs, ts*bs*bs*C] (channels last, block offsets before
    channels). HF ignores the temporal block on 4-D input; here it must then be 1."""
    x = _float_input("space_to_depth x", x)
    _keys("space_to_depth", params, [])
    ts = _block("space_to_depth temporal_block", temporal_block)
    bs = _block("space_to_depth spatial_block", spatial_block)
    if x.ndim not in (4, 5) or (x.ndim == 4 and ts != 1):
        raise ValueError(f"space_to_depth x: expected shape [B, C, H, W] (with temporal_block 1) or "
                         f"[B, T, C, H, W], got {x.shape} with temporal_block {ts}")
    t = x.shape[1] if x.ndim == 5 else 1
    h, w = x.shape[-2:]
    if h % bs or w % bs or t % ts:
        raise ValueError(f"space_to_depth x: shape {x.shape} is not divisible by the blocks "
                         f"(temporal_block {ts}, spatial_block {bs})")
    if x.ndim == 4:
        b, c = x.shape[:2]
        split = x.reshape(b, c, h // bs, bs, w // bs, bs)  # [B, C, H, W] -> [B, C, H/bs, bs, W/bs, bs]
        perm: tuple[int, ...] = (0, 2, 4, 3, 5, 1)  # -> [B, H/bs, W/bs, bs, bs, C]
    else:
        b, c = x.shape[0], x.shape[2]
        # [B, T, C, H, W] -> [B, T/ts, ts, C, H/bs, bs, W/bs, bs]
        split = x.reshape(b, t // ts, ts, c, h // bs, bs, w // bs, bs)
        perm = (0, 1, 4, 6, 2, 5, 7, 3)  # -> [B, T/ts, H/bs, W/bs, ts, bs, bs, C]
    moved = split.transpose(perm)
    y = moved.reshape(*moved.shape[:x.ndim - 1], -1)  # -> [B, (T/ts,) H/bs, W/bs, (ts*)bs*bs*C]
    return y, SpaceToDepthCache(x.shape, moved.shape, perm)


def space_to_depth_backward(dy: np.ndarray, cache: SpaceToDepthCache) -> tuple[np.ndarray, Params]:
    """dy: the output's shape -> dx: the input's: the inverse permutation of the entries."""
    x_shape, moved_shape, perm = cache
    lead = len(x_shape) - 1  # B, (T/ts,) H/bs, W/bs
    expect_shape("space_to_depth dy", dy, (*moved_shape[:lead], int(np.prod(moved_shape[lead:]))),
                 "[B, (T/ts,) H/bs, W/bs, (ts*)bs*bs*C]")
    # in the forward pass this was y = split.transpose(perm).reshape(...)
    dsplit = dy.reshape(moved_shape).transpose(np.argsort(perm))  # -> the split input's shape
    return dsplit.reshape(x_shape), {}


# ---------------------------------------------------------------------------------------------
# 3x3 patches around every pixel (the optical-flow input)
# ---------------------------------------------------------------------------------------------


class PatchesCache(NamedTuple):
    x_shape: tuple[int, int, int, int]  # (B, C, H, W)
    size: int


def extract_patches_forward(
    x: np.ndarray, params: Params | None = None, *, size: int = 3,
) -> tuple[np.ndarray, PatchesCache]:
    """x: [B, C, H, W] -> [B, C*size*size, H, W]: the size x size patch around every pixel
    (stride 1, zero 'SAME' padding: (size-1)//2 before, size//2 after), with the channel order
    of ``tf.image.extract_patches`` on NHWC: channel (i*size + j)*C + c is pixel (i, j) of the
    patch, input channel c. HF's PerceiverForOpticalFlow takes [B, 2, 27, H, W], these patches
    of two RGB frames. No parameters."""
    x = _float_input("extract_patches x", x)
    if x.ndim != 4:
        raise ValueError(f"extract_patches x: expected shape [B, C, H, W], got {x.shape}")
    _keys("extract_patches", params, [])
    k = _block("extract_patches size", size)
    b, c, h, w = x.shape
    xp = _pad(x, same_padding((k, k)), 0.0)  # [B, C, H, W] -> [B, C, H+k-1, W+k-1]
    win = _windows(xp, (k, k), (1, 1))  # -> [B, C, H, W, k, k]
    y = win.transpose(0, 4, 5, 1, 2, 3).reshape(b, k * k * c, h, w)  # [B,k,k,C,H,W] -> [B, k*k*C, H, W]
    return y, PatchesCache((b, c, h, w), k)


def extract_patches_backward(dy: np.ndarray, cache: PatchesCache) -> tuple[np.ndarray, Params]:
    """dy: [B, C*size*size, H, W] -> dx: [B, C, H, W]: every patch entry's gradient added back to
    the pixel it copied (each pixel sits in up to size*size patches)."""
    (b, c, h, w), k = cache
    expect_shape("extract_patches dy", dy, (b, k * k * c, h, w), "[B, C*size*size, H, W]")
    # in the forward pass this was y = windows(pad(x)).transpose(0, 4, 5, 1, 2, 3).reshape(...)
    dwin = dy.reshape(b, k, k, c, h, w).transpose(0, 3, 4, 5, 1, 2)  # -> [B, C, H, W, k, k]
    pads = same_padding((k, k))
    dxp = _windows_adjoint(dwin, (h + k - 1, w + k - 1), (1, 1))  # -> [B, C, H+k-1, W+k-1]
    return _crop(dxp, pads, (h, w)), {}  # -> [B, C, H, W]


# ---------------------------------------------------------------------------------------------
# Concatenation (inputs with positions on channels; modalities on N)
# ---------------------------------------------------------------------------------------------


class ConcatCache(NamedTuple):
    sizes: tuple[int, ...]  # each input's length along the axis
    axis: int  # the axis, non-negative


def concat_forward(
    xs: list[np.ndarray], params: Params | None = None, *, axis: int = -1,
) -> tuple[np.ndarray, ConcatCache]:
    """xs: arrays of one dtype and ndim, equal but for ``axis`` -> y: their concatenation."""
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"concat xs: expected a non-empty list of arrays, got {type(xs).__name__}")
    first = _float_input("concat xs[0]", xs[0])
    if not -first.ndim <= axis < first.ndim:
        raise ValueError(f"concat axis: expected an axis of a {first.ndim}-D array, got {axis}")
    ax = axis % first.ndim
    _keys("concat", params, [])
    for i, x in enumerate(xs):
        _float_input(f"concat xs[{i}]", x)
        if x.dtype != first.dtype:
            raise TypeError(f"concat xs[{i}]: expected dtype {first.dtype.name} like xs[0], "
                            f"got {x.dtype.name}")
        want = [None if d == ax else s for d, s in enumerate(first.shape)]
        expect_shape(f"concat xs[{i}]", x, want, f"xs[0]'s shape but for axis {ax}")
    y = np.concatenate(xs, axis=ax)  # the sizes along ax add up
    return y, ConcatCache(tuple(x.shape[ax] for x in xs), ax)


def concat_backward(dy: np.ndarray, cache: ConcatCache) -> tuple[list[np.ndarray], Params]:
    """dy: the concatenation's shape -> [dx_0, dx_1, ...]: dy split back into the pieces."""
    sizes, ax = cache
    if dy.ndim <= ax or dy.shape[ax] != sum(sizes):
        raise ValueError(f"concat dy: expected {sum(sizes)} entries along axis {ax}, got shape {dy.shape}")
    return np.split(dy, np.cumsum(sizes)[:-1], axis=ax), {}


# ---------------------------------------------------------------------------------------------
# Trainable channel padding (HF's multimodal preprocessor)
# ---------------------------------------------------------------------------------------------


class PadChannelsCache(NamedTuple):
    channels: int  # C of the input


def pad_channels_forward(
    x: np.ndarray, params: Params, *, width: int,
) -> tuple[np.ndarray, PadChannelsCache]:
    """x: [B, N, C], pad [1, width - C] -> y: [B, N, width] = [x, pad] on the channels, the same
    trainable pad for every sample and position (HF's PerceiverMultimodalPreprocessor)."""
    x = _float_input("pad_channels x", x)
    if x.ndim != 3:
        raise ValueError(f"pad_channels x: expected shape [B, N, C], got {x.shape}")
    b, n, c = x.shape
    if not isinstance(width, (int, np.integer)) or isinstance(width, bool) or width < c:
        raise ValueError(f"pad_channels width: expected an int >= C = {c}, got {width!r}")
    _keys("pad_channels", params, ["pad"])
    pad = _param("pad_channels", params, "pad", x.dtype, (1, width - c), "[1, width - C]")
    fill = np.broadcast_to(pad[None], (b, n, width - c))  # [1, P] -> [B, N, P]
    return np.concatenate([x, fill], axis=-1), PadChannelsCache(c)  # -> [B, N, width]


def pad_channels_backward(dy: np.ndarray, cache: PadChannelsCache) -> tuple[np.ndarray, Params]:
    """dy: [B, N, width] -> dx: [B, N, C]; grads pad [1, P]: the sum over B and N."""
    c = cache.channels
    if dy.ndim != 3 or dy.shape[2] < c:
        raise ValueError(f"pad_channels dy: expected shape [B, N, width] with width >= {c}, got {dy.shape}")
    # in the forward pass this was y = concat([x, broadcast(pad)])
    dpad = dy[..., c:].sum(axis=(0, 1))[None]  # [B, N, P] -> [1, P]
    return dy[..., :c], {"pad": dpad}


# ---------------------------------------------------------------------------------------------
# Pixel subsampling (HF's prep_type="pixels")
# ---------------------------------------------------------------------------------------------


class SubsampleCache(NamedTuple):
    x_shape: tuple[int, ...]  # the input's shape
    keep: tuple[slice, ...]  # the forward's slicing


def subsample_pixels_forward(
    x: np.ndarray, params: Params | None = None, *, spatial: int = 1, temporal: int = 1,
) -> tuple[np.ndarray, SubsampleCache]:
    """HF's ``prep_type="pixels"`` slicing, reproduced exactly. For 4-D input that is
    ``x[::spatial, ::spatial]``, which on NCHW [B, C, H, W] keeps every spatial-th SAMPLE and
    every spatial-th CHANNEL and leaves H and W whole (HF's num_channels agrees:
    ceil(C / spatial)); for 5-D [B, T, C, H, W] it is ``x[:, ::temporal, :, ::spatial, ::spatial]``.
    HF ignores ``temporal`` on 4-D input; here it must then be 1. No parameters."""
    x = _float_input("subsample_pixels x", x)
    _keys("subsample_pixels", params, [])
    s = _block("subsample_pixels spatial", spatial)
    t = _block("subsample_pixels temporal", temporal)
    every = slice(None)
    if x.ndim == 4 and t == 1:
        keep: tuple[slice, ...] = (slice(None, None, s), slice(None, None, s))  # B and C, as HF
    elif x.ndim == 5:
        keep = (every, slice(None, None, t), every, slice(None, None, s), slice(None, None, s))
    else:
        raise ValueError(f"subsample_pixels x: expected shape [B, C, H, W] (with temporal 1) or "
                         f"[B, T, C, H, W], got {x.shape} with temporal {t}")
    return x[keep], SubsampleCache(x.shape, keep)


def subsample_pixels_backward(dy: np.ndarray, cache: SubsampleCache) -> tuple[np.ndarray, Params]:
    """dy: the output's shape -> dx: the input's, dy at the kept entries and 0 elsewhere."""
    x_shape, keep = cache
    dx = np.zeros(x_shape, dtype=dy.dtype)
    expect_shape("subsample_pixels dy", dy, dx[keep].shape, "the subsampled shape")
    dx[keep] = dy  # in the forward pass this was y = x[keep]
    return dx, {}
