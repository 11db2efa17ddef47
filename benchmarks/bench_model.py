"""Head-to-head: the whole seed model, perceiver_np against the same model in PyTorch.

    python benchmarks/bench_model.py                 # the full grid (make bench), ~10 minutes
    python benchmarks/bench_model.py --quick         # smaller shapes, fewer rounds

Both systems run the seed configuration (input_dim 287, D 256, M 64, 4 self layers, 4 heads,
float32) with the same weights: perceiver_np's ``pnp.build(input_dim=287)`` and the test
suite's PyTorch implementation (tests/torch_reference.py) in its ``fused=True`` form (F.linear,
F.layer_norm, F.gelu, scaled_dot_product_attention: the model a PyTorch user would write),
eager, under ``torch.inference_mode`` for inference. Each system lives in a worker process of its
own (fresh for every shape), with its own thread pool set to the same number of threads; the
driver asks them for one run at a time, each going first in turn, so each round's times are taken
under the same load and their ratio (torch time / our time) is paired. Every system runs with
glibc's default malloc, perceiver_np too (``runtime.tune(keep_memory=False)``: its inference
engine reuses buffers of its own, perceiver_np.workspace); a third worker runs torch with freed
memory kept (perceiver_np.memory's process-wide setting), to show what that setting alone gives
torch. Every figure is from this run:

- the machine's sgemm peak (NumPy float32 4096^3, best of 3) and each system's FLOP/s against it
  (the model's FLOPs from ``perceiver_np.cost.forward_flops``; a training step counted as 3x the
  forward's, the backward's two products per forward product);
- peak RSS: each worker's resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs before the shape), so inputs, activations and the libraries all count;
- the outputs (inference) or the first step's loss (training) of the two systems, compared, so
  the two really compute the same model;
- the first-call JIT compile and the cached load of perceiver_np, each in a fresh process.

Inference at B = 1 streams the input for ours (``encode_stream`` over ``NpyChunks``, the file
read chunk by chunk) and hands torch the whole array already in memory (its load not timed).
The training step is forward, cross-entropy over the pooled 256 features as logits, backward
and AdamW (the same decay mask), with dropout 0 in both.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import competitors
import numpy as np
from _common import (  # benchmarks/
    WorkerProcess,
    best_peak,
    compile_then_cached,
    finish_plot,
    machine,
    paired_times,
    preferred_blas,
    reset_high_water,
    rss_high_water,
    rss_now,
    sgemm_peaks,
    write_page,
)
from competitors import inputs, labels

ROOT = Path(__file__).resolve().parents[1]
SEED = {"input_dim": 287, "dtype": "float32"}
INFER_B32 = [256, 1024, 4096, 16384]
STREAM_B1 = [1 << 16, 1 << 18, 1 << 20]
TRAIN_B32 = [256, 1024, 4096]
CHUNK = 1 << 16  # positions per piece when writing the input files
#: Seconds of quiet before each timed run: long enough for the other system's thread pools to
#: stop spinning (OpenBLAS spins ~0.1 s after a product, OpenMP less) and go to sleep.
SETTLE = 0.25


# ---- the workers ---------------------------------------------------------------------------




class Ours:
    def __init__(self, threads: int) -> None:
        import perceiver_np as pnp
        from perceiver_np import optim, train

        # threads, as the CLI; freed memory is not kept (PERCEIVER_NP_KEEP_MEMORY=0 from
        # SYSTEMS): the speed must not come from a process-wide allocator setting
        tuned = pnp.runtime.tune(threads)  # and the BLAS of PERCEIVER_NP_BLAS (SYSTEMS)
        want = os.environ.get("PERCEIVER_NP_BLAS") or tuned.blas
        if want == pnp.runtime.AUTO:
            from perceiver_np.kernels import blas

            want = blas.preferred()
        if tuned.blas != want:
            raise RuntimeError(f"ours: asked for BLAS {want!r}, runs on {tuned.blas!r} "
                               "(make bench-model installs the bench extra, mkl and blis included)")
        self.pnp, self.optim, self.train = pnp, optim, train
        self.model = pnp.build(**SEED, dropout=0.0)
        self.job: Any = None

    def setup(self, kind: str, b: int, n: int, path: str | None) -> None:
        from perceiver_np.stream import NpyChunks

        if kind == "infer":
            x = inputs(b, n)
            self.job = lambda: self.model(x)
        elif kind == "stream":
            chunks = NpyChunks(path)  # STREAM_CHUNK_POSITIONS positions at a time
            self.job = lambda: self.model.encode_stream(chunks)
        else:
            model = self.pnp.build(**SEED, dropout=0.0)
            batch = {"x": inputs(b, n), "y": labels(b)}
            opt = self.optim.adamw(1e-4)
            loss = self.train.Loss("cross_entropy")
            state = [self.train.init_state(model, opt)]
            rng = np.random.default_rng(0)

            def step() -> np.ndarray:
                value, _, state[0] = self.train.train_step(model, batch, loss, opt, state[0], rng)
                return np.array([value])

            self.job = step

    def run(self) -> np.ndarray:
        return np.asarray(self.job())


class Torch:
    def __init__(self, threads: int) -> None:
        import torch

        sys.path.insert(0, str(ROOT))
        import perceiver_np as pnp
        from tests import torch_reference

        torch.set_num_threads(threads)
        if os.environ.get("PERCEIVER_NP_KEEP_MEMORY") == "1":
            pnp.memory.keep_freed_memory(True)
        self.torch, self.ref = torch, torch_reference
        self.params = pnp.build(**SEED, dropout=0.0).params
        self.job: Any = None

    def setup(self, kind: str, b: int, n: int, path: str | None) -> None:
        torch, ref = self.torch, self.ref

        if kind in ("infer", "stream"):
            x = torch.from_numpy(inputs(b, n) if kind == "infer" else np.load(path))
            tp = {k: torch.from_numpy(v) for k, v in self.params.items()}

            def infer() -> np.ndarray:
                with torch.inference_mode():
                    return ref.forward(tp, x, fused=True).numpy()

            self.job = infer
        else:
            x, y = torch.from_numpy(inputs(b, n)), torch.from_numpy(labels(b))
            tp = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in self.params.items()}
            def loss(xb: Any, yb: Any) -> Any:
                return torch.nn.functional.cross_entropy(ref.forward(tp, xb, fused=True), yb)

            self.job = competitors.adamw_step(tp, loss, x, y)

    def run(self) -> np.ndarray:
        return np.asarray(self.job())


def worker(system: str, threads: int) -> None:
    impl: Any
    if system == "ours":
        impl = Ours(threads)
    elif system == "torch":
        impl = Torch(threads)
    else:
        impl = competitors.INFERENCE[system](threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # only the protocol on stdout
    for line in sys.stdin:
        msg = json.loads(line)
        reply: dict[str, Any] = {}
        if msg["cmd"] == "setup":
            impl.job = None
            gc.collect()
            impl.setup(msg["kind"], msg["b"], msg["n"], msg.get("path"))
            reset_high_water()  # the high-water mark starts here
            reply = {"rss": rss_now()}
        elif msg["cmd"] == "run":
            t0 = time.perf_counter()
            y = impl.run()
            reply = {"time": time.perf_counter() - t0, "y": y.reshape(-1)[:4096].astype(float).tolist()}
        elif msg["cmd"] == "peak":
            reply = {"peak": rss_high_water()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---- the driver ----------------------------------------------------------------------------


#: The systems, each with the values of PERCEIVER_NP_KEEP_MEMORY and PERCEIVER_NP_BLAS its worker
#: gets: perceiver_np (runtime.tune(), glibc's default malloc, the kernels' products on the
#: BLAS that PERCEIVER_NP_BLAS=auto picks for this CPU, kernels.blas.preferred(): MKL on Intel,
#: BLIS on another CPU with full-width AVX-512, else SciPy's; MKL and BLIS in the bench extra);
#: torch as a PyTorch user runs it (glibc's default malloc); torch with freed memory kept too, to
#: show what the allocator setting alone is worth to torch; and the competitors of
#: benchmarks/competitors.py (torch.compile frozen and not, ONNX Runtime, OpenVINO with both
#: performance hints, JAX jit), with glibc's default malloc; ours with freed memory kept, to show
#: that our speed does not come from that setting; and ours on SciPy's OpenBLAS (what an untuned
#: process uses) and on BLIS, to show what each BLAS gives (the one that "auto" picks is ours
#: itself and is left out: ``same_as_ours`` in main()).
SYSTEMS = {"ours": ("ours", "0", "auto"), "torch": ("torch", "0", ""), "torch_kept": ("torch", "1", ""),
           **{name: (name, "0", "") for name in competitors.INFERENCE}, "ours_kept": ("ours", "1", "auto"),
           "ours_openblas": ("ours", "0", "scipy"), "ours_blis": ("ours", "0", "blis")}
#: Our own variants: columns of the competitors' table, but never "the fastest competitor".
OURS_VARIANTS = ("ours_kept", "ours_openblas", "ours_blis")
#: The variants that run ours on another BLAS than "auto" picks, and that BLAS.
BLAS_VARIANTS = {"ours_openblas": "scipy", "ours_blis": "blis"}
#: Which systems run each kind of shape: the inference runtimes have no training step.
KIND_SYSTEMS = {"infer": list(SYSTEMS), "stream": list(SYSTEMS),
                "train": ["ours", "torch", "torch_kept", *competitors.TRAINING, *OURS_VARIANTS]}
#: Short column names of the competitors' table.
LABELS = {"ours_kept": "ours, memory kept", "ours_openblas": "ours on OpenBLAS", "ours_blis": "ours on BLIS",
          "torch": "torch eager", "torch_kept": "torch eager, memory kept", "torch_compile": "torch.compile",
          "torch_compile_frozen": "torch.compile frozen", "onnxruntime": "ONNX Runtime",
          "openvino_latency": "OpenVINO latency", "openvino_throughput": "OpenVINO throughput",
          "jax": "JAX jit"}


def Worker(system: str, threads: int) -> WorkerProcess:
    impl, keep, blas = SYSTEMS[system]
    return WorkerProcess(__file__, [impl, "--threads", str(threads)],
                         {"PERCEIVER_NP_KEEP_MEMORY": keep, "PERCEIVER_NP_BLAS": blas})


def compile_and_load() -> dict[str, float]:
    """Import, build the seed model, one forward and one training step, in a fresh process
    with an empty Numba cache (compile), then again with that cache (cached load)."""
    script = textwrap.dedent("""
        import time
        t0 = time.perf_counter()
        import numpy as np
        import perceiver_np as pnp
        from perceiver_np import optim, train
        m = pnp.build(input_dim=287, dropout=0.0)
        x = np.ones((1, 300, 287), np.float32)
        m(x)
        t1 = time.perf_counter()
        opt = optim.adamw(1e-3)
        train.train_step(m, {"x": x, "y": np.zeros(1, int)}, train.Loss(), opt,
                         train.init_state(m, opt), np.random.default_rng(0))
        t2 = time.perf_counter()
        print(t1 - t0, t2 - t1)
    """)
    out = {}
    for label, (infer, step) in compile_then_cached(script, ROOT).items():
        out[label + " (inference)"] = infer
        out[label + " (training step)"] = step
    return out


def write_npy(path: Path, n: int) -> None:
    """[1, n, 287] float32 standard normal, written in pieces (never whole in memory)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1, n, SEED["input_dim"]))
    rng = np.random.default_rng(n)
    for i in range(0, n, CHUNK):
        arr[0, i:i + CHUNK] = rng.standard_normal((min(CHUNK, n - i), SEED["input_dim"]), dtype=np.float32)
    arr.flush()
    del arr


