"""Recording a JAX model in the golden layout: Haiku (DeepMind's Perceiver) and Flax linen.

::

    jax.config.update("jax_enable_x64", True)         # yours to set: JAX is float32 otherwise
    acts, names = deepmind_record_names(config)       # DeepMind's module names, our golden names
    recorded = record_haiku(hk.transform(forward), params, {"inputs": x, "input_mask": mask}, dy,
                            activations=acts, param_names=names)
    np.savez("theirs.npz", **recorded)                # then verify.compare("golden.npz", "theirs.npz")

:func:`record_haiku` runs a Haiku-transformed function under ``hk.intercept_methods``,
:func:`record_flax` a ``flax.linen`` module with ``capture_intermediates`` (and the values it
``sow``-s into ``"intermediates"``); both record the named activations, take the gradients of
``L = sum(dy * output)`` with respect to the parameters and the input with ``jax.vjp`` (the
forward and backward compiled as one ``jax.jit`` program), and return the layout of
:func:`perceiver_np.verify.record_torch` (``act/<name>``, ``act/output``, ``loss``,
``loss/dy``, ``grad/<our name>``, ``grad/x``). Haiku's ``Linear.w`` and Flax's
``Dense.kernel`` are ``[in, out]`` like ours, so no gradient is transposed.

Both run in float64 only, and neither changes JAX's configuration: with 64-bit mode off, JAX
silently computes in float32, so they refuse to run and say how to turn it on. Importing this
module imports no JAX; the functions import jax, haiku and flax when called.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import numpy as np

from .config import PerceiverConfig, make_config
from .interop import _HAIKU_ENCODER, _haiku_decoder_prefix, haiku_name_map
from .model import step_names

#: One entry of ``activations``: a module with an optional method or sown name after a colon
#: (``"perceiver_encoder/~/cross_attention"``, ``"perceiver_encoder:latents"``,
#: ``"cross0/attn:scores"``; default ``__call__``), whose output is recorded; or
#: ``(module, "output" | "input")``, or ``(module, "output" | "input", call)`` for the
#: ``call``-th call (from 0: a block shared across repeats runs once per repeat).
JaxTap: TypeAlias = str | tuple[str, str] | tuple[str, str, int]


def _require_x64(what: str) -> None:
    import jax

    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError(
            f"{what} records in float64, and JAX computes in float32 unless its 64-bit mode is "
            "on: call jax.config.update('jax_enable_x64', True) before creating any array (or "
            f"set JAX_ENABLE_X64=1 in the environment). {what} does not change JAX's "
            "configuration for you: it is process-wide.")


def _float64_tree(what: str, tree: Any) -> Any:
    """``tree``'s leaves as jax arrays, every floating-point one checked to be float64: a
    ValueError names the first that is not (casting float32 weights up would hide a float32 port)."""
    import jax
    import jax.numpy as jnp

    def dtype(leaf: Any) -> np.dtype:  # an array's, or a Python scalar's (a state's counter)
        return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    dtypes = [(jax.tree_util.keystr(path), dtype(leaf)) for path, leaf in leaves]
    wrong = [(path, d.name) for path, d in dtypes if d.kind == "f" and d != np.float64]
    if wrong:
        path, name = wrong[0]
        raise ValueError(f"{what}: expected float64 arrays, got {len(wrong)} of another dtype "
                         f"(e.g. {path} {name}); cast them with "
                         "jax.tree.map(lambda a: a.astype(jnp.float64), ...)")
    return jax.tree.map(jnp.asarray, tree)


def _tap(name: str, tap: JaxTap) -> tuple[str, str, str, int]:
    """``(module, method or sown name, "output" | "input", call)`` of one ``activations`` entry."""
    if isinstance(tap, str):
        target, where, call = tap, "output", 0
    elif (isinstance(tap, tuple) and len(tap) in (2, 3) and isinstance(tap[0], str)
          and tap[1] in ("output", "input")
          and (len(tap) == 2 or (isinstance(tap[2], int) and not isinstance(tap[2], bool) and tap[2] >= 0))):
        target, where, call = tap[0], tap[1], (tap[2] if len(tap) == 3 else 0)
    else:
        raise ValueError(f"activations[{name!r}]: expected a module name, (module, 'output'|'input') "
                         f"or (module, 'output'|'input', call >= 0), got {tap!r}")
    module, _, key = target.partition(":")
    return module, key or "__call__", where, call


class _Recorder:
    """The values of the taps on module method calls, counted per (module, method)."""

    def __init__(self, taps: Mapping[str, tuple[str, str, str, int]]) -> None:
        self.wanted: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
        for name, (module, key, where, call) in taps.items():
            self.wanted.setdefault((module, key), []).append((name, where, call))
        self.calls = dict.fromkeys(self.wanted, 0)
        self.values: dict[str, Any] = {}

    def see(self, module: str, method: str, args: tuple[Any, ...], out: Any) -> None:
        wanted = self.wanted.get((module, method))
        if wanted is None:
            return
        call = self.calls[module, method]
        self.calls[module, method] += 1
        for name, where, at in wanted:
            if at != call:
                continue
            if where == "input":
                if not args:
                    raise ValueError(f"activations[{name!r}]: {module}:{method} got no positional input")
                self.values[name] = args[0]
            else:
                self.values[name] = out[0] if isinstance(out, (tuple, list)) else out


def _never_recorded(taps: Mapping[str, tuple[str, str, str, int]], values: Mapping[str, Any]) -> None:
    never = [f"{name} ({module}:{key}, call {call})" for name, (module, key, _, call) in taps.items()
             if name not in values]
    if never:
        raise ValueError("activations: never recorded (no such module or method, or it did not run "
                         "that often): " + ", ".join(never))


def _split_inputs(inputs: Mapping[str, Any] | tuple[Any, ...]
                  ) -> tuple[Any, Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]]:
    """``(x, place)``: the first floating-point array among ``inputs`` (float64; None if there is
    none) and ``place(x) -> (args, kwargs)``, the call's arguments with ``x`` put back. Arrays
    become jax arrays (floating ones float64); other values (flags, None) pass unchanged."""
    import jax
    import jax.numpy as jnp

    items: list[tuple[Any, Any]]  # (keyword or position, value)
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    elif isinstance(inputs, tuple):
        items = list(enumerate(inputs))
    else:
        raise TypeError(f"inputs: expected a dict of keyword arguments or a tuple of positional "
                        f"ones, got {type(inputs).__name__}")
    converted: list[tuple[Any, Any]] = []
    x_at = None
    for key, value in items:
        if isinstance(value, (np.ndarray, np.generic, jax.Array)):
            arr = np.asarray(value)
            if arr.dtype.kind == "f":
                value = jnp.asarray(arr, dtype=jnp.float64)
                x_at = key if x_at is None else x_at
            else:
                value = jnp.asarray(arr)
        converted.append((key, value))
    x = dict(converted)[x_at] if x_at is not None else None

    def place(new_x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        values = [(k, new_x if k == x_at else v) for k, v in converted]
        if isinstance(inputs, Mapping):
            return (), dict(values)
        return tuple(v for _, v in values), {}

    return x, place


def _as_numpy(value: Any) -> np.ndarray:
    return np.array(value, dtype=np.float64)


def _record(what: str, run: Callable[[Any, tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]],
            params: Any, inputs: Mapping[str, Any] | tuple[Any, ...], dy: Any,
            taps: Mapping[str, tuple[str, str, str, int]], pick: Callable[[Any], Mapping[str, Any]]
            ) -> dict[str, np.ndarray]:
    """One forward (``run(params, args, kwargs) -> (output, {name: activation})``) and one
    ``jax.vjp`` of ``dy``, in the golden layout; ``pick(gradient tree of params)`` gives the
    parameter gradients by our names."""
    import jax
    import jax.numpy as jnp

    x, place = _split_inputs(inputs)
    primals = (params,) if x is None else (params, x)

    def forward(p: Any, x_: Any = None) -> tuple[Any, dict[str, Any]]:
        args, kwargs = place(x_)
        return run(p, args, kwargs)

    # one trace without running: the output's shape, and which taps were reached
    y_shape, acts_shape = jax.eval_shape(forward, *primals)
    if not isinstance(y_shape, jax.ShapeDtypeStruct):
        raise TypeError(f"{what}: the model's output must be one array (recorded as act/output), got "
                        f"{type(y_shape).__name__}; return the tensor the golden file calls output")
    _never_recorded(taps, acts_shape)
    dy64 = _as_numpy(dy)
    if dy64.shape != tuple(y_shape.shape):
        raise ValueError(f"dy: shape {dy64.shape} does not fit the output {tuple(y_shape.shape)}")

    @jax.jit  # one XLA program for the forward and the backward
    def forward_and_vjp(primals: tuple[Any, ...], dy_: Any) -> tuple[Any, dict[str, Any], tuple[Any, ...]]:
        y, vjp, acts = jax.vjp(forward, *primals, has_aux=True)
        return y, acts, vjp(dy_)

    y, acts, cotangents = forward_and_vjp(primals, jnp.asarray(dy64))
    out: dict[str, np.ndarray] = {f"act/{name}": _as_numpy(acts[name]) for name in taps}
    out["act/output"] = _as_numpy(y)
    out["loss"] = np.asarray(np.sum(dy64 * out["act/output"]), dtype=np.float64)
    out["loss/dy"] = dy64
    out.update({f"grad/{ours}": _as_numpy(g) for ours, g in pick(cotangents[0]).items()})
    if x is not None:
        out["grad/x"] = _as_numpy(cotangents[1])
    return out


def record_haiku(
    fn: Any,
    params: Mapping[str, Mapping[str, Any]],
    inputs: Mapping[str, Any] | tuple[Any, ...],
    dy: Any,
    *,
    activations: Mapping[str, JaxTap],
    param_names: Mapping[str, tuple[str, str]],
    state: Mapping[str, Mapping[str, Any]] | None = None,
    rng: Any = None,
) -> dict[str, np.ndarray]:
    """One forward and backward of a Haiku-transformed ``fn`` in float64, recorded in the golden
    layout (``np.savez`` it and :func:`perceiver_np.verify.compare` it against the golden file).

    ``fn``: what ``hk.transform`` or ``hk.transform_with_state`` returned (``hk.without_apply_rng``
    too). ``params``: its parameter tree (module name -> parameter name -> array), float64.
    ``inputs``: ``fn``'s keyword arguments (a dict) or positional ones (a tuple); NumPy arrays
    become jax arrays, floating ones float64, and the first floating one is the ``x`` whose
    gradient is ``grad/x``; other values (``is_training=False``, None) pass unchanged. ``dy``:
    the upstream gradient (the golden file's ``loss/dy``), of the output's shape; the output
    must be one array. ``activations``: golden activation name (without ``act/``) -> the Haiku
    module whose call is recorded (its ``module_name``, e.g.
    ``"perceiver_encoder/~/cross_attention/attention/linear"``, with ``":method"`` for a method
    other than ``__call__``): its output (a tuple's first element), or ``(module, "input")`` for
    its first positional input; a third element picks the call (from 0, default the first).
    ``param_names``: our parameter name -> ``(module name, parameter name)`` in ``params``, as
    :func:`perceiver_np.interop.haiku_name_map` gives. ``state``: the state of a
    ``transform_with_state`` function (default empty). ``rng``: the key ``apply`` takes, if it
    takes one (default ``jax.random.PRNGKey(0)``; DeepMind's modules draw dropout keys even at
    rate 0, so run them with ``is_training=False``).

    Returns ``act/<name>`` in the order of ``activations``, ``act/output``, ``loss`` (``sum(dy *
    output)``), ``loss/dy``, ``grad/<our name>`` for every entry of ``param_names`` (in Haiku's
    layout, ``[in, out]`` for a Linear ``w`` like ours) and ``grad/x``, all float64 NumPy arrays.
    ``fn`` is traced twice under ``hk.intercept_methods``: by ``jax.eval_shape`` (the output's
    shape, which taps are reached) and by ``jax.jit`` of the forward with its ``jax.vjp``, one
    compiled program; so it must be traceable, as code that runs under ``jax.jit`` is. Raises
    RuntimeError when JAX's 64-bit mode is off (it is not turned on for you)."""
    import haiku as hk
    import jax

    _require_x64("record_haiku")
    if not isinstance(fn, (hk.Transformed, hk.TransformedWithState)):
        raise TypeError("fn: expected a Haiku-transformed function (hk.transform or "
                        f"hk.transform_with_state), got {type(fn).__name__}")
    params = _float64_tree("params", params)
    unknown = [f"{ours} -> {where!r}" for ours, where in param_names.items()
               if not (isinstance(where, tuple) and len(where) == 2 and where[0] in params
                       and where[1] in params[where[0]])]
    if unknown:
        raise ValueError("param_names: no such (module, parameter) in params: " + ", ".join(unknown))
    taps = {name: _tap(name, tap) for name, tap in activations.items()}
    with_state = isinstance(fn, hk.TransformedWithState)
    leading: list[Any] = [_float64_tree("state", state or {})] if with_state else []
    if "rng" in inspect.signature(fn.apply).parameters:
        leading.append(jax.random.PRNGKey(0) if rng is None else rng)

    def run(p: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        recorder = _Recorder(taps)

        def interceptor(next_f: Callable[..., Any], a: tuple[Any, ...], k: dict[str, Any],
                        context: Any) -> Any:
            out = next_f(*a, **k)
            if context.method_name != "__init__":  # no module_name before __init__ has run
                recorder.see(context.module.module_name, context.method_name, a, out)
            return out

        with hk.intercept_methods(interceptor):
            out = fn.apply(p, *leading, *args, **kwargs)
        return (out[0] if with_state else out), recorder.values

    return _record("record_haiku", run, params, inputs, dy, taps,
                   lambda grads: {ours: grads[m][n] for ours, (m, n) in param_names.items()})


def _path(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def record_flax(
    module: Any,
    variables: Mapping[str, Any],
    inputs: Mapping[str, Any] | tuple[Any, ...],
    dy: Any,
    *,
    activations: Mapping[str, JaxTap],
    param_names: Mapping[str, str],
    method: str | None = None,
    rngs: Any = None,
) -> dict[str, np.ndarray]:
    """One forward and backward of a ``flax.linen`` ``module`` in float64, recorded in the golden
    layout (``np.savez`` it and :func:`perceiver_np.verify.compare` it against the golden file).

    ``variables``: what ``module.init`` returned, its ``"params"`` float64 (other collections,
    e.g. batch statistics, are passed unchanged and not differentiated). ``inputs``, ``dy``: as
    :func:`record_haiku` (``module.apply``'s arguments; the first floating array is ``x``).
    ``activations``: golden activation name (without ``act/``) -> a submodule's path, its
    names joined by ``/`` (``"cross0/attn/q"``; ``""`` is ``module`` itself), whose ``__call__``
    output is recorded; after a colon, another method's output or a value the module
    ``self.sow("intermediates", name, value)``-ed (``"cross0/attn:scores"``: the one tap for
    what no submodule outputs, such as attention probabilities); ``(path, "input")`` for a
    method's first positional input; a third element picks the call (from 0). ``param_names``:
    our parameter name -> its path in ``variables["params"]`` (``"cross0/attn/q/kernel"``).
    ``method``, ``rngs``: ``module.apply``'s.

    Outputs are captured with ``capture_intermediates`` (only the tapped methods), inputs with
    ``flax.linen.intercept_methods``; the module is traced and compiled as in
    :func:`record_haiku`, which returns the same (``Dense.kernel`` is ``[in, out]`` like ours).
    Flax creates float32 parameters unless told ``param_dtype=jnp.float64``: cast them. Raises
    RuntimeError when JAX's 64-bit mode is off."""
    import flax.linen as nn

    _require_x64("record_flax")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a flax.linen Module, got {type(module).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables: expected module.init's result, a dict with a 'params' collection")
    params = _float64_tree("variables['params']", variables["params"])
    others = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
    unknown = [f"{ours} -> {path!r}" for ours, path in param_names.items()
               if not isinstance(path, str) or _lookup(params, _path(path)) is None]
    if unknown:
        raise ValueError("param_names: no such path in variables['params']: " + ", ".join(unknown))
    taps = {name: _tap(name, tap) for name, tap in activations.items()}
    outputs = {(_path(m), key) for m, key, where, _ in taps.values() if where == "output"}
    # the interceptor sees a module's path as a tuple: the input taps keyed by it joined by "/"
    input_taps = {name: ("/".join(_path(m)), key, where, call)
                  for name, (m, key, where, call) in taps.items() if where == "input"}

    def capture(mdl: Any, method_name: str) -> bool:
        return (tuple(mdl.path), method_name) in outputs

    def run(p: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        recorder = _Recorder(input_taps)

        def interceptor(next_f: Callable[..., Any], a: tuple[Any, ...], k: dict[str, Any],
                        context: Any) -> Any:
            recorder.see("/".join(context.module.path), context.method_name, a, None)
            return next_f(*a, **k)

        with nn.intercept_methods(interceptor):
            y, mutated = module.apply({"params": p, **others}, *args, method=method, rngs=rngs,
                                      capture_intermediates=capture, mutable=["intermediates"], **kwargs)
        captured = mutated.get("intermediates", {})
        values = dict(recorder.values)
        for name, (m, key, where, call) in taps.items():
            if where == "output":
                seen = _lookup(captured, (*_path(m), key))
                if isinstance(seen, tuple) and call < len(seen):
                    values[name] = seen[call][0] if isinstance(seen[call], (tuple, list)) else seen[call]
        return y, values

    return _record("record_flax", run, params, inputs, dy, taps,
                   lambda grads: {ours: _lookup(grads, _path(path)) for ours, path in param_names.items()})


# ---------------------------------------------------------------------------------------------
# DeepMind's Perceiver (deepmind-research, perceiver/perceiver.py): its module names
# ---------------------------------------------------------------------------------------------

#: Our block-local activation names -> (the module under DeepMind's ``CrossAttention``, output or
#: input) that carries the same tensor. ``Attention`` holds the q, k, v and output ``linear``-s;
#: the heads merged are the output linear's input, the residual sum (``inputs_q + attention``)
#: the MLP LayerNorm's input, the GELU's output the second MLP linear's input.
_DEEPMIND_CROSS_TAPS = {
    "q_norm.out": ("layer_norm", "output"),
    "kv_norm.out": ("layer_norm_1", "output"),
    "attn.q.out": ("attention/linear", "output"),
    "attn.k.out": ("attention/linear_1", "output"),
    "attn.v.out": ("attention/linear_2", "output"),
    "attn.heads.out": ("attention/linear_3", "input"),
    "attn.out": ("attention/linear_3", "output"),
    "attn_residual.out": ("layer_norm_2", "input"),
    "ffn_norm.out": ("layer_norm_2", "output"),
    "ffn.up.out": ("mlp/linear", "output"),
    "ffn.act.out": ("mlp/linear_1", "input"),
    "ffn.down.out": ("mlp/linear_1", "output"),
    "out": ("", "output"),
}
#: DeepMind's ``SelfAttention``: one LayerNorm before the attention, ``layer_norm_1`` before the MLP.
_DEEPMIND_SELF_TAPS = {
    "norm.out": ("layer_norm", "output"),
    **{k: v for k, v in _DEEPMIND_CROSS_TAPS.items() if k.startswith(("attn.", "ffn.")) or k == "out"},
    "attn_residual.out": ("layer_norm_1", "input"),
    "ffn_norm.out": ("layer_norm_1", "output"),
}


def _taps_under(block: str, table: Mapping[str, tuple[str, str]], prefix: str, call: int
                ) -> dict[str, JaxTap]:
    out: dict[str, JaxTap] = {}
    for local, (sub, where) in table.items():
        module = f"{block}/{sub}" if sub else block
        out[f"{prefix}.{local}"] = (module, where, call)
    return out


def deepmind_record_names(config: PerceiverConfig | Mapping[str, Any]
                          ) -> tuple[dict[str, JaxTap], dict[str, tuple[str, str]]]:
    """``(activations, param_names)`` for :func:`record_haiku` of DeepMind's own Perceiver
    (``PerceiverEncoder`` with ``ClassificationDecoder`` or ``BasicDecoder``, as built by
    ``perceiver.Perceiver`` or called directly) with the structure of ``config``
    (:func:`perceiver_np.presets.from_deepmind` turns DeepMind's arguments into it).

    ``param_names`` is :func:`perceiver_np.interop.haiku_name_map`; ``activations`` maps every
    golden activation a DeepMind module carries unchanged: ``input`` (the first input of the
    cross-attention's kv LayerNorm, or of our ``input_projection``), and for the cross block,
    each self block (each repeat of a shared one: the ``u``-th call of
    ``perceiver_encoder/~/self_attention_{j}``) and the decoder: the LayerNorm outputs,
    ``attn.q/k/v.out``, ``attn.heads.out`` and ``attn_residual.out`` (inputs of the next
    module), ``attn.out``, ``ffn.up/act/down.out`` and the block's ``out``. Left out: the
    attention scores and probabilities (computed in ``attend``, a function, not a module);
    ``output`` is ``record_haiku``'s own."""
    cfg = config if isinstance(config, PerceiverConfig) else make_config(**dict(config))
    params = haiku_name_map(cfg)  # refuses what DeepMind's structure cannot hold
    cross = _HAIKU_ENCODER + "cross_attention"
    acts: dict[str, JaxTap] = {}
    if cfg.input_projection:
        acts["input"] = ("input_projection", "input")
        acts["input_proj.out"] = "input_projection"
    else:
        acts["input"] = (f"{cross}/layer_norm_1", "input")
    for step in step_names(cfg):
        kind, _, rest = step.partition(".")
        if kind == "cross":
            acts.update(_taps_under(cross, _DEEPMIND_CROSS_TAPS, step, 0))
            continue
        j, _, use = rest.partition(".")
        block = _HAIKU_ENCODER + ("self_attention" if j == "0" else f"self_attention_{j}")
        acts.update(_taps_under(block, _DEEPMIND_SELF_TAPS, step, int(use[len("use"):]) if use else 0))
    if cfg.decoder in ("query", "classification"):
        acts.update(_taps_under(_haiku_decoder_prefix(cfg) + "/cross_attention", _DEEPMIND_CROSS_TAPS,
                                "decoder", 0))
    return acts, params
