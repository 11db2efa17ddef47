"""The optimizers against torch.optim and the LAMB paper, the schedules, clipping, the decay mask,
purity and the state layout."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from perceiver_np import optim
from perceiver_np.tolerances import FLOAT64_RTOL, OPTIM_RTOL

TORCH_REASON = "torch is the compare extra: pip install -e '.[compare]'"

#: A few tensors named like the model's: two that decay (weights), three that do not.
SHAPES = {
    "cross.0.attn.q.weight": (4, 3),
    "cross.0.attn.q.bias": (3,),
    "latents": (3, 4),
    "final_norm.gamma": (4,),
    "self.0.ffn.up.weight": (2, 5),
}
STEPS = 5


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(float).tiny))


def _params(rng, dtype=np.float64):
    return {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}


def _grad_seq(rng, params, steps=STEPS):
    return [{k: rng.normal(size=v.shape).astype(v.dtype) for k, v in params.items()} for _ in range(steps)]


def _run(opt, params, grad_seq):
    """Every step's parameters, and the final state."""
    state, history = opt.init(params), []
    for grads in grad_seq:
        params, state = opt.update(params, grads, state)
        history.append(params)
    return history, state


def _torch_run(torch, make, params, grad_seq, decays, lrs=None):
    """The same steps with a torch optimizer: one group that decays, one that does not."""
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    groups = [{"params": [tp[k] for k in tp if decays(k)]},
              {"params": [tp[k] for k in tp if not decays(k)], "weight_decay": 0.0}]
    opt = make([g for g in groups if g["params"]])
    history = []
    for step, grads in enumerate(grad_seq):
        for k, g in grads.items():
            tp[k].grad = torch.tensor(g)
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs(step)
        opt.step()
        history.append({k: v.detach().numpy().copy() for k, v in tp.items()})
    return history, {k: opt.state[v] for k, v in tp.items()}


def _assert_histories_equal(ours, theirs):
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for k in a:
            assert _rel(a[k], b[k]) <= OPTIM_RTOL, f"step {step}, {k}: {_rel(a[k], b[k]):.2e}"


def _all(name):
    return True


# --- against torch.optim -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay", "mask"),
    [
        (0.0, False, 0.0, optim.default_decay_mask),
        (0.0, False, 0.1, optim.default_decay_mask),
        (0.9, False, 0.0, optim.default_decay_mask),
        (0.9, False, 0.05, optim.default_decay_mask),
        (0.8, True, 0.0, optim.default_decay_mask),
        (0.8, True, 0.1, optim.default_decay_mask),
        (0.9, True, 0.1, None),
    ],
)
def test_sgd_equals_torch(rng, momentum, nesterov, weight_decay, mask):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    params = _params(rng)
    grad_seq = _grad_seq(rng, params)
    opt = optim.sgd(0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                    decay_mask=mask)
    ours, state = _run(opt, params, grad_seq)
    theirs, t_state = _torch_run(
        torch, lambda g: torch.optim.SGD(g, lr=0.05, momentum=momentum, nesterov=nesterov,
                                         weight_decay=weight_decay),
        params, grad_seq, mask or _all,
    )
    _assert_histories_equal(ours, theirs)
    for k in params:
        if momentum:
            assert _rel(state[f"momentum/{k}"], t_state[k]["momentum_buffer"].numpy()) <= OPTIM_RTOL
    assert sorted(state) == sorted(["step"] + ([f"momentum/{k}" for k in params] if momentum else []))


@pytest.mark.parametrize(
    ("b1", "b2", "eps", "weight_decay", "mask", "schedule"),
    [
        (0.9, 0.999, 1e-8, 0.01, optim.default_decay_mask, False),
        (0.8, 0.99, 1e-6, 0.3, optim.default_decay_mask, True),
        (0.0, 0.5, 1e-3, 0.1, None, False),
    ],
)
def test_adamw_equals_torch(rng, b1, b2, eps, weight_decay, mask, schedule):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    params = _params(rng)
    grad_seq = _grad_seq(rng, params)
    lr = optim.warmup_cosine(0.1, 2, STEPS, final_lr=0.01) if schedule else 0.02
    opt = optim.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decay_mask=mask)
    ours, state = _run(opt, params, grad_seq)
    theirs, t_state = _torch_run(
        torch, lambda g: torch.optim.AdamW(g, lr=0.02, betas=(b1, b2), eps=eps,
                                           weight_decay=weight_decay),
        params, grad_seq, mask or _all, lrs=lr if schedule else None,
    )
    _assert_histories_equal(ours, theirs)
    assert int(state["step"]) == STEPS
    for k in params:
        assert _rel(state[f"m/{k}"], t_state[k]["exp_avg"].numpy()) <= OPTIM_RTOL
        assert _rel(state[f"v/{k}"], t_state[k]["exp_avg_sq"].numpy()) <= OPTIM_RTOL


