"""Optimizers as pure functions over flat parameter dicts (docs/training.md gives every formula).

::

    opt = adamw(warmup_cosine(1e-3, warmup_steps=100, total_steps=10_000), weight_decay=0.01)
    state = opt.init(model.params)                   # {"step": 0, "m/<name>": 0, "v/<name>": 0}
    grads, norm = clip_by_global_norm(grads, 1.0)
    params, state = opt.update(model.params, grads, state)

``params`` and ``grads`` are flat dicts name -> ndarray (``model.params`` and the gradients of
``model.backward``). The state is a flat dict of ndarrays only, so ``np.savez(path, **state)``
saves it: ``"step"`` (0-d int64, the number of updates applied so far) and one slot per
parameter and per moment, ``"<slot>/<param name>"`` (``momentum/``, ``m/``, ``v/``), each in the
parameter's shape and dtype. ``update`` never modifies its inputs; it returns new dicts of new
arrays. Nothing is kept anywhere else, so the same inputs give bit-identical outputs.

Learning rate: a float, or a schedule ``lr(step) -> float`` called with the state's ``"step"``
*before* the update, i.e. ``lr(0)`` for the first update, ``lr(1)`` for the second. Adam's bias
corrections use ``t = step + 1`` (1 for the first update), as torch does.

Every optimizer describes itself: ``opt.spec`` is a JSON-able dict of its kind and every
hyper-parameter, the learning rate's schedule included (``WarmupCosine.spec``,
``StepDecay.spec``). :func:`perceiver_np.train.fit` stores it in its checkpoints and refuses to
resume with an optimizer whose spec differs.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .kernels import elementwise, rows
from .shapes import FLOAT_DTYPES

Params = dict[str, np.ndarray]
State = dict[str, np.ndarray]
Schedule = Callable[[int], float]
DecayMask = Callable[[str], bool]
#: A rule updates one tensor: (p, g, slots, step, lr, decay) -> (new p, new slots).
Rule = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], int, float, bool],
                tuple[np.ndarray, dict[str, np.ndarray]]]


class Optimizer(NamedTuple):
    """A pure optimizer: ``state = init(params)``, ``params, state = update(params, grads, state)``.

    ``spec`` describes it as plain JSON values: ``{"kind": "sgd" | "adamw" | "lamb", "lr": ...,
    <every hyper-parameter>, "decay_mask": ...}`` with ``lr`` the schedule's own spec
    (:func:`lr_spec`). :func:`sgd`, :func:`adamw` and :func:`lamb` set it; an optimizer built by
    hand has ``None`` (undescribed: ``fit`` records it as ``{"kind": "custom"}`` and cannot
    resume it).
    """

    init: Callable[[Mapping[str, np.ndarray]], State]
    update: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
                     tuple[Params, State]]
    spec: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Which parameters decay
# ---------------------------------------------------------------------------------------------


def default_decay_mask(name: str) -> bool:
    """True if the parameter ``name`` gets weight decay.

    No decay (False) for LayerNorm scales and shifts (``*.gamma``, ``*.beta``), biases
    (``*.bias``), the latent array (``latents``), decoder queries (``decoder.queries``) and
    trainable position encodings (``pos`` or a name ending in ``.pos``, the key
    :func:`perceiver_np.position.init_trainable_position` uses); decay (True) for everything
    else, which in the model is exactly the ``*.weight`` kernels.
    """
    return not (
        name.endswith((".gamma", ".beta", ".bias", ".pos"))
        or name in ("latents", "pos", "decoder.queries")
    )


def decay_mask_spec(decay_mask: DecayMask | None) -> Any:
    """How an optimizer's spec records its decay mask: ``"default"`` for
    :func:`default_decay_mask`, ``"all"`` for ``None`` (every parameter decays), the callable's
    own ``spec`` attribute when it has one (any JSON value that identifies it), else ``"custom"``."""
    if decay_mask is None:
        return "all"
    if decay_mask is default_decay_mask:
        return "default"
    return getattr(decay_mask, "spec", "custom")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: step -> lr, step = updates already applied (0 for the first)
# ---------------------------------------------------------------------------------------------


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    return int(step)


def lr_spec(lr: float | Schedule) -> Any:
    """A learning rate as JSON values: ``{"kind": "constant", "lr": <float>}`` for a number, a
    schedule's own ``spec`` attribute (:class:`WarmupCosine`, :class:`StepDecay`, or any callable
    that carries one), else ``{"kind": "custom"}``: a plain callable cannot be described."""
    if not callable(lr):
        return {"kind": "constant", "lr": float(lr)}
    return getattr(lr, "spec", {"kind": "custom"})


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup from 0 to ``peak_lr``, then a half cosine down to ``final_lr``.

    ``W = warmup_steps``, ``T = total_steps``, ``s`` the step (0 for the first update)::

        lr(s) = peak_lr * s / W                                              s < W
        lr(s) = final_lr + (peak_lr - final_lr) * (1 + cos(pi (s - W) / (T - W))) / 2   W <= s < T
        lr(s) = final_lr                                                     s >= T

    So ``lr(0) = 0`` when ``W > 0``, ``lr(W) = peak_lr``, and the cosine reaches ``final_lr`` at
    ``s = T``; optax's ``warmup_cosine_decay_schedule`` (init 0) counts the same way, and so does
    Hugging Face's ``get_cosine_schedule_with_warmup`` for ``s <= T``, ``final_lr = 0``.
    Needs ``0 <= W <= T``. A frozen value: equal fields, equal schedules; ``spec`` is its JSON form.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    final_lr: float = 0.0

    def __post_init__(self) -> None:
        _nonnegative("peak_lr", self.peak_lr)
        _nonnegative("final_lr", self.final_lr)
        _int_at_least("warmup_steps", self.warmup_steps, 0)
        _int_at_least("total_steps", self.total_steps, self.warmup_steps, "warmup_steps")

    def __call__(self, step: int) -> float:
        s = _check_step(step)
        peak, warmup, total, final = self.peak_lr, self.warmup_steps, self.total_steps, self.final_lr
        if s < warmup:
            return peak * s / warmup
        if s >= total:
            return final
        progress = (s - warmup) / (total - warmup)  # in [0, 1)
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": "warmup_cosine", "peak_lr": float(self.peak_lr),
                "warmup_steps": int(self.warmup_steps), "total_steps": int(self.total_steps),
                "final_lr": float(self.final_lr)}


@dataclass(frozen=True)
class StepDecay:
    """Piecewise constant: ``lr`` before ``boundaries[0]``, ``lr * factors[i]`` from step
    ``boundaries[i]`` on (until the next boundary). The factors are absolute, not cumulative:
    ``StepDecay(0.1, (100, 200), (0.1, 0.01))`` gives 0.1, then 0.01 from step 100, then 0.001
    from step 200. ``boundaries`` strictly increasing ints >= 1, one factor (>= 0) per boundary;
    both are stored as tuples. A frozen value; ``spec`` is its JSON form.
    """

    lr: float
    boundaries: tuple[int, ...]
    factors: tuple[float, ...]

    def __post_init__(self) -> None:
        _nonnegative("lr", self.lr)
        bounds, facs = tuple(self.boundaries), tuple(self.factors)
        if len(bounds) != len(facs):
            raise ValueError(
                f"factors: expected one factor per boundary ({len(bounds)}), got {len(facs)}"
            )
        for i, b in enumerate(bounds):
            _int_at_least(f"boundaries[{i}]", b, 1 if i == 0 else bounds[i - 1] + 1,
                          "1" if i == 0 else f"boundaries[{i - 1}] + 1 (strictly increasing)")
        for i, f in enumerate(facs):
            _nonnegative(f"factors[{i}]", f)
        object.__setattr__(self, "boundaries", tuple(int(b) for b in bounds))
        object.__setattr__(self, "factors", tuple(float(f) for f in facs))

    def __call__(self, step: int) -> float:
        i = bisect.bisect_right(self.boundaries, _check_step(step))  # boundaries <= step
        return self.lr if i == 0 else self.lr * self.factors[i - 1]

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": "step_decay", "lr": float(self.lr), "boundaries": list(self.boundaries),
                "factors": list(self.factors)}


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0) -> WarmupCosine:
    """``WarmupCosine(peak_lr, warmup_steps, total_steps, final_lr)``: linear warmup to
    ``peak_lr`` over ``warmup_steps``, then a half cosine reaching ``final_lr`` at ``total_steps``
    (:class:`WarmupCosine` gives the formula)."""
    return WarmupCosine(peak_lr, warmup_steps, total_steps, final_lr)


def step_decay(lr: float, boundaries: Sequence[int], factors: Sequence[float]) -> StepDecay:
    """``StepDecay(lr, boundaries, factors)``: ``lr`` before ``boundaries[0]``, ``lr * factors[i]``
    from step ``boundaries[i]`` on; ``step_decay(0.1, [100, 200], [0.1, 0.01])`` gives 0.1, then
    0.01 from step 100, then 0.001 from step 200 (:class:`StepDecay`)."""
    return StepDecay(lr, tuple(boundaries), tuple(factors))


# ---------------------------------------------------------------------------------------------
# Global-norm clipping
# ---------------------------------------------------------------------------------------------


def global_norm(grads: Mapping[str, np.ndarray]) -> float:
    """``sqrt(sum over every tensor and entry of g^2)``, accumulated in float64: the norm of all
    gradients concatenated into one vector. NaN or infinite when an entry is, and infinite when
    the sum of squares overflows float64 (entries above about 1e154); never raises for that.
    Each tensor's sum of squares is one parallel pass with no float64 copy of it
    (:func:`perceiver_np.kernels.rows.sum_squares`: pairwise in blocks, the same bits on any
    number of threads); the tensors' sums are added in the order of ``grads``."""
    total = 0.0
    for name, g in grads.items():
        _float_tensor(f"grads[{name!r}]", g)
        total += rows.sum_squares(g)
    return math.sqrt(total)


