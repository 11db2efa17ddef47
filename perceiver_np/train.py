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
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import losses
from .model import Perceiver
from .optim import Optimizer, clip_by_global_norm

Params = dict[str, np.ndarray]
Batch = Mapping[str, np.ndarray]


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

    def backward(self, cache: Any) -> np.ndarray:
        """The gradient of the loss w.r.t. the prediction (upstream gradient 1)."""
        if self.name == "cross_entropy":
            return losses.softmax_cross_entropy_backward(1.0, cache)[0]
        return losses.mse_backward(1.0, cache)[0]

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


def init_state(model: Perceiver, optimizer: Optimizer) -> TrainState:
    return TrainState(dict(model.params), optimizer.init(model.params), 0)


def _forward(model: Perceiver, batch: Batch, training: bool, rng: np.random.Generator | None):
    return model.forward(batch["x"], batch.get("mask"), training=training, rng=rng,
                         queries=batch.get("queries"), query_mask=batch.get("query_mask"))


def loss_and_grads(
    model: Perceiver, params: Params, batch: Batch, loss: Loss, rng: np.random.Generator
) -> tuple[float, dict[str, float], Params]:
    """Forward in training mode (dropout from ``rng``), the loss, and the gradient of the loss
    w.r.t. every parameter: what one training step uses."""
    m = Perceiver(model.config, params)
    pred, cache = _forward(m, batch, True, rng)
    value, loss_cache = loss.forward(pred, batch)
    dpred = loss.backward(loss_cache)
    grads, _ = m.backward(dpred, cache)
    return float(value), loss.metrics(pred, batch), grads


def train_step(
    model: Perceiver,
    batch: Batch,
    loss: Loss,
    optimizer: Optimizer,
    state: TrainState,
    rng: np.random.Generator,
    *,
    clip_norm: float | None = None,
) -> tuple[float, dict[str, float], TrainState]:
    """forward -> loss -> backward -> clip -> update. Returns (loss, metrics, new state);
    ``metrics`` includes the gradient's global norm before clipping."""
    value, metrics, grads = loss_and_grads(model, state.params, batch, loss, rng)
    if clip_norm is not None:
        grads, norm = clip_by_global_norm(grads, clip_norm)
    else:
        norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    params, opt_state = optimizer.update(state.params, grads, state.opt_state)
    return value, {"loss": value, "grad_norm": norm, **metrics}, TrainState(params, opt_state, state.step + 1)


def batches(data: Batch, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[dict]:
    """Mini-batches of a dataset given as a dict of arrays with a common first axis; shuffled
    by ``rng`` (one permutation per call), in order without it. The last batch may be smaller."""
    n = len(data["x"])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def evaluate(model: Perceiver, params: Params, data: Batch, loss: Loss, batch_size: int = 256) -> dict:
    """The loss and metrics over a whole dataset, averaged over samples (inference mode)."""
    m = Perceiver(model.config, params)
    totals: dict[str, float] = {}
    count = 0
    for batch in batches(data, batch_size):
        pred, _ = _forward(m, batch, False, None)
        value, _ = loss.forward(pred, batch)
        n = len(batch["x"])
        for k, v in {"loss": float(value), **loss.metrics(pred, batch)}.items():
            totals[k] = totals.get(k, 0.0) + v * n
        count += n
    return {k: v / count for k, v in totals.items()}


@dataclass
class History:
    """One row per epoch: the epoch, step, training loss and metrics, evaluation metrics."""

    rows: list[dict[str, float]] = field(default_factory=list)


def fit(
    model: Perceiver,
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
    state, step, the generator's state, the history) is written atomically to
    ``checkpoint_path``. ``resume=True`` continues from that checkpoint: the result is
    bit-identical to a run that was never interrupted. ``patience``: stop when the evaluation
    loss has not improved for that many epochs.
    """
    from .checkpoint import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(seed)
    state = init_state(model, optimizer)
    history = History()
    first_epoch = 0
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise ValueError(
                f"checkpoint_path: resume=True needs an existing checkpoint, got {checkpoint_path}"
            )
        ck = load_checkpoint(checkpoint_path, expect_config=model.config)
        state = TrainState(ck.params, ck.opt_state or optimizer.init(ck.params), ck.step)
        rng = ck.rng()
        history = History(list(ck.extra.get("history", [])))
        first_epoch = int(ck.extra.get("epoch", 0))
    best, since_best = math.inf, 0
    for past in history.rows:
        if "eval_loss" in past:
            since_best = since_best + 1 if past["eval_loss"] >= best else 0
            best = min(best, past["eval_loss"])
    n = len(train_data["x"])
    steps_per_epoch = math.ceil(n / batch_size)
    for epoch in range(first_epoch, epochs):
        if patience is not None and since_best >= patience:
            break
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        for batch in batches(train_data, batch_size, rng):
            _, metrics, state = train_step(model, batch, loss, optimizer, state, rng, clip_norm=clip_norm)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch["x"])
            bar.update(metrics)
        seconds = time.perf_counter() - t0
        row: dict[str, float] = {"epoch": epoch + 1, "step": state.step, "seconds": seconds,
                                 "samples_per_s": n / seconds,
                                 **{f"train_{k}": v / n for k, v in sums.items()}}
        if eval_data is not None:
            row.update({f"eval_{k}": v for k, v in evaluate(model, state.params, eval_data, loss).items()})
            since_best = since_best + 1 if row["eval_loss"] >= best else 0
            best = min(best, row["eval_loss"])
        bar.close(row)
        history.rows.append(row)
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, config=model.config, params=state.params, step=state.step,
                            opt_state=state.opt_state, rng=rng,
                            extra={"epoch": epoch + 1, "history": history.rows})
        if on_epoch is not None:
            on_epoch(row)
    return state, history


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

    def close(self, row: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            shown = {k: v for k, v in row.items() if k not in ("epoch", "step", "seconds")}
            text = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            print(f"{self.desc}: {text}", flush=True)