# --- LAMB against the paper ------------------------------------------------------------------------


def _lamb_paper(params, grad_seq, lr, b1, b2, eps, wd, decays):
    """You et al. 2019, Algorithm 2, transcribed: per layer l, with phi the identity."""
    x = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    history = []
    for t, g in enumerate(grad_seq, start=1):
        eta = lr(t - 1) if callable(lr) else lr
        for k in x:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            r = m_hat / (np.sqrt(v_hat) + eps)
            lam = wd if decays(k) else 0.0
            u = r + lam * x[k]
            x_norm, u_norm = math.sqrt(np.sum(x[k] ** 2)), math.sqrt(np.sum(u**2))
            trust = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
            x[k] = x[k] - eta * trust * u
        history.append({k: a.copy() for k, a in x.items()})
    return history


@pytest.mark.parametrize(
    ("lr", "weight_decay", "mask"),
    [
        (0.01, 0.0, optim.default_decay_mask),
        (0.01, 0.1, optim.default_decay_mask),
        (optim.step_decay(0.02, [2, 4], [0.5, 0.1]), 0.05, None),
    ],
)
def test_lamb_equals_the_paper(rng, lr, weight_decay, mask):
    params = _params(rng)
    params["cross.0.attn.q.bias"] = np.zeros(3)  # ||p|| = 0: trust ratio 1
    grad_seq = _grad_seq(rng, params)
    opt = optim.lamb(lr, b1=0.9, b2=0.99, eps=1e-6, weight_decay=weight_decay, decay_mask=mask)
    ours, _ = _run(opt, params, grad_seq)
    _assert_histories_equal(ours, _lamb_paper(params, grad_seq, lr, 0.9, 0.99, 1e-6, weight_decay,
                                              mask or _all))


def test_lamb_trust_ratio_edge_cases(rng):
    params = {"zero.bias": np.zeros(4), "still.weight": rng.normal(size=(2, 3)),
              "still.bias": rng.normal(size=3), "moving.weight": rng.normal(size=(3, 3))}
    grads = {"zero.bias": rng.normal(size=4), "still.weight": np.zeros((2, 3)),
             "still.bias": np.zeros(3), "moving.weight": rng.normal(size=(3, 3))}
    lr, wd, eps = 0.1, 0.5, 1e-6
    opt = optim.lamb(lr, weight_decay=wd, eps=eps)
    new, _ = opt.update(params, grads, opt.init(params))
    # ||p|| = 0: ratio 1, and after one step m_hat = g, v_hat = g^2
    g = grads["zero.bias"]
    assert _rel(new["zero.bias"], -lr * g / (np.abs(g) + eps)) <= OPTIM_RTOL
    # zero gradient, no decay: r = 0, ratio 1, the tensor does not move at all
    assert np.array_equal(new["still.bias"], params["still.bias"])
    # zero gradient with decay: r = wd p, ratio ||p|| / ||wd p|| = 1 / wd, so p -> (1 - lr) p
    assert _rel(new["still.weight"], (1 - lr) * params["still.weight"]) <= OPTIM_RTOL
    # a generic tensor moves by exactly lr ||p|| in norm: the point of the trust ratio
    step = np.linalg.norm(new["moving.weight"] - params["moving.weight"])
    assert abs(step - lr * np.linalg.norm(params["moving.weight"])) <= OPTIM_RTOL * step


# --- schedules -------------------------------------------------------------------------------------


