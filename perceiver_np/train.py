"""Training without autograd: the step, evaluation and the loop.

::

    state = init_state(model, optimizer)
    value, metrics, state = train_step(model, batch, loss, optimizer, state, rng, clip_norm=1.0)

One step is forward, loss, backward, global-norm clipping and the optimizer's update, all
explicit (docs/training.md walks through it). Everything is pure and seeded: the same seed
gives bit-identical parameters after any number of steps, and :func:`fit` resumed from a
checkpoint continues exactly like an uninterrupted run.

A batch is a dict of arrays: ``x`` [B, N, C], ``y`` (labels [B] for classification, targets
[B, O, out] for the query decoder), optional ``mask`` [B, N], ``queries`` [B, O, Cq] and
``query_mask`` [B, O].

The model may also be a published Perceiver (:class:`perceiver_np.pretrained.PretrainedPerceiver`,
fine-tuning): ``x`` is then what its HF class takes (int token ids [B, N] with an optional
``mask`` [B, N], pixel values [B, 3, H, W], flow frames [B, 2, 3, H, W]) and ``y`` what its
logits are compared with: labels [B] for the classifiers (logits [B, K]), labels [B, O] for the
masked language model (logits [B, O, V], O = max_position_embeddings; ``Loss(ignore_index=...)``
for the positions not masked), targets [B, H, W, 2] for optical flow (``Loss("mse")``). Its
buffers (batch norm's running statistics) are not trained. The multimodal autoencoder (inputs
and logits are dicts) is not supported here.

Guards (docs/training.md): a step whose prediction, loss, gradients, updated parameters or
optimizer state hold NaN or infinity raises :class:`NonFiniteError` naming the step and the first
such tensor, before anything is logged or saved; :func:`fit` stores its settings in every
checkpoint and refuses to resume with other ones; arguments that would make it do nothing are
refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import losses
from .checkpoint import differences, load_checkpoint, save_checkpoint
from .model import Perceiver
from .optim import Optimizer, clip_by_global_norm, global_norm
from .pretrained import PretrainedPerceiver
from .shapes import OverflowRisk

__all__ = [
    "Batch", "History", "Loss", "Model", "NonFiniteError", "Params", "TrainState", "batches", "evaluate",
    "fit", "init_state", "loss_and_grads", "train_step",
]

Params = dict[str, np.ndarray]
Batch = Mapping[str, np.ndarray]
#: What trains here: a Perceiver, or a published one (fine-tuning).
Model = Perceiver | PretrainedPerceiver
#: The most entries of the zero prediction the targets are checked with at once (float64: 128 MiB);
#: a larger dataset's targets are checked in chunks of samples (a masked language model's
#: logits [S, 2048, 262] hold 0.5 M entries a sample).
_CHECK_ENTRIES = 1 << 24


class NonFiniteError(FloatingPointError):
    """A training step produced NaN or infinity; raised at that step, before its update is kept.

    ``step`` is the update the step would have applied, counted from 1 (the ``state.step`` it
    would have produced, the ``step`` column of the log); ``epoch`` is the epoch counted from 1
    (set by :func:`fit`, ``None`` from :func:`train_step`); ``tensor`` names the first non-finite
    value in the order they are computed: ``"<block> output"`` (the model's forward found that
    block's output overflowed, e.g. ``"self.0 output"``), ``"pred"`` (the model's output), ``"loss"``,
    ``"grads['<param>']"``, ``"grad_norm"`` (every gradient entry finite, but their global norm
    overflows float64), ``"params['<param>']"`` and ``"opt_state['<slot>/<param>']"`` after the
    update. ``detail`` says how (e.g. ``"is not finite (3 NaN and 0 infinite of 48 entries)"``).
    """

    def __init__(self, step: int, tensor: str, detail: str, epoch: int | None = None, note: str = "") -> None:
        self.step, self.tensor, self.detail, self.epoch, self.note = step, tensor, detail, epoch, note
        where = f"step {step}" if epoch is None else f"step {step} (epoch {epoch})"
        super().__init__(f"{where}: {tensor} {detail}" + (f"; {note}" if note else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.tensor, self.detail, self.epoch, self.note))


def _nonfinite(value: np.ndarray) -> str | None:
    """None when every entry of ``value`` is finite, else what is not: ``"(inf)"`` for one
    value, ``"(3 NaN and 1 infinite of 48 entries)"`` for more.

    One sum per tensor and no temporary in the usual case: a NaN or infinite entry makes the sum
    non-finite. Only when the sum is not finite (a bad entry, or finite entries whose sum
    overflows) are the entries looked at one by one."""
    if value.dtype.kind not in "fc":
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(value.sum()):
            return None
    finite = np.isfinite(value)
    if finite.all():
        return None
    if value.size == 1:
        return f"({value.item()})"
    nan = int(np.isnan(value).sum())
    return f"({nan} NaN and {value.size - int(finite.sum()) - nan} infinite of {value.size} entries)"


@dataclass(frozen=True)
class Loss:
    """A loss by name, with its options: ``"cross_entropy"`` (logits [..., K] against integer
    labels [...]; ``label_smoothing``, ``ignore_index``) or ``"mse"`` (against targets of the
    prediction's shape; the batch's ``query_mask`` masks outputs)."""

    name: str = "cross_entropy"
    label_smoothing: float = 0.0
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ("cross_entropy", "mse"):
            raise ValueError(f"loss: expected 'cross_entropy' or 'mse', got {self.name!r}")

    def forward(self, pred: np.ndarray, batch: Batch) -> tuple[np.ndarray, Any]:
        if self.name == "cross_entropy":
            return losses.softmax_cross_entropy_forward(
                pred, batch["y"], label_smoothing=self.label_smoothing, ignore_index=self.ignore_index
            )
        return losses.mse_forward(pred, batch["y"], mask=batch.get("query_mask"))

    def backward(self, dloss: float, cache: Any) -> np.ndarray:
        """dloss (the upstream gradient of the scalar loss, 1 for a training step) -> the
        gradient w.r.t. the prediction, shaped like it: the layers' ``backward(dy, cache)``."""
        if self.name == "cross_entropy":
            return losses.softmax_cross_entropy_backward(dloss, cache)[0]
        return losses.mse_backward(dloss, cache)[0]

    def metrics(self, pred: np.ndarray, batch: Batch) -> dict[str, float]:
        """Accuracy for the cross-entropy (of the positions not ignored; none when all are)."""
        labels = np.asarray(batch["y"])
        some_kept = self.ignore_index is None or bool((labels != self.ignore_index).any())
        if self.name == "cross_entropy" and some_kept:
            return {"accuracy": losses.accuracy(pred, labels, self.ignore_index)}
        return {}


