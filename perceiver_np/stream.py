"""The streaming encoder: inputs of any length, never held whole.

::

    y = encode_stream(model, chunks)               # chunks: [B, n_i, C] arrays, one pass per cross block
    y = encode_stream(model, NpyChunks("x.npy"))   # a file read DEFAULT_CHUNK positions at a time
    y = encode_stream(model, np.load("x.npy", mmap_mode="r"), chunk_size=16384)

Inference only. Each cross-attention keeps, per latent and head, the online-softmax state of
docs/kernel.md (running max, running sum and accumulator) and folds the input in chunk by
chunk: the input projection, the key/value LayerNorm and projections and the attention of one
chunk at a time, with the pieces of :mod:`perceiver_np.fast` (the plain ones with
``backend="numpy"``). Extra memory grows with the chunk, not with N. :class:`NpyChunks` reads a
``.npy`` file into one reused buffer, so not even the page cache's copy of the file counts
against the process (a memory map's pages do, once touched). The result
equals :meth:`Perceiver.forward` up to rounding (tests/test_stream.py). With
``num_cross_layers > 1`` the input is streamed once per cross block, so ``chunks`` must then be
an array (memory-mapped or not) or a callable returning a fresh iterable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from . import fast
from .attention import attention_forward
from .blocks import ffn_sublayer_forward, self_block_forward
from .layers import (
    MASK_FILL,
    Params,
    layernorm_forward,
    linear_forward,
    merge_heads,
    split_heads,
    sub,
)
from .model import Perceiver, input_bound, overflow_limit
from .shapes import as_mask, as_real_input, expect_in_range, expect_shape

#: Positions per chunk by default: at B = 1 the fast path's chunk (perceiver_np.fast.CHUNK_ROWS),
#: and a reused read buffer of 16384 x C values (18 MiB for C = 287 in float32).
DEFAULT_CHUNK = 16384

Chunks = np.ndarray | Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


class NpyChunks:
    """A ``.npy`` file of shape [B, N, C] (or [B, N] for masks) as a re-iterable of chunks
    [B, n, C] along N, read with ``readinto`` into one buffer that every chunk reuses: a
    chunk is valid until the next one is read (the streaming encoder uses each once). No
    pickle: object arrays are refused, like ``np.load(allow_pickle=False)``."""

    def __init__(self, path: str, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.path, self.chunk_size = str(path), check_chunk_size(chunk_size)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if dtype.hasobject:
            raise ValueError(f"{self.path}: object arrays are not loaded (they need pickle)")
        if fortran or len(shape) not in (2, 3):
            raise ValueError(f"{self.path}: expected a C-order array [B, N, C] or [B, N], got shape "
                             f"{shape}{' in Fortran order' if fortran else ''}")
        self.shape, self.dtype = tuple(shape), dtype
        size = self.offset + int(np.prod(shape)) * dtype.itemsize
        if os.path.getsize(self.path) < size:
            raise ValueError(f"{self.path}: truncated, expected {size} bytes for shape {shape}")

    def __iter__(self) -> Iterator[np.ndarray]:
        b, n = self.shape[0], self.shape[1]
        row = int(np.prod(self.shape[2:], dtype=np.int64))  # elements per position
        buf = np.empty((b, min(self.chunk_size, n), *self.shape[2:]), dtype=self.dtype)
        with open(self.path, "rb") as f:
            for start in range(0, n, self.chunk_size):
                size = min(self.chunk_size, n - start)
                out = buf[:, :size]
                for i in range(b):  # sample i's positions [start, start + size): contiguous on disk
                    f.seek(self.offset + (i * n + start) * row * self.dtype.itemsize)
                    view = memoryview(out[i]).cast("B")  # buf[i, :size] is contiguous too
                    if f.readinto(view) != view.nbytes:
                        raise ValueError(f"{self.path}: truncated while reading")
                yield out


def check_chunk_size(chunk_size: object) -> int:
    """``chunk_size`` as a positive int, or a ValueError naming it (1.5, True, 0 are refused)."""
    if (isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer))
            or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
    return int(chunk_size)


def _passes(
    source: Any, chunk_size: int, name: str = "chunks", letters: str = "[B, N, C]"
) -> Callable[[], Iterator[np.ndarray]]:
    """A function returning a fresh iterator over the chunks (an array is cut along N)."""
    if isinstance(source, np.ndarray):
        if source.ndim != letters.count(",") + 1:
            raise ValueError(f"{name}: expected an array {letters}, got shape {source.shape}")
        return lambda: (source[:, i:i + chunk_size] for i in range(0, source.shape[1], chunk_size))
    if isinstance(source, NpyChunks):
        return lambda: iter(source)
    if callable(source):
        return lambda: iter(source())
    once = iter(source)
    used = [False]

    def single() -> Iterator[np.ndarray]:
        if used[0]:
            raise ValueError(f"{name}: an iterator can be streamed once, but this model has several "
                             "cross blocks; pass an array or a callable returning a fresh iterable")
        used[0] = True
        return once

    return single


def _validated(
    chunks: Iterator[np.ndarray], masks: Iterator[np.ndarray] | None, b: int, model: Perceiver
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(x_c [B, n, C] of the model's dtype, mask_c [B, n] bool or None) per chunk, checked."""
    cfg = model.config
    p = model.checked_params()
    for x in chunks:
        x = as_real_input("chunk", x, cfg.np_dtype)
        expect_shape("chunk", x, (b, None, cfg.input_dim), "[B, n, C]")
        bound, what = input_bound(cfg, p, x)
        expect_in_range("chunk", x, bound, overflow_limit(cfg.np_dtype, cfg.kv_channels), what)
        keep = None
        if masks is not None:
            mask_chunk = next(masks, None)
            if mask_chunk is None:
                raise ValueError("mask_chunks: fewer mask chunks than input chunks")
            keep = as_mask(mask_chunk, b, x.shape[1], name="mask chunk", letters="[B, n]")
        yield x, keep
    if masks is not None and next(masks, None) is not None:
        raise ValueError("mask_chunks: more mask chunks than input chunks (the mask is longer than "
                         "the input)")


