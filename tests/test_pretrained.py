"""The published Perceivers (HF's PerceiverFor* classes) against transformers itself: a randomly
initialised HF model at a small config, loaded here, gives HF's logits and torch autograd's
gradients (float64, HF's positions in float64 too: tests/hf_helpers.py), and HF's float32 logits
after save_pretrained / from_pretrained, HF unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from perceiver_np import engine, pretrained
from perceiver_np.tolerances import (
    FAST_FLOAT64_RTOL,
    INTEROP_GRAD_FLOOR,
    INTEROP_GRAD_RTOL,
    PUBLISHED_FLOAT32_RTOL,
    PUBLISHED_FLOAT64_RTOL,
)

from .hf_helpers import random_hf_model

torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
transformers = pytest.importorskip("transformers", reason="the HF cross-checks need transformers")

SMALL = dict(num_latents=6, d_latents=16, num_blocks=1, num_self_attends_per_block=2,
             num_self_attention_heads=2, num_cross_attention_heads=1, attention_probs_dropout_prob=0.0)


def _config(**extra):
    return transformers.PerceiverConfig(**{**SMALL, **extra})


CASES = {
    "PerceiverForMaskedLM": (lambda: _config(d_model=16, vocab_size=262, max_position_embeddings=10),
                             lambda rng: rng.integers(0, 262, size=(2, 10))),
    "PerceiverForSequenceClassification": (
        lambda: _config(d_model=16, vocab_size=262, max_position_embeddings=10, num_labels=3),
        lambda rng: rng.integers(0, 262, size=(2, 7))),
    "PerceiverForImageClassificationLearned": (
        lambda: _config(d_model=512, image_size=6, num_labels=4),
        lambda rng: rng.standard_normal((2, 3, 6, 6))),
    "PerceiverForImageClassificationFourier": (
        lambda: _config(d_model=261, num_labels=4),
        lambda rng: rng.standard_normal((2, 3, 5, 7))),
    "PerceiverForImageClassificationConvProcessing": (
        lambda: _config(d_model=322, num_labels=4),
        lambda rng: rng.standard_normal((2, 3, 16, 20))),
    "PerceiverForOpticalFlow": (
        lambda: _config(d_model=322, train_size=[6, 5]),
        lambda rng: rng.standard_normal((1, 2, 27, 6, 5))),
}


def _pair(arch, seed=0):
    make_cfg, make_x = CASES[arch]
    hf = random_hf_model(getattr(transformers, arch), make_cfg(), seed)
    ours = pretrained.from_hf(hf, dtype="float64")
    return hf, ours, make_x(np.random.default_rng(seed + 1))


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.usefixtures("hf_in_float64")
@pytest.mark.parametrize("arch", list(CASES))
def test_logits_and_gradients_equal_hf_in_float64(arch):
    hf, ours, x = _pair(arch)
    y, cache = ours.forward(x)
    xt = torch.from_numpy(x)
    out = hf(inputs=xt).logits
    assert y.shape == tuple(out.shape)
    assert _rel(y, out.detach().numpy()) <= PUBLISHED_FLOAT64_RTOL
    dy = np.random.default_rng(7).standard_normal(y.shape)
    grads = ours.backward(dy, cache)
    hf.zero_grad()
    (out * torch.from_numpy(dy)).sum().backward()
    names = pretrained.hf_names(ours)
    hf_params = dict(hf.named_parameters())
    specs = ours.specs()
    for name, g in grads.items():
        want = hf_params[names[name]].grad.numpy()
        if specs[name].transpose:
            want = want.T
        scale = max(np.abs(want).max(), INTEROP_GRAD_FLOOR)
        assert np.abs(g - want).max() / scale <= INTEROP_GRAD_RTOL, name


@pytest.mark.usefixtures("hf_in_float64")
def test_masked_language_model_with_a_mask_and_a_fully_masked_sample():
    hf, ours, ids = _pair("PerceiverForMaskedLM")
    mask = np.ones(ids.shape, dtype=bool)
    mask[0, 6:] = False
    mask[1, :] = False  # HF: every key masked -> uniform attention over all of them
    y = ours(ids, mask)
    want = hf(inputs=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64))).logits
    assert _rel(y, want.detach().numpy()) <= PUBLISHED_FLOAT64_RTOL


@pytest.mark.usefixtures("hf_in_float64")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", ["PerceiverForMaskedLM", "PerceiverForImageClassificationConvProcessing"])
def test_save_pretrained_directory_loads_without_torch_code(tmp_path, arch, dtype):
    hf, ours64, x = _pair(arch)
    hf.float().save_pretrained(tmp_path) if dtype == "float32" else hf.save_pretrained(tmp_path)
    loaded = pretrained.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.architecture == arch
    want = ours64(x)
    got = loaded(x.astype(dtype) if x.dtype.kind == "f" else x)
    assert _rel(got, want) <= (PUBLISHED_FLOAT64_RTOL if dtype == "float64" else PUBLISHED_FLOAT32_RTOL)


@pytest.mark.parametrize("arch", list(CASES))
def test_float32_logits_equal_unmodified_hf(tmp_path, arch):
    """HF in float32 exactly as shipped (float32 positions included), saved and loaded here."""
    hf, _, x = _pair(arch)
    hf.float().save_pretrained(tmp_path)
    ours = pretrained.from_pretrained(tmp_path, dtype="float32")
    xs = x.astype(np.float32) if x.dtype.kind == "f" else x
    want = hf(inputs=torch.from_numpy(xs)).logits.detach().numpy()
    assert _rel(ours(xs), want) <= PUBLISHED_FLOAT32_RTOL


def _hf_hidden_state_names(cfg):
    """Our record names in the order of HF's ``hidden_states``: the input of every self layer,
    then each block's output (HF's PerceiverEncoder appends them so)."""
    names, last = [], "cross.0.out"
    for use in range(cfg["num_blocks"]):
        for j in range(cfg["num_self_attends_per_block"]):
            names.append(last)
            last = f"self.{j}.use{use}.out"
        names.append(last)
    return names


@pytest.mark.usefixtures("hf_in_float64")
@pytest.mark.parametrize("arch", list(CASES))
def test_every_hidden_state_equals_hf_in_float64(arch):
    make_cfg, make_x = CASES[arch]
    cfg = make_cfg().to_dict()
    cfg["num_blocks"] = 2  # shared self blocks used twice: HF lists each use
    hf = random_hf_model(getattr(transformers, arch), transformers.PerceiverConfig(**cfg))
    ours = pretrained.from_hf(hf, dtype="float64")
    x = make_x(np.random.default_rng(1))
    record = {}
    ours.forward(x, record=record)
    hidden = hf(inputs=torch.from_numpy(x), output_hidden_states=True).hidden_states
    names = _hf_hidden_state_names(cfg)
    assert len(hidden) == len(names)
    for name, want in zip(names, hidden, strict=True):
        assert _rel(record[name], want.detach().numpy()) <= PUBLISHED_FLOAT64_RTOL, name


@pytest.mark.parametrize("arch", list(CASES))
def test_inference_runs_the_engine_and_equals_the_forward(arch, monkeypatch):
    """model(x) runs the encoder's inference engine, and the decoder's cross block on it too
    (engine.decode_queries) except the multimodal decoder's; it equals the forward of the
    training path, with a mask on the text models."""
    _, ours, x = _pair(arch)
    mask = None
    if x.dtype.kind in "iu":
        mask = np.ones(x.shape, dtype=bool)
        mask[0, 4:] = False
    calls = []
    encode, decode = engine.encode_array, engine.decode_queries
    monkeypatch.setattr(engine, "encode_array", lambda *a, **k: calls.append("encode") or encode(*a, **k))
    monkeypatch.setattr(engine, "decode_queries", lambda *a, **k: calls.append("decode") or decode(*a, **k))
    assert _rel(ours(x, mask), ours.forward(x, mask)[0]) <= FAST_FLOAT64_RTOL
    multimodal = arch == "PerceiverForMultimodalAutoencoding"
    assert calls == (["encode"] if multimodal else ["encode", "decode"])


def test_an_integer_attention_mask_is_hfs_and_other_values_are_refused():
    _, ours, ids = _pair("PerceiverForMaskedLM")
    mask = np.ones(ids.shape, dtype=np.int64)
    mask[0, 5:] = 0
    assert np.array_equal(ours(ids, mask), ours(ids, mask.astype(bool)))
    mask[1, 2] = 2
    with pytest.raises(ValueError, match=r"mask: an integer attention mask .* got the values \[0, 1, 2\]"):
        ours(ids, mask)


@pytest.mark.parametrize("name", ["decoder.output.weight", "preprocessor.position_embeddings", "latents"])
def test_a_nan_parameter_is_named_on_every_path(name):
    _, ours, x = _pair("PerceiverForImageClassificationLearned")
    ours.params[name] = ours.params[name].copy()
    ours.params[name][0, 1] = np.nan
    for run in (ours, lambda x: ours.forward(x)[0]):
        with pytest.raises(ValueError, match=rf"params\['{name}'\]: 1 non-finite value\(s\)"):
            run(x)