@dataclass(frozen=True)
class TrainState:
    params: Params
    opt_state: dict[str, np.ndarray]
    step: int = 0


def init_state(model: Model, optimizer: Optimizer) -> TrainState:
    """The state before the first step: the model's parameters (a published model's buffers
    stay with the model: they are not trained) and the optimizer's fresh state."""
    return TrainState(dict(model.params), optimizer.init(model.params), 0)


def _check_model(model: object) -> None:
    """A model the step can train: a Perceiver, or a published one whose inputs and logits are
    arrays (not the multimodal autoencoder's dicts)."""
    if isinstance(model, Perceiver):
        return
    if not isinstance(model, PretrainedPerceiver):
        raise TypeError(f"model: expected a Perceiver or a PretrainedPerceiver, got {type(model).__name__}")
    if model.architecture == "PerceiverForMultimodalAutoencoding":
        raise ValueError("model: PerceiverForMultimodalAutoencoding takes a dict of inputs and returns a "
                         "dict of logits, which a batch of arrays and train.Loss do not describe; fine-tune "
                         "it with its forward and backward directly")


def _forward(model: Model, batch: Batch, training: bool, rng: np.random.Generator | None):
    if isinstance(model, PretrainedPerceiver):
        return model.forward(batch["x"], batch.get("mask"), training=training, rng=rng)
    return model.forward(batch["x"], batch.get("mask"), training=training, rng=rng,
                         queries=batch.get("queries"), query_mask=batch.get("query_mask"))