def test_warmup_cosine_at_chosen_steps():
    lr = optim.warmup_cosine(1.0, warmup_steps=4, total_steps=12, final_lr=0.2)
    # the cosine runs over the 8 steps 4..11: progress (s - 4) / 8
    want = {
        0: 0.0, 1: 0.25, 3: 0.75, 4: 1.0,
        6: 0.2 + 0.4 * (1 + math.sqrt(2) / 2),  # cos(pi / 4)
        8: 0.6,  # cos(pi / 2) = 0
        11: 0.2 + 0.4 * (1 - math.sqrt(2 + math.sqrt(2)) / 2),  # cos(7 pi / 8)
        12: 0.2, 1000: 0.2,
    }
    for step, value in want.items():
        assert lr(step) == pytest.approx(value, rel=FLOAT64_RTOL, abs=FLOAT64_RTOL), step
    no_warmup = optim.warmup_cosine(2.0, 0, 10)
    assert no_warmup(0) == 2.0 and no_warmup(5) == pytest.approx(1.0, rel=FLOAT64_RTOL)
    only_warmup = optim.warmup_cosine(1.0, 5, 5, final_lr=0.1)
    assert only_warmup(4) == 0.8 and only_warmup(5) == 0.1


def test_step_decay_at_chosen_steps():
    lr = optim.step_decay(0.1, boundaries=[3, 7], factors=[0.5, 0.01])
    got = [lr(s) for s in range(9)]
    want = [0.1] * 3 + [0.05] * 4 + [0.001] * 2
    assert got == pytest.approx(want, rel=FLOAT64_RTOL)


def test_schedule_errors_name_the_field():
    with pytest.raises(ValueError, match=r"total_steps: expected an int >= warmup_steps = 10, got 5"):
        optim.warmup_cosine(1.0, 10, 5)
    with pytest.raises(ValueError, match="peak_lr: expected a value >= 0, got -1"):
        optim.warmup_cosine(-1.0, 1, 5)
    with pytest.raises(ValueError, match=r"boundaries\[1\]: expected an int >= boundaries\[0\] \+ 1"):
        optim.step_decay(0.1, [5, 5], [0.1, 0.01])
    with pytest.raises(ValueError, match=r"factors: expected one factor per boundary \(2\), got 1"):
        optim.step_decay(0.1, [5, 8], [0.1])
    with pytest.raises(ValueError, match=r"factors\[0\]: expected a value >= 0"):
        optim.step_decay(0.1, [5], [-0.1])
    with pytest.raises(ValueError, match="step: expected an int >= 0, got -1"):
        optim.warmup_cosine(1.0, 1, 5)(-1)


# --- global-norm clipping --------------------------------------------------------------------------


def test_clip_by_global_norm(rng):
    grads = _params(rng)
    before = {k: v.copy() for k, v in grads.items()}
    want = np.linalg.norm(np.concatenate([g.ravel() for g in grads.values()]))
    clipped, norm = optim.clip_by_global_norm(grads, 0.5 * want)
    assert _rel(norm, want) <= FLOAT64_RTOL
    after = np.linalg.norm(np.concatenate([g.ravel() for g in clipped.values()]))
    assert _rel(after, 0.5 * want) <= FLOAT64_RTOL
    for k in grads:  # the direction is kept, the input untouched
        assert _rel(clipped[k], 0.5 * grads[k]) <= FLOAT64_RTOL
        assert np.array_equal(grads[k], before[k])
    same, norm2 = optim.clip_by_global_norm(grads, 2 * want)
    assert norm2 == norm and same is not grads
    assert all(same[k] is grads[k] for k in grads)  # under the limit: a no-op


def test_clip_keeps_float32_and_rejects_bad_input(rng):
    grads = {"a.weight": np.full((2, 2), 3.0, np.float32), "b.bias": np.full(1, 4.0, np.float32)}
    clipped, norm = optim.clip_by_global_norm(grads, 1.0)
    assert norm == math.sqrt(4 * 9 + 16) and all(g.dtype == np.float32 for g in clipped.values())
    with pytest.raises(ValueError, match="max_norm: expected a value > 0, got 0"):
        optim.clip_by_global_norm(grads, 0.0)
    with pytest.raises(ValueError, match=r"grads: the global norm is not finite; grads\['b.bias'\]"):
        optim.clip_by_global_norm({**grads, "b.bias": np.array([np.inf], np.float32)}, 1.0)


# --- weight decay mask -----------------------------------------------------------------------------


def test_default_decay_mask():
    decays = ["input_proj.weight", "cross.0.attn.q.weight", "self.3.ffn.down.weight",
              "decoder.output.weight", "decoder.attn.out.weight"]
    keeps = ["latents", "cross.0.attn.q.bias", "final_norm.gamma", "self.0.norm.beta",
             "decoder.queries", "pos", "input.pos"]
    assert all(optim.default_decay_mask(n) for n in decays)
    assert not any(optim.default_decay_mask(n) for n in keeps)


