"""Batch inference over shards: perceiver_np.distributed on a local Dask cluster against
single-process predict, on this machine's cores.

    python benchmarks/bench_distributed.py                 # the full run, a few minutes
    python benchmarks/bench_distributed.py --quick         # a tiny model and shards: checks it runs
    python benchmarks/bench_distributed.py --markdown docs/performance-distributed.md

The seed model (input_dim 287, D 256, M 64, 4 self layers, float32; ``--quick``: a tiny one) over
SHARDS ``.npy`` shards of ROWS samples of N positions each, written once to a temporary
directory, ``batch_size`` BATCH. Every configuration runs the same shards into a fresh output
directory, once to warm up (each worker process loads the model and the kernels' cached machine
code) and then ``--repeats`` times:

- single process: the model loaded once, each shard read a batch at a time, ``model(x)``,
  ``np.save``: what ``perceiver-np predict`` does for each file, all cores on one model call
  (``runtime.tune()``, as the command does);
- ``distributed.predict(client=None)``: the same in this process, plus the atomic writes, the
  checksums and the manifest;
- Dask, local clusters (``distributed.local_client``) of 1 worker process x 1 task thread (a
  task computes on every core), 2 processes x 1 thread ("processes": a task on half of them) and
  1 process x 2 threads ("threads": two tasks at once in one process, half the cores each).

tokens/s = the shards' samples x N / the run's wall time (``Report.seconds``: from the first
task submitted to the last result; the single-process loop timed the same way), min / median /
max over the repeats. The outputs of every configuration are compared with the single-process
ones, byte for byte. Starting each cluster is timed on its own (not in any run).

Overhead per shard: TINY shards of one sample of 8 positions each (the compute is negligible
against what a shard costs besides it), per configuration: the run's wall time / TINY, minus
the same shards' compute measured in this process (``model(x)`` alone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine, write_page  # benchmarks/
from bench_model import fmt3, stats  # benchmarks/

ROOT = Path(__file__).resolve().parents[1]
SEED = {"input_dim": 287, "dtype": "float32"}
QUICK_MODEL = {"input_dim": 16, "latent_dim": 32, "num_latents": 16, "num_layers": 1, "num_heads": 2,
               "dtype": "float32"}
FULL = {"shards": 16, "rows": 32, "n": 1024, "batch": 32, "tiny": 64}
QUICK = {"shards": 4, "rows": 16, "n": 256, "batch": 8, "tiny": 16}
#: The Dask clusters measured: label -> (worker processes, task threads per worker).
CLUSTERS = {"Dask 1 process x 1 thread": (1, 1), "Dask 2 processes x 1 thread (processes)": (2, 1),
            "Dask 1 process x 2 threads (threads)": (1, 2)}


def write_shards(folder: Path, count: int, rows: int, n: int, c: int, seed: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        paths.append(folder / f"shard-{i:04d}.npy")
        np.save(paths[-1], rng.standard_normal((rows, n, c), dtype=np.float32))
    return paths


def single_process(model: Any, shards: list[Path], out: Path, batch: int) -> float:
    """perceiver-np predict's loop over each shard, the model loaded once -> seconds."""
    out.mkdir()
    t0 = time.perf_counter()
    for path in shards:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
        y = np.concatenate([model(np.asarray(x[i:i + batch])) for i in range(0, len(x), batch)])
        with open(out / path.name, "wb") as f:
            np.save(f, y)
    return time.perf_counter() - t0


def compute_only(model: Any, shards: list[Path], batch: int) -> float:
    """The model calls alone over the shards (read into memory first) -> seconds."""
    xs = [np.load(p) for p in shards]
    t0 = time.perf_counter()
    for x in xs:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    return time.perf_counter() - t0


def per_second(rates: list[float]) -> str:
    lo, med, hi = stats(rates)
    return f"{med:,.0f} ({lo:,.0f}–{hi:,.0f})"


def same_outputs(out: Path, reference: Path) -> bool:
    return all((out / p.name).read_bytes() == p.read_bytes() for p in reference.glob("*.npy"))