def _backward(model: Model, dpred: np.ndarray, cache: Any) -> Params:
    """The parameters' gradients (a Perceiver's ``param_grads``: its backward without dx)."""
    if isinstance(model, PretrainedPerceiver):
        return model.backward(dpred, cache)
    return model.param_grads(dpred, cache)  # the input is data: no dx


def loss_and_grads(
    model: Model, params: Params, batch: Batch, loss: Loss, rng: np.random.Generator
) -> tuple[float, dict[str, float], Params]:
    """Forward in training mode (dropout from ``rng``), the loss, and the gradient of the loss
    w.r.t. every parameter: what one training step uses. ``model`` gives the architecture (and
    a published model's buffers), ``params`` the values."""
    _check_model(model)
    return _loss_and_grads(model, params, batch, loss, rng, None)


def _loss_and_grads(
    model: Model, params: Params, batch: Batch, loss: Loss, rng: np.random.Generator,
    step: int | None,
) -> tuple[float, dict[str, float], Params]:
    """:func:`loss_and_grads`; with ``step`` given, a forward that overflows, or a prediction or
    loss that is not finite, is a :class:`NonFiniteError` at that step (checked before the loss,
    resp. before the backward)."""
    m = model.with_params(params)  # checks params, their values scanned once
    # the step's own model: its forward and backward need not scan the parameters again
    held = m.holding_params(scan=False) if isinstance(m, Perceiver) else contextlib.nullcontext()
    with held:
        return _held_loss_and_grads(m, batch, loss, rng, step)


def _held_loss_and_grads(
    m: Model, batch: Batch, loss: Loss, rng: np.random.Generator, step: int | None
) -> tuple[float, dict[str, float], Params]:
    """:func:`_loss_and_grads` on the step's model ``m`` (parameters checked)."""
    try:
        pred, cache = _forward(m, batch, True, rng)
    except OverflowRisk as err:
        # the model names what overflowed (a block's output) or could overflow (the input
        # projection, once its weights have grown) from finite values: in a training step, the
        # run diverging
        if step is None:
            raise
        raise NonFiniteError(step, err.tensor, f"overflowed, or would: {err.detail}") from err
    if step is not None:
        _raise_if_nonfinite(step, "pred", pred)
    value, loss_cache = loss.forward(pred, batch)
    if step is not None:
        _raise_if_nonfinite(step, "loss", value)
    dpred = loss.backward(1.0, loss_cache)  # the step minimises the loss itself: dL/dL = 1
    grads = _backward(m, dpred, cache)
    return float(value), loss.metrics(pred, batch), grads


def _raise_if_nonfinite(step: int, label: str, value: np.ndarray, when: str = "") -> None:
    """:class:`NonFiniteError` at ``step`` naming ``label`` when ``value`` holds NaN or infinity."""
    counts = _nonfinite(np.asarray(value))
    if counts is not None:
        raise NonFiniteError(step, label, f"is not finite{when} {counts}")


def train_step(
    model: Model,
    batch: Batch,
    loss: Loss,
    optimizer: Optimizer,
    state: TrainState,
    rng: np.random.Generator,
    *,
    clip_norm: float | None = None,
) -> tuple[float, dict[str, float], TrainState]:
    """forward -> loss -> backward -> clip -> update. Returns (loss, metrics, new state);
    ``metrics`` includes the gradient's global norm before clipping (:func:`optim.global_norm`).

    Guard: the prediction [B, ...], the loss, every gradient, then (after the update) every
    parameter and optimizer-state array must be finite; the first that is not raises
    :class:`NonFiniteError` naming step ``state.step + 1`` and that tensor, so a returned state
    is always finite. The cost is the global norm (for the gradients), one scan of the parameters
    (the step's model, :meth:`Perceiver.holding_params`) and one sum per new parameter and slot
    (:func:`_nonfinite`).
    """
    _check_model(model)
    step = state.step + 1
    # the kernels' activations, caches and gradients come from the model's step arena, the same
    # memory every step (perceiver_np.workspace): nothing of them may outlive the step
    arena = model.step_arena()
    with arena.step():
        value, metrics, params, opt_state, norm = _step(model, batch, loss, optimizer, state, rng,
                                                        step, clip_norm)
    # the optimizer's outputs are new arrays; one that were (a view of) the arena's memory
    # (an optimizer returning a gradient as is) is copied out before the next step writes it
    params = {k: v.copy() if arena.owns(v) else v for k, v in params.items()}
    opt_state = {k: v.copy() if arena.owns(v) else v for k, v in opt_state.items()}
    return value, {"loss": value, "grad_norm": norm, **metrics}, TrainState(params, opt_state, step)


