"""lucidrains' ``perceiver-pytorch`` (PyPI): its ``Perceiver`` and ``PerceiverIO`` as perceiver_np
models, weights included, and the maps that record them under the golden names.

::

    model = pnp.from_lucidrains(module, index_dims=(8, 8))   # a live perceiver_pytorch.Perceiver
    x = data.reshape(B, -1, C)                                # [B, 8, 8, C] -> [B, 64, C]
    y = model(x, mask.reshape(B, -1))                         # = module(data, mask=mask)
    theirs = verify.record_lucidrains(module, x, dy, mask=mask_flat, index_dims=(8, 8))

How their structure maps (docs/verify.md, "lucidrains perceiver-pytorch"):

- ``to_q`` (no bias) -> ``attn.q.weight``; the fused ``to_kv`` (no bias) [2 * inner, Ckv] ->
  ``attn.k.weight`` (its first ``inner`` rows) and ``attn.v.weight`` (the rest), transposed to our
  ``[in, out]``; ``to_out`` -> ``attn.out``.
- ``PreNorm``'s ``norm`` / ``norm_context`` -> ``q_norm`` (``norm`` in a self block) / ``kv_norm``;
  the feed-forward's ``PreNorm`` -> ``ffn_norm``, its ``net.0`` / ``net.2`` -> ``ffn.up`` /
  ``ffn.down`` (GEGLU: ``net.0`` is [D, 2 * 4D], the value half first).
- ``Perceiver``: block ``i`` (``layers.i``) is cross block ``i`` and self blocks
  ``i * spc .. i * spc + spc - 1``; with ``weight_tie_layers`` every block after the first is
  ``layers.1`` (the same module, so its parameters are named once, there). ``to_logits`` ->
  ``decoder.norm`` (``to_logits.1``) and ``decoder.output`` (``to_logits.2``).
- ``PerceiverIO``: ``cross_attend_block`` -> cross block 0; ``layers.j`` -> self block j;
  ``decoder_cross_attn`` / ``decoder_ff`` / ``to_logits`` -> ``decoder.*`` / ``decoder.output``.
- Masks: theirs and ours are both ``True`` = keep; both flatten the grid row-major.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import PerceiverConfig, make_config, param_shapes
from .model import Perceiver, step_names
from .presets import LUCIDRAINS_FF_MULT, from_lucidrains_io
from .presets import from_lucidrains as lucidrains_options
from .torch_record import record_torch

#: Block-local names of one attention sublayer -> (the submodule under the attention PreNorm,
#: taken as an output or as the first input). The keys and values come out of one fused
#: projection (``to_kv``), so they have no submodule of their own.
_ATTN_TAPS = {"attn.q.out": ("fn.to_q", "output"), "attn.heads.out": ("fn.to_out", "input"),
              "attn.out": ("fn.to_out", "output")}
_FFN_TAPS = {"ffn_norm.out": ("norm", "output"), "ffn.up.out": ("fn.net.0", "output"),
             "ffn.act.out": ("fn.net.1", "output"), "ffn.down.out": ("fn.net.2", "output")}


def _is_io(cfg: PerceiverConfig) -> bool:
    return cfg.decoder == "query"


def _self_per_cross(cfg: PerceiverConfig) -> int:
    return cfg.num_layers // cfg.num_cross_layers


def _cross_prefix(cfg: PerceiverConfig, c: int) -> str:
    return "cross_attend_block" if _is_io(cfg) else f"layers.{c}"


def _self_prefix(cfg: PerceiverConfig, j: int) -> str:
    """The module path of self block j's ``ModuleList([attention PreNorm, feed-forward PreNorm])``."""
    if _is_io(cfg):
        return f"layers.{j}.self_attns.0"
    spc = _self_per_cross(cfg)
    return f"layers.{j // spc}.self_attns.{j % spc}"


def _attention_params(ours: str, theirs: str, inner: int, *, context: str | None) -> dict[str, Any]:
    """Our names of one PreNorm(Attention) -> theirs (``(name, start, stop)`` for a part of ``to_kv``)."""
    names: dict[str, Any] = {
        f"{ours}.{'q_norm' if context else 'norm'}.gamma": f"{theirs}.norm.weight",
        f"{ours}.{'q_norm' if context else 'norm'}.beta": f"{theirs}.norm.bias",
    }
    if context:
        names.update({f"{ours}.kv_norm.gamma": f"{theirs}.norm_context.weight",
                      f"{ours}.kv_norm.beta": f"{theirs}.norm_context.bias"})
    names.update({
        f"{ours}.attn.q.weight": f"{theirs}.fn.to_q.weight",
        f"{ours}.attn.k.weight": (f"{theirs}.fn.to_kv.weight", 0, inner),
        f"{ours}.attn.v.weight": (f"{theirs}.fn.to_kv.weight", inner, 2 * inner),
        f"{ours}.attn.out.weight": f"{theirs}.fn.to_out.weight",
        f"{ours}.attn.out.bias": f"{theirs}.fn.to_out.bias",
    })
    return names


