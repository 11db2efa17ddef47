"""The training step and loop: the gradient a step uses against finite differences of the loss
(dropout included), determinism, bit-identical resume, early stopping; the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import optim
from perceiver_np.cli import main as cli
from perceiver_np.gradcheck import gradcheck
from perceiver_np.tolerances import float32_forward_rtol
from perceiver_np.train import (
    Loss,
    NonFiniteError,
    TrainState,
    batches,
    evaluate,
    fit,
    init_state,
    loss_and_grads,
    train_step,
)

from .helpers import small_opts

CLASSIFIER = {"decoder": "classification", "output_dim": 3}


def _data(rng, count=40, n=6, c=5, classes=3):
    """A learnable task: the class is which third of the channels carries the largest mean."""
    x = rng.normal(size=(count, n, c))
    y = rng.integers(0, classes, size=count)
    x[np.arange(count), :, y] += 1.5
    return {"x": x, "y": y}


@pytest.mark.parametrize("case", ["classification", "query-mse"])
def test_the_step_gradient_equals_finite_differences_of_the_loss(rng, case):
    if case == "classification":
        model = pnp.build(**small_opts(**CLASSIFIER, dropout=0.2))
        mask = np.array([[1, 1, 0, 1, 1, 1], [1] * 6, [0, 0, 0, 1, 0, 0]], bool)
        batch = {**_data(rng, count=3), "mask": mask}
        loss = Loss("cross_entropy", label_smoothing=0.1)
    else:
        model = pnp.build(**small_opts(decoder="query", output_dim=2, num_outputs=4, dropout=0.2))
        batch = {"x": rng.normal(size=(2, 6, 5)), "y": rng.normal(size=(2, 4, 2)),
                 "query_mask": np.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)}
        loss = Loss("mse")
    for name, v in model.params.items():
        model.params[name] = v + 0.2 * rng.normal(size=v.shape)

    def value(t):  # the same dropout masks in every evaluation: a generator seeded the same way
        return np.asarray(loss_and_grads(model, t, batch, loss, np.random.default_rng(7))[0])

    def grads(t, dy):
        _, _, g = loss_and_grads(model, t, batch, loss, np.random.default_rng(7))
        return {k: v * dy for k, v in g.items()}

    report = gradcheck(value, grads, model.params, max_entries=6)
    assert report.max_rel_error <= pnp.tolerances.GRADCHECK_RTOL, str(report)


def test_a_step_follows_its_optimizer_and_learns(rng):
    model = pnp.build(**small_opts(**CLASSIFIER))
    data = _data(rng)
    opt = optim.adamw(3e-3)
    state = init_state(model, opt)
    rng_steps = np.random.default_rng(0)
    first, _, _ = train_step(model, data, Loss(), opt, state, rng_steps)
    for _ in range(60):
        value, metrics, state = train_step(model, data, Loss(), opt, state, rng_steps, clip_norm=1.0)
    assert state.step == 60 and metrics["grad_norm"] > 0
    assert value < 0.5 * first
    assert metrics["accuracy"] >= 0.9


def test_the_same_seed_gives_bit_identical_parameters(rng, tmp_path):
    data = _data(rng)
    runs = []
    for _ in range(2):
        model = pnp.build(**small_opts(**CLASSIFIER, dropout=0.1, dtype="float32"))
        state, _ = fit(model, optim.adamw(1e-3), Loss(), data, epochs=2, batch_size=16, seed=3,
                       progress=False)
        runs.append(state)
    assert all(np.array_equal(runs[0].params[k], runs[1].params[k]) for k in runs[0].params)


def test_resume_continues_bit_identically(rng, tmp_path):
    data, evald = _data(rng), _data(rng, count=12)

    def run(epochs, path, resume=False):
        model = pnp.build(**small_opts(**CLASSIFIER, dropout=0.1, dtype="float32"))
        return fit(model, optim.adamw(optim.warmup_cosine(2e-3, 3, 12)), Loss(), data, epochs=epochs,
                   batch_size=16, eval_data=evald, seed=5, checkpoint_path=path, resume=resume,
                   log_path=tmp_path / "log.jsonl", progress=False)

    full, full_hist = run(4, tmp_path / "full.npz")
    run(2, tmp_path / "half.npz")
    resumed, resumed_hist = run(4, tmp_path / "half.npz", resume=True)
    assert resumed.step == full.step
    for k in full.params:
        assert np.array_equal(full.params[k], resumed.params[k]), k
    for k in full.opt_state:
        assert np.array_equal(full.opt_state[k], resumed.opt_state[k]), k
    drop = ("seconds", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in full_hist.rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in resumed_hist.rows]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 1, 2, 3, 4]


def test_early_stopping(rng):
    data = _data(rng)
    model = pnp.build(**small_opts(**CLASSIFIER))
    # a learning rate of 0 never improves the evaluation loss: stop after `patience` epochs
    _, hist = fit(model, optim.sgd(0.0), Loss(), data, epochs=10, batch_size=20, eval_data=data,
                  patience=2, progress=False)
    assert len(hist.rows) == 3


def test_bad_loss_name():
    with pytest.raises(ValueError, match="loss: expected 'cross_entropy' or 'mse'"):
        Loss("hinge")


# --- the command line -----------------------------------------------------------------------------


def test_cli_info_and_gradcheck(capsys):
    assert cli(["info", "--input-dim", "287", "--length", "256"]) == 0
    out = capsys.readouterr().out
    assert "4,039,936" in out and "forward FLOPs" in out and "kept for the backward" in out
    assert "crossover: the Perceiver costs less from N = " in out
    assert cli(["gradcheck", "--input-dim", "5", "--latent-dim", "8", "--num-latents", "3",
                "--num-heads", "2", "--num-layers", "1", "--dropout", "0"]) == 0
    assert "worst:" in capsys.readouterr().out


def test_cli_train_eval_predict(rng, tmp_path, capsys):
    data = _data(rng)
    np.savez(tmp_path / "train.npz", x=data["x"].astype(np.float32), y=data["y"])
    np.save(tmp_path / "x.npy", data["x"][:5].astype(np.float32))
    flags = ["--input-dim", "5", "--latent-dim", "8", "--num-latents", "3", "--num-heads", "2",
             "--num-layers", "1", "--decoder", "classification", "--output-dim", "3"]
    ck = tmp_path / "ck.npz"
    assert cli(["train", *flags, "--data", str(tmp_path / "train.npz"), "--epochs", "2",
                "--batch-size", "16", "--out", str(ck), "--quiet"]) == 0
    assert cli(["eval", "--checkpoint", str(ck), "--data", str(tmp_path / "train.npz")]) == 0
    capsys.readouterr()
    assert cli(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "x.npy"),
                "--out", str(tmp_path / "y.npy")]) == 0
    y = np.load(tmp_path / "y.npy")
    model = pnp.checkpoint.load_checkpoint(ck)
    want = pnp.Perceiver(model.config, model.params)(data["x"][:5].astype(np.float32))
    assert y.shape == (5, 3) and np.array_equal(y, want)


def test_cli_reports_bad_options(capsys):
    assert cli(["info", "--input-dim", "3", "--num-heads", "3"]) == 2
    assert "3 heads do not divide" in capsys.readouterr().err


def test_cli_predict_ragged_sequences_and_stream(rng, tmp_path, capsys):
    cfg = pnp.PerceiverConfig(**small_opts(**CLASSIFIER, dtype="float32"))
    model = pnp.Perceiver(cfg)
    ck = tmp_path / "ck.npz"
    pnp.checkpoint.save_checkpoint(ck, config=cfg, params=model.params)
    seqs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (3, 7, 1, 5)]
    np.savez(tmp_path / "seqs.npz", *seqs)
    assert cli(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "seqs.npz"),
                "--out", str(tmp_path / "y.npy"), "--batch-size", "3", "--quiet"]) == 0
    y = np.load(tmp_path / "y.npy")
    tol = float32_forward_rtol(30, 64)  # float32, another batch composition and summation order
    for i, s in enumerate(seqs):  # padding and masking give each sequence's own output
        want = model(s[None])[0]
        assert np.abs(y[i] - want).max() <= tol * np.abs(want).max()
    x = rng.normal(size=(2, 50, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert cli(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "x.npy"), "--stream",
                "--chunk-size", "7", "--out", str(tmp_path / "ys.npy")]) == 0
    want = model(x)
    assert np.abs(np.load(tmp_path / "ys.npy") - want).max() <= tol * np.abs(want).max()
    assert "tokens/s" in capsys.readouterr().out


# --- a diverging run stops at the step it diverges, and the last good checkpoint stays -----------


def _all_finite(arrays):
    return all(np.isfinite(a).all() for a in arrays.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns of the overflow the test causes
def test_divergence_stops_at_its_step_and_keeps_the_good_checkpoint(rng, tmp_path):
    data = _data(rng)
    ck, log = tmp_path / "ck.npz", tmp_path / "log.jsonl"

    def run(optimizer):
        model = pnp.build(**small_opts(**CLASSIFIER, dtype="float32"))
        return fit(model, optimizer, Loss(), data, epochs=2, batch_size=16, seed=1,
                   checkpoint_path=ck, log_path=log, progress=False)

    good, _ = run(optim.sgd(1e-2))
    saved = ck.read_bytes()
    with pytest.raises(NonFiniteError) as info:
        run(optim.sgd(1e3))  # the reproducer of the issue: no clipping
    err = info.value
    assert err.epoch == 1 and 1 <= err.step <= 3  # 40 samples, batches of 16: 3 steps an epoch
    # whichever check sees the divergence first names it: a block's output that overflowed in
    # the forward (the model's own check), else the loss, a gradient, a parameter or a slot
    if err.tensor.endswith(" output"):
        assert f"step {err.step} (epoch 1): {err.tensor} overflowed, or would" in str(err)
    else:
        assert f"step {err.step} (epoch 1): {err.tensor} is not finite" in str(err)
        assert err.tensor == "loss" or err.tensor.startswith(("grads['", "params['", "opt_state['"))
    assert "checkpoint" in str(err)
    assert ck.read_bytes() == saved  # fit raised before writing: the good checkpoint is intact
    back = pnp.checkpoint.load_checkpoint(ck)
    assert _all_finite(back.params)
    assert all(np.array_equal(back.params[k], good.params[k]) for k in good.params)
    assert len(log.read_text().splitlines()) == 2  # the good run's two epochs, nothing more


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns of the overflow the test causes
def test_the_step_error_names_the_first_step_and_tensor_that_is_not_finite(rng):
    data = _data(rng, count=16)
    for dtype in ("float32", "float64"):
        model = pnp.build(**small_opts(**CLASSIFIER, dtype=dtype))
        opt = optim.sgd(1e3)
        state = init_state(model, opt)
        steps = np.random.default_rng(0)
        for _ in range(10):
            try:
                value, metrics, state = train_step(model, data, Loss(), opt, state, steps)
            except NonFiniteError as err:
                assert err.step == state.step + 1 and err.epoch is None
                assert str(err).startswith(f"step {err.step}: {err.tensor} ")
                break
            # every step that returned is finite throughout: no NaN reaches the next step
            assert math.isfinite(value) and math.isfinite(metrics["grad_norm"])
            assert _all_finite(state.params) and _all_finite(state.opt_state)
        else:
            pytest.fail(f"{dtype}: sgd(1e3) did not diverge in 10 steps")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns of the overflow the test causes
def test_the_step_checks_loss_then_gradients_then_parameters_then_slots(rng):
    model = pnp.build(**small_opts(decoder="query", output_dim=2, num_outputs=4))
    batch = {"x": rng.normal(size=(2, 6, 5)), "y": rng.normal(size=(2, 4, 2))}
    sgd = optim.sgd(1e-3)
    state = init_state(model, sgd)
    steps = np.random.default_rng(0)
    with pytest.raises(NonFiniteError, match=r"^step 1: loss is not finite \(inf\)") as info:
        train_step(model, {**batch, "y": np.full((2, 4, 2), 1e300)}, Loss("mse"), sgd, state, steps)
    assert info.value.tensor == "loss"

    # parameters after the update: lr * g overflows in the first tensor whose |g| is > 1.8
    _, _, grads = loss_and_grads(model, model.params, batch, Loss("mse"), np.random.default_rng(0))
    huge = optim.sgd(1e308)
    first = next(k for k, g in grads.items() if np.abs(g).max() > 1.8)
    with pytest.raises(NonFiniteError, match=rf"^step 1: params\['{first}'\] is not finite after the update"):
        train_step(model, batch, Loss("mse"), huge, init_state(model, huge), np.random.default_rng(0))

    # an optimizer slot after the update
    def update(params, grads, opt_state):
        new_state = {**opt_state, "step": opt_state["step"] + 1, "m/latents": np.full((3, 8), np.nan)}
        return dict(params), new_state

    nan_slot = optim.Optimizer(lambda p: {"step": np.zeros((), np.int64), "m/latents": p["latents"] * 0},
                               update)
    state = TrainState(dict(model.params), nan_slot.init(model.params), 7)
    with pytest.raises(NonFiniteError, match=r"^step 8: opt_state\['m/latents'\] is not finite after "
                                             r"the update \(24 NaN"):
        train_step(model, batch, Loss("mse"), nan_slot, state, steps)



def test_the_step_names_the_prediction_and_the_first_gradient_before_clipping(rng, monkeypatch):
    model = pnp.build(**small_opts(decoder="query", output_dim=2, num_outputs=4))
    batch = {"x": rng.normal(size=(2, 6, 5)), "y": rng.normal(size=(2, 4, 2))}
    sgd = optim.sgd(1e-3)
    state = init_state(model, sgd)
    forward, param_grads = pnp.Perceiver.forward, pnp.Perceiver.param_grads
    names = list(model.params)

    def nan_output(self, *args, **kwargs):
        y, cache = forward(self, *args, **kwargs)
        return np.where(np.arange(y.size).reshape(y.shape) == 3, np.nan, y), cache

    with monkeypatch.context() as m:  # checked before the loss, which would only say "pred: contains NaN"
        m.setattr(pnp.Perceiver, "forward", nan_output)
        with pytest.raises(NonFiniteError, match=r"^step 1: pred is not finite \(1 NaN and 0 infinite of 16"):
            train_step(model, batch, Loss("mse"), sgd, state, np.random.default_rng(0))

    def bad_grads(values):
        def patched(self, dy, cache):  # the step's backward: the grads, no dx
            grads = param_grads(self, dy, cache)
            return {**grads, **{k: np.full_like(grads[k], v) for k, v in values.items()}}
        return patched

    for values, tensor in [
        ({names[7]: np.inf, names[3]: np.nan}, f"grads[{names[3]!r}]"),  # the first in params order
        ({names[5]: 1e200}, "grad_norm"),  # every entry finite, but sum g^2 overflows float64
    ]:
        with monkeypatch.context() as m:
            m.setattr(pnp.Perceiver, "param_grads", bad_grads(values))
            with pytest.raises(NonFiniteError) as info:  # before clipping, which would raise ValueError
                train_step(model, batch, Loss("mse"), sgd, state, np.random.default_rng(0), clip_norm=1.0)
        assert info.value.tensor == tensor and info.value.step == 1
    assert "grad_norm overflows float64: every gradient entry is finite, the largest |g| is 1e+200" \
        in str(info.value)


def test_a_forward_that_overflows_in_a_step_is_a_non_finite_error(rng):
    """Finite parameters too large for float32: the model names the block whose output overflowed
    (a ValueError); inside a training step that is the run diverging, so the step's error."""
    model = pnp.build(**small_opts(**CLASSIFIER, dtype="float32"))
    params = dict(model.params)
    params["self.0.ffn.down.weight"] = np.full_like(params["self.0.ffn.down.weight"], 3e38)
    opt = optim.adamw(1e-3)
    batch = _data(rng, count=4)
    state = TrainState(params, opt.init(params), 5)
    want = r"^step 6: self.0(.use0)? output overflowed, or would: .*non-finite.*an overflow"
    with pytest.raises(NonFiniteError, match=want) as info:
        train_step(model, batch, Loss(), opt, state, np.random.default_rng(0))
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ValueError, match="an overflow"):  # outside a step, the model's own error
        loss_and_grads(model, params, batch, Loss(), np.random.default_rng(0))


