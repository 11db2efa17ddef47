"""Golden files and comparison reports: check another implementation against this one.

::

    write_golden("golden.npz", model64, x, mask, seed=0)      # or: perceiver-np golden ...
    report = compare("golden.npz", "theirs.npz")              # or: perceiver-np compare ...
    print(report); report.ok; report.first_break

A golden file (``.npz``, no pickle, written atomically) holds, in float64: the config (JSON),
the parameters ``params/<name>``, the inputs ``input/x`` (and ``input/mask``,
``input/queries``), every intermediate activation of the forward pass ``act/<name>`` under the
stable names of :func:`perceiver_np.model.step_names` (``cross.0.q_norm.out``,
``cross.0.attn.scores``, ``cross.0.attn.probs``, ``self.1.ffn.up.out``, ..., ``output``), the
loss ``L = sum(dy * output)`` with its seeded upstream gradient ``loss/dy``, and the gradient of
every parameter ``grad/<name>`` and of the input ``grad/x``. Another port writes the same names
(whichever it has) into its own ``.npz``; :func:`compare` reports every tensor present in both
and names the FIRST one, in forward order, that breaks its tolerance as the likely bug site
(then the gradients, in backward order). A golden tensor missing from theirs fails the
comparison unless ``allow_missing=True``, and a comparison of no activation or no gradient
always fails. The cross blocks' attention scores are compared only at the keys the mask keeps:
the value a port fills masked keys with is not part of the contract.

A published Perceiver (:class:`perceiver_np.pretrained.PretrainedPerceiver`, Hugging Face's
``PerceiverFor*`` classes) has a golden file too: ``meta.json`` then also holds its
``architecture`` and ``hf_config`` (config.json) and ``config`` is its encoder's; the file holds
its buffers ``buffers/<name>`` (batch norm's running statistics), its inputs in their own dtype
(``input/x``: int token ids stay int; a dict of inputs, the multimodal model's, as
``input/x.<key>``; the decoder's call options as ``input/option.<name>[.<key>]``), the
activations under the model's stable names (``preprocessor.out``, the encoder's, ``decoder.*``,
``postprocessor.out``, ``output``; dict logits as ``output.<key>``), the loss with its upstream
gradient (``loss/dy``, or ``loss/dy.<key>`` for dict logits) and every parameter's gradient, in
backward order (postprocessor, decoder, encoder, preprocessor); no input gradient. It runs the
plain attention path, so that every attention's scores and probabilities are recorded.
:func:`golden_model` rebuilds the reference model and its run's arguments from a golden file of
either kind.

:func:`record_torch` records a float64 PyTorch module (forward hooks on named submodules, one
backward of ``loss/dy``) in this layout, to be ``np.savez``-ed and compared;
:func:`hf_record_names` gives its name maps for Hugging Face's ``PerceiverModel``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_savez
from .checkpoint import hf_config_json
from .config import PerceiverConfig, make_config, param_shapes
from .jax_record import JaxTap, deepmind_record_names, record_flax, record_haiku  # noqa: F401 - re-exported
from .krasserm import record_krasserm  # noqa: F401 - re-exported
from .lucidrains import record_lucidrains  # noqa: F401 - re-exported
from .model import Perceiver, step_names
from .onnx_record import onnx_module_names, onnx_record_names, onnx_value_names, record_onnx, schema_taps  # noqa: F401 - re-exported
from .pretrained import PretrainedPerceiver
from .tolerances import GOLDEN_FLOAT32_RTOL, GOLDEN_FLOAT64_RTOL, GOLDEN_GRAD_FLOOR
from .torch_record import TorchParam, TorchTap, record_torch  # noqa: F401 - re-exported

FORMAT = "perceiver_np.golden"
VERSION = 1


def write_golden(
    path: str | Path,
    model: Perceiver | PretrainedPerceiver,
    x: Any,
    mask: np.ndarray | None = None,
    *,
    seed: int = 0,
    queries: np.ndarray | None = None,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Run ``model`` (recast to float64, plain attention path) on ``x`` and write everything
    another implementation needs to check itself: see the module docstring.

    For a :class:`PretrainedPerceiver`, ``x`` is what its HF class takes (token ids, pixel
    values, flow frames, or a dict of arrays), ``mask`` the text models' attention mask and
    ``options`` the decoder's call options (the multimodal model's
    ``subsampled_output_points``); ``queries`` belongs to a Perceiver only."""
    if isinstance(model, PretrainedPerceiver):
        return _write_golden_pretrained(Path(path), model, x, mask, seed, queries, options)
    if options:
        raise ValueError(f"options: a Perceiver takes no decoder options, got {sorted(options)}")
    cfg = model.config.replace(dtype="float64", backend="numpy")
    ref = Perceiver(cfg, {k: v.astype(np.float64) for k, v in model.params.items()})
    run = run_and_record(ref, x, mask, seed=seed, queries=queries)
    arrays: dict[str, np.ndarray] = {f"params/{k}": v for k, v in ref.params.items()}
    arrays["input/x"] = np.asarray(x, dtype=np.float64)
    if mask is not None:
        arrays["input/mask"] = np.asarray(mask)
    if queries is not None:
        arrays["input/queries"] = np.asarray(queries, dtype=np.float64)
    arrays.update(run)
    meta = {"format": FORMAT, "version": VERSION, "config": asdict(cfg), "seed": seed,
            "activations": [k[4:] for k in run if k.startswith("act/")],
            "gradients": [k[5:] for k in run if k.startswith("grad/")]}
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_savez(Path(path), arrays)
    return Path(path)