@pytest.mark.parametrize("make", [
    lambda mask: optim.sgd(0.1, weight_decay=0.5, decay_mask=mask),
    lambda mask: optim.adamw(0.1, weight_decay=0.5, decay_mask=mask),
    lambda mask: optim.lamb(0.1, weight_decay=0.5, decay_mask=mask),
])
def test_decay_mask_spares_latents_and_biases(rng, make):
    params = _params(rng)
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    for mask in (optim.default_decay_mask, None):
        opt = make(mask)
        new, _ = opt.update(params, zero, opt.init(params))  # with a zero gradient only decay moves
        for k in params:
            moved = not np.array_equal(new[k], params[k])
            assert moved == (mask is None or k.endswith(".weight")), k


def test_decay_mask_must_return_a_bool(rng):
    params = _params(rng)
    opt = optim.adamw(0.1, decay_mask=lambda name: "yes")
    with pytest.raises(TypeError, match=r"decay_mask\('cross.0.attn.q.weight'\): expected a bool, got str"):
        opt.update(params, params, opt.init(params))
    with pytest.raises(TypeError, match="decay_mask: expected a callable name -> bool or None, got str"):
        optim.sgd(0.1, decay_mask="weight")


# --- purity and the state ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda: optim.adamw(optim.warmup_cosine(0.1, 2, 10)),
    lambda: optim.lamb(0.01, weight_decay=0.1),
])
def test_update_is_pure_and_repeatable(rng, make):
    params = _params(rng)
    grad_seq = _grad_seq(rng, params, steps=3)
    opt = make()
    state = opt.init(params)
    state = opt.update(params, grad_seq[0], state)[1]  # a state with non-zero slots
    copies = [{k: v.copy() for k, v in d.items()} for d in (params, grad_seq[1], state)]
    new1, state1 = opt.update(params, grad_seq[1], state)
    new2, state2 = make().update(params, grad_seq[1], state)
    for original, copy in zip((params, grad_seq[1], state), copies, strict=True):
        assert all(np.array_equal(original[k], copy[k]) for k in copy)  # inputs untouched
    assert all(np.array_equal(new1[k], new2[k]) for k in new1)  # bit-identical
    assert all(np.array_equal(state1[k], state2[k]) for k in state1)
    inputs = [*params.values(), *grad_seq[1].values(), *state.values()]
    for out in [*new1.values(), *state1.values()]:
        assert not any(np.shares_memory(out, a) for a in inputs)


def test_state_is_flat_saves_to_npz_and_resumes_bit_identically(rng):
    params = _params(rng, np.float32)
    grad_seq = _grad_seq(rng, params, steps=4)
    opt = optim.adamw(optim.warmup_cosine(0.1, 1, 4))
    state = opt.init(params)
    assert sorted(state) == sorted(["step", *(f"{s}/{k}" for s in "mv" for k in params)])
    assert state["step"].shape == () and state["step"].dtype == np.int64
    assert all(state[f"m/{k}"].dtype == np.float32 for k in params)
    p, s = params, state
    for grads in grad_seq:
        p, s = opt.update(p, grads, s)
    p2, s2 = params, state
    for grads in grad_seq[:2]:
        p2, s2 = opt.update(p2, grads, s2)
    buf = io.BytesIO()
    np.savez(buf, **s2)
    buf.seek(0)
    with np.load(buf) as npz:
        s2 = {k: npz[k] for k in npz.files}
    for grads in grad_seq[2:]:
        p2, s2 = opt.update(p2, grads, s2)
    assert int(s2["step"]) == 4
    assert all(np.array_equal(p[k], p2[k]) and p2[k].dtype == np.float32 for k in p)


