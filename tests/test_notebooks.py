"""The notebooks of examples/notebooks run, and print what they are stored with.

How a notebook runs
    nbclient executes it top to bottom in a fresh Jupyter kernel named "python3": ipykernel's
    kernelspec of this Python (its command is ``python``, which jupyter_client replaces by
    ``sys.executable``, so the kernel runs in the same environment as the tests). The working
    directory is a fresh temporary directory, and the notebook must leave it empty (the
    notebooks that write files write them to a temporary directory of their own and remove it).
    Each notebook runs once per session; its tests share the run. A cell that raises fails
    the notebook; the cells assert what their text claims, against the named tolerances of
    perceiver_np.tolerances. Any output to stderr (a warning) fails it too.

What is compared with the stored outputs
    The notebooks are stored with their outputs, and each re-executed code cell must print what
    its stored outputs show, line by line, by the rule of the docs (tests/test_docs.py: text
    exactly, each run of spaces as one space, numbers to the digits shown). A cell tagged
    ``noise`` prints numbers that are rounding noise (a float64 difference of 1e-15, a gradient
    check's relative errors, a float32 training run on another machine's BLAS), which the
    notebook's text gives only as bounds: its lines must match with their numbers left out, and
    the cell's own asserts hold the bounds. In such a cell a line starting with ``worst`` (the
    entry a gradient check or a comparison finds worst, which the noise decides) must only
    start so. A cell that showed a figure must show one again. The digits training run is also
    held to its stored test accuracy within DIGITS_NOISE_IMAGES.

Storing the outputs
    ``python -m tests.test_notebooks --store [name.ipynb ...]`` (from the repository root)
    executes the notebooks the same way and writes them back with their outputs, without
    timing metadata and without the kernel's Python version; test_stored_notebooks_are_clean
    checks that no path of the machine is in them either.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from perceiver_np.tolerances import DIGITS_NOISE_IMAGES

from .test_docs import output_lines, output_mismatch, tokens

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "examples" / "notebooks"
#: Each notebook with the packages it needs beyond perceiver_np (skipped without them).
NOTEBOOKS = {
    "layers_and_gradcheck.ipynb": (),
    "attention_online_softmax.ipynb": ("matplotlib",),
    "train_digits.ipynb": ("matplotlib", "sklearn"),
    "verify_hf_model.ipynb": ("torch", "transformers"),
}
NOISE_TAG = "noise"
#: A cell stuck for this long has hung (each notebook runs in well under a minute).
CELL_TIMEOUT_SECONDS = 600
#: The digits run's test accuracy, re-executed, against the stored one, in test images of 360.

REASON = "the notebook tests need nbclient, nbformat and ipykernel (pip install nbclient nbformat ipykernel)"


@dataclass
class Run:
    stored: Any  # the notebook as stored, with its outputs
    executed: Any  # the notebook executed now
    leftovers: list[str]  # files the notebook left in its working directory
    seconds: float


def execute(path: Path, workdir: Path) -> tuple[Any, float]:
    """``path`` executed in a fresh "python3" kernel with ``workdir`` as its working directory."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}, record_timing=False)
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("nbformat", reason=REASON)
    pytest.importorskip("nbclient", reason=REASON)
    pytest.importorskip("ipykernel", reason=REASON)
    import nbformat
    from nbclient.exceptions import CellExecutionError

    cache: dict[str, Run | str] = {}  # a run, or why it failed

    def run(name: str) -> Run:
        for module in NOTEBOOKS[name]:
            pytest.importorskip(module, reason=f"examples/notebooks/{name} needs {module}")
        if name not in cache:
            workdir = tmp_path_factory.mktemp(Path(name).stem)
            try:
                executed, seconds = execute(FOLDER / name, workdir)
            except CellExecutionError as err:
                cache[name] = f"examples/notebooks/{name}: a cell raised\n{err}"
            else:
                leftovers = sorted(p.name for p in workdir.iterdir())
                cache[name] = Run(nbformat.read(FOLDER / name, as_version=4), executed, leftovers, seconds)
        result = cache[name]
        if isinstance(result, str):
            pytest.fail(result)
        return result

    return run


def code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def printed(cell: Any) -> str:
    """What a code cell shows as text: its stdout and its results' text/plain, in order."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data") and "image/png" not in out.data:
            parts.append(out.data.get("text/plain", "") + "\n")
    return "".join(parts)


def figures(cell: Any) -> int:
    return sum(out.output_type == "display_data" and "image/png" in out.data for out in cell.outputs)


def without_numbers(line: str) -> list[tuple[str, str]]:
    return [(kind, text if kind == "text" else "#") for kind, text in tokens(line)]


def noise_mismatch(stored: str, now: str) -> str | None:
    """Why a noise cell's lines differ in more than their numbers, or None."""
    want, got = output_lines(stored), output_lines(now)
    if len(want) != len(got):
        return f"the stored outputs have {len(want)} line(s), the cell printed {len(got)}"
    for n, (w, g) in enumerate(zip(want, got, strict=True), start=1):
        if w.lstrip().startswith("worst") and g.lstrip().startswith("worst"):
            continue
        if without_numbers(w) != without_numbers(g):
            return f"line {n} differs in its text\n  stored:  {w}\n  printed: {g}"
    return None


