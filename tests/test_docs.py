"""The docs run: every ```python block of README.md and docs/*.md, with its shown output checked.

The docs are the specification learners and verifiers read, so their code is held to what the
pages show, the same way as the code is held to its tests.

How a page runs
    A page (README.md, each docs/*.md) is one session, like a notebook: its ```python blocks run
    in order, in one namespace, in a fresh Python process whose working directory is a fresh
    temporary directory (files a block writes land there). A process, not this one, because
    blocks may change process-wide state (``np.set_printoptions``, ``runtime.tune()``'s threads
    and allocator) that must not leak into other tests. Each block's stdout is captured on its
    own; tracebacks show the markdown file's own line numbers. Warnings are errors, as in the
    rest of the suite (setup.cfg). One test per block, ``docs/<page>.md#<k>`` (k counts the
    page's ```python blocks from 0); the page's process runs once, at its first block's test.
    A block that raises fails its test, and the page goes on with the next block (whose failure
    may then only be a consequence: its message says which earlier blocks failed).

Which fences run
    ```python (or ```py) blocks run; every other fence (```sh, ```text, bare ```) is not run.
    A block that cannot run here is marked ```python no-run, and the paragraph just before it
    must give the reason in a sentence starting "Not run by the tests:". The only acceptable
    reason is a download (the test machine has no internet; torch and transformers are
    installed, so examples that build Hugging Face models in code run). Such blocks are
    reported as skipped, with their reason, and there may be at most ``MAX_NO_RUN`` of them.

The expected output of a block
    is the ```text (or ```output) fence that immediately follows it, with only blank lines
    between. A block without one may print anything (its output is not shown, so it is not
    checked), but it must run without an error. A bare ``` fence right after a ```python block
    is refused: label it ```text when it is the output, and separate it by a sentence when it
    is not, so that no output on a page goes unchecked by mistake. Inline comments such as
    ``print(y.shape)  # (2, 3)`` are documentation only and are not checked; outputs that matter
    are printed and shown in a ```text fence.

The comparison, line by line
    1. Trailing whitespace of every line and blank lines at the start and the end are dropped;
       the printed and the shown output must then have the same number of lines.
    2. Each line is cut into numbers and text. A number is a decimal literal such as ``87``,
       ``-0.7071``, ``1.`` or ``9.9e-07`` that is not part of a word (``float32``, ``self.0`` and
       ``x2`` are text). Text must match exactly, except that each run of spaces counts as one
       space (so a column may shift when a number is written as a bound, below).
    3. A number is compared to the digits shown: the printed value must lie within half a unit
       of the shown number's last digit, i.e. round to it. ``0.633504`` accepts 0.6335035 to
       0.6335045, ``9.4e-12`` accepts 9.35e-12 to 9.45e-12, ``87`` accepts 86.5 to 87.5 (so a
       printed integer must be 87). A printed number with fewer digits than shown fails unless
       it is equal (``0.63`` is not ``0.633504``). A
       shown zero (``0``, ``0.0``, ``0.00e+00``, ``-0.``) accepts only a printed zero: a zero on
       a page is a claim of exactness, and 1e-17 prints as 1e-17, not as 0.0.
    4. A number that is rounding noise (a float64 error of 1e-15 here may be 3e-16 on another
       machine's BLAS) is shown as a bound instead of as digits: ``< 1e-12`` accepts any printed
       value with absolute value below 1e-12, ``~3e-7`` any value between a tenth of 3e-7 and ten
       times it (an order of magnitude, both ways). The printed output is the plain number; the
       page writes ``max rel err < 1e-10`` where the code prints ``max rel err 9.4e-12``.
       Bounds are for noise only: everything a reader should be able to reproduce (shapes,
       counts, losses, gradients, messages) is shown with its digits.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import subprocess
import sys
import time
import traceback
import types
import warnings
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python", "py"}
OUTPUT_LANGUAGES = {"text", "output"}
NO_RUN = "no-run"
NO_RUN_REASON = "Not run by the tests:"
MAX_NO_RUN = 3
PAGE_TIMEOUT_SECONDS = 900

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Fence:
    page: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    info: str  # the info string, stripped
    body: str

    @property
    def language(self) -> str:
        return self.info.split()[0].lower() if self.info else ""

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and NO_RUN not in self.info.split()[1:]

    @property
    def no_run(self) -> bool:
        return self.language in RUN_LANGUAGES and NO_RUN in self.info.split()[1:]


@dataclass(frozen=True)
class Block:
    page: Path
    index: int  # among the page's ```python blocks, from 0
    fence: Fence
    expected: Fence | None  # the ```text fence right after it, if any

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}#{self.index}"


def fences(page: Path) -> list[Fence]:
    """The fenced code blocks of a markdown page (CommonMark fences at the margin or indented by
    up to 3 spaces; a fence closes with the same character, at least as long, and no info)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Fence] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        marker, indent = m["fence"], len(m["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if (close is not None and close["fence"][0] == marker[0]
                    and len(close["fence"]) >= len(marker) and not close["info"].strip()):
                break
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        else:
            raise ValueError(f"{page}:{i + 1}: the fence {marker} is never closed")
        found.append(Fence(page, i + 1, j + 1, m["info"].strip(), "\n".join(body) + "\n"))
        i = j + 1
    return found


def blank_between(page_lines: list[str], a: Fence, b: Fence) -> bool:
    return all(not line.strip() for line in page_lines[a.end:b.line - 1])


def page_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks, each with the output fence that follows it."""
    page_lines = page.read_text(encoding="utf-8").splitlines()
    all_fences = fences(page)
    blocks: list[Block] = []
    for k, f in enumerate(all_fences):
        if f.language not in RUN_LANGUAGES:
            continue
        nxt = all_fences[k + 1] if k + 1 < len(all_fences) else None
        expected = None
        if nxt is not None and blank_between(page_lines, f, nxt) and nxt.language in OUTPUT_LANGUAGES:
            expected = nxt
        blocks.append(Block(page, len(blocks), f, expected))
    return blocks


def no_run_reason(block: Block) -> str | None:
    """The reason given in the paragraph just before a no-run block, or None."""
    lines = block.page.read_text(encoding="utf-8").splitlines()
    i = block.fence.line - 2
    while i >= 0 and not lines[i].strip():
        i -= 1
    paragraph: list[str] = []
    while i >= 0 and lines[i].strip() and not FENCE.match(lines[i]):
        paragraph.insert(0, lines[i].strip())
        i -= 1
    text = " ".join(paragraph)
    at = text.find(NO_RUN_REASON)
    if at < 0:
        return None
    reason = text[at + len(NO_RUN_REASON):].strip()
    return reason or None


# --- the comparison ---------------------------------------------------------------------------

NUMBER = re.compile(
    r"(?P<bound>[<~]\s*)?(?<![\w.])(?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)(?![\w.])"
)


def tokens(line: str) -> list[tuple[str, str]]:
    """A line as ("text", s) and ("num", literal) / ("<", literal) / ("~", literal) tokens."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in NUMBER.finditer(line):
        if m.start() > pos:
            out.append(("text", line[pos:m.start()]))
        kind = m["bound"].strip() if m["bound"] else "num"
        out.append((kind, m["num"]))
        pos = m.end()
    if pos < len(line):
        out.append(("text", line[pos:]))
    return [(k, re.sub(r"\s+", " ", s)) if k == "text" else (k, s) for k, s in out]


def number_matches(kind: str, shown: str, printed: str) -> bool:
    value, want = Decimal(printed), Decimal(shown)
    if kind == "<":
        return abs(value) < want
    if kind == "~":
        return want / 10 <= abs(value) <= want * 10
    if want == 0:  # a zero is a claim of exactness: 1e-17 prints as 1e-17, not as 0.0
        return value == 0
    exponent = want.as_tuple().exponent
    assert isinstance(exponent, int)
    return abs(value - want) <= Decimal(5).scaleb(exponent - 1)


def line_mismatch(shown: str, printed: str) -> str | None:
    """Why a printed line does not match the shown one, or None when it does."""
    want, got = tokens(shown), tokens(printed)
    if [k == "text" for k, _ in want] != [k == "text" for k, _ in got]:
        return "the lines differ in their text or in where their numbers are"
    for (kind, s), (_, p) in zip(want, got, strict=True):
        if kind == "text":
            if s != p:
                return f"text {s!r} was printed as {p!r}"
        elif not number_matches(kind, s, p):
            rule = {"num": "to the digits shown", "<": "a bound", "~": "an order of magnitude"}[kind]
            shown_as = s if kind == "num" else f"{kind}{s}"
            return f"{p} does not match {shown_as} ({rule})"
    return None


def output_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def output_mismatch(shown: str, printed: str, *, where: tuple[str, str, str] = (
        "the page shows", "the block printed", "shown:  ")) -> str | None:
    """Why ``printed`` differs from ``shown`` by the rule of the module docstring, or None.
    ``where`` words the message: (what shows the lines, what printed them, the shown line's label)."""
    want, got = output_lines(shown), output_lines(printed)
    if len(want) != len(got):
        return f"{where[0]} {len(want)} line(s), {where[1]} {len(got)}"
    for n, (w, g) in enumerate(zip(want, got, strict=True), start=1):
        why = line_mismatch(w, g)
        if why is not None:
            return f"line {n}: {why}\n  {where[2]} {w}\n  printed: {g}"
    return None


# --- running a page in its own process ----------------------------------------------------------


def run_page_worker(page: Path, result_path: Path) -> None:
    """Run the page's blocks in order in one namespace (in this process: the worker); write
    [{"stdout", "error", "seconds"}, ...] to result_path after every block."""
    warnings.simplefilter("error")
    here = Path(__file__).resolve().parent  # python puts the script's folder (tests/) first
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    module = types.ModuleType("__docs__")
    sys.modules["__docs__"] = module
    results: list[dict[str, object]] = []
    for block in page_blocks(page):
        if not block.fence.runs:
            results.append({"stdout": "", "error": None, "seconds": 0.0, "skipped": True})
            continue
        source = "\n" * block.fence.line + block.fence.body  # the markdown file's line numbers
        buffer = io.StringIO()
        error = None
        start = time.perf_counter()
        try:
            code = compile(source, str(page), "exec")
            with contextlib.redirect_stdout(buffer):
                exec(code, module.__dict__)
        except (Exception, SystemExit) as e:  # the traceback from the block's own frame on
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            error = "".join(traceback.format_exception(type(e), e, tb))
        results.append({"stdout": buffer.getvalue(), "error": error,
                        "seconds": round(time.perf_counter() - start, 2)})
        result_path.write_text(json.dumps(results), encoding="utf-8")
    result_path.write_text(json.dumps(results), encoding="utf-8")


@dataclass
class PageRun:
    results: list[dict[str, object]]
    stderr: str
    returncode: int | None  # None: timed out


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[Path, PageRun] = {}

    def run(page: Path) -> PageRun:
        if page not in cache:
            workdir = tmp_path_factory.mktemp(page.stem)
            result_path = workdir.parent / f"{workdir.name}.json"
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", str(page), str(result_path)],
                    cwd=workdir, capture_output=True, text=True, timeout=PAGE_TIMEOUT_SECONDS,
                )
                stderr, returncode = proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                err = e.stderr or b""
                stderr = err.decode(errors="replace") if isinstance(err, bytes) else err
                returncode = None
            results = json.loads(result_path.read_text(encoding="utf-8")) if result_path.exists() else []
            cache[page] = PageRun(results, stderr, returncode)
        return cache[page]

    return run


