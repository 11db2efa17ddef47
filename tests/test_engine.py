"""The inference engine (perceiver_np.engine, what ``model(x)`` runs) on both backends against
the reference forward, and its kernels (kernels/rows.py, kernels/gemm.py, the chunk merge)
against their plain NumPy twins (perceiver_np.backends, perceiver_np.attention).

float64: within FAST_FLOAT64_RTOL; float32: within the float32 bound of tolerances.py. Inputs
are cut into many chunks (CHUNK_ROWS made small) so the chunk merge is exercised, with masks
that hide a whole sample and whole chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import attention as plain_attention
from perceiver_np import engine
from perceiver_np.backends import NUMBA_ENGINE, PLAIN_ENGINE, engine_ops
from perceiver_np.kernels import attention_forward, gemm, merge_chunk, rows
from perceiver_np.layers import gelu_forward, layernorm_backward, layernorm_forward, params_under
from perceiver_np.stream import NpyChunks
from perceiver_np.tolerances import FAST_FLOAT64_RTOL, float32_forward_rtol

from .helpers import random_model

CASES = {
    "seed-small": {},
    "three-cross-shared": {"num_cross_layers": 3, "num_layers": 4, "num_blocks": 2},
    "raw-input-tanh-no-residual-no-final-norm": {
        "input_projection": False, "cross_heads": 1, "gelu": "tanh", "use_query_residual": False,
        "final_norm": False,
    },
    "channels-heads-widening": {"qk_channels": 6, "v_channels": 4, "cross_heads": 1,
                                "cross_widening_factor": 2, "self_widening_factor": 3},
    "classification": {"decoder": "classification", "output_dim": 3},
    "query-decoder": {"decoder": "query", "output_dim": 2, "num_outputs": 6},
    "latents": {"decoder": "latents"},
}


def relerr(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def ragged_mask(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """Random padding; sample 1 sees nothing; sample 0 sees only its last positions, so its
    first chunks are wholly masked."""
    mask = rng.random((b, n)) < 0.7
    mask[1] = False
    mask[0, : n - 3] = False
    return mask


@pytest.mark.parametrize("way", ["folded", "plain-way"])
@pytest.mark.parametrize("backend", ["auto", "numpy"])
@pytest.mark.parametrize("chunk_rows", [3, 16384], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_equals_the_reference_forward_float64(rng, monkeypatch, case, chunk_rows, backend, way):
    """Every case the folded way (engine.folds always true) and the plain way (never): the cross
    blocks with an input projection run folded (counted), the others the plain way. A read-only
    input is cut into chunks on both ways (the folded way takes a piece it reads in place whole),
    so the chunk merge runs on both."""
    monkeypatch.setattr(engine, "CHUNK_ROWS", chunk_rows)  # B = 3: one position per chunk, or all
    monkeypatch.setattr(engine, "FOLD_MAX_COST", np.inf if way == "folded" else 0.0)
    folded = []
    fold_queries = engine.fold_queries
    monkeypatch.setattr(engine, "fold_queries", lambda *a, **k: folded.append(1) or fold_queries(*a, **k))
    model = random_model(rng, **CASES[case], backend=backend)
    assert model.uses_engine
    x = rng.normal(size=(3, 23, model.config.input_dim))
    read_only = x.copy()
    read_only.flags.writeable = False
    for mask in (None, ragged_mask(rng, 3, 23)):
        want = model.forward(x, mask)[0]
        got = model(x, mask)
        assert relerr(got, want) <= FAST_FLOAT64_RTOL
        assert relerr(model(read_only, mask), want) <= FAST_FLOAT64_RTOL
        if mask is not None:
            assert np.array_equal(model(x * (1 + 3 * ~mask[..., None]), mask), got)  # padding ignored
    cfg = model.config
    assert bool(folded) == (way == "folded" and cfg.input_projection and cfg.num_cross_layers == 1)


def test_folds_when_it_saves_a_tenth_of_the_multiply_adds():
    """engine.folds counts both ways' multiply-adds per sample; the seed's cross block (M 64,
    H 4, Ckv 256, dh = dv = 64) costs the same both ways at N = 256 and folds from N = 512 on."""
    def plain(n, m, h, ckv, dh, dv):
        return n * ckv * h * (dh + dv) + n * h * m * (dh + dv)

    def folded(n, m, h, ckv, dh, dv):
        return m * h * ckv * (dh + dv) + n * 2 * h * m * ckv

    seed = (64, 4, 256, 64, 64)
    assert folded(256, *seed) == plain(256, *seed)
    for n in (1, 64, 256, 300, 512, 4096, 1 << 20):
        for shape in (seed, (3, 2, 8, 4, 4), (256, 8, 256, 32, 32), (64, 1, 1024, 256, 256)):
            assert engine.folds(n, *shape) == (folded(n, *shape) <= engine.FOLD_MAX_COST * plain(n, *shape))
    assert [engine.folds(n, *seed) for n in (256, 400, 512)] == [False, False, True]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_input_attention_equals_attention_over_its_projected_input(rng, dtype):
    """kernels.attention.input_attention_forward (each key tile made from the raw input in cache,
    the keys also the values) against its steps, h = LN(x @ W_in + b) then the plain attention
    of q to h, and against its plain twin: masks that hide a sample, a key tile and single keys,
    one split and three, tiles of 4 keys and of 256, inputs as they come (a strided chunk, a
    read-only one, one whose rows are not contiguous)."""
    tol = FAST_FLOAT64_RTOL if dtype == np.float64 else float32_forward_rtol(3, 80)
    b, n, c, d, nq = 3, 80, 7, 12, 10
    x = rng.normal(size=(b, 100, c)).astype(dtype)
    w_in = (rng.normal(size=(c, d)) / np.sqrt(c)).astype(dtype)
    gamma, beta, bias = (rng.normal(size=d).astype(dtype) for _ in range(3))
    q = rng.normal(size=(b, nq, d)).astype(dtype)
    mask = rng.random((b, n)) < 0.7
    mask[1] = False  # sample 1 sees nothing: its rows are 0
    mask[0, :8] = False  # sample 0's first two 4-key tiles are skipped
    read_only = x[:, 10:10 + n].copy()
    read_only.flags.writeable = False
    columns = np.asfortranarray(x[:, :n])
    for xs in (x[:, 10:10 + n], read_only, columns):
        for b_in in (bias, None):
            h = xs @ w_in + (0 if b_in is None else b_in)
            h = layernorm_forward(h, {"gamma": gamma, "beta": beta})[0][:, None]  # [B, 1, N, D]
            for m_ in (None, mask):
                want_o, want_lse = plain_attention.attention_forward(q[:, None], h, h, m_, 0.3)
                twin = PLAIN_ENGINE.input_attention(xs, w_in, (gamma, beta, b_in), q, m_, 0.3)
                assert relerr(twin[0], want_o) <= tol and relerr(twin[1], want_lse) <= tol
                for block_n, splits in ((4, 1), (4, 3), (256, None)):
                    o, lse = NUMBA_ENGINE.input_attention(xs, w_in, (gamma, beta, b_in), q, m_, 0.3,
                                                          block_n=block_n, n_splits=splits, finite=True)
                    assert o.shape == (b, 1, nq, d) and lse.shape == (b, 1, nq)
                    assert relerr(o, want_o) <= tol and relerr(lse, want_lse) <= tol
                    if m_ is not None:
                        assert np.all(o[1] == 0.0)


def test_input_attention_refuses_bad_arguments_and_a_nonfinite_projection(rng):
    from perceiver_np.kernels.attention import input_attention_forward
    from perceiver_np.shapes import OverflowRisk

    x, w_in, q = rng.normal(size=(2, 9, 4)), rng.normal(size=(4, 6)), rng.normal(size=(2, 5, 6))
    norm = (np.ones(6), np.zeros(6), None)
    with pytest.raises(ValueError, match=r"w_in: expected shape \(4, D\) to match x"):
        input_attention_forward(x, np.ones((3, 6)), norm, q)
    with pytest.raises(ValueError, match=r"q: expected shape \(2, Q, 6\) \[B, Q, D\], got \(2, 5, 4\)"):
        input_attention_forward(x, w_in, norm, q[:, :, :4])
    with pytest.raises(TypeError, match="q: expected dtype float64 like x, got float32"):
        input_attention_forward(x, w_in, norm, q.astype(np.float32))
    with pytest.raises(TypeError, match=r"mask: expected a bool array \(True = keep\), got int64"):
        input_attention_forward(x, w_in, norm, q, np.ones((2, 9), dtype=np.int64))
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 9\) \[B, N\], got \(2, 8\)"):
        input_attention_forward(x, w_in, norm, q, np.ones((2, 8), dtype=bool))
    with pytest.raises(ValueError, match=r"scale: expected a positive finite number, got -1\.0"):
        input_attention_forward(x, w_in, norm, q, None, -1.0)
    for bad_value in (np.nan, np.inf):
        bad = w_in.copy()
        bad[int(rng.integers(4)), int(rng.integers(6))] = bad_value
        with pytest.raises(OverflowRisk, match="product: a product's output holds NaN or infinity"):
            input_attention_forward(x, bad, norm, q, finite=True)
        input_attention_forward(x, bad, norm, q)  # unchecked: returns


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_head_products_equal_each_heads_product(rng, dtype):
    """gemm.head_products: each head's columns of a times its own weight, on the kernels and the
    plain twin, the weight as it is ([k, H*f]) and applied transposed ([f, H*k]); rows that
    leave a partial block; a NaN weight entry raises with ``finite`` and only then."""
    from perceiver_np.shapes import OverflowRisk

    tol = FAST_FLOAT64_RTOL if dtype == np.float64 else float32_forward_rtol(2, 40)
    heads, k, f = 3, 5, 7
    w = rng.normal(size=(k, heads * f)).astype(dtype)
    w_t = rng.normal(size=(f, heads * k)).astype(dtype)
    # 300 rows (31,500 multiply-adds): under SMALL_PRODUCT, on the calling thread; 3000 rows
    # (315,000): the kernel, with a partial row block
    assert 300 * heads * k * f < gemm.SMALL_PRODUCT <= 3000 * heads * k * f
    for a in (rng.normal(size=(r, heads * k)).astype(dtype) for r in (300, 3000)):
        want = np.concatenate([a[:, i * k:(i + 1) * k] @ w[:, i * f:(i + 1) * f] for i in range(heads)],
                              axis=1)
        want_t = np.concatenate([a[:, i * k:(i + 1) * k] @ w_t[:, i * k:(i + 1) * k].T for i in range(heads)],
                                axis=1)
        for ops in (NUMBA_ENGINE, PLAIN_ENGINE):
            assert relerr(ops.head_products(a, w, heads, finite=True), want) <= tol, ops.name
            assert relerr(ops.head_products(a, w_t, heads, transpose_w=True, finite=True), want_t) <= tol
            bad = w.copy()
            bad[2, f + 3] = np.nan  # head 1
            with pytest.raises(OverflowRisk, match="product: a product's output holds NaN or infinity"):
                ops.head_products(a, bad, heads, finite=True)
            assert np.isnan(ops.head_products(a, bad, heads)[:, f + 3]).all()
    with pytest.raises(ValueError, match=r"w: expected shape \(5, H\*f\) with H = 3, got \(5, 20\)"):
        gemm.head_products(a, np.ones((k, 20), dtype=dtype), heads)
    with pytest.raises(ValueError, match=r"w: expected shape \(f, 15\) \[f, H\*k\], got \(7, 14\)"):
        gemm.head_products(a, np.ones((f, 14), dtype=dtype), heads, transpose_w=True)
    with pytest.raises(ValueError, match=r"a: expected shape \(R, H\*k\) with H = 4, got \(300, 15\)"):
        gemm.head_products(np.ones((300, heads * k), dtype=dtype), w, 4)


def test_engine_float32_within_float32_rounding(rng):
    """The seed model in float32 on the kernels against the float64 reference forward."""
    m64 = pnp.build(input_dim=287, dtype="float64", backend="numpy")
    m32 = pnp.build(input_dim=287)
    x = rng.normal(size=(2, 3000, 287))
    mask = rng.random((2, 3000)) < 0.9
    self_steps = sum(1 for kind, _ in m64.config.schedule if kind == "self")
    depth = 1 + 12 * m64.config.num_cross_layers + 11 * self_steps + 2
    y64 = m64.forward(x, mask)[0]
    assert relerr(m32(x.astype(np.float32), mask), y64) <= float32_forward_rtol(depth, 3000)


def test_numpy_backend_runs_the_engine_on_plain_numpy_only(rng, monkeypatch):
    """backend="numpy": the engine's ops are the plain twins; no kernel is called."""
    model = random_model(rng, backend="numpy")
    x = rng.normal(size=(2, 7, 5))
    want = model.forward(x)[0]
    for name in ("matmul", "matmul_batched", "project_heads"):
        monkeypatch.setattr(gemm, name, lambda *a, **k: pytest.fail("a kernel ran on backend numpy"))
    assert engine_ops("numpy") is PLAIN_ENGINE and model.uses_engine
    assert relerr(model(x), want) <= FAST_FLOAT64_RTOL
    assert not random_model(rng, masked_rows="uniform").uses_engine  # (o, lse) attention zeroes rows


