"""The whole model: schema, parameter count, forward against the independent spec, gradient
checks over option combinations, masks, dtypes and error messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.gradcheck import check_model
from perceiver_np.model import step_names
from perceiver_np.tolerances import FAST_FLOAT64_RTOL, FLOAT64_RTOL, GRADCHECK_RTOL, float32_forward_rtol

from .helpers import small_opts
from .spec_model import spec_forward

SEED_PARAMS = 4_039_936


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _randomise(model, rng):
    """Replace every parameter by random values (biases, LN betas and gammas included), so
    that no gradient is trivially zero or one as at initialisation."""
    for name, v in model.params.items():
        if name.endswith("gamma"):
            model.params[name] = (1 + 0.3 * rng.normal(size=v.shape)).astype(v.dtype)
        elif name.endswith(("bias", "beta")):
            model.params[name] = (0.3 * rng.normal(size=v.shape)).astype(v.dtype)
    return model


# --- the parameter schema and count -------------------------------------------------------------


def test_seed_param_count_is_exact():
    model = pnp.build(input_dim=287)
    assert pnp.param_count(input_dim=287) == SEED_PARAMS
    assert model.param_count == sum(v.size for v in model.params.values()) == SEED_PARAMS
    assert model.params["latents"].dtype == np.float32


@pytest.mark.parametrize("c,d,m,layers,cross", [(287, 256, 64, 4, 1), (7, 16, 5, 5, 2), (3, 8, 2, 3, 3)])
def test_param_count_closed_form(c, d, m, layers, cross):
    # docs/architecture.md: M*D + (C*D + D) + cross*(12D^2 + 15D) + self*(12D^2 + 13D) + 2D
    want = m * d + (c * d + d) + cross * (12 * d * d + 15 * d) + layers * (12 * d * d + 13 * d) + 2 * d
    opts = dict(input_dim=c, latent_dim=d, num_latents=m, num_layers=layers, num_cross_layers=cross)
    assert pnp.param_count(**opts) == want == pnp.build(**opts).param_count


def test_param_count_follows_extended_options():
    opts = dict(input_dim=6, latent_dim=8, num_latents=3, num_layers=2, num_heads=2,
                input_projection=False, qk_channels=4, v_channels=2, cross_heads=1,
                cross_widening_factor=1, self_widening_factor=2, final_norm=False)
    model = pnp.build(**opts)
    assert pnp.param_count(**opts) == model.param_count
    assert model.params["cross.0.attn.k.weight"].shape == (6, 4)
    assert model.params["cross.0.attn.v.weight"].shape == (6, 2)
    assert model.params["cross.0.attn.out.weight"].shape == (2, 8)
    assert model.params["self.1.ffn.up.weight"].shape == (8, 16)
    assert "input_proj.weight" not in model.params and "final_norm.gamma" not in model.params


def test_seed_schema_is_the_public_contract():
    c, d, m, wd = 287, 256, 64, 1024
    want = {"input_proj.weight": (c, d), "input_proj.bias": (d,), "latents": (m, d)}
    lin = {"q": (d, d), "k": (d, d), "v": (d, d), "out": (d, d)}
    for i in range(1):
        pre = f"cross.{i}."
        for nrm in ("q_norm", "kv_norm", "ffn_norm"):
            want[pre + nrm + ".gamma"] = want[pre + nrm + ".beta"] = (d,)
        for k, shape in lin.items():
            want[f"{pre}attn.{k}.weight"], want[f"{pre}attn.{k}.bias"] = shape, (shape[1],)
        want[pre + "ffn.up.weight"], want[pre + "ffn.up.bias"] = (d, wd), (wd,)
        want[pre + "ffn.down.weight"], want[pre + "ffn.down.bias"] = (wd, d), (d,)
    for j in range(4):
        pre = f"self.{j}."
        for nrm in ("norm", "ffn_norm"):
            want[pre + nrm + ".gamma"] = want[pre + nrm + ".beta"] = (d,)
        for k, shape in lin.items():
            want[f"{pre}attn.{k}.weight"], want[f"{pre}attn.{k}.bias"] = shape, (shape[1],)
        want[pre + "ffn.up.weight"], want[pre + "ffn.up.bias"] = (d, wd), (wd,)
        want[pre + "ffn.down.weight"], want[pre + "ffn.down.bias"] = (wd, d), (d,)
    want["final_norm.gamma"] = want["final_norm.beta"] = (d,)
    got = {k: v.shape for k, v in pnp.build(input_dim=c).params.items()}
    assert got == want


def test_init_is_glorot_uniform_with_unit_gamma_and_zero_bias():
    model = pnp.build(input_dim=287, dtype="float64")
    w = model.params["self.0.ffn.up.weight"]  # [256, 1024]
    limit = np.sqrt(6 / (256 + 1024))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    assert abs(w.var() - limit**2 / 3) < 0.02 * limit**2 / 3  # U(-a, a) has variance a^2 / 3
    assert np.all(model.params["cross.0.q_norm.gamma"] == 1.0)
    assert np.all(model.params["cross.0.attn.q.bias"] == 0.0)
    lat = model.params["latents"]
    assert np.abs(lat).max() <= np.sqrt(6 / (64 + 256))


def test_seed_determines_the_weights():
    a, b = pnp.build(input_dim=5, seed=1), pnp.build(input_dim=5, seed=1)
    c = pnp.build(input_dim=5, seed=2)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["latents"], c.params["latents"])
    # float32 and float64 builds of one seed hold the same weights up to float32 rounding
    d = pnp.build(input_dim=5, seed=1, dtype="float64")
    assert all(np.array_equal(a.params[k], d.params[k].astype(np.float32)) for k in a.params)


# --- the forward is the architecture ------------------------------------------------------------

FORWARD_CASES = {
    "seed-small": {},
    "two-cross": {"num_layers": 4, "num_cross_layers": 2},
    "three-cross-uneven": {"num_layers": 4, "num_cross_layers": 3},
    "shared-blocks": {"num_blocks": 3},
    "shared-interleaved": {"num_layers": 3, "num_cross_layers": 2, "num_blocks": 2},
    "tanh": {"gelu": "tanh"},
    "widths": {"qk_channels": 4, "v_channels": 6, "cross_heads": 1},
    "deepmind-like": {"input_projection": False, "cross_heads": 1, "cross_widening_factor": 1,
                      "self_widening_factor": 1, "gelu": "tanh", "num_blocks": 2},
    "no-query-residual-no-final-norm": {"use_query_residual": False, "final_norm": False},
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_equals_the_spec(rng, case):
    model = _randomise(pnp.build(**small_opts(**FORWARD_CASES[case])), rng)
    x = rng.normal(size=(3, 6, 5))
    mask = np.array([[1, 1, 0, 1, 0, 1], [0] * 6, [1] * 6], dtype=bool)
    for mk in (None, mask):
        y = model(x, mk)
        assert y.shape == (3, model.config.latent_dim)
        assert _rel(y, spec_forward(model.config, model.params, x, mk)) <= FLOAT64_RTOL


def test_seed_forward_equals_the_spec(rng):
    model = pnp.build(input_dim=287, dtype="float64")
    x = rng.normal(size=(2, 33, 287))
    assert _rel(model(x), spec_forward(model.config, model.params, x)) <= FLOAT64_RTOL


def test_shared_blocks_are_reused_not_copied(rng):
    m1 = pnp.build(**small_opts(num_blocks=1))
    m2 = pnp.build(**small_opts(num_blocks=2))
    assert m1.params.keys() == m2.params.keys()
    assert m2.config.schedule == (("cross", 0), ("self", 0), ("self", 1), ("self", 0), ("self", 1))
    x = rng.normal(size=(2, 4, 5))
    assert _rel(m1(x), m2(x)) > 1e-3


# --- backward against finite differences, over option combinations -----------------------------

GRAD_CASES = {
    **FORWARD_CASES,
    "dropout-training": {"dropout": 0.2, "attention_dropout": 0.1, "num_blocks": 2},
    "dropout-training-two-cross": {"dropout": 0.3, "num_cross_layers": 2, "num_layers": 3},
}


#: The switches of the ports' structures (lucidrains' perceiver-pytorch, krasserm's perceiver-io);
#: tests/test_lucidrains.py holds their forward against the real package.
PORT_GRAD_CASES = {
    "geglu": {"ffn_kind": "geglu"},
    "no-qkv-bias": {"qkv_bias": False},
    "per-kind-widths": {"cross_qk_channels": 4, "cross_v_channels": 2, "self_qk_channels": 6,
                        "self_v_channels": 4},
    "tied-after-first": {"num_cross_layers": 2, "num_layers": 2, "block_order": (
        ("cross", 0), ("self", 0), ("cross", 1), ("self", 1), ("cross", 1), ("self", 1))},
    "input-fourier": {"input_fourier": "lucidrains", "input_index_dims": (2, 2), "input_num_bands": 2,
                      "input_max_freq": 6.0, "input_projection": False, "cross_heads": 1},
    "input-fourier-projected": {"input_fourier": "lucidrains", "input_index_dims": (4,),
                                "input_num_bands": 3},
    "pool-linear": {"decoder": "pool_linear", "output_dim": 3, "final_norm": False},
    "io-decoder-no-ffn": {"decoder": "query", "num_outputs": 3, "output_dim": 2, "decoder_ffn": False,
                          "ffn_kind": "geglu", "qkv_bias": False},
    "io-decoder-no-output": {"decoder": "query", "num_outputs": 2, "decoder_output": False,
                             "decoder_heads": 2},
    "lucidrains-like": {"ffn_kind": "geglu", "qkv_bias": False, "input_projection": False,
                        "cross_heads": 1, "cross_qk_channels": 6, "self_qk_channels": 4,
                        "masked_rows": "uniform", "final_norm": False, "decoder": "pool_linear",
                        "output_dim": 2, "num_cross_layers": 2, "num_layers": 2,
                        "block_order": (("cross", 0), ("self", 0), ("cross", 1), ("self", 1),
                                        ("cross", 1), ("self", 1))},
}


@pytest.mark.parametrize("case", list(PORT_GRAD_CASES))
def test_port_switch_gradients(rng, case):
    """Every switch of the ports' structures: the backward against central finite differences,
    and model(x) (the inference engine) equal to the layer-by-layer forward."""
    model = _randomise(pnp.build(**small_opts(**PORT_GRAD_CASES[case])), rng)
    x = rng.normal(size=(3, 4, 5))
    mask = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)  # partial, full, none
    report = check_model(model, x, mask, max_entries=12)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
    assert {r.name for r in report.rows} == {"x", *model.params}
    for mk in (None, mask[[0, 2]]):
        xs = x if mk is None else x[[0, 2]]
        assert _rel(model(xs, mk), model.forward(xs, mk)[0]) <= FAST_FLOAT64_RTOL


def test_block_order_shares_weights_and_names_each_use(rng):
    order = (("cross", 0), ("self", 0), ("cross", 1), ("self", 1), ("cross", 1), ("self", 1))
    model = pnp.build(**small_opts(num_cross_layers=2, num_layers=2, block_order=order))
    assert model.config.schedule == order
    assert not any(k.startswith(("cross.2", "self.2")) for k in model.params)
    assert step_names(model.config) == ["cross.0", "self.0", "cross.1.use0", "self.1.use0",
                                        "cross.1.use1", "self.1.use1"]
    # a config read back from JSON (lists) is the same config
    as_json = {**model.config.__dict__, "block_order": [list(s) for s in order]}
    assert pnp.PerceiverConfig(**as_json) == model.config
    for bad, match in (
        ((("self", 0), ("cross", 0), ("self", 1), ("cross", 1)),
         "the first step must be a cross block"),
        ((("cross", 0), ("self", 0), ("self", 1)),
         r"the cross steps must use each of the num_cross_layers=2"),
        ((("cross", 0), ("cross", 1), ("self", 0), ("self", 3)),
         r"self blocks \(indices 0..1\), got indices \[0, 3\]"),
        ((("cross", 0), ("mlp", 0)), "block_order: expected a non-empty tuple"),
    ):
        with pytest.raises(ValueError, match=match):
            pnp.build(**small_opts(num_cross_layers=2, num_layers=2, block_order=bad))
    with pytest.raises(ValueError, match="num_blocks: block_order lists every step"):
        pnp.build(**small_opts(num_blocks=2, block_order=(("cross", 0), ("self", 0), ("self", 1))))


def test_input_fourier_appends_lucidrains_features(rng):
    model = pnp.build(**small_opts(input_fourier="lucidrains", input_index_dims=(2, 3), input_num_bands=2,
                                   input_max_freq=5.0, input_projection=False, cross_heads=1))
    assert model.config.kv_channels == 5 + 2 * (2 * 2 + 1)
    rec: dict = {}
    x = rng.normal(size=(1, 6, 5))
    model.forward(x, record=rec)
    assert np.array_equal(rec["input"], x)  # the recorded input is the data, without the features
    with pytest.raises(ValueError, match=r"x: input_index_dims=\(2, 3\) makes N = 6 positions"):
        model(rng.normal(size=(1, 5, 5)))
    with pytest.raises(ValueError, match="input_fourier: the streaming encoder"):
        model.encode_stream(x)


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_model_gradients(rng, case):
    opts = GRAD_CASES[case]
    model = _randomise(pnp.build(**small_opts(**opts)), rng)
    x = rng.normal(size=(3, 4, 5))
    mask = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)  # partial, full, none
    training = model.config.dropout > 0 or model.config.attention_dropout > 0
    report = check_model(model, x, mask, training=training, max_entries=24)
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
    assert {r.name for r in report.rows} == {"x", *model.params}


def test_backward_returns_grads_keyed_like_params_in_the_model_dtype(rng):
    for dtype in ("float32", "float64"):
        model = pnp.build(**small_opts(dtype=dtype, num_blocks=2))
        y, cache = model.forward(rng.normal(size=(2, 3, 5)))
        grads, dx = model.backward(rng.normal(size=y.shape), cache)
        assert list(grads) == list(model.params)
        for k, g in grads.items():
            assert g.shape == model.params[k].shape and g.dtype == np.dtype(dtype), k
        assert dx.shape == (2, 3, 5) and dx.dtype == np.dtype(dtype)


def test_dropout_draws_are_reproducible_and_identity_at_inference(rng):
    model = pnp.build(**small_opts(dropout=0.5))
    x = rng.normal(size=(2, 4, 5))
    a, _ = model.forward(x, training=True, rng=np.random.default_rng(1))
    b, _ = model.forward(x, training=True, rng=np.random.default_rng(1))
    c, _ = model.forward(x, training=True, rng=np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    no_drop = pnp.Perceiver(dataclasses.replace(model.config, dropout=0.0), model.params)
    assert np.array_equal(model(x), no_drop(x))
    with pytest.raises(ValueError, match="rng"):
        model.forward(x, training=True)


# --- masks ---------------------------------------------------------------------------------------


def test_mask_invariance(rng):
    model = _randomise(pnp.build(**small_opts(num_cross_layers=2, num_layers=2)), rng)
    x = rng.normal(size=(2, 6, 5))
    mask = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 1, 0]], dtype=bool)
    x2 = x.copy()
    x2[~mask] = 100 * rng.normal(size=(int((~mask).sum()), 5))
    y1, c1 = model.forward(x, mask)
    y2, c2 = model.forward(x2, mask)
    assert np.array_equal(y1, y2)  # masked positions contribute exact zeros
    dy = rng.normal(size=y1.shape)
    g1, dx1 = model.backward(dy, c1)
    g2, dx2 = model.backward(dy, c2)
    assert np.all(dx1[~mask] == 0.0) and np.all(dx2[~mask] == 0.0)
    for name in g1:
        if not name.startswith(("input_proj", "cross.0.kv_norm", "cross.1.kv_norm")):
            assert np.array_equal(g1[name], g2[name]), name  # latent-side gradients: unchanged
    assert np.abs(dx1[mask]).min() > 0


def test_fully_masked_sample_is_finite_and_ignores_its_input(rng):
    for dtype in ("float32", "float64"):
        model = _randomise(pnp.build(**small_opts(dtype=dtype)), rng)
        x = rng.normal(size=(2, 4, 5))
        mask = np.array([[0, 0, 0, 0], [1, 1, 0, 1]], dtype=bool)
        y, cache = model.forward(x, mask)
        x_other = x.copy()
        x_other[0] = rng.normal(size=(4, 5))
        assert np.array_equal(y[0], model.forward(x_other, mask)[0][0])  # the reference path
        assert np.array_equal(model(x, mask)[0], model(x_other, mask)[0])  # the fast path
        grads, dx = model.backward(rng.normal(size=y.shape), cache)
        assert np.isfinite(y).all() and np.isfinite(dx).all()
        assert all(np.isfinite(g).all() for g in grads.values())
        assert np.all(dx[0] == 0.0)


def test_all_true_mask_equals_no_mask(rng):
    model = _randomise(pnp.build(**small_opts()), rng)
    x = rng.normal(size=(2, 4, 5))
    assert np.array_equal(model(x, np.ones((2, 4), dtype=bool)), model(x))


# --- float32 against float64 -----------------------------------------------------------------------


def _depth_and_width(cfg, n):
    """Dependent operations and widest sum of the forward, for float32_forward_rtol: the input
    projection; 12 per cross block (3 LN, q/k/v, scores, softmax, weighted sum, out, up, GELU,
    down); 11 per self block; final LN; mean."""
    self_steps = sum(1 for kind, _ in cfg.schedule if kind == "self")
    depth = 1 + 12 * cfg.num_cross_layers + 11 * self_steps + 2
    width = max(cfg.input_dim, cfg.kv_channels, n, cfg.num_latents,
                cfg.latent_dim * max(cfg.cross_widening_factor, cfg.self_widening_factor))
    return depth, width


def test_float32_forward_within_its_rounding_bound(rng):
    m32 = pnp.build(input_dim=287)
    m64 = pnp.build(input_dim=287, dtype="float64")
    x = rng.normal(size=(2, 200, 287))
    mask = rng.random((2, 200)) < 0.8
    y32 = m32(x.astype(np.float32), mask)
    y64 = m64(x, mask)
    err = _rel(y32.astype(np.float64), y64)
    bound = float32_forward_rtol(*_depth_and_width(m64.config, 200))
    assert err <= bound
    # the bound is a bound, not a guess: float32 really is this far from float64
    assert err > 1e-8


# --- bad input gets a clear error -------------------------------------------------------------------


def test_input_dtype_rules(rng):
    model = pnp.build(**small_opts(dtype="float32"))
    ints = rng.integers(-3, 3, size=(1, 4, 5))
    assert np.array_equal(model(ints), model(ints.astype(np.float32)))
    assert model(ints).dtype == np.float32
    for bad in (ints.astype(np.complex128), ints.astype(bool), ints.astype(str), ints.astype(object)):
        with pytest.raises(TypeError, match="x: expected real-valued"):
            model(bad)
    nan = ints.astype(float)
    nan[0, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"x: 1 non-finite value\(s\) \(NaN or inf\), first at index "
                                         r"\(0, 2, 1\)"):
        model(nan)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_of_the_model_dtype_is_named_on_every_path(rng, backend, dtype, value):
    """x already of the model's dtype is scanned once, by the range check's max |x| pass (not
    also by the cast): NaN and infinity still get the ValueError naming x, the count and the
    first index, from the call, the training forward, the stream and with Fourier positions."""
    model = pnp.build(**small_opts(dtype=dtype, backend=backend))
    x = rng.normal(size=(2, 6, 5)).astype(dtype)
    x[1, 4, 2] = value
    x[1, 5, 0] = value
    message = r"x: 2 non-finite value\(s\) \(NaN or inf\), first at index \(1, 4, 2\)"
    in_chunk = r"chunk: 2 non-finite value\(s\) \(NaN or inf\), first at index \(1, 1, 2\)"  # of [3, 6)
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):
        model.forward(x, training=True, rng=rng)
    with pytest.raises(ValueError, match=in_chunk):
        model.encode_stream(x, chunk_size=3)
    grid = pnp.build(**small_opts(dtype=dtype, backend=backend, input_fourier="lucidrains",
                                  input_index_dims=(6,)))
    with pytest.raises(ValueError, match=message):
        grid(x)


@pytest.mark.parametrize(
    "shape,match",
    [((4, 5), r"x: expected shape \[B, N, C\]"),
     ((1, 4, 6), r"x: expected shape \[B, N, C\] = \(\?, \?, 5\), got \(1, 4, 6\)"),
     ((1, 0, 5), "N >= 1")],
)
def test_input_shape_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        pnp.build(**small_opts())(np.zeros(shape))


def test_mask_errors(rng):
    model = pnp.build(**small_opts())
    x = rng.normal(size=(2, 4, 5))
    with pytest.raises(TypeError, match=r"mask: expected dtype bool .* a keep-mask \(Hugging Face's "
                                        r"attention_mask, DeepMind's input_mask: 1 = keep\) converts as "
                                        r"mask = keep.astype\(bool\); a padding mask"):
        model(x, np.ones((2, 4), dtype=int))
    with pytest.raises(TypeError, match=r"mask: expected dtype bool .* got float64; convert explicitly: "
                                        r"e.g. mask = \(padding == 0\)$"):
        model(x, np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"mask: expected shape \[B, N\] = \(2, 4\), got \(4,\)"):
        model(x, np.ones(4, dtype=bool))


def test_backward_errors(rng):
    model = pnp.build(**small_opts())
    _, cache = model.forward(rng.normal(size=(2, 4, 5)))
    with pytest.raises(ValueError, match=r"dy: expected shape \[B, D\] = \(2, 8\), got \(2, 7\)"):
        model.backward(np.zeros((2, 7)), cache)


def test_params_are_validated(rng):
    cfg = pnp.PerceiverConfig(**small_opts())
    good = pnp.init_params(cfg)
    with pytest.raises(ValueError, match=r"missing \['latents'\]"):
        pnp.Perceiver(cfg, {k: v for k, v in good.items() if k != "latents"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        pnp.Perceiver(cfg, {**good, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"params\['latents'\]: expected shape \(3, 8\), got \(8, 3\)"):
        pnp.Perceiver(cfg, {**good, "latents": good["latents"].T.copy()})
    with pytest.raises(TypeError, match=r"params\['latents'\]: expected dtype float64, got float32"):
        pnp.Perceiver(cfg, {**good, "latents": good["latents"].astype(np.float32)})