def _write_golden_pretrained(path: Path, model: PretrainedPerceiver, x: Any, mask: np.ndarray | None,
                             seed: int, queries: np.ndarray | None, options: Mapping[str, Any] | None
                             ) -> Path:
    if queries is not None:
        raise ValueError(f"queries: {model.architecture} makes its own decoder queries; pass none")
    hf_config = hf_config_json(model)  # checked to rebuild the same model
    ref = float64_reference(model)
    inputs = _float64_inputs(x)
    run = run_and_record(ref, inputs, mask, seed=seed, options=options)
    arrays: dict[str, np.ndarray] = {f"params/{k}": v for k, v in ref.params.items()}
    arrays.update({f"buffers/{k}": v for k, v in ref.buffers.items()})
    if isinstance(inputs, Mapping):
        arrays.update({f"input/x.{k}": v for k, v in inputs.items()})
    else:
        arrays["input/x"] = inputs
    if mask is not None:
        arrays["input/mask"] = np.asarray(mask)
    arrays.update(_flat_options(options))
    arrays.update(run)
    meta = {"format": FORMAT, "version": VERSION, "config": asdict(ref.config),
            "seed": seed, "architecture": model.architecture, "hf_config": hf_config,
            "activations": [k[4:] for k in run if k.startswith("act/")],
            "gradients": [k[5:] for k in run if k.startswith("grad/")]}
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_savez(path, arrays)
    return path


def float64_reference(model: PretrainedPerceiver) -> PretrainedPerceiver:
    """A float64 copy of a published ``model`` (parameters and buffers cast, exact from
    float32) on the plain attention path: the golden file's reference run."""
    return plain_path(_cast_pretrained(model, "float64"))


def cast(model: Perceiver | PretrainedPerceiver, dtype: str) -> Perceiver | PretrainedPerceiver:
    """The same model in ``dtype`` ("float32" or "float64"): parameters (and a published
    model's buffers) cast, the config's other fields (its attention path too) kept. E.g. the
    float32 run to compare with a golden file: ``write_run(out, cast(model, "float32"), ...)``."""
    if isinstance(model, Perceiver):
        cfg = model.config.replace(dtype=dtype)
        return Perceiver(cfg, {k: np.asarray(v, dtype=cfg.np_dtype) for k, v in model.params.items()})
    if not isinstance(model, PretrainedPerceiver):
        raise TypeError(f"model: expected a Perceiver or a PretrainedPerceiver, got {type(model).__name__}")
    return _cast_pretrained(model, dtype)


def _cast_pretrained(model: PretrainedPerceiver, dtype: str) -> PretrainedPerceiver:
    out = PretrainedPerceiver(model.architecture, model.hf_config,
                              {k: np.asarray(v, dtype=dtype) for k, v in model.params.items()},
                              {k: np.asarray(v, dtype=dtype) for k, v in model.buffers.items()}, dtype=dtype)
    return plain_path(out) if model.config.backend == "numpy" else out


