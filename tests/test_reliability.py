"""The model under bad input and faults: every failure is a clear ValueError/TypeError that
names the argument or parameter, the same on every path and size; nothing is silently used."""

from __future__ import annotations

import re

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import kernels
from perceiver_np.stream import NpyChunks


def _model(dtype="float32", **opts):
    return pnp.build(input_dim=6, latent_dim=16, num_latents=8, num_layers=1, num_heads=2, dtype=dtype,
                     **opts)


def _paths(dtype="float32"):
    """The fast path (model(x)), forward with the kernels, and the plain NumPy path (a model
    of backend "numpy" sharing the parameter dict)."""
    model = _model(dtype)
    plain = pnp.Perceiver(model.config.replace(backend="numpy"))
    plain.params = model.params
    return {"fast": lambda m, x: m(x), "forward": lambda m, x: m.forward(x)[0],
            "plain": lambda m, x: plain(x)}, model


@pytest.mark.parametrize("n", [10, 2000])
@pytest.mark.parametrize("path", ["fast", "forward", "plain"])
def test_a_nan_weight_is_named_on_every_path_and_size(n, path):
    """A NaN in input_proj.weight: at N = 2000 the fast path raised SystemError out of a Numba
    kernel, at N = 10 it returned NaN. Now every path and size names the parameter."""
    paths, model = _paths()
    model.params["input_proj.weight"] = model.params["input_proj.weight"].copy()
    model.params["input_proj.weight"][2, 3] = np.nan
    x = np.ones((2, n, 6), dtype=np.float32)
    with pytest.raises(ValueError, match=r"params\['input_proj.weight'\]: 1 non-finite value\(s\) "
                                         r"\(NaN or inf\), first at index \(2, 3\)"):
        paths[path](model, x)


@pytest.mark.parametrize("case", [{}, {"ffn_kind": "geglu", "qkv_bias": False},
                                  {"use_query_residual": False, "num_cross_layers": 2, "num_layers": 2}],
                         ids=["seed-like", "geglu-no-qkv-bias", "two-cross-no-query-residual"])
