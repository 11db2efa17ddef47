"""Reduced precision (perceiver_np.precision, perceiver-np precision-report): the rounding
functions bit-exact against ml_dtypes and torch, the emulation's rounding at every golden
activation (each one rounded, each one read downstream, the forward unchanged without it), the
report's numbers against the test's own computation from the same tensors, a recorded run
against ``verify.compare``, overflow, a published model, and the command."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import precision, verify
from perceiver_np.cli import main as cli
from perceiver_np.tolerances import PRECISION_METRIC_RTOL, float32_gamma

from .helpers import small_opts

FORMATS = ("float16", "bfloat16")
SMALL = dict(input_dim=7, latent_dim=16, num_latents=4, num_layers=2, num_heads=2, cross_heads=1,
             dropout=0.0, seed=1)

#: Configurations whose every golden activation the emulation must reach: the default blocks,
#: several cross blocks with shared self blocks, a query decoder with given queries and no input
#: projection, a classification decoder without the cross blocks' query residual.
CONFIGS = {
    "plain": SMALL,
    "shared": dict(SMALL, num_layers=2, num_cross_layers=2, num_blocks=2),
    "query": dict(SMALL, input_dim=16, input_projection=False, decoder="query", query_source="given",
                  query_dim=6, output_dim=3, decoder_heads=2, decoder_query_residual=True),
    "classification": dict(SMALL, decoder="classification", output_dim=5, use_query_residual=False),
}


def _model(name="plain", dtype="float32"):
    """A model of CONFIGS[name] whose every parameter is moved off its initial value."""
    model = pnp.build(**CONFIGS[name], dtype=dtype)
    rng = np.random.default_rng(7)
    return model.with_params({k: (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype)
                              for k, v in model.params.items()})


def _call(model, seed=0, batch=2, length=9):
    """(x, mask, queries) for ``model``: the last sample keeps its first 5 positions."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    x = rng.standard_normal((batch, length, cfg.input_dim))
    mask = np.ones((batch, length), dtype=bool)
    mask[-1, 5:] = False
    queries = None
    if cfg.decoder == "query" and cfg.query_source == "given":
        queries = rng.standard_normal((batch, 3, cfg.decoder_query_channels))
    return x, mask, queries


# ---- the rounding functions ----------------------------------------------------------------------


def _bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def _edge_bits():
    """float32 bit patterns where rounding to 16 bits is delicate, both signs."""
    patterns = [
        0x00000000, 0x00000001, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000, 0x007FFFFF,  # subnormals
        0x00800000, 0x0080FFFF, 0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties
        0x3F801000, 0x3F802000, 0x3F803000, 0x3F800FFF,  # float16 ties and neighbours at 1.0
        0x33000000, 0x33000001, 0x33800000, 0x337FFFFF, 0x387FC000, 0x387FE000,  # float16 subnormals
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x47800000,  # around float16's 65504 and 65520
        0x7F7F7FFF, 0x7F7F8000, 0x7F7E8000, 0x7F7FFFFF,  # around bfloat16's largest finite value
        0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7FA12345,  # inf, NaNs
    ]
    bits = np.array(patterns, dtype=np.uint32)
    return np.concatenate([bits, bits | np.uint32(0x80000000)])


def _test_bits():
    """The edge patterns and 2^20 random ones (every exponent, NaNs and subnormals included)."""
    rng = np.random.default_rng(0)
    return np.concatenate([_edge_bits(), rng.integers(0, 2**32, size=2**20, dtype=np.uint32)])