def _step(
    model: Model, batch: Batch, loss: Loss, optimizer: Optimizer, state: TrainState,
    rng: np.random.Generator, step: int, clip_norm: float | None,
) -> tuple[float, dict[str, float], Params, dict[str, np.ndarray], float]:
    """:func:`train_step`'s forward, loss, backward, clip and update, and its guards: (loss,
    metrics, new params, new optimizer state, the gradient's global norm)."""
    value, metrics, grads = _loss_and_grads(model, state.params, batch, loss, rng, step)
    norm = global_norm(grads)  # float64; finite exactly when every entry is and it does not overflow
    if not math.isfinite(norm):
        for name, g in grads.items():
            _raise_if_nonfinite(step, f"grads[{name!r}]", g)
        big = max(grads, key=lambda k: float(np.abs(grads[k]).max(initial=0.0)))
        raise NonFiniteError(
            step, "grad_norm", f"overflows float64: every gradient entry is finite, the largest |g| is "
            f"{float(np.abs(grads[big]).max()):.3g} in grads[{big!r}]"
        )
    if clip_norm is not None:
        grads, _ = clip_by_global_norm(grads, clip_norm)
    params, opt_state = optimizer.update(state.params, grads, state.opt_state)
    for name, p in params.items():
        _raise_if_nonfinite(step, f"params[{name!r}]", p, " after the update")
    for name, slot in opt_state.items():
        _raise_if_nonfinite(step, f"opt_state[{name!r}]", slot, " after the update")
    return value, metrics, params, opt_state, norm