@pytest.mark.parametrize("ops", [PLAIN_ENGINE, NUMBA_ENGINE], ids=["numpy", "numba"])
def test_engine_blocks_refuse_latents_they_cannot_update_in_place(rng, ops):
    model = random_model(rng)
    z = np.broadcast_to(model.params["latents"], (2, *model.params["latents"].shape))
    with pytest.raises(ValueError, match="z: expected a writeable C-contiguous array"):
        engine.self_block(z, params_under(model.params, "self.0"), ops, num_heads=2, gelu="exact")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_engine_op_equals_its_plain_twin(rng, dtype):
    """Op by op, the kernels (NUMBA_ENGINE) against the plain twins (PLAIN_ENGINE), one signature."""
    tol = FAST_FLOAT64_RTOL if dtype == np.float64 else float32_forward_rtol(2, 40)
    x = rng.normal(size=(3, 300, 40)).astype(dtype)
    w = rng.normal(size=(40, 12)).astype(dtype)
    a = x.reshape(-1, 40)
    assert relerr(NUMBA_ENGINE.matmul(a, w), PLAIN_ENGINE.matmul(a, w)) <= tol
    view = x[:, 5:200]  # a strided chunk of a longer input
    assert relerr(NUMBA_ENGINE.matmul_batched(view, w), PLAIN_ENGINE.matmul_batched(view, w)) <= tol
    gamma, beta, bias = (rng.normal(size=40).astype(dtype) for _ in range(3))
    wk, wv = rng.normal(size=(40, 8)).astype(dtype), rng.normal(size=(40, 6)).astype(dtype)
    for got, want in zip(NUMBA_ENGINE.project_heads(x, [wk, wv], 2, norm=(gamma, beta, bias)),
                         PLAIN_ENGINE.project_heads(x, [wk, wv], 2, norm=(gamma, beta, bias)), strict=True):
        assert got.shape == want.shape and relerr(got, want) <= tol
    w_in = (rng.normal(size=(40, 40)) / np.sqrt(40)).astype(dtype)
    for norm in ((gamma, beta, bias), (gamma, beta, None)):
        pair = [ops.project_input(view, w_in, norm, [wk, wv], 2, finite=True)
                for ops in (NUMBA_ENGINE, PLAIN_ENGINE)]
        for got, want in zip(*pair, strict=True):
            assert got.shape == want.shape and relerr(got, want) <= tol
    for arr in (x, view, -x[:1, :3]):
        assert NUMBA_ENGINE.max_abs(arr) == PLAIN_ENGINE.max_abs(arr)  # exact: a max rounds nothing
    want = PLAIN_ENGINE.layernorm(a, gamma, beta, bias)
    assert relerr(NUMBA_ENGINE.layernorm(a, gamma, beta, bias), want) <= tol
    t = rng.normal(size=a.shape).astype(dtype)
    h1, h2 = t.copy(), t.copy()
    assert relerr(NUMBA_ENGINE.bias_gelu(h1, bias, "tanh"), PLAIN_ENGINE.bias_gelu(h2, bias, "tanh")) <= tol
    # the products with their epilogues, tiled (900 rows) and on the small path (5 rows)
    w_up = (rng.normal(size=(40, 40)) / np.sqrt(40)).astype(dtype)
    for rows_ in (a, a[:5]):
        for gelu in (None, "exact", "tanh"):
            pair = [ops.matmul(rows_, w_up, bias=bias, gelu=gelu, finite=True)
                    for ops in (NUMBA_ENGINE, PLAIN_ENGINE)]
            assert relerr(*pair) <= tol
        for norm in (None, (gamma, beta)):
            z1, z2 = t[:len(rows_)].copy(), t[:len(rows_)].copy()
            got = NUMBA_ENGINE.matmul_residual(rows_, w_up, z1, bias, norm=norm, finite=True)
            want = PLAIN_ENGINE.matmul_residual(rows_, w_up, z2, bias, norm=norm, finite=True)
            assert relerr(z1, z2) <= tol and relerr(got, want) <= tol
            assert (got is z1) == (norm is None)