@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_every_weight_checked_through_the_products_is_still_named(monkeypatch, case, backend):
    """model(x) and encode_stream do not scan the weights of the engine's products
    (engine.product_weights) before they run: each product's output is looked at instead. A NaN,
    +inf or -inf anywhere in any one of those weights is still named, on both backends, with
    products small enough for the calling thread (N = 10, 8 latents of 16) and tiled ones (N =
    3000, 64 latents of 64: split by rows and by columns). The engine's check of each block's
    output is switched off here: what finds the bad value is a product of the block that reads
    the weight (tests/test_engine.py checks that each product raises by itself)."""
    from perceiver_np import engine

    monkeypatch.setattr(engine, "expect_finite_output", lambda name, array: None)
    rng = np.random.default_rng(0)
    sizes = (({"latent_dim": 16, "num_latents": 8}, 10), ({"latent_dim": 64, "num_latents": 64}, 3000))
    for size, n in sizes:
        model = pnp.build(input_dim=6, num_heads=2, dtype="float32", backend=backend, **size, **case)
        x = rng.standard_normal((1, n, 6)).astype(np.float32)
        names = sorted(engine.product_weights(model.config))
        assert len(names) == 6 * (model.config.num_cross_layers + len({i for k, i in model.config.schedule
                                                                         if k == "self"}))
        for j, name in enumerate(names):
            good = model.params[name]
            bad = good.copy()
            where = tuple(int(rng.integers(s)) for s in bad.shape)
            bad[where] = (np.nan, np.inf, -np.inf)[j % 3]
            model.params[name] = bad
            message = (re.escape(f"params['{name}']: 1 non-finite value(s) (NaN or inf), first at index ")
                       + re.escape(str(where)))
            for stream in (False, True):
                with pytest.raises(ValueError, match=message) as caught:
                    if stream:
                        model.encode_stream(x, chunk_size=max(1, n // 3))
                    else:
                        model(x)
                # what found it: a product of the block that reads the weight
                found = caught.value.__context__
                assert found.tensor == f"{name.split('.')[0]}.{name.split('.')[1]} output"
                assert found.detail.startswith("non-finite values in a product of the block")
            model.params[name] = good
        assert np.isfinite(model(x)).all()


@pytest.mark.parametrize("n", [10, 2000])
@pytest.mark.parametrize("path", ["fast", "forward", "plain"])
def test_finite_inputs_that_would_overflow_are_refused_alike(n, path):
    """Finite float32 inputs near 3e38 overflow in the projection: refused before anything is
    computed, with the same message on every path (it names x, its size and the bound)."""
    paths, model = _paths()
    x = np.full((2, n, 6), 3e38, dtype=np.float32)
    with pytest.raises(ValueError, match=r"x: values up to 3e\+38 are too large for float32: the input "
                                         r"projection x @ W_in \+ b_in \(params\['input_proj.weight'\]: "
                                         r"column sums of \|W_in\| up to .*\) could reach"):
        paths[path](model, x)
    x[:] = 1.0
    assert np.isfinite(paths[path](model, x)).all()


def test_an_overflow_inside_a_block_is_named_not_returned():
    """Finite parameters too large for float32 (a huge output weight): the step that overflows
    is named, on the fast and the plain path alike, instead of NaN reaching the output."""
    for backend in ("auto", "numpy"):
        model = pnp.Perceiver(_model().config.replace(backend=backend))
        model.params["self.0.ffn.down.weight"] = np.full_like(model.params["self.0.ffn.down.weight"], 3e38)
        with pytest.raises(ValueError, match=r"self.0(.use0)? output: .*non-finite.*an overflow"):
            model(np.ones((2, 50, 6), dtype=np.float32))


def test_edited_params_are_checked_on_every_call():
    model = _model("float64")
    x = np.ones((2, 5, 6))
    model.params["latents"] = np.zeros((9, 16))
    for call in (lambda: model(x), lambda: model.forward(x)):
        with pytest.raises(ValueError, match=r"params\['latents'\]: expected shape \(8, 16\), got \(9, 16\)"):
            call()
    model.params["latents"] = np.zeros((8, 16), dtype=np.float32)
    with pytest.raises(TypeError, match=r"params\['latents'\]: expected dtype float64, got float32"):
        model(x)
    del model.params["latents"]
    with pytest.raises(ValueError, match=r"params: missing \['latents'\]"):
        model(x)


def test_backward_refuses_a_cache_of_another_model_or_parameter_set():
    rng = np.random.default_rng(0)
    a, b = _model("float64"), pnp.build(input_dim=6, latent_dim=16, num_latents=4, num_layers=1,
                                         num_heads=2, dtype="float64")
    x = rng.standard_normal((2, 5, 6))
    y, cache = a.forward(x)
    dy = rng.standard_normal(y.shape)
    with pytest.raises(ValueError, match="cache: made by the forward of another Perceiver"):
        b.backward(dy, cache)
    twin = pnp.Perceiver(a.config, dict(a.params))  # same seed and weights, another model
    with pytest.raises(ValueError, match="cache: made by the forward of another Perceiver"):
        twin.backward(dy, cache)
    a.params["self.0.norm.gamma"] = a.params["self.0.norm.gamma"] * 2.0
    with pytest.raises(ValueError, match=r"cache: params\['self.0.norm.gamma'\] was replaced after"):
        a.backward(dy, cache)
    with pytest.raises(TypeError, match="cache: expected the ModelCache"):
        a.backward(dy, (1, 2))
    y, cache = a.forward(x)
    grads, _ = a.backward(dy, cache)  # a fresh forward is fine
    assert set(grads) == set(a.params)


def _signatures() -> int:
    from numba.core.registry import CPUDispatcher

    count = 0
    for module in (kernels.attention, kernels.gemm, kernels.rows, kernels.elementwise):
        for value in vars(module).values():
            if isinstance(value, CPUDispatcher):
                count += len(value.signatures)
    return count


def test_read_only_and_memory_mapped_inputs_reuse_the_compiled_kernels(tmp_path):
    """A read-only (memory-mapped) input and mask hit the signatures compiled for ordinary
    arrays: no kernel compiles again (it took 6 s on the first masked predict from a map)."""
    model = _model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3000, 6)).astype(np.float32)
    mask = np.ones((2, 3000), dtype=bool)
    mask[1, 2000:] = False
    want = model(x, mask)
    y, cache = model.forward(x, mask)
    model.backward(np.ones_like(y), cache)
    streamed = model.encode_stream(x, mask, chunk_size=1000)  # the chunk merge kernels too
    compiled = _signatures()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "m.npy", mask)
    xm, mm = np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "m.npy", mmap_mode="r")
    frozen = x.copy()
    frozen.flags.writeable = False
    assert np.array_equal(model(xm, mm), want)
    assert np.array_equal(model(frozen, np.asarray(mm)), want)
    y, cache = model.forward(xm, mm)
    model.backward(np.ones_like(y), cache)
    assert np.array_equal(model.encode_stream(xm, mm, chunk_size=1000), streamed)
    assert _signatures() == compiled


