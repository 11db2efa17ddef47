"""The kernels' BLAS (perceiver_np.kernels.blas): SciPy's, MKL's or BLIS's, switched at run time,
every product of the kernels on the chosen one, the same bits on any number of threads and
wherever the arrays lie, and clear errors."""

from __future__ import annotations

import ctypes
import sys

import numba
import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import tolerances
from perceiver_np.kernels import attention, blas, gemm
from perceiver_np.kernels._numba import REDUCTION_BLOCK_ROWS

needs_mkl = pytest.mark.skipif("mkl" not in blas.available(),
                               reason="MKL is not installed (make test installs perceiver_np[mkl])")
needs_blis = pytest.mark.skipif("blis" not in blas.available(),
                                reason="BLIS is not installed (make test installs perceiver_np[blis])")
#: The optional BLAS libraries, each test of them skipped (with the reason) when not installed.
OPTIONAL = [pytest.param("mkl", marks=needs_mkl), pytest.param("blis", marks=needs_blis)]


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
    with pytest.raises(ValueError, match=r"blas: expected one of 'scipy', 'mkl', 'blis', got 'openblas'"):
        blas.use("openblas")
    with pytest.raises(ValueError, match=r"blas: expected one of 'scipy', 'mkl', 'blis', got 'MKL '"):
        pnp.runtime.tune(blas="MKL ")


def test_missing_mkl_is_an_import_error_naming_the_package(monkeypatch, restore_blas):
    monkeypatch.setattr(blas, "MKL_LIBRARIES", ("libmkl_rt.so.999",))
    monkeypatch.setattr(blas, "_loaded", {k: v for k, v in blas._loaded.items() if k != "mkl"})
    with pytest.raises(ImportError, match=r"blas 'mkl': .*so.999.*pip install 'perceiver_np\[mkl\]'"):
        blas.use("mkl")
    assert "mkl" not in blas.available()
    assert blas.current().name == "scipy"  # nothing switched


def test_missing_blis_is_an_import_error_naming_the_package(monkeypatch, restore_blas):
    monkeypatch.setattr(blas, "_loaded", {k: v for k, v in blas._loaded.items() if k != "blis"})
    monkeypatch.setitem(sys.modules, "blis.cy", None)  # as if not installed: import raises
    monkeypatch.setitem(sys.modules, "blis", None)
    with pytest.raises(ImportError, match=r"blas 'blis': the blis package .*pip install "
                                          r"'perceiver_np\[blis\]'"):
        blas.use("blis")
    assert "blis" not in blas.available()
    assert blas.current().name == "scipy"


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


def test_the_default_is_scipys_blas(rng):
    """Untuned, the products call SciPy's BLAS: a product of one tile (64 x 64 outputs) has the
    bits of one single-threaded call of SciPy's own sgemm, made as the kernels make it
    (column-major C^T = W^T A^T, the operands read as they lie: F-ordered views of the C-ordered
    arrays, no copies). Not NumPy's ``@``: NumPy ships its own
    OpenBLAS, whose version may sum in another order (0.3.31 against SciPy's 0.3.30 does on an
    AMD Zen 5)."""
    from scipy.linalg import blas as scipy_blas

    assert blas.current().name == "scipy"
    a = rng.standard_normal((64, 300)).astype(np.float32)
    w = rng.standard_normal((300, 64)).astype(np.float32)
    assert gemm.tiles(64, 64, gemm._threads()) == (64, 64)  # one tile, one call
    with gemm.single_threaded_blas():  # as the tile's call is made (OpenBLAS's threads split the
        want = scipy_blas.sgemm(1.0, w.T, a.T).T  # output, and edges may sum in another order)
    np.testing.assert_array_equal(gemm.matmul(a, w), want)


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