def batches(data: Batch, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[dict]:
    """Mini-batches of a dataset given as a dict of arrays with a common first axis; shuffled
    by ``rng`` (one permutation per call), in order without it. The last batch may be smaller.
    ``batch_size`` and ``data`` are checked when called, before the first batch."""
    _check_int("batch_size", batch_size, 1)
    n = _check_data("data", data, needs_y=False)
    return _batches(data, n, int(batch_size), rng)


def _batches(data: Batch, n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[dict]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def evaluate(model: Model, params: Params, data: Batch, loss: Loss, batch_size: int = 256, *,
             name: str = "data") -> dict:
    """The loss and metrics over a whole dataset, averaged over samples (inference mode).
    ``data`` needs ``x`` and ``y`` with at least one sample; ``batch_size`` an integer >= 1;
    ``name``: what errors call the dataset."""
    _check_model(model)
    _check_int("batch_size", batch_size, 1)
    _check_data(name, data, needs_y=True, model=model)  # the data's error first, then the params'
    totals: dict[str, float] = {}
    count = 0
    for n, sums in batch_sums(model.with_params(params), data, loss, int(batch_size), name=name):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v
        count += n
    return {k: v / count for k, v in totals.items()}


def batch_sums(model: Model, data: Batch, loss: Loss, batch_size: int, *,
               name: str = "data") -> list[tuple[int, dict[str, float]]]:
    """Per batch of ``data`` (in order, inference mode): (samples in the batch, the loss and each
    metric times those samples). :func:`evaluate` is their sum over the batches divided by the
    sample count; the distributed evaluation (:mod:`perceiver_np.distributed`) keeps them per
    shard and sums them in shard order. ``data`` is checked against ``model``; an error in a
    batch names ``name`` and the batch's first sample."""
    _check_int("batch_size", batch_size, 1)
    samples = _check_data(name, data, needs_y=True, model=model)
    out: list[tuple[int, dict[str, float]]] = []
    count = 0
    for batch in _batches(data, samples, int(batch_size), None):
        try:
            pred, _ = _forward(model, batch, False, None)
            value, _ = loss.forward(pred, batch)
        except (ValueError, TypeError) as err:  # a bad value in this batch of the data
            raise _in_data(name, f"the batch from sample {count}", err) from err
        n = len(batch["x"])
        out.append((n, {k: v * n for k, v in {"loss": float(value), **loss.metrics(pred, batch)}.items()}))
        count += n
    return out


@dataclass
class History:
    """One row per epoch: the epoch, step, training loss and metrics, evaluation metrics."""

    rows: list[dict[str, float]] = field(default_factory=list)


def fit(
    model: Model,
    optimizer: Optimizer,
    loss: Loss,
    train_data: Batch,
    *,
    epochs: int,
    batch_size: int,
    eval_data: Batch | None = None,
    seed: int = 0,
    clip_norm: float | None = None,
    patience: int | None = None,
    log_path: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[TrainState, History]:
    """Train for ``epochs`` epochs of shuffled mini-batches.

    One generator, seeded with ``seed``, draws every shuffle and every dropout mask, so a run is
    reproducible bit for bit. After each epoch the model is evaluated on ``eval_data`` (when
    given), a row is appended to ``log_path`` (JSON lines) and a checkpoint (params, optimizer
    state, step, the generator's state, the history, the run's settings) is written atomically to
    ``checkpoint_path``. ``patience``: stop when the evaluation loss has not improved for that
    many epochs.

    ``resume=True`` continues from that checkpoint, bit-identically to a run that was never
    interrupted. It is refused (ValueError naming each differing field with both values) unless
    the settings stored in the checkpoint's ``extra["training"]`` equal this call's: the
    optimizer's ``spec`` (kind, every hyper-parameter, the learning-rate schedule), ``batch_size``,
    ``clip_norm``, ``seed``, the loss and the number of training samples. ``epochs`` may grow
    (with a schedule whose length depends on it, the schedule then differs and is refused).

    Checked before any work (no step taken, no file touched): ``epochs`` an integer >= 1 (>= the
    checkpoint's epoch when resuming), ``batch_size`` an integer >= 1, ``seed`` an integer >= 0,
    ``clip_norm`` None or a finite number > 0, ``patience`` None or an integer >= 1, and
    ``train_data`` / ``eval_data`` dicts of arrays with ``x`` and ``y``, one row per sample in
    every array, at least one sample.

    A step that produces NaN or infinity raises :class:`NonFiniteError` (its step and epoch, the
    first non-finite tensor) before that epoch is logged or checkpointed: the last good
    checkpoint stays at ``checkpoint_path``.

    ``model`` may be a published Perceiver (fine-tuning; the module docstring says what its
    batches hold): its checkpoints hold its architecture, hf_config and buffers too
    (docs/checkpoints.md), and a resume is refused unless they equal the model's (the buffers
    bit for bit: they are not trained, so the run would not continue the same otherwise).
    """
    _check_model(model)
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("patience", patience, 1, optional=True)
    if clip_norm is not None:
        _check_positive("clip_norm", clip_norm)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected an optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"loss: expected a train.Loss, got {type(loss).__name__}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume: expected a bool, got {resume!r}")
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch: expected a callable or None, got {type(on_epoch).__name__}")
    n = _check_data("train_data", train_data, needs_y=True, model=model)
    _check_targets("train_data", train_data, model, loss)
    if eval_data is not None:
        _check_data("eval_data", eval_data, needs_y=True, model=model)
        _check_targets("eval_data", eval_data, model, loss)
    settings = _training_settings(optimizer, loss, batch_size, clip_norm, seed, n)

    rng = np.random.default_rng(seed)
    state = init_state(model, optimizer)
    history = History()
    first_epoch = 0
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise ValueError(
                f"checkpoint_path: resume=True needs an existing checkpoint, got {checkpoint_path}"
            )
        ck = load_checkpoint(checkpoint_path, expect_model=model)
        _check_resume(ck.extra.get("training"), settings, str(checkpoint_path))
        if isinstance(model, PretrainedPerceiver):
            _check_buffers(ck.buffers, model.buffers, str(checkpoint_path))
        first_epoch = int(ck.extra.get("epoch", 0))
        if epochs < first_epoch:
            raise ValueError(
                f"epochs: expected an integer >= {first_epoch} (the checkpoint's epoch) when resuming, "
                f"got {epochs}"
            )
        state = TrainState(ck.params, ck.opt_state or optimizer.init(ck.params), ck.step)
        rng = ck.rng()
        history = History(list(ck.extra.get("history", [])))
    best, since_best = math.inf, 0
    for past in history.rows:
        if "eval_loss" in past:
            since_best = since_best + 1 if past["eval_loss"] >= best else 0
            best = min(best, past["eval_loss"])
    steps_per_epoch = math.ceil(n / batch_size)
    for epoch in range(first_epoch, epochs):
        if patience is not None and since_best >= patience:
            break
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        for batch in _batches(train_data, n, int(batch_size), rng):
            try:
                _, metrics, state = train_step(model, batch, loss, optimizer, state, rng, clip_norm=clip_norm)
            except NonFiniteError as err:
                bar.discard()
                kept = (f"; {checkpoint_path} is left as it was" if checkpoint_path is not None
                        and Path(checkpoint_path).exists() else "")
                raise NonFiniteError(
                    err.step, err.tensor, err.detail, epoch + 1,
                    f"fit stopped before logging or checkpointing epoch {epoch + 1}{kept} (a smaller "
                    "learning rate or clip_norm may help)",
                ) from None
            except (ValueError, TypeError) as err:  # a bad value in this batch of the data
                bar.discard()
                raise _in_data("train_data", f"the batch of step {state.step + 1}", err) from err
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch["x"])
            bar.update(metrics)
        seconds = time.perf_counter() - t0
        row: dict[str, float] = {"epoch": epoch + 1, "step": state.step, "seconds": seconds,
                                 "samples_per_s": n / seconds,
                                 **{f"train_{k}": v / n for k, v in sums.items()}}
        if eval_data is not None:
            row.update({f"eval_{k}": v for k, v in evaluate(model, state.params, eval_data, loss,
                                                                  name="eval_data").items()})
            since_best = since_best + 1 if row["eval_loss"] >= best else 0
            best = min(best, row["eval_loss"])
        bar.close(row)
        history.rows.append(row)
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, model=model, params=state.params, step=state.step,
                            opt_state=state.opt_state, rng=rng,
                            extra={"epoch": epoch + 1, "history": history.rows, "training": settings})
        if on_epoch is not None:
            on_epoch(row)
    return state, history


