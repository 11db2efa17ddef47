"""verify.record_torch and verify.hf_record_names: Hugging Face's PerceiverModel, loaded with a
perceiver_np model's weights (interop.to_hf_state_dict), recorded under the golden names, agrees
with that model's golden file tensor by tensor; a perturbed HF weight is named at its own layer;
hooks and train/eval modes are left as they were."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import interop, verify

REASON = "record_torch against Hugging Face needs torch and transformers: pip install -e '.[compare]'"
torch = pytest.importorskip("torch", reason=REASON)
transformers = pytest.importorskip("transformers", reason=REASON)
modeling = pytest.importorskip("transformers.models.perceiver.modeling_perceiver", reason=REASON)

SMALL = dict(input_dim=5, latent_dim=8, num_latents=4, num_layers=1, cross_heads=1, num_heads=2)
CASES = {
    "encoder": {},
    # input projection, a self block shared over 2 repeats (self.0.use0/use1), a query decoder
    "shared+decoder": dict(num_layers=2, num_blocks=2, input_projection=True, decoder="query",
                           output_dim=3, num_outputs=2),
    "classification": dict(decoder="classification", output_dim=3),
}


def hf_model(model: pnp.Perceiver) -> Any:
    """HF's PerceiverModel holding ``model``'s weights, in float64."""
    config_kwargs, decoder_config = interop.to_hf_config(model)
    cfg = transformers.PerceiverConfig(**config_kwargs)
    dec = None
    if decoder_config is not None:
        kwargs = {k: v for k, v in decoder_config.items() if k != "type"}
        cls = (modeling.PerceiverClassificationDecoder if decoder_config["type"] == "classification"
               else modeling.PerceiverBasicDecoder)
        dec = cls(cfg, **kwargs)
    pre = None
    if model.config.input_projection:
        pre = interop.LinearPreprocessor(model.config.input_dim, cfg.d_latents)
    hf = transformers.PerceiverModel(cfg, decoder=dec, input_preprocessor=pre).double()
    state = interop.to_hf_state_dict(model)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return hf


def setup(tmp_path: Any, case: str) -> tuple[Any, Any, dict[str, np.ndarray]]:
    model = pnp.build(**pnp.presets.hf(**{**SMALL, **CASES[case]}), dtype="float64", seed=3)
    x = np.random.default_rng(0).standard_normal((2, 7, 5))
    mask = np.arange(7) < np.array([[7], [4]])
    golden = verify.write_golden(tmp_path / "golden.npz", model, x, mask, seed=1)
    with np.load(golden) as g:
        arrays = {k: g[k] for k in g.files}
    return golden, hf_model(model), arrays


def hf_inputs(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"inputs": arrays["input/x"], "attention_mask": arrays["input/mask"].astype(np.int64)}


def record(hf: Any, arrays: dict[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    acts, params = verify.hf_record_names(config)
    return verify.record_torch(hf, hf_inputs(arrays), arrays["loss/dy"], activations=acts, params=params)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_matches_its_golden_file(tmp_path, case):
    golden, hf, arrays = setup(tmp_path, case)
    config, _, meta = verify.read_golden(golden)
    acts, params = verify.hf_record_names(config)
    rec = verify.record_torch(hf, hf_inputs(arrays), arrays["loss/dy"], activations=acts, params=params)
    np.savez(tmp_path / "theirs.npz", **rec)
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.ok, str(report)
    # every activation but the attention scores and probabilities, every gradient, the input's
    unexposed = [n for n in meta["activations"] if n.endswith((".attn.scores", ".attn.probs"))]
    assert sorted(report.missing) == sorted(f"act/{n}" for n in unexposed)
    assert report.compared == {"activations": len(meta["activations"]) - len(unexposed),
                               "gradients": len(meta["gradients"]), "loss": 1,
                               "missing": len(unexposed)}
    assert report.extra == ()
    assert max(row.max_rel for row in report.rows) < 1e-12
    assert set(params) == {n for n in meta["gradients"] if n != "x"}


@pytest.mark.parametrize(("weight", "layer"), [
    ("encoder.self_attends.0.mlp.dense1.weight", "act/self.0.ffn.up.out"),
    ("encoder.cross_attention.attention.self.key.weight", "act/cross.0.attn.k.out"),
    ("embeddings.latents", "act/cross.0.q_norm.out"),
])
def test_a_perturbed_hf_weight_is_named_first(tmp_path, weight, layer):
    golden, hf, arrays = setup(tmp_path, "encoder")
    with torch.no_grad():
        hf.get_parameter(weight).view(-1)[3] += 1e-3
    config, _, _ = verify.read_golden(golden)
    np.savez(tmp_path / "theirs.npz", **record(hf, arrays, config))
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert not report.ok
    assert report.first_break is not None and report.first_break.name == layer


def hook_count(module: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_hooks_removed_and_modes_restored(tmp_path):
    golden, hf, arrays = setup(tmp_path, "encoder")
    config, _, _ = verify.read_golden(golden)
    hf.train()
    hf.encoder.self_attends[0].eval()  # a mixed state comes back as it was
    modes = {name: m.training for name, m in hf.named_modules()}
    seen = []

    def forward(module: Any, inputs: dict[str, Any]) -> Any:
        seen.append((module.training, hook_count(module)))
        return module(**inputs).last_hidden_state

    acts, params = verify.hf_record_names(config)
    rec = verify.record_torch(hf, hf_inputs(arrays), arrays["loss/dy"], activations=acts, params=params,
                              forward=forward)
    assert seen[0][0] is False and seen[0][1] > 0  # eval mode, hooked, during the run
    assert hook_count(hf) == 0
    assert {name: m.training for name, m in hf.named_modules()} == modes
    assert all(p.grad is None for p in hf.parameters())  # .grad untouched
    assert rec["grad/x"].shape == arrays["input/x"].shape

    def boom(module: Any, inputs: dict[str, Any]) -> Any:
        module(**inputs)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        verify.record_torch(hf, hf_inputs(arrays), arrays["loss/dy"], activations=acts, params=params,
                            forward=boom)
    assert hook_count(hf) == 0
    assert {name: m.training for name, m in hf.named_modules()} == modes


def test_plain_module_tuple_inputs_and_errors():
    lin = torch.nn.Linear(3, 2).double()
    seq = torch.nn.Sequential(lin, torch.nn.Tanh()).double()
    x = np.random.default_rng(0).standard_normal((4, 3))
    dy = np.ones((4, 2))
    rec = verify.record_torch(seq, (x,), dy, activations={"lin.out": "0", "lin.in": ("0", "input")},
                              params={"lin.weight": "0.weight", "lin.bias": "0.bias"})
    h = x @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
    np.testing.assert_allclose(rec["act/lin.out"], h)
    np.testing.assert_allclose(rec["act/lin.in"], x)
    np.testing.assert_allclose(rec["act/output"], np.tanh(h))
    dh = 1 - np.tanh(h) ** 2
    np.testing.assert_allclose(rec["grad/lin.weight"], x.T @ dh)  # [in, out]
    np.testing.assert_allclose(rec["grad/lin.bias"], dh.sum(0))
    np.testing.assert_allclose(rec["grad/x"], dh @ lin.weight.detach().numpy())
    assert float(rec["loss"]) == pytest.approx(np.tanh(h).sum())
    kept = verify.record_torch(seq, (x,), dy, activations={}, params={"lin.weight": "0.weight"},
                               transpose=lambda name: False)
    np.testing.assert_allclose(kept["grad/lin.weight"], dh.T @ x)  # torch's [out, in]

    with pytest.raises(ValueError, match="float64"):
        verify.record_torch(torch.nn.Linear(3, 2), (x,), dy, activations={}, params={})
    with pytest.raises(ValueError, match="no such parameter"):
        verify.record_torch(seq, (x,), dy, activations={}, params={"w": "1.weight"})
    with pytest.raises(ValueError, match="dy: shape"):
        verify.record_torch(seq, (x,), np.ones((4, 3)), activations={}, params={})
    with pytest.raises(ValueError, match="never recorded"):
        verify.record_torch(seq, (x,), dy, activations={"again": ("0", "output", 1)}, params={})
    assert hook_count(seq) == 0
