"""The seed model's products, library against library, on one thread and on two.

    python benchmarks/bench_gemm.py --markdown docs/performance-gemm.md   # make bench-gemm, ~3 min

perceiver_np's products are BLAS calls: OpenBLAS (SciPy's, through Numba), one single-threaded
call per tile on each of Numba's threads (``kernels/gemm.py``). Whether another library would
make them faster is a question of these shapes, not of a 4096^3 square, so this measures each
library on the products of the seed model at B = 32 (the shapes of a training step's forward,
input gradients and weight gradients), all in this one process, in interleaved rounds (each
library timed once per round, in turn, a pause between libraries so that no pool still spins):

- one thread, the call one of our tiles makes: OpenBLAS (NumPy's ``np.dot`` under a one-thread
  limit), MKL (the ``mkl`` wheel's ``cblas_sgemm``, its sequential layer, through ctypes),
  BLIS as the ``blis`` wheel runs it (its own CPU detection), BLIS on the context
  ``kernels/blas.py`` picks from the CPU's features (``bli_sgemm_ex`` through ctypes) and
  torch's ``torch.mm`` on one thread, and ONNX Runtime's MLAS (:class:`OrtMatMul`: the weight
  packed once, as ORT runs a model, which no BLAS call of ours can do);
- two threads: ours (``kernels.gemm.matmul`` / ``matmul_tn``: SciPy's OpenBLAS on tiles on
  Numba's threads), ours on MKL and ours on BLIS (the same kernels after ``blas.use``), all
  on tiles cut for ``blas.FIXED_TILE_THREADS`` (``kernels/blas.py``), OpenBLAS on its own
  threads (NumPy's ``@``), ``torch.mm`` on two threads (oneDNN or MKL, its own threading) and
  ONNX Runtime's MLAS on two intra-op threads.

Each cell is GFLOP/s (2·m·k·n per product), median (min–max) over the rounds; a round times
enough calls to fill ~20 ms. ``agree`` is max |theirs - OpenBLAS| / max |OpenBLAS| over the
output. Each one-thread library is also asked whether it gives the same bits tile by tile as in
one call (:func:`tiles_differ`): a library that does not cannot serve tiles whose shape follows
the thread count and keep the same bits on any number of threads, which is why the kernels cut
their tiles for a fixed count under every BLAS (tests/test_blas.py). A library that is not
installed has no column (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine, write_page  # benchmarks/
from threadpoolctl import threadpool_limits

from perceiver_np import runtime
from perceiver_np.kernels import blas, gemm
from perceiver_np.workspace import Workspace

#: (what it is in the seed model at B = 32, kind, m, k, n): "NN" is [m, k] @ [k, n]; "TN" is
#: a weight gradient, [k, m]^T @ [k, n] (k = the rows summed over).
SHAPES = [
    ("latents' q, k, v, out and their input gradients: [B·M, D] @ [D, D]", "NN", 2048, 256, 256),
    ("FFN up: [B·M, D] @ [D, 4D]", "NN", 2048, 256, 1024),
    ("FFN down: [B·M, 4D] @ [4D, D]", "NN", 2048, 1024, 256),
    ("input projection, N 256: [B·N, C] @ [C, D]", "NN", 8192, 287, 256),
    ("cross-attention K and V, N 1k: [B·N, D] @ [D, D]", "NN", 32768, 256, 256),
    ("weight gradient of q, k, v, out: [B·M, D]^T @ [B·M, D]", "TN", 256, 2048, 256),
    ("weight gradient of FFN up: [B·M, D]^T @ [B·M, 4D]", "TN", 256, 2048, 1024),
    ("weight gradient of FFN down: [B·M, 4D]^T @ [B·M, D]", "TN", 1024, 2048, 256),
    ("weight gradient of K and V, N 256: [B·N, D]^T @ [B·N, D]", "TN", 256, 8192, 256),
    ("a large square, for the peak", "NN", 4096, 4096, 4096),
]
ROUND_SECONDS = 0.02  # each library's share of a round: enough calls to fill this
SETTLE = 0.25  # seconds of quiet between libraries: OpenBLAS spins ~0.1 s after a product, OpenMP pools
# (torch's) up to their block time; bench_model.py waits as long


class Mkl:
    """MKL's ``cblas_sgemm`` from the ``mkl`` wheel, on its sequential layer (one thread per
    call), loaded as the kernels load it (:func:`perceiver_np.kernels.blas.load_mkl`)."""

    def __init__(self) -> None:
        self.rt = blas.load_mkl()
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        self.sgemm = self.rt.cblas_sgemm
        self.sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        self.sgemm.restype = None

    def product(self, kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        """out = a @ b ("NN", a [m, k]) or a^T @ b ("TN", a [k, m]); row-major, each with unit
        column stride (a block of columns of a C-contiguous array is read where it lies)."""
        m, n = out.shape
        k = b.shape[0]
        assert a.strides[1] == b.strides[1] == out.strides[1] == 4, "float32 rows with unit stride"
        self.sgemm(101, 112 if kind == "TN" else 111, 111, m, n, k, 1.0, a.ctypes.data, a.strides[0] // 4,
                   b.ctypes.data, b.strides[0] // 4, 0.0, out.ctypes.data, out.strides[0] // 4)


class Blis:
    """BLIS's ``bli_sgemm_ex`` from the ``blis`` wheel with the context the kernels use (the
    sub-configuration :func:`perceiver_np.kernels.blas.blis_config` picks), one thread."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(str(blas.blis_library()))
        before = blas.current().name
        blas.use("blis")  # the pools sized for the context, as the kernels have them
        self.config, self.context = blas.blis_config(self.lib)
        blas.use(before)
        i64, p = ctypes.c_int64, ctypes.c_void_p
        self.sgemm = self.lib.bli_sgemm_ex
        self.sgemm.argtypes = [ctypes.c_int, ctypes.c_int, i64, i64, i64, p, p, i64, i64, p, i64, i64, p, p,
                               i64, i64, p, p]
        self.sgemm.restype = None
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def product(self, kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        """As :meth:`Mkl.product` (row-major strides, BLIS's general-stride interface)."""
        m, n = out.shape
        k = b.shape[0]
        assert a.strides[1] == b.strides[1] == out.strides[1] == 4, "float32 rows with unit stride"
        self.sgemm(8 if kind == "TN" else 0, 0, m, n, k, ctypes.addressof(self.one), a.ctypes.data,
                   a.strides[0] // 4, 1, b.ctypes.data, b.strides[0] // 4, 1, ctypes.addressof(self.zero),
                   out.ctypes.data, out.strides[0] // 4, 1, self.context, None)


def gflops(m: int, k: int, n: int, seconds: float) -> float:
    """The rate of one [m, k] @ [k, n] product (or its TN twin) taking ``seconds``."""
    return 2.0 * m * k * n / seconds / 1e9


def libraries(threads: int) -> dict[str, Callable[[str, np.ndarray, np.ndarray, np.ndarray], Any]]:
    """Column name -> product(kind, a, b, out): each writes a @ b (NN) or a^T @ b (TN) into out."""
    cols: dict[str, Callable[..., Any]] = {}

    def openblas(kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        np.dot(a.T if kind == "TN" else a, b, out)

    cols["1 thread: OpenBLAS"] = openblas
    try:
        mkl = Mkl()
        cols["1 thread: MKL"] = mkl.product
    except (ImportError, OSError) as e:
        print(f"no MKL column: {e}")
        mkl = None
    try:
        import blis.py

        def blis_1(kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
            blis.py.gemm(a, b, out=out, trans1=kind == "TN", beta=0.0)

        cols["1 thread: BLIS, own detection"] = blis_1
        blis_ctx = Blis()
        cols[f"1 thread: BLIS {blis_ctx.config}"] = blis_ctx.product
    except ImportError:
        blis_ctx = None
        print("no BLIS column: pip install blis")
    try:
        import torch
    except ImportError:
        torch = None
        print("no torch columns: pip install torch==2.13.0")

    def torch_mm(kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        torch.mm(ta.T if kind == "TN" else ta, tb, out=to)

    if torch is not None:
        cols["1 thread: torch.mm"] = torch_mm
    try:
        ort_1, ort_n = OrtMatMul(1), OrtMatMul(threads)
        cols["1 thread: ONNX Runtime (MLAS)"] = ort_1.product
    except ImportError:
        ort_1 = ort_n = None
        print("no ONNX Runtime columns: pip install onnxruntime onnx")

    ws = Workspace()  # our scratch (the weight gradients' partial sums), reused as in a model

    def ours(kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        if kind == "TN":
            out[...] = gemm.matmul_tn(a, b, alloc=ws)  # [m, n]: a weight, small
        else:
            gemm.matmul(a, b, alloc=lambda name, shape, dtype: out)  # written in place

    cols[f"{threads} threads: ours (OpenBLAS tiles)"] = ours

    def ours_on(name: str) -> Callable[..., Any]:
        def product(kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
            before = blas.current().name
            blas.use(name)  # every kernel on that BLAS
            try:
                ours(kind, a, b, out)
            finally:
                blas.use(before)

        return product

    if mkl is not None:
        cols[f"{threads} threads: ours (MKL tiles)"] = ours_on("mkl")
    if blis_ctx is not None:
        cols[f"{threads} threads: ours (BLIS tiles)"] = ours_on("blis")
    cols[f"{threads} threads: OpenBLAS"] = openblas
    if torch is not None:
        cols[f"{threads} threads: torch.mm"] = torch_mm
    if ort_n is not None:
        cols[f"{threads} threads: ONNX Runtime (MLAS)"] = ort_n.product
    return cols


@contextlib.contextmanager
def threads_of(name: str) -> Iterator[None]:
    """The column's thread count for BLAS and torch (from its name), held while it is timed."""
    n = int(name.split(" ")[0])
    with threadpool_limits(n, user_api="blas"):
        try:
            import torch
        except ImportError:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def time_column(product: Callable[..., Any], kind: str, a: np.ndarray, b: np.ndarray,
                out: np.ndarray) -> float:
    """Seconds per product: as many calls as fill ROUND_SECONDS (at least 2), timed together."""
    t0 = time.perf_counter()
    product(kind, a, b, out)
    once = time.perf_counter() - t0
    calls = max(2, int(ROUND_SECONDS / max(once, 1e-6)))
    t0 = time.perf_counter()
    for _ in range(calls):
        product(kind, a, b, out)
    return (time.perf_counter() - t0) / calls


#: The tilings tried for "tiles differ": row blocks of an NN product, column blocks of a TN one
#: (a weight gradient's rows are its sum: our kernels split those in blocks of a constant size).
ROW_TILES = (64, 256, 1000)
COL_TILES = (64, 128)


class OrtMatMul:
    """ONNX Runtime's product (MLAS, its own GEMM) as ORT runs a model's linear layer: ``b``
    (the weight) an initializer, packed once when the session is made, ``a`` an input of any
    rows; ``MatMul`` for NN, ``Gemm`` with transA for TN. One session per weight and kind,
    ``threads`` intra-op threads; the input and the output bound where they lie (IOBinding),
    so that a call allocates nothing."""

    def __init__(self, threads: int) -> None:
        import onnxruntime

        self.ort, self.threads = onnxruntime, threads
        # (kind, b's address, b's shape) -> (b, session): b held, so that no other array
        # takes its address while its session is cached
        self.sessions: dict[tuple[str, int, tuple[int, ...]], tuple[np.ndarray, Any]] = {}

    def _session(self, kind: str, b: np.ndarray, a_cols: int) -> Any:
        from onnx import TensorProto, helper, numpy_helper

        key = (kind, b.ctypes.data, b.shape)
        if key not in self.sessions:
            node = (helper.make_node("Gemm", ["a", "b"], ["y"], transA=1) if kind == "TN"
                    else helper.make_node("MatMul", ["a", "b"], ["y"]))
            a_shape = [a_cols, "rows"] if kind == "TN" else ["rows", a_cols]
            graph = helper.make_graph(
                [node], "product", [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", b.shape[1]])],
                [numpy_helper.from_array(np.ascontiguousarray(b), "b")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 9
            options = self.ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
            self.sessions[key] = (b, self.ort.InferenceSession(model.SerializeToString(), options,
                                                               providers=["CPUExecutionProvider"]))
        return self.sessions[key][1]

    def product(self, kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        """out = a @ b ("NN", a [m, k]) or a^T @ b ("TN", a [k, m]), all C-contiguous."""
        a = np.ascontiguousarray(a)
        assert out.flags.c_contiguous, "the output bound where it lies"
        session = self._session(kind, b, a.shape[0] if kind == "TN" else a.shape[1])
        binding = session.io_binding()
        binding.bind_input("a", "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
        binding.bind_output("y", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        session.run_with_iobinding(binding)


def tiles_differ(product: Callable[..., Any], kind: str, a: np.ndarray, b: np.ndarray,
                 whole: np.ndarray) -> bool:
    """Whether computing the product tile by tile, one call per tile (row blocks of ``a`` for
    NN, column blocks of ``b`` for TN), gives other bits than the one call that gave ``whole``:
    a library for which it does cannot serve tiles whose shape follows the thread count, as
    ours do, and keep the same bits on any number of threads."""
    m, n = whole.shape
    for size in ROW_TILES if kind == "NN" else COL_TILES:
        for lo in range(0, m if kind == "NN" else n, size):
            if kind == "NN":
                hi = min(m, lo + size)
                tile = np.empty((hi - lo, n), whole.dtype)
                product(kind, a[lo:hi], b, tile)
                same = np.array_equal(tile, whole[lo:hi])
            else:
                hi = min(n, lo + size)
                tile = np.empty((m, hi - lo), whole.dtype)
                product(kind, a, np.ascontiguousarray(b[:, lo:hi]), tile)
                same = np.array_equal(tile, whole[:, lo:hi])
            if not same:
                return True
    return False


def run_shape(cols: dict[str, Callable[..., Any]], kind: str, m: int, k: int, n: int,
              rounds: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if kind == "TN" else (m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    reference = np.empty((m, n), np.float32)
    np.dot(a.T if kind == "TN" else a, b, reference)
    scale = float(np.abs(reference).max())
    outs = {name: np.empty((m, n), np.float32) for name in cols}
    agree = {}
    for name, product in cols.items():  # warm-up (compiles ours), and the agreement
        with threads_of(name):
            product(kind, a, b, outs[name])
        agree[name] = float(np.abs(outs[name] - reference).max()) / scale
    differ = {}
    for name, product in cols.items():
        if name.startswith("1 thread") and m * k * n <= 1 << 30:  # not the square: slow, and no tile of ours
            with threads_of(name):
                differ[name] = tiles_differ(product, kind, a, b, outs[name])
    samples: dict[str, list[float]] = {name: [] for name in cols}
    names = list(cols)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
            time.sleep(SETTLE)
            with threads_of(name):
                seconds = time_column(cols[name], kind, a, b, outs[name])
            samples[name].append(gflops(m, k, n, seconds))
    return {"samples": samples, "agree": agree, "tiles differ": differ}


def fmt(xs: list[float]) -> str:
    return f"{np.median(xs):.0f} ({min(xs):.0f}–{max(xs):.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the many-thread columns")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    runtime.tune(args.threads)
    cols = libraries(args.threads)
    rows = []
    for what, kind, m, k, n in SHAPES:
        res = run_shape(cols, kind, m, k, n, args.rounds)
        rows.append((what, kind, m, k, n, res))
        print(f"  {kind} m {m} k {k} n {n}: " + ", ".join(
            f"{name} {np.median(s):.0f}" for name, s in res["samples"].items()), flush=True)
    names = list(cols)
    lines = ["| product | kind | m | k | n | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for what, kind, m, k, n, res in rows:
        cells = []
        for name in names:
            cell = fmt(res["samples"][name])
            if res["agree"][name] > 0:
                cell += f", agree {res['agree'][name]:.0e}"
            if res["tiles differ"].get(name):
                cell += ", **tiles differ**"
            cells.append(cell)
        lines.append(f"| {what} | {kind} | {m} | {k} | {n} | " + " | ".join(cells) + " |")
    base, ours_col = "1 thread: OpenBLAS", f"{args.threads} threads: ours (OpenBLAS tiles)"
    ratio_lines = []
    for name in names:
        if name == base or name == ours_col:
            continue
        against = base if name.startswith("1 thread") else ours_col
        ratios = [float(np.median(res["samples"][name]) / np.median(res["samples"][against]))
                  for *_, res in rows[:-1]]  # the seed's shapes, not the square
        ratio_lines.append(f"- {name} / {against}: {min(ratios):.2f}–{max(ratios):.2f} over the seed's "
                           f"shapes (median {np.median(ratios):.2f})")
    info = machine(args.threads, ("numpy", "numba", "torch", "mkl", "blis"))
    text = "\n".join([
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"- float32, {args.rounds} interleaved rounds after a warm-up; GFLOP/s median (min–max); "
        "agree = max |theirs - OpenBLAS| / max |OpenBLAS| where not 0; **tiles differ** (one-thread "
        f"columns): the product made one call per tile (row blocks of {', '.join(map(str, ROW_TILES))} "
        f"for NN, column blocks of {', '.join(map(str, COL_TILES))} for TN) does not give the whole "
        "call's bits, so that library needs tiles of a fixed shape under it (the kernels cut them for "
        "a fixed thread count on MKL, kernels/blas.py) to keep the same bits on any number of threads",
        "",
        *lines,
        "",
        "Speed against the same number of threads on OpenBLAS (median over rounds, per shape):",
        "",
        *ratio_lines,
    ])
    print(text)
    if args.markdown:
        header = ("# Performance: the products, library against library\n\n```sh\n"
                  "make bench-gemm   # benchmarks/bench_gemm.py --markdown docs/performance-gemm.md\n```\n\n"
                  "Written by that command (the method is in the script's docstring). One run on this "
                  "machine:\n\n")
        write_page(args.markdown, header, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
