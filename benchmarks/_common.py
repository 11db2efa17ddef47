"""What both benchmarks measure the same way: resident memory and fresh-process start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


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
