"""Benchmark of the tiled attention kernel against the plain NumPy path and PyTorch's SDPA.

    python benchmarks/bench_attention.py            # the full grid (make bench-kernel), ~15 minutes
    python benchmarks/bench_attention.py --quick    # B = 1, N <= 64k

Every figure is measured in this run: the machine's sgemm peak (NumPy float32 matmul), then for
each shape the kernel, the plain path and torch, timed in interleaved rounds after a warm-up,
so that the ratios compare runs made under the same load. Times are min/median/max over the
rounds; a ratio is other_time / our_time per round, min/median/max over the rounds. Peak extra
memory is the growth of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) during one forward+backward, so Numba's own allocations count too.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
from _common import (  # benchmarks/
    compile_then_cached,
    finish_plot,
    reset_high_water,
    rss_high_water,
    rss_now,
)

from perceiver_np import attention as plain
from perceiver_np import kernels

H, DH = 4, 64
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


def sgemm_peak(repeats: int = 3) -> float:
    a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    a @ a
    best = min(timed(lambda: a @ a) for _ in range(repeats))
    return 2 * 4096**3 / best / 1e9


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


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads (Numba, torch)": str(numba.get_num_threads()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
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


def run_shape(m: int, b: int, n: int, repeats: int, torch_mod) -> dict:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, H, m, DH), dtype=np.float32)
    k = rng.standard_normal((b, H, n, DH), dtype=np.float32)
    v = rng.standard_normal((b, H, n, DH), dtype=np.float32)
    do = rng.standard_normal((b, H, m, DH), dtype=np.float32)
    flops = 4 * b * H * m * n * DH

    def ours_fwd():
        return kernels.attention_forward(q, k, v)

    def ours_fwd_bwd():
        o, lse = kernels.attention_forward(q, k, v)
        kernels.attention_backward(do, q, k, v, o, lse)

    def plain_fwd():
        return plain.attention_forward(q, k, v)

    def plain_fwd_bwd():
        o, lse = plain.attention_forward(q, k, v)
        plain.attention_backward(do, q, k, v, o, lse)

    contenders = {"ours": (ours_fwd, ours_fwd_bwd)}
    if b * H * m * n <= PLAIN_MAX_SCORES:
        contenders["numpy"] = (plain_fwd, plain_fwd_bwd)
    if torch_mod is not None:
        F = torch_mod.nn.functional
        tq, tk, tv, tdo = (torch_mod.from_numpy(a) for a in (q, k, v, do))
        tq2, tk2, tv2 = (torch_mod.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))

        def torch_fwd():
            with torch_mod.inference_mode():
                F.scaled_dot_product_attention(tq, tk, tv)

        def torch_fwd_bwd():
            out = F.scaled_dot_product_attention(tq2, tk2, tv2)
            out.backward(tdo)
            tq2.grad = tk2.grad = tv2.grad = None

        contenders["torch"] = (torch_fwd, torch_fwd_bwd)

    # peak extra memory of one forward+backward of each contender
    peak = {}
    for name, (_, fb) in contenders.items():
        fb()  # warm-up (and, for ours, the compiled-code load)
        gc.collect()
        base = rss_now()
        reset_high_water()
        fb()
        peak[name] = rss_high_water() - base
    times = {name: (Stats(), Stats()) for name in contenders}
    for _ in range(repeats):  # interleaved rounds: every contender sees the same load
        for name, (f, fb) in contenders.items():
            times[name][0].add(timed(f))
            times[name][1].add(timed(fb))
    ratios = {}
    for name in contenders:
        if name == "ours":
            continue
        ratios[name] = tuple(
            Stats([o / u for o, u in zip(times[name][i].samples, times["ours"][i].samples, strict=True)])
            for i in (0, 1)
        )
    return {"m": m, "b": b, "n": n, "flops": flops, "times": times, "ratios": ratios, "peak": peak}


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


def targets(rows: list[dict], peak_gflops: float, load: dict[str, float]) -> list[str]:
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
    peaks = [r["flops"] / r["times"]["ours"][0].median / 1e9 / peak_gflops
             for r in rows if r["m"] == 256 and r["n"] >= 1 << 16]
    if peaks:
        out.append(f">= 70% of sgemm peak in the forward at N >= 64k, M = 256: worst {100 * min(peaks):.0f}% "
                   f"-> {'PASS' if min(peaks) >= 0.7 else 'MISS'}")
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
    import perceiver_np

    perceiver_np.runtime.tune()  # the process-wide settings a CPU user of the CLI gets
    args = parser.parse_args(argv)

    try:
        import torch

        torch.set_num_threads(numba.get_num_threads())
    except ImportError:
        torch = None
        print("torch is not installed: no torch columns (pip install -e '.[bench]')")
    info = machine()
    peak = sgemm_peak()
    load = compile_and_load_times()
    rows = []
    for m, b, n in grid(args.quick):
        rows.append(run_shape(m, b, n, args.repeats, torch))
        r = rows[-1]
        print(f"  M {m} B {b} N {n}: ours fwd {r['times']['ours'][0].fmt()} ms", flush=True)
    report = [
        "machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"sgemm peak (NumPy float32 4096^3, best of 3, this run): {peak:.0f} GFLOP/s",
        f"kernels, fresh process: first-call compile {load['compile']:.1f} s, "
        f"cached load {load['cached load']:.2f} s (import + float32 forward + backward)",
        f"fp32, H = {H}, dh = {DH}, {args.repeats} interleaved rounds after a warm-up; "
        "times median (min–max) in ms; ratios = their time / our time per round, median (min–max); "
        "GFLOP/s: forward 4·B·H·M·N·dh, forward+backward 3.5x that",
        "",
        table(rows, peak),
        "",
        "targets:",
        *("- " + t for t in targets(rows, peak, load)),
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
