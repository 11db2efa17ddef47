"""Finite-difference gradient checks, for perceiver_np's layers and for yours.

::

    from perceiver_np import gradcheck, layers
    x = rng.normal(size=(2, 5, 8)); p = {"weight": rng.normal(size=(8, 3)), "bias": rng.normal(size=3)}
    report = gradcheck.check_layer(layers.linear_forward, layers.linear_backward, x, p)
    print(report)                      # per tensor: entries checked, worst relative error, where
    assert report.max_rel_error <= 1e-6

The scalar checked is ``L = sum(g * f(tensors))`` with a random upstream gradient ``g`` (seeded,
standard normal): with an all-ones ``g`` the true gradients of softmax and LayerNorm inputs are
~0 and a wrong backward passes unnoticed. Each entry's derivative is estimated by Ridders'
method (:func:`ridders`): central differences at halving steps, extrapolated to step zero,
with an error estimate of its own; all in float64. Small
tensors are checked at every entry, large ones at a seeded random sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model import Perceiver
from .tolerances import (
    GRADCHECK_FD_TARGET,
    GRADCHECK_FIRST_STEP,
    GRADCHECK_FLOOR,
    GRADCHECK_LEVELS,
    GRADCHECK_ROUNDING,
    U64,
)


@dataclass(frozen=True)
class TensorCheck:
    """The result for one tensor."""

    name: str
    shape: tuple[int, ...]
    checked: int  # entries compared
    max_rel_error: float
    worst_index: tuple[int, ...]
    analytic: float  # at the worst index
    numeric: float  # at the worst index
    numeric_error: float  # Ridders' error estimate of ``numeric``


@dataclass(frozen=True)
class GradcheckReport:
    rows: tuple[TensorCheck, ...]
    first_step: float
    floor: float  # absolute floor of the relative error's denominator

    @property
    def max_rel_error(self) -> float:
        return max((r.max_rel_error for r in self.rows), default=0.0)

    @property
    def worst(self) -> TensorCheck:
        return max(self.rows, key=lambda r: r.max_rel_error)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        lines = [
            f"{'tensor':<{width}}  {'shape':<16}{'checked':>8}  {'max rel err':>11}  "
            f"{'worst index':<16}{'analytic':>13}{'numeric':>13}{'fd error':>10}"
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {r.shape!s:<16}{r.checked:>8}  {r.max_rel_error:>11.2e}  "
                f"{r.worst_index!s:<16}{r.analytic:>13.5e}{r.numeric:>13.5e}{r.numeric_error:>10.1e}"
            )
        w = self.worst
        lines.append(f"worst: {w.name}{list(w.worst_index)!s} relative error {w.max_rel_error:.2e}")
        return "\n".join(lines)


def ridders(
    central: Callable[[float], float],
    first_step: float = GRADCHECK_FIRST_STEP,
    *,
    levels: int = GRADCHECK_LEVELS,
    accept: float = 0.0,
    rounding: float = 0.0,
) -> tuple[float, float]:
    """Ridders' derivative: central differences at shrinking steps, extrapolated to step 0.

    ``central(s)`` returns ``(f(x + s) - f(x - s)) / 2s``, whose error has only even terms,
    ``f' + c2 s^2 + c4 s^4 + ...``. Row ``i`` of the Neville tableau takes the step
    ``first_step / 2^i``; column ``j`` removes the ``s^(2j)`` term by Richardson extrapolation.
    Returns the estimate whose error estimate (its change from its neighbours in the tableau)
    is smallest, and that error estimate (Numerical Recipes' ``dfridr``, factor 2 per step).

    ``rounding`` is the absolute rounding error of ``f`` itself: no error estimate at step
    ``s`` is trusted below ``rounding / s``, and the steps stop shrinking once that exceeds the
    best error (smaller steps only add rounding). They also stop once the error estimate is at
    most ``accept`` and the next step made it worse; otherwise they go on to ``levels`` steps,
    so a function that bends on a short length scale gets small steps.
    """
    shrink2 = 4.0  # the step halves, so its square quarters
    step = first_step
    prev = [central(step)]
    best, err = prev[0], np.inf
    for _ in range(1, levels):
        step /= 2.0
        noise = rounding / step
        row = [central(step)]
        fac = shrink2
        for j in range(1, len(prev) + 1):
            row.append((row[j - 1] * fac - prev[j - 1]) / (fac - 1.0))
            fac *= shrink2
            change = max(abs(row[j] - row[j - 1]), abs(row[j] - prev[j - 1]), noise)
            if change <= err:
                best, err = row[j], change
        if noise >= err or (abs(row[-1] - prev[-1]) >= 2.0 * err and err <= accept):
            break
        prev = row
    return best, err


def gradcheck(
    fn: Callable[[dict[str, np.ndarray]], np.ndarray],
    grad_fn: Callable[[dict[str, np.ndarray], np.ndarray], Mapping[str, np.ndarray]],
    tensors: Mapping[str, np.ndarray],
    *,
    names: list[str] | None = None,
    max_entries: int = 32,
    seed: int = 0,
    first_step: float = GRADCHECK_FIRST_STEP,
    floor: float = GRADCHECK_FLOOR,
) -> GradcheckReport:
    """Compare analytic gradients with finite differences.

    fn(tensors) -> y: the function, any output shape; it must be deterministic (draw dropout
        masks from a generator seeded inside ``fn``).
    grad_fn(tensors, dy) -> grads: the analytic gradient of ``sum(dy * y)`` for every name
        checked (a mapping name -> array of that tensor's shape).
    tensors: float64 arrays by name; they are copied, the caller's arrays are never modified.
    names: the tensors to check (default: all). max_entries: entries per tensor at most
        (every entry when the tensor is that small, else a seeded random sample).

    The relative error of an entry is ``|a - n| / max(|a|, |n|, floor * s)`` with ``s`` the
    largest analytic gradient magnitude over the checked tensors.
    """
    work = {k: np.array(v, dtype=np.float64, copy=True) for k, v in tensors.items()}
    for k, v in tensors.items():
        if np.asarray(v).dtype != np.float64:
            raise TypeError(f"tensors[{k!r}]: a gradient check needs float64, got {np.asarray(v).dtype}")
    names = list(work) if names is None else list(names)
    for k in names:
        if k not in work or work[k].size == 0:
            raise ValueError(f"names: {k!r} is not a non-empty tensor of tensors")
    rng = np.random.default_rng(seed)
    y = np.asarray(fn(work))
    dy = rng.standard_normal(y.shape)
    analytic = {k: np.asarray(v) for k, v in grad_fn(work, dy).items()}
    for k in names:
        if k not in analytic:
            raise KeyError(f"grad_fn returned no gradient for {k!r}")
        if analytic[k].shape != work[k].shape:
            raise ValueError(
                f"gradient of {k!r}: expected shape {work[k].shape}, got {analytic[k].shape}"
            )

    def loss() -> float:
        return float(np.sum(dy * fn(work)))

    # absolute rounding error of loss(): GRADCHECK_ROUNDING units of U64 on sum |dy * y|
    rounding = GRADCHECK_ROUNDING * U64 * float(np.sum(np.abs(dy * y)))

    scale = max((float(np.abs(analytic[k]).max(initial=0.0)) for k in names), default=0.0)
    numeric: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for k in names:
        arr = work[k]
        flat = arr.reshape(-1)  # a view: perturbing it perturbs the tensor fn reads
        idx = np.arange(arr.size)
        if arr.size > max_entries:
            idx = np.sort(rng.choice(arr.size, size=max_entries, replace=False))
        est, fd_err = np.empty(idx.size), np.empty(idx.size)
        for t, i in enumerate(idx):
            central = _central_difference(loss, flat, int(i))
            a_i = abs(float(analytic[k].reshape(-1)[i]))
            accept = GRADCHECK_FD_TARGET * max(a_i, floor * scale)
            est[t], fd_err[t] = ridders(central, first_step, accept=accept, rounding=rounding)
        numeric[k] = (idx, est, fd_err)

    rows = []
    for k in names:
        idx, est, fd_err = numeric[k]
        a = analytic[k].reshape(-1)[idx]
        denom = np.maximum(np.maximum(np.abs(a), np.abs(est)), floor * scale)
        denom = np.where(denom > 0, denom, 1.0)  # every gradient exactly zero: compare absolutely
        rel = np.abs(a - est) / denom
        w = int(np.argmax(rel))
        rows.append(
            TensorCheck(
                name=k,
                shape=tuple(work[k].shape),
                checked=int(idx.size),
                max_rel_error=float(rel[w]),
                worst_index=tuple(int(i) for i in np.unravel_index(idx[w], work[k].shape)),
                analytic=float(a[w]),
                numeric=float(est[w]),
                numeric_error=float(fd_err[w]),
            )
        )
    return GradcheckReport(tuple(rows), first_step, floor)


def _central_difference(
    loss: Callable[[], float], flat: np.ndarray, i: int
) -> Callable[[float], float]:
    """``s -> (L(x + s e_i) - L(x - s e_i)) / 2s``, perturbing ``flat[i]`` and restoring it."""
    orig = flat[i]

    def central(s: float) -> float:
        flat[i] = orig + s
        plus = loss()
        flat[i] = orig - s
        minus = loss()
        flat[i] = orig
        return (plus - minus) / (2.0 * s)

    return central


def check_layer(
    forward: Callable[..., tuple[Any, Any]],
    backward: Callable[[np.ndarray, Any], tuple[Any, Mapping[str, np.ndarray]]],
    x: np.ndarray,
    params: Mapping[str, np.ndarray] | None = None,
    **options: Any,
) -> GradcheckReport:
    """Gradient-check a layer that follows the contract ``forward(x, params, **options) ->
    (y, cache)``, ``backward(dy, cache) -> (dx, grads)``: checks ``x`` and every parameter.

    Keyword arguments besides :func:`gradcheck`'s own (``max_entries``, ``seed``,
    ``first_step``, ``floor``) are passed to ``forward``.
    """
    own = ("max_entries", "seed", "first_step", "floor")
    check_opts = {k: options.pop(k) for k in own if k in options}
    params = dict(params or {})
    if "x" in params:
        raise ValueError("params: the name 'x' is reserved for the layer input")

    def split(t: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return t["x"], {k: v for k, v in t.items() if k != "x"}

    def fn(t: dict[str, np.ndarray]) -> np.ndarray:
        xx, pp = split(t)
        return forward(xx, pp, **options)[0]

    def grad_fn(t: dict[str, np.ndarray], dy: np.ndarray) -> dict[str, np.ndarray]:
        xx, pp = split(t)
        _, cache = forward(xx, pp, **options)
        dx, grads = backward(dy, cache)
        return {"x": dx, **grads}

    return gradcheck(fn, grad_fn, {"x": x, **params}, **check_opts)


def check_model(
    model: Any,
    x: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    training: bool = False,
    dropout_seed: int = 0,
    names: list[str] | None = None,
    max_entries: int = 32,
    seed: int = 0,
    first_step: float = GRADCHECK_FIRST_STEP,
    floor: float = GRADCHECK_FLOOR,
    queries: np.ndarray | None = None,
    query_mask: np.ndarray | None = None,
) -> GradcheckReport:
    """Gradient-check a whole :class:`~perceiver_np.model.Perceiver` (float64): its input ``x``
    and every parameter. With ``training=True`` each evaluation draws its dropout masks from a
    generator seeded with ``dropout_seed``, so every evaluation sees the same masks.
    ``queries`` / ``query_mask`` are passed to the model's forward (decoders)."""
    if model.config.dtype != "float64":
        raise TypeError(f"model: a gradient check needs a float64 model, got {model.config.dtype}")

    def run(t: dict[str, np.ndarray]) -> tuple[Perceiver, tuple[np.ndarray, Any]]:
        m = Perceiver(model.config, {k: v for k, v in t.items() if k != "x"})
        rng = np.random.default_rng(dropout_seed)
        return m, m.forward(t["x"], mask, training=training, rng=rng, queries=queries,
                            query_mask=query_mask)

    def fn(t: dict[str, np.ndarray]) -> np.ndarray:
        return run(t)[1][0]

    def grad_fn(t: dict[str, np.ndarray], dy: np.ndarray) -> dict[str, np.ndarray]:
        m, (_, cache) = run(t)
        grads, dx = m.backward(dy, cache)
        return {"x": dx, **grads}

    tensors = {"x": np.asarray(x, dtype=np.float64), **model.params}
    return gradcheck(fn, grad_fn, tensors, names=names, max_entries=max_entries, seed=seed,
                     first_step=first_step, floor=floor)
