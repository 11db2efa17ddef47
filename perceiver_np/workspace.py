"""Buffers the inference engine owns and reuses from call to call: no call faults its memory in again.

::

    ws = Workspace()                         # what a model keeps, one per calling thread
    a = ws("cross.kv.out0", (B, H, n, dh), np.float32)   # made on the first call ...
    b = ws("cross.kv.out0", (B, H, n, dh), np.float32)   # ... the same memory on the next: a is b
    at = ws.scope("cross.kv")                # the same workspace, names under "cross.kv."
    fresh("anything", shape, dtype)          # the allocator that keeps nothing (np.empty)

Why: a forward allocates and frees tens to hundreds of MiB of intermediates (``nbytes`` of a
workspace says how much for a shape): the input side's chunk-sized keys and values, the FFN's
[B*M, 4D] hidden layer, ... With glibc's defaults every such block is a fresh ``mmap``, faulted
in page by page and zeroed by the kernel on each call (docs/fast.md; ``make bench`` pairs us
with a worker that keeps freed memory, to measure what is left of that cost). A process-wide
``mallopt`` hides that for every library in the process; a workspace removes it for ours only:
each intermediate of the engine is taken from a buffer the model owns.

The rules that make reuse safe:

- **One buffer per name.** A name's buffer is flat; a request is served from its start
  (``flat[:size].reshape(shape)``, C-contiguous), so a smaller request (the last, shorter chunk
  of an input, a smaller batch) reuses it too. A larger request or another dtype replaces it:
  a workspace holds one buffer per name, of the largest size asked for since the last
  :meth:`Workspace.clear`, which hands everything back.
- **A name's buffer is reused only when its previous contents are dead.** The engine names each
  intermediate by the step that makes it (``"self.ffn.hidden"``), and each step's output is
  consumed before the same step runs again (the next block, the next chunk). Buffers are
  uninitialised, as ``np.empty``'s.
- **Nothing the caller keeps lives in a workspace**: ``model(x)`` returns fresh arrays.
- **One workspace per thread**: a model called from several threads at once gives each thread
  its own (:class:`ThreadWorkspaces`), so concurrent calls never share a buffer.
"""

from __future__ import annotations

import threading

import numpy as np

from .shapes import Alloc

__all__ = ["Alloc", "ThreadWorkspaces", "Workspace", "fresh", "scoped"]


def fresh(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """The allocator that keeps nothing: ``np.empty(shape, dtype)`` (the name is unused)."""
    return np.empty(shape, dtype=dtype)


class Workspace:
    """Named flat buffers, one per name, each request served from the start of its name's."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}  # name -> flat [capacity] buffer
        self.made = 0  # buffers allocated over the workspace's life (a reused one is not counted)

    def __call__(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dt or buf.size < size:
            buf = np.empty(size, dtype=dt)
            self._buffers[name] = buf
            self.made += 1
        return buf[:size].reshape(shape)

    def scope(self, prefix: str) -> Alloc:
        """This workspace with every name under ``prefix + "."``."""
        def alloc(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
            return self(f"{prefix}.{name}", shape, dtype)
        return alloc

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.nbytes for b in self._buffers.values())

    def names(self) -> list[str]:
        """The names held, in the order they were first made."""
        return list(self._buffers)

    def clear(self) -> None:
        """Hand every buffer back (they are freed once nothing else refers to them)."""
        self._buffers.clear()


def scoped(alloc: Alloc, prefix: str) -> Alloc:
    """``alloc`` with every name under ``prefix + "."`` (:func:`fresh` stays itself)."""
    if alloc is fresh:
        return fresh
    if isinstance(alloc, Workspace):
        return alloc.scope(prefix)

    def inner(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        return alloc(f"{prefix}.{name}", shape, dtype)
    return inner


class ThreadWorkspaces:
    """One :class:`Workspace` per calling thread (a thread's is freed when the thread ends)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Workspace:
        """The calling thread's workspace, made on its first call."""
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = Workspace()
        return ws