def test_input_projection_weights_grown_too_large_are_the_step_s_error_not_the_input_s(rng):
    """The model refuses an input whose projection could overflow (max|x| times the largest
    column sum of |W_in|). When W_in has grown during training, that is the run diverging at
    this step: a NonFiniteError naming the step, whose message names the weights."""
    model = pnp.build(**small_opts(**CLASSIFIER, dtype="float32"))
    params = dict(model.params)
    params["input_proj.weight"] = np.full_like(params["input_proj.weight"], 1e37)
    opt = optim.adamw(1e-3)
    state = TrainState(params, opt.init(params), 2)
    want = (r"^step 3: x overflowed, or would: values up to .* too large for float32: the input projection "
            r".*params\['input_proj.weight'\]: column sums of \|W_in\| up to 5e\+37")
    with pytest.raises(NonFiniteError, match=want):
        train_step(model, _data(rng, count=4), Loss(), opt, state, np.random.default_rng(0))


def test_non_finite_error_is_a_floating_point_error_and_pickles():
    import pickle

    err = NonFiniteError(3, "grads['latents']", "is not finite (1 NaN)", epoch=2)
    assert isinstance(err, FloatingPointError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.step, back.tensor, back.epoch, str(back)) == (3, "grads['latents']", 2, str(err))
    assert str(err) == "step 3 (epoch 2): grads['latents'] is not finite (1 NaN)"