BLOCKS = [b for page in PAGES for b in page_blocks(page)]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_and_prints_what_the_page_shows(block: Block, page_runs) -> None:
    where = f"{block.page.relative_to(ROOT)}:{block.fence.line}"
    if block.fence.no_run:
        pytest.skip(f"{where}: {no_run_reason(block) or 'no reason given'}")
    run = page_runs(block.page)
    if block.index >= len(run.results):
        status = "timed out" if run.returncode is None else f"exited with status {run.returncode}"
        pytest.fail(f"{where}: the page's process {status} before this block finished\n{run.stderr[-3000:]}")
    result = run.results[block.index]
    earlier = [b.index for b in page_blocks(block.page)[:block.index]
               if run.results[b.index].get("error")]
    if result["error"]:
        note = f" (earlier blocks of this page failed too: {earlier})" if earlier else ""
        pytest.fail(f"{where}: the block raised{note}\n{result['error']}")
    if block.expected is None:
        return
    printed = str(result["stdout"])
    why = output_mismatch(block.expected.body, printed)
    if why is not None:
        pytest.fail(f"{where}: the printed output differs from the page's (line "
                    f"{block.expected.line}): {why}\n--- shown\n{block.expected.body}--- printed\n{printed}")


def test_blocks_are_found() -> None:
    assert len(BLOCKS) >= 40, [b.id for b in BLOCKS]
    assert sum(b.expected is not None for b in BLOCKS) >= 30