def measure(label: str, run: Any, repeats: int, tokens: int, reference: Path | None, tmp: Path) -> dict:
    """``run(out_dir) -> seconds``: a warm-up, then ``repeats`` timed runs, each into a fresh
    directory; the first timed run's outputs compared with ``reference``."""
    run(tmp / f"{label}-warm-up")
    seconds, same = [], None
    for r in range(repeats):
        out = tmp / f"{label}-{r}"
        seconds.append(run(out))
        if r == 0 and reference is not None:
            same = same_outputs(out, reference)
        shutil.rmtree(out)
    shutil.rmtree(tmp / f"{label}-warm-up")
    rates = [tokens / s for s in seconds]
    print(f"  {label}: {per_second(rates)} tokens/s", flush=True)
    return {"label": label, "seconds": seconds, "rates": rates, "same": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and tiny shards, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import perceiver_np as pnp
    from perceiver_np import checkpoint, distributed

    size = QUICK if args.quick else FULL
    repeats = 3 if args.quick else args.repeats
    options = QUICK_MODEL if args.quick else SEED
    tuned = pnp.runtime.tune()
    cores = os.cpu_count() or 1
    model = pnp.build(**options)
    c, n, batch = model.config.input_dim, size["n"], size["batch"]
    rows: list[dict] = []
    starts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        ck = tmp / "model.npz"
        checkpoint.save_checkpoint(ck, config=model.config, params=model.params)
        shards = write_shards(tmp / "shards", size["shards"], size["rows"], n, c, 0)
        tiny = write_shards(tmp / "tiny", size["tiny"], 1, 8, c, 1)
        tokens = size["shards"] * size["rows"] * n
        print(f"{size['shards']} shards of {size['rows']} x {n} x {c}, batch {batch}: {tokens:,} tokens "
              "a run", flush=True)

        reference = tmp / "reference"
        single_process(model, shards, reference, batch)
        rows.append(measure("single process", lambda out: single_process(model, shards, out, batch),
                            repeats, tokens, reference, tmp))
        rows.append(measure("distributed.predict(client=None)", lambda out: distributed.predict(
            ck, shards, out, batch_size=batch, progress=False).seconds, repeats, tokens, reference, tmp))
        overhead = {"distributed.predict(client=None)": [
            distributed.predict(ck, tiny, tmp / f"tiny-{r}", batch_size=batch, progress=False).seconds
            for r in range(repeats + 1)][1:]}
        for label, (workers, threads) in CLUSTERS.items():
            t0 = time.perf_counter()
            with distributed.local_client(workers, threads) as client:
                starts[label] = time.perf_counter() - t0
                rows.append(measure(label, lambda out, client=client: distributed.predict(
                    ck, shards, out, client, batch_size=batch, progress=False).seconds,
                    repeats, tokens, reference, tmp))
                overhead[label] = [distributed.predict(ck, tiny, tmp / f"tiny-{label}-{r}", client,
                                                       batch_size=batch, progress=False).seconds
                                   for r in range(repeats + 1)][1:]
        compute = stats([compute_only(model, tiny, batch) for _ in range(repeats)])[1]

    base = float(np.median(rows[0]["rates"]))
    table = ["| run | tokens/s, median (min–max) | against single process | outputs identical |",
             "|---|---|---|---|"]
    for r in rows:
        same = "reference" if r["same"] is None else ("yes" if r["same"] else "**NO**")
        table.append(f"| {r['label']} | {per_second(r['rates'])} | "
                     f"{float(np.median(r['rates'])) / base:.2f}x | {same} |")
    per_shard = ["| run | wall time per shard, ms | minus the serial compute per shard, ms |",
                 "|---|---|---|"]
    for label, seconds in overhead.items():
        each = [s / size["tiny"] for s in seconds]
        per_shard.append(f"| {label} | {fmt3(stats(each), 1e3, 1)} | "
                         f"{fmt3(stats([e - compute / size['tiny'] for e in each]), 1e3, 1)} |")
    info = machine(int(tuned.threads.get("numba", cores)),
                   packages=("numpy", "numba", "dask", "distributed", "zarr"))
    model_text = ("--quick: a tiny model " + str(QUICK_MODEL) if args.quick
                  else "the seed model (input_dim 287, D 256, M 64, 4 self layers, float32)")
    report = [
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"- {model_text}; {size['shards']} .npy shards of {size['rows']} x {n} x {c} float32, batch_size "
        f"{batch}: {tokens:,} tokens a run; a warm-up then {repeats} runs per configuration; tokens/s = "
        "tokens / the run's wall time (first task submitted to last result), median (min–max); outputs "
        "identical = every output file byte for byte the single-process one",
        "- starting a cluster (not in any run): " + ", ".join(f"{k} {v:.1f} s" for k, v in starts.items()),
        "",
        *table,
        "",
        f"Overhead per shard: {size['tiny']} shards of one sample of 8 positions; the compute of those "
        f"shards alone (model(x) in this process, one after another, median of {repeats}) is "
        f"{compute * 1e3:.1f} ms in all. Where two tasks run at once (two processes, or two threads) "
        "their shards' compute overlaps, so the wall time per shard can fall below the serial compute "
        "and the difference is negative: the cost of a shard there is at most its wall time.",
        "",
        *per_shard,
    ]
    text = "\n".join(report)
    print(text)
    if args.markdown:
        write_page(args.markdown, "# Performance: batch inference on a local Dask cluster\n\n```sh\n"
                   "python benchmarks/bench_distributed.py --markdown docs/performance-distributed.md"
                   "\n```\n\n"
                   "Written by that command (the method is in the script's docstring; the guide is "
                   "[distributed.md](distributed.md)). One run on this machine:\n\n", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