def stats(xs: list[float]) -> tuple[float, float, float]:
    a = np.asarray(xs)
    return float(np.min(a)), float(np.median(a)), float(np.max(a))


def fmt3(t: tuple[float, float, float], scale: float = 1.0, digits: int = 2) -> str:
    lo, med, hi = (v * scale for v in t)
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


#: The systems of every shape's first group; the competitors run paired with ours afterwards.
BASE = ("ours", "torch", "torch_kept")


#: Shapes timed on 1 thread and on all of them (kind, N at B = 32).
SCALING_SHAPES = [("infer", 1024), ("train", 256)]


def scaling_table(rows: list[tuple[str, int, dict[Any, list[float]]]], threads: int) -> str:
    """Ours on 1 thread against ``threads``: times median (min–max), speed-up of the medians."""
    lines = [f"| run | B | N | ours ms, 1 thread | ours ms, {threads} threads | speed-up |",
             "|---|---|---|---|---|---|"]
    for kind, n, times in rows:
        one, many = stats(times[1]), stats(times[threads])
        run = "inference" if kind == "infer" else "training step"
        lines.append(f"| {run} | 32 | {n} | {fmt3(one, 1e3, 0)} | {fmt3(many, 1e3, 0)} "
                     f"| {one[1] / many[1]:.2f} |")
    return "\n".join(lines)


