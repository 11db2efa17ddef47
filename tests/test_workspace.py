"""The inference engine's workspace and the training step's arena (perceiver_np.workspace):
buffers a model owns and reuses.

Reuse must never change a result: a model's second, third... call gives bitwise what a fresh
model gives, returns arrays that later calls do not overwrite, and allocates no new buffer for
an input of the same or a smaller shape; threads never share one. The same for training
steps: a step on the arena gives bitwise what the step's parts give without it, and what it
returns never lives in the arena.
"""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import engine, optim, train
from perceiver_np.tolerances import FAST_FLOAT64_RTOL
from perceiver_np.workspace import StepArena, ThreadWorkspaces, Workspace, fresh, scoped, step_alloc

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


# ---- the training step's arena ----------------------------------------------------------------


def test_a_step_arena_hands_out_its_buffers_in_call_order():
    arena = StepArena()
    assert step_alloc() is None
    with arena.step():
        assert step_alloc() is arena
        a, b = arena("x", (4, 6), np.float32), arena("x", (4, 6), np.float32)
        assert not np.shares_memory(a, b)  # one buffer per request of a step
        c = arena("x", (4, 6), np.float64)  # the requests of each name and dtype in order
    assert step_alloc() is None and arena.made == 3
    with arena.step():
        c2 = arena("x", (3,), np.float64)  # float64 "x" #0: the start of c
        a2 = arena("x", (2, 3), np.float32)  # smaller: the start of float32 "x" #0
        b2 = arena("x", (5, 6), np.float32)  # larger: float32 "x" #1 replaced
    assert np.shares_memory(a, a2) and np.shares_memory(c, c2) and not np.shares_memory(b, b2)
    assert arena.made == 4
    assert arena.owns(a2) and arena.owns(b2[1:]) and arena.owns(c2) and not arena.owns(b)
    assert not arena.owns(a2.copy())
    assert arena.nbytes == 4 * 6 * 4 + 5 * 6 * 4 + 4 * 6 * 8
    with arena.step():
        outer = arena("x", (4,), np.float64)
        with arena.step():  # a step inside a step of the same arena allocates afresh
            assert step_alloc() is None
        assert step_alloc() is arena
        with pytest.raises(RuntimeError, match="a step is running"):
            arena.clear()
    assert outer.dtype == np.float64
    arena.clear()
    assert arena.nbytes == 0 and not arena.owns(a2)


def _steps_by_hand(model, batches, loss, opt, seed):
    """train_step's parts without the arena: loss_and_grads, global_norm, the update."""
    state, rng, out = train.init_state(model, opt), np.random.default_rng(seed), []
    for batch in batches:
        value, _, grads = train.loss_and_grads(model, state.params, batch, loss, rng)
        norm = optim.global_norm(grads)
        params, slots = opt.update(state.params, grads, state.opt_state)
        state = train.TrainState(params, slots, state.step + 1)
        out.append((value, norm, state))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_steps_on_the_arena_give_what_their_parts_give_without_it(rng, dtype):
    """Steps of batch sizes 6, 2, 6 (the arena's buffers serve smaller requests, then the
    same shape again): every loss, gradient norm, parameter and slot bitwise what the step's
    parts give with every kernel output newly allocated; the arena makes no new buffer for a
    repeated shape, and nothing returned lives in it. The model is large enough that every
    product runs tiled (not under gemm.SMALL_PRODUCT)."""
    model = pnp.build(input_dim=24, latent_dim=64, num_latents=16, num_layers=2, num_heads=4,
                      dropout=0.1, dtype=dtype, output_dim=5, decoder="classification", seed=1)
    x = rng.normal(size=(6, 300, 24)).astype(dtype)
    y = rng.integers(0, 5, size=6)
    batches = [{"x": x, "y": y}, {"x": x[:2], "y": y[:2]}, {"x": x, "y": y}]
    loss, opt = train.Loss("cross_entropy"), optim.adamw(1e-3)
    want = _steps_by_hand(model, batches, loss, opt, seed=7)
    state, step_rng = train.init_state(model, opt), np.random.default_rng(7)
    arena = model.step_arena()
    made = []
    for batch, (value, norm, ref) in zip(batches, want, strict=True):
        got, metrics, state = train.train_step(model, batch, loss, opt, state, step_rng)
        made.append(arena.made)
        assert got == value and metrics["grad_norm"] == norm
        for k in ref.params:
            assert np.array_equal(state.params[k], ref.params[k]), k
            assert not arena.owns(state.params[k]), k
        for k in ref.opt_state:
            assert np.array_equal(state.opt_state[k], ref.opt_state[k]), k
            assert not arena.owns(state.opt_state[k]), k
    assert made[0] > 20 and made[2] == made[1], made
    assert arena.nbytes > x.nbytes


def test_an_optimizer_that_returns_a_gradient_gets_a_copy_out_of_the_arena(rng):
    """A hand-built optimizer whose new parameters are the gradients themselves: what the
    step returns is a copy, which the next step does not overwrite."""
    model = pnp.build(input_dim=24, latent_dim=64, num_latents=16, num_layers=1, num_heads=4,
                      dtype="float32", output_dim=5, decoder="classification")
    opt = optim.Optimizer(lambda params: {}, lambda params, grads, slots: (dict(grads), {}))
    batch = {"x": rng.normal(size=(4, 300, 24)).astype(np.float32), "y": np.arange(4)}
    loss, step_rng = train.Loss("cross_entropy"), np.random.default_rng(0)
    _, _, state = train.train_step(model, batch, loss, opt, train.init_state(model, opt), step_rng)
    first = {k: v.copy() for k, v in state.params.items()}
    assert not any(model.step_arena().owns(v) for v in state.params.values())
    train.train_step(model, batch, loss, opt, state, step_rng)
    assert all(np.array_equal(state.params[k], first[k]) for k in first)


def test_the_second_step_takes_the_kernels_outputs_from_the_arena():
    """What a step allocates (tracemalloc counts NumPy's buffers): the second step's peak is
    below half the first's; the arena holds the kernels' activations, caches and gradients."""
    model = pnp.build(input_dim=32, latent_dim=64, num_latents=32, num_layers=2, dtype="float32",
                      dropout=0.0)
    batch = {"x": np.random.default_rng(0).normal(size=(8, 2048, 32)).astype(np.float32),
             "y": np.arange(8) % 4}
    opt, loss = optim.adamw(1e-4), train.Loss("cross_entropy")
    state, step_rng, peaks = train.init_state(model, opt), np.random.default_rng(0), []
    for _ in range(2):
        tracemalloc.start()
        try:
            _, _, state = train.train_step(model, batch, loss, opt, state, step_rng)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert model.step_arena().nbytes > 16 * 2**20
    assert peaks[1] < peaks[0] / 2, [f"{p / 2**20:.1f} MiB" for p in peaks]
