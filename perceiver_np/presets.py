"""Presets: option sets that reproduce the published Perceivers (docs/presets.md).

Each preset is a function returning a plain dict of :class:`~perceiver_np.PerceiverConfig`
options; every switch in it is an ordinary option, so a preset can be overridden field by field::

    model = pnp.build(**pnp.presets.deepmind(input_dim=3, latent_dim=64, num_latents=32))

- ``edifice``: the seed model (Edifice's ``Perceiver.build``), perceiver_np's default.
- ``deepmind``: DeepMind's Perceiver IO encoder (JAX/Haiku, the paper's code) with its ImageNet
  sizes: no input projection (LayerNorm on the raw input), cross-attention qk width from the
  input, 1 cross head and 8 self heads, widening 1, tanh GELU, one cross block then
  ``num_blocks`` repeats of the shared self blocks, masked logits -1e30 with rows that see no
  key zeroed, no final LayerNorm, the latents as the output (its decoders follow).
- ``hf``: Hugging Face ``transformers``' ``PerceiverModel`` with ``PerceiverConfig()``'s
  defaults: as DeepMind but exact GELU, dropout only on attention probabilities (0.1), and a
  row that sees no key attending uniformly over all keys (HF's additive ``finfo.min`` mask).
"""

from __future__ import annotations

from typing import Any

from .config import RECOMMENDED_DEFAULTS

PRESETS = ("edifice", "deepmind", "hf")


def edifice(**overrides: Any) -> dict[str, Any]:
    """The seed: Edifice's defaults (``input_dim`` is required, as in Edifice)."""
    return {**RECOMMENDED_DEFAULTS, **overrides}


def deepmind(**overrides: Any) -> dict[str, Any]:
    """DeepMind's Perceiver IO encoder (ImageNet configuration of the paper's code)."""
    opts: dict[str, Any] = {
        "latent_dim": 1024, "num_latents": 512,
        "input_projection": False, "qk_channels": None, "v_channels": None,
        "cross_heads": 1, "num_heads": 8,
        "cross_widening_factor": 1, "self_widening_factor": 1,
        "num_cross_layers": 1, "num_layers": 6, "num_blocks": 8,
        "use_query_residual": True, "gelu": "tanh",
        "dropout": 0.0, "attention_dropout": 0.0, "masked_rows": "zero",
        "final_norm": False, "decoder": "latents",
    }
    return {**opts, **overrides}


def hf(**overrides: Any) -> dict[str, Any]:
    """Hugging Face ``PerceiverModel`` with ``transformers.PerceiverConfig()``'s defaults:
    d_latents 1280, 256 latents, 26 self-attends in 1 block, 8 heads each side."""
    opts: dict[str, Any] = {
        **deepmind(),
        "latent_dim": 1280, "num_latents": 256,
        "cross_heads": 8, "num_heads": 8, "num_layers": 26, "num_blocks": 1,
        "gelu": "exact", "dropout": 0.0, "attention_dropout": 0.1, "masked_rows": "uniform",
    }
    return {**opts, **overrides}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset called ``name`` (one of :data:`PRESETS`) with ``overrides`` applied."""
    table = {"edifice": edifice, "deepmind": deepmind, "hf": hf}
    if name not in table:
        raise ValueError(f"preset: expected one of {PRESETS}, got {name!r}")
    return table[name](**overrides)