@pytest.mark.parametrize("lib", OPTIONAL)
def test_products_agree_with_scipys_within_the_rounding_bound(lib, rng, restore_blas):
    """MKL (or BLIS) and SciPy's OpenBLAS compute the same sums in other orders: each entry of
    each is within gamma_K (|a| @ |w|) of the exact sum (Higham's deterministic bound), so they
    are within two of that of each other (float32). Float64 to FLOAT64_RTOL normwise. A wrong
    operand, transpose or offset is off by O(1). (That the library is the one called shows in
    test_the_chosen_library_is_the_one_called.)"""
    for dtype in (np.float32, np.float64):
        for name, run, (lhs, rhs), k in _products(rng, dtype):
            got, want = _on(lib, run), _on("scipy", run)
            if dtype == np.float32:
                bound = 2 * tolerances.float32_gamma(k) * (np.abs(lhs).astype(np.float64) @ np.abs(rhs))
                excess = np.abs(got.astype(np.float64) - want) - bound
                assert excess.max() <= 0, f"{name}: {excess.max():.3g} beyond the bound"
            else:
                err = np.abs(got - want).max() / np.abs(want).max()
                assert err <= tolerances.FLOAT64_RTOL, f"{name}: {err:.3g}"


@pytest.mark.parametrize("lib", OPTIONAL)
def test_attention_agrees_with_scipys(lib, rng, restore_blas):
    """The attention kernel's tile products follow the BLAS choice too; forward and backward
    against the SciPy run within the float32 attention bound."""
    b, h, m, n, d = 2, 2, 256, 3000, 256
    q, k, v = (rng.standard_normal((b, h, s, d)).astype(np.float32) for s in (m, n, n))
    do = rng.standard_normal((b, h, m, d)).astype(np.float32)

    def run():
        o, lse = attention.attention_forward(q, k, v)
        return (o, *attention.attention_backward(do, q, k, v, o, lse))

    got, want = _on(lib, run), _on("scipy", run)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err <= 2 * tolerances.float32_attention_rtol(n, d), f"{name}: {err:.3g}"


@pytest.mark.parametrize("lib", ["scipy", *OPTIONAL])
def test_tiles_are_cut_for_a_fixed_thread_count_so_bits_do_not_follow_threads(lib, rng, restore_blas,
                                                                              two_threads):
    """No BLAS promises a tile's bits whatever its shape (MKL's move at K >= 1024 on a Xeon,
    SciPy's OpenBLAS's at any K on a Zen 5), so under every BLAS the tiles are cut as for
    FIXED_TILE_THREADS: the same tile plan and the same bits on 1 and 2 threads, for one
    sample's latents through the FFN's down projection (K = 1024), a batch through a wide
    weight and the input projection's K = 287."""
    blas.use(lib)
    shapes = [(256, 1024, 256), (2048, 256, 1024), (8192, 287, 256)]
    for r, k, f in shapes:
        a = rng.standard_normal((r, k)).astype(np.float32)
        w = rng.standard_normal((k, f)).astype(np.float32)
        runs, plans = [], []
        for n in (1, 2):
            pnp.set_num_threads(n)
            plans.append(gemm.tiles(r, f, gemm._threads()))
            runs.append(gemm.matmul(a, w))
        assert gemm._threads() == blas.FIXED_TILE_THREADS and plans[0] == plans[1]
        np.testing.assert_array_equal(*runs)


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


@pytest.mark.parametrize("lib", OPTIONAL)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_step_is_bitwise_independent_of_the_thread_count(lib, dtype, restore_blas, two_threads):
    """A forward, backward and inference of a model whose FFN has K = 1024, on MKL or BLIS,
    with 1 and 2 threads: the same bits (test_threads.py holds SciPy's BLAS to the same)."""
    blas.use(lib)
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


@pytest.mark.parametrize("lib", OPTIONAL)
def test_bits_do_not_depend_on_where_the_arrays_lie(lib, rng, restore_blas):
    """The workspace places buffers where it may: MKL and BLIS give the same bits with every
    operand moved by 1 to 15 floats (off the 64-byte lines), for NN, w.T and TN products."""
    blas.use(lib)
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


