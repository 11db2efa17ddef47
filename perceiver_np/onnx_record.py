"""An exported model recorded as it is deployed, in ONNX Runtime or OpenVINO, under the golden
names (docs/verify.md, "ONNX Runtime and OpenVINO: record_onnx").

::

    acts = onnx_record_names("model.onnx", golden_names(config))   # or onnx_module_names, by hand
    rec = record_onnx("model.onnx", {"x": x, "mask": mask}, dy, activations=acts)
    np.savez("theirs.npz", **rec)
    compare("golden.npz", "theirs.npz", allow_missing=True)

:func:`record_onnx` runs the model file in the runtime it is deployed with, the graph's
intermediate values named in ``activations`` (golden name -> ONNX value name) added as extra
graph outputs, and returns them in the golden layout. ONNX holds no backward pass, so there are
no gradients: the recording says so in its ``meta.json`` (``"forward_only": true``), and
``compare(..., allow_missing=True)`` then compares the activations (and the loss, given ``dy``)
without failing for want of a gradient.

Naming the values is the crux. An exporter names intermediate values after its own counters
(``add_9``, ``/MatMul_3_output_0``), which shift with any edit of the model, and the parameters
do not anchor them either: ``nn.Linear``'s weights are exported transposed under new names, and
equal initializers are merged. What survives is the module structure: ``torch.onnx.export(...,
dynamo=True)`` (torch's default exporter) writes each node's module path into its metadata
(``pkg.torch.onnx.name_scopes``).
:func:`onnx_module_names` turns :func:`perceiver_np.verify.record_torch`'s ``activations`` (golden
name -> submodule path, or ``(path, "input")``, or ``(path, where, call)``) into the values those
modules output in the graph, so :func:`perceiver_np.verify.hf_record_names`'s map serves an
exported Hugging Face ``PerceiverModel`` unchanged; :func:`onnx_record_names` is the map of a
model whose modules are laid out like our parameter schema (:func:`schema_taps`;
tests/test_record_onnx.py exports one). :func:`onnx_value_names` lists every value with its
shape, op, module and operands, to name the rest by hand (the attention probabilities: the
output of the attention module's ``Softmax``; the scores: what it reads).

Importing this module imports neither onnx, onnxruntime nor openvino: the functions do.
"""

from __future__ import annotations

import ast
import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")

#: ``optimization`` -> ONNX Runtime's graph optimisation level, from none to every fusion.
ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}

#: ``precision``: OpenVINO's CPU ``INFERENCE_PRECISION_HINT`` values.
PRECISIONS = ("f32", "bf16", "f16")

#: The node metadata in which torch's dynamo exporter writes a node's module path:
#: ``"['', 'encoder', 'encoder.layer.0', ..., '<the op's own name>']"``.
SCOPES_KEY = "pkg.torch.onnx.name_scopes"

#: One entry of :func:`onnx_module_names`' ``taps``, as in ``record_torch``'s ``activations``:
#: a submodule path (its output), ``(path, "output" | "input")`` or ``(path, where, call)`` (the
#: ``call``-th call of that submodule, from 0).
ModuleTap: TypeAlias = str | tuple[str, str] | tuple[str, str, int]


@dataclass(frozen=True)
class OnnxValue:
    """One value of an ONNX graph, as :func:`onnx_value_names` lists it."""

    name: str
    shape: tuple[int | str | None, ...] | None  # sizes, symbolic dims (str), unknown (None); None: no rank
    dtype: str  # NumPy's name of the element type ("float32", "bool", ...); "" when unknown
    op: str  # the op type of the node that computes it; "input" for a graph input
    scope: str | None  # that node's innermost module path ("" the root); None: no scopes written
    inputs: tuple[str, ...]  # the values that node reads (constants included); () for a graph input


# ---------------------------------------------------------------------------------------------
# Reading the graph
# ---------------------------------------------------------------------------------------------


def _np_dtype(elem_type: int) -> np.dtype | None:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):  # undefined (0) or without a NumPy dtype (bfloat16)
        return None


def _dims(type_proto: Any) -> tuple[int | str | None, ...] | None:
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tensor.shape.dim)


