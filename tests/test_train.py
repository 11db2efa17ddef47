"""The training step and loop: the gradient a step uses against finite differences of the loss
(dropout included), determinism, bit-identical resume, early stopping; the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import optim
from perceiver_np.cli import main as cli
from perceiver_np.gradcheck import gradcheck
from perceiver_np.tolerances import float32_forward_rtol
from perceiver_np.train import Loss, fit, init_state, loss_and_grads, train_step

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
    assert "cross_heads: 3 heads do not divide" in capsys.readouterr().err


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
