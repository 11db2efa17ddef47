"""Losses with the layer contract, forward and backward by hand (docs/training.md derives them).

::

    loss, cache = softmax_cross_entropy_forward(logits, labels, label_smoothing=0.1)
    dlogits, _ = softmax_cross_entropy_backward(1.0, cache)    # dloss = 1 for L = loss itself

    loss, cache = mse_forward(pred, target, mask=mask)
    dpred, _ = mse_backward(1.0, cache)

``loss`` is a 0-d array in the dtype of the prediction (float32 or float64); ``dloss`` is the
upstream gradient ``dL/dloss``, a Python number or a 0-d array; the backward returns the gradient
of ``L = dloss * loss`` and ``{}`` (a loss has no parameters). Shapes are written ``[...]`` for
any leading shape (``[B]`` for a classifier, ``[B, O]`` for a Perceiver IO decoder) and ``K`` for
the number of classes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import Params
from .shapes import FLOAT_DTYPES, as_real_input, expect_shape

# ---------------------------------------------------------------------------------------------
# Argument checks shared by the losses
# ---------------------------------------------------------------------------------------------


def _float_array(name: str, value: object) -> np.ndarray:
    """``value`` as a float32/float64 ndarray with finite entries, else an error naming ``name``."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {value.dtype.name}")
    if value.ndim == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got shape {value.shape}")
    if not np.isfinite(value).all():
        bad = np.argwhere(~np.isfinite(value))[0]
        raise ValueError(f"{name}: contains NaN or infinity (first at index {tuple(int(i) for i in bad)})")
    return value