# --- resume: the run's settings are stored, and a resume with other settings is refused ----------


def _fit(data, path, epochs, optimizer=None, resume=False, **kwargs):
    model = pnp.build(**small_opts(**CLASSIFIER, dropout=0.1, dtype="float32"))
    opts = {"batch_size": 16, "seed": 5, "clip_norm": 1.0, **kwargs}
    return fit(model, optimizer or optim.adamw(1e-3), Loss(), data, epochs=epochs,
               checkpoint_path=path, resume=resume, progress=False, **opts)


def test_extending_epochs_with_a_constant_lr_resumes_bit_identically(rng, tmp_path):
    data = _data(rng)
    full, full_hist = _fit(data, tmp_path / "full.npz", 3)
    _fit(data, tmp_path / "part.npz", 2)
    resumed, resumed_hist = _fit(data, tmp_path / "part.npz", 3, resume=True)
    assert resumed.step == full.step == 9
    assert all(np.array_equal(full.params[k], resumed.params[k]) for k in full.params)
    assert all(np.array_equal(full.opt_state[k], resumed.opt_state[k]) for k in full.opt_state)
    assert [r["train_loss"] for r in full_hist.rows] == [r["train_loss"] for r in resumed_hist.rows]
    stored = pnp.checkpoint.load_checkpoint(tmp_path / "part.npz").extra["training"]
    assert stored == {"optimizer": optim.adamw(1e-3).spec, "batch_size": 16, "clip_norm": 1.0,
                      "seed": 5, "loss": {"name": "cross_entropy", "label_smoothing": 0.0,
                                          "ignore_index": None}, "train_samples": 40}


