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