def test_round_bfloat16_is_bit_exact_with_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="the independent bfloat16 cast (installed with jax)")
    x = _test_bits().view(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = precision.round_bfloat16(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(_bits(got), _bits(want))  # NaNs included: sign | 0x7FC0
    # the cases named in the docstring, by value
    assert precision.round_bfloat16(np.float32(3.4e38)) == np.inf
    assert np.isnan(precision.round_bfloat16(np.float32(np.nan)))


def test_round_bfloat16_agrees_with_torch():
    torch = pytest.importorskip("torch", reason="the second independent bfloat16 cast")
    x = _test_bits().view(np.float32)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    got = precision.round_bfloat16(x)
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(got), nan)  # torch's NaN payload differs: NaN-ness only there
    assert np.array_equal(_bits(got)[~nan], _bits(want)[~nan])


def test_round_float16_is_bit_exact_with_torch():
    torch = pytest.importorskip("torch", reason="the independent float16 cast")
    x = _test_bits().view(np.float32)
    want = torch.from_numpy(x.copy()).to(torch.float16).to(torch.float32).numpy()
    got = precision.round_float16(x)
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(_bits(got)[~nan], _bits(want)[~nan])
    assert precision.round_float16(np.float32(65520.0)) == np.inf  # the tie above 65504 rounds up
    assert precision.round_float16(np.float32(65519.0)) == 65504.0
    assert precision.round_float16(np.float32(2.0**-25)) == 0.0  # a tie with 0: to even


def test_round_to_names_its_arguments():
    assert np.array_equal(precision.round_to(np.array([1.0 + 2**-9]), "bfloat16"), [1.0])
    with pytest.raises(ValueError, match="format: expected one of float16, bfloat16, got 'fp8'"):
        precision.round_to(np.ones(2), "fp8")
    with pytest.raises(TypeError, match="x: expected a floating-point array, got dtype int64"):
        precision.round_bfloat16(np.arange(3))
    assert precision.unit_roundoff("float16") == 2.0**-11 and precision.unit_roundoff("bfloat16") == 2.0**-8


# ---- the hook in the forward ---------------------------------------------------------------------


class _Rewrite(dict):
    """A record whose rewrite adds ``noise`` to the activation ``target`` (none: changes nothing)."""

    def __init__(self, target=None):
        super().__init__()
        self.target = target
        self.seen = []

    def rewrite(self, name, value):
        self.seen.append(name)
        if name == self.target:
            value += np.random.default_rng(5).standard_normal(value.shape).astype(value.dtype)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_forward_is_unchanged_by_a_record_that_rewrites_nothing(name):
    model = _model(name)
    model = pnp.Perceiver(model.config.replace(backend="numpy"), model.params)
    x, mask, queries = _call(model)
    runs = []
    for record in (None, {}, _Rewrite()):
        y, cache = model.forward(x, mask, queries=queries, record=record)
        grads, dx = model.backward(np.ones_like(y), cache)
        runs.append((y, grads, dx))
        if isinstance(record, _Rewrite):  # every activation offered, in the golden order
            assert record.seen == list(record) == [k[4:] for k in verify.golden_names(model.config)
                                                   if k.startswith("act/")]
    for y, grads, dx in runs[1:]:
        assert np.array_equal(y, runs[0][0]) and np.array_equal(dx, runs[0][2])
        assert all(np.array_equal(grads[k], runs[0][1][k]) for k in grads)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_rewritten_activation_is_read_downstream(name):
    """An activation changed in place by the record's rewrite changes the output: the forward
    taps each activation before anything reads it, so the emulation's rounding reaches the rest
    of the model."""
    model = _model(name)
    model = pnp.Perceiver(model.config.replace(backend="numpy"), model.params)
    x, mask, queries = _call(model)
    base = model.forward(x, mask, queries=queries)[0]
    names = [k[4:] for k in verify.golden_names(model.config) if k.startswith("act/")]
    dead = []
    for target in names[:-1]:  # the output itself feeds nothing
        y = model.forward(x.copy(), mask, queries=queries, record=_Rewrite(target))[0]
        if np.array_equal(y, base):
            dead.append(target)
    assert names[-1] == "output" and not dead


# ---- the emulation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs():
    """fmt -> (reference, accumulated emulation, local emulation, report) of the plain model."""
    model = _model()
    x, mask, _ = _call(model)
    ref = precision.reference(model, x, mask)
    rep = precision.report(model, x, mask)
    return {fmt: (ref, precision.emulate(model, x, mask, format=fmt),
                  precision.emulate(model, x, mask, format=fmt, local=ref), rep) for fmt in FORMATS}


def _independent_round(a, fmt):
    """``a`` rounded to ``fmt`` by ml_dtypes (bfloat16) or torch (float16), as float32."""
    if fmt == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="the independent bfloat16 cast")
        with np.errstate(over="ignore"):
            return np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)
    torch = pytest.importorskip("torch", reason="the independent float16 cast")
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(torch.float16).to(torch.float32).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_activation_holds_values_of_the_format(runs, fmt):
    ref, acc, loc, _ = runs[fmt]
    assert list(acc.activations) == list(ref.activations) == list(loc.activations)
    assert acc.overflow is None and loc.overflow is None
    for name, a in acc.activations.items():
        assert a.dtype == np.float32, name
        keep = np.broadcast_to(ref.keep.get(name, True), a.shape)  # the masked keys' fill stays
        for run in (a, loc.activations[name]):
            assert np.array_equal(_independent_round(run[keep], fmt), run[keep]), name
    scores = acc.activations["cross.0.attn.scores"]
    assert (scores[-1, ..., 5:] == np.float32(-1e30)).all()  # the fill, unrounded
    # the input is the input rounded
    assert np.array_equal(acc.activations["input"], _independent_round(ref.activations["input"], fmt))