# ---- the row kernels ------------------------------------------------------------------------


# 24, 29 and 300: rows padded with zeros to the pairwise sums' power of two (32, 32, 512)
@pytest.mark.parametrize("f", [24, 29, 300], ids=["width-24", "width-29", "width-300"])
@pytest.mark.parametrize("r", [37, 2000], ids=["one-thread", "parallel"])  # PARALLEL_MIN_ELEMENTS
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_row_kernels_equal_the_plain_layers(rng, dtype, r, f):
    tol = FAST_FLOAT64_RTOL if dtype == np.float64 else 8 * np.finfo(np.float32).eps
    x = (3 + rng.normal(size=(r, f))).astype(dtype)
    t = rng.normal(size=(r, f)).astype(dtype)
    bias, gamma, beta = (rng.normal(size=f).astype(dtype) for _ in range(3))
    ln = {"gamma": gamma, "beta": beta}
    want = layernorm_forward(x + bias, ln)[0]
    assert relerr(rows.layernorm(x, gamma, beta, bias=bias), want) <= tol
    assert relerr(rows.layernorm(x, gamma, beta), layernorm_forward(x, ln)[0]) <= tol
    inplace = x.copy()
    rows.layernorm(inplace, gamma, beta, bias=bias, out=inplace)
    assert relerr(inplace, want) <= tol
    z = x.copy()
    u = rows.residual_layernorm(z, t, bias, gamma, beta)
    assert relerr(z, x + t + bias) <= tol
    assert relerr(u, layernorm_forward(x + t + bias, ln)[0]) <= tol
    z_into, t_into = x.copy(), t.copy()  # the LayerNorm written over t, row by row once it is read
    assert rows.residual_layernorm(z_into, t_into, bias, gamma, beta, out=t_into) is t_into
    assert np.array_equal(z_into, z) and np.array_equal(t_into, u)
    z = x.copy()
    assert relerr(rows.residual(z, t, bias), x + t + bias) <= tol
    for kind in ("exact", "tanh"):
        h = t.copy()
        rows.bias_gelu(h, bias, kind)
        assert relerr(h, gelu_forward(t + bias, approximate=kind)[0]) <= tol
    # the training LayerNorm: forward with its cache, backward with a random upstream gradient
    y, xhat, rstd = rows.layernorm_train(x, gamma, beta)
    want_y, cache = layernorm_forward(x, ln)
    assert relerr(y, want_y) <= tol and relerr(xhat, cache.xhat) <= tol and relerr(rstd, cache.rstd) <= tol
    dy = rng.normal(size=(r, f)).astype(dtype)
    dx, dgamma, dbeta = rows.layernorm_backward(dy, xhat, rstd, gamma)
    want_dx, want_g = layernorm_backward(dy, cache)
    sum_tol = tol if dtype == np.float64 else float32_forward_rtol(2, r)  # sums over the r rows
    assert relerr(dx, want_dx) <= tol
    assert relerr(dgamma, want_g["gamma"]) <= sum_tol and relerr(dbeta, want_g["beta"]) <= sum_tol


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 4, 700, 16)], ids=["one-thread", "parallel"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merge_heads_equals_the_plain_twin(rng, dtype, shape):
    """The heads side by side plus the value bias, on every row or only the samples that saw a
    key: the kernel gives the plain twin's result exactly (one addition per entry)."""
    o = rng.normal(size=shape).astype(dtype)
    b, h, m, dv = shape
    bias = rng.normal(size=h * dv).astype(dtype)
    visible = np.arange(b) % 2 == 0
    for args in ((None, None), (bias, None), (bias, visible)):
        got = NUMBA_ENGINE.merge_heads(o, *args)
        want = PLAIN_ENGINE.merge_heads(o, *args)
        assert got.shape == (b * m, h * dv) and np.array_equal(got, want)
    plain = o.transpose(0, 2, 1, 3).reshape(b * m, h * dv)
    got = NUMBA_ENGINE.merge_heads(o, bias, visible).reshape(b, m, h * dv)
    assert np.array_equal(got[1], plain.reshape(b, m, -1)[1])  # an invisible sample: no bias
    assert np.array_equal(got[0], plain.reshape(b, m, -1)[0] + bias)
    with pytest.raises(ValueError, match=r"visible: expected shape \(2,\), got \(3,\)"):
        rows.merge_heads(o[:2], bias, np.ones(3, bool))


def test_row_kernels_name_bad_arguments(rng):
    x = rng.normal(size=(4, 3))
    g = np.ones(3)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(3,\), got \(4,\)"):
        rows.layernorm(x, np.ones(4), g)
    with pytest.raises(TypeError, match="beta: expected dtype float64, got float32"):
        rows.layernorm(x, g, g.astype(np.float32))
    strided = x[:, ::2]  # an input is copied into the layout the kernels take; a result equal
    assert np.array_equal(rows.layernorm(strided, g[:2], g[:2]), rows.layernorm(strided.copy(), g[:2], g[:2]))
    with pytest.raises(ValueError, match=r"z: expected a writeable C-contiguous array \(updated in place\)"):
        rows.residual(x[:, ::2], x[:, :2].copy(), g[:2])  # an array updated in place is never copied
    with pytest.raises(ValueError, match=r"t: expected shape \(4, 3\), got \(2, 3\)"):
        rows.residual(x.copy(), x[:2].copy(), g)
    with pytest.raises(ValueError, match="approximate: expected 'exact' or 'tanh'"):
        rows.bias_gelu(x.copy(), g, "erf")


# ---- the products ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_products_equal_numpy(rng, dtype):
    tol = FAST_FLOAT64_RTOL if dtype == np.float64 else float32_forward_rtol(1, 40)
    x = rng.normal(size=(3, 300, 40)).astype(dtype)
    w = rng.normal(size=(40, 12)).astype(dtype)
    assert relerr(gemm.matmul(x.reshape(-1, 40), w), x.reshape(-1, 40) @ w) <= tol
    view = x[:, 7:251]  # a strided chunk of a longer input
    assert relerr(gemm.matmul_batched(view, w), view @ w) <= tol
    dy = rng.normal(size=(900, 12)).astype(dtype)
    a = x.reshape(-1, 40)
    sum_tol = tol if dtype == np.float64 else float32_forward_rtol(1, 900)  # a sum over 900 rows
    assert relerr(gemm.matmul_tn(a, dy), a.T @ dy) <= sum_tol
    small = x[:1, :5]  # below SMALL_PRODUCT: NumPy on the calling thread, same results
    assert relerr(gemm.matmul(small[0], w), small[0] @ w) <= tol
    assert relerr(gemm.matmul_tn(small[0], small[0] @ w), small[0].T @ (small[0] @ w)) <= tol
    # the bias added to each tile in cache: the same float additions as adding it afterwards
    bias = rng.normal(size=12).astype(dtype)
    for rows_ in (a, small[0]):
        assert np.array_equal(gemm.matmul(rows_, w, bias=bias), gemm.matmul(rows_, w) + bias)
    # the tile epilogues: GELU after the bias; a residual, then a LayerNorm of each updated row
    w_sq = (rng.normal(size=(40, 40)) / np.sqrt(40)).astype(dtype)
    bias40, gamma40, beta40 = (rng.normal(size=40).astype(dtype) for _ in range(3))
    for rows_ in (a, small[0]):
        t = gemm.matmul(rows_, w_sq, bias=bias40)
        for kind in ("exact", "tanh"):
            want = gelu_forward(t, approximate=kind)[0]
            assert relerr(gemm.matmul(rows_, w_sq, bias=bias40, gelu=kind), want) <= tol
        z0 = rng.normal(size=t.shape).astype(dtype)
        z = z0.copy()
        assert gemm.matmul_residual(rows_, w_sq, z, bias40) is z
        assert relerr(z, z0 + t) <= tol
        z = z0.copy()
        u = gemm.matmul_residual(rows_, w_sq, z, bias40, norm=(gamma40, beta40))
        assert relerr(z, z0 + t) <= tol
        assert relerr(u, layernorm_forward(z, {"gamma": gamma40, "beta": beta40})[0]) <= tol
    # a linear layer's weight and bias gradients, on the parallel and the small path
    for rows_, up in ((a, dy), (small[0], small[0] @ w)):
        g, db = gemm.matmul_tn_sums(rows_, up)
        assert np.array_equal(g, gemm.matmul_tn(rows_, up))
        assert db.shape == (12,) and relerr(db, up.sum(axis=0)) <= sum_tol
    wk, wv, wq = (rng.normal(size=(40, 3 * d)).astype(dtype) for d in (4, 5, 4))
    k, v, q = gemm.project_heads(x, [wk, wv, wq], 3)
    for got, wj, d in ((k, wk, 4), (v, wv, 5), (q, wq, 4)):
        want = (x @ wj).reshape(3, 300, 3, d).transpose(0, 2, 1, 3)  # [B, S, H*d] -> [B, H, S, d]
        # the head-split view of a [B, S, H*d] buffer: a position's heads side by side in one row
        assert got.shape == want.shape and got.strides[2] == 3 * d * got.itemsize
        assert relerr(got, want) <= tol
    # with the LayerNorm fused in (and without its bias), on the parallel and the small path
    gamma, beta, bias = (rng.normal(size=40).astype(dtype) for _ in range(3))
    for xs in (x, x[:1, :5]):
        for b_in in (bias, None):
            u = layernorm_forward(xs + (0 if b_in is None else b_in), {"gamma": gamma, "beta": beta})[0]
            (got,) = gemm.project_heads(xs, [wk], 3, norm=(gamma, beta, b_in))
            want = (u @ wk).reshape(*xs.shape[:2], 3, 4).transpose(0, 2, 1, 3)
            assert relerr(got, want) <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_project_input_equals_its_steps(rng, dtype):
    """project_input (the input projection, its LayerNorm and the key/value products tile by
    tile, in cache) against its steps done one after the other, on inputs as they come: a
    strided chunk of a longer input, a read-only one, one whose rows are not contiguous (copied
    first), a sample count and a length that leave partial row blocks, one projection or two."""
    tol = FAST_FLOAT64_RTOL if dtype == np.float64 else float32_forward_rtol(2, 40)
    x = rng.normal(size=(3, 700, 29)).astype(dtype)
    w_in = (rng.normal(size=(29, 40)) / np.sqrt(29)).astype(dtype)
    gamma, beta, bias = (rng.normal(size=40).astype(dtype) for _ in range(3))
    wk, wv = rng.normal(size=(40, 3 * 4)).astype(dtype), rng.normal(size=(40, 3 * 5)).astype(dtype)
    read_only = x[:, :300].copy()
    read_only.flags.writeable = False
    columns = np.asfortranarray(x[:, :40])  # last stride is not the item size
    for xs in (x, x[:, 5:600], read_only, columns, x[:1, :1]):
        for b_in in (bias, None):
            h = xs @ w_in + (0 if b_in is None else b_in)
            u = layernorm_forward(h, {"gamma": gamma, "beta": beta})[0]
            for ws in ([wk, wv], [wv]):
                got = gemm.project_input(xs, w_in, (gamma, beta, b_in), ws, 3, finite=True)
                for g, wj in zip(got, ws, strict=True):
                    want = (u @ wj).reshape(*xs.shape[:2], 3, -1).transpose(0, 2, 1, 3)  # [B, H, S, d]
                    assert g.shape == want.shape and relerr(g, want) <= tol
                    assert g.base is not None and g.base.flags.c_contiguous  # a view of [B, S, H*d]
    # the attention kernel reads the views where they lie: bitwise what it computes from copies
    k, v = gemm.project_input(x, w_in, (gamma, beta, bias), [wk, wv], 3)
    q = rng.normal(size=(3, 3, 6, 4)).astype(dtype)
    got = attention_forward(q, k, v)
    want = attention_forward(q, np.ascontiguousarray(k), np.ascontiguousarray(v))
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_project_input_refuses_bad_arguments_and_nonfinite_products(rng):
    x = rng.normal(size=(2, 5, 4))
    w_in, norm = np.ones((4, 6)), (np.ones(6), np.zeros(6), None)
    with pytest.raises(ValueError, match=r"w_in: expected shape \(4, D\) to match x"):
        gemm.project_input(x, np.ones((3, 6)), norm, [np.ones((6, 2))], 2)
    with pytest.raises(ValueError, match=r"weights\[0\]: expected shape \(6, H\*d\) with H = 2"):
        gemm.project_input(x, w_in, norm, [np.ones((6, 3))], 2)
    with pytest.raises(TypeError, match="w_in: expected dtype float64, got float32"):
        gemm.project_input(x, w_in.astype(np.float32), norm, [np.ones((6, 2))], 2)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(6,\), got \(5,\)"):
        gemm.project_input(x, w_in, (np.ones(5), np.zeros(6), None), [np.ones((6, 2))], 2)
    with pytest.raises(ValueError, match="weights: expected 1 or 2 matrices, got 3"):
        gemm.project_input(x, w_in, norm, [np.ones((6, 2))] * 3, 2)
    from perceiver_np.shapes import OverflowRisk

    for bad_value in (np.nan, np.inf):
        for which in (0, 1):
            ws = [rng.normal(size=(6, 4)), rng.normal(size=(6, 4))]
            ws[which][int(rng.integers(6)), int(rng.integers(4))] = bad_value
            with pytest.raises(OverflowRisk, match="product: a product's output holds NaN or infinity"):
                gemm.project_input(x, w_in, norm, ws, 2, finite=True)
            gemm.project_input(x, w_in, norm, ws, 2)  # unchecked: returns


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_abs_is_numpys_in_one_pass(rng, dtype):
    """rows.max_abs: max |x| in one parallel pass (magnitudes compared as integers), equal to
    NumPy's max and min exactly, on every layout; NaN and infinity come out as such."""
    x = rng.normal(size=(3, 50_000, 3)).astype(dtype)  # several SCAN_BLOCKs and a partial one
    x[2, 41_234, 1] = -7.5  # the largest magnitude, negative
    read_only = x.copy()
    read_only.flags.writeable = False
    for arr in (x, x[:, 3:900], read_only, x[0, :1, :1], -x):
        assert rows.max_abs(arr) == float(max(np.max(arr), -np.min(arr)))
    assert rows.max_abs(x) == 7.5
    bad = x.copy()
    bad[1, 7, 2] = -np.inf
    assert rows.max_abs(bad) == np.inf
    bad[0, 3, 0] = np.nan
    assert np.isnan(rows.max_abs(bad)) and np.isnan(PLAIN_ENGINE.max_abs(bad))  # the twins agree
    with pytest.raises(TypeError, match="x: expected a float32 or float64 array, got int64"):
        rows.max_abs(np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="x: expected at least one entry"):
        rows.max_abs(np.ones((0, 3), dtype=dtype))


def test_tiles_split_few_rows_by_columns_and_many_by_rows():
    # one sample's latents against a wide weight: columns, so the weight is packed once
    assert gemm.tiles(256, 1280, 2) == (256, 640)
    # a batch of rows: rows, so each row is packed once
    assert gemm.tiles(2048, 256, 2) == (1024, 256)
    for rows_, cols, threads in ((256, 1280, 16), (70, 300, 2), (5000, 100, 3), (64, 64, 8), (1, 1024, 4)):
        row_block, col_block = gemm.tiles(rows_, cols, threads)
        assert row_block >= min(rows_, gemm.MIN_BLOCK_ROWS) and col_block % gemm.COL_ALIGN == 0
        items = -(-rows_ // row_block) * -(-cols // col_block)
        assert items <= threads  # one tile per thread at most (without a row cap)
    assert gemm.tiles(2048, 256, 2, max_row_block=256) == (256, 256)  # capped: more tiles than threads


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_column_and_2d_tiles_and_a_transposed_weight_equal_numpy(rng, dtype, monkeypatch):
    """The tiled products on every split they take: by columns (few rows), by rows and columns
    (many threads), and a weight's transpose read in place; project_heads split by columns with
    its LayerNorm in a pass of its own. The tiles are cut for the thread count under test
    (gemm._threads, which is otherwise blas.FIXED_TILE_THREADS)."""
    import numba

    monkeypatch.setattr(gemm, "_threads", lambda: int(numba.get_num_threads()))
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2 for the column split (this machine has one thread)")
    tol = FAST_FLOAT64_RTOL if dtype == np.float64 else float32_forward_rtol(1, 33)
    a = rng.normal(size=(70, 33)).astype(dtype)
    w = rng.normal(size=(33, 300)).astype(dtype)
    before = numba.get_num_threads()
    try:
        for threads in sorted({2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            assert gemm.tiles(70, 300, threads)[1] < 300  # split by columns
            assert relerr(gemm.matmul(a, w), a @ w) <= tol
            wt = np.ascontiguousarray(w.T).T  # [33, 300], F-contiguous: the transpose of [300, 33]
            assert relerr(gemm.matmul(a, wt), a @ w) <= tol
            big = rng.normal(size=(300, 33)).astype(dtype)
            assert relerr(gemm.matmul(big, wt), big @ w) <= tol
            x = rng.normal(size=(1, 70, 33)).astype(dtype)
            ws = [rng.normal(size=(33, 3 * d)).astype(dtype) for d in (20, 20, 60)]
            gamma, beta, bias = (rng.normal(size=33).astype(dtype) for _ in range(3))
            for norm in (None, (gamma, beta, bias)):
                u = x if norm is None else layernorm_forward(x + bias, {"gamma": gamma, "beta": beta})[0]
                for got, wj in zip(gemm.project_heads(x, ws, 3, norm), ws, strict=True):
                    want = (u @ wj).reshape(1, 70, 3, -1).transpose(0, 2, 1, 3)
                    assert got.shape == want.shape and relerr(got, want) <= tol
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("ops", [NUMBA_ENGINE, PLAIN_ENGINE], ids=["numba", "numpy"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_checked_products_raise_on_a_nonfinite_weight_on_every_path(rng, ops, dtype, monkeypatch):
    """matmul and project_heads with finite=True raise OverflowRisk(gemm.PRODUCT) when one entry
    of a weight is NaN, +inf or -inf, on every path they take: the calling thread (small), tiles
    of rows, of columns, a transposed weight; the LayerNorm fused or in its own pass. Without
    finite=True the same products return (the check costs nothing when not asked for). The
    tiles are cut for 2 threads (gemm._threads), as in the last line's plans."""
    import numba

    from perceiver_np.shapes import OverflowRisk

    monkeypatch.setattr(gemm, "_threads", lambda: 2)
    two = numba.config.NUMBA_NUM_THREADS >= 2
    for rows_, k, cols in ((5, 8, 12), (70, 33, 300), (600, 33, 40)):  # small, columns, rows
        a = rng.normal(size=(rows_, k)).astype(dtype)
        w = rng.normal(size=(k, cols)).astype(dtype)
        x = a[None]  # [1, rows, k]
        gamma, beta = (rng.normal(size=k).astype(dtype) for _ in range(2))
        for j, bad_value in enumerate((np.nan, np.inf, -np.inf)):
            bad = w.copy()
            bad[int(rng.integers(k)), int(rng.integers(cols))] = bad_value
            bias = rng.normal(size=cols).astype(dtype)
            for weight in (bad, np.ascontiguousarray(bad.T).T):
                with pytest.raises(OverflowRisk, match="product: a product's output holds NaN or infinity"):
                    ops.matmul(a, weight, finite=True)
                ops.matmul(a, weight)  # unchecked: returns
                for gelu in (None, "exact"):  # the epilogues' results are checked too
                    with pytest.raises(OverflowRisk, match="product: a product's output holds NaN"):
                        ops.matmul(a, weight, bias=bias, gelu=gelu, finite=True)
                for norm in (None, (bias, bias)):
                    z = rng.normal(size=(rows_, cols)).astype(dtype)
                    with pytest.raises(OverflowRisk, match="product: a product's output holds NaN"):
                        ops.matmul_residual(a, weight, z, bias, norm=norm, finite=True)
            weights = [w, bad] if j % 2 else [bad]  # the bad one first or second
            for norm in (None, (gamma, beta, None)):
                with pytest.raises(OverflowRisk, match="product: a product's output holds NaN or infinity"):
                    ops.project_heads(x, weights, 2, norm, finite=True)
    if two and ops is NUMBA_ENGINE:
        assert gemm.tiles(70, 300, 2)[1] < 300 and gemm.tiles(600, 40, 2)[0] < 600  # both splits ran


def test_products_name_bad_arguments(rng):
    x = rng.normal(size=(2, 5, 4))
    with pytest.raises(ValueError, match=r"w: expected shape \(4, F\)"):
        gemm.matmul(x[0], np.ones((3, 2)))
    with pytest.raises(TypeError, match="w: expected dtype float64, got float32"):
        gemm.matmul_batched(x, np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"weights\[1\]: expected shape \(4, H\*d\) with H = 2"):
        gemm.project_heads(x, [np.ones((4, 2)), np.ones((4, 3))], 2)
    with pytest.raises(ValueError, match=r"bias: expected shape \(2,\), got \(3,\)"):
        gemm.matmul(x[0], np.ones((4, 2)), bias=np.ones(3))
    with pytest.raises(TypeError, match="bias: expected dtype float64, got float32"):
        gemm.matmul(x[0], np.ones((4, 2)), bias=np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"b: expected 5 rows like a, got shape \(4, 2\)"):
        gemm.matmul_tn_sums(x[0], np.ones((4, 2)))
    with pytest.raises(ValueError, match="gelu: expected None, 'exact' or 'tanh', got 'erf'"):
        gemm.matmul(x[0], np.ones((4, 2)), bias=np.ones(2), gelu="erf")
    with pytest.raises(ValueError, match=r"bias: expected the bias \[F\] added before the GELU"):
        gemm.matmul(x[0], np.ones((4, 2)), gelu="exact")
    with pytest.raises(ValueError, match=r"z: expected shape \(5, 2\) to match a \(5, 4\), got \(4, 2\)"):
        gemm.matmul_residual(x[0], np.ones((4, 2)), np.ones((4, 2)), np.ones(2))
    with pytest.raises(ValueError, match=r"z: expected a writeable C-contiguous array"):
        gemm.matmul_residual(x[0], np.ones((4, 2)), np.ones((5, 4))[:, ::2], np.ones(2))
    with pytest.raises(ValueError, match=r"gamma: expected shape \(2,\), got \(3,\)"):
        gemm.matmul_residual(x[0], np.ones((4, 2)), np.ones((5, 2)), np.ones(2),
                             norm=(np.ones(3), np.ones(2)))


# ---- the chunk merge ------------------------------------------------------------------------


def test_merged_chunks_equal_attention_over_the_whole_input(rng):
    b, h, m, n, d = 2, 3, 5, 40, 4
    q, k, v = (rng.normal(size=s) for s in ((b, h, m, d), (b, h, n, d), (b, h, n, d)))
    mask = rng.random((b, n)) < 0.6
    mask[0, :20] = False  # sample 0's first two chunks see nothing
    mask[1] = False  # sample 1 sees nothing at all
    want, _ = attention_forward(q, k, v, mask)
    for ops in (PLAIN_ENGINE, NUMBA_ENGINE):  # the plain merge and the kernel's, one signature
        state = ops.chunk_state(b, h, m, d)
        for i in range(0, n, 10):
            o_c, lse_c = ops.attention_forward(q, k[:, :, i:i + 10], v[:, :, i:i + 10], mask[:, i:i + 10])
            ops.merge_chunk(state, o_c, lse_c)
        got = ops.finish_chunks(state, np.float64)
        assert np.abs(got - want).max() <= FAST_FLOAT64_RTOL * np.abs(want).max(), ops.name
        assert np.all(got[1] == 0.0)
    with pytest.raises(ValueError, match="o_c, lse_c: expected shapes"):
        merge_chunk(state, o_c[:, :1], lse_c)
    with pytest.raises(ValueError, match=r"o_c: expected shape \[B, H, M, dv\]"):
        plain_attention.merge_chunk(state, o_c[:, :1], lse_c)


# ---- reading .npy files in chunks -----------------------------------------------------------


def test_npy_chunks_stream_equals_the_forward(rng, tmp_path):
    model = random_model(rng, num_cross_layers=2, num_layers=3)
    x = rng.normal(size=(3, 37, 5))
    mask = ragged_mask(rng, 3, 37)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "m.npy", mask)
    want = model(x, mask)
    for size in (1, 5, 100):
        got = model.encode_stream(NpyChunks(tmp_path / "x.npy", size), NpyChunks(tmp_path / "m.npy", size))
        assert relerr(got, want) <= FAST_FLOAT64_RTOL


def test_npy_chunks_refuse_what_they_cannot_read(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((2, 3, 4))))
    with pytest.raises(ValueError, match="Fortran order"):
        NpyChunks(tmp_path / "f.npy")
    np.save(tmp_path / "o.npy", np.array([[None]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        NpyChunks(tmp_path / "o.npy")
    np.save(tmp_path / "t.npy", np.ones((2, 3, 4)))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        NpyChunks(tmp_path / "t.npy")
    with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1"):
        NpyChunks(tmp_path / "f.npy", 0)


def test_uniform_masked_rows_run_the_engine_unless_a_sample_is_fully_masked(rng, monkeypatch):
    """masked_rows="uniform" (HF's semantics) equals the engine's zero rows whenever every
    sample keeps an input: model(x) runs the engine then, and the probabilities path (the
    forward) only for a batch with a fully masked sample; both equal the forward."""
    model = random_model(rng, masked_rows="uniform", dtype="float64")
    x = rng.normal(size=(2, 7, 5))
    mask = np.ones((2, 7), dtype=bool)
    mask[0, 3:] = False
    calls = []
    encode = engine.encode_array
    monkeypatch.setattr(engine, "encode_array", lambda *a, **k: calls.append(1) or encode(*a, **k))
    assert relerr(model(x, mask), model.forward(x, mask)[0]) <= FAST_FLOAT64_RTOL
    assert calls == [1]
    mask[1, :] = False
    assert relerr(model(x, mask), model.forward(x, mask)[0]) <= FAST_FLOAT64_RTOL
    assert calls == [1]  # the fully masked sample took the probabilities path
