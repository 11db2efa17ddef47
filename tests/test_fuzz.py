"""Fuzzing with random bad input (hypothesis): every public entry point either returns a correct
result or raises a ValueError / TypeError (CheckpointError is a ValueError) whose message
starts with the name of the argument or parameter at fault; the CLI exits 0, 1 or 2 without a
traceback. Never another exception, never NaN in a result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import perceiver_np as pnp

#: The model every case runs: small, so that a case costs milliseconds.
C, M, D = 3, 4, 8

MODEL = pnp.build(input_dim=C, latent_dim=D, num_latents=M, num_layers=1, num_heads=2, dtype="float64")
MODEL32 = pnp.build(input_dim=C, latent_dim=D, num_latents=M, num_layers=1, num_heads=2)

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_, np.complex64,
          np.dtype("U3"), np.dtype(object), np.dtype(">f8")]
SPECIALS = [0.0, 1.0, -2.5, np.nan, np.inf, -np.inf, 1e38, 3.4e38, 1e300, 1e-320]


@st.composite
def arrays(draw, good_shape: tuple[int, ...]):
    """An array that is often almost right: the right shape with a wrong dtype or a special
    value, or a wrong shape (an axis off by one, one missing or extra, an empty one)."""
    kind = draw(st.sampled_from(["shape", "dtype", "value", "scalar", "list", "none", "good"]))
    shape = list(good_shape)
    if kind == "shape":
        op = draw(st.sampled_from(["grow", "shrink", "drop", "add", "zero"]))
        i = draw(st.integers(0, max(0, len(shape) - 1)))
        if op == "grow" and shape:
            shape[i] += 1
        elif op == "shrink" and shape and shape[i] > 1:
            shape[i] -= 1
        elif op == "drop" and shape:
            shape.pop(i)
        elif op == "add":
            shape.insert(i, 2)
        elif shape:
            shape[i] = 0
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = rng.standard_normal(shape)
    if kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES))
        a = a.astype(dtype) if np.dtype(dtype).kind != "O" else a.astype(object)
    if kind == "value" and a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(SPECIALS))
    if kind == "scalar":
        return draw(st.sampled_from([1, 2.5, "x", True]))
    if kind == "list":
        return a.tolist()
    if kind == "none":
        return None
    return a


@st.composite
def masks(draw, b: int, n: int):
    kind = draw(st.sampled_from(["good", "none", "other"]))
    if kind == "none":
        return None
    if kind == "good":
        return np.random.default_rng(draw(st.integers(0, 99))).random((b, n)) > 0.3
    return draw(arrays((b, n)))


def _names_the_argument(err: BaseException, names: tuple[str, ...]) -> bool:
    text = str(err)
    return any(text.startswith(n) for n in names)


@given(st.data())
@settings(max_examples=150)
def test_model_call_and_forward(data):
    b, n = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    model = data.draw(st.sampled_from([MODEL, MODEL32]))
    x = data.draw(arrays((b, n, C)))
    mask = data.draw(masks(b, n))
    how = data.draw(st.sampled_from(["call", "forward"]))
    try:
        y = model(x, mask) if how == "call" else model.forward(x, mask)[0]
    except (ValueError, TypeError) as err:
        assert _names_the_argument(err, ("x:", "mask:")), repr(err)
        return
    assert y.shape == (np.shape(x)[0], D) and y.dtype == model.config.np_dtype
    assert np.isfinite(y).all()


@given(st.data())
@settings(max_examples=100)
def test_backward(data):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, C))
    y, cache = MODEL.forward(x)
    dy = data.draw(arrays(y.shape))
    try:
        grads, dx = MODEL.backward(dy, cache)
    except (ValueError, TypeError) as err:
        assert _names_the_argument(err, ("dy:",)), repr(err)
        return
    assert dx.shape == x.shape and set(grads) == set(MODEL.params)
    assert all(np.isfinite(g).all() for g in grads.values()) and np.isfinite(dx).all()


@given(st.data())
@settings(max_examples=100)
def test_edited_parameters(data):
    model = pnp.Perceiver(MODEL.config, {k: v.copy() for k, v in MODEL.params.items()})
    name = data.draw(st.sampled_from(sorted(model.params)))
    edit = data.draw(st.sampled_from(["array", "delete", "extra"]))
    if edit == "array":
        model.params[name] = data.draw(arrays(model.params[name].shape))
    elif edit == "delete":
        del model.params[name]
    else:
        model.params["nonsense.weight"] = np.zeros(2)
    try:
        y = model(np.ones((2, 3, C)))
    except (ValueError, TypeError) as err:
        assert _names_the_argument(err, (f"params[{name!r}]", "params:")), repr(err)
        return
    assert np.isfinite(y).all()


# ---- the command line --------------------------------------------------------------------------

CLI_MODEL = ["--input-dim", "3", "--latent-dim", "8", "--num-latents", "4", "--num-heads", "2",
             "--num-layers", "1", "--decoder", "classification", "--output-dim", "2"]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """Good and bad files every CLI case draws from."""
    from perceiver_np import checkpoint, verify

    root = tmp_path_factory.mktemp("fuzz_cli")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 3)).astype(np.float32)
    np.savez(root / "data.npz", x=x, y=rng.integers(0, 2, size=6))
    np.savez(root / "no_y.npz", x=x)
    np.savez(root / "short.npz", x=x, y=np.zeros(2, dtype=int))
    np.save(root / "x.npy", x)
    np.save(root / "bad.npy", np.full((2, 5, 3), np.nan, dtype=np.float32))
    (root / "text.npz").write_text("x,y\n1,2\n")
    (root / "dir").mkdir()
    model = pnp.build(**{k[2:].replace("-", "_"): (int(v) if v.isdigit() else v)
                         for k, v in zip(CLI_MODEL[::2], CLI_MODEL[1::2], strict=True)})
    checkpoint.save_checkpoint(root / "ck.npz", config=model.config, params=model.params)
    small = pnp.build(input_dim=3, latent_dim=4, num_latents=2, num_heads=1, num_layers=1, dtype="float64")
    verify.write_golden(root / "golden.npz", small, rng.standard_normal((2, 4, 3)))
    inputs = ["data.npz", "no_y.npz", "short.npz", "x.npy", "bad.npy", "text.npz", "dir", "missing.npz",
              "ck.npz", "golden.npz"]
    outputs = ["out.npz", "out.npy", "dir", "nowhere/out.npz", "data.npz/out.npz"]  # inputs stay intact
    return [str(root / n) for n in inputs], [str(root / n) for n in outputs]


VALUES = ["0", "-1", "0.5", "nan", "inf", "-0.1", "1e9", "abc", ""]


def _often(data, good: str, bad: list[str]) -> str:
    """``good`` two times in three, else one of ``bad``: most cases get far enough to compute."""
    return data.draw(st.sampled_from([good] * 2 * len(bad) + bad))


@given(st.data())
@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cli_never_shows_a_traceback(cli_files, capsys, data):
    """Random commands with random (often bad) values and paths: the exit status is 0, 1 or 2,
    a failure prints one ``perceiver-np <command>: error:`` line or argparse's usage message,
    and no exception escapes ``main``."""
    from perceiver_np.cli import main

    inputs, outputs = cli_files
    data_npz, x_npy, ck, golden = inputs[0], inputs[3], inputs[8], inputs[9]
    command = data.draw(st.sampled_from(["train", "eval", "predict", "info", "compare", "golden"]))

    def path(good: str) -> str:
        return _often(data, good, [p for p in inputs if p != good])

    def out(good: str) -> str:
        return _often(data, good, [p for p in outputs if p != good])

    def value(good: str) -> str:
        return _often(data, good, VALUES)

    argv = [command]
    if command == "train":
        argv += [*CLI_MODEL, "--data", path(data_npz), "--out", out(outputs[0]), "--quiet",
                 "--epochs", value("1"), "--batch-size", value("4")]
        if data.draw(st.booleans()):
            flag, good = data.draw(st.sampled_from([("--lr", "0.01"), ("--warmup", "0.1"),
                                                    ("--clip-norm", "1"), ("--patience", "1"),
                                                    ("--weight-decay", "0.1"), ("--label-smoothing", "0.1")]))
            argv += [flag, value(good)]
    elif command == "eval":
        argv += ["--checkpoint", path(ck), "--data", path(data_npz), "--batch-size", value("4")]
    elif command == "predict":
        argv += ["--checkpoint", path(ck), "--input", path(x_npy), "--out", out(outputs[1]),
                 "--batch-size", value("4"), "--quiet"]
        if data.draw(st.booleans()):
            argv += ["--stream", "--chunk-size", value("2")]
    elif command == "info":
        flag, good = data.draw(st.sampled_from([("--latent-dim", "16"), ("--num-latents", "4"),
                                                ("--num-heads", "2"), ("--num-layers", "2"),
                                                ("--dropout", "0.1")]))
        argv += ["--input-dim", value("3"), flag, value(good), "--length", value("64")]
    elif command == "compare":
        argv += [path(golden), path(golden)] + (["--allow-missing"] if data.draw(st.booleans()) else [])
    else:
        argv += ["--input-dim", "3", "--latent-dim", "4", "--num-latents", "2", "--num-heads", "1",
                 "--num-layers", "1", "--length", value("4"), "--batch", value("2"), "--out", out(outputs[0])]
    try:
        code = main(argv)
    except SystemExit as exc:  # pragma: no cover - main returns argparse's status instead
        code = exc.code
    err = capsys.readouterr().err  # this example's output only: each one reads it all
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert f"perceiver-np {command}: error:" in err or "usage:" in err, (argv, err)


# ---- training -----------------------------------------------------------------------------------

FIT_ARGS = ("epochs", "batch_size", "seed", "clip_norm", "patience", "train_data", "eval_data",
            "optimizer", "loss", "resume")


@given(st.data())
@settings(max_examples=100)
def test_fit(data):
    """fit with one argument replaced by a random (mostly bad) value, or the data with a random
    bad array: a ValueError/TypeError naming that argument before any step, or a run whose
    parameters are all finite."""
    from perceiver_np import optim, train

    model = pnp.build(input_dim=C, latent_dim=D, num_latents=M, num_layers=1, num_heads=2,
                      decoder="classification", output_dim=2, dtype="float64")
    rng = np.random.default_rng(0)
    good = {"x": rng.standard_normal((5, 4, C)), "y": rng.integers(0, 2, size=5)}
    kwargs: dict = dict(epochs=1, batch_size=2, seed=0, clip_norm=None, patience=None, train_data=good,
                        eval_data=None, optimizer=optim.adamw(1e-3), loss=train.Loss(), resume=False)
    name = data.draw(st.sampled_from(FIT_ARGS))
    if name in ("train_data", "eval_data"):
        key = data.draw(st.sampled_from(["x", "y", "mask", "drop-x", "drop-y"]))
        value = dict(good)
        if key.startswith("drop-"):
            del value[key[5:]]
        else:
            shape = {"x": (5, 4, C), "y": (5,), "mask": (5, 4)}[key]
            value[key] = data.draw(arrays(shape))
    else:
        value = data.draw(st.sampled_from([0, -1, 1, 2, 1.5, True, None, "2", np.nan, np.inf, 10**12,
                                           np.int64(2), [1]]))
    kwargs[name] = value
    if name == "epochs" and isinstance(value, int) and value > 3:
        kwargs[name] = 3  # a correct value: keep the run short
    if name == "batch_size" and isinstance(value, int) and value > 10**6:
        kwargs[name] = value  # larger than the data: one batch
    optimizer, loss, train_data = kwargs.pop("optimizer"), kwargs.pop("loss"), kwargs.pop("train_data")
    try:
        state, _ = train.fit(model, optimizer, loss, train_data, progress=False, **kwargs)
    except (ValueError, TypeError) as err:
        also = ("checkpoint_path",) if name == "resume" else ()  # resume=True needs a checkpoint
        assert _names_the_argument(err, (name, *also)), repr(err)
        return
    except FloatingPointError as err:  # train.NonFiniteError: a diverging run, named by step
        assert str(err).startswith("step "), repr(err)
        return
    assert all(np.isfinite(v).all() for v in state.params.values())
