"""Shared fixtures. Hypothesis runs a bounded number of examples with no deadline: the checks
are numerical and their run time depends on the shapes drawn, not on a bug."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "perceiver_np",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("perceiver_np")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261128)



@pytest.fixture
def hf_in_float64(monkeypatch):
    """Hugging Face's Perceiver code with its Fourier positions and torch's default dtype in
    float64 (tests/hf_helpers.py says why)."""
    torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
    modeling = pytest.importorskip("transformers.models.perceiver.modeling_perceiver",
                                   reason="the HF cross-checks need transformers' Perceiver")
    from .hf_helpers import linear_positions_float64

    monkeypatch.setattr(modeling, "build_linear_positions", linear_positions_float64)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def hf_exact_positions(monkeypatch):
    """Hugging Face's Perceiver code with its Fourier position encodings computed in float64
    and rounded once to the model's dtype (as ours), the model itself untouched: the grid
    (build_linear_positions), the frequency bands and features (generate_fourier_features) and
    the subsampled query positions (decoder_query) run in float64 (tests/hf_helpers.py)."""
    pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
    modeling = pytest.importorskip("transformers.models.perceiver.modeling_perceiver",
                                   reason="the HF cross-checks need transformers' Perceiver")
    from .hf_helpers import in_float64, linear_positions_float64

    monkeypatch.setattr(modeling, "build_linear_positions", linear_positions_float64)
    features = modeling.generate_fourier_features
    monkeypatch.setattr(modeling, "generate_fourier_features",
                        lambda pos, *a, **k: in_float64(features, pos.double(), *a, **k))
    query = modeling.PerceiverBasicDecoder.decoder_query
    monkeypatch.setattr(modeling.PerceiverBasicDecoder, "decoder_query",
                        lambda self, *a, **k: in_float64(query, self, *a, **k))
