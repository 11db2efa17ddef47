"""The kernels' BLAS (perceiver_np.kernels.blas): SciPy's or MKL's, switched at run time, every
product of the kernels on the chosen one, the same bits on any number of threads and wherever
the arrays lie, and clear errors."""

from __future__ import annotations

import ctypes
import sys

import numba
import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import tolerances
from perceiver_np.kernels import attention, blas, gemm

needs_mkl = pytest.mark.skipif("mkl" not in blas.available(),
                               reason="MKL is not installed (make test installs perceiver_np[mkl])")


@pytest.fixture
def restore_blas():
    """Whatever a test switches to, the BLAS of before is back afterwards."""
    before = blas.current().name
    yield
    blas.use(before)


@pytest.fixture
def two_threads():
    if pnp.threads.max_threads() < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2 to compare thread counts")
    before = numba.get_num_threads()
    yield
    pnp.set_num_threads(before)


def _on(name: str, fn):
    blas.use(name)
    return fn()


def test_bad_name_is_named(restore_blas):
    with pytest.raises(ValueError, match=r"blas: expected one of 'scipy', 'mkl', got 'openblas'"):
        blas.use("openblas")
    with pytest.raises(ValueError, match=r"blas: expected one of 'scipy', 'mkl', got 'MKL '"):
        pnp.runtime.tune(blas="MKL ")


def test_missing_mkl_is_an_import_error_naming_the_package(monkeypatch, restore_blas):
    monkeypatch.setattr(blas, "MKL_LIBRARIES", ("libmkl_rt.so.999",))
    monkeypatch.setattr(blas, "_loaded", {k: v for k, v in blas._loaded.items() if k != "mkl"})
    with pytest.raises(ImportError, match=r"blas 'mkl': .*so.999.*pip install 'perceiver_np\[mkl\]'"):
        blas.use("mkl")
    assert blas.available() == ["scipy"]
    assert blas.current().name == "scipy"  # nothing switched


def test_a_refused_call_raises_instead_of_leaving_garbage(rng, restore_blas):
    """A size beyond the BLAS interface's 32-bit integers is refused before any call (status
    BLAS_REFUSED, nothing written), and a product whose BLAS is missing raises naming it."""
    a = rng.standard_normal((4, 4)).astype(np.float32)
    out = np.full((4, 4), 7.0, np.float32)
    assert gemm.gemm_rows(False, False, 1 << 31, 4, 4, a, 0, 4, a, 0, 4, out, 0, 4, 0.0) == gemm.BLAS_REFUSED
    assert gemm.gemm_rows(False, False, 4, 4, 4, a, 0, 4, a, 0, 1 << 32, out, 0, 4, 0.0) == gemm.BLAS_REFUSED
    assert (out == 7.0).all()
    assert gemm.gemm_rows(False, False, 4, 4, 4, a, 0, 4, a, 0, 4, out, 0, 4, 0.0) == 0
    np.testing.assert_allclose(out, a @ a, rtol=1e-5)
    big = rng.standard_normal((600, 512)).astype(np.float32)
    blas._TABLE[0] = None  # as if no sgemm had been found
    with pytest.raises(RuntimeError, match=r"BLAS: a gemm call was refused \(status -1\)"):
        gemm.matmul(big, big.T)
    with pytest.raises(RuntimeError, match="refused"):
        gemm.matmul_tn(big, big)


def test_the_default_is_scipys_blas_bit_for_bit_numpys(rng):
    """Untuned, the products call SciPy's BLAS: on these shapes OpenBLAS gives NumPy's ``@``
    bits tile by tile (one call or many)."""
    assert blas.current().name == "scipy" and blas.current().tiles_follow_threads
    a = rng.standard_normal((2048, 300)).astype(np.float32)
    w = rng.standard_normal((300, 256)).astype(np.float32)
    np.testing.assert_array_equal(gemm.matmul(a, w), a @ w)


def _products(rng, dtype):
    """Every product kernel that calls BLAS, on shapes past SMALL_PRODUCT: (name, result,
    operands whose |a| @ |w| bounds its rounding, K)."""
    a = rng.standard_normal((2048, 1024)).astype(dtype)
    w = (rng.standard_normal((1024, 256)) / 32).astype(dtype)
    dy = rng.standard_normal((2048, 300)).astype(dtype)
    x = rng.standard_normal((2, 700, 1024)).astype(dtype)[:, 50:650]  # a strided chunk
    return [
        ("matmul", lambda: gemm.matmul(a, w), (a, w), 1024),
        ("matmul w.T", lambda: gemm.matmul(a[:, :256], w.T), (a[:, :256], w.T), 256),
        ("matmul_tn", lambda: gemm.matmul_tn(a, dy), (a.T, dy), 2048),
        ("matmul_batched", lambda: gemm.matmul_batched(x, w).reshape(-1, 256),
         (x.reshape(-1, 1024), w), 1024),
    ]


