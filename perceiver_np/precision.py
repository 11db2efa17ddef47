"""Reduced precision: how far a float16 or bfloat16 deployment of a model is from float64, per layer.

::

    rep = report(model, x, mask)              # or: perceiver-np precision-report golden.npz
    print(rep); rep.run("bfloat16").layer("output").rms_rel; rep.plot("precision.png")

The emulation. A deployment in a 16-bit format stores every tensor in that format and computes
each layer in a wider accumulator. :func:`emulate` runs the model so: the parameters (and
buffers, and fixed tables such as Fourier queries), cast to float32, are rounded to the format;
the input is rounded to it; then the float32 plain-attention-path forward runs, and every
activation it records, i.e. every tensor a golden file names (``act/<name>``, in
:func:`perceiver_np.verify.golden_names`' order: each LayerNorm's, projection's, attention
score's and probability's, GELU's, residual sum's and block's output), is rounded to the format
the moment it is made, before anything downstream reads it. The arithmetic between two such
boundaries is float32: the matrix products accumulate in float32, a LayerNorm's mean and
variance, a softmax's sum and a GELU are float32, and only their outputs are rounded. (Values
between two boundaries that the golden file does not name, e.g. the heads split from a
projection or the softmax's exponentials, stay float32.) The cross blocks' attention scores
keep the mask's fill value at the masked keys, as a deployment picks a fill its format holds.

Rounding is round-to-nearest, ties to even, from float32: :func:`round_bfloat16` on the float32
bit pattern (bfloat16 is float32's upper 16 bits), :func:`round_float16` through NumPy's
float16. A value beyond the format's largest finite one becomes +-inf: float16's largest is
65504, and a run whose activations overflow it stops at the model's next finiteness check; the
report names the first activation that overflowed.

The numbers. For each activation, against the float64 reference run (the same parameters,
unrounded, the same input, :func:`perceiver_np.verify.float64_reference`'s path), normwise as
``perceiver-np compare``::

    max rel = max |a - r| / max |r|          rms rel = ||a - r||_2 / ||r||_2

(the absolute error where the reference is all zeros; the cross blocks' scores over the kept
keys only). The *accumulated* error is that of the emulated run: everything upstream in the
format. The *local* error is what the layer adds by itself: the same forward in which every
recorded activation is replaced, once the layer that made it is done, by the float64
reference's value rounded to the format, so that each layer computes from the exact inputs as
the format holds them (parameters rounded as before) and only its own rounding and float32
arithmetic show. Where the accumulated error is many times the local one, the layer inherits
its error; where they are close, the layer makes it.

A recorded run of another implementation (ONNX Runtime, OpenVINO, a PyTorch module in half
precision: any ``{"act/<name>": array}`` in the golden layout, e.g. what
:func:`perceiver_np.verify.record_torch` returns, or an ``.npz`` of it) of the same parameters
and inputs gets the accumulated numbers too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_write
from .model import Perceiver, step_names
from .pretrained import PretrainedPerceiver
from .verify import float64_reference, masked_score_names, plain_path

#: The formats emulated, with their significand precision p (bits, the implicit one included):
#: a value's relative rounding error is at most the unit roundoff 2^-p.
FORMATS: dict[str, int] = {"float16": 11, "bfloat16": 8}


def unit_roundoff(fmt: str) -> float:
    """2^-p of the format ``fmt``: float16 2^-11 (4.9e-4), bfloat16 2^-8 (3.9e-3)."""
    return 2.0 ** -FORMATS[_format(fmt)]


def _format(fmt: object) -> str:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def _as_float32(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype.name}")
    return arr.astype(np.float32, copy=False)


def round_bfloat16(x: Any) -> np.ndarray:
    """x (any shape; a float64 or float16 array is cast to float32 first) -> float32 array of
    the bfloat16 values nearest to x, ties to even.

    bfloat16 is float32 with the low 16 bits of the significand dropped, the same exponent
    range, so rounding works on the float32 bit pattern: adding 0x7FFF plus the lowest kept bit
    and clearing the low 16 bits rounds the significand to nearest, ties to even; a carry out of
    it moves the exponent up, which also rounds a value beyond bfloat16's largest finite one
    (3.3895e38) to infinity and a subnormal to its nearest subnormal or normal neighbour. +-inf
    stay; a NaN becomes the quiet NaN 0x7FC0 with its sign (as ml_dtypes rounds)."""
    bits = _as_float32(x, "x").view(np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    finite_or_inf = np.where(nan, np.uint32(0), bits)  # NaNs out of the sum: no wrap-around
    lowest_kept = (finite_or_inf >> np.uint32(16)) & np.uint32(1)
    rounded = (finite_or_inf + np.uint32(0x7FFF) + lowest_kept) & np.uint32(0xFFFF0000)
    quiet_nan = (bits & np.uint32(0x80000000)) | np.uint32(0x7FC00000)
    return np.where(nan, quiet_nan, rounded).astype(np.uint32).view(np.float32)


def round_float16(x: Any) -> np.ndarray:
    """x (any shape; a float64 array is cast to float32 first) -> float32 array of the float16
    values nearest to x, ties to even (NumPy's float16 conversion: subnormals down to 2^-24,
    beyond 65504 to +-inf), widened back to float32 exactly."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _as_float32(x, "x").astype(np.float16).astype(np.float32)


