"""The released Perceivers' exact structures (pretrained.PUBLISHED: the config.json values of
deepmind/language-perceiver, vision-perceiver-learned/-fourier/-conv, optical-flow-perceiver,
multimodal-perceiver), randomly initialised by transformers: the same parameter count as HF's
model, and HF's float32 logits at the published input size. Slow (the language model has 201M
parameters, optical flow decodes 182,528 queries): marked ``slow``, run by ``make test``."""

from __future__ import annotations

import numpy as np
import pytest

from perceiver_np import pretrained
from perceiver_np.tolerances import PUBLISHED_FLOAT32_RTOL

torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
transformers = pytest.importorskip("transformers", reason="the HF cross-checks need transformers")

pytestmark = pytest.mark.slow


def _inputs(arch, cfg, rng):
    """One sample of the published input size (B = 1)."""
    if arch == "PerceiverForMaskedLM":
        return rng.integers(0, cfg["vocab_size"], size=(1, cfg["max_position_embeddings"]))
    if arch == "PerceiverForOpticalFlow":
        return rng.standard_normal((1, 2, 27, *cfg["train_size"])).astype(np.float32)
    if arch == "PerceiverForMultimodalAutoencoding":
        frames, size = cfg["num_frames"], cfg["image_size"]
        return {"image": rng.standard_normal((1, frames, 3, size, size)).astype(np.float32),
                "audio": rng.standard_normal((1, frames * cfg["audio_samples_per_frame"], 1)
                                             ).astype(np.float32),
                "label": np.zeros((1, cfg["num_labels"]), dtype=np.float32)}
    size = cfg["image_size"] if arch == "PerceiverForImageClassificationLearned" else 224
    return rng.standard_normal((1, 3, size, size)).astype(np.float32)


def _options(arch, cfg):
    """HF's multimodal model decodes a chunk of the output points per call (its conversion
    script's first of 128 chunks); the other classes take no option."""
    if arch != "PerceiverForMultimodalAutoencoding":
        return {}
    frames, size = cfg["num_frames"], cfg["image_size"]
    image = frames * size * size // 128
    audio = frames * cfg["audio_samples_per_frame"] // cfg["samples_per_patch"] // 128
    return {"subsampled_output_points": {"image": np.arange(image), "audio": np.arange(audio), "label": None}}


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.usefixtures("hf_exact_positions")
@pytest.mark.parametrize("name", list(pretrained.PUBLISHED))
def test_published_structure_matches_hf(name):
    """HF's float32 logits within PUBLISHED_FLOAT32_RTOL, with HF's Fourier positions computed
    exactly and rounded once to float32 (as ours; fixture hf_exact_positions, the model itself
    untouched): HF's own positions are float32 numbers (its linspace, and the subsampled query
    positions' division), up to one ulp off the exact grid, which at optical flow's resolution
    (496) moves HF's logits by ~6e-5 relative (docs/pretrained.md): HF's rounding, not a
    difference of the models."""
    arch, cfg = pretrained.published_config(name)
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(transformers.PerceiverConfig(
        **{k: v for k, v in cfg.items() if k != "architectures"})).eval()
    ours = pretrained.from_hf(hf, dtype="float32")
    assert ours.param_count == sum(p.numel() for p in hf.parameters())
    x = _inputs(arch, cfg, np.random.default_rng(0))
    options = _options(arch, cfg)
    got = ours(x, **options)
    del ours
    with torch.no_grad():
        xt = {k: torch.from_numpy(v) for k, v in x.items()} if isinstance(x, dict) else torch.from_numpy(x)
        topt = {"subsampled_output_points": {k: None if v is None else torch.from_numpy(v)
                                             for k, v in options["subsampled_output_points"].items()}
                } if options else {}
        want = hf(inputs=xt, **topt).logits
    if isinstance(want, dict):
        assert all(v.dtype == torch.float32 for v in want.values())
        for k in want:
            assert _rel(got[k], want[k].numpy()) <= PUBLISHED_FLOAT32_RTOL, k
    else:
        assert want.dtype == torch.float32
        assert _rel(got, want.numpy()) <= PUBLISHED_FLOAT32_RTOL