@pytest.mark.parametrize(("change", "fields"), [
    ({"optimizer": optim.lamb(optim.warmup_cosine(2e-3, 3, 12))},
     [r"optimizer\.kind: checkpoint 'adamw', now 'lamb'", r"optimizer\.eps: checkpoint 1e-08, now 1e-06",
      r"optimizer\.weight_decay: checkpoint 0\.01, now 0\.0"]),
    ({"optimizer": optim.adamw(optim.warmup_cosine(2e-3, 3, 18))},  # --epochs 4 -> 6 with a cosine
     [r"optimizer\.lr\.total_steps: checkpoint 12, now 18"]),
    ({"optimizer": optim.adamw(2e-3)},
     [r"optimizer\.lr\.kind: checkpoint 'warmup_cosine', now 'constant'",
      r"optimizer\.lr\.total_steps: checkpoint 12, now \(absent\)"]),
    ({"batch_size": 8}, [r"batch_size: checkpoint 16, now 8"]),
    ({"clip_norm": None}, [r"clip_norm: checkpoint 1\.0, now None"]),
    ({"seed": 6}, [r"seed: checkpoint 5, now 6"]),
])
def test_resume_refuses_other_settings_naming_each_field(rng, tmp_path, change, fields):
    data = _data(rng)
    ck, log = tmp_path / "ck.npz", tmp_path / "log.jsonl"
    _fit(data, ck, 2, optim.adamw(optim.warmup_cosine(2e-3, 3, 12)), log_path=log)
    saved, logged = ck.read_bytes(), log.read_text()
    kwargs = {"optimizer": optim.adamw(optim.warmup_cosine(2e-3, 3, 12)), **change}
    with pytest.raises(ValueError, match=r"resume: .* other training settings") as info:
        _fit(data, ck, 4, resume=True, log_path=log, **kwargs)
    for field in fields:
        assert __import__("re").search(field, str(info.value)), (field, str(info.value))
    assert ck.read_bytes() == saved and log.read_text() == logged  # refused before any work