def _shape_text(dims: tuple[int | str | None, ...] | None) -> str:
    if dims is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _module_stack(node: Any) -> tuple[str, ...] | None:
    """The module paths a node was traced in, outermost first (the root ``''`` and the op's own
    name left out), from the dynamo exporter's metadata; None without it."""
    for prop in node.metadata_props:
        if prop.key != SCOPES_KEY:
            continue
        try:
            scopes = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            return None
        return tuple(scopes[1:-1])
    return None


class _Graph:
    """An ONNX model file, read and shape-inferred: its inputs, values, producers and scopes."""

    def __init__(self, path: str | Path) -> None:
        import onnx
        from google.protobuf.message import DecodeError

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"path: no ONNX model file at {self.path}")
        try:
            model = onnx.load(str(self.path))
        except (OSError, ValueError, DecodeError) as err:
            raise ValueError(f"{self.path}: not a readable ONNX model ({err})") from err
        if not model.graph.output:
            raise ValueError(f"{self.path}: not an ONNX model (its graph has no output)")
        self.model = model
        graph = model.graph
        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.infos = {v.name: v for v in [*inferred.value_info, *graph.input, *graph.output]}
        self.initializers = {t.name: t for t in graph.initializer}
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.feeds = [v for v in graph.input if v.name not in self.initializers]
        self.outputs = [v.name for v in graph.output]
        self.stacks = [_module_stack(node) for node in self.nodes]

    def values(self) -> list[OnnxValue]:
        """The graph inputs, then every node's outputs in graph order (Constant nodes left out)."""
        out = [self._value(v.name, "input", None, ()) for v in self.feeds]
        for node, stack in zip(self.nodes, self.stacks, strict=True):
            if node.op_type == "Constant":
                continue
            scope = None if stack is None else (stack[-1] if stack else "")
            reads = tuple(node.input)
            out.extend(self._value(name, node.op_type, scope, reads) for name in node.output if name)
        return out

    def _value(self, name: str, op: str, scope: str | None, inputs: tuple[str, ...]) -> OnnxValue:
        info = self.infos.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            return OnnxValue(name, None, "", op, scope, inputs)
        dtype = _np_dtype(info.type.tensor_type.elem_type)
        return OnnxValue(name, _dims(info.type), "" if dtype is None else dtype.name, op, scope, inputs)

    def check_names(self, what: str, names: Mapping[str, str]) -> None:
        """Every value name of ``names`` (golden name -> value) is a value of the graph."""
        for golden, value in names.items():
            if not isinstance(value, str):
                raise TypeError(f"{what}[{golden!r}]: expected an ONNX value name, got {value!r} "
                                "(a module tap goes through onnx_module_names first)")
        known = {v.name for v in self.feeds} | set(self.producer) | set(self.initializers)
        unknown = [f"{golden} -> {value!r}" for golden, value in names.items() if value not in known]
        if not unknown:
            return
        first = next(value for value in names.values() if value not in known)
        close = difflib.get_close_matches(first, sorted(known), n=5, cutoff=0.5)
        hint = f" (close to {first!r}: {', '.join(close)})" if close else ""
        raise ValueError(f"{what}: not a value of {self.path}: {', '.join(unknown)}{hint}; "
                         "onnx_value_names(path) lists them")

    def feed(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
        """``inputs`` checked against the graph inputs' names, shapes and dtypes, and cast to
        the graph's dtypes (floats to its float type; integers and bools only when exact)."""
        names = [v.name for v in self.feeds]
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            extra = [str(k) for k in inputs if k not in names]
            if missing or extra:
                raise ValueError(f"inputs: {self.path} takes {names}; missing {missing}, unknown {extra}")
            given = [inputs[n] for n in names]
        elif isinstance(inputs, (tuple, list)):
            if len(inputs) != len(names):
                raise ValueError(f"inputs: {self.path} takes {len(names)} inputs {names}, got {len(inputs)}")
            given = list(inputs)
        else:
            raise TypeError(f"inputs: expected a dict of the graph inputs {names} or a tuple of them, "
                            f"got {type(inputs).__name__}")
        return {info.name: _cast(info, value) for info, value in zip(self.feeds, given, strict=True)}


def _cast(info: Any, value: Any) -> np.ndarray:
    """One input as the graph input ``info`` wants it, or a ValueError naming both."""
    arr = np.asarray(value)
    dims = _dims(info.type)
    dtype = _np_dtype(info.type.tensor_type.elem_type)
    want = f"{_shape_text(dims)} {'?' if dtype is None else dtype.name}"

    def refuse(why: str) -> ValueError:
        got = f"{list(arr.shape)} {arr.dtype.name}"
        return ValueError(f"inputs[{info.name!r}]: expected {want}, got {got} ({why})")

    if dtype is None:
        raise refuse("the graph's element type has no NumPy dtype")
    if dims is not None and (len(dims) != arr.ndim or any(
            isinstance(d, int) and d != s for d, s in zip(dims, arr.shape, strict=False))):
        raise refuse("another shape")
    if dtype.kind == "f" and arr.dtype.kind == "f":
        return arr.astype(dtype)  # the precision the deployed model runs in
    if dtype.kind in "biu" and arr.dtype.kind in "biu":
        cast = arr.astype(dtype)
        if np.array_equal(cast, arr):
            return cast
        raise refuse("values the graph's dtype cannot hold")
    raise refuse("another kind of dtype")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def onnx_value_names(path: str | Path) -> list[OnnxValue]:
    """Every value of the ONNX model at ``path`` a recording can name: its inputs, then each
    node's outputs in graph order (Constant nodes left out), each with its shape (ints,
    symbolic dims as strings, None where shape inference could not tell), its dtype, the op
    that computes it, the innermost module it was traced in (torch's dynamo exporter writes
    that; None in other graphs) and the values that op reads. E.g. the attention probabilities
    are the ``Softmax`` outputs, ``[v.name for v in onnx_value_names(path) if v.op ==
    "Softmax"]``, and the scores their ``inputs[0]``."""
    return _Graph(path).values()


def _module_tap(name: str, tap: ModuleTap) -> tuple[str, str, int]:
    if isinstance(tap, str):
        return tap, "output", 0
    path, where, *rest = tap
    call = rest[0] if rest else 0
    if (where not in ("output", "input") or isinstance(call, bool) or not isinstance(call, int)
            or call < 0 or len(rest) > 1):
        raise ValueError(f"taps[{name!r}]: expected a path, (path, 'output'|'input') or "
                         f"(path, 'output'|'input', call >= 0), got {tap!r}")
    return path, where, call


def _calls(stacks: Sequence[tuple[str, ...] | None], path: str) -> list[list[int]]:
    """The calls of module ``path``: each a maximal run of consecutive nodes traced in it."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i, stack in enumerate(stacks):
        if stack is not None and path in stack:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _resolve(graph: _Graph, taps: Mapping[str, ModuleTap]) -> tuple[dict[str, str], dict[str, str]]:
    """-> (golden name -> value name, golden name -> why it has none) for ``taps``, read off the
    module paths the dynamo exporter wrote into the nodes' metadata.

    A call's output is the value its nodes compute that a node outside the call (or the graph's
    output) reads, the last such in graph order; its input the first value its nodes read that
    is computed outside it (a graph input or another node's output, not a constant)."""
    if all(stack is None for stack in graph.stacks):
        raise ValueError(f"{graph.path}: no node carries its module path ({SCOPES_KEY}, written by "
                         "torch.onnx.export(..., dynamo=True)); name the values from onnx_value_names(path)")
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(graph.nodes):
        for name in node.input:
            readers.setdefault(name, set()).add(i)
    constants = set(graph.initializers) | {out for node in graph.nodes if node.op_type == "Constant"
                                           for out in node.output}
    graph_outputs = set(graph.outputs)
    calls: dict[str, list[list[int]]] = {}
    found: dict[str, str] = {}
    why: dict[str, str] = {}
    for golden, tap in taps.items():
        path, where, call = _module_tap(golden, tap)
        runs = calls.setdefault(path, _calls(graph.stacks, path))
        if call >= len(runs):
            why[golden] = (f"{path} has no node" if not runs
                           else f"{path} ran {len(runs)} time{'s' if len(runs) > 1 else ''}, no call {call}")
            continue
        inside = set(runs[call])
        nodes = [graph.nodes[i] for i in runs[call]]
        if where == "output":
            leaving = [out for node in nodes for out in node.output
                       if out and (out in graph_outputs or readers.get(out, set()) - inside)]
            value = leaving[-1] if leaving else None
        else:
            made = {out for node in nodes for out in node.output}
            entering = [name for node in nodes for name in node.input
                        if name and name not in made and name not in constants]
            value = entering[0] if entering else None
        if value is None:
            why[golden] = f"no value leaves {path}" if where == "output" else f"{path} reads no value"
        else:
            found[golden] = value
    return found, why


def onnx_module_names(path: str | Path, taps: Mapping[str, ModuleTap]) -> dict[str, str]:
    """Golden activation name -> ONNX value name, for an ONNX graph exported from a torch
    module by ``torch.onnx.export(..., dynamo=True)``: ``taps`` is ``record_torch``'s
    ``activations`` for that module (golden name -> submodule path, ``(path, "input")`` or
    ``(path, where, call)``), e.g. ``verify.hf_record_names(config)[0]`` for Hugging Face's
    ``PerceiverModel``. Each tap becomes the value that call of the module outputs in the graph
    (the value its nodes compute and a later node or the graph output reads; the last, if
    several) or, for ``"input"``, the first value its nodes read from outside (not a constant).
    The ``call``-th call is the module's ``call``-th run of consecutive nodes.

    A tap whose module has no node in the graph is an error that names it: the exporter may
    have folded an input-independent module into a constant (``optimize=True`` folds the
    latents' LayerNorm and query projection; export with ``optimize=False`` to keep them)."""
    graph = _Graph(path)
    found, why = _resolve(graph, taps)
    if why:
        raise ValueError(f"taps: {len(why)} found no value in {graph.path}: "
                         + ", ".join(f"{golden} ({reason})" for golden, reason in why.items()))
    return found


#: Our block-local activation names -> the tap, relative to the block's module path, of a
#: module laid out like our parameter schema (a module at every parameter prefix). The block's
#: own output is the block module's (``""``); the decoder's is the input of ``decoder.output``.
_SCHEMA_LAYER_TAPS: dict[str, tuple[str, str]] = {
    "q_norm.out": ("q_norm", "output"),
    "kv_norm.out": ("kv_norm", "output"),
    "norm.out": ("norm", "output"),
    "attn.q.out": ("attn.q", "output"),
    "attn.k.out": ("attn.k", "output"),
    "attn.v.out": ("attn.v", "output"),
    "attn.heads.out": ("attn.out", "input"),
    "attn.out": ("attn.out", "output"),
    "attn_residual.out": ("ffn_norm", "input"),
    "ffn_norm.out": ("ffn_norm", "output"),
    "ffn.up.out": ("ffn.up", "output"),
    "ffn.act.out": ("ffn.down", "input"),
    "ffn.down.out": ("ffn.down", "output"),
}


def schema_taps(activations: Iterable[str]) -> dict[str, ModuleTap]:
    """Golden activation name -> module tap (``record_torch``'s ``activations``) for a torch
    port laid out like our parameter schema: a module at every parameter prefix (``input_proj``,
    ``cross.{i}.q_norm``, ``cross.{i}.attn.q``, ..., ``self.{j}.ffn.down``, ``final_norm``,
    ``decoder.output``; its ``named_parameters()`` are ``model.params``' names) and one per block
    (``cross.{i}``, ``self.{j}``, called once per repeat, ``decoder``). ``activations``: the
    golden activation names, e.g. ``verify.golden_names(config)`` (its other names are skipped)
    or a golden file's ``meta["activations"]``.

    Every activation but ``attn.scores`` and ``attn.probs`` (which no module outputs) and
    ``output``: ``input`` is the first input of ``input_proj`` (of ``cross.0.kv_norm`` without
    an input projection), ``attn.heads.out`` that of ``attn.out``, ``ffn.act.out`` of
    ``ffn.down``, ``attn_residual.out`` of ``ffn_norm``, ``decoder.out`` of ``decoder.output``;
    a shared block's ``self.{j}.use{u}.*`` are the ``u``-th call of ``self.{j}``'s modules."""
    names = [n.removeprefix("act/") for n in activations if n.startswith("act/") or "/" not in n]
    projected = "input_proj.out" in names
    taps: dict[str, ModuleTap] = {}
    for name in names:
        if name == "input":
            taps[name] = ("input_proj" if projected else "cross.0.kv_norm", "input")
            continue
        if name in ("input_proj.out", "final_norm.out"):
            taps[name] = name.removesuffix(".out")
            continue
        head, _, rest = name.partition(".")
        call = 0
        if head == "cross":
            i, _, local = rest.partition(".")
            block = f"cross.{i}"
        elif head == "self":
            j, _, local = rest.partition(".")
            block = f"self.{j}"
            if local.startswith("use"):
                use, _, local = local.partition(".")
                call = int(use[len("use"):])
        elif head == "decoder":
            block, local = "decoder", rest
        else:
            continue  # output, the loss
        if local == "out":
            sub, where = ("output", "input") if block == "decoder" else ("", "output")
        elif local in _SCHEMA_LAYER_TAPS:
            sub, where = _SCHEMA_LAYER_TAPS[local]
        else:
            continue  # the attention scores and probabilities
        taps[name] = (f"{block}.{sub}" if sub else block, where, call)
    return taps


def onnx_record_names(path: str | Path, activations: Iterable[str]) -> dict[str, str]:
    """Golden activation name -> ONNX value name for a graph exported by
    ``torch.onnx.export(..., dynamo=True)`` from a torch port laid out like our parameter schema
    (:func:`schema_taps`; ``activations``: ``verify.golden_names(config)`` or a golden file's
    ``meta["activations"]``), with every activation the graph holds: those whose module has no
    node (folded into a constant at export) are left out, and
    :func:`perceiver_np.verify.compare` lists them as missing."""
    return _resolve(_Graph(path), schema_taps(activations))[0]


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


def _run_onnxruntime(graph: _Graph, feeds: Mapping[str, np.ndarray], names: list[str],
                     optimization: str) -> dict[str, np.ndarray]:
    """``names`` (node outputs; the graph outputs among them) computed by ONNX Runtime's CPU
    provider at the graph optimisation level ``optimization``."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    for name in names:
        if name not in graph.outputs:  # exposed: typed where shape inference could tell
            model.graph.output.append(graph.infos.get(name, onnx.ValueInfoProto(name=name)))
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[optimization])
    options.log_severity_level = 3  # errors only: not the optimiser's notes on what it left unfused
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def _run_openvino(graph: _Graph, feeds: Mapping[str, np.ndarray], names: list[str],
                  precision: str) -> tuple[dict[str, np.ndarray], str]:
    """``names`` computed by OpenVINO on the CPU with ``INFERENCE_PRECISION_HINT`` ``precision``,
    and the precision it actually ran in (a CPU without f16 arithmetic runs "f16" as bf16)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(graph.path))
    known = {n for port in model.outputs for n in port.get_names()}
    for name in names:
        if name in known:
            continue
        try:
            model.add_outputs(name)
        except RuntimeError as err:
            raise ValueError(f"activations: OpenVINO's model of {graph.path} has no tensor {name!r} "
                             f"(its ONNX frontend dropped or renamed it): {err}") from err
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    result = compiled(dict(feeds))
    by_name = {n: np.asarray(result[port]) for port in compiled.outputs for n in port.get_names()}
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return {name: by_name[name] for name in names}, ran