def test_stream_and_chunk_arguments_are_checked(tmp_path):
    model = _model("float64")
    x = np.ones((2, 10, 6))
    with pytest.raises(ValueError, match="mask_chunks: more mask chunks than input chunks"):
        model.encode_stream([x], [np.ones((2, 10), bool), np.ones((2, 3), bool)])
    np.save(tmp_path / "x.npy", x)
    for bad in (1.5, True, 0, -3, "8"):
        with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1"):
            NpyChunks(tmp_path / "x.npy", bad)
        with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1"):
            model.encode_stream(x, chunk_size=bad)


def test_heads_that_do_not_divide_name_the_option_given():
    with pytest.raises(ValueError, match=r"num_heads \(cross_heads defaults to it\): 3 heads"):
        pnp.build(input_dim=4, num_heads=3)
    with pytest.raises(ValueError, match=r"^cross_heads: 3 heads"):
        pnp.build(input_dim=4, cross_heads=3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_first_nonfinite_decides_by_entries_not_by_their_sum(dtype):
    """The quick test is a sum in the array's dtype: finite entries whose sum overflows are
    still finite, and an +inf beside a -inf (a NaN sum) is still named, with its count."""
    from perceiver_np.shapes import first_nonfinite

    big = np.finfo(dtype).max / 2
    rng = np.random.default_rng(0)
    finite = rng.uniform(0.9, 1.0, size=(5, 7)).astype(dtype) * big
    with np.errstate(over="ignore"):
        assert not np.isfinite(finite.sum())
    assert first_nonfinite("w", finite) is None
    bad = rng.standard_normal((5, 7)).astype(dtype)
    bad[1, 2], bad[3, 4] = np.inf, -np.inf
    assert first_nonfinite("w", bad) == "w: 2 non-finite value(s) (NaN or inf), first at index (1, 2)"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", ["exact", "tanh"])
def test_kernels_give_the_same_bits_wherever_their_arrays_lie(dtype, approximate):
    """A compiled loop has a vectorised copy and a scalar copy: the scalar one runs the last
    few entries, and the whole loop when the output may overlap an input (in place, or two
    small arrays allocated side by side). Both copies must round alike (kernels/_numba.py
    leaves out ``arcp`` for this), or the same input gives outputs an ulp apart from one call
    to the next as allocations move. Each case below runs one entry through both copies."""
    from perceiver_np.kernels import elementwise, rows

    rng = np.random.default_rng(7)
    x = (3 * rng.standard_normal(4099)).astype(dtype)  # 4099 = 3 mod 4, 8 and 16: a scalar tail
    dy = rng.standard_normal(x.shape).astype(dtype)
    tanh_form = approximate == "tanh"

    apart = np.empty_like(x)
    elementwise.gelu_segment(x, apart, tanh_form)
    inplace = x.copy()
    elementwise.gelu_segment(inplace, inplace, tanh_form)  # the overlap check: the scalar copy
    np.testing.assert_array_equal(inplace, apart, err_msg="GELU in place")
    shifted = np.empty_like(x[1:])
    elementwise.gelu_segment(x[1:], shifted, tanh_form)  # every entry one lane over
    np.testing.assert_array_equal(shifted, apart[1:], err_msg="GELU one entry over")

    dx = np.empty_like(x)
    elementwise._gelu_backward_segment(dy, x, dx, tanh_form)
    dx_inplace = dy.copy()
    elementwise._gelu_backward_segment(dx_inplace, x, dx_inplace, tanh_form)
    np.testing.assert_array_equal(dx_inplace, dx, err_msg="GELU backward in place")

    h = x.reshape(1, -1)
    bias = rng.standard_normal(h.shape[1]).astype(dtype)
    np.testing.assert_array_equal(rows.bias_gelu(h.copy(), bias, approximate),
                                  elementwise.gelu_forward(h + bias, approximate), err_msg="bias + GELU")

    t = (3 * rng.standard_normal((7, 4099))).astype(dtype)
    gamma, beta = rng.standard_normal((2, t.shape[1])).astype(dtype)
    ln = rows.layernorm(t, gamma, beta)
    np.testing.assert_array_equal(rows.layernorm(t.copy(), gamma, beta, out=t.copy()), ln)
    same = t.copy()
    np.testing.assert_array_equal(rows.layernorm(same, gamma, beta, out=same), ln, err_msg="LN in place")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_and_layernorm_backward_give_the_same_bits_wherever_their_arrays_lie(dtype):
    """The placement check above for the other row kernels: the residual add, the residual add
    then LayerNorm (also with its output over its input t, as the products' epilogues call it),
    LayerNorm's training forward and its backward, each with every array one entry past where
    NumPy puts it (the vectorised loop then starts on other lanes and the scalar tail covers
    other entries) against the arrays as allocated."""
    from perceiver_np.kernels import rows

    rng = np.random.default_rng(8)
    r, f = 7, 4099  # 4099 = 3 mod 4, 8 and 16: a scalar tail on every row

    def moved(a: np.ndarray) -> np.ndarray:
        buf = np.empty(a.size + 1, a.dtype)
        out = buf[1:].reshape(a.shape)
        out[...] = a
        return out

    z, t, dy = (rng.standard_normal((r, f)).astype(dtype) for _ in range(3))
    bias, gamma, beta = (rng.standard_normal(f).astype(dtype) for _ in range(3))

    want = rows.residual(z.copy(), t, bias)
    np.testing.assert_array_equal(rows.residual(moved(z), moved(t), moved(bias)), want, err_msg="residual")

    z1 = z.copy()
    want_ln = rows.residual_layernorm(z1, t, bias, gamma, beta)
    z2, t2 = moved(z), moved(t)
    got_ln = rows.residual_layernorm(z2, t2, moved(bias), moved(gamma), moved(beta), out=t2)  # over t
    np.testing.assert_array_equal(z2, z1, err_msg="residual + LN: the residual stream")
    np.testing.assert_array_equal(got_ln, want_ln, err_msg="residual + LN: the normalised rows")

    y, xhat, rstd = rows.layernorm_train(z, gamma, beta)
    for got, exp in zip(rows.layernorm_train(moved(z), moved(gamma), moved(beta)), (y, xhat, rstd),
                        strict=True):
        np.testing.assert_array_equal(got, exp, err_msg="LN training forward")
    want_back = rows.layernorm_backward(dy, xhat, rstd, gamma)
    got_back = rows.layernorm_backward(moved(dy), moved(xhat), moved(rstd), moved(gamma))
    for got, exp, name in zip(got_back, want_back, ("dx", "dgamma", "dbeta"), strict=True):
        np.testing.assert_array_equal(got, exp, err_msg=f"LN backward {name}")
