"""How our parameter names map onto the keys of Hugging Face's ``PerceiverFor*`` state dicts.

The small shared vocabulary of :mod:`perceiver_np.pretrained` and the modules of its pieces
(:mod:`perceiver_np.multimodal`): a :class:`ParamSpec` per parameter (our shape, the HF key,
whether the HF tensor is the transpose of ours), the specs of a Linear and of a cross block, and
the ops a decoder's cross block runs on.
"""

from __future__ import annotations

from typing import NamedTuple

from .backends import layer_ops
from .config import PerceiverConfig
from .interop import _HF_CROSS
from .layers import LayerOps

#: HF's keys of every ``PerceiverFor*`` model sit under this prefix (``model.perceiver``).
HF_PREFIX = "perceiver."


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]  # our layout
    hf: str  # the HF state-dict key
    transpose: bool  # a Linear weight: ours [in, out], HF's [out, in]


def _linear_specs(ours: str, hf: str, n_in: int, n_out: int) -> dict[str, ParamSpec]:
    return {f"{ours}.weight": ParamSpec((n_in, n_out), f"{hf}.weight", True),
            f"{ours}.bias": ParamSpec((n_out,), f"{hf}.bias", False)}


def _cross_specs(prefix: str, hf: str, q_dim: int, kv_dim: int, qk: int, v: int, widening: int
                 ) -> dict[str, ParamSpec]:
    """A cross block (queries of width q_dim over keys of width kv_dim) under ``prefix``; the
    same local names as the encoder's cross blocks (:func:`perceiver_np.config.cross_block_shapes`)."""
    shapes = {
        "q_norm.gamma": (q_dim,), "q_norm.beta": (q_dim,),
        "kv_norm.gamma": (kv_dim,), "kv_norm.beta": (kv_dim,),
        "attn.q.weight": (q_dim, qk), "attn.q.bias": (qk,),
        "attn.k.weight": (kv_dim, qk), "attn.k.bias": (qk,),
        "attn.v.weight": (kv_dim, v), "attn.v.bias": (v,),
        "attn.out.weight": (v, q_dim), "attn.out.bias": (q_dim,),
        "ffn_norm.gamma": (q_dim,), "ffn_norm.beta": (q_dim,),
        "ffn.up.weight": (q_dim, widening * q_dim), "ffn.up.bias": (widening * q_dim,),
        "ffn.down.weight": (widening * q_dim, q_dim), "ffn.down.bias": (q_dim,),
    }
    return {f"{prefix}.{k}": ParamSpec(s, f"{hf}.{_HF_CROSS[k]}", k.endswith(".weight") and len(s) == 2)
            for k, s in shapes.items()}


def decoder_ops(cfg: PerceiverConfig, training: bool) -> LayerOps:
    """The ops of a decoder's cross block: the encoder's cross-attention ops, except that the
    decoder's keys (the latents) are never masked, so HF's ``masked_rows="uniform"`` and the
    kernel's zero rows agree and the kernel runs (unless attention dropout is training)."""
    return layer_ops(cfg.replace(masked_rows="zero"), "cross", training)
