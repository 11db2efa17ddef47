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

The training step's kernels take theirs from a :class:`StepArena` instead::

    arena = StepArena()
    with arena.step():                       # the kernels of the layers' fast ops ...
        pred, cache = model.forward(x, training=True)   # ... take their outputs from it
        grads, _ = model.backward(dpred, cache)
    # nothing allocated in the step may be kept past it: the next step writes the same memory

Its rule is the call order: the i-th buffer of a name and dtype asked for in a step is the
i-th of that name and dtype in every step, so no two buffers of one step share memory (each is
handed out once per step), and a
step's buffers are all dead when the next step starts (``train.train_step`` keeps nothing of
them: the optimizer's new parameters and state are new arrays, checked by :meth:`StepArena.owns`).
A step of another shape or call order is still correct: a buffer too small or of another dtype
is replaced.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import numpy as np

from .shapes import Alloc

__all__ = ["Alloc", "StepArena", "ThreadWorkspaces", "Workspace", "fresh", "scoped", "step_alloc"]


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


#: The arena of the step running in this thread (or context), if any: what :func:`step_alloc` returns.
_STEP: contextvars.ContextVar[StepArena | None] = contextvars.ContextVar("perceiver_np_step_arena",
                                                                         default=None)


def step_alloc() -> Alloc | None:
    """The allocator of the :meth:`StepArena.step` running in this thread, else ``None`` (the
    kernels then allocate afresh): what the layers' fast ops (:mod:`perceiver_np.backends`)
    hand their kernels."""
    return _STEP.get()


class StepArena:
    """A training step's buffers, handed out in call order and again in the same order on the
    next step (the rules: this module's docstring)."""

    def __init__(self) -> None:
        # (name, dtype) -> its buffers, flat [capacity]: the i-th request of that name and
        # dtype in a step gets the i-th (a kernel skipped for one shape, a small product that
        # allocates nothing, shifts only its own name's order)
        self._buffers: dict[tuple[str, str], list[np.ndarray]] = {}
        self._next: dict[tuple[str, str], int] = {}  # the index the name's next request gets
        self._ids: set[int] = set()  # id() of every buffer, for owns()
        self._running = False
        self.made = 0  # buffers allocated over the arena's life (a reused one is not counted)

    def __call__(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        key = (name, dt.str)
        i = self._next.get(key, 0)
        self._next[key] = i + 1
        bufs = self._buffers.setdefault(key, [])
        if i == len(bufs) or bufs[i].size < size:
            buf = np.empty(size, dtype=dt)
            if i == len(bufs):
                bufs.append(buf)
            else:
                self._ids.discard(id(bufs[i]))
                bufs[i] = buf
            self._ids.add(id(buf))
            self.made += 1
        return bufs[i][:size].reshape(shape)

    @contextlib.contextmanager
    def step(self) -> Iterator[StepArena]:
        """Run one step with the arena as :func:`step_alloc`, from its first buffer. A step
        started inside a running step of the same arena allocates afresh instead (it would
        hand out the outer step's live buffers)."""
        nested = self._running
        token = _STEP.set(None if nested else self)
        if not nested:
            self._next, self._running = {}, True
        try:
            yield self
        finally:
            _STEP.reset(token)
            if not nested:
                self._running = False

    def owns(self, a: np.ndarray) -> bool:
        """Whether ``a`` is (a view of) one of the arena's buffers."""
        base: object = a
        while isinstance(base, np.ndarray):
            if id(base) in self._ids:
                return True
            base = base.base
        return False

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.nbytes for bufs in self._buffers.values() for b in bufs)

    def clear(self) -> None:
        """Hand every buffer back (they are freed once nothing else refers to them)."""
        if self._running:
            raise RuntimeError("StepArena.clear: a step is running; its buffers are live")
        self._buffers.clear()
        self._ids.clear()


class ThreadArenas:
    """One :class:`StepArena` per calling thread (a thread's is freed when the thread ends)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> StepArena:
        """The calling thread's arena, made on its first call."""
        arena = getattr(self._local, "arena", None)
        if arena is None:
            arena = self._local.arena = StepArena()
        return arena
