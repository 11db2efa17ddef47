"""Recording any float64 PyTorch module under the golden names: :func:`record_torch` (re-exported
by :mod:`perceiver_np.verify`, whose golden files it is compared with).

::

    theirs = record_torch(module, {"inputs": x}, dy, activations={"cross.0.out": "encoder.cross"},
                          params={"latents": "embeddings.latents"})
    np.savez("theirs.npz", **theirs)       # then: perceiver-np compare golden.npz theirs.npz

torch is imported inside the function: importing this module needs only NumPy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import numpy as np

from .interop import _is_linear_weight

#: What one entry of ``record_torch``'s ``activations`` may be: a submodule path (its output),
#: ``(path, "output" | "input")`` or ``(path, "output" | "input", call)`` (the ``call``-th call
#: of that submodule, from 0: a block shared across repeats runs once per repeat).
TorchTap: TypeAlias = str | tuple[str, str] | tuple[str, str, int]


#: What one entry of ``record_torch``'s ``params`` may be: the module's parameter name, or
#: ``(name, start, stop)``, rows ``start:stop`` of it (one part of a fused projection).
TorchParam: TypeAlias = str | tuple[str, int, int]


def _param_rows(ours: str, theirs: TorchParam) -> tuple[str, tuple[int, int] | None]:
    if isinstance(theirs, str):
        return theirs, None
    if (isinstance(theirs, tuple) and len(theirs) == 3 and isinstance(theirs[0], str)
            and all(isinstance(v, int) for v in theirs[1:]) and 0 <= theirs[1] < theirs[2]):
        return theirs[0], (theirs[1], theirs[2])
    raise ValueError(f"params[{ours!r}]: expected a parameter name or (name, start, stop) with "
                     f"0 <= start < stop, got {theirs!r}")


def _tap(name: str, tap: TorchTap) -> tuple[str, str, int]:
    if isinstance(tap, str):
        return tap, "output", 0
    path, where, *rest = tap
    call = rest[0] if rest else 0
    if where not in ("output", "input") or not isinstance(call, int) or call < 0 or len(rest) > 1:
        raise ValueError(f"activations[{name!r}]: expected a path, (path, 'output'|'input') or "
                         f"(path, 'output'|'input', call >= 0), got {tap!r}")
    return path, where, call


def _default_forward(module: Any, inputs: Any) -> Any:
    out = module(**inputs) if isinstance(inputs, Mapping) else module(*inputs)
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if value is not None:
            return value
    return out


def record_torch(
    module: Any,
    inputs: Mapping[str, Any] | tuple[Any, ...],
    dy: Any,
    *,
    activations: Mapping[str, TorchTap],
    params: Mapping[str, TorchParam],
    transpose: Callable[[str], bool] | None = None,
    forward: Callable[[Any, Any], Any] | None = None,
) -> dict[str, np.ndarray]:
    """One forward and backward of a float64 PyTorch ``module``, recorded in the golden layout
    (write it with ``np.savez`` and :func:`compare` it against the golden file).

    ``inputs``: the module's keyword arguments (a dict) or positional ones (a tuple); NumPy
    arrays become tensors, floating ones float64. The first floating-point input (in the dict's
    or tuple's order) is the ``x`` whose gradient is ``grad/x``. ``dy``: the upstream gradient
    (the golden file's ``loss/dy``). ``activations``: golden activation name (without ``act/``)
    -> submodule path (``module.get_submodule``) whose output is recorded (a tuple output: its
    first element), or ``(path, "input")`` for its first positional input, with an optional
    third element, the call to record (from 0; default the first). ``params``: our parameter
    name -> the module's parameter name (``named_parameters``), or ``(name, start, stop)`` for
    rows ``start:stop`` of it (a fused projection: lucidrains' ``to_kv.weight`` holds the key
    rows, then the value rows). ``transpose(our_name)``: whether
    to transpose that gradient to our ``[in, out]`` layout (default: our ``*.weight`` names of
    2-D parameters, the Linear weights). ``forward(module, inputs) -> tensor``: the output
    (default: ``module(**inputs)``, or ``module(*inputs)``, then its ``.logits`` if not None,
    else its ``.last_hidden_state``, else the result itself).

    Returns ``act/<name>`` (in the order recorded), ``act/output``, ``loss`` (``sum(dy *
    output)``), ``loss/dy``, ``grad/<our name>`` for every entry of ``params`` and ``grad/x``,
    all float64 NumPy arrays. The module runs in eval mode (each submodule's mode is restored
    afterwards) and its hooks are removed, also on error; parameters' ``.grad`` are untouched
    (the gradients come from ``torch.autograd.grad``)."""
    import torch

    by_name = dict(module.named_parameters())
    not_float64 = sorted(k for k, p in by_name.items() if p.is_floating_point() and p.dtype != torch.float64)
    if not_float64:
        raise ValueError(f"record_torch runs in float64: {len(not_float64)} parameters are not "
                         f"(e.g. {not_float64[0]}); call module.double() first")
    sources = {ours: _param_rows(ours, theirs) for ours, theirs in params.items()}
    unknown = [f"{ours} -> {theirs}" for ours, (theirs, _) in sources.items() if theirs not in by_name]
    if unknown:
        raise ValueError(f"params: no such parameter of the module: {', '.join(unknown)}")
    taps = {name: _tap(name, tap) for name, tap in activations.items()}
    submodules = {path: module.get_submodule(path) for path, _, _ in taps.values()}
    def linear_weight(ours: str) -> bool:
        return _is_linear_weight(ours) and by_name[sources[ours][0]].ndim == 2

    to_ours = transpose or linear_weight

    x: Any = None

    def to_tensor(value: Any) -> Any:
        nonlocal x
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if t.is_floating_point():
            t = t.detach().to(torch.float64)
            if x is None:
                x = t.requires_grad_()
        return t

    if isinstance(inputs, Mapping):
        run_inputs: Any = {k: to_tensor(v) for k, v in inputs.items()}
    else:
        run_inputs = tuple(to_tensor(v) for v in inputs)

    recorded: dict[str, np.ndarray] = {}
    calls = dict.fromkeys(submodules, 0)

    def as_numpy(value: Any) -> np.ndarray:
        if isinstance(value, (tuple, list)):
            value = value[0]
        return np.array(value.detach().cpu().numpy(), dtype=np.float64)

    def hook_for(path: str) -> Any:
        wanted = [(name, where, call) for name, (p, where, call) in taps.items() if p == path]

        def hook(_mod: Any, args: tuple[Any, ...], output: Any) -> None:
            call = calls[path]
            calls[path] += 1
            for name, where, at in wanted:
                if at != call:
                    continue
                if where == "input":
                    if not args:
                        raise ValueError(f"activations[{name!r}]: {path} got no positional input")
                    recorded[name] = as_numpy(args[0])
                else:
                    recorded[name] = as_numpy(output)
        return hook

    modes = {m: m.training for m in module.modules()}
    handles = []
    try:
        module.eval()
        for path, sub in submodules.items():
            handles.append(sub.register_forward_hook(hook_for(path)))
        with torch.enable_grad():
            y = (forward or _default_forward)(module, run_inputs)
            dy_t = (dy if isinstance(dy, torch.Tensor) else torch.as_tensor(np.asarray(dy))).detach()
            dy_t = dy_t.to(torch.float64)
            if tuple(dy_t.shape) != tuple(y.shape):
                raise ValueError(f"dy: shape {tuple(dy_t.shape)} does not fit the output {tuple(y.shape)}")
            loss = (dy_t * y).sum()
            names = list(dict.fromkeys(theirs for theirs, _ in sources.values()))  # each parameter once
            wrt = [by_name[theirs] for theirs in names] + ([x] if x is not None else [])
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.train(mode)
    never = [f"{name} ({path}, call {call})" for name, (path, _, call) in taps.items()
             if name not in recorded]
    if never:
        raise ValueError("activations: never recorded (the submodule did not run that often): "
                         + ", ".join(never))

    out: dict[str, np.ndarray] = {f"act/{name}": recorded[name] for name in recorded}
    out["act/output"] = as_numpy(y)
    out["loss"] = np.asarray(float(loss.detach()), dtype=np.float64)
    out["loss/dy"] = as_numpy(dy_t)
    by_param = {theirs: (as_numpy(grad) if grad is not None else np.zeros(tuple(p.shape)))
                for theirs, grad, p in zip(names, grads, wrt, strict=False)}
    for ours, (theirs, rows) in sources.items():
        g = by_param[theirs] if rows is None else by_param[theirs][rows[0]:rows[1]]
        out[f"grad/{ours}"] = np.ascontiguousarray(g.T) if to_ours(ours) else g
    if x is not None:
        gx = grads[-1]
        out["grad/x"] = as_numpy(gx) if gx is not None else np.zeros(tuple(x.shape))
    return out