# ---------------------------------------------------------------------------------------------
# The run's settings, stored in every checkpoint and compared on resume
# ---------------------------------------------------------------------------------------------


def _training_settings(
    optimizer: Optimizer, loss: Loss, batch_size: int, clip_norm: float | None, seed: int, samples: int
) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint's run to continue it bit for bit, as
    plain JSON values (what the checkpoint stores in ``extra["training"]``)."""
    settings = {
        "optimizer": optimizer.spec if optimizer.spec is not None else {"kind": "custom"},
        "batch_size": int(batch_size),
        "clip_norm": None if clip_norm is None else float(clip_norm),
        "seed": int(seed),
        "loss": {"name": loss.name, "label_smoothing": float(loss.label_smoothing),
                 "ignore_index": None if loss.ignore_index is None else int(loss.ignore_index)},
        "train_samples": int(samples),
    }
    try:
        return dict(json.loads(json.dumps(settings, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"optimizer.spec: expected plain JSON values (finite numbers), got "
                        f"{optimizer.spec!r} ({exc})") from exc


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted names: {"optimizer": {"lr": {"kind": ...}}} ->
    {"optimizer.lr.kind": ...}. Lists and scalars are values."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_UNCHECKABLE = {
    "optimizer": "an optimizer without a spec (built by hand, not by optim.sgd / adamw / lamb)",
    "optimizer.lr": "a custom learning rate (a callable without a 'spec')",
    "optimizer.decay_mask": "a custom decay mask (a callable without a 'spec')",
}


def _check_resume(stored: Any, settings: dict[str, Any], where: str) -> None:
    """Refuse to resume unless the checkpoint's settings equal ``settings`` field by field, and
    every one of them can be checked (no undescribed callable)."""
    if not isinstance(stored, dict):
        raise ValueError(
            f"resume: the checkpoint {where} holds no record of the training settings "
            "(extra['training']: it was not written by fit, or by an older perceiver_np), so resuming "
            "cannot be checked to continue the same run; start a new run from its parameters instead "
            "(fit(Perceiver(ck.config, ck.params), ...), or fit(ck.model(), ...), without resume)"
        )
    new = _flatten(settings)
    differ = differences(_flatten(stored), new, "checkpoint", "now")
    if differ:
        raise ValueError(
            f"resume: the checkpoint {where} was written with other training settings, so the run "
            f"would not continue bit-identically; {len(differ)} field(s) differ: " + "; ".join(differ)
        )
    for field_name, what in _UNCHECKABLE.items():
        if new.get(f"{field_name}.kind", new.get(field_name)) == "custom":
            raise ValueError(
                f"resume: {field_name}: {what} cannot be checked to be the one the checkpoint {where} "
                "was trained with, so resuming is refused; describe it with a JSON-able 'spec' "
                "attribute, or use a number, optim.warmup_cosine or optim.step_decay"
            )


# ---------------------------------------------------------------------------------------------
# Argument checks: each error names the argument and the expected range
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    expected = f"{'None or ' if optional else ''}an integer >= {low}"
    shown = int(value) if isinstance(value, np.integer) else value
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected {expected}, got {shown!r}")
    if value < low:
        raise ValueError(f"{name}: expected {expected}, got {shown!r}")


def _check_positive(name: str, value: object) -> None:
    expected = "None or a finite number > 0"
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected {expected}, got {float(value)!r}")


def _check_data(name: str, data: object, *, needs_y: bool, model: Model | None = None) -> int:
    """The number of samples of a dataset dict, after checking it: ``x`` (and ``y`` for a loss)
    present, every value an array with one row per sample, at least one sample; for a published
    ``model``, ``x``'s dtype and shape (its first sample, as the model's preprocessor checks
    inputs: int token ids for the text models) and no key the model cannot take."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{name}: expected a dict of arrays (x, y, ...), got {type(data).__name__}")
    if "x" not in data:
        raise ValueError(f"{name}: 'x' is missing (the inputs [S, N, C]); got keys {sorted(data)}")
    if needs_y and "y" not in data:
        raise ValueError(f"{name}: 'y' is missing (the labels or targets the loss compares with); "
                         f"got keys {sorted(data)}")
    for key, value in data.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name}[{key!r}]: expected a numpy.ndarray, got {type(value).__name__}")
        if value.ndim == 0:
            raise ValueError(f"{name}[{key!r}]: expected one row per sample (a first axis), got a 0-d array")
    count = len(data["x"])
    other = [f"{key!r} has {len(value)}" for key, value in data.items() if len(value) != count]
    if other:
        raise ValueError(
            f"{name}: every array needs one row per sample like x ({count}); " + ", ".join(other)
        )
    if count == 0:
        raise ValueError(f"{name}: expected at least one sample, got 0 (x has shape {data['x'].shape})")
    if isinstance(model, PretrainedPerceiver):
        _check_pretrained_data(name, data, model)
    return count