@needs_mkl
def test_mkl_products_agree_with_scipys_within_the_rounding_bound(rng, restore_blas):
    """MKL and SciPy's OpenBLAS compute the same sums in other orders: each entry of each is
    within gamma_K (|a| @ |w|) of the exact sum (Higham's deterministic bound), so they are
    within two of that of each other (float32). Float64 to FLOAT64_RTOL normwise. A wrong
    operand, transpose or offset is off by O(1). (That MKL is the one called shows in the
    thread-count test below: OpenBLAS's tiles never change the bits, MKL's do.)"""
    for dtype in (np.float32, np.float64):
        for name, run, (lhs, rhs), k in _products(rng, dtype):
            got, want = _on("mkl", run), _on("scipy", run)
            if dtype == np.float32:
                bound = 2 * tolerances.float32_gamma(k) * (np.abs(lhs).astype(np.float64) @ np.abs(rhs))
                excess = np.abs(got.astype(np.float64) - want) - bound
                assert excess.max() <= 0, f"{name}: {excess.max():.3g} beyond the bound"
            else:
                err = np.abs(got - want).max() / np.abs(want).max()
                assert err <= tolerances.FLOAT64_RTOL, f"{name}: {err:.3g}"


@needs_mkl
def test_mkl_attention_agrees_with_scipys(rng, restore_blas):
    """The attention kernel's tile products follow the BLAS choice too; forward and backward
    against the SciPy run within the float32 attention bound."""
    b, h, m, n, d = 2, 2, 256, 3000, 256
    q, k, v = (rng.standard_normal((b, h, s, d)).astype(np.float32) for s in (m, n, n))
    do = rng.standard_normal((b, h, m, d)).astype(np.float32)

    def run():
        o, lse = attention.attention_forward(q, k, v)
        return (o, *attention.attention_backward(do, q, k, v, o, lse))

    got, want = _on("mkl", run), _on("scipy", run)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err <= 2 * tolerances.float32_attention_rtol(n, d), f"{name}: {err:.3g}"


@needs_mkl
def test_mkl_tiles_are_cut_for_a_fixed_thread_count_so_bits_do_not_follow_threads(rng, monkeypatch,
                                                                                   restore_blas, two_threads):
    """Under MKL a product's bits depend on its tiles' shape at K >= 1024 (here one sample's
    latents through the FFN's down projection): tiles cut for the real thread count give other
    bits on 1 and 2 threads (shown here, so the check below can fail), tiles cut for
    FIXED_TILE_THREADS the same bits."""
    a = rng.standard_normal((256, 1024)).astype(np.float32)
    w = rng.standard_normal((1024, 256)).astype(np.float32)
    blas.use("mkl")
    fixed = gemm._threads

    def on_threads() -> list[np.ndarray]:
        out = []
        for n in (1, 2):
            pnp.set_num_threads(n)
            out.append(gemm.matmul(a, w))  # one tile of 256 rows on 1 thread, two of 128 on 2
        return out

    monkeypatch.setattr(gemm, "_threads", lambda: int(numba.get_num_threads()))  # as for OpenBLAS
    assert not np.array_equal(*on_threads())
    monkeypatch.setattr(gemm, "_threads", fixed)
    assert gemm._threads() == blas.FIXED_TILE_THREADS
    np.testing.assert_array_equal(*on_threads())


def test_a_second_copy_of_the_module_shares_the_table(monkeypatch, restore_blas):
    """The kernels folder may be imported a second time under another name (from the
    repository's root, transformers imports any top-level ``kernels`` package): that copy
    uses the same table and leaves the choice as it was, instead of registering a table of its
    own that the compiled kernels would then read."""
    import importlib.util

    from llvmlite import binding as llvm

    name = "mkl" if "mkl" in blas.available() else "scipy"
    blas.use(name)
    spec = importlib.util.spec_from_file_location("second_copy_of_blas", blas.__file__)
    assert spec is not None and spec.loader is not None
    other = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, other)  # as an import does (dataclasses look there)
    spec.loader.exec_module(other)
    assert llvm.address_of_symbol(blas.TABLE_SYMBOL) == ctypes.addressof(blas._TABLE)
    assert ctypes.addressof(other._TABLE) == ctypes.addressof(blas._TABLE)
    assert blas.current().name == other.current().name == name
    other.use("scipy")
    assert blas.current().name == "scipy"