def _ffn_params(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.ffn_norm.gamma": f"{theirs}.norm.weight", f"{ours}.ffn_norm.beta": f"{theirs}.norm.bias",
            f"{ours}.ffn.up.weight": f"{theirs}.fn.net.0.weight",
            f"{ours}.ffn.up.bias": f"{theirs}.fn.net.0.bias",
            f"{ours}.ffn.down.weight": f"{theirs}.fn.net.2.weight",
            f"{ours}.ffn.down.bias": f"{theirs}.fn.net.2.bias"}


def lucidrains_name_map(config: PerceiverConfig) -> dict[str, Any]:
    """Our parameter name -> the perceiver-pytorch module's parameter name (``named_parameters``),
    or ``(name, start, stop)`` for the key and value rows of a fused ``to_kv``, in our schema
    order (the ``params`` of :func:`perceiver_np.verify.record_torch`). ``config``: the options
    :func:`perceiver_np.presets.from_lucidrains` / ``from_lucidrains_io`` made."""
    cfg = config
    names: dict[str, Any] = {"latents": "latents"}
    for c in range(cfg.num_cross_layers):
        pre = _cross_prefix(cfg, c)
        names.update(_attention_params(f"cross.{c}", f"{pre}.cross_attn", cfg.cross_qk, context=pre))
        names.update(_ffn_params(f"cross.{c}", f"{pre}.cross_ff"))
    for j in range(cfg.num_layers):
        pre = _self_prefix(cfg, j)
        names.update(_attention_params(f"self.{j}", f"{pre}.0", cfg.self_qk, context=None))
        names.update(_ffn_params(f"self.{j}", f"{pre}.1"))
    if cfg.decoder == "pool_linear":
        names.update({"decoder.norm.gamma": "to_logits.1.weight", "decoder.norm.beta": "to_logits.1.bias",
                      "decoder.output.weight": "to_logits.2.weight",
                      "decoder.output.bias": "to_logits.2.bias"})
    elif _is_io(cfg):
        dec = _attention_params("decoder", "decoder_cross_attn", cfg.decoder_qk, context="decoder")
        names.update(dec)
        if cfg.decoder_ffn:
            names.update(_ffn_params("decoder", "decoder_ff"))
        if cfg.decoder_output:
            names.update({"decoder.output.weight": "to_logits.weight",
                          "decoder.output.bias": "to_logits.bias"})
    order = list(param_shapes(cfg))
    missing = [k for k in order if k not in names]
    assert not missing, missing  # every parameter of the schema has a source
    return {k: names[k] for k in order}