def clip_by_global_norm(
    grads: Mapping[str, np.ndarray], max_norm: float
) -> tuple[Params, float]:
    """Scale every gradient by ``max_norm / norm`` when ``norm > max_norm``.

    ``norm`` is :func:`global_norm` (accumulated in float64), the norm of all gradients
    concatenated into one vector. Returns ``(grads, norm)`` with ``norm`` before clipping. At or
    under the limit the same arrays come back in a new dict; over it, new arrays
    ``g * (max_norm / norm)`` in each gradient's dtype (optax's rule; torch's ``clip_grad_norm_``
    divides by ``norm + 1e-6`` instead). A non-finite norm is a ValueError naming the first
    tensor that holds NaN or infinity, or, when every entry is finite, the largest one.
    """
    if _real("max_norm", max_norm) <= 0.0:
        raise ValueError(f"max_norm: expected a value > 0, got {max_norm}")
    norm = global_norm(grads)
    if not math.isfinite(norm):
        bad = next((k for k, g in grads.items() if not np.isfinite(g).all()), None)
        if bad is not None:
            raise ValueError(f"grads: the global norm is not finite; grads[{bad!r}] holds NaN or infinity")
        big = max(grads, key=lambda k: float(np.abs(grads[k]).max(initial=0.0)))
        raise ValueError(
            f"grads: the global norm overflows float64; every entry is finite, the largest |g| is "
            f"{float(np.abs(grads[big]).max()):.3g} in grads[{big!r}]"
        )
    if norm <= max_norm:
        return dict(grads), norm
    scale = max_norm / norm
    return {name: g * g.dtype.type(scale) for name, g in grads.items()}, norm