@needs_mkl
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mkl_training_step_is_bitwise_independent_of_the_thread_count(dtype, restore_blas, two_threads):
    """A forward, backward and inference of a model whose FFN has K = 1024, on MKL, with 1 and 2
    threads: the same bits (test_threads.py holds SciPy's BLAS to the same)."""
    blas.use("mkl")
    model = pnp.build(input_dim=8, latent_dim=256, num_latents=64, num_layers=1, num_heads=4,
                      dropout=0.0, dtype=dtype)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 2100, 8)).astype(dtype)
    dy = rng.standard_normal((4, 256)).astype(dtype)
    runs = []
    for n in (1, 2):
        pnp.set_num_threads(n)
        y, cache = model.forward(x, training=True)
        grads, dx = model.backward(dy, cache)
        runs.append((y, grads, dx, model(x)))
    (y1, g1, dx1, i1), (y2, g2, dx2, i2) = runs
    assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2) and np.array_equal(i1, i2)
    assert [k for k in g1 if not np.array_equal(g1[k], g2[k])] == []


@needs_mkl
def test_mkl_bits_do_not_depend_on_where_the_arrays_lie(rng, restore_blas):
    """The workspace places buffers where it may: MKL gives the same bits with every operand
    moved by 1 to 15 floats (off the 64-byte lines), for NN, w.T and TN products."""
    blas.use("mkl")
    a = rng.standard_normal((1100, 1024)).astype(np.float32)
    w = rng.standard_normal((1024, 300)).astype(np.float32)
    dy = rng.standard_normal((1100, 300)).astype(np.float32)

    def moved(x: np.ndarray, by: int) -> np.ndarray:
        buf = np.empty(x.size + 32, x.dtype)
        start = (-(buf.ctypes.data // x.itemsize)) % 16 + by  # by floats past a 64-byte line
        y = buf[start:start + x.size].reshape(x.shape)
        y[...] = x
        return y

    want = [gemm.matmul(a, w), gemm.matmul(a[:, :300], w.T), gemm.matmul_tn(a, dy)]
    for by in range(1, 16):
        a2, w2, dy2 = moved(a, by), moved(w, (3 * by) % 16), moved(dy, (7 * by) % 16)
        got = [gemm.matmul(a2, w2), gemm.matmul(a2[:, :300], w2.T), gemm.matmul_tn(a2, dy2)]
        for g, wnt in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, wnt)


@needs_mkl
def test_tune_switches_the_blas_and_the_environment_never_fails(monkeypatch, restore_blas):
    assert pnp.runtime.tune(blas="mkl").blas == "mkl" and blas.current().name == "mkl"
    assert pnp.runtime.tune(blas="scipy").blas == "scipy"
    monkeypatch.setenv(pnp.runtime.BLAS_ENV, "mkl")
    assert pnp.runtime.tune().blas == "mkl"
    monkeypatch.setenv(pnp.runtime.BLAS_ENV, "atlas")
    with pytest.warns(RuntimeWarning, match=r"PERCEIVER_NP_BLAS='atlas' is not one of scipy, mkl; ignored"):
        assert pnp.runtime.tune().blas == "mkl"  # unchanged


def test_the_environment_naming_a_missing_mkl_warns_and_changes_nothing(monkeypatch, restore_blas):
    """PERCEIVER_NP_BLAS=mkl where MKL is not installed: a RuntimeWarning naming the variable
    and the package, never an error (runtime's rule for environment values)."""
    monkeypatch.setattr(blas, "MKL_LIBRARIES", ("libmkl_rt.so.999",))
    monkeypatch.setattr(blas, "_loaded", {k: v for k, v in blas._loaded.items() if k != "mkl"})
    blas.use("scipy")
    monkeypatch.setenv(pnp.runtime.BLAS_ENV, "MKL")
    with pytest.warns(RuntimeWarning, match=r"PERCEIVER_NP_BLAS='MKL': MKL is not installed "
                                            r"\(pip install 'perceiver_np\[mkl\]'\); ignored"):
        assert pnp.runtime.tune().blas == "scipy"
