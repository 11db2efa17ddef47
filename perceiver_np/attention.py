"""Scaled dot-product attention with the FlashAttention interface, in plain NumPy.

::

    o, lse = attention_forward(q, k, v, mask=None, scale=None)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, mask=None, scale=None)
    state = chunk_state(B, H, M, dv); merge_chunk(state, o_c, lse_c); o = finish_chunks(state, dtype)

q: [B, H, M, dh], k: [B, H, N, dh], v: [B, H, N, dv], mask: [B, N] bool (True = keep) or None,
o: [B, H, M, dv], lse: [B, H, M] = log-sum-exp of each query's scaled scores over its visible
keys (MASK_FILL for a query with no visible key). The backward recomputes the probabilities
from ``lse`` instead of keeping them, exactly like the tiled kernel
``perceiver_np.kernels.attention_forward``/``attention_backward``, which has the same
signatures and is tested equal to these functions. This plain path materialises the
[B, H, M, N] scores; the kernel never does. Keys that arrive in chunks (the inference engine)
are merged with ``merge_chunk``, the plain twin of the kernel's.

The semantics are those of :func:`perceiver_np.layers.attention_forward` (the teaching path,
which keeps the probabilities in its cache): masked keys get exactly zero weight and gradient,
a query with no visible key gets zero output and zero gradients.
"""

from __future__ import annotations

import numpy as np

from .constants import MASK_FILL
from .shapes import ChunkState, check_attention_args, expect_shape
from .workspace import Alloc, fresh


def _scores(q: np.ndarray, k: np.ndarray, mask: np.ndarray | None, scale: float) -> np.ndarray:
    s = (q @ k.transpose(0, 1, 3, 2)) * q.dtype.type(scale)  # [B,H,M,dh] @ [B,H,dh,N] -> [B,H,M,N]
    if mask is not None:
        s = np.where(mask[:, None, None, :], s, s.dtype.type(MASK_FILL))
    return s


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (o [B, H, M, dv], lse [B, H, M]). See the module docstring."""
    scale = check_attention_args(q, k, v, mask, scale)
    s = _scores(q, k, mask, scale)
    m_i = s.max(axis=-1, keepdims=True)  # [B, H, M, 1], each query's max score
    e = np.exp(s - m_i)
    l_i = e.sum(axis=-1, keepdims=True)  # [B, H, M, 1], each query's sum of exp
    p = e / l_i
    lse = (m_i + np.log(l_i))[..., 0]  # [B, H, M, 1] -> [B, H, M]
    if mask is not None:
        visible = np.asarray(mask.any(axis=-1))  # [B, N] -> [B]
        p = p * visible[:, None, None, None]
        lse = np.where(visible[:, None, None], lse, lse.dtype.type(MASK_FILL))
    return p @ v, lse  # [B,H,M,N] @ [B,H,N,dv] -> [B,H,M,dv]


def attention_backward(
    do: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    lse: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (dq [B, H, M, dh], dk [B, H, N, dh], dv [B, H, N, dv])."""
    scale = check_attention_args(q, k, v, mask, scale)
    expect_shape("do", do, (*q.shape[:3], v.shape[3]), "[B, H, M, dv]")
    expect_shape("o", o, do.shape, "[B, H, M, dv]")
    expect_shape("lse", lse, q.shape[:3], "[B, H, M]")
    # in the forward pass this was p = exp(s - lse): recompute it instead of storing it
    p = np.exp(_scores(q, k, mask, scale) - lse[..., None])  # [B, H, M, N]
    if mask is not None:
        p = p * np.asarray(mask.any(axis=-1))[:, None, None, None]  # rows with no visible key: 0
    dv = p.transpose(0, 1, 3, 2) @ do  # [B,H,N,M] @ [B,H,M,dv] -> [B,H,N,dv]
    dp = do @ v.transpose(0, 1, 3, 2)  # [B,H,M,dv] @ [B,H,dv,N] -> [B,H,M,N]
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
    delta = (do * o).sum(axis=-1, keepdims=True)  # [B, H, M, 1]
    ds = p * (dp - delta) * p.dtype.type(scale)
    dq = ds @ k  # [B,H,M,N] @ [B,H,N,dh] -> [B,H,M,dh]
    dk = ds.transpose(0, 1, 3, 2) @ q  # [B,H,N,M] @ [B,H,M,dh] -> [B,H,N,dh]
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Keys that arrive in chunks: the online-softmax merge (the kernel's merge_chunk is the twin)
# ---------------------------------------------------------------------------------------------


def chunk_state(b: int, h: int, m: int, dv: int, alloc: Alloc = fresh) -> ChunkState:
    """The state before any chunk: no key seen (m at MASK_FILL, l and acc 0), in float64
    (its buffers from ``alloc``, :mod:`perceiver_np.workspace`)."""
    state = ChunkState(alloc("m", (b, h, m), np.float64), alloc("l", (b, h, m), np.float64),
                       alloc("acc", (b, h, m, dv), np.float64))
    state.m.fill(MASK_FILL)
    state.l.fill(0.0)
    state.acc.fill(0.0)
    return state


def merge_chunk(state: ChunkState, o_c: np.ndarray, lse_c: np.ndarray) -> None:
    """Fold one chunk's :func:`attention_forward` result (o_c [B, H, M, dv], lse_c [B, H, M])
    into ``state``, in place, in float64::

        m_new = max(m, lse_c)
        l     = l exp(m - m_new) + exp(lse_c - m_new)
        acc   = acc exp(m - m_new) + exp(lse_c - m_new) o_c

    A softmax over the union of the chunks' keys is the exp(lse)-weighted mean of the chunks'
    softmaxes; rescaling by the running max keeps every exp() at most 1."""
    expect_shape("o_c", o_c, state.acc.shape, "[B, H, M, dv]")
    expect_shape("lse_c", lse_c, state.m.shape, "[B, H, M]")
    m_new = np.maximum(state.m, lse_c)  # [B, H, M]
    alpha = np.exp(state.m - m_new)  # rescale what was kept: exp(m_old - m_new) <= 1
    weight = np.exp(lse_c - m_new)  # this chunk's share (0 where it had no visible key)
    state.l[...] = state.l * alpha + weight
    state.acc[...] = state.acc * alpha[..., None] + weight[..., None] * o_c
    state.m[...] = m_new


def finish_chunks(state: ChunkState, dtype: np.dtype, alloc: Alloc = fresh) -> np.ndarray:
    """o = acc / l: [B, H, M, dv] in ``dtype`` (from ``alloc``'s "o"); 0 for a query that saw
    no visible key (its acc is 0: every chunk gave it o_c = 0)."""
    o = alloc("o", state.acc.shape, dtype)
    np.divide(state.acc, np.where(state.l > 0, state.l, 1.0)[..., None], out=o, casting="same_kind")
    return o