def round_to(x: Any, fmt: str) -> np.ndarray:
    """:func:`round_float16` or :func:`round_bfloat16` of ``x`` by the name of the format."""
    return round_bfloat16(x) if _format(fmt) == "bfloat16" else round_float16(x)


# ---------------------------------------------------------------------------------------------
# The emulated forward
# ---------------------------------------------------------------------------------------------


class _Boundaries(dict[str, np.ndarray]):
    """The record a forward fills (:func:`perceiver_np.layers.tap` calls :meth:`rewrite` with
    each activation before it stores it): every floating activation is rounded to ``fmt`` in
    place, so the rest of the forward reads the rounded value, and kept in :attr:`outputs`.

    ``keep``: activation name -> bool array broadcasting to it, True where the value is rounded
    (the masked scores' kept keys; the fill stays). ``exact``: the float64 reference's
    activations; given, each activation is kept as computed and rounded, then replaced by the
    reference's value rounded to the format (the local-error run)."""

    def __init__(self, fmt: str, keep: Mapping[str, np.ndarray],
                 exact: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.fmt, self.keep, self.exact = fmt, keep, exact
        self.outputs: dict[str, np.ndarray] = {}
        self.overflow: str | None = None  # the first activation rounded to +-inf from a finite value

    def _round(self, name: str, value: np.ndarray) -> np.ndarray:
        rounded = round_to(value, self.fmt)
        keep = self.keep.get(name)
        return rounded if keep is None else np.where(keep, rounded, value)

    def rewrite(self, name: str, value: Any) -> None:
        if isinstance(value, Mapping):  # a published model's dict of logits: output.<key>
            for key, v in value.items():
                self.rewrite(f"{name}.{key}", v)
            return
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            return  # token ids: nothing to round
        rounded = self._round(name, value)
        if self.overflow is None and bool((np.isinf(rounded) & np.isfinite(value)).any()):
            self.overflow = name
        self.outputs[name] = rounded
        target = rounded
        # the final logits feed nothing; a published model's encoder also taps its latents as
        # "output", the very array its last block's output tap already replaced
        if self.exact is not None and name.split(".")[0] != "output":
            target = self._round(name, self.exact[name].astype(value.dtype))
        if value.flags.writeable:
            value[...] = target
        elif not np.array_equal(value, target, equal_nan=True):
            raise RuntimeError(f"{name}: the forward records a read-only view here (a broadcast "
                               "parameter?) whose value is not the rounded one; it cannot be rewritten")


def _rounded_model(model: Perceiver | PretrainedPerceiver, fmt: str) -> Perceiver | PretrainedPerceiver:
    """The float32, plain-attention-path model whose parameters (buffers, fixed tables) are
    ``model``'s cast to float32 and rounded to ``fmt``."""
    if isinstance(model, Perceiver):
        cfg = model.config.replace(dtype="float32", backend="numpy")
        out = Perceiver(cfg, {k: round_to(v, fmt) for k, v in model.params.items()})
        # tables the model computes for itself: the Fourier output queries and input features
        for table in ("fixed_queries", "input_positions"):
            if getattr(out, table, None) is not None:
                setattr(out, table, round_to(getattr(out, table), fmt))
        return out
    return plain_path(PretrainedPerceiver(
        model.architecture, model.hf_config, {k: round_to(v, fmt) for k, v in model.params.items()},
        {k: round_to(v, fmt) if v.dtype.kind == "f" else v for k, v in model.buffers.items()},
        dtype="float32"))


def _reference_model(model: Perceiver | PretrainedPerceiver) -> Perceiver | PretrainedPerceiver:
    if isinstance(model, Perceiver):
        cfg = model.config.replace(dtype="float64", backend="numpy")
        return Perceiver(cfg, {k: np.asarray(v, dtype=np.float64) for k, v in model.params.items()})
    if isinstance(model, PretrainedPerceiver):
        return float64_reference(model)
    raise TypeError(f"model: expected a Perceiver or a PretrainedPerceiver, got {type(model).__name__}")


def _inputs(x: Any, dtype: type, fmt: str | None) -> Any:
    """The run's inputs: float arrays in ``dtype`` (rounded to ``fmt`` if given), integer ones
    (token ids) as they are; a dict of them key by key."""
    if isinstance(x, Mapping):
        return {str(k): _inputs(v, dtype, fmt) for k, v in x.items()}
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        return arr
    arr = np.array(arr, dtype=dtype)
    return arr if fmt is None else round_to(arr, fmt)


def _forward(model: Perceiver | PretrainedPerceiver, x: Any, mask: Any, queries: Any,
             options: Mapping[str, Any] | None, record: dict[str, np.ndarray]) -> Any:
    """One forward of ``model`` recording into ``record`` -> its output (array or dict)."""
    if isinstance(model, PretrainedPerceiver):
        if queries is not None:
            raise ValueError(f"queries: {model.architecture} makes its own decoder queries; pass none")
        return model.forward(x, mask, record=record, **dict(options or {}))[0]
    if options:
        raise ValueError(f"options: a Perceiver takes no decoder options, got {sorted(options)}")
    return model.forward(x, mask, queries=queries, record=record)[0]


def _in_order(record: dict[str, np.ndarray], y: Any) -> dict[str, np.ndarray]:
    """The recorded activations with the model's output last, ``output`` or, for a dict of
    logits, ``output.<key>`` in key order (as a golden file holds them)."""
    out = {k: v for k, v in record.items() if k != "output" and not k.startswith("output.")}
    if isinstance(y, Mapping):
        out.update({f"output.{k}": record[f"output.{k}"] for k in sorted(y)})
    else:
        out["output"] = record["output"]
    return out


@dataclass(frozen=True)
class Reference:
    """The float64 reference run: its activations in forward order (float64) and, per masked
    attention-score activation, the bool array [B, 1, 1, N] of its kept keys."""

    activations: dict[str, np.ndarray]
    keep: dict[str, np.ndarray]


def reference(model: Perceiver | PretrainedPerceiver, x: Any, mask: Any = None, *,
              queries: Any = None, options: Mapping[str, Any] | None = None) -> Reference:
    """The float64 run of ``model`` (parameters cast, exact from float32; the plain attention
    path), every activation recorded: what :func:`report` measures against. ``x``, ``mask``,
    ``queries`` (a Perceiver's, ``query_source="given"``) and ``options`` (a published model's
    decoder options) are the model's call arguments."""
    ref = _reference_model(model)
    record: dict[str, np.ndarray] = {}
    y = _forward(ref, _inputs(x, np.float64, None), mask,
                 None if queries is None else _inputs(queries, np.float64, None), options, record)
    if isinstance(y, Mapping):
        record.update({f"output.{k}": np.asarray(v) for k, v in y.items()})
    return Reference(_in_order(record, y), _kept_keys(ref, mask))


def _kept_keys(model: Perceiver | PretrainedPerceiver, mask: Any) -> dict[str, np.ndarray]:
    """Masked attention-score activation name -> its kept keys, bool [B, 1, 1, N] (the cross
    blocks' scores [B, H, M, N]; their masked keys hold the fill value)."""
    if mask is None:
        return {}
    m = np.asarray(mask).astype(bool)  # an HF integer attention mask is 1 = keep
    scores = [f"{step}.attn.scores" for step in step_names(model.config)]
    return {name: m[:, None, None, :] for name in masked_score_names(model.config, scores)}


@dataclass(frozen=True)
class Emulation:
    """One emulated run: ``activations`` (float32 arrays holding values of the format) in
    forward order, and ``overflow``, the first activation that overflowed the format (the run
    then stopped at the model's next finiteness check, so later activations are absent)."""

    format: str
    activations: dict[str, np.ndarray]
    overflow: str | None


def emulate(model: Perceiver | PretrainedPerceiver, x: Any, mask: Any = None, *, format: str,
            queries: Any = None, options: Mapping[str, Any] | None = None,
            local: Reference | None = None) -> Emulation:
    """``model`` run in ``format`` ("float16" or "bfloat16") as the module docstring describes:
    parameters and input rounded, every recorded activation rounded the moment it is made,
    float32 arithmetic in between. ``local``: the float64 :func:`reference` of the same call;
    given, every activation is replaced by the reference's (rounded) once recorded, so each
    recorded value is what its layer computes from the exact inputs (the local-error run).

    The activations are those a golden file names; for a Perceiver that includes ``input``, the
    rounded input. Returns an :class:`Emulation`."""
    fmt = _format(format)
    if not isinstance(model, (Perceiver, PretrainedPerceiver)):
        raise TypeError(f"model: expected a Perceiver or a PretrainedPerceiver, got {type(model).__name__}")
    emu = _rounded_model(model, fmt)
    boundaries = _Boundaries(fmt, _kept_keys(emu, mask), None if local is None else local.activations)
    if isinstance(emu, Perceiver):  # the input is a boundary: rounded before anything reads it
        inputs = _inputs(x, np.float32, None)
        boundaries.rewrite("input", inputs)
    else:
        inputs = _inputs(x, np.float32, fmt)
        if _overflowed(x, inputs):
            boundaries.overflow = "inputs"
    q = None if queries is None else _inputs(queries, np.float32, fmt)
    try:
        with np.errstate(all="ignore"):  # an overflow is reported as such, not as a warning
            y = _forward(emu, inputs, mask, q, options, boundaries)
        acts = _in_order(boundaries.outputs, y)
    except ValueError:
        if boundaries.overflow is None:
            raise
        acts = dict(boundaries.outputs)  # up to the finiteness check that stopped the run
    return Emulation(fmt, acts, boundaries.overflow)


def _overflowed(raw: Any, rounded: Any) -> bool:
    if isinstance(raw, Mapping):
        return any(_overflowed(raw[k], rounded[str(k)]) for k in raw)
    arr = np.asarray(raw)
    return arr.dtype.kind == "f" and bool((np.isinf(rounded) & np.isfinite(arr)).any())


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def relative_errors(got: np.ndarray, ref: np.ndarray, keep: np.ndarray | None = None
                    ) -> tuple[float, float, int]:
    """(max rel, rms rel, entries not finite where the reference is) of ``got`` against the
    float64 ``ref`` over the entries where ``keep`` (broadcasting to ref) is True, or all:
    ``max|got - ref| / max|ref|`` and ``||got - ref||_2 / ||ref||_2`` (absolute where the
    reference is all zeros), both inf when an entry is not finite."""
    if got.shape != ref.shape:
        raise ValueError(f"got: shape {got.shape} does not fit the reference's {ref.shape}")
    a, r = got.astype(np.float64), ref.astype(np.float64)
    if keep is not None:
        kept = np.broadcast_to(keep, r.shape)
        a, r = a[kept], r[kept]
    bad = int(np.count_nonzero(~np.isfinite(a) & np.isfinite(r)))
    if bad or a.size == 0:
        return (math.inf, math.inf, bad) if bad else (0.0, 0.0, 0)
    diff = a - r
    top, norm = float(np.abs(r).max()), math.sqrt(float(np.sum(np.square(r))))
    max_abs, rms = float(np.abs(diff).max()), math.sqrt(float(np.sum(np.square(diff))))
    return (max_abs / top if top > 0 else max_abs), (rms / norm if norm > 0 else rms), 0


@dataclass(frozen=True)
class LayerError:
    """One activation's errors against float64 (see the module docstring)."""

    name: str  # the golden activation name (act/<name> without act/)
    shape: tuple[int, ...]
    max_rel: float  # accumulated: max |a - r| / max |r|
    rms_rel: float  # accumulated: ||a - r||_2 / ||r||_2
    local_max_rel: float | None  # the layer alone, from the exact inputs (None: a recorded run)
    local_rms_rel: float | None
    nonfinite: int  # entries inf or NaN where the reference is finite (an overflow)


@dataclass(frozen=True)
class FormatRun:
    """One format's (or one recording's) errors, per activation in forward order."""

    format: str  # "float16", "bfloat16", or the recorded run's label
    unit_roundoff: float | None  # 2^-p of the format; None for a recorded run
    params_max_rel: float | None  # the worst parameter tensor's rounding (max rel); None: recorded
    layers: tuple[LayerError, ...]
    overflow: str | None  # the first activation that overflowed the format, if one did
    missing: tuple[str, ...]  # reference activations this run does not have

    def layer(self, name: str) -> LayerError:
        """The row of activation ``name``."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"{name!r}: no such activation in the {self.format} run")


@dataclass(frozen=True)
class PrecisionReport:
    """:func:`report`'s result: one :class:`FormatRun` per format, then the recorded run."""

    names: tuple[str, ...]  # every activation of the float64 reference, in forward order
    runs: tuple[FormatRun, ...]
    masked_scores: tuple[str, ...]  # compared at the kept keys only

    def run(self, label: str) -> FormatRun:
        for r in self.runs:
            if r.format == label:
                return r
        raise KeyError(f"{label!r}: the report has {', '.join(r.format for r in self.runs)}")

    def to_json(self) -> dict[str, Any]:
        """The report as JSON values; an error that is not finite (an overflow) is null."""
        def finite(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: finite(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [finite(v) for v in value]
            return value

        return {"names": list(self.names), "masked_scores": list(self.masked_scores),
                "runs": [finite(asdict(r)) for r in self.runs]}

    def __str__(self) -> str:
        width = max([len(n) for n in self.names] + [10])
        blocks = []
        for run in self.runs:
            if run.unit_roundoff is None:
                head = f"{run.format}: a recorded run"
            else:
                head = (f"{run.format}: {FORMATS[run.format]} significand bits, unit roundoff "
                        f"{run.unit_roundoff:.1e}; parameters rounded by at most "
                        f"{run.params_max_rel:.1e} (max rel)")
            lines = [head, f"{'activation':<{width}}  {'shape':<18}{'max rel':>9}  {'rms rel':>9}"
                     + ("" if run.unit_roundoff is None else f"  {'local max':>9}  {'local rms':>9}")]
            for row in run.layers:
                line = (f"{row.name:<{width}}  {row.shape!s:<18}{row.max_rel:>9.1e}  {row.rms_rel:>9.1e}")
                if row.local_max_rel is not None and row.local_rms_rel is not None:
                    line += f"  {row.local_max_rel:>9.1e}  {row.local_rms_rel:>9.1e}"
                if row.nonfinite:
                    line += f"  {row.nonfinite} not finite"
                lines.append(line)
            if run.overflow is not None:
                lines.append(f"overflow: {run.overflow} exceeds {run.format}'s range; the run stopped at "
                             "the next finiteness check")
            if run.missing:
                lines.append(f"not in this run ({len(run.missing)}): {', '.join(run.missing)}")
            blocks.append("\n".join(lines))
        if self.masked_scores:
            blocks.append(f"compared at the keys the mask keeps only: {', '.join(self.masked_scores)}")
        return "\n\n".join(blocks)

    def plot(self, path: str | Path) -> Path:
        """A PNG at ``path`` (written atomically): the rms relative error of every activation in
        forward order, log scale, one line per format (accumulated solid, local dashed) and
        markers for a recorded run. Needs matplotlib."""
        plt = _pyplot()
        path = Path(path)
        x = np.arange(len(self.names))
        fig, ax = plt.subplots(figsize=(max(8.0, 0.14 * len(self.names)), 5.0))
        try:
            for run in self.runs:
                rows = {r.name: r for r in run.layers}
                at = [i for i, n in enumerate(self.names) if n in rows]
                acc = [_plottable(rows[self.names[i]].rms_rel) for i in at]
                if run.unit_roundoff is None:
                    ax.plot(at, acc, "o", markersize=3, label=f"{run.format} (recorded)")
                    continue
                line, = ax.plot(at, acc, "-", linewidth=1.2, label=f"{run.format}, accumulated")
                local = [_plottable(rows[self.names[i]].local_rms_rel) for i in at]
                ax.plot(at, local, "--", linewidth=1.0, color=line.get_color(),
                        label=f"{run.format}, local")
                ax.axhline(run.unit_roundoff, color=line.get_color(), linewidth=0.6, linestyle=":")
            ax.set_yscale("log")
            ax.set_xticks(x, self.names, rotation=90, fontsize=5)
            ax.set_xlim(-0.5, len(self.names) - 0.5)
            ax.set_ylabel("rms relative error against float64")
            ax.set_title("error per activation, in forward order (dotted: the unit roundoff)")
            ax.grid(True, which="major", axis="y", linewidth=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150))
        finally:
            plt.close(fig)
        return path


def _plottable(value: float | None) -> float:
    return math.nan if value is None or not math.isfinite(value) or value <= 0 else value


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or an ImportError saying how to
    get it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the precision plot needs matplotlib, which is not installed: "
                          "pip install matplotlib (or perceiver_np's [bench] extra)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load_recorded(recorded: Mapping[str, Any] | str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """(label, {name: array}) of a recorded run: its act/<name> arrays."""
    if isinstance(recorded, (str, Path)):
        try:
            with open(recorded, "rb") as f, np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k.startswith("act/")}
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"recorded: {recorded} is not a readable .npz file ({err})") from err
        label = Path(recorded).name
    elif isinstance(recorded, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in recorded.items() if str(k).startswith("act/")}
        label = "recorded"
    else:
        raise TypeError(f"recorded: expected a dict in the golden layout or an .npz path, got "
                        f"{type(recorded).__name__}")
    return label, {k[len("act/"):]: v for k, v in arrays.items()}


def report(model: Perceiver | PretrainedPerceiver, x: Any, mask: Any = None, *,
           formats: Iterable[str] = ("float16", "bfloat16"),
           recorded: Mapping[str, Any] | str | Path | None = None, queries: Any = None,
           options: Mapping[str, Any] | None = None) -> PrecisionReport:
    """Per-activation errors of ``model`` emulated in each of ``formats`` against its float64
    run, accumulated and local (the module docstring), and of a ``recorded`` run of another
    implementation (a dict in the golden layout, ``act/<name>`` arrays, or an ``.npz`` of one)
    of the same parameters and inputs.

    ``x`` [B, N, C] and ``mask`` [B, N] (a published model: the inputs its HF class takes and
    the text models' attention mask), ``queries`` [B, O, Cq] (``query_source="given"``) and
    ``options`` (a published model's decoder options) are the model's call arguments."""
    wanted = [_format(f) for f in formats]
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"formats: each format once, got {wanted}")
    ref = reference(model, x, mask, queries=queries, options=options)
    names = tuple(ref.activations)
    runs = []
    for fmt in wanted:
        acc = emulate(model, x, mask, format=fmt, queries=queries, options=options)
        loc = emulate(model, x, mask, format=fmt, queries=queries, options=options, local=ref)
        rows = []
        for name in names:
            if name not in acc.activations:
                continue
            r, k = ref.activations[name], ref.keep.get(name)
            max_rel, rms_rel, bad = relative_errors(acc.activations[name], r, k)
            local_max, local_rms = None, None
            if name in loc.activations:
                local_max, local_rms, _ = relative_errors(loc.activations[name], r, k)
            rows.append(LayerError(name, tuple(r.shape), max_rel, rms_rel, local_max, local_rms, bad))
        runs.append(FormatRun(fmt, unit_roundoff(fmt), _params_error(model, fmt), tuple(rows),
                              acc.overflow, tuple(n for n in names if n not in acc.activations)))
    if recorded is not None:
        runs.append(_recorded_run(recorded, ref))
    if not runs:
        raise ValueError("formats: no format given and no recorded run: nothing to report")
    return PrecisionReport(names, tuple(runs), tuple(ref.keep))


def _params_error(model: Perceiver | PretrainedPerceiver, fmt: str) -> float:
    """The largest max rel rounding error over the parameter tensors (cast to float32, then
    rounded), against their float64 values."""
    worst = 0.0
    for value in model.params.values():
        exact = np.asarray(value, dtype=np.float64)
        worst = max(worst, relative_errors(round_to(value, fmt), exact)[0])
    return worst


def _recorded_run(recorded: Mapping[str, Any] | str | Path, ref: Reference) -> FormatRun:
    label, arrays = _load_recorded(recorded)
    rows = []
    for name, r in ref.activations.items():
        if name not in arrays:
            continue
        got = arrays[name]
        if got.shape != r.shape:
            raise ValueError(f"recorded: act/{name} has shape {got.shape}, the reference's is {r.shape} "
                             "(a recording of another model or input?)")
        if got.dtype.kind not in "fiu":
            raise ValueError(f"recorded: act/{name} has dtype {got.dtype.name}, not a number")
        max_rel, rms_rel, bad = relative_errors(got, r, ref.keep.get(name))
        rows.append(LayerError(name, tuple(r.shape), max_rel, rms_rel, None, None, bad))
    if not rows:
        raise ValueError(f"recorded: {label} holds no activation of the reference run (expected "
                         f"act/<name> arrays, e.g. act/{next(iter(ref.activations))})")
    missing = tuple(n for n in ref.activations if n not in arrays)
    return FormatRun(label, None, None, tuple(rows), None, missing)


def write_json(path: str | Path, rep: PrecisionReport) -> Path:
    """``rep.to_json()`` written atomically to ``path``."""
    text = json.dumps(rep.to_json(), indent=1).encode()
    atomic_write(Path(path), lambda f: f.write(text))
    return Path(path)