def _torch_round(t, fmt):
    import torch

    return t.to(getattr(torch, fmt)).to(torch.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_residual_sums_are_bit_exact_with_torch(runs, fmt):
    """A residual sum is one correctly rounded float32 addition, then the rounding: torch's
    addition and cast of the emulation's own inputs give the very same bits."""
    torch = pytest.importorskip("torch", reason="the independent residual sums")
    _, acc, _, _ = runs[fmt]
    a = {k: torch.from_numpy(v) for k, v in acc.activations.items()}
    model = _model()
    latents = torch.from_numpy(precision.round_to(model.params["latents"], fmt))
    blocks = ["cross.0", "self.0", "self.1"]
    for prev, block in zip([None, *blocks], blocks, strict=False):
        z = latents if prev is None else a[f"{prev}.out"]
        assert torch.equal(a[f"{block}.attn_residual.out"], _torch_round(z + a[f"{block}.attn.out"], fmt))
        want = _torch_round(a[f"{block}.attn_residual.out"] + a[f"{block}.ffn.down.out"], fmt)
        assert torch.equal(a[f"{block}.out"], want), block


@pytest.mark.parametrize("fmt", FORMATS)
def test_projections_round_the_float32_product(runs, fmt):
    """``self.0.attn.q.out`` = round(float32(u @ W + b)) from the emulation's own u and the
    rounded parameters. The float32 product is within gamma_{K+1} (sum |u W| + |b|) of the exact
    one (float32_gamma), so every entry whose whole interval rounds to one value of the format
    must be exactly that value, and every other entry one of its interval's two ends."""
    _, acc, _, _ = runs[fmt]
    model = _model()
    u = acc.activations["self.0.norm.out"].astype(np.float64)  # [B, M, D]
    w = precision.round_to(model.params["self.0.attn.q.weight"], fmt).astype(np.float64)
    b = precision.round_to(model.params["self.0.attn.q.bias"], fmt).astype(np.float64)
    exact = u @ w + b  # products of 16-bit values and their sums: float64 rounding is negligible
    slack = float32_gamma(w.shape[0] + 1) * (np.abs(u) @ np.abs(w) + np.abs(b))
    low, high = (_independent_round(exact - slack, fmt), _independent_round(exact + slack, fmt))
    got = acc.activations["self.0.attn.q.out"]
    sure = low == high
    assert np.array_equal(got[sure], low[sure])
    assert ((got >= low) & (got <= high)).all()
    assert sure.mean() > 0.9  # the test decides most entries exactly


def _torch_errors(got, ref, keep=None):
    """(max rel, rms rel) by the formulas of docs/precision.md, in torch float64."""
    import torch

    a, r = torch.from_numpy(np.asarray(got, dtype=np.float64)), torch.from_numpy(ref)
    if keep is not None:
        k = torch.from_numpy(np.broadcast_to(keep, ref.shape).copy())
        a, r = a[k], r[k]
    d = a - r
    return (float(d.abs().max() / r.abs().max()),
            float(torch.linalg.vector_norm(d) / torch.linalg.vector_norm(r)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_report_numbers_are_the_errors_of_the_emulated_tensors(runs, fmt):
    pytest.importorskip("torch", reason="the independent error computation")
    ref, acc, loc, rep = runs[fmt]
    run = rep.run(fmt)
    assert [row.name for row in run.layers] == list(rep.names) == list(ref.activations)
    assert rep.masked_scores == ("cross.0.attn.scores",)
    assert run.overflow is None and run.missing == () and run.unit_roundoff == precision.unit_roundoff(fmt)
    for row in run.layers:
        r, keep = ref.activations[row.name], ref.keep.get(row.name)
        assert row.shape == r.shape and row.nonfinite == 0
        for (got_max, got_rms), emulated in (((row.max_rel, row.rms_rel), acc),
                                             ((row.local_max_rel, row.local_rms_rel), loc)):
            want_max, want_rms = _torch_errors(emulated.activations[row.name], r, keep)
            assert abs(got_max - want_max) <= PRECISION_METRIC_RTOL * want_max, row.name
            assert abs(got_rms - want_rms) <= PRECISION_METRIC_RTOL * want_rms, row.name
    # a single rounding is within the unit roundoff: the input, every parameter tensor
    u = precision.unit_roundoff(fmt)
    assert run.layer("input").max_rel <= u and 0 < run.params_max_rel <= u
    assert run.layer("input").local_max_rel == run.layer("input").max_rel


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_local_error_is_the_layer_fed_the_rounded_reference(runs, fmt):
    """The local run's residual sum is round(round(r_z) + round(r_att)) from the float64
    reference's own values, computed here in torch: its error is the report's local error."""
    torch = pytest.importorskip("torch", reason="the independent local computation")
    ref, _, loc, rep = runs[fmt]
    r = ref.activations

    def rounded_reference(name):
        return _torch_round(torch.from_numpy(r[name].astype(np.float32)), fmt)

    for block, prev in (("self.0", "cross.0"), ("self.1", "self.0")):
        local = _torch_round(rounded_reference(f"{prev}.out") + rounded_reference(f"{block}.attn.out"), fmt)
        assert torch.equal(torch.from_numpy(loc.activations[f"{block}.attn_residual.out"]), local)
        want_max, want_rms = _torch_errors(local.numpy(), r[f"{block}.attn_residual.out"])
        row = rep.run(fmt).layer(f"{block}.attn_residual.out")
        assert abs(row.local_max_rel - want_max) <= PRECISION_METRIC_RTOL * want_max
        assert abs(row.local_rms_rel - want_rms) <= PRECISION_METRIC_RTOL * want_rms


def test_a_float16_overflow_is_reported_where_it_happens():
    model = _model()
    params = dict(model.params)
    params["input_proj.weight"] = params["input_proj.weight"] * np.float32(3e4)  # fine in float32
    model = model.with_params(params)
    x, mask, _ = _call(model)
    rep = precision.report(model, x, mask)
    fp16, bf16 = rep.run("float16"), rep.run("bfloat16")
    assert fp16.overflow == "input_proj.out" and bf16.overflow is None and not bf16.missing
    row = fp16.layer("input_proj.out")
    assert row.nonfinite > 0 and row.max_rel == row.rms_rel == np.inf
    assert fp16.layers[0].name == "input" and fp16.layers[0].nonfinite == 0
    assert "output" in fp16.missing and len(fp16.layers) + len(fp16.missing) == len(rep.names)
    assert "overflow: input_proj.out exceeds float16's range" in str(rep)
    as_json = json.loads(json.dumps(rep.to_json(), allow_nan=False))  # strict JSON: inf is null
    first = as_json["runs"][0]
    assert first["overflow"] == "input_proj.out"
    assert next(r for r in first["layers"] if r["name"] == "input_proj.out")["max_rel"] is None
    # an input beyond float16's range overflows at the input itself
    big = precision.report(model.with_params(dict(_model().params)), x * 1e5, mask, formats=["float16"])
    assert big.run("float16").overflow == "input"


def test_bad_arguments_are_named():
    model = _model()
    x = _call(model)[0]
    with pytest.raises(ValueError, match="format: expected one of float16, bfloat16, got 'float8'"):
        precision.report(model, x, formats=["float8"])
    with pytest.raises(ValueError, match="formats: each format once"):
        precision.report(model, x, formats=["float16", "float16"])
    with pytest.raises(ValueError, match="nothing to report"):
        precision.report(model, x, formats=[])
    with pytest.raises(TypeError, match="model: expected a Perceiver or a PretrainedPerceiver, got dict"):
        precision.report({}, x)
    with pytest.raises(ValueError, match=r"x: expected shape \[B, N, C\]"):
        precision.report(model, x[0])


# ---- a recorded run --------------------------------------------------------------------------------


def test_a_recorded_run_gets_the_numbers_compare_reports(tmp_path):
    model64 = _model(dtype="float64")
    x, mask, _ = _call(model64)
    golden = verify.write_golden(tmp_path / "golden.npz", model64, x, mask)
    ref, _ = verify.golden_model(golden)  # the plain attention path: scores and probabilities too
    theirs = verify.write_run(tmp_path / "theirs.npz", verify.cast(ref, "float32"), x, mask)
    rep = precision.report(model64, x, mask, formats=["bfloat16"], recorded=theirs)
    run = rep.run("theirs.npz")
    assert run.unit_roundoff is None and run.params_max_rel is None and not run.missing
    rows = verify.compare(golden, theirs).rows
    compared = {r.name[4:]: r.max_rel for r in rows if r.name.startswith("act/")}
    assert [row.name for row in run.layers] == list(compared)
    for row in run.layers:
        assert row.local_max_rel is None and row.local_rms_rel is None
        assert abs(row.max_rel - compared[row.name]) <= PRECISION_METRIC_RTOL * compared[row.name]
    # a dict in the golden layout, with only some activations (as record_torch returns)
    with np.load(theirs) as z:
        partial = {"act/output": z["act/output"], "act/cross.0.out": z["act/cross.0.out"], "loss": z["loss"]}
    run = precision.report(model64, x, mask, formats=[], recorded=partial).run("recorded")
    assert [row.name for row in run.layers] == ["cross.0.out", "output"]
    assert len(run.missing) == len(rep.names) - 2
    assert "recorded: a recorded run" in str(precision.report(model64, x, mask, formats=[], recorded=partial))
    with pytest.raises(ValueError, match=r"act/output has shape \(1, 16\), the reference's is \(2, 16\)"):
        precision.report(model64, x, mask, recorded={"act/output": np.zeros((1, 16))})
    with pytest.raises(ValueError, match="recorded: recorded holds no activation of the reference run"):
        precision.report(model64, x, mask, recorded={"output": np.zeros((2, 16))})


# ---- a published model -----------------------------------------------------------------------------


def test_a_published_model_is_emulated_at_its_own_activations():
    torch = pytest.importorskip("torch", reason="the small HF model is built with torch")
    transformers = pytest.importorskip("transformers", reason="the small HF model")
    from perceiver_np import pretrained

    from .hf_helpers import random_hf_model

    hf = random_hf_model(transformers.PerceiverForMaskedLM, transformers.PerceiverConfig(
        d_model=16, vocab_size=262, max_position_embeddings=10, num_latents=6, d_latents=16,
        num_self_attends_per_block=2, num_self_attention_heads=2, num_cross_attention_heads=1))
    model = pretrained.from_hf(hf, dtype="float32")
    ids = np.random.default_rng(0).integers(0, 262, size=(2, 10))
    mask = np.array([[1] * 10, [1] * 6 + [0] * 4])  # HF's integer attention mask
    rep = precision.report(model, ids, mask)
    names = list(rep.names)
    assert names[0] == "preprocessor.out" and names[-1] == "output" and names.count("output") == 1
    assert "decoder.attn.probs" in names and "postprocessor.out" in names
    assert rep.masked_scores == ("cross.0.attn.scores",)
    for fmt in FORMATS:
        run = rep.run(fmt)
        assert run.overflow is None and not run.missing and len(run.layers) == len(names)
        acc = precision.emulate(model, ids, mask, format=fmt)
        # the embedding plus the positions, from the rounded tables, one float32 sum, rounded
        table, positions = (_torch_round(torch.from_numpy(model.params[f"preprocessor.{k}.weight"]), fmt)
                            for k in ("embeddings", "position_embeddings"))
        want = _torch_round(table[torch.from_numpy(ids)] + positions[:10], fmt)
        assert torch.equal(torch.from_numpy(acc.activations["preprocessor.out"]), want)
        for name, a in acc.activations.items():
            keep = np.broadcast_to(True if name != "cross.0.attn.scores" else mask[:, None, None, :] == 1,
                                   a.shape)
            assert np.array_equal(_independent_round(a[keep], fmt), a[keep]), name


# ---- the plot and the command ----------------------------------------------------------------------


def test_the_plot_is_a_png(runs, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot is optional (the bench and demo extras install it)")
    path = runs["float16"][3].plot(tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_says_what_is_missing(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match="the precision plot needs matplotlib, which is not installed"):
        runs["float16"][3].plot(tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


@pytest.fixture
def golden(tmp_path):
    path = tmp_path / "golden.npz"
    flags = ["--input-dim", "7", "--latent-dim", "16", "--num-latents", "4", "--num-heads", "2",
             "--num-layers", "2"]
    assert cli(["golden", "--preset", "edifice", *flags, "--mask", "--out", str(path)]) == 0
    return path


def test_the_command_on_a_golden_file(golden, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert cli(["precision-report", str(golden), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    model, run = verify.golden_model(golden)
    want = precision.report(model, run["x"], run["mask"])
    assert printed.strip() == str(want).strip()
    assert json.loads(out.read_text()) == json.loads(json.dumps(want.to_json()))
    assert printed.startswith("float16: 11 significand bits") and "\nbfloat16: 8 significand bits" in printed
    # one format, a recorded run, and the golden file's input given as files instead
    theirs = verify.write_run(tmp_path / "theirs.npz", verify.cast(model, "float32"), run["x"], run["mask"])
    np.save(tmp_path / "x.npy", run["x"])
    np.save(tmp_path / "m.npy", run["mask"])
    assert cli(["precision-report", str(golden), "--x", str(tmp_path / "x.npy"), "--mask",
                str(tmp_path / "m.npy"), "--formats", "bfloat16", "--recorded", str(theirs)]) == 0
    printed = capsys.readouterr().out
    assert "float16:" not in printed.replace("bfloat16:", "") and "theirs.npz: a recorded run" in printed


def test_the_command_on_a_checkpoint(tmp_path, capsys):
    from perceiver_np.checkpoint import save_checkpoint

    model = _model()
    save_checkpoint(tmp_path / "ck.npz", config=model.config, params=model.params)
    x, mask, _ = _call(model)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "m.npy", mask)
    capsys.readouterr()
    assert cli(["precision-report", str(tmp_path / "ck.npz"), "--x", str(tmp_path / "x.npy"),
                "--mask", str(tmp_path / "m.npy")]) == 0
    assert capsys.readouterr().out.strip() == str(precision.report(model, x, mask)).strip()


def test_the_command_names_bad_arguments(golden, tmp_path, capsys, monkeypatch):
    from perceiver_np.checkpoint import save_checkpoint

    model = _model()
    ck = tmp_path / "ck.npz"
    save_checkpoint(ck, config=model.config, params=model.params)
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 6)))
    np.save(tmp_path / "m.npy", np.ones((2, 3), dtype=np.int64))
    np.save(tmp_path / "x7.npy", np.zeros((2, 3, 7)))
    cases = [
        ([str(ck)], "--x: required with the checkpoint"),
        ([str(ck), "--x", str(tmp_path / "x.npy")], "x has 6 channels per position, but the model takes "
                                                     "input_dim = 7"),
        ([str(ck), "--x", str(tmp_path / "x7.npy"), "--mask", str(tmp_path / "m.npy")],
         "--mask " + str(tmp_path / "m.npy") + ": expected bool [B, N] = (2, 3) like --x, got int64 (2, 3)"),
        ([str(golden), "--mask", str(tmp_path / "m.npy")], "goes with --x"),
        ([str(golden), "--formats", "float16,float16"], "--formats: expected a comma-separated list"),
        ([str(golden), "--recorded", str(tmp_path / "none.npz")], "--recorded"),
        ([str(tmp_path / "x.npy")], "not a readable .npz file"),
        ([str(golden), "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.png")],
         "the same file as --plot"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli(["precision-report", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli(["precision-report", str(golden), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "needs matplotlib" in err
    assert not (tmp_path / "p.png").exists()


def test_small_opts_models_run_in_float64_too():
    """A float64 model (a golden file's) is emulated from its parameters cast to float32."""
    model = pnp.build(**small_opts())
    x = np.random.default_rng(0).standard_normal((2, 4, 5))
    rep = precision.report(model, x)
    for fmt in FORMATS:
        run = rep.run(fmt)
        assert run.params_max_rel <= precision.unit_roundoff(fmt)
        assert all(np.isfinite(row.max_rel) for row in run.layers)