def _cross_block_stream(
    model: Perceiver, i: int, z: np.ndarray, chunks: Iterator[np.ndarray],
    masks: Iterator[np.ndarray] | None,
) -> tuple[np.ndarray, int]:
    """Cross block ``i`` over the streamed input: z [B, M, D] -> ([B, M, D], N seen).

    The fast path is :func:`perceiver_np.fast.cross_block`, which takes its input in chunks
    anyway. The plain path computes each chunk's attention ``(o_c, lse_c)`` with
    :mod:`perceiver_np.attention` and folds it into a running state in float64:
    ``m = max(m, lse_c)``, ``l = l exp(m_old - m) + exp(lse_c - m)``,
    ``acc = acc exp(m_old - m) + exp(lse_c - m) o_c``; at the end ``o = acc / l``. A softmax
    over the union of the chunks' keys is the exp(lse)-weighted mean of the chunks' softmaxes."""
    cfg = model.config
    p: Params = sub(model.params, f"cross.{i}")
    heads = cfg.cross_num_heads
    b = z.shape[0]
    pairs = _validated(chunks, masks, b, model)
    if model.uses_fast_path:
        proj = cfg.input_projection
        return fast.cross_block(
            np.array(z, order="C"), pairs, p, num_heads=heads,
            in_weight=model.params["input_proj.weight"] if proj else None,
            in_bias=model.params["input_proj.bias"] if proj else None,
            use_query_residual=cfg.use_query_residual, gelu=cfg.gelu,
        )
    zq, _ = layernorm_forward(z, sub(p, "q_norm"))
    q, _ = linear_forward(zq, sub(p, "attn.q"))  # [B, M, D] -> [B, M, qk]
    qh = split_heads(q, heads)  # [B, M, qk] -> [B, H, M, dh]
    m_len, dv = qh.shape[2], cfg.cross_v_channels // heads
    m_run = np.full((b, heads, m_len), MASK_FILL, dtype=np.float64)  # running max of lse
    l_run = np.zeros((b, heads, m_len), dtype=np.float64)  # running sum of exp(lse - m)
    acc = np.zeros((b, heads, m_len, dv), dtype=np.float64)  # running sum of exp(lse - m) o
    n_seen = 0
    for x, keep in pairs:
        h = x
        if cfg.input_projection:
            h, _ = linear_forward(x, sub(model.params, "input_proj"))  # [B, n, C] -> [B, n, D]
        hk, _ = layernorm_forward(h, sub(p, "kv_norm"))
        k, _ = linear_forward(hk, sub(p, "attn.k"))  # [B, n, Ckv] -> [B, n, qk]
        v, _ = linear_forward(hk, sub(p, "attn.v"))  # [B, n, Ckv] -> [B, n, v]
        o_c, lse_c = attention_forward(qh, split_heads(k, heads), split_heads(v, heads), keep)
        m_new = np.maximum(m_run, lse_c)
        alpha = np.exp(m_run - m_new)  # rescale what was kept: exp(m_old - m_new) <= 1
        weight = np.exp(lse_c - m_new)  # this chunk's share (0 where it had no visible key)
        l_run = l_run * alpha + weight
        acc = acc * alpha[..., None] + weight[..., None] * o_c
        m_run = m_new
        n_seen += x.shape[1]
    if n_seen == 0:
        raise ValueError("chunks: the input is empty (N = 0)")
    o = (acc / np.where(l_run > 0, l_run, 1.0)[..., None]).astype(cfg.np_dtype)  # [B, H, M, dv]
    att, _ = linear_forward(merge_heads(o), sub(p, "attn.out"))  # [B, M, v] -> [B, M, D]
    a = z + att if cfg.use_query_residual else att
    y, _ = ffn_sublayer_forward(a, p, gelu=cfg.gelu, dropout=0.0, training=False, rng=None,
                                backend=cfg.elementwise_backend)
    return y, n_seen