def exact_mismatch(stored: str, now: str) -> str | None:
    """Why a cell's lines differ from the stored ones by the docs' rule, or None."""
    return output_mismatch(stored, now, where=("the stored outputs have", "the cell printed", "stored: "))


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_cleanly(name: str, runs) -> None:
    run = runs(name)
    stderr = [(i, out.text) for i, cell in enumerate(code_cells(run.executed)) for out in cell.outputs
              if out.output_type == "stream" and out.name == "stderr"]
    assert not stderr, f"{name}: code cells wrote to stderr: {stderr}"
    assert not run.leftovers, f"{name} left files in its working directory: {run.leftovers}"


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_prints_its_stored_outputs(name: str, runs) -> None:
    run = runs(name)
    stored, now = code_cells(run.stored), code_cells(run.executed)
    assert len(stored) == len(now)
    for i, (a, b) in enumerate(zip(stored, now, strict=True)):
        noise = NOISE_TAG in a.metadata.get("tags", [])
        why = (noise_mismatch if noise else exact_mismatch)(printed(a), printed(b))
        assert why is None, (f"{name}, code cell {i}{' (noise)' if noise else ''}: {why}\n"
                             f"--- stored\n{printed(a)}--- printed\n{printed(b)}")
        assert figures(a) == figures(b), f"{name}, code cell {i}: {figures(b)} figures, stored {figures(a)}"


def test_digits_accuracy_is_the_stored_one(runs) -> None:
    run = runs("train_digits.ipynb")
    pattern = re.compile(r"test accuracy \d\.\d+ \((\d+) of 360\)")

    def correct(nb: Any) -> int:
        found = [int(m[1]) for cell in code_cells(nb) for m in pattern.finditer(printed(cell))]
        assert len(found) == 1, found
        return found[0]

    assert abs(correct(run.executed) - correct(run.stored)) <= DIGITS_NOISE_IMAGES


@pytest.mark.parametrize(
    ("stored", "now", "noise", "ok"),
    [
        ("o [ 1.5437 -0.1073]  lse 5.4562", "o [ 1.5437 -0.1073]  lse 5.4562", False, True),
        ("o [ 1.5437 -0.1073]  lse 5.4562", "o [1.5437 -0.1073] lse 5.4563", False, False),
        ("dk (2, 2, 1000, 8) max rel diff 8.4e-16", "dk (2, 2, 1000, 8) max rel diff 1.3e-15", False, False),
        ("dk (2, 2, 1000, 8)  max rel diff 8.4e-16", "dk (2, 2, 1000, 8)  max rel diff 1.3e-15", True, True),
        ("dk (2, 2, 1000, 8)  max rel diff 8.4e-16", "dv (2, 2, 1000, 8)  max rel diff 8.4e-16", True, False),
        ("x  (2, 6, 5)  8  2.26e-12  (0, 3, 2)", "x  (2, 6, 5)  8  1.1e-11  (1, 12, 0)", True, True),
        ("worst: cross.0.attn.k.bias[3] relative error 5.95e-10",
         "worst: self.0.attn.k.bias[4] relative error 7.1e-10", True, True),
        ("worst: x[2, 4] relative error 1.59e+00", "worst: x[2, 4] relative error 1.59e+00", False, True),
        ("worst: x[2, 4] relative error 1.59e+00", "worst: gamma[1] relative error 1.59e+00", False, False),
        ("a\nb", "a", True, False),
    ],
)
def test_the_comparison_rules(stored: str, now: str, noise: bool, ok: bool) -> None:
    assert ((noise_mismatch if noise else exact_mismatch)(stored, now) is None) is ok


def test_stored_notebooks_are_clean() -> None:
    """Every notebook is listed and stored executed in order, with no error, no stderr, no
    timing and no path of this machine in it."""
    nbformat = pytest.importorskip("nbformat", reason=REASON)
    assert sorted(p.name for p in FOLDER.glob("*.ipynb")) == sorted(NOTEBOOKS)
    readme = (FOLDER / "README.md").read_text(encoding="utf-8")
    paths = {str(ROOT), str(Path.home()), tempfile.gettempdir()}
    for name in NOTEBOOKS:
        nb = nbformat.read(FOLDER / name, as_version=4)
        nbformat.validate(nb)
        assert name in readme, f"examples/notebooks/README.md does not list {name}"
        assert nb.metadata.kernelspec.name == "python3"
        assert "version" not in nb.metadata.get("language_info", {}), name
        cells = code_cells(nb)
        counts = [c.execution_count for c in cells]
        assert counts == list(range(1, len(cells) + 1)), f"{name}: not stored executed in order: {counts}"
        for i, cell in enumerate(cells):
            kinds = {out.output_type for out in cell.outputs}
            assert "error" not in kinds, f"{name}, code cell {i}: stored with an error"
            stderr = [out.text for out in cell.outputs if out.get("name") == "stderr"]
            assert not stderr, f"{name}, code cell {i}: stored with stderr output {stderr}"
            assert "execution" not in cell.metadata, f"{name}, code cell {i}: timing metadata"
        # every text but the figures' base64 data, in which "/tmp" may occur by chance
        text = json.dumps([nb.metadata, *[(c.source, c.metadata, printed(c) if c.cell_type == "code" else "")
                                          for c in nb.cells]])
        assert not [p for p in paths if p in text], f"{name} holds a path of this machine"


def store(names: list[str]) -> None:
    """Execute the notebooks and write them back with their outputs (see the module docstring)."""
    import nbformat

    for name in names or list(NOTEBOOKS):
        with tempfile.TemporaryDirectory() as workdir:
            nb, seconds = execute(FOLDER / name, Path(workdir))
            leftovers = list(Path(workdir).iterdir())
        if leftovers:
            raise SystemExit(f"{name} left files in its working directory: {leftovers}")
        nb.metadata["language_info"].pop("version", None)
        nbformat.validate(nb)
        nbformat.write(nb, FOLDER / name)
        print(f"{name}: executed and stored ({seconds:.1f} s)")


if __name__ == "__main__" and sys.argv[1:2] == ["--store"]:
    store(sys.argv[2:])