def run_pair(workers: dict[str, Worker], kind: str, b: int, n: int, rounds: int,
             path: str | None) -> dict[str, Any]:
    """Ours and one competitor, paired rounds: their outputs (the first, warm-up run) and their
    times."""
    for w in workers.values():
        w.ask(cmd="setup", kind=kind, b=b, n=n, path=path)
    first = {k: np.asarray(w.ask(cmd="run")["y"]) for k, w in workers.items()}
    return {"first": first, "times": paired_times(workers, rounds, SETTLE)}


def add_competitor(row: dict[str, Any], name: str, pair: dict[str, Any]) -> None:
    """The competitor's ratio (its time / ours in the same round) and agreement (against torch's
    output of the first group) into the shape's row."""
    theirs, ours = pair["times"][name], pair["times"]["ours"]
    row["ratios_all"][name] = [t / o for t, o in zip(theirs, ours, strict=True)]
    yt = np.asarray(row["y_torch"])
    scale = max(float(np.max(np.abs(yt))), 1e-30)
    row["agree_all"][name] = float(np.max(np.abs(pair["first"][name] - yt)) / scale)
    ratio = fmt3(stats(row["ratios_all"][name]))
    print(f"    {LABELS[name]}: {fmt3(stats(theirs), 1e3, 0)} ms, ratio {ratio}", flush=True)