def encode_stream(
    model: Perceiver,
    chunks: Chunks,
    mask_chunks: Chunks | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """Inference over a streamed input: the output of ``model(x, mask)`` for the concatenation
    ``x`` of ``chunks`` (and ``mask`` of ``mask_chunks``, bool [B, n_i], True = keep)."""
    cfg = model.config
    if cfg.masked_rows != "zero":
        raise ValueError("masked_rows: the streaming encoder zeroes rows with no visible key; "
                         f"got {cfg.masked_rows!r}")
    if cfg.decoder == "query" and cfg.query_source == "given":
        raise ValueError("decoder: the streaming encoder makes its own queries; query_source "
                         "'given' needs model.forward")
    chunk_size = check_chunk_size(chunk_size)
    model.checked_params()
    passes = _passes(chunks, chunk_size)
    mask_passes = None if mask_chunks is None else _passes(mask_chunks, chunk_size, "mask_chunks", "[B, N]")
    first_pass = passes()
    first = next(first_pass, None)
    if first is None:
        raise ValueError("chunks: the input is empty (N = 0)")
    batch = np.asarray(first).shape[0]
    latents = model.params["latents"]
    z = np.broadcast_to(latents, (batch, *latents.shape))  # [M, D] -> [B, M, D]
    n_total = None
    for step, (kind, i) in enumerate(cfg.schedule):
        if kind == "cross":
            stream = _chain(first, first_pass) if step == 0 else passes()
            masks = None if mask_passes is None else mask_passes()
            z, n = _cross_block_stream(model, i, z, stream, masks)
            if n_total is not None and n != n_total:
                raise ValueError(f"chunks: the input changed length between passes ({n_total} then {n})")
            n_total = n
        elif model.uses_fast_path:
            z = fast.self_block(z, sub(model.params, f"self.{i}"), num_heads=cfg.num_heads, gelu=cfg.gelu)
        else:
            z, _ = self_block_forward(z, sub(model.params, f"self.{i}"), num_heads=cfg.num_heads,
                                      gelu=cfg.gelu, backend=cfg.attention_backend("self", False),
                                      ffn_backend=cfg.elementwise_backend)
    if model.uses_fast_path:
        z = fast.final_norm(model, z)
    elif cfg.final_norm:
        z, _ = layernorm_forward(z, sub(model.params, "final_norm"))
    return model.decode(z)[0]  # the head reads the latents only: the model's own


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest
