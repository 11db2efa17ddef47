"""Golden files and comparison reports (perceiver_np.verify, perceiver-np golden/compare)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import verify
from perceiver_np.cli import main as cli

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