def test_resume_refuses_settings_it_cannot_check(rng, tmp_path):
    data = _data(rng)
    ck = tmp_path / "ck.npz"

    def custom(step):
        return 1e-3

    _fit(data, ck, 1, optim.adamw(custom))
    with pytest.raises(ValueError, match=r"optimizer\.lr: a custom learning rate \(a callable without a "
                                         r"'spec'\) cannot be checked"):
        _fit(data, ck, 2, optim.adamw(custom), resume=True)
    custom.spec = {"kind": "flat", "lr": 1e-3}
    _fit(data, ck, 1, optim.adamw(custom))
    state, _ = _fit(data, ck, 2, optim.adamw(custom), resume=True)  # described: checked, accepted
    assert state.step == 6
    # a checkpoint fit did not write (no record of the settings) cannot be resumed either
    model = pnp.build(**small_opts(**CLASSIFIER, dropout=0.1, dtype="float32"))
    pnp.checkpoint.save_checkpoint(ck, config=model.config, params=model.params)
    with pytest.raises(ValueError, match=r"resume: .* holds no record of the training settings"):
        _fit(data, ck, 2, resume=True)


def test_cli_resume_with_more_epochs_and_a_cosine_schedule_is_refused(rng, tmp_path, capsys):
    data = _data(rng)
    np.savez(tmp_path / "train.npz", x=data["x"].astype(np.float32), y=data["y"])
    flags = ["--input-dim", "5", "--latent-dim", "8", "--num-latents", "3", "--num-heads", "2",
             "--num-layers", "1", "--decoder", "classification", "--output-dim", "3",
             "--data", str(tmp_path / "train.npz"), "--batch-size", "16", "--quiet"]
    ck = tmp_path / "ck.npz"
    assert cli(["train", *flags, "--epochs", "2", "--out", str(ck)]) == 0
    capsys.readouterr()
    assert cli(["train", *flags, "--epochs", "3", "--out", str(ck), "--resume"]) == 2
    assert "optimizer.lr.total_steps: checkpoint 6, now 9" in capsys.readouterr().err
    # with a constant learning rate, more epochs continue exactly as one longer run
    const = [*flags, "--schedule", "constant"]
    assert cli(["train", *const, "--epochs", "3", "--out", str(tmp_path / "full.npz")]) == 0
    assert cli(["train", *const, "--epochs", "2", "--out", str(ck)]) == 0
    assert cli(["train", *const, "--epochs", "3", "--out", str(ck), "--resume"]) == 0
    full, resumed = (pnp.checkpoint.load_checkpoint(p) for p in (tmp_path / "full.npz", ck))
    assert all(np.array_equal(full.params[k], resumed.params[k]) for k in full.params)


