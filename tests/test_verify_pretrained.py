"""Golden files of the published Perceivers (perceiver_np.verify with a PretrainedPerceiver): a
small HF model loaded here writes one; the same model in float32 passes it, a model with one
planted bug fails it naming the first tensor that breaks, the file's logits and gradients equal
HF's and torch autograd's, and ``perceiver-np compare`` reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import pretrained, verify
from perceiver_np.cli import main as cli
from perceiver_np.tolerances import (
    GOLDEN_FLOAT32_RTOL,
    GOLDEN_FLOAT64_RTOL,
    INTEROP_GRAD_FLOOR,
    INTEROP_GRAD_RTOL,
    PUBLISHED_FLOAT64_RTOL,
)

from .hf_helpers import random_hf_model

torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
transformers = pytest.importorskip("transformers", reason="the HF cross-checks need transformers")

SMALL = dict(num_latents=6, d_latents=16, num_blocks=1, num_self_attends_per_block=2,
             num_self_attention_heads=2, num_cross_attention_heads=1, attention_probs_dropout_prob=0.0)
MLM, CONV = "PerceiverForMaskedLM", "PerceiverForImageClassificationConvProcessing"
#: (config changes, inputs, mask): a text model with a padded sample, an image model with batch
#: norm (its running statistics are buffers) and Fourier positions.
CASES = {
    MLM: (dict(d_model=16, vocab_size=262, max_position_embeddings=10),
          lambda rng: rng.integers(0, 262, size=(2, 10)), np.array([[1] * 10, [1] * 6 + [0] * 4], bool)),
    CONV: (dict(d_model=322, num_labels=4), lambda rng: rng.standard_normal((2, 3, 16, 20)), None),
}
#: The multimodal autoencoder (tests/test_multimodal.py's small config): dict inputs and logits.
MULTIMODAL = dict(SMALL, num_self_attends_per_block=1, num_frames=2, image_size=8, audio_samples_per_frame=16,
                  samples_per_patch=4, num_labels=3, output_shape=[1, 2, 8, 8], output_num_channels=8,
                  _label_trainable_num_channels=10, d_model=393)
SUBSAMPLED = {"audio": np.array([0, 3, 7, 3]), "image": np.array([5, 17, 127, 64, 0, 5])}


def _hf(arch, changes, seed=0):
    return random_hf_model(getattr(transformers, arch), transformers.PerceiverConfig(**{**SMALL, **changes}),
                           seed)


@pytest.fixture(scope="module")
def goldens(tmp_path_factory):
    """arch -> (golden path, the HF model, inputs, mask): written once for the module."""
    out = {}
    for arch, (changes, make_x, mask) in CASES.items():
        hf = _hf(arch, changes)
        model = pretrained.from_hf(hf, dtype="float64")
        x = make_x(np.random.default_rng(1))
        path = verify.write_golden(tmp_path_factory.mktemp("golden") / "golden.npz", model, x, mask, seed=3)
        out[arch] = (path, hf, x, mask)
    return out


@pytest.mark.parametrize("arch", list(CASES))
def test_the_golden_file_of_a_published_model(goldens, arch, tmp_path, capsys):
    path, _, x, mask = goldens[arch]
    config, arrays, meta = verify.read_golden(path)
    assert meta["architecture"] == arch and meta["hf_config"]["d_model"] == CASES[arch][0]["d_model"]
    model, run = verify.golden_model(path)
    assert isinstance(model, pretrained.PretrainedPerceiver) and model.config == config
    assert model.config.dtype == "float64" and model.config.backend == "numpy"
    # the inputs in their own dtype: token ids stay integers
    assert arrays["input/x"].dtype == (np.int64 if arch == MLM else np.float64)
    assert np.array_equal(run["x"], x) and run["seed"] == 3
    assert (run["mask"] is None) == (mask is None)
    # every parameter and buffer, float64
    assert {k[len("params/"):] for k in arrays if k.startswith("params/")} == set(model.specs())
    assert {k[len("buffers/"):] for k in arrays if k.startswith("buffers/")} == set(model.buffer_specs())
    assert (arch == CONV) == ("buffers/preprocessor.batchnorm.running_var" in arrays)
    # activations in forward order, the decoder's attention recorded (the plain path), logits last
    acts = meta["activations"]
    assert acts[0] == "preprocessor.out" and acts[-1] == "output"
    assert acts.index("self.1.out") < acts.index("decoder.queries") < acts.index("decoder.attn.probs")
    assert acts.index("decoder.out") < acts.index("output")
    assert arrays["act/output"].shape == ((2, 10, 262) if arch == MLM else (2, 4))
    # every parameter's gradient, in backward order: postprocessor, decoder, encoder, preprocessor
    grads = meta["gradients"]
    assert set(grads) == set(model.specs()) and "grad/x" not in arrays
    first = {MLM: "postprocessor.bias", CONV: "decoder.output.bias"}[arch]
    assert grads[0] == first and grads[-1].startswith("preprocessor.")
    assert grads.index("decoder.q_norm.gamma") < grads.index("self.1.ffn.down.bias") < grads.index("latents")
    # the reference rebuilt from the file reproduces it
    report = verify.compare(path, verify.write_run(tmp_path / "again.npz", model, **run))
    assert report.ok and not report.missing and not report.extra
    assert max(r.max_rel for r in report.rows) <= GOLDEN_FLOAT64_RTOL
    assert report.compared == {"activations": len(acts), "gradients": len(grads), "loss": 1, "missing": 0}
    assert report.masked_scores == (("act/cross.0.attn.scores",) if mask is not None else ())
    capsys.readouterr()
    assert cli(["compare", str(path), str(path)]) == 0
    assert "within tolerance" in capsys.readouterr().out


@pytest.mark.parametrize("arch", list(CASES))
def test_the_same_model_in_float32_passes(goldens, arch, tmp_path, capsys):
    path, *_ = goldens[arch]
    model, run = verify.golden_model(path)
    m32 = verify.cast(model, "float32")
    assert m32.config.dtype == "float32" and m32.config.backend == "numpy"
    theirs = verify.write_run(tmp_path / "theirs.npz", m32, **run)
    report = verify.compare(path, theirs)
    assert report.ok, str(report)
    assert all(r.dtype == "float32" for r in report.rows)
    worst = max(r.max_rel for r in report.rows)
    assert 1e-8 < worst <= GOLDEN_FLOAT32_RTOL  # float32 really differs
    capsys.readouterr()
    assert cli(["compare", str(path), str(theirs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.usefixtures("hf_in_float64")
@pytest.mark.parametrize("arch", list(CASES))
def test_the_golden_logits_and_gradients_are_hf_s(goldens, arch):
    """The file itself holds HF's logits and torch autograd's gradients of sum(dy * logits)."""
    path, hf, x, mask = goldens[arch]
    _, arrays, meta = verify.read_golden(path)
    kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask.astype(np.int64))}
    hf.zero_grad()
    logits = hf(inputs=torch.from_numpy(x), **kwargs).logits
    want = logits.detach().numpy()
    assert np.abs(arrays["act/output"] - want).max() / np.abs(want).max() <= PUBLISHED_FLOAT64_RTOL
    (logits * torch.from_numpy(arrays["loss/dy"])).sum().backward()
    model, _ = verify.golden_model(path)
    names, specs, hf_params = pretrained.hf_names(model), model.specs(), dict(hf.named_parameters())
    scale = max(float(np.abs(arrays[f"grad/{n}"]).max()) for n in meta["gradients"])
    for name in meta["gradients"]:
        g = hf_params[names[name]].grad.numpy()
        g = g.T if specs[name].transpose else g
        err = np.abs(arrays[f"grad/{name}"] - g).max() / max(np.abs(g).max(), INTEROP_GRAD_FLOOR * scale)
        assert err <= INTEROP_GRAD_RTOL, name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("arch", "tensor", "breaks"), [
    (MLM, "decoder.attn.v.weight", "act/decoder.attn.v.out"),
    (MLM, "postprocessor.bias", "act/postprocessor.out"),
    (CONV, "decoder.output.weight", "act/decoder.out"),
    (CONV, "preprocessor.batchnorm.running_mean", "act/preprocessor.out"),  # a buffer
])
def test_a_planted_bug_is_named_first(goldens, tmp_path, capsys, dtype, arch, tensor, breaks):
    path, *_ = goldens[arch]
    model, run = verify.golden_model(path)
    params, buffers = dict(model.params), dict(model.buffers)
    where = buffers if tensor in buffers else params
    where[tensor] = where[tensor].copy()
    where[tensor].flat[3] += 1e-3
    bad = pretrained.PretrainedPerceiver(arch, model.hf_config, params, buffers, dtype="float64")
    theirs = verify.write_run(tmp_path / "theirs.npz", verify.cast(bad, dtype), **run)
    report = verify.compare(path, theirs)
    assert not report.ok and report.first_break is not None
    assert report.first_break.name == breaks
    capsys.readouterr()
    assert cli(["compare", str(path), str(theirs)]) == 1
    assert f"first break: {breaks} " in capsys.readouterr().out


def test_the_multimodal_model_s_dict_inputs_logits_and_options(tmp_path):
    hf = _hf("PerceiverForMultimodalAutoencoding", MULTIMODAL)
    model = pretrained.from_hf(hf, dtype="float64")
    rng = np.random.default_rng(1)
    x = {"audio": rng.standard_normal((2, 32)), "image": rng.standard_normal((2, 2, 3, 8, 8)),
         "label": rng.standard_normal((2, 3))}
    options = {"subsampled_output_points": {**SUBSAMPLED, "label": None}}
    path = verify.write_golden(tmp_path / "golden.npz", model, x, seed=5, options=options)
    _, arrays, meta = verify.read_golden(path)
    assert {k for k in arrays if k.startswith("input/")} == {
        "input/x.audio", "input/x.image", "input/x.label",
        "input/option.subsampled_output_points.audio", "input/option.subsampled_output_points.image"}
    assert meta["activations"][-3:] == ["output.audio", "output.image", "output.label"]
    assert arrays["act/output.image"].shape == (2, 6, 3)
    assert {k for k in arrays if k.startswith("loss/")} == {"loss/dy.audio", "loss/dy.image", "loss/dy.label"}
    assert set(meta["gradients"]) == set(model.specs())
    ref, run = verify.golden_model(path)
    assert set(run["x"]) == {"audio", "image", "label"}
    assert {k: v.tolist() for k, v in run["options"]["subsampled_output_points"].items()} == {
        k: v.tolist() for k, v in SUBSAMPLED.items()}
    report = verify.compare(path, verify.write_run(tmp_path / "t32.npz", verify.cast(ref, "float32"), **run))
    assert report.ok and report.compared["missing"] == 0, str(report)


SAMPLED = {
    "PerceiverForMaskedLM": dict(d_model=16, vocab_size=262, max_position_embeddings=10),
    "PerceiverForSequenceClassification": dict(d_model=16, vocab_size=262, max_position_embeddings=10,
                                               num_labels=3),
    "PerceiverForImageClassificationLearned": dict(d_model=512, image_size=6, num_labels=4),
    "PerceiverForImageClassificationFourier": dict(d_model=261, image_size=7, num_labels=4),
    "PerceiverForImageClassificationConvProcessing": dict(d_model=322, image_size=16, num_labels=4),
    "PerceiverForOpticalFlow": dict(d_model=322, train_size=[6, 5]),
    "PerceiverForMultimodalAutoencoding": MULTIMODAL,
}


@pytest.mark.parametrize("arch", list(SAMPLED))
def test_sample_inputs_fit_every_published_class(arch):
    model = pretrained.PretrainedPerceiver(arch, {**SMALL, **SAMPLED[arch]})
    text = arch in (MLM, "PerceiverForSequenceClassification")
    x, mask = verify.sample_inputs(model, np.random.default_rng(0), batch=3, mask=text)
    y = model(x, mask)
    first = next(iter(y.values())) if isinstance(y, dict) else y
    assert first.shape[0] == 3 and (mask is not None) == text
    if text:
        assert x.dtype.kind == "i" and x.shape == (3, 10) and mask[-1].tolist() == [True] * 5 + [False] * 5
        assert verify.sample_inputs(model, np.random.default_rng(0), length=4)[0].shape == (2, 4)
        with pytest.raises(ValueError, match=r"length: expected an integer in \[1, max_position_embeddings "
                                             r"= 10\]"):
            verify.sample_inputs(model, np.random.default_rng(0), length=11)
    else:
        with pytest.raises(ValueError, match=f"mask: {arch} takes no attention mask"):
            verify.sample_inputs(model, np.random.default_rng(0), mask=True)


def test_the_arguments_of_the_other_model_kind_are_refused(tmp_path):
    model = pretrained.PretrainedPerceiver(MLM, {**SMALL, **CASES[MLM][0]}, dtype="float64")
    ids = np.zeros((1, 10), dtype=np.int64)
    with pytest.raises(ValueError, match=f"queries: {MLM} makes its own decoder queries"):
        verify.write_golden(tmp_path / "g.npz", model, ids, queries=np.zeros((1, 2, 3)))
    plain = pnp.build(input_dim=5, latent_dim=8, num_latents=2, num_layers=1, num_heads=2, dtype="float64")
    with pytest.raises(ValueError, match="options: a Perceiver takes no decoder options"):
        verify.write_run(tmp_path / "t.npz", plain, np.zeros((1, 3, 5)), options={"x": 1})
    assert not list(tmp_path.iterdir())


def test_a_perceiver_golden_file_rebuilds_too(tmp_path):
    model = pnp.build(input_dim=5, latent_dim=8, num_latents=2, num_layers=1, num_heads=2, dtype="float64",
                      backend="numpy")
    x = np.random.default_rng(0).standard_normal((2, 4, 5))
    path = verify.write_golden(tmp_path / "g.npz", model, x, np.array([[1, 1, 1, 0], [1] * 4], bool))
    ref, run = verify.golden_model(path)
    assert isinstance(ref, pnp.Perceiver) and set(run) == {"x", "mask", "seed"}
    report = verify.compare(path, verify.write_run(tmp_path / "t.npz", verify.cast(ref, "float32"), **run))
    assert report.ok and "grad/x" in {r.name for r in report.rows}
