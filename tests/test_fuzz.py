"""Fuzzing with random bad input (hypothesis): every public entry point either returns a correct
result or raises a ValueError / TypeError (CheckpointError is a ValueError) whose message
starts with the name of the argument or parameter at fault; the CLI exits 0, 1 or 2 without a
traceback. Never another exception, never NaN in a result."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
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
