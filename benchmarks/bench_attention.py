"""Benchmark of the tiled attention kernel against the plain NumPy path and PyTorch's SDPA.

    python benchmarks/bench_attention.py            # the full grid (make bench-kernel), ~15 minutes
    python benchmarks/bench_attention.py --quick    # B = 1, N <= 64k

Every figure is measured in this run: the sgemm peaks of OpenBLAS (NumPy) and of torch's BLAS,
then for each shape the kernel, the plain path and torch's ``scaled_dot_product_attention``,
each in a fresh worker process of its own with the same thread count (perceiver_np with glibc's
default malloc and no allocator setting), timed in interleaved rounds after a warm-up, so that
the ratios compare runs made under the same load. Our kernel's tile products call the BLAS
``runtime.tune(blas="auto")`` picks for this CPU (``OURS_BLAS``, as bench_model's "ours").
Times are min/median/max over the rounds; a ratio is other_time / our_time per round,
min/median/max over the rounds. Peak extra memory is the growth of each worker's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) during one forward+backward, so
Numba's own allocations count too. The kernel is also timed on one thread (fresh workers) for
the scaling table.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
from _common import (  # benchmarks/
    WorkerProcess,
    best_peak,
    compile_then_cached,
    finish_plot,
    preferred_blas,
    reset_high_water,
    rss_high_water,
    rss_now,
    sgemm_peaks,
)

H, DH = 4, 64
#: The BLAS of our kernel's tile products (perceiver_np.kernels.blas), as bench_model's "ours":
#: the one kernels.blas.preferred() names for this CPU (MKL, BLIS or SciPy's; all in the bench extra).
OURS_BLAS = "auto"
PLAIN_MAX_SCORES = 1 << 28  # the plain path holds several [B, H, M, N] arrays: 1 GiB each at most
INPUT_MAX_BYTES = 4 << 30  # q, k, v together


@dataclass
class Stats:
    samples: list[float] = field(default_factory=list)

    def add(self, x: float) -> None:
        self.samples.append(x)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    def fmt(self, scale: float = 1e3, digits: int = 1) -> str:
        s = np.asarray(self.samples) * scale
        return f"{np.median(s):.{digits}f} ({s.min():.{digits}f}–{s.max():.{digits}f})"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


#: Shapes timed again on one thread (M, B, N): the kernel's speed-up from 1 thread to all of them.
SCALING_SHAPES = [(256, 1, 1 << 16), (64, 8, 1 << 14)]


def calls(system: str, m: int, b: int, n: int):
    """(forward, forward+backward) of ``system`` ("ours": the kernel, "numpy": the plain path,
    "torch": scaled_dot_product_attention) on random float32 inputs of one shape."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, H, m, DH), dtype=np.float32)
    k = rng.standard_normal((b, H, n, DH), dtype=np.float32)
    v = rng.standard_normal((b, H, n, DH), dtype=np.float32)
    do = rng.standard_normal((b, H, m, DH), dtype=np.float32)
    if system in ("ours", "numpy"):
        from perceiver_np import attention as plain
        from perceiver_np import kernels

        lib = kernels if system == "ours" else plain

        def fwd():
            lib.attention_forward(q, k, v)

        def fwd_bwd():
            o, lse = lib.attention_forward(q, k, v)
            lib.attention_backward(do, q, k, v, o, lse)

        return fwd, fwd_bwd
    import torch

    F = torch.nn.functional
    tq, tk, tv, tdo = (torch.from_numpy(a) for a in (q, k, v, do))
    tq2, tk2, tv2 = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))

    def torch_fwd():
        with torch.inference_mode():
            F.scaled_dot_product_attention(tq, tk, tv)

    def torch_fwd_bwd():
        out = F.scaled_dot_product_attention(tq2, tk2, tv2)
        out.backward(tdo)
        tq2.grad = tk2.grad = tv2.grad = None

    return torch_fwd, torch_fwd_bwd


def worker(system: str, threads: int) -> None:
    """A worker process: one system on ``threads`` threads; JSON requests on stdin
    (setup m b n / run which / peak), one JSON reply each on stdout."""
    if system == "torch":
        import torch

        torch.set_num_threads(threads)
    else:
        import perceiver_np

        # threads, as the CLI; glibc's default malloc (keep_memory=False); the tiles on OURS_BLAS
        tuned = perceiver_np.runtime.tune(threads, keep_memory=False, blas=OURS_BLAS)
        from perceiver_np.kernels import blas

        if tuned.blas != blas.preferred():
            raise RuntimeError(f"ours: asked for BLAS {OURS_BLAS!r} ({blas.preferred()!r}), "
                               f"runs on {tuned.blas!r}")
    out = sys.stdout
    sys.stdout = sys.stderr  # only the protocol on stdout
    fns = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            fns = None
            gc.collect()
            fns = calls(system, msg["m"], msg["b"], msg["n"])
            fns[1]()  # warm-up (and, for ours, the compiled code's load)
            gc.collect()
            base = rss_now()
            reset_high_water()
            fns[1]()
            reply = {"peak": rss_high_water() - base}
        else:
            assert fns is not None
            reply = {"time": timed(fns[0] if msg["which"] == "fwd" else fns[1])}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def Worker(system: str, threads: int) -> WorkerProcess:
    return WorkerProcess(__file__, [system, "--threads", str(threads)])