def test_sgd_without_momentum_keeps_only_the_step(rng):
    params = _params(rng)
    opt = optim.sgd(0.1)
    state = opt.init(params)
    assert list(state) == ["step"]
    new, state = opt.update(params, params, state)  # g = p: p - 0.1 p
    assert int(state["step"]) == 1
    assert all(_rel(new[k], 0.9 * params[k]) <= OPTIM_RTOL for k in params)


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: optim.sgd(-0.1), "lr: expected a value >= 0, got -0.1"),
    (lambda: optim.sgd(0.1, momentum=-0.5), r"momentum: expected a value in \[0.0, inf\), got -0.5"),
    (lambda: optim.sgd(0.1, nesterov=True), "nesterov: Nesterov momentum needs momentum > 0"),
    (lambda: optim.sgd(0.1, weight_decay=-1.0), "weight_decay: expected a value >= 0"),
    (lambda: optim.adamw(0.1, b1=1.0), r"b1: expected a value in \[0.0, 1.0\), got 1.0"),
    (lambda: optim.adamw(0.1, b2=-0.1), r"b2: expected a value in \[0.0, 1.0\), got -0.1"),
    (lambda: optim.lamb(0.1, eps=0.0), "eps: expected a value > 0, got 0.0"),
    (lambda: optim.lamb(float("nan")), "lr: expected a finite number, got nan"),
])
def test_hyperparameter_errors_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_update_errors_name_the_argument(rng):
    params = _params(rng)
    grads = _grad_seq(rng, params, steps=1)[0]
    opt = optim.adamw(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"grads: expected the keys of params; missing \['latents'\]"):
        opt.update(params, {k: v for k, v in grads.items() if k != "latents"}, state)
    with pytest.raises(ValueError, match=r"grads\['latents'\]: expected shape \(3, 4\) and dtype float64"):
        opt.update(params, {**grads, "latents": grads["latents"].T}, state)
    with pytest.raises(ValueError, match=r"grads\['latents'\]: .* got shape \(3, 4\) and dtype float32"):
        opt.update(params, {**grads, "latents": grads["latents"].astype(np.float32)}, state)
    with pytest.raises(ValueError, match=r"state: expected the keys of init\(params\); .*'v/latents'"):
        opt.update(params, grads, optim.sgd(0.1, momentum=0.9).init(params))
    with pytest.raises(ValueError, match=r"state\['step'\]: expected a 0-d int64 array >= 0"):
        opt.update(params, grads, {**state, "step": np.array(1.0)})
    with pytest.raises(TypeError, match=r"params\['latents'\]: expected dtype float32 or float64, got int64"):
        opt.init({**params, "latents": np.zeros((3, 4), dtype=np.int64)})
    bad = optim.sgd(lambda step: -1.0)
    with pytest.raises(ValueError, match=r"lr: the schedule returned -1\.0 at step 0"):
        bad.update(params, grads, bad.init(params))


# --- the description of an optimizer (stored in checkpoints, checked on resume) -------------------


def test_every_optimizer_describes_itself_as_json():
    cosine = optim.warmup_cosine(2e-3, 3, 12, final_lr=1e-5)
    assert cosine.spec == {"kind": "warmup_cosine", "peak_lr": 2e-3, "warmup_steps": 3,
                           "total_steps": 12, "final_lr": 1e-5}
    steps = optim.step_decay(0.1, (100, 200), [0.1, 0.01])
    assert steps.spec == {"kind": "step_decay", "lr": 0.1, "boundaries": [100, 200],
                          "factors": [0.1, 0.01]}
    assert optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4).spec == {
        "kind": "sgd", "lr": {"kind": "constant", "lr": 0.1}, "momentum": 0.9, "nesterov": True,
        "weight_decay": 1e-4, "decay_mask": "default"}
    assert optim.adamw(cosine, decay_mask=None).spec == {
        "kind": "adamw", "lr": cosine.spec, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "weight_decay": 0.01, "decay_mask": "all"}
    assert optim.lamb(steps, b2=0.99).spec == {
        "kind": "lamb", "lr": steps.spec, "b1": 0.9, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.0,
        "decay_mask": "default"}
    for opt in (optim.sgd(np.float64(0.5)), optim.adamw(cosine), optim.lamb(steps)):
        assert json.loads(json.dumps(opt.spec)) == opt.spec  # plain JSON values, no tuples
    assert optim.sgd(np.float64(0.5)).spec["lr"] == {"kind": "constant", "lr": 0.5}


def test_plain_callables_are_described_as_custom_unless_they_carry_a_spec():
    def mask(name):
        return name.endswith(".weight")

    opt = optim.adamw(lambda step: 1e-3, decay_mask=mask)
    assert opt.spec["lr"] == {"kind": "custom"} and opt.spec["decay_mask"] == "custom"

    def linear(step):
        return 1e-3 * (1 - step / 100)

    linear.spec = {"kind": "linear", "lr": 1e-3, "steps": 100}
    mask.spec = "weights only"
    opt = optim.adamw(linear, decay_mask=mask)
    assert opt.spec["lr"] == linear.spec and opt.spec["decay_mask"] == "weights only"
    assert optim.Optimizer(opt.init, opt.update).spec is None  # a hand-built optimizer: undescribed


