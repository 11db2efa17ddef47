"""The inference engine's workspace (perceiver_np.workspace): buffers a model owns and reuses.

Reuse must never change a result: a model's second, third... call gives bitwise what a fresh
model gives, returns arrays that later calls do not overwrite, and allocates no new buffer for
an input of the same or a smaller shape; threads never share one.
"""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import engine
from perceiver_np.tolerances import FAST_FLOAT64_RTOL
from perceiver_np.workspace import ThreadWorkspaces, Workspace, fresh, scoped

from .helpers import random_model


def test_a_name_is_served_from_one_buffer():
    ws = Workspace()
    a = ws("k", (4, 6), np.float32)
    assert a.shape == (4, 6) and a.dtype == np.float32 and a.flags.c_contiguous
    b = ws("k", (4, 6), np.float32)
    assert np.shares_memory(a, b) and ws.made == 1
    c = ws("k", (2, 3), np.float32)  # smaller: the start of the same buffer
    assert c.shape == (2, 3) and np.shares_memory(a, c) and ws.made == 1
    d = ws("k", (5, 6), np.float32)  # larger: replaced
    assert not np.shares_memory(a, d) and ws.made == 2
    e = ws("k", (5, 6), np.float64)  # another dtype: replaced
    assert e.dtype == np.float64 and ws.made == 3
    assert not np.shares_memory(ws("v", (5, 6), np.float64), e)  # names never share
    assert ws.nbytes == 2 * 30 * 8 and ws.names() == ["k", "v"]
    ws.clear()
    assert ws.nbytes == 0 and ws.names() == []


def test_scopes_prefix_names():
    ws = Workspace()
    scoped(ws, "cross")("kv.out0", (2,), np.float64)
    scoped(scoped(ws, "self"), "qkv")("out0", (2,), np.float64)
    assert ws.names() == ["cross.kv.out0", "self.qkv.out0"]
    assert scoped(fresh, "cross") is fresh
    assert fresh("x", (3, 2), np.float32).shape == (3, 2)


@pytest.mark.parametrize("chunk_rows", [5, 16384], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("case", [{}, {"ffn_kind": "geglu", "qkv_bias": False},
                                  {"use_query_residual": False, "num_cross_layers": 2, "num_layers": 2}],
                         ids=["seed-small", "geglu-no-qkv-bias", "two-cross-no-query-residual"])
def test_reuse_gives_what_a_fresh_model_gives(rng, monkeypatch, case, chunk_rows):
    """Calls of several shapes in a row (the input side's buffers shrink, grow, shrink again):
    each result bitwise equals a fresh model's and the reference forward's within
    FAST_FLOAT64_RTOL, and no later call changes an earlier result."""
    monkeypatch.setattr(engine, "CHUNK_ROWS", chunk_rows)
    model = random_model(rng, **case)
    c = model.config.input_dim
    kept = []
    for b, n in [(3, 23), (3, 11), (2, 40), (3, 23)]:
        x = rng.normal(size=(b, n, c))
        mask = rng.random((b, n)) < 0.7
        y = model(x, mask)
        kept.append((y, y.copy()))
        fresh_model = pnp.Perceiver(model.config, dict(model.params))
        assert np.array_equal(y, fresh_model(x, mask))
        want = model.forward(x, mask)[0]
        assert np.abs(y - want).max() <= FAST_FLOAT64_RTOL * np.abs(want).max()
    for y, copy in kept:
        assert np.array_equal(y, copy)


def test_same_or_smaller_input_allocates_no_new_buffer(rng, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ROWS", 8)  # B = 2: 4 positions per chunk, the last shorter
    model = random_model(rng)
    x = rng.normal(size=(2, 30, model.config.input_dim))
    model(x)
    ws = model.workspace()
    made, held = ws.made, ws.nbytes
    assert made > 0 and held > 0
    model(x)
    model(x[:, :13])
    model(x[:1])
    assert ws.made == made and ws.nbytes == held


def test_the_second_call_takes_its_intermediates_from_the_workspace():
    """What the call itself allocates (traced by tracemalloc, which counts NumPy's buffers):
    the first call makes the workspace, the second reuses it and allocates less than a
    tenth of what the workspace holds."""
    model = pnp.build(input_dim=32, dtype="float32", num_latents=32, latent_dim=64, num_layers=2)
    x = np.random.default_rng(0).normal(size=(8, 4096, 32)).astype(np.float32)
    model(x)
    held = model.workspace().nbytes
    tracemalloc.start()
    try:
        model(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held > 8 * 2**20  # the input side's keys, values and projection of a chunk
    assert peak < held / 10, (f"second call allocated {peak / 2**20:.1f} MiB; "
                              f"the workspace holds {held / 2**20:.1f}")


def test_threads_get_their_own_workspace(rng):
    model = random_model(rng)
    xs = [rng.normal(size=(3, 17 + 4 * i, model.config.input_dim)) for i in range(4)]
    want = [model.forward(x)[0] for x in xs]
    got: dict[int, list[np.ndarray]] = {}
    spaces: dict[int, Workspace] = {}

    def work(i: int) -> None:
        spaces[i] = model.workspace()
        got[i] = [model(xs[(i + j) % 4]) for j in range(8)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(ws) for ws in spaces.values()}) == 4
    for i in range(4):
        for j, y in enumerate(got[i]):
            w = want[(i + j) % 4]
            assert np.abs(y - w).max() <= FAST_FLOAT64_RTOL * np.abs(w).max()


def test_thread_workspaces_are_per_thread():
    tw = ThreadWorkspaces()
    mine = tw.get()
    assert tw.get() is mine
    other: list[Workspace] = []
    t = threading.Thread(target=lambda: other.append(tw.get()))
    t.start()
    t.join()
    assert other[0] is not mine