# ---------------------------------------------------------------------------------------------
# The optimizers
# ---------------------------------------------------------------------------------------------


def sgd(
    lr: float | Schedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_mask: DecayMask | None = default_decay_mask,
) -> Optimizer:
    """Stochastic gradient descent, exactly torch.optim.SGD (dampening 0)::

        g = g + weight_decay * p          (coupled L2, for parameters the mask decays)
        b = momentum * b + g              (b starts at 0)
        d = g + momentum * b  (nesterov)  |  b  (momentum > 0)  |  g  (momentum = 0)
        p = p - lr * d

    torch starts its buffer as a copy of the first gradient; with b = 0 and no dampening the
    first ``momentum * 0 + g`` is that same copy (a -0.0 entry becomes +0.0). Slots:
    ``momentum/<name>`` (only when ``momentum > 0``).
    """
    _check_lr(lr)
    _in_range("momentum", momentum, 0.0, math.inf)
    _nonnegative("weight_decay", weight_decay)
    if nesterov and momentum <= 0.0:
        raise ValueError(f"nesterov: Nesterov momentum needs momentum > 0, got momentum={momentum}")

    def rule(p: np.ndarray, g: np.ndarray, slots: dict[str, np.ndarray], step: int, rate: float,
             decay: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if decay and weight_decay != 0.0:
            g = g + weight_decay * p
        if momentum == 0.0:
            return p - rate * g, {}
        buf = momentum * slots["momentum"] + g
        d = g + momentum * buf if nesterov else buf
        return p - rate * d, {"momentum": buf}

    spec = {"kind": "sgd", "lr": lr_spec(lr), "momentum": float(momentum), "nesterov": bool(nesterov),
            "weight_decay": float(weight_decay), "decay_mask": decay_mask_spec(decay_mask)}
    return _optimizer(("momentum",) if momentum > 0.0 else (), lr, decay_mask, rule, spec)


def adamw(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    decay_mask: DecayMask | None = default_decay_mask,
    backend: str = "numba",
) -> Optimizer:
    """Adam with decoupled weight decay, exactly torch.optim.AdamW; ``t = step + 1``::

        p = p - lr * weight_decay * p     (before the Adam step, for parameters the mask decays)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g^2
        p = p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

    computed as torch does: ``p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    Slots: ``m/<name>``, ``v/<name>``.

    ``backend``: ``"numpy"`` runs ``rule`` below, a NumPy expression per line; ``"numba"`` (the
    default) runs the same operations in one parallel pass over each tensor
    (:func:`perceiver_np.kernels.elementwise.adamw_update`, without fast-math), bitwise equal
    to ``rule`` (tests/test_optim.py).
    """
    _check_adam_hyperparameters(lr, b1, b2, eps, weight_decay)
    if backend not in ("numba", "numpy"):
        raise ValueError(f"backend: expected 'numba' or 'numpy', got {backend!r}")

    def rule(p: np.ndarray, g: np.ndarray, slots: dict[str, np.ndarray], step: int, rate: float,
             decay: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if decay and weight_decay != 0.0:
            p = p * (1.0 - rate * weight_decay)
        m = b1 * slots["m"] + (1.0 - b1) * g
        v = b2 * slots["v"] + (1.0 - b2) * (g * g)
        t = step + 1
        denom = np.sqrt(v) / math.sqrt(1.0 - b2**t) + eps
        return p - (rate / (1.0 - b1**t)) * (m / denom), {"m": m, "v": v}

    def kernel_rule(p: np.ndarray, g: np.ndarray, slots: dict[str, np.ndarray], step: int, rate: float,
                    decay: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``rule`` in one pass over the tensor (same operations, same order, same bits); p, g
        and the slots share a shape and a float dtype (update checks them first)."""
        t = step + 1
        factor = 1.0 - rate * weight_decay if decay and weight_decay != 0.0 else 1.0
        new_p, new_m, new_v = elementwise.adamw_update(
            p, g, slots["m"], slots["v"], decay=factor, b1=b1, b2=b2, eps=eps,
            bias2_sqrt=math.sqrt(1.0 - b2**t), step_size=rate / (1.0 - b1**t))
        return new_p, {"m": new_m, "v": new_v}

    return _optimizer(("m", "v"), lr, decay_mask, kernel_rule if backend == "numba" else rule,
                      _adam_spec("adamw", lr, b1, b2, eps, weight_decay, decay_mask))


def lamb(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    decay_mask: DecayMask | None = default_decay_mask,
) -> Optimizer:
    """LAMB, You et al. 2019 (arXiv 1904.00962) Algorithm 2 with phi = identity, per tensor;
    ``t = step + 1``::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g^2
        r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p     (the decay term only where the mask decays)
        ratio = ||p|| / ||r||,  or 1 where ||p|| = 0 or ||r|| = 0   (Frobenius norms of this tensor)
        p = p - lr * ratio * r

    with ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)`` (optax's ``lamb``, used for the
    Perceiver's ImageNet recipe, computes the same). Slots: ``m/<name>``, ``v/<name>``.
    """
    _check_adam_hyperparameters(lr, b1, b2, eps, weight_decay)

    def rule(p: np.ndarray, g: np.ndarray, slots: dict[str, np.ndarray], step: int, rate: float,
             decay: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        m = b1 * slots["m"] + (1.0 - b1) * g
        v = b2 * slots["v"] + (1.0 - b2) * (g * g)
        t = step + 1
        r = (m / (1.0 - b1**t)) / (np.sqrt(v / (1.0 - b2**t)) + eps)
        if decay and weight_decay != 0.0:
            r = r + weight_decay * p
        p_norm, r_norm = float(np.linalg.norm(p)), float(np.linalg.norm(r))
        ratio = p_norm / r_norm if p_norm > 0.0 and r_norm > 0.0 else 1.0
        return p - (rate * ratio) * r, {"m": m, "v": v}

    return _optimizer(("m", "v"), lr, decay_mask, rule, _adam_spec("lamb", lr, b1, b2, eps, weight_decay,
                                                                    decay_mask))


def _adam_spec(kind: str, lr: float | Schedule, b1: float, b2: float, eps: float, weight_decay: float,
               decay_mask: DecayMask | None) -> dict[str, Any]:
    return {"kind": kind, "lr": lr_spec(lr), "b1": float(b1), "b2": float(b2), "eps": float(eps),
            "weight_decay": float(weight_decay), "decay_mask": decay_mask_spec(decay_mask)}


# ---------------------------------------------------------------------------------------------
# The shared driver: validation, the state layout, one rule per tensor
# ---------------------------------------------------------------------------------------------


def _optimizer(
    slots: tuple[str, ...], lr: float | Schedule, decay_mask: DecayMask | None, rule: Rule,
    spec: dict[str, Any],
) -> Optimizer:
    if decay_mask is not None and not callable(decay_mask):
        raise TypeError(
            f"decay_mask: expected a callable name -> bool or None, got {type(decay_mask).__name__}"
        )

    def decays(name: str) -> bool:
        if decay_mask is None:
            return True
        flag = decay_mask(name)
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"decay_mask({name!r}): expected a bool, got {type(flag).__name__}")
        return bool(flag)

    def init(params: Mapping[str, np.ndarray]) -> State:
        for name, p in params.items():
            _float_tensor(f"params[{name!r}]", p)
        state: State = {"step": np.zeros((), dtype=np.int64)}
        for slot in slots:
            state.update({f"{slot}/{name}": np.zeros_like(p) for name, p in params.items()})
        return state

    def update(
        params: Mapping[str, np.ndarray],
        grads: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Params, State]:
        step = _check_inputs(params, grads, state, slots)
        rate = _lr_at(lr, step)
        new_params: Params = {}
        new_state: State = {"step": np.asarray(step + 1, dtype=np.int64)}
        new_slots: dict[str, State] = {slot: {} for slot in slots}
        for name, p in params.items():
            old = {slot: state[f"{slot}/{name}"] for slot in slots}
            new_params[name], out = rule(p, grads[name], old, step, rate, decays(name))
            for slot in slots:
                new_slots[slot][f"{slot}/{name}"] = out[slot]
        for slot in slots:  # the layout of init: every slot's entries together, in params order
            new_state.update(new_slots[slot])
        return new_params, new_state

    return Optimizer(init, update, spec)


def _check_inputs(
    params: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    slots: tuple[str, ...],
) -> int:
    """Validate an update's inputs; return the state's step (updates applied so far)."""
    if set(grads) != set(params):
        raise ValueError(
            f"grads: expected the keys of params; missing {sorted(set(params) - set(grads))}, "
            f"unexpected {sorted(set(grads) - set(params))}"
        )
    want = {"step", *(f"{slot}/{name}" for slot in slots for name in params)}
    if set(state) != want:
        raise ValueError(
            f"state: expected the keys of init(params); missing {sorted(want - set(state))}, "
            f"unexpected {sorted(set(state) - want)}"
        )
    for name, p in params.items():
        _float_tensor(f"params[{name!r}]", p)
        for label, other in [(f"grads[{name!r}]", grads[name])] + [
            (f"state[{slot + '/' + name!r}]", state[f"{slot}/{name}"]) for slot in slots
        ]:
            _float_tensor(label, other)
            if other.shape != p.shape or other.dtype != p.dtype:
                raise ValueError(
                    f"{label}: expected shape {p.shape} and dtype {p.dtype.name} (those of the "
                    f"parameter), got shape {other.shape} and dtype {other.dtype.name}"
                )
    step = state["step"]
    if not (isinstance(step, np.ndarray) and step.shape == () and step.dtype == np.int64 and step >= 0):
        raise ValueError(f"state['step']: expected a 0-d int64 array >= 0, got {step!r}")
    return int(step)


def _lr_at(lr: float | Schedule, step: int) -> float:
    """The learning rate of the update that follows ``step`` applied updates."""
    if not callable(lr):
        return float(lr)
    rate = lr(step)
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.floating | np.integer) or not (
        math.isfinite(rate) and rate >= 0
    ):
        raise ValueError(f"lr: the schedule returned {rate!r} at step {step}; expected a finite float >= 0")
    return float(rate)


# ---------------------------------------------------------------------------------------------
# Hyperparameter checks: each error names the field and shows the value received
# ---------------------------------------------------------------------------------------------


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def _nonnegative(name: str, value: object) -> None:
    if _real(name, value) < 0.0:
        raise ValueError(f"{name}: expected a value >= 0, got {value}")


def _in_range(name: str, value: object, low: float, high: float) -> None:
    """``low <= value < high``."""
    v = _real(name, value)
    if not low <= v < high:
        raise ValueError(f"{name}: expected a value in [{low}, {high}), got {value}")


def _int_at_least(name: str, value: object, low: int, low_name: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        bound = f"{low_name} = {low}" if low_name and low_name != str(low) else str(low)
        raise ValueError(f"{name}: expected an int >= {bound}, got {value}")


def _check_lr(lr: object) -> None:
    if not callable(lr):
        _nonnegative("lr", lr)


def _check_adam_hyperparameters(lr: object, b1: float, b2: float, eps: float, weight_decay: float) -> None:
    _check_lr(lr)
    _in_range("b1", b1, 0.0, 1.0)
    _in_range("b2", b2, 0.0, 1.0)
    _real("eps", eps)
    if eps <= 0.0:
        raise ValueError(f"eps: expected a value > 0, got {eps}")
    _nonnegative("weight_decay", weight_decay)


def _float_tensor(label: str, value: object) -> None:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{label}: expected a numpy.ndarray, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{label}: expected dtype float32 or float64, got {value.dtype.name}")