# --- arguments that would make fit or evaluate a silent no-op are refused before any work ------


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"epochs": -1}, ValueError, r"epochs: expected an integer >= 1, got -1"),
    ({"epochs": 0}, ValueError, r"epochs: expected an integer >= 1, got 0"),
    ({"epochs": 2.0}, TypeError, r"epochs: expected an integer >= 1, got 2\.0"),
    ({"batch_size": -1}, ValueError, r"batch_size: expected an integer >= 1, got -1"),
    ({"batch_size": True}, TypeError, r"batch_size: expected an integer >= 1, got True"),
    ({"patience": 0}, ValueError, r"patience: expected None or an integer >= 1, got 0"),
    ({"seed": -1}, ValueError, r"seed: expected an integer >= 0, got -1"),
    ({"clip_norm": 0.0}, ValueError, r"clip_norm: expected None or a finite number > 0, got 0\.0"),
    ({"clip_norm": float("nan")}, ValueError, r"clip_norm: expected None or a finite number > 0, got nan"),
    ({"train_data": {"x": np.zeros((0, 6, 5)), "y": np.zeros(0, int)}}, ValueError,
     r"train_data: expected at least one sample, got 0"),
    ({"train_data": "cut"}, ValueError, r"train_data: every array needs one row per sample like x \(40\); "
                                        r"'y' has 39"),
    ({"train_data": "mask"}, ValueError, r"train_data: every array needs one row per sample like x \(40\); "
                                         r"'mask' has 41"),
    ({"train_data": {"y": np.zeros(4, int)}}, ValueError, r"train_data: 'x' is missing"),
    ({"train_data": {"x": np.zeros((4, 6, 5))}}, ValueError, r"train_data: 'y' is missing"),
    ({"train_data": {"x": np.zeros((4, 6, 5)), "y": [0, 1, 2, 0]}}, TypeError,
     r"train_data\['y'\]: expected a numpy\.ndarray, got list"),
    ({"eval_data": "cut"}, ValueError, r"eval_data: every array needs one row per sample like x \(40\); "
                                       r"'y' has 39"),
    ({"optimizer": "adamw"}, TypeError, r"optimizer: expected an optim\.Optimizer, got str"),
    ({"loss": "mse"}, TypeError, r"loss: expected a train\.Loss, got str"),
])
def test_fit_refuses_bad_arguments_before_any_work(rng, tmp_path, kwargs, error, message):
    data = _data(rng)
    for key, value in list(kwargs.items()):
        if value == "cut":
            kwargs[key] = {"x": data["x"], "y": data["y"][:-1]}
        elif value == "mask":
            kwargs[key] = {**data, "mask": np.ones((41, 6), bool)}
    args = {"model": pnp.build(**small_opts(**CLASSIFIER)), "optimizer": optim.adamw(1e-3),
            "loss": Loss(), "train_data": data, "epochs": 2, "batch_size": 16}
    args.update(kwargs)
    ck, log = tmp_path / "ck.npz", tmp_path / "log.jsonl"
    with pytest.raises(error, match=message):
        fit(**args, checkpoint_path=ck, log_path=log, progress=False)
    assert not ck.exists() and not log.exists()


