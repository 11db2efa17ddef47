"""examples/perceiver_min.py: the one-file Perceiver checks itself, and its check can fail.

The script checks its gradients against finite differences and its output and every gradient
against perceiver_np, and prints ``minimal: max rel err X`` last. It runs here as a learner runs
it, a script in a fresh process; then copies of it with a bug planted by text replacement must
fail the same check.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from perceiver_np.tolerances import MINIMAL_EXAMPLE_RTOL

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "examples" / "perceiver_min.py"
LAST_LINE = re.compile(r"minimal: max rel err (\d\.\de[-+]\d\d)")
MAX_LINES = 300



def run(script: Path) -> subprocess.CompletedProcess[str]:
    """``python script`` in a fresh process, with this interpreter (the venv's)."""
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=script.parent)


def max_rel_err(stdout: str) -> float:
    """X of the last line printed, which must read exactly ``minimal: max rel err X``."""
    last = stdout.splitlines()[-1]
    m = LAST_LINE.fullmatch(last)
    assert m is not None, f"the last line is not 'minimal: max rel err X': {last!r}"
    return float(m[1])


def test_the_minimal_perceiver_matches_finite_differences_and_perceiver_np() -> None:
    proc = run(MINIMAL)
    assert proc.returncode == 0 and not proc.stderr, proc.stdout + proc.stderr
    assert max_rel_err(proc.stdout) <= MINIMAL_EXAMPLE_RTOL, proc.stdout
    checks = [line.split(":")[0] for line in proc.stdout.splitlines()]
    assert checks == ["finite differences", "perceiver_np", "minimal"], proc.stdout


def test_the_minimal_perceiver_is_one_short_file() -> None:
    source = MINIMAL.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_LINES
    imports = set(re.findall(r"^\s*(?:import|from) (\w+)", source, re.MULTILINE))
    assert imports == {"__future__", "math", "sys", "numpy", "scipy", "perceiver_np"}, imports


@pytest.mark.parametrize(
    ("bug", "right", "wrong"),
    [
        ("the softmax backward without subtracting delta",
         "(dprob - (dprob * prob).sum(axis=-1, keepdims=True))", "dprob"),
        ("the FFN sublayer's residual gradient left out",
         "return dy + layernorm_back(du,", "return layernorm_back(du,"),
        ("the latents' gradient from the first sample only, not summed over the batch",
         'g["latents"] = dz.sum(axis=0)', 'g["latents"] = dz[0]'),
    ],
)
def test_a_planted_bug_fails_the_check(tmp_path: Path, bug: str, right: str, wrong: str) -> None:
    source = MINIMAL.read_text(encoding="utf-8")
    assert source.count(right) == 1, f"{bug}: {right!r} is not in the script once"
    broken = tmp_path / "perceiver_min_broken.py"
    broken.write_text(source.replace(right, wrong), encoding="utf-8")
    proc = run(broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert max_rel_err(proc.stdout) > MINIMAL_EXAMPLE_RTOL