def plain_path(model: PretrainedPerceiver) -> PretrainedPerceiver:
    """``model`` on the plain attention path (the encoder's config with ``backend="numpy"``,
    which the decoder follows): the same math as the kernels, with every attention's scores
    and probabilities recorded. The same parameters and buffers (not copied)."""
    if model.config.backend == "numpy":
        return model
    out = PretrainedPerceiver(model.architecture, model.hf_config, model.params, model.buffers,
                              dtype=model.config.dtype)
    encoder = out.encoder
    out.encoder = Perceiver(encoder.config.replace(backend="numpy"), encoder.params)
    return out


def sample_inputs(model: PretrainedPerceiver, rng: np.random.Generator, *, batch: int = 2,
                  length: int | None = None, mask: bool = False) -> tuple[Any, np.ndarray | None]:
    """(inputs, mask) of the shapes a published ``model``'s HF class takes, drawn from ``rng``:
    for a golden file of it (``write_golden(path, model, *sample_inputs(model, rng))``).

    Token ids [B, N] uniform over the vocabulary (N = ``length``, default
    max_position_embeddings); standard normal pixel values [B, 3, S, S] (S = the config's
    image_size); flow frames [B, 2, 3, H, W] (H, W = train_size); for the multimodal model
    ``{"audio": [B, num_frames * audio_samples_per_frame], "image": [B, num_frames, 3, S, S],
    "label": [B, num_labels]}``. ``mask`` (text models only): the last sample keeps only its
    first half, as ``perceiver-np golden --mask``."""
    if not isinstance(model, PretrainedPerceiver):
        raise TypeError(f"model: expected a PretrainedPerceiver, got {type(model).__name__}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an integer >= 1, got {batch!r}")
    c, pre, arch = model.hf_config, model.preprocessor, model.architecture
    text = arch in ("PerceiverForMaskedLM", "PerceiverForSequenceClassification")
    if mask and not text:
        raise ValueError(f"mask: {arch} takes no attention mask (only the text models do)")
    if length is not None and not text:
        raise ValueError(f"length: {arch} takes no sequence length (only the text models do)")
    if text:
        n = pre.max_positions if length is None else length
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= pre.max_positions:
            raise ValueError(f"length: expected an integer in [1, max_position_embeddings = "
                             f"{pre.max_positions}], got {n!r}")
        ids = rng.integers(0, pre.vocab, size=(batch, n))
        keep = None
        if mask:
            keep = np.ones((batch, n), dtype=bool)
            keep[-1, (n + 1) // 2:] = False
        return ids, keep
    size = int(c["image_size"])
    if arch == "PerceiverForOpticalFlow":
        h, w = (int(v) for v in c["train_size"])
        return rng.standard_normal((batch, 2, 3, h, w)), None
    if arch == "PerceiverForMultimodalAutoencoding":
        frames = int(c["num_frames"])
        return {"audio": rng.standard_normal((batch, frames * int(c["audio_samples_per_frame"]))),
                "image": rng.standard_normal((batch, frames, 3, size, size)),
                "label": rng.standard_normal((batch, pre.num_labels))}, None
    return rng.standard_normal((batch, 3, size, size)), None


def _float64_inputs(x: Any) -> Any:
    """The inputs of the float64 reference run: float arrays in float64 (exact), integer ones
    (token ids) as they are; a dict of them key by key."""
    if isinstance(x, Mapping):
        return {str(k): _float64_inputs(v) for k, v in x.items()}
    arr = np.asarray(x)
    return arr.astype(np.float64) if arr.dtype.kind == "f" else arr


def _flat_options(options: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The decoder's call options as golden arrays ``input/option.<name>[.<key>]`` (None values
    left out: they mean "absent")."""
    out: dict[str, np.ndarray] = {}
    for name, value in (options or {}).items():
        if isinstance(value, Mapping):
            out.update({f"input/option.{name}.{k}": np.asarray(v) for k, v in value.items() if v is not None})
        elif value is not None:
            out[f"input/option.{name}"] = np.asarray(value)
    return out


def run_and_record(
    model: Perceiver | PretrainedPerceiver,
    x: Any,
    mask: np.ndarray | None = None,
    *,
    seed: int = 0,
    queries: np.ndarray | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """One forward and backward of ``model`` (in its own dtype), recorded under the golden
    names: ``act/<name>`` in forward order, ``loss``, ``loss/dy`` (standard normal, seeded by
    ``seed``), then ``grad/<name>`` in backward order and ``grad/x``. Use the model's plain
    attention path (``backend="numpy"``) to record scores and probabilities.

    A :class:`PretrainedPerceiver` runs on its plain attention path (:func:`plain_path`) with
    ``options`` (its decoder's call options); dict logits give ``act/output.<key>`` and
    ``loss/dy.<key>`` (drawn in sorted key order from one generator), and there is no
    ``grad/x``."""
    if isinstance(model, PretrainedPerceiver):
        if queries is not None:
            raise ValueError(f"queries: {model.architecture} makes its own decoder queries; pass none")
        return _run_pretrained(plain_path(model), x, mask, seed, options)
    if options:
        raise ValueError(f"options: a Perceiver takes no decoder options, got {sorted(options)}")
    record: dict[str, np.ndarray] = {}
    y, cache = model.forward(x, mask, queries=queries, record=record)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    grads, dx = model.backward(dy, cache)
    out = {f"act/{k}": v for k, v in record.items()}
    out["loss"] = np.asarray(np.sum(dy * y))
    out["loss/dy"] = dy
    out.update({f"grad/{k}": grads[k] for k in reversed(list(grads))})
    out["grad/x"] = dx
    return out


def golden_names(config: PerceiverConfig | Mapping[str, Any]) -> list[str]:
    """The names a golden file of a Perceiver of ``config`` holds, in the file's order, without
    writing one: ``act/<name>`` in forward order (the plain attention path's, scores and
    probabilities included), ``loss``, ``loss/dy``, ``grad/<name>`` in backward order and
    ``grad/x`` (the inputs and parameters besides: ``input/x``, ``params/<name>``). They are
    read off one forward and backward of the float64 plain-path model with zero parameters on a
    [1, 2, C] input (the grid's N with ``input_fourier``), so they are the names
    :func:`write_golden` writes, by construction."""
    cfg = config if isinstance(config, PerceiverConfig) else make_config(**dict(config))
    cfg = cfg.replace(dtype="float64", backend="numpy")
    zero = Perceiver(cfg, {k: np.zeros(shape) for k, shape in param_shapes(cfg).items()})
    queries = None
    if cfg.decoder == "query" and cfg.query_source == "given":
        queries = np.zeros((1, 1, cfg.decoder_query_channels))
    n = math.prod(cfg.input_index_dims or ()) if cfg.input_fourier != "none" else 2  # the grid's N
    return list(run_and_record(zero, np.zeros((1, n, cfg.input_dim)), queries=queries))


#: The order of a published model's gradients in a golden file: its pieces in backward order
#: (each piece's parameters in reverse), the encoder's (every other name) between the decoder's
#: and the preprocessor's.
_BACKWARD_PIECES = {"postprocessor": 0, "decoder": 1, "preprocessor": 3}
_ENCODER_PIECE = 2


def _piece(name: str) -> int:
    return _BACKWARD_PIECES.get(name.split(".", 1)[0], _ENCODER_PIECE)


def _run_pretrained(model: PretrainedPerceiver, x: Any, mask: np.ndarray | None, seed: int,
                    options: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    record: dict[str, np.ndarray] = {}
    y, cache = model.forward(x, mask, record=record, **dict(options or {}))
    # "output" is the logits, last: the encoder taps its own output under that name first, and
    # a dict of logits is an object array in the record
    record.pop("output", None)
    rng = np.random.default_rng(seed)
    if isinstance(y, Mapping):
        ys = {f"output.{k}": y[k] for k in sorted(y)}
        dys = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in ys.items()}
        dy: Any = {k[len("output."):]: v for k, v in dys.items()}
        dy_names = {f"loss/dy.{k[len('output.'):]}": v for k, v in dys.items()}
    else:
        ys = {"output": y}
        dy = rng.standard_normal(y.shape).astype(y.dtype)
        dys, dy_names = {"output": dy}, {"loss/dy": dy}
    record.update(ys)
    grads = model.backward(dy, cache)
    out = {f"act/{k}": v for k, v in record.items()}
    loss = None
    for k, v in ys.items():  # sum(dy * y) over every logits array, in the logits' dtype
        term = np.sum(dys[k] * v)
        loss = term if loss is None else loss + term
    out["loss"] = np.asarray(loss)
    out.update(dy_names)
    names = sorted(reversed(list(grads)), key=_piece)  # stable: reversed within each piece
    out.update({f"grad/{k}": grads[k] for k in names})
    return out


def write_run(path: str | Path, model: Perceiver | PretrainedPerceiver, x: Any,
              mask: np.ndarray | None = None, *, seed: int = 0, queries: np.ndarray | None = None,
              options: Mapping[str, Any] | None = None) -> Path:
    """:func:`run_and_record` written to ``path``: a file :func:`compare` reads as "theirs"
    (e.g. this implementation in float32, or with weights of your own)."""
    atomic_savez(Path(path), run_and_record(model, x, mask, seed=seed, queries=queries, options=options))
    return Path(path)


def _load(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err


def read_golden(path: str | Path) -> tuple[PerceiverConfig, dict[str, np.ndarray], dict[str, Any]]:
    """-> (config, arrays, meta) of a golden file written by :func:`write_golden`."""
    arrays = _load(path)
    if "meta.json" not in arrays:
        raise ValueError(f"{path}: not a perceiver_np golden file (no meta.json)")
    meta = json.loads(arrays.pop("meta.json").tobytes().decode())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: expected format {FORMAT} version {VERSION}, "
                         f"got {meta.get('format')} version {meta.get('version')}")
    config: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return PerceiverConfig(**config), arrays, meta


def golden_model(path: str | Path) -> tuple[Perceiver | PretrainedPerceiver, dict[str, Any]]:
    """The float64 reference model of a golden file (a Perceiver, or a published model on the
    plain attention path) and the keyword arguments of its run: ``write_run(out, model,
    **kwargs)`` (or :func:`run_and_record`) reproduces the golden tensors; ``write_run(out,
    cast(model, "float32"), **kwargs)`` is the float32 run, or give the model other parameters
    (``model.with_params``) to write a run of your own."""
    config, arrays, meta = read_golden(path)
    params = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    kwargs: dict[str, Any] = {"seed": meta.get("seed", 0), "mask": arrays.get("input/mask")}
    if "architecture" not in meta:
        if "input/queries" in arrays:
            kwargs["queries"] = arrays["input/queries"]
        return Perceiver(config, params), {"x": arrays["input/x"], **kwargs}
    buffers = {k[len("buffers/"):]: v for k, v in arrays.items() if k.startswith("buffers/")}
    model = plain_path(PretrainedPerceiver(meta["architecture"], meta["hf_config"], params, buffers,
                                           dtype="float64"))
    x: Any = arrays.get("input/x")
    if x is None:
        x = {k[len("input/x."):]: v for k, v in arrays.items() if k.startswith("input/x.")}
    options: dict[str, Any] = {}
    for key, value in arrays.items():
        if key.startswith("input/option."):
            name, _, sub = key[len("input/option."):].partition(".")
            if sub:
                options.setdefault(name, {})[sub] = value
            else:
                options[name] = value
    if options:
        kwargs["options"] = options
    return model, {"x": x, **kwargs}


@dataclass(frozen=True)
class Row:
    name: str  # "act/...", "grad/..." or "output", as in the files
    shape: tuple[int, ...]
    dtype: str  # of theirs
    max_abs: float
    max_rel: float  # max |theirs - golden| / max |golden| (normwise; gradients: floored)
    worst_index: tuple[int, ...]
    tolerance: float
    ok: bool


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class CompareReport:
    rows: tuple[Row, ...]
    missing: tuple[str, ...]  # in the golden file, not in theirs
    extra: tuple[str, ...]  # in theirs, not in the golden file
    mismatched: tuple[str, ...]  # present in both with different shapes
    allow_missing: bool = False  # missing golden tensors are listed, not failed
    masked_scores: tuple[str, ...] = ()  # attention scores compared at kept keys only
    forward_only: bool = False  # theirs says it is a forward-only run: no gradient expected

    @property
    def compared(self) -> dict[str, int]:
        """How many tensors were compared: activations, gradients, the loss (0 or 1), and how
        many golden tensors are missing from theirs."""
        return {"activations": sum(r.name.startswith("act/") for r in self.rows),
                "gradients": sum(r.name.startswith("grad/") for r in self.rows),
                "loss": sum(r.name == "loss" for r in self.rows),
                "missing": len(self.missing)}

    @property
    def failures(self) -> tuple[str, ...]:
        """Why the comparison fails besides a tensor beyond its tolerance, in plain words."""
        out = []
        counts = self.compared
        if self.missing and not self.allow_missing:
            out.append(f"FAILED: {_plural(len(self.missing), 'golden tensor')} missing from theirs "
                       "(pass --allow-missing to compare only the ones present)")
        if counts["activations"] == 0:
            out.append("FAILED: no activation was compared")
        if counts["gradients"] == 0 and not self.forward_only:
            out.append("FAILED: no gradient was compared")
        if self.mismatched:
            out.append(f"FAILED: {_plural(len(self.mismatched), 'tensor')} with a different shape or dtype")
        return tuple(out)

    @property
    def ok(self) -> bool:
        return not self.failures and all(r.ok for r in self.rows)

    @property
    def first_break(self) -> Row | None:
        """The first tensor, in forward order then backward order, beyond its tolerance."""
        return next((r for r in self.rows if not r.ok), None)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "first_break": None if self.first_break is None else self.first_break.name,
                "compared": self.compared, "failures": list(self.failures),
                "allow_missing": self.allow_missing, "masked_scores": list(self.masked_scores),
                "forward_only": self.forward_only,
                "rows": [asdict(r) for r in self.rows], "missing": list(self.missing),
                "extra": list(self.extra), "mismatched": list(self.mismatched)}

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        lines = [f"{'tensor':<{width}}  {'shape':<18}{'dtype':<9}{'max abs':>10}  {'max rel':>9}  "
                 f"{'tolerance':>9}  {'worst index':<18}"] if self.rows else []
        for r in self.rows:
            mark = "" if r.ok else "  BREAKS"
            lines.append(f"{r.name:<{width}}  {r.shape!s:<18}{r.dtype:<9}{r.max_abs:>10.2e}  "
                         f"{r.max_rel:>9.2e}  {r.tolerance:>9.1e}  {r.worst_index!s:<18}{mark}")
        if self.missing:
            allowed = ", allowed" if self.allow_missing else ""
            lines.append(f"missing in theirs ({len(self.missing)}{allowed}): {', '.join(self.missing)}")
        if self.extra:
            lines.append(f"not in the golden file ({len(self.extra)}): {', '.join(self.extra)}")
        if self.mismatched:
            lines.append(f"different shapes: {', '.join(self.mismatched)}")
        if self.masked_scores:
            lines.append(f"compared at the keys the mask keeps only: {', '.join(self.masked_scores)}")
        if self.forward_only:
            lines.append("a forward-only run (its meta.json says so): no gradient expected")
        counts = self.compared
        loss = " and the loss" if counts["loss"] else ", not the loss"
        lines.append(f"compared {counts['activations']} activations, {counts['gradients']} gradients"
                     f"{loss}; {_plural(counts['missing'], 'golden tensor')} missing from theirs")
        first = self.first_break
        if first is not None:
            lines.append(f"first break: {first.name} (max rel {first.max_rel:.2e} > {first.tolerance:.1e}): "
                         "the likely bug site")
        elif self.rows:
            lines.append(f"all {len(self.rows)} compared tensors within tolerance")
        lines.extend(self.failures)
        return "\n".join(lines)


def masked_score_names(config: PerceiverConfig, recorded: Iterable[str]) -> tuple[str, ...]:
    """The attention scores [B, H, M, N] over the masked input among the ``recorded``
    activation names: the cross blocks' ``<step>.attn.scores`` (their keys are the inputs).
    The self blocks and the decoder attend to the latents, unmasked."""
    present = set(recorded)
    names = (f"{step}.attn.scores"
             for (kind, _), step in zip(config.schedule, step_names(config), strict=True)
             if kind == "cross")
    return tuple(n for n in names if n in present)


def tolerance_for(dtype: np.dtype) -> float:
    """The normwise relative tolerance a tensor of ``dtype`` is held to (docs/verify.md)."""
    return GOLDEN_FLOAT64_RTOL if np.dtype(dtype) == np.float64 else GOLDEN_FLOAT32_RTOL


def _row(name: str, g: np.ndarray, t: np.ndarray, keep: np.ndarray | None, floor: float) -> Row:
    """One tensor's errors, over the entries where ``keep`` (g's shape, bool) is True, or all.
    ``floor``: the least normalising scale (gradients: GOLDEN_GRAD_FLOOR x the largest one)."""
    if keep is None:
        diff = np.abs(t.astype(np.float64) - g)
        scale = float(np.abs(g).max()) if g.size else 0.0
    else:  # the entries outside keep are neither compared nor part of the scale
        diff = np.zeros(g.shape)
        diff[keep] = np.abs(t[keep].astype(np.float64) - g[keep])
        scale = float(np.abs(g[keep]).max()) if keep.any() else 0.0
    scale = max(scale, floor)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    tol = tolerance_for(t.dtype)
    return Row(name, tuple(g.shape), t.dtype.name, max_abs, max_rel,
               tuple(int(i) for i in worst), tol, max_rel <= tol)


def compare(
    golden_path: str | Path, theirs_path: str | Path, *, allow_missing: bool = False
) -> CompareReport:
    """Compare ``theirs`` against a golden file: see the module docstring. ``allow_missing``:
    compare only the golden tensors theirs has (missing ones are still listed)."""
    config, golden, meta = read_golden(golden_path)
    theirs = _load(theirs_path)
    forward_only = _forward_only(theirs_path, theirs.pop("meta.json", None))
    order = ([f"act/{n}" for n in meta["activations"]] + ["loss"]
             + [f"grad/{n}" for n in meta["gradients"]])
    checked = [n for n in order if n in golden]
    # gradients whose exact value is 0 (the key-projection biases) are compared against the
    # largest gradient of the model, not against their own rounding noise
    grad_scale = max((float(np.abs(golden[n]).max()) for n in checked if n.startswith("grad/")),
                     default=0.0)
    # the cross blocks' scores [B, H, M, N] hold a fill value at masked keys: an implementation
    # detail (ours -1e30, others finfo.min or -inf) that would also swamp the normalising scale
    mask = golden.get("input/mask")
    masked = masked_score_names(config, meta["activations"]) if mask is not None else ()
    rows, mismatched = [], []
    for name in checked:
        if name not in theirs:
            continue
        g, t = golden[name], theirs[name]
        if g.shape != t.shape:
            mismatched.append(f"{name} {g.shape} vs {t.shape}")
            continue
        if t.dtype.kind not in "fiub":
            mismatched.append(f"{name} has dtype {t.dtype.name}")
            continue
        keep = None
        if mask is not None and name.startswith("act/") and name[len("act/"):] in masked:
            if g.ndim != 4 or mask.shape != (g.shape[0], g.shape[3]):
                raise ValueError(f"{golden_path}: input/mask {mask.shape} does not fit {name} "
                                 f"{g.shape} [B, H, M, N]")
            keep = np.broadcast_to(mask.astype(bool)[:, None, None, :], g.shape)  # [B, N] -> [B, H, M, N]
        floor = GOLDEN_GRAD_FLOOR * grad_scale if name.startswith("grad/") else 0.0
        rows.append(_row(name, g, t, keep, floor))
    missing = tuple(n for n in checked if n not in theirs)
    known = set(order) | {k for k in golden if k.startswith(("params/", "buffers/", "input/", "loss/dy"))}
    known.add("loss/dy")
    extra = tuple(sorted(k for k in theirs if k not in known))
    compared = {r.name for r in rows}
    return CompareReport(tuple(rows), missing, extra, tuple(mismatched), allow_missing,
                         tuple(f"act/{n}" for n in masked if f"act/{n}" in compared), forward_only)


def _forward_only(path: str | Path, meta: np.ndarray | None) -> bool:
    """Whether theirs says it is a forward-only run (a ``meta.json`` with ``"forward_only":
    true``, as :func:`record_onnx` writes: a deployed runtime has no backward pass), so that no
    gradient compared is no failure."""
    if meta is None:
        return False
    try:
        info = json.loads(meta.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: meta.json is not JSON ({err})") from err
    return isinstance(info, dict) and info.get("forward_only") is True


# ---------------------------------------------------------------------------------------------
# Recording a PyTorch model under the golden names
# ---------------------------------------------------------------------------------------------

#: Our block-local activation names -> the HF ``PerceiverLayer`` submodule whose output is the
#: same tensor (``attention.self``'s first output is the heads merged, before the projection).
_HF_LAYER_TAPS = {
    "q_norm.out": "attention.self.layernorm1",
    "kv_norm.out": "attention.self.layernorm2",
    "norm.out": "attention.self.layernorm1",
    "attn.q.out": "attention.self.query",
    "attn.k.out": "attention.self.key",
    "attn.v.out": "attention.self.value",
    "attn.heads.out": "attention.self",
    "attn.out": "attention.output.dense",
    "attn_residual.out": "attention",
    "ffn_norm.out": "layernorm",
    "ffn.up.out": "mlp.dense1",
    "ffn.act.out": "mlp.intermediate_act_fn",
    "ffn.down.out": "mlp.dense2",
    "out": "",
}


def hf_record_names(config: PerceiverConfig | Mapping[str, Any]
                    ) -> tuple[dict[str, TorchTap], dict[str, str]]:
    """``(activations, params)`` for :func:`record_torch` of Hugging Face's ``PerceiverModel``
    built from ``config`` (:func:`perceiver_np.interop.to_hf_config`): ``params`` is
    :func:`perceiver_np.interop.hf_name_map`; ``activations`` maps every golden activation
    HF's modules expose as the identical tensor: ``input`` (the first input of the input
    projection, or else of the cross-attention's kv LayerNorm), ``input_proj.out``, and for
    the cross block, each self block (each repeat of a shared one: the ``u``-th call of
    ``encoder.self_attends.{j}``) and the decoder: the LayerNorm outputs, ``attn.q/k/v.out``
    (the projections, before the head split), ``attn.heads.out``, ``attn.out`` (the output
    dense), ``attn_residual.out``, ``ffn.up/act/down.out`` and the block's ``out``. Left out,
    as no HF module outputs them: ``attn.scores`` and ``attn.probs`` (computed inside
    ``PerceiverSelfAttention.forward``); ``output`` is ``record_torch``'s own."""
    from .interop import _hf_decoder_prefix, hf_name_map

    cfg = config if isinstance(config, PerceiverConfig) else make_config(**dict(config))
    params = hf_name_map(cfg)
    acts: dict[str, TorchTap] = {}
    for act in golden_names(cfg):
        if not act.startswith("act/"):
            continue
        name = act[len("act/"):]
        head, _, rest = name.partition(".")
        if name == "input":
            acts[name] = (("input_preprocessor.linear" if cfg.input_projection
                           else "encoder.cross_attention.attention.self.layernorm2"), "input")
            continue
        if name == "input_proj.out":
            acts[name] = "input_preprocessor.linear"
            continue
        call = 0
        if head == "cross":
            layer, local = "encoder.cross_attention", rest.partition(".")[2]
        elif head == "self":
            j, _, local = rest.partition(".")
            layer = f"encoder.self_attends.{j}"
            if local.startswith("use"):
                use, _, local = local.partition(".")
                call = int(use[len("use"):])
        elif head == "decoder":
            layer, local = _hf_decoder_prefix(cfg) + "decoding_cross_attention", rest
        else:
            continue  # output
        sub = _HF_LAYER_TAPS.get(local)
        if sub is not None:
            path = f"{layer}.{sub}" if sub else layer
            acts[name] = path if call == 0 else (path, "output", call)
    return acts, params