def _check_pretrained_data(name: str, data: Mapping[str, np.ndarray], model: PretrainedPerceiver) -> None:
    """What a published model takes: no ``queries`` (its decoder makes its own), a ``mask``
    only for the text models, ``x`` of the dtype and shape its preprocessor takes."""
    if "queries" in data:
        raise ValueError(f"{name}['queries']: {model.architecture} takes no queries (its decoder's are its "
                         "own parameters or its inputs)")
    if "mask" in data and not hasattr(model.preprocessor, "vocab"):
        raise ValueError(f"{name}['mask']: {model.architecture} takes no attention mask (only the text "
                         "models do)")
    try:
        model.preprocessor.check(data["x"][:1], model.config.np_dtype)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{name}['x']: {err}") from err


def _in_data(name: str, where: str, err: ValueError | TypeError) -> ValueError | TypeError:
    """``err``, raised on a batch of the dataset ``name``, as the same kind of error naming the
    dataset first: the user passed the dataset, not the model's ``x`` or the loss's ``labels``."""
    kind = TypeError if isinstance(err, TypeError) else ValueError
    return kind(f"{name}: {where}: {err}")


def _output_shape(model: Model, data: Batch) -> tuple[int, ...]:
    """The shape of the model's prediction for the whole dataset ``data``."""
    cfg = model.config
    s = len(data["x"])
    if isinstance(model, PretrainedPerceiver):
        dec = model.decoder
        if dec.kind == "classification":  # logits [S, K]
            return (s, int(dec.out))
        if dec.kind == "flow":  # flow [S, H, W, 2]
            return (s, *dec.grid, int(dec.out))
        return (s, int(dec.num_queries), int(model.preprocessor.vocab))  # masked LM: [S, O, V]
    if cfg.decoder == "classification":
        shape: tuple[int, ...] = (s, cfg.output_dim or 0)
    elif cfg.decoder == "query":
        given = data.get("queries")
        o = cfg.decoder_queries or (given.shape[1] if isinstance(given, np.ndarray) and given.ndim == 3
                                    else 1)
        shape = (s, o, cfg.output_dim or 0)
    elif cfg.decoder == "pool":
        shape = (s, cfg.latent_dim)
    else:
        shape = (s, cfg.num_latents, cfg.latent_dim)
    return shape


