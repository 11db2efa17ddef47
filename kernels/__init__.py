"""Numba kernels of perceiver_np, installed as the subpackage ``perceiver_np.kernels``.

``attention_forward`` / ``attention_backward``: the tiled cross-attention kernel (online
softmax, FlashAttention-style), with the signatures of :mod:`perceiver_np.attention`, its plain
NumPy twin. See docs/kernel.md.
"""

from .attention import (
    BACKWARD_BLOCK_M,
    BACKWARD_BLOCK_N,
    FORWARD_BLOCK_M,
    FORWARD_BLOCK_N,
    attention_backward,
    attention_forward,
    choose_splits,
    merge_chunk,
)

__all__ = [
    "BACKWARD_BLOCK_M",
    "BACKWARD_BLOCK_N",
    "FORWARD_BLOCK_M",
    "FORWARD_BLOCK_N",
    "attention_backward",
    "attention_forward",
    "choose_splits",
    "merge_chunk",
]