def paired(workers: dict, m: int, b: int, n: int, repeats: int) -> tuple[dict, dict]:
    """Set every worker up for one shape (its peak extra memory), then ``repeats`` interleaved
    rounds of forward and forward+backward, each worker going first in turn."""
    peak = {name: w.ask(cmd="setup", m=m, b=b, n=n)["peak"] for name, w in workers.items()}
    times = {name: (Stats(), Stats()) for name in workers}
    names = list(workers)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name][0].add(workers[name].ask(cmd="run", which="fwd")["time"])
            times[name][1].add(workers[name].ask(cmd="run", which="fwd_bwd")["time"])
    return times, peak


def scaling(repeats: int, threads: int) -> list[dict]:
    """The kernel's forward and forward+backward on 1 thread and on ``threads``, each in a fresh
    worker, interleaved rounds."""
    rows = []
    for m, b, n in SCALING_SHAPES:
        workers = {1: Worker("ours", 1), threads: Worker("ours", threads)}
        try:
            times, _ = paired(workers, m, b, n, repeats)
        finally:
            for w in workers.values():
                w.close()
        rows.append({"m": m, "b": b, "n": n, "times": times})
    return rows


def scaling_table(rows: list[dict], threads: int) -> str:
    lines = [f"| M | B | N | fwd ms, 1 thread | fwd ms, {threads} threads | speed-up | fwd+bwd ms, 1 thread "
             f"| fwd+bwd ms, {threads} threads | speed-up |", "|" + "---|" * 9]
    for r in rows:
        one, many = r["times"][1], r["times"][threads]
        lines.append(f"| {r['m']} | {r['b']} | {r['n'] >> 10}k | {one[0].fmt()} | {many[0].fmt()} "
                     f"| {one[0].median / many[0].median:.2f} | {one[1].fmt()} | {many[1].fmt()} "
                     f"| {one[1].median / many[1].median:.2f} |")
    return "\n".join(lines)


def compile_and_load_times() -> dict[str, float]:
    """First-call compile time with an empty Numba cache, then the cached load, each in a fresh
    process (import perceiver_np.kernels and one float32 forward+backward)."""
    script = textwrap.dedent("""
        import time
        t0 = time.perf_counter()
        import numpy as np
        from perceiver_np import kernels
        q = np.ones((1, 1, 3, 8), np.float32); k = np.ones((1, 1, 5, 8), np.float32)
        o, lse = kernels.attention_forward(q, k, k)
        t1 = time.perf_counter()
        kernels.attention_backward(o, q, k, k, o, lse)
        t2 = time.perf_counter()
        print(t1 - t0, t2 - t1)
    """)
    return {label: sum(times) for label, times in compile_then_cached(script).items()}


def machine(threads: int) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads (each worker: Numba, BLAS, torch)": str(threads),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "our kernel's BLAS": f"{OURS_BLAS}: {preferred_blas()}",
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed"
    return info


def grid(quick: bool) -> list[tuple[int, int, int]]:
    ns = [1 << 10, 1 << 12, 1 << 14, 1 << 16] + ([] if quick else [1 << 18, 1 << 20])
    shapes = []
    for m in (64, 256):
        for b in (1,) if quick else (1, 8):
            for n in ns:
                if 3 * b * H * n * DH * 4 > INPUT_MAX_BYTES:
                    continue
                if b * H * m * n * DH * 4 > 2e12:  # forward over 2 TFLOP: minutes per shape
                    continue
                shapes.append((m, b, n))
    return shapes


def run_shape(m: int, b: int, n: int, repeats: int, threads: int, with_torch: bool) -> dict:
    systems = ["ours"]
    if b * H * m * n <= PLAIN_MAX_SCORES:
        systems.append("numpy")
    if with_torch:
        systems.append("torch")
    workers = {name: Worker(name, threads) for name in systems}
    try:
        times, peak = paired(workers, m, b, n, repeats)
    finally:
        for w in workers.values():
            w.close()
    ours = times["ours"]
    ratios = {
        name: tuple(Stats([o / u for o, u in zip(times[name][i].samples, ours[i].samples, strict=True)])
                    for i in (0, 1))
        for name in systems if name != "ours"
    }
    return {"m": m, "b": b, "n": n, "flops": 4 * b * H * m * n * DH, "times": times, "ratios": ratios,
            "peak": peak}