def test_schedules_are_values():
    a, b = optim.warmup_cosine(1.0, 2, 10), optim.warmup_cosine(1.0, 2, 10)
    assert a == b and a != optim.warmup_cosine(1.0, 2, 11)
    with pytest.raises(AttributeError):
        a.total_steps = 20
    assert optim.step_decay(0.1, [3], [0.5]) == optim.step_decay(0.1, (3,), (0.5,))


# --- the global norm --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_is_one_float64_pass_that_keeps_nan_and_overflow(rng, dtype):
    """kernels.rows.sum_squares (what global_norm sums each tensor with): within float64
    rounding of NumPy's float64 sum of squares, for sizes around its blocks (4096 entries),
    views and a 3-D shape; the same bits on 1 and 2 threads; NaN for a NaN entry, inf for an
    infinite one and for squares whose sum overflows float64."""
    import numba

    from perceiver_np.kernels import rows

    for shape in ((0,), (1,), (4095,), (4097,), (3 * 4096 + 5,), (7, 300, 11)):
        x = rng.normal(size=shape).astype(dtype)
        want = float(np.sum(np.square(x, dtype=np.float64)))
        got = rows.sum_squares(x)
        assert got == want == 0.0 if x.size == 0 else _rel(got, want) <= FLOAT64_RTOL
    view = rng.normal(size=(300, 200)).astype(dtype)[:, ::3]
    assert _rel(rows.sum_squares(view), float(np.sum(np.square(view, dtype=np.float64)))) <= FLOAT64_RTOL
    big = rng.normal(size=200_000).astype(dtype)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = rows.sum_squares(big)
    finally:
        numba.set_num_threads(threads)
    assert rows.sum_squares(big) == one
    for bad, check in ((np.nan, math.isnan), (np.inf, math.isinf), (-np.inf, math.isinf)):
        y = big.copy()
        y[123_456] = bad
        assert check(rows.sum_squares(y))
    if dtype == np.float64:
        assert rows.sum_squares(np.full(3, 1e200)) == math.inf
    with pytest.raises(TypeError, match="x: expected a float32 or float64 array, got int64"):
        rows.sum_squares(np.ones(3, dtype=np.int64))


def test_global_norm_and_an_overflowing_norm(rng):
    grads = _params(rng)
    want = np.linalg.norm(np.concatenate([g.ravel() for g in grads.values()]))
    assert _rel(optim.global_norm(grads), want) <= FLOAT64_RTOL
    assert math.isnan(optim.global_norm({**grads, "latents": np.full((3, 4), np.nan)}))
    huge = {"a.weight": np.full(2, 1e200), "b.bias": np.ones(2)}  # finite, but sum g^2 overflows
    assert optim.global_norm(huge) == math.inf
    with pytest.raises(ValueError, match=r"grads: the global norm overflows float64; every entry is "
                                         r"finite, the largest \|g\| is 1e\+200 in grads\['a.weight'\]"):
        optim.clip_by_global_norm(huge, 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamw_kernel_is_bitwise_the_numpy_rule(rng, dtype, weight_decay):
    """backend="numba" (one pass per tensor, kernels.elementwise.adamw_update) against the
    NumPy rule line by line: every parameter and moment the same bits, step after step, with a
    schedule, the decay mask, and tensors above and below the kernel's parallel size."""
    shapes = {**SHAPES, "big.weight": (300, 257)}
    params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    lr = optim.warmup_cosine(3e-3, warmup_steps=2, total_steps=6)
    fast, plain = (optim.adamw(lr, b1=0.8, b2=0.99, eps=1e-6, weight_decay=weight_decay, backend=b)
                   for b in ("numba", "numpy"))
    state_f, state_p = fast.init(params), plain.init(params)
    p_f = p_p = params
    for _ in range(STEPS):
        grads = {k: (10 * rng.normal(size=v.shape)).astype(dtype) for k, v in params.items()}
        p_f, state_f = fast.update(p_f, grads, state_f)
        p_p, state_p = plain.update(p_p, grads, state_p)
        for k in p_p:
            np.testing.assert_array_equal(p_f[k], p_p[k], err_msg=k)
        for k in state_p:
            np.testing.assert_array_equal(state_f[k], state_p[k], err_msg=k)


def test_adamw_backend_is_named_when_bad():
    with pytest.raises(ValueError, match=r"^backend: expected 'numba' or 'numpy', got 'cuda'"):
        optim.adamw(1e-3, backend="cuda")