def test_outputs_are_labelled() -> None:
    """A bare fence right after a ```python block would be output nobody checks."""
    bad = []
    for page in PAGES:
        page_lines = page.read_text(encoding="utf-8").splitlines()
        fs = fences(page)
        for a, b in itertools.pairwise(fs):
            if a.language in RUN_LANGUAGES and not b.info and blank_between(page_lines, a, b):
                bad.append(f"{page.relative_to(ROOT)}:{b.line}")
    assert not bad, f"label these output fences ```text (or separate them from the code): {bad}"


def test_python_blocks_are_code_not_sessions() -> None:
    """Interactive prompts (>>>) do not run: show the call and print, then the ```text output."""
    bad = [b.id for b in BLOCKS if re.search(r"^\s*>>>", b.fence.body, re.MULTILINE)]
    assert not bad, bad


def test_no_run_blocks_are_few_and_say_why() -> None:
    no_run = [b for b in BLOCKS if b.fence.no_run]
    for b in no_run:
        assert no_run_reason(b), (f"{b.id}: a ```python no-run block needs a reason in the paragraph "
                                  f"before it: {NO_RUN_REASON} ...")
    assert len(no_run) <= MAX_NO_RUN, [b.id for b in no_run]


@pytest.mark.parametrize(
    ("shown", "printed", "ok"),
    [
        ("loss 1.395192 -> 0.633504", "loss 1.395192 -> 0.633504", True),
        ("loss 1.395192 -> 0.633504", "loss 1.3951921 -> 0.6335035", True),
        ("loss 1.395192 -> 0.633504", "loss 1.395192 -> 0.633505", False),
        ("9.4e-12", "9.36e-12", True),
        ("9.4e-12", "9.3e-12", False),
        ("87 4039936", "87 4039937", False),
        ("(2, 256) float32", "(2, 256) float64", False),
        ("max rel err < 1e-10", "max rel err 9.4e-12", True),
        ("max rel err < 1e-10", "max rel err 2.0e-10", False),
        ("True ~3e-7", "True 2.9e-07", True),
        ("True ~3e-7", "True 0.0", False),
        ("x  32     < 1e-10  (1, 4, 5)", "x  32     1.67e-11  (1, 4, 5)", True),
        ("self.0 -> self.1", "self.0 -> self.2", False),
        ("[-1.  0.  1.]", "[-1.  0.  1.]", True),
        ("0.5", "0.44", False),
        ("0.0 0.00e+00", "0.0 0.00e+00", True),
        ("0.0", "1.2e-17", False),
        ("[-1.  -0.  0.7071]", "[-1.   0.   0.7071]", True),
    ],
)
def test_the_comparison_rule(shown: str, printed: str, ok: bool) -> None:
    assert (output_mismatch(shown, printed) is None) is ok


def test_the_fence_parser(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n"
        "Not an output:\n\n```text\nx\n```\n\n```py\nx = 1\n```\nbetween\n```output\n1\n```\n\n"
        "Needs the Hub. Not run by the tests: it downloads weights.\n\n"
        "````python no-run\nfrom_pretrained()\n```\n````\n\n```sh\nmake test\n```\n",
        encoding="utf-8",
    )
    blocks = page_blocks(page)
    assert [(b.index, b.fence.line, b.fence.runs) for b in blocks] == [(0, 3, True), (1, 17, True),
                                                                       (2, 27, False)]
    assert blocks[0].expected is not None and blocks[0].expected.body == "1\n"
    assert blocks[1].expected is None  # text between: not its output
    assert blocks[2].fence.no_run and blocks[2].fence.body == "from_pretrained()\n```\n"
    assert no_run_reason(blocks[2]) == "it downloads weights."
    assert no_run_reason(blocks[0]) is None
    (tmp_path / "open.md").write_text("```python\nx = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="never closed"):
        fences(tmp_path / "open.md")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    run_page_worker(Path(sys.argv[2]), Path(sys.argv[3]))