def lucidrains_record_names(config: PerceiverConfig) -> dict[str, tuple[str, str, int]]:
    """Golden activation name -> (perceiver-pytorch submodule, ``"output"`` | ``"input"``, call):
    the ``activations`` of :func:`perceiver_np.verify.record_torch`. Every golden activation
    that one of its modules outputs unchanged (or takes as its first input): the norms, the
    query projection, the merged heads, the output projections, the feed-forward's layers, a
    block's output where a module ends there. Not recorded (computed inside a module's forward):
    the keys and values (one fused projection), the scores and probabilities, the residual sums
    inside a block. A block run more than once is recorded at each of its calls."""
    cfg = config
    taps: dict[str, tuple[str, str, int]] = {}
    calls: dict[tuple[str, int], int] = {}
    schedule = cfg.schedule
    names = step_names(cfg)
    for idx, ((kind, i), step) in enumerate(zip(schedule, names, strict=True)):
        call = calls.get((kind, i), 0)
        calls[(kind, i)] = call + 1
        if kind == "cross":
            pre = _cross_prefix(cfg, i)
            attn, ffn = f"{pre}.cross_attn", f"{pre}.cross_ff"
            taps[f"{step}.q_norm.out"] = (f"{attn}.norm", "output", call)
            taps[f"{step}.kv_norm.out"] = (f"{attn}.norm_context", "output", call)
        else:
            pre = _self_prefix(cfg, i)
            attn, ffn = f"{pre}.0", f"{pre}.1"
            taps[f"{step}.norm.out"] = (f"{attn}.norm", "output", call)
        for ours, (sub, where) in _ATTN_TAPS.items():
            taps[f"{step}.{ours}"] = (f"{attn}.{sub}", where, call)
        for ours, (sub, where) in _FFN_TAPS.items():
            taps[f"{step}.{ours}"] = (f"{ffn}.{sub}", where, call)
        ends_block = idx + 1 == len(schedule) or schedule[idx + 1][0] == "cross" or _is_io(cfg)
        if ends_block and not (_is_io(cfg) and kind == "cross"):
            # a PerceiverBlock's output is its last sublayer's residual sum; the IO's cross block
            # has no self block, so its output is the first latent block's input
            block = f"layers.{i}" if _is_io(cfg) else f"layers.{i // _self_per_cross(cfg)}"
            taps[f"{step}.out"] = (block, "output", _block_call(cfg, idx))
    if _is_io(cfg):
        taps["cross.0.out"] = ("cross_attend_block", "output", 0)
        taps["decoder.q_norm.out"] = ("decoder_cross_attn.norm", "output", 0)
        taps["decoder.kv_norm.out"] = ("decoder_cross_attn.norm_context", "output", 0)
        for ours, (sub, where) in _ATTN_TAPS.items():
            taps[f"decoder.{ours}"] = (f"decoder_cross_attn.{sub}", where, 0)
        taps["decoder.attn_residual.out"] = ("decoder_cross_attn", "output", 0)
        if cfg.decoder_ffn:
            for ours, (sub, where) in _FFN_TAPS.items():
                taps[f"decoder.{ours}"] = (f"decoder_ff.{sub}", where, 0)
    elif cfg.decoder == "pool_linear":
        taps["decoder.pool.out"] = ("to_logits.0", "output", 0)
        taps["decoder.norm.out"] = ("to_logits.1", "output", 0)
    return taps


def _block_call(cfg: PerceiverConfig, idx: int) -> int:
    """Which call of its PerceiverBlock module step ``idx`` of the schedule ends: a tied block
    (``layers.1``, or the IO's one shared latent block) runs once per use."""
    schedule = cfg.schedule
    if _is_io(cfg):
        kind, i = schedule[idx]
        return sum(1 for k, j in schedule[:idx] if (k, j) == (kind, i))
    crosses_before = [j for k, j in schedule[:idx + 1] if k == "cross"]
    last = crosses_before[-1]
    return sum(1 for j in crosses_before[:-1] if j == last)


