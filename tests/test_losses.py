"""The losses: forward against definitions and torch, backward against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from perceiver_np import losses
from perceiver_np.gradcheck import check_layer
from perceiver_np.tolerances import FLOAT64_RTOL, GRADCHECK_RTOL

TORCH_REASON = "torch is the compare extra: pip install -e '.[compare]'"


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(float).tiny))


def _labels(rng, shape, k, ignore_index=None, n_ignored=0):
    labels = rng.integers(0, k, size=shape)
    if n_ignored:
        flat = labels.reshape(-1)
        flat[rng.choice(flat.size, size=n_ignored, replace=False)] = ignore_index
    return labels


# --- softmax cross-entropy: forward ------------------------------------------------------------


def test_cross_entropy_is_mean_negative_log_likelihood(rng):
    logits, labels = rng.normal(size=(2, 4, 6)), rng.integers(0, 6, size=(2, 4))
    loss, _ = losses.softmax_cross_entropy_forward(logits, labels)
    logp = log_softmax(logits, axis=-1)
    want = -np.take_along_axis(logp, labels[..., None], axis=-1).mean()
    assert loss.shape == () and loss.dtype == np.float64
    assert _rel(loss, want) <= FLOAT64_RTOL


def test_cross_entropy_ignored_positions_drop_out_of_the_mean(rng):
    logits = rng.normal(size=(3, 5, 4))
    labels = _labels(rng, (3, 5), 4, ignore_index=-1, n_ignored=6)
    keep = labels != -1
    for eps in (0.0, 0.3):
        loss, _ = losses.softmax_cross_entropy_forward(
            logits, labels, label_smoothing=eps, ignore_index=-1
        )
        kept, _ = losses.softmax_cross_entropy_forward(logits[keep], labels[keep], label_smoothing=eps)
        assert _rel(loss, kept) <= FLOAT64_RTOL
    dlogits, _ = losses.softmax_cross_entropy_backward(0.7, losses.softmax_cross_entropy_forward(
        logits, labels, ignore_index=-1)[1])
    assert np.all(dlogits[~keep] == 0.0) and np.all(dlogits[keep] != 0.0)


def test_cross_entropy_all_ignored_is_zero_not_nan(rng):
    logits, labels = rng.normal(size=(2, 3, 5)), np.full((2, 3), 7)
    loss, cache = losses.softmax_cross_entropy_forward(
        logits, labels, label_smoothing=0.1, ignore_index=7
    )
    dlogits, grads = losses.softmax_cross_entropy_backward(1.3, cache)
    assert loss == 0.0 and loss.shape == ()
    assert np.all(dlogits == 0.0) and not np.signbit(dlogits).any()  # +0, not -0
    assert dlogits.shape == logits.shape and grads == {}


def test_cross_entropy_is_stable_for_huge_logits():
    for dtype in (np.float32, np.float64):
        logits = np.array([[1000.0, 0.0], [0.0, 1000.0]], dtype=dtype)
        # log softmax = logit - 1000 - log(1 + e^-1000) = logit - 1000 exactly in floating point
        loss, cache = losses.softmax_cross_entropy_forward(logits, np.array([1, 1]))
        assert loss.dtype == dtype and loss == 500.0
        dlogits, _ = losses.softmax_cross_entropy_backward(1.0, cache)
        assert dlogits.dtype == dtype
        assert np.array_equal(dlogits, np.array([[0.5, -0.5], [0.0, 0.0]], dtype=dtype))


def test_cross_entropy_smoothed_target_rows_sum_to_one(rng):
    _, cache = losses.softmax_cross_entropy_forward(
        rng.normal(size=(4, 7)), rng.integers(0, 7, size=4), label_smoothing=0.25
    )
    assert np.abs(cache.target.sum(-1) - 1).max() <= 4 * np.finfo(float).eps
    assert np.allclose(cache.target.min(-1), 0.25 / 7, rtol=FLOAT64_RTOL, atol=0)


# --- softmax cross-entropy: backward -------------------------------------------------------------


def _check(forward, backward, x, **opts):
    # check_layer draws the upstream gradient dloss at random (seeded, standard normal), not 1
    report = check_layer(forward, backward, x, **opts)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5)])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("ignore", [None, -100])
def test_cross_entropy_backward(rng, shape, eps, ignore):
    labels = _labels(rng, shape[:-1], shape[-1], ignore, n_ignored=0 if ignore is None else 2)

    def fwd(x, p, **kw):
        return losses.softmax_cross_entropy_forward(x, labels, label_smoothing=eps, ignore_index=ignore)

    _check(fwd, losses.softmax_cross_entropy_backward, 2 * rng.normal(size=shape), max_entries=40)


@pytest.mark.parametrize("shape", [(6, 5), (2, 4, 5)])
@pytest.mark.parametrize("eps", [0.0, 0.15])
@pytest.mark.parametrize("ignore", [None, -100, 3])
def test_cross_entropy_equals_torch(rng, shape, eps, ignore):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    k = shape[-1]
    logits = 3 * rng.normal(size=shape)
    labels = _labels(rng, shape[:-1], k, ignore, n_ignored=0 if ignore is None else 3)
    dloss = -0.37
    loss, cache = losses.softmax_cross_entropy_forward(
        logits, labels, label_smoothing=eps, ignore_index=ignore
    )
    dlogits, _ = losses.softmax_cross_entropy_backward(dloss, cache)

    t_logits = torch.from_numpy(logits).requires_grad_()
    # torch wants the classes on axis 1: [B, K] or [B, K, O]
    t_in = t_logits if t_logits.ndim == 2 else t_logits.movedim(-1, 1)
    t_loss = torch.nn.functional.cross_entropy(
        t_in, torch.from_numpy(labels.astype(np.int64)), label_smoothing=eps,
        ignore_index=-100 if ignore is None else ignore,
    )
    t_loss.backward(torch.tensor(dloss, dtype=torch.float64))
    assert _rel(loss, t_loss.detach().numpy()) <= FLOAT64_RTOL
    assert _rel(dlogits, t_logits.grad.numpy()) <= FLOAT64_RTOL


# --- softmax cross-entropy: errors -----------------------------------------------------------------


def test_cross_entropy_errors_name_the_argument(rng):
    logits = rng.normal(size=(3, 4))
    ce = losses.softmax_cross_entropy_forward
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 4\), got 4 at index \(1,\)"):
        ce(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 4\) or ignore_index=-100, got -1"):
        ce(logits, np.array([0, -1, -100]), ignore_index=-100)
    with pytest.raises(TypeError, match=r"labels: expected an integer dtype .* got float64"):
        ce(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels: expected shape \[\.\.\.\] .* = \(3,\), got \(3, 1\)"):
        ce(logits, np.zeros((3, 1), dtype=np.int64))
    with pytest.raises(TypeError, match="ignore_index: expected an int or None, got float"):
        ce(logits, np.zeros(3, dtype=np.int64), ignore_index=-1.0)
    with pytest.raises(ValueError, match=r"label_smoothing: expected a value in \[0, 1\], got 1.5"):
        ce(logits, np.zeros(3, dtype=np.int64), label_smoothing=1.5)
    with pytest.raises(TypeError, match="logits: expected dtype float32 or float64, got int64"):
        ce(np.zeros((3, 4), dtype=np.int64), np.zeros(3, dtype=np.int64))
    bad = logits.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"logits: contains NaN or infinity \(first at index \(2, 1\)\)"):
        ce(bad, np.zeros(3, dtype=np.int64))
    _, cache = ce(logits, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"dloss: expected a scalar \(shape \(\)\), got shape \(3,\)"):
        losses.softmax_cross_entropy_backward(np.ones(3), cache)


# --- accuracy --------------------------------------------------------------------------------------


def test_accuracy_counts_kept_positions():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    # argmax: 1, 0, 2, 0 (a tie goes to the lower class)
    assert losses.accuracy(logits, np.array([1, 0, 0, 0])) == 0.75
    assert losses.accuracy(logits, np.array([1, -1, 0, -1]), ignore_index=-1) == 0.5
    with pytest.raises(ValueError, match="labels: every position equals ignore_index=-1"):
        losses.accuracy(logits, np.full(4, -1), ignore_index=-1)


# --- mean squared error ------------------------------------------------------------------------------


def _masks(rng, shape):
    row = rng.random(shape[:-1]) < 0.6
    row.reshape(-1)[0] = True
    full = rng.random(shape) < 0.6
    return {"none": None, "full": full, "row": row}


@pytest.mark.parametrize("kind", ["none", "full", "row"])
def test_mse_backward(rng, kind):
    shape = (2, 3, 4)
    mask, target = _masks(rng, shape)[kind], rng.normal(size=shape)

    def fwd(x, p, **kw):
        return losses.mse_forward(x, target, mask=mask)

    _check(fwd, losses.mse_backward, rng.normal(size=shape))


@pytest.mark.parametrize("kind", ["none", "full", "row"])
def test_mse_equals_torch(rng, kind):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    shape = (2, 3, 4)
    pred, target = rng.normal(size=shape), rng.normal(size=shape)
    mask = _masks(rng, shape)[kind]
    dloss = 1.7
    loss, cache = losses.mse_forward(pred, target, mask=mask)
    dpred, grads = losses.mse_backward(dloss, cache)

    t_pred = torch.from_numpy(pred).requires_grad_()
    t_target = torch.from_numpy(target)
    if mask is not None:  # torch has no mask: select the counted elements (a row mask selects rows)
        t_sel = torch.from_numpy(mask)
        t_loss = torch.nn.functional.mse_loss(t_pred[t_sel], t_target[t_sel])
    else:
        t_loss = torch.nn.functional.mse_loss(t_pred, t_target)
    t_loss.backward(torch.tensor(dloss, dtype=torch.float64))
    assert grads == {}
    assert _rel(loss, t_loss.detach().numpy()) <= FLOAT64_RTOL
    assert _rel(dpred, t_pred.grad.numpy()) <= FLOAT64_RTOL


def test_mse_nothing_counted_is_zero(rng):
    pred = rng.normal(size=(2, 3))
    loss, cache = losses.mse_forward(pred, np.zeros((2, 3)), mask=np.zeros(2, dtype=bool))
    dpred, _ = losses.mse_backward(2.0, cache)
    assert loss == 0.0 and np.all(dpred == 0.0) and not np.signbit(dpred).any()


def test_mse_keeps_float32_and_casts_an_integer_target():
    pred = np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.float32)
    loss, cache = losses.mse_forward(pred, np.array([[1, 2], [3, 3]]))
    assert loss.dtype == np.float32 and loss == 1.0
    dpred, _ = losses.mse_backward(1.0, cache)
    assert dpred.dtype == np.float32 and np.array_equal(dpred, np.array([[0, 0], [0, 1]], np.float32))


def test_mse_errors_name_the_argument(rng):
    pred = rng.normal(size=(2, 3))
    with pytest.raises(ValueError, match=r"target: expected shape .* = \(2, 3\), got \(3, 2\)"):
        losses.mse_forward(pred, np.zeros((3, 2)))
    with pytest.raises(TypeError, match=r"mask: expected dtype bool .* got int64"):
        losses.mse_forward(pred, np.zeros((2, 3)), mask=np.ones((2, 3), dtype=np.int64))
    message = r"mask: expected shape \[\.\.\., F\] = \(2, 3\) or \[\.\.\.\] = \(2,\), got \(3,\)"
    with pytest.raises(ValueError, match=message):
        losses.mse_forward(pred, np.zeros((2, 3)), mask=np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match=r"pred: expected a numpy\.ndarray, got list"):
        losses.mse_forward([1.0, 2.0], np.zeros(2))
    _, cache = losses.mse_forward(pred, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"dloss: nan is not finite"):
        losses.mse_backward(float("nan"), cache)