def table(rows: list[dict], peak_gflops: float) -> str:
    head = ("| M | B | N | ours fwd ms | fwd GFLOP/s | % sgemm peak | ours fwd+bwd ms | fwd+bwd GFLOP/s "
            "| peak extra MB (ours / numpy / torch) | vs numpy fwd | vs numpy fwd+bwd | vs torch fwd "
            "| vs torch fwd+bwd |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        f, fb = r["times"]["ours"]
        gf = r["flops"] / f.median / 1e9
        gfb = 3.5 * r["flops"] / fb.median / 1e9
        mem = " / ".join(
            f"{r['peak'][k] / 2**20:.0f}" if k in r["peak"] else "–" for k in ("ours", "numpy", "torch")
        )

        def ratio(name: str, i: int, r: dict = r) -> str:
            return r["ratios"][name][i].fmt(scale=1, digits=2) if name in r["ratios"] else "–"

        n = r["n"]
        n_txt = f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}k"
        lines.append(
            f"| {r['m']} | {r['b']} | {n_txt} | {f.fmt()} | {gf:.0f} | {100 * gf / peak_gflops:.0f}% "
            f"| {fb.fmt()} | {gfb:.0f} | {mem} | {ratio('numpy', 0)} | {ratio('numpy', 1)} "
            f"| {ratio('torch', 0)} | {ratio('torch', 1)} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict], peaks: dict[str, float], load: dict[str, float]) -> list[str]:
    out = []

    def med(r, name, i):
        return r["ratios"][name][i].median

    big = [r for r in rows if r["n"] >= 1 << 14 and "torch" in r["ratios"]]
    if big:
        worst_f = min(big, key=lambda r: med(r, "torch", 0))
        worst_fb = min(big, key=lambda r: med(r, "torch", 1))
        out.append(f"forward >= 1.3x torch for N >= 16k: worst {med(worst_f, 'torch', 0):.2f}x "
                   f"(M {worst_f['m']}, B {worst_f['b']}, N {worst_f['n']}) -> "
                   f"{'PASS' if med(worst_f, 'torch', 0) >= 1.3 else 'MISS'}")
        out.append(f"forward+backward >= 1.25x torch for N >= 16k: worst {med(worst_fb, 'torch', 1):.2f}x "
                   f"(M {worst_fb['m']}, B {worst_fb['b']}, N {worst_fb['n']}) -> "
                   f"{'PASS' if med(worst_fb, 'torch', 1) >= 1.25 else 'MISS'}")
    best = max(peaks.values())
    fracs = [(r["flops"] / r["times"]["ours"][0].median / 1e9 / best, r) for r in rows if r["n"] >= 1 << 14]
    if fracs:
        worst, r = min(fracs, key=lambda fr: fr[0])
        out.append(f">= 85% of the best sgemm here ({best:.0f} GFLOP/s, {max(peaks, key=peaks.get)}) in "
                   f"the forward at N >= 16k: worst {100 * worst:.0f}% (M {r['m']}, B {r['b']}, N {r['n']}) "
                   f"-> {'PASS' if worst >= 0.85 else 'MISS'}")
    per_flop = []
    for r64 in (r for r in rows if r["m"] == 64 and r["n"] >= 1 << 14):
        r256 = next((r for r in rows if r["m"] == 256 and r["b"] == r64["b"] and r["n"] == r64["n"]), None)
        if r256 is not None:
            rate = [r["flops"] / r["times"]["ours"][0].median for r in (r64, r256)]
            per_flop.append((rate[0] / rate[1], r64))
    if per_flop:
        worst, r = min(per_flop, key=lambda fr: fr[0])
        out.append("M = 64 as fast per FLOP as M = 256 (forward GFLOP/s ratio >= 0.95, same B and N, "
                   f"N >= 16k): worst {worst:.2f} (B {r['b']}, N {r['n']}) -> "
                   f"{'PASS' if worst >= 0.95 else 'MISS'}")
    np64 = [r for r in rows if r["m"] == 256 and r["n"] == 1 << 16 and "numpy" in r["ratios"]]
    for r in np64:
        out.append(f">= 2x the plain path at N = 64k, M = 256, B = {r['b']}: fwd {med(r, 'numpy', 0):.2f}x, "
                   f"fwd+bwd {med(r, 'numpy', 1):.2f}x -> "
                   f"{'PASS' if min(med(r, 'numpy', 0), med(r, 'numpy', 1)) >= 2 else 'MISS'}")
    for m in (64, 256):
        for b in (1, 8):
            series = sorted((r for r in rows if r["m"] == m and r["b"] == b and r["n"] >= 1 << 14),
                            key=lambda r: r["n"])
            growth = [
                s2["times"]["ours"][0].median / s1["times"]["ours"][0].median
                for s1, s2 in itertools.pairwise(series)
                if s2["n"] == 4 * s1["n"]
            ]
            if growth:
                out.append(f"linear scaling, M {m}, B {b}: time(4N)/time(N) max {max(growth):.2f} "
                           f"-> {'PASS' if max(growth) <= 4.4 else 'MISS'}")
    out.append(f"cached load under 2 s: {load['cached load']:.2f} s -> "
               f"{'PASS' if load['cached load'] < 2 else 'MISS'}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, m in zip(axes, (64, 256), strict=True):
        for name, style in (("ours", "o-"), ("numpy", "s--"), ("torch", "^-.")):
            pts = [(r["n"], r["times"][name][0].median if name == "ours" else
                    r["times"]["ours"][0].median * r["ratios"][name][0].median)
                   for r in rows if r["m"] == m and r["b"] == 1 and (name == "ours" or name in r["ratios"])]
            if pts:
                ns, ts = zip(*pts, strict=True)
                ax.loglog(ns, np.asarray(ts) * 1e3, style, label={"ours": "perceiver_np kernel",
                          "numpy": "plain NumPy path", "torch": "torch SDPA"}[name])
        ax.set_title(f"forward, fp32, B = 1, H = {H}, M = {m}, dh = {DH}")
        ax.set_xlabel("N (keys)")
    finish_plot(fig, axes, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="B = 1 and N <= 64k only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--plot", type=Path, help="write the time-vs-N plot (PNG) here")
    parser.add_argument("--json", type=Path, help="write the raw samples here")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="each worker's threads")
    parser.add_argument("--worker", choices=("ours", "numpy", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads)
        return 0
    threads = args.threads
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
        print("torch is not installed: no torch columns (pip install -e '.[bench]')")
    info = machine(threads)
    peaks = sgemm_peaks(threads)
    peak_name, peak = best_peak(peaks)
    load = compile_and_load_times()
    rows = []
    for m, b, n in grid(args.quick):
        rows.append(run_shape(m, b, n, args.repeats, threads, torch is not None))
        r = rows[-1]
        print(f"  M {m} B {b} N {n}: ours fwd {r['times']['ours'][0].fmt()} ms", flush=True)
    scale_rows = scaling(args.repeats, threads)
    report = [
        "machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "sgemm peaks (float32 4096^3, best of 3, this run): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
        + f"; % sgemm peak below is against the best, {peak_name}",
        f"kernels, fresh process: first-call compile {load['compile']:.1f} s, "
        f"cached load {load['cached load']:.2f} s (import + float32 forward + backward)",
        f"fp32, H = {H}, dh = {DH}, {args.repeats} interleaved rounds after a warm-up; "
        "times median (min–max) in ms; ratios = their time / our time per round, median (min–max); "
        "GFLOP/s: forward 4·B·H·M·N·dh, forward+backward 3.5x that",
        "",
        table(rows, peak),
        "",
        f"Scaling: the kernel on 1 thread and on {threads}, each in a fresh worker, interleaved "
        "rounds (a work item is one (sample, head, query block, key split), so a machine with more "
        "cores gets more items in flight; the splits are a constant, not the thread count):",
        "",
        scaling_table(scale_rows, threads),
        "",
        "targets:",
        *("- " + t for t in targets(rows, peaks, load)),
    ]
    text = "\n".join(report)
    print(text)
    if args.markdown:
        header = ("# Performance of the tiled attention kernel\n\n```sh\nmake bench-kernel   "
                  "# benchmarks/bench_attention.py --markdown docs/performance-kernel.md "
                  "--plot docs/attention_time.png\n```\n\nWritten by that command; the plot is "
                  "![forward time against N](attention_time.png). One run on this machine:\n\n")
        lines = text.splitlines()
        args.markdown.write_text(header + "\n".join(f"- {ln}" if i < 4 else ln
                                                     for i, ln in enumerate(lines)) + "\n")
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps([
            {**{k: r[k] for k in ("m", "b", "n", "flops", "peak")},
             "times": {k: [s.samples for s in v] for k, v in r["times"].items()}} for r in rows
        ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