def options_of(module: Any, index_dims: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The options of the perceiver_np model a live ``perceiver_pytorch.Perceiver`` or
    ``PerceiverIO`` computes, read off the module (its constructor arguments are not kept)."""
    kind = type(module).__name__
    ours = type(module).__module__.startswith("perceiver_pytorch")
    if not ours or kind not in ("Perceiver", "PerceiverIO"):
        raise TypeError(f"module: expected a perceiver_pytorch Perceiver or PerceiverIO, got "
                        f"{type(module).__module__}.{kind}")
    num_latents, latent_dim = (int(d) for d in module.latents.shape)
    first = module.layers[0] if kind == "Perceiver" else module.cross_attend_block
    cross = first.cross_attn.fn
    inner = cross.to_q.out_features
    if getattr(cross, "queries_contribute_kv", False):
        raise ValueError("module: queries_contribute_kv (the latents join the keys and values) "
                         "is not supported")
    latent_block = first if kind == "Perceiver" else module.layers[0]
    self_attn = latent_block.self_attns[0][0].fn if len(latent_block.self_attns) else None
    common = dict(num_latents=num_latents, latent_dim=latent_dim, cross_heads=cross.heads,
                  cross_dim_head=inner // cross.heads)
    if self_attn is not None:
        common.update(latent_heads=self_attn.heads,
                      latent_dim_head=self_attn.to_q.out_features // self_attn.heads)
    ff_up = first.cross_ff.fn.net[0].out_features
    if ff_up != 2 * LUCIDRAINS_FF_MULT * latent_dim:
        raise ValueError(f"module: its feed-forward widens {latent_dim} to {ff_up} channels; "
                         f"perceiver-pytorch's is 2 * {LUCIDRAINS_FF_MULT} * dim")
    if getattr(module, "has_attn_residual", False):
        raise ValueError("module: attn_residual (the Enformer attention residual) is not supported")
    inverted = module.inverted_cross_attn
    if inverted is True or (isinstance(inverted, tuple) and any(inverted)):
        raise ValueError("module: inverted_cross_attn is not supported")
    depth = len(module.layers)
    if kind == "Perceiver":
        axes = module.input_axis
        fourier = bool(module.fourier_encode_data)
        channels = cross.to_kv.in_features - (axes * (2 * module.num_freq_bands + 1) if fourier else 0)
        tied = depth > 2 and module.layers[1] is module.layers[2]
        head = module.to_logits
        classes = head[2].out_features if hasattr(head, "__getitem__") else None
        opts = lucidrains_options(dict(
            common, num_freq_bands=module.num_freq_bands, depth=depth, max_freq=module.max_freq,
            input_channels=channels, input_axis=axes, fourier_encode_data=fourier,
            self_per_cross_attn=len(first.self_attns), weight_tie_layers=tied,
            final_classifier_head=classes is not None, num_classes=classes or 1), index_dims)
    else:
        tied = depth > 1 and module.layers[0] is module.layers[1]
        dec = module.decoder_cross_attn
        logits = getattr(module.to_logits, "out_features", None)
        opts = from_lucidrains_io(dict(
            common, depth=depth, dim=cross.to_kv.in_features, queries_dim=dec.norm.normalized_shape[0],
            logits_dim=logits, weight_tie_layers=tied, decoder_ff=module.decoder_ff is not None))
    return opts


def from_lucidrains(module: Any, *, index_dims: tuple[int, ...] | None = None,
                    dtype: str = "float64") -> Perceiver:
    """A perceiver_np model equal to the live perceiver-pytorch ``module`` (``Perceiver`` or
    ``PerceiverIO``), its weights copied (Linear weights transposed to our ``[in, out]``, the
    fused ``to_kv`` split into keys and values). ``index_dims``: the input grid, for a
    ``Perceiver`` that Fourier-encodes its data (``data.shape[1:-1]``). Every parameter of the
    module is used, or the structure is refused."""
    import torch

    cfg = make_config(**options_of(module, index_dims), dtype=dtype)
    by_name = {k: v.detach().to(torch.float64).cpu().numpy() for k, v in module.named_parameters()}
    names = lucidrains_name_map(cfg)
    used = {theirs if isinstance(theirs, str) else theirs[0] for theirs in names.values()}
    unused = sorted(set(by_name) - used)
    if unused:
        raise ValueError(f"module: parameters with no place in the model: {unused[:5]}")
    params = {}
    for ours, theirs in names.items():
        name, rows = (theirs, None) if isinstance(theirs, str) else (theirs[0], theirs[1:])
        value = by_name[name] if rows is None else by_name[name][rows[0]:rows[1]]
        if ours.endswith(".weight") and value.ndim == 2:
            value = value.T  # torch's Linear weight [out, in] -> our [in, out]
        params[ours] = np.ascontiguousarray(value, dtype=cfg.np_dtype)
    return Perceiver(cfg, params)


def record_lucidrains(module: Any, x: Any, dy: Any, *, mask: Any = None, queries: Any = None,
                      index_dims: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """One forward and backward of a float64 perceiver-pytorch ``module`` on our layout, recorded
    under the golden names (:func:`perceiver_np.verify.record_torch` with
    :func:`lucidrains_record_names` and :func:`lucidrains_name_map`): x [B, N, C] (reshaped to
    their ``[B, *index_dims, C]`` for a ``Perceiver`` that encodes its grid), mask [B, N] bool,
    queries [B, O, Cq] for a ``PerceiverIO``; ``dy`` the golden file's ``loss/dy``."""
    cfg = make_config(**options_of(module, index_dims))
    x = np.asarray(x, dtype=np.float64)
    grid = tuple(cfg.input_index_dims or ()) if cfg.input_fourier != "none" else None

    def forward(mod: Any, inputs: dict[str, Any]) -> Any:
        data = inputs["x"]
        if grid is not None:
            data = data.reshape(data.shape[0], *grid, data.shape[-1])  # [B, N, C] -> [B, *grid, C]
        kwargs = {k: v for k, v in inputs.items() if k != "x"}
        return mod(data, **kwargs)

    inputs: dict[str, Any] = {"x": x}
    if mask is not None:
        inputs["mask"] = np.asarray(mask, dtype=bool)
    if queries is not None:
        inputs["queries"] = np.asarray(queries, dtype=np.float64)
    return record_torch(module, inputs, dy, activations=lucidrains_record_names(cfg),
                        params=lucidrains_name_map(cfg), forward=forward)