def test_resume_refuses_fewer_epochs_than_the_checkpoint_holds(rng, tmp_path):
    data = _data(rng)
    _fit(data, tmp_path / "ck.npz", 3)
    with pytest.raises(ValueError, match=r"epochs: expected an integer >= 3 \(the checkpoint's epoch\) "
                                         r"when resuming, got 2"):
        _fit(data, tmp_path / "ck.npz", 2, resume=True)
    state, hist = _fit(data, tmp_path / "ck.npz", 3, resume=True)  # nothing left to do: the same state
    assert state.step == 9 and len(hist.rows) == 3


def test_evaluate_and_batches_refuse_bad_arguments(rng):
    model = pnp.build(**small_opts(**CLASSIFIER))
    data = _data(rng, count=5)
    with pytest.raises(ValueError, match=r"batch_size: expected an integer >= 1, got -1"):
        evaluate(model, model.params, data, Loss(), batch_size=-1)
    with pytest.raises(ValueError, match=r"data: expected at least one sample, got 0"):
        evaluate(model, model.params, {"x": data["x"][:0], "y": data["y"][:0]}, Loss())
    with pytest.raises(ValueError, match=r"data: every array needs one row per sample like x \(5\); "
                                         r"'y' has 4"):
        evaluate(model, model.params, {"x": data["x"], "y": data["y"][:4]}, Loss())
    with pytest.raises(TypeError, match=r"batch_size: expected an integer >= 1, got 0\.5"):
        batches(data, 0.5)
    assert [len(b["x"]) for b in batches(data, 2)] == [2, 2, 1]


def test_the_steps_model_scans_each_parameter_once_and_a_replaced_one_again(rng, monkeypatch):
    """loss_and_grads builds the step's model (its constructor scans every parameter for NaN and
    inf) and runs its forward and backward inside ``holding_params``: neither scans the values
    again. Outside the block, or for an array replaced inside it, every call checks in full."""
    import perceiver_np.model as model_module

    model = pnp.build(**small_opts(**CLASSIFIER))
    batch = {"x": rng.normal(size=(3, 6, 5)), "y": rng.integers(0, 3, size=3)}
    scanned: list[str] = []
    scan = model_module.first_nonfinite

    def counting(name: str, array: np.ndarray) -> str | None:
        scanned.append(name)
        return scan(name, array)

    monkeypatch.setattr(model_module, "first_nonfinite", counting)
    loss_and_grads(model, model.params, batch, Loss(), np.random.default_rng(0))
    assert sorted(scanned) == sorted(f"params[{k!r}]" for k in model.params)  # once each

    scanned.clear()
    with model.holding_params():
        model.forward(batch["x"])
        model.forward(batch["x"])
        assert sorted(scanned) == sorted(f"params[{k!r}]" for k in model.params)  # on entry only
        name = next(iter(model.params))
        model.params[name] = np.full_like(model.params[name], np.nan)  # replaced: checked again
        with pytest.raises(ValueError, match=rf"^params\['{name}'\]: \d+ non-finite value"):
            model.forward(batch["x"])
    model.params[name] = np.zeros_like(model.params[name])
    scanned.clear()
    model.forward(batch["x"])
    model.forward(batch["x"])  # outside the block: each call scans every parameter
    assert len(scanned) == 2 * len(model.params)
