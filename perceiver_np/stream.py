"""The streaming encoder: inputs of any length, never held whole.

::

    y = encode_stream(model, chunks)               # chunks: [B, n_i, C] arrays, one pass per cross block
    y = encode_stream(model, NpyChunks("x.npy"))   # a file read STREAM_CHUNK_POSITIONS positions at a time
    y = encode_stream(model, np.load("x.npy", mmap_mode="r"), chunk_size=16384)

Inference only: the inference engine (:func:`perceiver_np.engine.encode`, the same one
``model(x)`` runs) over an input that arrives in chunks. Each cross-attention keeps, per latent
and head, the online-softmax state of docs/kernel.md (running max, running sum and accumulator)
and folds the input in chunk by chunk, so extra memory grows with the chunk, not with N.
:class:`NpyChunks` reads a ``.npy`` file into one reused buffer, so not even the page cache's
copy of the file counts against the process (a memory map's pages do, once touched). The result
equals :meth:`Perceiver.forward` up to rounding (tests/test_stream.py). With
``num_cross_layers > 1`` the input is streamed once per cross block, so ``chunks`` must then be
an array (memory-mapped or not) or a callable returning a fresh iterable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from . import engine
from .backends import engine_ops
from .layers import Params
from .shapes import as_mask, as_real_input, expect_shape

if TYPE_CHECKING:
    from .model import Perceiver

#: Positions per stream chunk by default: at B = 1 the engine's chunk (engine.CHUNK_ROWS rows),
#: and a reused read buffer of 16384 x C values.
STREAM_CHUNK_POSITIONS = 16384

#: What the streaming encoder reads: an array [B, N, C] (cut along N), an iterable of chunks
#: [B, n_i, C], or a callable returning a fresh such iterable.
StreamSource = np.ndarray | Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


class NpyChunks:
    """A ``.npy`` file of shape [B, N, C] (or [B, N] for masks) as a re-iterable of chunks
    [B, n, C] along N, read with ``readinto`` into one buffer that every chunk reuses: a
    chunk is valid until the next one is read (the streaming encoder uses each once). No
    pickle: object arrays are refused, like ``np.load(allow_pickle=False)``."""

    def __init__(self, path: str, chunk_size: int = STREAM_CHUNK_POSITIONS) -> None:
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
    chunks: Iterable[np.ndarray], masks: Iterator[np.ndarray] | None, b: int, model: Perceiver, p: Params
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(x_c [B, n, C] of the model's dtype, mask_c [B, n] bool or None) per chunk, checked as
    ``model(x, mask)`` checks a whole input."""
    cfg = model.config
    for x in chunks:
        x = as_real_input("chunk", x, cfg.np_dtype, scan=False)  # NaN and infinity: the range check's pass
        expect_shape("chunk", x, (b, None, cfg.input_dim), "[B, n, C]")
        engine.check_input_range("chunk", cfg, p, x)
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


def encode_stream(
    model: Perceiver,
    chunks: StreamSource,
    mask_chunks: StreamSource | None = None,
    *,
    chunk_size: int = STREAM_CHUNK_POSITIONS,
) -> np.ndarray:
    """Inference over a streamed input: the output of ``model(x, mask)`` for the concatenation
    ``x`` of ``chunks`` (and ``mask`` of ``mask_chunks``, bool [B, n_i], True = keep): the
    inference engine (:func:`perceiver_np.engine.encode`) over the chunks, then the model's head."""
    cfg = model.config
    if cfg.masked_rows != "zero":
        raise ValueError("masked_rows: the streaming encoder zeroes rows with no visible key; "
                         f"got {cfg.masked_rows!r}")
    if cfg.decoder == "query" and cfg.query_source == "given":
        raise ValueError("decoder: the streaming encoder makes its own queries; query_source "
                         "'given' needs model.forward")
    if cfg.input_fourier != "none":
        raise ValueError(f"input_fourier: the streaming encoder reads the input as given; a model that "
                         f"appends input positions ({cfg.input_fourier!r}) needs model(x)")
    chunk_size = check_chunk_size(chunk_size)
    p = model.checked_params(for_engine=True)
    passes = _passes(chunks, chunk_size)
    mask_passes = None if mask_chunks is None else _passes(mask_chunks, chunk_size, "mask_chunks", "[B, N]")
    first_pass = passes()
    first = next(iter(first_pass), None)
    if first is None:
        raise ValueError("chunks: the input is empty (N = 0)")
    batch = np.asarray(first).shape[0]
    pending = [_chain(first, first_pass)]  # the first pass, already started

    def validated_pass() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        source = pending.pop() if pending else passes()
        masks = None if mask_passes is None else iter(mask_passes())
        return _validated(source, masks, batch, model, p)

    with np.errstate(over="ignore", invalid="ignore"), model.naming_bad_params():  # named by the engine
        z = engine.encode(cfg, p, validated_pass, batch=batch, ops=engine_ops(cfg.backend),
                          alloc=model.workspace())
        return model.decode(z)[0]  # the head reads the latents only: the model's own


def _chain(first: np.ndarray, rest: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest
