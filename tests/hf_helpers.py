"""What the tests against Hugging Face's published classes share: a random HF model in float64,
and HF's Fourier positions computed in float64 (the fixture ``hf_in_float64``).

HF builds every Fourier position grid with ``torch.linspace(..., dtype=torch.float32)``
(transformers 5.x ``build_linear_positions``), and the frequency bands and the subsampled
positions in torch's default dtype, whatever the model's dtype: a ``.double()`` HF model carries
float32-rounded positions, whose last bit also depends on torch's vectorised linspace kernel (up
to 6e-8 off the exact grid, which the highest bands turn into ~1e-5). perceiver_np computes the
exact grid in float64 (docs/position.md). The float64 comparisons therefore run HF's own code with
those positions in float64 (the fixture ``hf_in_float64`` of conftest.py); the float32
comparisons run HF unchanged."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
modeling = pytest.importorskip("transformers.models.perceiver.modeling_perceiver",
                               reason="the HF cross-checks need transformers' Perceiver")


def linear_positions_float64(index_dims, output_range=(-1.0, 1.0), device=None):
    """HF's build_linear_positions, in float64 instead of float32."""
    ranges = [torch.linspace(output_range[0], output_range[1], n, dtype=torch.float64, device=device)
              for n in index_dims]
    return torch.stack(torch.meshgrid(*ranges, indexing="ij"), dim=-1)


def in_float64(fn, *args, **kwargs):
    """fn(*args, **kwargs) with torch's default dtype float64 for the call."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_default_dtype(before)


def random_hf_model(cls, config, seed=0):
    """``cls(config)`` in float64, eval mode, every parameter made random (HF initialises some
    tables and biases to constants, so a mix-up of two of them could pass) and batch norm's
    running statistics too."""
    torch.manual_seed(seed)
    model = cls(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model