def _check_targets(name: str, data: Batch, model: Model, loss: Loss) -> None:
    """The loss on a zero prediction of the model's output shape for the whole dataset: what
    it refuses in ``y`` (a dtype, a shape, a class index out of range) is refused here, before
    any step, naming the dataset. A prediction of more than ``_CHECK_ENTRIES`` entries is
    checked in chunks of samples (the error then names the chunk's samples too)."""
    shape = _output_shape(model, data)
    per_sample = max(math.prod(shape[1:]), 1)
    chunk = max(_CHECK_ENTRIES // per_sample, 1)
    s = shape[0]
    for start in range(0, s, chunk):
        stop = min(start + chunk, s)
        part = data if chunk >= s else {k: data[k][start:stop] for k in ("y", "query_mask") if k in data}
        where = "" if chunk >= s else f"samples {start} to {stop - 1}: "
        try:
            loss.forward(np.zeros((stop - start, *shape[1:]), dtype=model.config.np_dtype), part)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{name}['y']: {where}{err}") from err


def _check_buffers(stored: Params | None, buffers: Params, where: str) -> None:
    """A published model's buffers in the checkpoint equal the model's, bit for bit: they are
    not trained, so a resume with other ones would not continue the same run."""
    stored = stored or {}
    differ = [k for k in {**buffers, **stored}
              if k not in stored or k not in buffers or stored[k].dtype != buffers[k].dtype
              or stored[k].shape != buffers[k].shape or stored[k].tobytes() != buffers[k].tobytes()]
    if differ:
        raise ValueError(
            f"resume: the checkpoint {where} holds other buffers than the model's ({differ}: batch norm's "
            "running statistics, which training does not change), so the run would not continue "
            "bit-identically; resume with the model the run started from"
        )


class _progress:
    """A tqdm bar with loss and throughput when tqdm is installed, else one line per epoch."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, unit="step")
            except ImportError:
                self.bar = None
        self.desc = desc

    def update(self, metrics: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            self.bar.update(1)

    def discard(self) -> None:
        """Close the bar without the epoch's summary line (the epoch did not finish)."""
        if self.bar is not None:
            self.bar.close()

    def close(self, row: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            shown = {k: v for k, v in row.items() if k not in ("epoch", "step", "seconds")}
            text = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            print(f"{self.desc}: {text}", flush=True)