@pytest.mark.parametrize("lib", OPTIONAL)
def test_tune_switches_the_blas_and_the_environment_never_fails(lib, monkeypatch, restore_blas):
    assert pnp.runtime.tune(blas=lib).blas == lib and blas.current().name == lib
    assert pnp.runtime.tune(blas="scipy").blas == "scipy"
    monkeypatch.setenv(pnp.runtime.BLAS_ENV, lib)
    assert pnp.runtime.tune().blas == lib
    monkeypatch.setenv(pnp.runtime.BLAS_ENV, "atlas")
    with pytest.warns(RuntimeWarning,
                      match=r"PERCEIVER_NP_BLAS='atlas' is not one of scipy, mkl, blis, auto; ignored"):
        assert pnp.runtime.tune().blas == lib  # unchanged
    monkeypatch.setenv(pnp.runtime.BLAS_ENV, "Auto")
    assert pnp.runtime.tune().blas == blas.preferred()
    assert pnp.runtime.tune(blas="auto").blas == blas.preferred()


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


AVX512 = {f: True for f in ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma")}
AVX2 = {"avx2": True, "fma": True}


@needs_blis
def test_blis_sub_configuration_follows_the_cpu_features():
    """The wheel's BLIS detects too little on recent CPUs (its generic C kernels on AMD Zen 5):
    the sub-configuration is chosen by the CPU's features instead, best first; without AVX2
    it is BLIS's own choice. Every choice has a context."""
    import ctypes as ct

    lib = ct.CDLL(str(blas.blis_library()))
    assert blas.blis_config(lib, AVX512)[0] == "skx"
    assert blas.blis_config(lib, AVX2)[0] == "haswell"
    lib.bli_arch_string.restype, lib.bli_arch_string.argtypes = ct.c_char_p, [ct.c_int]
    own = lib.bli_arch_string(lib.bli_arch_query_id()).decode()
    assert blas.blis_config(lib, {})[0] == own
    for features in (AVX512, AVX2, {}):
        assert blas.blis_config(lib, features)[1] != 0


@needs_blis
def test_the_kernels_call_blis_with_the_chosen_context(rng, restore_blas):
    """On "blis" a product is BLIS's own: the same bits as one bli_sgemm_ex call on the whole
    product with the chosen context (through ctypes, made as the kernels make it: column-major
    C^T = op(B)^T op(A)^T), for NN, w.T and TN, float32 and float64; and not SciPy's bits (so
    the switch happened)."""
    import ctypes as ct

    lib = ct.CDLL(str(blas.blis_library()))
    config, context = blas.blis_config(lib)
    assert blas.use("blis").config == config
    i64, ptr = ct.c_int64, ct.c_void_p

    def direct(a: np.ndarray, b: np.ndarray, ta: bool, tb: bool) -> np.ndarray:
        """C = op(a) @ op(b) by one BLIS call: op(x) = x.T (read in place) when t."""
        m, k = (a.shape[1], a.shape[0]) if ta else a.shape
        n = b.shape[0] if tb else b.shape[1]
        c = np.empty((m, n), a.dtype)
        f = getattr(lib, "bli_sgemm_ex" if a.dtype == np.float32 else "bli_dgemm_ex")
        f.argtypes = [ct.c_int, ct.c_int, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, ptr, ptr,
                      i64, i64, ptr, ptr]
        scalar = ct.c_float if a.dtype == np.float32 else ct.c_double
        one, zero = scalar(1.0), scalar(0.0)
        # a C-ordered [r, c] array is the column-major [c, r] matrix: C^T [n, m] = op(b)^T op(a)^T
        f(8 if tb else 0, 8 if ta else 0, n, m, k, ct.addressof(one), b.ctypes.data, 1, b.shape[1],
          a.ctypes.data, 1, a.shape[1], ct.addressof(zero), c.ctypes.data, 1, n, context, None)
        return c

    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((1500, 1024)).astype(dtype)
        w = rng.standard_normal((1024, 300)).astype(dtype)
        wt = np.ascontiguousarray(w.T)  # [300, 1024]
        dy = rng.standard_normal((1500, 300)).astype(dtype)
        r = REDUCTION_BLOCK_ROWS  # matmul_tn sums blocks of r rows: one block is one call
        pairs = [(gemm.matmul(a, w), direct(a, w, False, False)),
                 (gemm.matmul(a, wt.T), direct(a, wt, False, True)),
                 (gemm.matmul_tn(a[:r], dy[:r]), direct(a[:r], dy[:r], True, False))]
        for got, want in pairs:
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(_on("scipy", lambda a=a, w=w: gemm.matmul(a, w)), pairs[0][1])
        blas.use("blis")


@needs_blis
def test_blis_sends_the_smallest_products_to_scipys_blas(rng, restore_blas):
    """Products of at most BLIS_SMALL_PRODUCT multiply-adds go to SciPy's BLAS under "blis"
    (bitwise SciPy's result), the ones just above to BLIS (not SciPy's bits): the attention
    kernel's tile products, which are that small for the latents' self-attention."""
    q = rng.standard_normal((1, 1, 64, 64)).astype(np.float32)
    k = rng.standard_normal((1, 1, 64, 64)).astype(np.float32)
    small = rng.standard_normal((64, 64)).astype(np.float32)
    big = rng.standard_normal((64, 72)).astype(np.float32)  # 64 x 64 x 72 > 64^3

    def run():
        out = [np.empty((64, 64), np.float32), np.empty((64, 72), np.float32)]
        for o, w in zip(out, (small, big), strict=True):
            assert gemm.gemm_rows(False, False, 64, w.shape[1], 64, q, 0, 64, w, 0, w.shape[1], o, 0,
                                  w.shape[1], 0.0) == 0
        return out, attention.attention_forward(q, k, k)[0]

    assert blas.BLIS_SMALL_PRODUCT == 64 ** 3
    (small_blis, big_blis), att_blis = _on("blis", run)
    (small_scipy, big_scipy), att_scipy = _on("scipy", run)
    np.testing.assert_array_equal(small_blis, small_scipy)
    np.testing.assert_array_equal(att_blis, att_scipy)  # its tiles: 64 x 64 x 64 each
    assert not np.array_equal(big_blis, big_scipy)


ZEN4, ZEN5, XEON = 0x19, 0x1A, 6  # cpu family: AMD Zen 3 and 4, Zen 5; Intel's


@pytest.mark.parametrize("vendor, family, features, installed, want, wide", [
    ("GenuineIntel", XEON, AVX512, ["scipy", "mkl", "blis"], "mkl", True),
    ("GenuineIntel", XEON, AVX512, ["scipy", "blis"], "blis", True),
    ("GenuineIntel", XEON, AVX2, ["scipy", "blis"], "scipy", False),
    ("AuthenticAMD", ZEN5, AVX512, ["scipy", "mkl", "blis"], "blis", True),
    ("AuthenticAMD", ZEN5 + 1, AVX512, ["scipy", "blis"], "blis", True),
    ("AuthenticAMD", ZEN4, AVX512, ["scipy", "mkl", "blis"], "scipy", False),  # 256-bit paths
    ("AuthenticAMD", ZEN5, AVX2, ["scipy", "mkl", "blis"], "scipy", False),
    ("AuthenticAMD", ZEN5, AVX512, ["scipy", "mkl"], "scipy", True),
    ("", 0, {}, ["scipy"], "scipy", False),
    ("", 0, AVX512, ["scipy", "blis"], "scipy", False),
])
def test_preferred_is_a_fixed_rule_on_the_cpu(vendor, family, features, installed, want, wide, monkeypatch):
    monkeypatch.setattr(blas, "available", lambda: installed)
    assert blas.preferred(features, vendor, family) == want
    assert blas.full_width_avx512(features, vendor, family) == wide


def test_cpu_id_reads_vendor_and_family(tmp_path, monkeypatch):
    import builtins

    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    (tmp_path / "cpuinfo").write_text(text)
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        return real_open(tmp_path / "cpuinfo" if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert blas.cpu_id() == ("AuthenticAMD", 25)  # the first processor's
    (tmp_path / "cpuinfo").write_text("flags\t: avx2\n")
    assert blas.cpu_id() == ("", 0)
    (tmp_path / "cpuinfo").unlink()
    assert blas.cpu_id() == ("", 0)  # unreadable
