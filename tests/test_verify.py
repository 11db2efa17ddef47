"""Golden files and comparison reports (perceiver_np.verify, perceiver-np golden/compare)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import verify
from perceiver_np.cli import main as cli

from .helpers import small_opts

FLAGS = ["--input-dim", "7", "--latent-dim", "16", "--num-latents", "4", "--num-heads", "2",
         "--num-layers", "3", "--num-cross-layers", "2"]


@pytest.fixture
def golden(tmp_path):
    path = tmp_path / "golden.npz"
    assert cli(["golden", "--preset", "edifice", *FLAGS, "--seed", "0", "--mask", "--out", str(path)]) == 0
    return path


def _model_from(path):
    cfg, arrays, _ = verify.read_golden(path)
    params = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    return pnp.Perceiver(cfg, params), arrays


def test_a_golden_file_round_trips_with_zero_breaks(golden, tmp_path, capsys):
    capsys.readouterr()
    assert cli(["compare", str(golden), str(golden)]) == 0
    out = capsys.readouterr().out
    assert "all " in out and "within tolerance" in out
    # and our own run, recorded like another port would, reproduces it
    model, arrays = _model_from(golden)
    theirs = verify.write_run(tmp_path / "ours.npz", model, arrays["input/x"], arrays["input/mask"], seed=0)
    report = verify.compare(golden, theirs)
    assert report.ok and not report.missing and not report.extra
    names = [r.name for r in report.rows]
    assert names[0] == "act/input"
    assert "act/cross.0.attn.scores" in names and "act/cross.1.attn.probs" in names
    assert names.index("act/output") < names.index("loss") < names.index("grad/final_norm.beta")
    assert names[-1] == "grad/x"
    _, _, meta = verify.read_golden(golden)
    assert report.compared == {"activations": len(meta["activations"]), "loss": 1,
                               "gradients": len(meta["gradients"]), "missing": 0}
    assert report.masked_scores == ("act/cross.0.attn.scores", "act/cross.1.attn.scores")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("weight", ["self.1.ffn.up.weight", "cross.1.attn.k.weight", "latents"])
def test_a_perturbed_weight_is_named_first(golden, tmp_path, dtype, weight):
    model, arrays = _model_from(golden)
    params = {k: v.astype(dtype) for k, v in model.params.items()}
    params[weight] = params[weight].copy()
    params[weight].flat[3] += params[weight].dtype.type(1e-3)
    theirs = pnp.Perceiver(model.config.replace(dtype=dtype), params)
    path = verify.write_run(tmp_path / "theirs.npz", theirs, arrays["input/x"].astype(dtype),
                            arrays["input/mask"], seed=0)
    report = verify.compare(golden, path)
    assert not report.ok
    expected = {"self.1.ffn.up.weight": "act/self.1.ffn.up.out",
                "cross.1.attn.k.weight": "act/cross.1.attn.k.out",
                "latents": "act/cross.0.q_norm.out"}[weight]
    assert report.first_break is not None and report.first_break.name == expected


def test_float32_within_the_measured_tolerance(tmp_path):
    rng = np.random.default_rng(1)
    model = pnp.build(input_dim=287, dtype="float64", backend="numpy")
    for k, v in model.params.items():
        model.params[k] = v + 0.05 * rng.normal(size=v.shape)
    x = rng.normal(size=(2, 48, 287))
    mask = rng.random((2, 48)) < 0.8
    golden = verify.write_golden(tmp_path / "g.npz", model, x, mask, seed=3)
    m32 = pnp.Perceiver(model.config.replace(dtype="float32"),
                        {k: v.astype(np.float32) for k, v in model.params.items()})
    theirs = verify.write_run(tmp_path / "t.npz", m32, x.astype(np.float32), mask, seed=3)
    report = verify.compare(golden, theirs)
    assert report.ok, str(report)
    worst = max(r.max_rel for r in report.rows)
    assert 1e-7 < worst <= pnp.tolerances.GOLDEN_FLOAT32_RTOL  # float32 really differs


def test_missing_extra_and_mismatched_names(golden, tmp_path, capsys):
    with np.load(golden, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k.startswith(("act/", "grad/"))}
    arrays.pop("act/cross.0.attn.scores")
    arrays["act/my.debug"] = np.zeros(3)
    arrays["grad/latents"] = arrays["grad/latents"].T.copy()
    np.savez(tmp_path / "theirs.npz", **arrays)
    report = verify.compare(golden, tmp_path / "theirs.npz")
    assert "act/cross.0.attn.scores" in report.missing and "act/my.debug" in report.extra
    assert any(m.startswith("grad/latents") for m in report.mismatched) and not report.ok
    capsys.readouterr()
    assert cli(["compare", str(golden), str(tmp_path / "theirs.npz"), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and "act/cross.0.attn.scores" in data["missing"]


def test_the_same_seed_draws_the_same_input(golden, tmp_path):
    again = tmp_path / "again.npz"
    assert cli(["golden", "--preset", "edifice", *FLAGS, "--seed", "0", "--mask", "--out", str(again)]) == 0
    with np.load(golden, allow_pickle=False) as a, np.load(again, allow_pickle=False) as b:
        assert a.files == b.files
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_not_a_golden_file(tmp_path):
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a perceiver_np golden file"):
        verify.compare(tmp_path / "plain.npz", tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"not a readable \.npz file"):
        verify.read_golden(tmp_path / "junk.npz")


def test_golden_for_weights_trained_elsewhere(tmp_path):
    cfg = pnp.PerceiverConfig(input_dim=7, latent_dim=16, num_latents=4, num_heads=2, num_layers=3,
                              num_cross_layers=2, seed=11, dtype="float64")
    trained = pnp.Perceiver(cfg)
    pnp.interop.save_params(tmp_path / "w.npz", trained)
    out = tmp_path / "g.npz"
    assert cli(["golden", *FLAGS, "--params", str(tmp_path / "w.npz"), "--out", str(out)]) == 0
    model, _ = _model_from(out)
    assert all(np.array_equal(model.params[k], trained.params[k]) for k in trained.params)


# --- nothing compared is no pass -------------------------------------------------------------


def _tensors(path):
    """Every tensor a port would write (act/*, loss, grad/*), copied from a golden file."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(("act/", "grad/")) or k == "loss"}


def test_an_empty_file_fails_even_with_allow_missing(golden, tmp_path, capsys):
    np.savez(tmp_path / "theirs.npz")
    _, _, meta = verify.read_golden(golden)
    expected_missing = len(meta["activations"]) + 1 + len(meta["gradients"])
    report = verify.compare(golden, tmp_path / "theirs.npz")
    assert not report.ok and report.first_break is None
    assert report.compared == {"activations": 0, "gradients": 0, "loss": 0, "missing": expected_missing}
    text = str(report)
    assert (f"FAILED: {expected_missing} golden tensors missing from theirs "
            "(pass --allow-missing" in text)
    assert "within tolerance" not in text
    allowed = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert not allowed.ok
    assert "FAILED: no activation was compared" in str(allowed)
    assert "FAILED: no gradient was compared" in str(allowed)
    assert "--allow-missing" not in "\n".join(allowed.failures)
    capsys.readouterr()
    assert cli(["compare", str(golden), str(tmp_path / "theirs.npz"), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["compared"]["activations"] == 0
    assert data["compared"]["missing"] == expected_missing
    assert any("missing from theirs" in f for f in data["failures"])


def test_the_loss_alone_is_no_comparison(golden, tmp_path):
    arrays = _tensors(golden)
    misnamed = {("activation/" + k[4:] if k.startswith("act/") else "gradient/" + k[5:]): v
                for k, v in arrays.items() if k != "loss"}
    np.savez(tmp_path / "theirs.npz", loss=arrays["loss"], **misnamed)
    for allow_missing in (False, True):
        report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=allow_missing)
        assert not report.ok and [r.name for r in report.rows] == ["loss"] and report.rows[0].ok
        assert report.compared["activations"] == report.compared["gradients"] == 0
        assert report.compared["loss"] == 1
        assert "FAILED: no activation was compared" in report.failures
        assert "FAILED: no gradient was compared" in report.failures
        assert set(report.extra) == set(misnamed)


def test_missing_tensors_fail_unless_allowed(golden, tmp_path, capsys):
    arrays = _tensors(golden)
    dropped = ["act/cross.0.attn.scores", "act/self.1.ffn.up.out", "grad/latents"]
    for k in dropped:
        arrays.pop(k)
    np.savez(tmp_path / "theirs.npz", **arrays)
    report = verify.compare(golden, tmp_path / "theirs.npz")
    assert not report.ok and report.first_break is None and set(report.missing) == set(dropped)
    n_act = sum(k.startswith("act/") for k in arrays)
    n_grad = sum(k.startswith("grad/") for k in arrays)
    assert report.compared == {"activations": n_act, "gradients": n_grad, "loss": 1, "missing": 3}
    assert report.failures == ("FAILED: 3 golden tensors missing from theirs "
                               "(pass --allow-missing to compare only the ones present)",)
    assert f"compared {n_act} activations, {n_grad} gradients and the loss" in str(report)
    allowed = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert allowed.ok and allowed.failures == () and allowed.rows == report.rows
    assert allowed.missing == report.missing and "all " in str(allowed)
    assert allowed.to_json()["compared"] == report.compared
    capsys.readouterr()
    assert cli(["compare", str(golden), str(tmp_path / "theirs.npz")]) == 1
    assert "FAILED: 3 golden tensors missing" in capsys.readouterr().out


# --- attention scores at masked keys ---------------------------------------------------------

#: A relative error put on one visible attention score: 50x the float32 tolerance.
SCORE_PERTURBATION = 50 * pnp.tolerances.GOLDEN_FLOAT32_RTOL


def _masked_scores(path):
    """-> (keep [B, N] bool, the masked attention-score names) of a golden file."""
    _, arrays, meta = verify.read_golden(path)
    names = [n for n in meta["activations"] if n.startswith("cross.") and n.endswith(".attn.scores")]
    return arrays["input/mask"], names


def test_the_masked_scores_are_the_cross_blocks():
    # shared self blocks (self.{j}.use{u}) and a query decoder also record scores: unmasked
    cfg = pnp.PerceiverConfig(input_dim=7, latent_dim=16, num_latents=4, num_heads=2, num_layers=4,
                              num_cross_layers=2, num_blocks=2, decoder="query", output_dim=3,
                              num_outputs=5, dtype="float64", backend="numpy")
    record: dict[str, np.ndarray] = {}
    x = np.random.default_rng(0).standard_normal((2, 6, 7))
    pnp.Perceiver(cfg).forward(x, np.array([[True] * 6, [True] * 3 + [False] * 3]), record=record)
    scores = [n for n in record if n.endswith(".attn.scores")]
    assert "decoder.attn.scores" in scores and "self.0.use1.attn.scores" in scores
    assert verify.masked_score_names(cfg, list(record)) == ("cross.0.attn.scores", "cross.1.attn.scores")


@pytest.mark.parametrize("fill", ["finfo.min", "-inf"])
def test_masked_scores_compare_whatever_the_fill(golden, tmp_path, fill):
    keep, names = _masked_scores(golden)
    assert names and not keep.all() and keep.any(axis=1).all()
    arrays = _tensors(golden)
    value = np.finfo(np.float64).min if fill == "finfo.min" else -np.inf
    for name in names:
        s = arrays[f"act/{name}"]  # [B, H, M, N]
        arrays[f"act/{name}"] = np.where(keep[:, None, None, :], s, value)
    np.savez(tmp_path / "theirs.npz", **arrays)
    report = verify.compare(golden, tmp_path / "theirs.npz")
    assert report.ok and report.first_break is None, str(report)
    rows = {r.name: r for r in report.rows}
    assert all(rows[f"act/{n}"].max_abs == 0 for n in names)


@pytest.mark.parametrize("fill", ["golden's", "finfo.min"])
def test_a_visible_score_error_is_not_hidden_by_the_fill(golden, tmp_path, fill):
    keep, names = _masked_scores(golden)
    arrays = _tensors(golden)
    for name in names if fill == "finfo.min" else ():  # correct at every visible key
        s = arrays[f"act/{name}"]
        arrays[f"act/{name}"] = np.where(keep[:, None, None, :], s, np.finfo(np.float64).min)
    target = f"act/{names[-1]}"
    s = arrays[target].copy()
    visible = np.where(np.broadcast_to(keep[:, None, None, :], s.shape), np.abs(s), -1.0)
    index = np.unravel_index(int(np.argmax(visible)), s.shape)  # the largest visible score
    s[index] *= 1 + SCORE_PERTURBATION
    arrays[target] = s
    np.savez(tmp_path / "theirs.npz", **arrays)
    report = verify.compare(golden, tmp_path / "theirs.npz")
    assert not report.ok and report.first_break is not None
    assert report.first_break.name == target and report.first_break.worst_index == index
    assert report.first_break.max_rel == pytest.approx(SCORE_PERTURBATION)


def test_a_fully_masked_sample_has_no_scores_to_compare(golden, tmp_path):
    model, arrays = _model_from(golden)
    mask = arrays["input/mask"].copy()
    mask[0] = False  # the first sample sees nothing
    g2 = verify.write_golden(tmp_path / "g.npz", model, arrays["input/x"], mask, seed=0)
    keep, names = _masked_scores(g2)
    theirs = _tensors(g2)
    assert not keep[0].any()
    for name in names:  # whatever a port writes at masked keys, and for that sample's scores
        s = np.where(keep[:, None, None, :], theirs[f"act/{name}"], 0.0)
        s[0] = np.nan
        theirs[f"act/{name}"] = s
    np.savez(tmp_path / "theirs.npz", **theirs)
    report = verify.compare(g2, tmp_path / "theirs.npz")
    assert report.ok, str(report)


@pytest.mark.parametrize("opts", [
    dict(),
    dict(decoder="classification", output_dim=3),
    dict(decoder="query", query_source="given", query_dim=5, num_outputs=4, output_dim=2),
    dict(num_cross_layers=2, num_blocks=2, masked_rows="uniform"),
])
def test_golden_names_are_the_names_a_golden_file_holds(tmp_path, opts):
    model = pnp.build(**small_opts(dtype="float64", **opts))
    x = np.random.default_rng(0).normal(size=(2, 3, model.config.input_dim))
    queries = None
    if model.config.query_source == "given" and model.config.decoder == "query":
        queries = np.random.default_rng(1).normal(size=(2, 4, 5))
    path = verify.write_golden(tmp_path / "g.npz", model, x, queries=queries)
    with np.load(path) as f:
        written = [k for k in f.files if k.split("/")[0] in ("act", "grad", "loss")]
    assert verify.golden_names(model.config) == written
    assert verify.golden_names(dataclasses.asdict(model.config)) == written