def run_shape(workers: dict[str, Worker], kind: str, b: int, n: int, rounds: int,
              path: str | None, flops: float, peak: float) -> dict[str, Any]:
    rss = {k: w.ask(cmd="setup", kind=kind, b=b, n=n, path=path)["rss"] for k, w in workers.items()}
    first = {k: np.asarray(w.ask(cmd="run")["y"]) for k, w in workers.items()}  # warm-up, the check
    yt = first["torch"]
    agree = float(np.max(np.abs(first["ours"] - yt)) / max(float(np.max(np.abs(yt))), 1e-30))
    agree_all = {k: float(np.max(np.abs(v - yt)) / max(float(np.max(np.abs(yt))), 1e-30))
                 for k, v in first.items() if k != "torch"}
    times = paired_times(workers, rounds, SETTLE)
    peaks = {k: w.ask(cmd="peak")["peak"] for k, w in workers.items()}
    ratios = {k: [t / o for t, o in zip(times[k], times["ours"], strict=True)]
              for k in workers if k != "ours"}
    row = {"kind": kind, "b": b, "n": n, "times": times, "ratios": ratios["torch"],
           "ratios_kept": ratios["torch_kept"], "ratios_all": ratios, "agree_all": agree_all,
           "peak": peaks, "rss_before": rss, "agree": agree, "y_torch": yt.tolist(),
           "flops": flops,
           "fraction": {k: flops / float(np.median(v)) / (peak * 1e9) for k, v in times.items()}}
    print(f"  {kind} B {b} N {n}: ours {fmt3(stats(times['ours']), 1e3, 0)} ms, torch "
          f"{fmt3(stats(times['torch']), 1e3, 0)} ms, ratio {fmt3(stats(ratios['torch']))}; torch, "
          f"memory kept {fmt3(stats(times['torch_kept']), 1e3, 0)} ms", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | B | N | ours ms | torch ms | ours tokens/s | torch tokens/s | ratio torch/ours "
            "| ours % peak | torch % peak | peak RSS MB ours / torch | ours extra MB | outputs agree "
            "| torch, memory kept: ms | ratio |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    names = {"infer": "inference", "stream": "inference (ours streaming)", "train": "training step"}
    for r in rows:
        to, tt = stats(r["times"]["ours"]), stats(r["times"]["torch"])
        tokens = r["b"] * r["n"]
        out.append(
            f"| {names[r['kind']]} | {r['b']} | {r['n']} | {fmt3(to, 1e3, 0)} | {fmt3(tt, 1e3, 0)} "
            f"| {tokens / to[1]:,.0f} | {tokens / tt[1]:,.0f} | {fmt3(stats(r['ratios']))} "
            f"| {100 * r['fraction']['ours']:.0f}% | {100 * r['fraction']['torch']:.0f}% "
            f"| {r['peak']['ours'] / 2**20:,.0f} / {r['peak']['torch'] / 2**20:,.0f} "
            f"| {(r['peak']['ours'] - r['rss_before']['ours']) / 2**20:,.0f} | {r['agree']:.1e} "
            f"| {fmt3(stats(r['times']['torch_kept']), 1e3, 0)} | {fmt3(stats(r['ratios_kept']))} |"
        )
    return "\n".join(out)


def competitor_table(rows: list[dict[str, Any]]) -> str:
    names = [k for k in LABELS if any(k in r["ratios_all"] for r in rows)]
    head = "| run | B | N | ours ms | " + " | ".join(LABELS[k] for k in names) + " |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    kinds = {"infer": "inference", "stream": "inference (ours streaming)", "train": "training step"}
    for r in rows:
        cells = [f"{fmt3(stats(r['ratios_all'][k]))}" + (f", agree {r['agree_all'][k]:.0e}"
                                                         if k in r["agree_all"] else "")
                 if k in r["ratios_all"] else "–" for k in names]
        ours = fmt3(stats(r["times"]["ours"]), 1e3, 0)
        out.append(f"| {kinds[r['kind']]} | {r['b']} | {r['n']} | {ours} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets(rows: list[dict[str, Any]], load: dict[str, float]) -> list[str]:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    out = []
    for r in rows:  # issue 14: >= 1.10x the fastest competitor (inference), torch and compile (training)
        others = {k: float(np.median(v)) for k, v in r["ratios_all"].items() if k not in OURS_VARIANTS
                  and (r["kind"] != "train" or k in ("torch", "torch_kept", "torch_compile"))}
        if not others:
            continue
        fastest = min(others, key=others.__getitem__)
        out.append(f"{r['kind']} B {r['b']} N {r['n']}: >= 1.10x the fastest of "
                   f"{len(others)} competitors, {LABELS[fastest]}: {others[fastest]:.2f}x -> "
                   f"{verdict(others[fastest] >= 1.10)}")
    kept = [(float(np.median(r["ratios_all"]["ours_kept"])), r)
            for r in rows if "ours_kept" in r["ratios_all"]]
    for kind in ("inference", "training"):
        mine = [(q, r) for q, r in kept if (r["kind"] == "train") == (kind == "training")]
        if mine:  # ratio = (ours with memory kept) time / ours: below 1 the setting would make us faster
            q, r = min(mine, key=lambda qr: qr[0])
            out.append(f"{kind} speed not from a process-wide allocator setting: ours with freed memory "
                       f"kept / ours >= 0.95 at every shape: worst {q:.2f} "
                       f"({r['kind']} B {r['b']} N {r['n']}) -> {verdict(q >= 0.95)}")
    for variant in BLAS_VARIANTS:  # ratio = ours on that BLAS / ours (on what tune(blas="auto") picks)
        gains = [(float(np.median(r["ratios_all"][variant])), r) for r in rows if variant in r["ratios_all"]]
        if gains:
            lo, hi = min(gains, key=lambda qr: qr[0]), max(gains, key=lambda qr: qr[0])
            out.append(f"the products on {preferred_blas()} (not a target): {LABELS[variant]} / ours "
                       f"from {lo[0]:.2f} ({lo[1]['kind']} B {lo[1]['b']} N {lo[1]['n']}) to {hi[0]:.2f} "
                       f"({hi[1]['kind']} B {hi[1]['b']} N {hi[1]['n']})")
    infer = [r for r in rows if r["kind"] in ("infer", "stream")]
    train = [r for r in rows if r["kind"] == "train"]
    if infer:
        worst = min(infer, key=lambda r: float(np.median(r["ratios"])))
        w = float(np.median(worst["ratios"]))
        out.append(f"inference >= 1.0x torch at every shape: worst median {w:.2f}x "
                   f"({worst['kind']} B {worst['b']} N {worst['n']}) -> {verdict(w >= 1.0)}")
        big = [r for r in infer if r["n"] >= 4096]
        if big:
            f = min(r["fraction"]["ours"] for r in big)
            out.append(f"inference >= 60% of the sgemm peak at N >= 4k: worst {100 * f:.0f}% -> "
                       f"{verdict(f >= 0.6)}")
    for r in rows:
        if r["kind"] == "stream" and r["n"] == 1 << 20:
            q = r["peak"]["ours"] / r["peak"]["torch"]
            out.append(f"B = 1, N = 1M: our streaming peak RSS {r['peak']['ours'] / 2**20:,.0f} MB = "
                       f"{q:.2f} of torch's {r['peak']['torch'] / 2**20:,.0f} MB (<= 0.25) -> "
                       f"{verdict(q <= 0.25)}")
            extra = (r["peak"]["ours"] - r["rss_before"]["ours"]) / 2**20
            out.append(f"B = 1, N = 1M (1.1 GB on disk): extra memory of the streaming encoder over "
                       f"the idle worker {extra:,.0f} MB (< 256) -> {verdict(extra < 256)}")
    if train:
        worst = min(train, key=lambda r: float(np.median(r["ratios"])))
        w = float(np.median(worst["ratios"]))
        out.append(f"training step >= 0.75x torch (goal 1.0x): worst median {w:.2f}x "
                   f"(B {worst['b']} N {worst['n']}) -> {verdict(w >= 0.75)}")
    for kind, b in (("infer", 32), ("stream", 1)):
        series = sorted((r for r in rows if r["kind"] == kind and r["b"] == b and r["n"] >= 4096),
                        key=lambda r: r["n"])
        growth = [float(np.median(c["times"]["ours"]) / np.median(a["times"]["ours"]))
                  for a, c in itertools.pairwise(series) if c["n"] == 4 * a["n"]]
        if growth:
            out.append(f"linear in N ({kind}, B {b}): time(4N)/time(N) max {max(growth):.2f} (<= 4.4) "
                       f"-> {verdict(max(growth) <= 4.4)}")
    out.append("first-call compile and cached load, fresh processes: " +
               ", ".join(f"{k} {v:.1f} s" for k, v in load.items()))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    titles = {("infer", 32): "inference, B = 32", ("stream", 1): "inference, B = 1 (ours streaming)",
              ("train", 32): "training step, B = 32"}
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        series = sorted((r for r in rows if (r["kind"], r["b"]) == key), key=lambda r: r["n"])
        if not series:
            continue
        ns = [r["n"] for r in series]
        for name, style, label in (("ours", "o-", "perceiver_np"), ("torch", "^--", "PyTorch eager"),
                                   ("torch_kept", "v:", "PyTorch eager, freed memory kept")):
            ax.loglog(ns, [1e3 * float(np.median(r["times"][name])) for r in series], style, label=label)
        ax.set_title(title)
        ax.set_xlabel("N (input length)")
        ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
    finish_plot(fig, axes, path)


def write_markdown(path: Path, text: str) -> None:
    write_page(path, "# Performance: the whole model against the CPU runtimes\n\n```sh\nmake bench   "
               "# benchmarks/bench_model.py --markdown docs/performance.md --plot docs/model_time.png\n"
               "```\n\nWritten by that command (the method is in the script's docstring): the seed model "
               "in perceiver_np against PyTorch eager, torch.compile, ONNX Runtime, OpenVINO and JAX, "
               "each in fresh processes with the same threads, perceiver_np with glibc's default malloc "
               "(no process-wide allocator setting). The plot is "
               "![time against N, both systems](model_time.png). The tiled attention kernel on its "
               "own: [performance-kernel.md](performance-kernel.md). One run on this machine:\n\n", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N <= 4k (B = 32) and <= 256k (B = 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-n", type=int, default=None, help="leave out shapes with a larger N")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--kinds", default="infer,stream,train",
                        help="comma-separated subset of infer (B = 32), stream (B = 1), train")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated subset of the systems (ours and torch always run)")
    parser.add_argument("--worker", choices=["ours", "torch", *competitors.INFERENCE], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads)
        return 0
    sys.path.insert(0, str(ROOT))
    from perceiver_np import build
    from perceiver_np.cost import forward_flops

    cfg = build(**SEED).config
    info = machine(args.threads, ("numpy", "numba", "torch", "mkl", "blis"))
    peaks = sgemm_peaks(args.threads)
    peak_name, peak = best_peak(peaks)
    load = compile_and_load() if not args.quick else {}
    kinds = set(args.kinds.split(","))
    infer_ns = [n for n in INFER_B32 if "infer" in kinds and (not args.quick or n <= 4096)]
    stream_ns = [n for n in STREAM_B1 if "stream" in kinds and (not args.quick or n <= 1 << 18)]
    train_ns = [n for n in TRAIN_B32 if "train" in kinds and (not args.quick or n <= 1024)]
    if args.max_n is not None:
        infer_ns, stream_ns, train_ns = ([n for n in ns if n <= args.max_n]
                                         for ns in (infer_ns, stream_ns, train_ns))
    rows = []
    from perceiver_np.kernels import blas

    same_as_ours = {k for k, name in BLAS_VARIANTS.items() if name == blas.preferred()}

    def shape(kind: str, b: int, n: int, path: str | None, flops: float) -> None:
        # fresh workers per shape: a peak RSS is this shape's alone, not what earlier ones left.
        # ours, torch and torch with memory kept run together; then each competitor runs paired
        # with a fresh worker of ours (all nine at once would not fit in memory at B 32, N 16k),
        # its ratio taken against that worker's times, round by round.
        chosen = set(args.systems.split(",")) | set(BASE)
        with_workers(BASE, lambda ws: rows.append(run_shape(ws, kind, b, n, args.rounds, path, flops, peak)))
        for name in [k for k in KIND_SYSTEMS[kind] if k in chosen and k not in set(BASE) | same_as_ours]:
            with_workers(("ours", name), lambda ws, name=name: add_competitor(
                rows[-1], name, run_pair(ws, kind, b, n, args.rounds, path)))

    def with_workers(names: Any, job: Any) -> None:
        workers = {k: Worker(k, args.threads) for k in names}
        try:
            job(workers)
        finally:
            for w in workers.values():
                w.close()

    for n in infer_ns:
        shape("infer", 32, n, None, 32 * forward_flops(cfg, n)["total"])
    with tempfile.TemporaryDirectory() as tmp:
        for n in stream_ns:
            path = Path(tmp) / f"x{n}.npy"
            write_npy(path, n)
            shape("stream", 1, n, str(path), forward_flops(cfg, n)["total"])
            path.unlink()
    for n in train_ns:
        shape("train", 32, n, None, 3 * 32 * forward_flops(cfg, n)["total"])
    scale_rows = []
    for kind, n in SCALING_SHAPES:
        if kind in kinds and (args.max_n is None or n <= args.max_n):
            with_workers_threads = {1: Worker("ours", 1), args.threads: Worker("ours", args.threads)}
            try:
                pair = run_pair(with_workers_threads, kind, 32, n, args.rounds, None)
            finally:
                for w in with_workers_threads.values():
                    w.close()
            scale_rows.append((kind, n, pair["times"]))
    report = [
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "- sgemm peaks (float32 4096^3, best of 3, this run): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
        + f"; % peak is against the best, {peak_name}",
        f"- seed model, fp32, {args.rounds} paired rounds per shape after a warm-up; times median "
        "(min–max); ratio = torch time / our time per round, median (min–max); % peak = the model's "
        "FLOPs / median time / sgemm peak (training: 3x the forward's FLOPs); ours = runtime.tune() "
        f"with PERCEIVER_NP_BLAS=auto (the kernels' products on {preferred_blas()}, kernels/blas.py; "
        "'ours on OpenBLAS' and 'ours on BLIS' below are the same worker on SciPy's OpenBLAS and on "
        "BLIS, the one of them that auto picks left out); ours extra = our peak RSS "
        "minus our worker's RSS before the shape (inputs made, nothing run); both run with glibc's "
        "default malloc (ours reuses the buffers of its workspace, docs/fast.md), and the last two "
        "columns show torch with freed memory kept (a process-wide mallopt); outputs agree = max "
        "|ours - torch| / max |torch| over the outputs (training: the first step's loss)",
        "",
        table(rows),
        "",
        "Against every competitor (each in its own fresh process per shape, the same threads, run "
        "paired with a fresh worker of ours; ratio = their time / ours per paired round, median "
        "(min–max): above 1 we are faster; "
        "agree = max |theirs - torch| / max |torch| over the outputs):",
        "",
        competitor_table(rows),
        "",
        f"Scaling: ours on 1 thread and on {args.threads}, each in a fresh worker, paired rounds. "
        "Every parallel loop of the engine and of the training step runs over rows, (sample, "
        "head, query block, key split) items or row blocks, never over a fixed two, and the "
        "sums over rows use blocks of a constant size, so more cores get more items in flight:",
        "",
        scaling_table(scale_rows, args.threads),
        "",
        "Targets, as this run measured them:",
        "",
        *("- " + t for t in targets(rows, load)),
    ]
    text = "\n".join(report)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