def record_onnx(
    path: str | Path,
    inputs: Mapping[str, Any] | Sequence[Any],
    dy: Any = None,
    *,
    activations: Mapping[str, str],
    runtime: str = "onnxruntime",
    optimization: str = "all",
    precision: str = "f32",
    output: str | None = None,
) -> dict[str, np.ndarray]:
    """One forward of the ONNX model at ``path`` in ``runtime``, recorded in the golden layout
    (write it with ``np.savez`` and :func:`perceiver_np.verify.compare` it, ``allow_missing=True``).

    ``inputs``: the graph inputs by name (a dict) or in the graph's order (a tuple), NumPy arrays
    or array-likes; each is checked against the input's declared shape (symbolic dims match any
    size) and cast to its dtype: floats to the graph's float type (the golden file's float64
    ``input/x`` runs as the model's float32), integers and bools to its integer or bool type
    when that is exact (a bool mask to an int64 ``attention_mask``); anything else is a
    ValueError naming the input, the expected and the received shape and dtype. ``dy``: the
    golden file's ``loss/dy`` (optional), which adds ``loss = sum(dy * output)`` and ``loss/dy``.
    ``activations``: golden activation name (without ``act/``) -> the name of a value of the
    graph (:func:`onnx_value_names`, :func:`onnx_module_names`, :func:`onnx_record_names`); a
    graph input records the array fed to it, an initializer its constant, any other value is
    added to the graph's outputs. ``output``: the graph output that is ``act/output`` (default:
    the first).

    ``runtime="onnxruntime"``: the CPU execution provider at the graph optimisation level
    ``optimization`` ("disable", "basic", "extended", "layout" or, as deployed by default,
    "all"). ``runtime="openvino"``: compiled for the CPU with ``precision`` as its
    ``INFERENCE_PRECISION_HINT`` ("f32", "bf16" or "f16"), so a reduced-precision deployment is
    recorded as it runs. Exposing a value keeps it: a fusion that would have computed it inside
    a fused kernel (ONNX Runtime's attention or OpenVINO's) does not happen, and a value the
    exporter or an optimiser removed before the runtime sees the graph cannot be recorded; the
    run with ``activations={}`` is the deployed graph itself.

    Returns ``act/<name>`` (in ``activations``' order) and ``act/output`` in the dtypes the
    runtime computed them in (float32 for a float32 model: ``compare`` then holds them to the
    float32 tolerance), ``loss`` (in the output's dtype) and ``loss/dy`` with ``dy``, and
    ``meta.json`` (the run's runtime, optimisation level or requested and actual precision, the
    name map, and ``"forward_only": true``: there are no gradients)."""
    graph = _Graph(path)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {RUNTIMES}, got {runtime!r}")
    if optimization not in ORT_LEVELS:
        raise ValueError(f"optimization: expected one of {tuple(ORT_LEVELS)}, got {optimization!r}")
    if runtime == "openvino" and optimization != "all":
        raise ValueError(f"optimization: OpenVINO has no optimisation levels; got {optimization!r} "
                         "(pass precision= to choose its inference precision)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if runtime == "onnxruntime" and precision != "f32":
        raise ValueError(f"precision: ONNX Runtime runs the graph's own dtypes; got {precision!r} "
                         "(an OpenVINO precision: pass runtime='openvino')")
    out_name = graph.outputs[0] if output is None else output
    if out_name not in graph.outputs:
        raise ValueError(f"output: not an output of {graph.path}: {out_name!r}; its outputs: {graph.outputs}")
    if "output" in activations:
        raise ValueError("activations: 'output' is the graph output (choose it with output=)")
    graph.check_names("activations", activations)
    feeds = graph.feed(inputs)
    computed = [v for v in dict.fromkeys(activations.values()) if v in graph.producer and v != out_name]
    names = [out_name, *computed]
    meta: dict[str, Any] = {"recorded_by": "perceiver_np.verify.record_onnx", "forward_only": True,
                            "model": str(graph.path), "runtime": runtime}
    if runtime == "onnxruntime":
        ran = _run_onnxruntime(graph, feeds, names, optimization)
        meta["optimization"] = optimization
    else:
        ran, actual = _run_openvino(graph, feeds, names, precision)
        meta.update(precision=precision, inference_precision=actual)
    meta.update(output=out_name, activations=dict(activations))

    def value(name: str) -> np.ndarray:
        if name in ran:
            return np.asarray(ran[name])
        if name in feeds:
            return feeds[name]
        from onnx import numpy_helper

        return numpy_helper.to_array(graph.initializers[name])

    rec = {f"act/{golden}": value(name) for golden, name in activations.items()}
    y = np.asarray(ran[out_name])
    rec["act/output"] = y
    if dy is not None:
        dy = np.asarray(dy, dtype=np.float64)
        if dy.shape != y.shape:
            raise ValueError(f"dy: shape {dy.shape} does not fit the output {out_name!r} {y.shape}")
        rec["loss"] = np.asarray(np.sum(dy * y.astype(np.float64)), dtype=y.dtype)
        rec["loss/dy"] = dy
    rec["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return rec
