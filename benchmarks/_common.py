"""What the benchmarks share: resident memory, fresh-process start-up, the worker processes,
the machine line and the page writer."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any


def sgemm_peaks(threads: int, repeats: int = 3) -> dict[str, float]:
    """The best float32 4096^3 product each library reaches here, GFLOP/s, best of ``repeats``:
    OpenBLAS through NumPy (its default threads: the cores); each BLAS of
    perceiver_np.kernels.blas that is installed (MKL, BLIS) through the kernels' own tiled
    product on ``threads`` threads; and torch's CPU BLAS (oneDNN or MKL) through ``torch.mm`` on
    ``threads`` threads when torch is installed. The first entry is OpenBLAS's; :func:`best_peak`
    is the one the % peak columns use. The kernels' BLAS is put back as it was."""
    import time

    import numba
    import numpy as np

    from perceiver_np.kernels import blas, gemm
    from perceiver_np.threads import set_num_threads

    def best(f: Any) -> float:
        f()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return 2 * 4096**3 / min(times) / 1e9

    a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    peaks = {"OpenBLAS (NumPy)": best(lambda: a @ a)}
    before, before_threads = blas.current().name, int(numba.get_num_threads())
    set_num_threads(threads)
    try:
        for name in blas.available():
            if name != "scipy":
                lib = blas.use(name)
                label = f"{name.upper()} {lib.config}".strip() + " (perceiver_np's tiles)"
                peaks[label] = best(lambda: gemm.matmul(a, a))
    finally:
        blas.use(before)
        set_num_threads(before_threads)
    try:
        import torch
    except ImportError:
        return peaks
    torch.set_num_threads(threads)
    t = torch.from_numpy(a)
    with torch.inference_mode():
        peaks[f"torch {torch.__version__} mm"] = best(lambda: torch.mm(t, t))
    return peaks


def preferred_blas() -> str:
    """The BLAS ``runtime.tune(blas="auto")`` runs the kernels on here, with BLIS's
    sub-configuration ("blis skx"); the kernels' BLAS is put back as it was."""
    from perceiver_np.kernels import blas

    before = blas.current().name
    name = blas.preferred()
    try:
        return f"{name} {blas.use(name).config}".strip()
    finally:
        blas.use(before)


def best_peak(peaks: dict[str, float]) -> tuple[str, float]:
    """The library of :func:`sgemm_peaks` that reached the most, and its GFLOP/s."""
    name = max(peaks, key=lambda k: peaks[k])
    return name, peaks[name]


def rss_high_water() -> int:
    """This process's resident-set high-water mark (VmHWM), bytes."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def rss_now() -> int:
    """This process's resident set now (VmRSS), bytes."""
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_high_water() -> None:
    """Start the high-water mark again from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def compile_then_cached(script: str, cwd: Path | None = None) -> dict[str, list[float]]:
    """Run ``script`` (which prints some seconds) in a fresh process with an empty Numba cache
    ("compile"), then again with the cache it filled ("cached load")."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("compile", "cached load"):
            res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                 text=True, check=True, cwd=cwd)
            out[label] = [float(v) for v in res.stdout.split()]
    return out


def finish_plot(fig, axes, path: Path) -> None:
    """Shared axis labels, a legend on the first axis, and the PNG."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (ms, median)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine(threads: int, packages: tuple[str, ...] = ("numpy", "numba", "torch")) -> dict[str, str]:
    """The machine line of a benchmark page: CPU, cores, threads each system uses, versions."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "threads (each system)": str(threads),
            "python": platform.python_version()}
    for package in packages:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def write_page(path: Path, header: str, text: str) -> None:
    """A benchmark's markdown page, written atomically."""
    from perceiver_np._files import atomic_write

    atomic_write(path, lambda f: f.write((header + text + "\n").encode()))


def paired_times(workers: dict[Any, WorkerProcess], rounds: int, settle: float) -> dict[Any, list[float]]:
    """``rounds`` rounds of one timed ``run`` per worker, each worker going first in turn, after
    ``settle`` seconds of quiet before every run (so each round's times are taken under the same
    load and their ratios are paired): each worker's run times, seconds."""
    import time

    times: dict[Any, list[float]] = {k: [] for k in workers}
    names = list(workers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(settle)
            times[name].append(workers[name].ask(cmd="run")["time"])
    return times


class WorkerProcess:
    """A benchmark worker in a fresh process of its own: ``script --worker ARGS...``, speaking
    one JSON line per request and per reply on its stdin and stdout."""

    def __init__(self, script: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=Path(script).resolve().parents[1], env={**os.environ, **(env or {})},
        )

    def ask(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait()