def _labels(logits: np.ndarray, labels: object, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate integer ``labels [...]`` against ``logits [..., K]``.

    Returns ``(safe, keep)``: ``keep [...]`` is False where ``labels == ignore_index``; ``safe``
    is ``labels`` with the ignored positions set to class 0, so it can index the K axis.
    """
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer)
    ):
        raise TypeError(f"ignore_index: expected an int or None, got {type(ignore_index).__name__}")
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"labels: expected an integer dtype (class indices), got {arr.dtype.name}; "
            "convert explicitly, e.g. labels.astype(np.int64)"
        )
    expect_shape("labels", arr, logits.shape[:-1], "[...] (the leading shape of logits [..., K])")
    k = logits.shape[-1]
    keep = np.ones(arr.shape, dtype=bool) if ignore_index is None else arr != ignore_index
    bad = keep & ((arr < 0) | (arr >= k))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = f"[0, {k})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"labels: expected values in {allowed}, got {arr[where]} at index {where}")
    return np.where(keep, arr, 0), keep


def _dloss(dloss: object, dtype: np.dtype) -> np.ndarray:
    """The upstream scalar gradient as a 0-d array of ``dtype``."""
    arr = as_real_input("dloss", dloss, dtype)
    if arr.shape != ():
        raise ValueError(f"dloss: expected a scalar (shape ()), got shape {arr.shape}")
    return arr


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy with label smoothing and ignored positions
# ---------------------------------------------------------------------------------------------


class CrossEntropyCache(NamedTuple):
    p: np.ndarray  # [..., K] softmax of the logits
    target: np.ndarray  # [..., K] the smoothed one-hot target distribution (each row sums to 1)
    keep: np.ndarray  # [...] bool, False at positions whose label is ignore_index
    n_kept: int  # kept positions, the denominator of the mean


def softmax_cross_entropy_forward(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, CrossEntropyCache]:
    """Mean cross-entropy between ``softmax(logits)`` and smoothed one-hot targets.

    logits: float ``[..., K]``; labels: integer ``[...]`` with values in ``[0, K)`` or equal to
    ``ignore_index`` -> loss: 0-d array in the logits' dtype.

    ``target = (1 - eps) * onehot(label) + eps / K`` with ``eps = label_smoothing`` in [0, 1]
    (torch.nn.functional.cross_entropy's definition); the loss is
    ``mean over kept positions of -sum_k target_k * log softmax(logits)_k``, the kept positions
    being those whose label is not ``ignore_index`` (``None``: every position). With no kept
    position the loss is 0 (torch returns NaN there). ``log softmax`` is ``z - log sum exp z``
    with ``z = logits - max(logits)``, so no exp() overflows.
    """
    logits = _float_array("logits", logits)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits: expected K >= 1 classes on the last axis, got shape {logits.shape}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    safe, keep = _labels(logits, labels, ignore_index)
    k = logits.shape[-1]
    dt = logits.dtype.type

    z = logits - logits.max(axis=-1, keepdims=True)  # [..., K], max 0 per row
    lse = np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [..., K] -> [..., 1], in [0, log K]
    logp = z - lse  # [..., K] log softmax
    p = np.exp(logp)
    onehot = np.arange(k) == safe[..., None]  # [...] -> [..., K] bool
    target = dt(1.0 - label_smoothing) * onehot + dt(label_smoothing / k)  # [..., K]
    per_position = -(target * logp).sum(axis=-1)  # [..., K] -> [...]
    n_kept = int(keep.sum())
    total = np.where(keep, per_position, dt(0.0)).sum()  # [...] -> ()
    loss = np.asarray(total / dt(max(n_kept, 1)), dtype=logits.dtype)  # 0 when nothing is kept
    return loss, CrossEntropyCache(p, target, keep, n_kept)


def softmax_cross_entropy_backward(dloss: object, cache: CrossEntropyCache) -> tuple[np.ndarray, Params]:
    """dloss: scalar -> dlogits ``[..., K] = dloss * (p - target) / n_kept`` at kept positions,
    zero rows at ignored ones; grads ``{}``."""
    p, target, keep, n_kept = cache
    g = _dloss(dloss, p.dtype)
    # in the forward pass this was loss = sum_kept(-sum_k target_k log p_k) / n_kept
    dlogits = (p - target) * (g / p.dtype.type(max(n_kept, 1)))  # [..., K]
    return np.where(keep[..., None], dlogits, p.dtype.type(0.0)), {}  # ignored rows: exactly +0


def accuracy(logits: np.ndarray, labels: np.ndarray, ignore_index: int | None = None) -> float:
    """Fraction of kept positions whose ``argmax(logits)`` equals the label.

    logits: float ``[..., K]``, labels: integer ``[...]`` as in
    :func:`softmax_cross_entropy_forward`. Ties go to the lowest class index (``np.argmax``).
    With every position ignored the accuracy is undefined: ValueError.
    """
    logits = _float_array("logits", logits)
    _, keep = _labels(logits, labels, ignore_index)
    count = int(keep.sum())
    if count == 0:
        raise ValueError(
            f"labels: every position equals ignore_index={ignore_index}; "
            "accuracy over no positions is undefined"
        )
    hits = (logits.argmax(axis=-1) == np.asarray(labels)) & keep  # [..., K] -> [...]
    return int(hits.sum()) / count


# ---------------------------------------------------------------------------------------------
# Mean squared error, optionally over the masked elements only
# ---------------------------------------------------------------------------------------------


class MSECache(NamedTuple):
    diff: np.ndarray  # [..., F] pred - target
    mask: np.ndarray | None  # [..., F] bool, True where counted; None: every element counts
    n_counted: int  # elements counted, the denominator of the mean


def mse_forward(
    pred: np.ndarray, target: object, *, mask: np.ndarray | None = None
) -> tuple[np.ndarray, MSECache]:
    """Mean of ``(pred - target)^2`` over the counted elements.

    pred: float ``[..., F]``; target: real ``[..., F]``, cast to pred's dtype; mask: bool, either
    ``[..., F]`` (one flag per element) or ``[...]`` (one flag per position, broadcast over the
    last axis F) -> loss: 0-d array in pred's dtype. True = counted. Without a mask every element
    counts (torch.nn.functional.mse_loss's mean). With no element counted the loss is 0.
    """
    pred = _float_array("pred", pred)
    target = as_real_input("target", target, pred.dtype)
    expect_shape("target", target, pred.shape, "[..., F] (the shape of pred)")
    diff = pred - target
    squared = diff * diff  # [..., F]
    n_counted = pred.size
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask: expected dtype bool (True = counted), got {mask.dtype.name}")
        if mask.shape == pred.shape[:-1]:
            mask = np.broadcast_to(mask[..., None], pred.shape)  # [...] -> [..., F]
        elif mask.shape != pred.shape:
            raise ValueError(
                f"mask: expected shape [..., F] = {pred.shape} or [...] = {pred.shape[:-1]}, "
                f"got {mask.shape}"
            )
        squared = np.where(mask, squared, pred.dtype.type(0.0))
        n_counted = int(mask.sum())
    loss = squared.sum() / pred.dtype.type(max(n_counted, 1))  # [..., F] -> (), 0 when nothing counts
    return np.asarray(loss, dtype=pred.dtype), MSECache(diff, mask, n_counted)


def mse_backward(dloss: object, cache: MSECache) -> tuple[np.ndarray, Params]:
    """dloss: scalar -> dpred ``[..., F] = dloss * 2 * (pred - target) / n_counted`` where counted,
    exactly 0 elsewhere; grads ``{}``."""
    diff, mask, n_counted = cache
    dt = diff.dtype.type
    g = _dloss(dloss, diff.dtype)
    # in the forward pass this was loss = sum(diff^2 over the counted elements) / n_counted
    dpred = diff * (dt(2.0) * g / dt(max(n_counted, 1)))
    if mask is not None:
        dpred = np.where(mask, dpred, dt(0.0))
    return dpred, {}
