"""krasserm's ``perceiver-io`` (PyPI; tested against 0.11.0): its Perceiver IO, a
``PerceiverIO(PerceiverEncoder, PerceiverDecoder)`` or a ``PerceiverEncoder`` alone (from
``perceiver.model.core``), as a perceiver_np model, weights included, and the maps that record
it under the golden names.

::

    model = pnp.from_krasserm(module)                 # a live perceiver.model.core.PerceiverIO
    x = module.encoder.input_adapter(data)            # our input is their input adapter's OUTPUT
    y = model(x, ~pad_mask)                           # = module.decoder(module.encoder(data, pad_mask))
    theirs = verify.record_krasserm(module, x, dy, mask=~pad_mask)

How their structure maps (docs/verify.md, "krasserm perceiver-io"):

- The input adapter (token embeddings, an image's pixels with Fourier positions, ...) stays
  outside: our x [B, N, C] is its output (``C = input_adapter.num_input_channels``), read by the
  cross-attention directly (``input_projection=False``); its parameters are not copied.
- ``MultiHeadAttention``'s ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` -> ``attn.q`` /
  ``attn.k`` / ``attn.v`` / ``attn.out`` (Linear weights transposed to our ``[in, out]``);
  ``CrossAttention``'s ``q_norm`` / ``kv_norm`` and ``SelfAttention``'s ``norm`` keep their
  names; a layer's ``MLP`` (LayerNorm, Linear, GELU, Linear) -> ``ffn_norm``, ``ffn.up``,
  ``ffn.down``.
- ``latent_provider._query`` -> ``latents``; ``cross_attn_1`` (and ``cross_attn_n``, when it
  exists) -> ``cross.0`` (``cross.1``); the layers of ``self_attn_1`` (then of ``self_attn_n``)
  -> ``self.0``, ``self.1``, ...; the order they run in and what they share
  (``num_cross_attention_layers``, ``num_self_attention_blocks``, ``first_*_shared``) ->
  ``num_blocks``, or ``block_order`` where that cannot say it.
- The decoder: ``output_query_provider._query`` -> ``decoder.queries``, ``cross_attn`` ->
  ``decoder.*`` (``cross_attention_residual`` -> ``decoder_query_residual``), the
  ``ClassificationOutputAdapter``'s ``linear`` -> ``decoder.output``.
- Masks: their ``pad_mask`` is True = PADDING, ours True = keep: ``mask = ~pad_mask``. A sample
  whose every input is padding attends uniformly in both (``masked_rows="uniform"``: theirs fills
  the logits with ``-finfo.max``).

torch and perceiver-io are imported by none of this module's code: it reads live modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from .config import PerceiverConfig, make_config, param_shapes
from .model import Perceiver, step_names
from .shapes import as_mask, expect_shape
from .torch_record import record_torch

#: Their ``EncoderConfig``'s fields and defaults (perceiver/model/core/config.py, perceiver-io
#: 0.11.0), and ``PerceiverEncoder``'s ``residual_dropout``. The dropout rates, ``init_scale``
#: and ``freeze`` change no forward or backward of the model in eval mode.
KRASSERM_ENCODER_DEFAULTS: dict[str, Any] = {
    "num_cross_attention_heads": 8, "num_cross_attention_qk_channels": None,
    "num_cross_attention_v_channels": None, "num_cross_attention_layers": 1,
    "first_cross_attention_layer_shared": False, "cross_attention_widening_factor": 1,
    "num_self_attention_heads": 8, "num_self_attention_qk_channels": None,
    "num_self_attention_v_channels": None, "num_self_attention_layers_per_block": 8,
    "num_self_attention_blocks": 1, "first_self_attention_block_shared": True,
    "self_attention_widening_factor": 1, "dropout": 0.0, "residual_dropout": 0.0,
    "init_scale": 0.02, "freeze": False,
}
#: Their ``ClassificationDecoderConfig``'s fields and defaults (``DecoderConfig``'s and the
#: output queries and classes).
KRASSERM_DECODER_DEFAULTS: dict[str, Any] = {
    "num_cross_attention_heads": 8, "num_cross_attention_qk_channels": None,
    "num_cross_attention_v_channels": None, "cross_attention_widening_factor": 1,
    "cross_attention_residual": True, "dropout": 0.0, "init_scale": 0.02, "freeze": False,
    "num_output_queries": 1, "num_output_query_channels": 256, "num_classes": 100,
}
#: Their ``PerceiverIOConfig``'s fields (``num_latents`` and ``num_latent_channels`` have no
#: default; ``decoder`` None: the encoder alone). Activation checkpointing recomputes the same
#: functions in the backward.
KRASSERM_DEFAULTS: dict[str, Any] = {
    "encoder": None, "decoder": None, "num_latents": None, "num_latent_channels": None,
    "activation_checkpointing": False, "activation_offloading": False,
}

#: Keys of their task configs that perceiver_np does not take, and why.
_ADAPTER_KEYS = ("image_shape", "num_frequency_bands", "vocab_size", "max_seq_len",
                 "num_input_channels", "params")
_TEXT_DECODER_KEYS = ("vocab_size", "max_seq_len")


def _section(what: str, given: Any, defaults: Mapping[str, Any],
             refused: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise TypeError(f"{what}: expected a dict of krasserm's config fields "
                        f"(dataclasses.asdict of their config), got {type(given).__name__}")
    for key, why in refused.items():
        if key in given:
            raise ValueError(f"{what}[{key!r}]: {why}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; krasserm's are {sorted(defaults)}")
    return {**defaults, **given}


def _positive(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")
    return int(value)


def their_steps(num_cross_attention_layers: int, num_self_attention_blocks: int, layers_per_block: int,
                first_cross_shared: bool, first_self_shared: bool) -> tuple[tuple[str, int], ...]:
    """The order ``PerceiverEncoder.forward`` runs its layers in, as ``block_order`` steps: cross
    0 (``cross_attn_1``), the self block (``self_attn_1``'s layers 0..L-1), then for every further
    self block i: cross ``n`` while i < ``num_cross_attention_layers``, and self block ``n``.
    Block ``n`` is a second set of weights (cross 1; self L..2L-1), or the first one again when
    ``first_*_shared`` (or when there is only one block of that kind)."""
    extra_cross = num_cross_attention_layers > 1 and not first_cross_shared
    extra_self = num_self_attention_blocks > 1 and not first_self_shared
    cross_n = 1 if extra_cross else 0
    self_n = layers_per_block if extra_self else 0
    steps: list[tuple[str, int]] = [("cross", 0), *(("self", j) for j in range(layers_per_block))]
    for i in range(1, num_self_attention_blocks):
        if i < num_cross_attention_layers:
            steps.append(("cross", cross_n))
        steps += [("self", self_n + j) for j in range(layers_per_block)]
    return tuple(steps)


def krasserm_options(config: Mapping[str, Any], *, input_channels: int, **overrides: Any) -> dict[str, Any]:
    """Options of the model krasserm's ``PerceiverIO`` built from ``config`` computes on its input
    adapter's output, ``input_channels`` (``input_adapter.num_input_channels``) wide::

        cfg = PerceiverIOConfig(encoder=EncoderConfig(...), decoder=ClassificationDecoderConfig(...),
                                num_latents=64, num_latent_channels=128)
        opts = krasserm_options(dataclasses.asdict(cfg), input_channels=32)

    ``config``: ``dataclasses.asdict`` of their ``PerceiverIOConfig``; its ``encoder`` holds
    ``EncoderConfig``'s fields (and ``PerceiverEncoder``'s ``residual_dropout``), its
    ``decoder`` ``ClassificationDecoderConfig``'s (None: the encoder alone, whose latents are
    the output). Every field is checked by name (a misspelt one would otherwise leave their
    default in place silently). Their blocks are pre-LN with residuals, exact GELU MLPs and q/k/v
    biases; the qk width of an attention defaults to its query side's width (the latents', or
    the output queries' in the decoder), its v width to the qk width; there is no input
    projection and no final LayerNorm. One output query makes ``decoder="classification"``
    ([B, num_classes]: their ``squeeze(dim=1)``), several a trainable-query decoder. Dropout
    rates are not carried over: they act only in training, where no two libraries draw the
    same masks. Refused: the input adapters' settings (``image_shape``, ``vocab_size``, ...;
    give ``input_channels`` instead) and the masked language model's token decoder."""
    top = _section("config", config, KRASSERM_DEFAULTS, {})
    for key in ("encoder", "num_latents", "num_latent_channels"):
        if top[key] is None:
            raise ValueError(f"config: missing required field {key!r}")
    adapter_why = ("an input adapter's setting (ImageEncoderConfig / TextEncoderConfig); perceiver_np's "
                   "input is the adapter's output: leave it out and give input_channels="
                   "input_adapter.num_input_channels (ImageClassifier also sets "
                   "num_cross_attention_qk_channels to it when None: give that too)")
    enc = _section("config['encoder']", top["encoder"], KRASSERM_ENCODER_DEFAULTS,
                   dict.fromkeys(_ADAPTER_KEYS, adapter_why))
    c = _positive("input_channels", input_channels)
    d = _positive("config['num_latent_channels']", top["num_latent_channels"])
    crosses = _positive("config['encoder']['num_cross_attention_layers']", enc["num_cross_attention_layers"])
    blocks = _positive("config['encoder']['num_self_attention_blocks']", enc["num_self_attention_blocks"])
    per_block = _positive("config['encoder']['num_self_attention_layers_per_block']",
                          enc["num_self_attention_layers_per_block"])
    if crosses > blocks:
        raise ValueError(f"config['encoder']: num_cross_attention_layers ({crosses}) must be <= "
                         f"num_self_attention_blocks ({blocks}): every cross-attention layer is "
                         "followed by a self-attention block")
    cross_qk = enc["num_cross_attention_qk_channels"] or d
    self_qk = enc["num_self_attention_qk_channels"] or d
    opts: dict[str, Any] = {
        "input_dim": c, "latent_dim": d, "num_latents": top["num_latents"],
        "input_projection": False, "final_norm": False, "use_query_residual": True,
        "gelu": "exact", "ffn_kind": "gelu", "qkv_bias": True, "masked_rows": "uniform",
        "dropout": 0.0, "attention_dropout": 0.0,
        "cross_heads": enc["num_cross_attention_heads"], "num_heads": enc["num_self_attention_heads"],
        "cross_qk_channels": cross_qk, "cross_v_channels": enc["num_cross_attention_v_channels"] or cross_qk,
        "self_qk_channels": self_qk, "self_v_channels": enc["num_self_attention_v_channels"] or self_qk,
        "cross_widening_factor": enc["cross_attention_widening_factor"],
        "self_widening_factor": enc["self_attention_widening_factor"],
    }
    steps = their_steps(crosses, blocks, per_block, bool(enc["first_cross_attention_layer_shared"]),
                        bool(enc["first_self_attention_block_shared"]))
    opts["num_cross_layers"] = 1 + max(i for kind, i in steps if kind == "cross")
    opts["num_layers"] = 1 + max(i for kind, i in steps if kind == "self")
    opts.update(_schedule_options(opts, steps, blocks))
    if top["decoder"] is not None:
        opts.update(_decoder_options(top["decoder"]))
    else:
        opts["decoder"] = "latents"
    return {**opts, **overrides}


def _schedule_options(opts: dict[str, Any], steps: tuple[tuple[str, int], ...],
                      blocks: int) -> dict[str, Any]:
    """``num_blocks`` when perceiver_np's own interleaving runs ``steps`` (one cross block with
    its self blocks repeated, or each cross block with its own), else ``block_order``."""
    for repeats in sorted({1, blocks}):
        try:
            if make_config(**opts, num_blocks=repeats).schedule == steps:
                return {"num_blocks": repeats}
        except ValueError:  # e.g. two cross blocks and one self block: only block_order says it
            continue
    return {"num_blocks": 1, "block_order": steps}


def _decoder_options(given: Any) -> dict[str, Any]:
    text_why = ("the masked language model's decoder (TextDecoderConfig, a token output adapter tied "
                "to the input embedding or not) is not supported; ClassificationDecoderConfig's fields are")
    dec = _section("config['decoder']", given, KRASSERM_DECODER_DEFAULTS,
                   dict.fromkeys(_TEXT_DECODER_KEYS, text_why))
    queries = _positive("config['decoder']['num_output_queries']", dec["num_output_queries"])
    cq = _positive("config['decoder']['num_output_query_channels']", dec["num_output_query_channels"])
    qk = dec["num_cross_attention_qk_channels"] or cq
    opts: dict[str, Any] = {
        "query_dim": cq, "output_dim": dec["num_classes"],
        "decoder_heads": dec["num_cross_attention_heads"], "decoder_qk_channels": qk,
        "decoder_v_channels": dec["num_cross_attention_v_channels"] or qk,
        "decoder_widening_factor": dec["cross_attention_widening_factor"],
        "decoder_query_residual": bool(dec["cross_attention_residual"]),
        "decoder_ffn": True, "decoder_output": True,
    }
    if queries == 1:
        opts["decoder"] = "classification"
    else:
        opts.update(decoder="query", query_source="trainable", num_outputs=queries)
    return opts


# --- a live module ---------------------------------------------------------------------------


def _is(obj: Any, name: str) -> bool:
    """Whether ``obj`` is (a subclass of) perceiver-io's class ``name``."""
    return any(c.__name__ == name and c.__module__.startswith("perceiver.model.")
               for c in type(obj).__mro__)


class _Layer(NamedTuple):
    """The module paths of one of their attention layers' two parts."""

    attn: str  # the CrossAttention / SelfAttention (inside its Residual, when it has one)
    mlp: str  # the MLP (LayerNorm, Linear, GELU, Linear), inside its Residual


class _Layout(NamedTuple):
    """Where perceiver_np's pieces are in their module."""

    encoder: Any
    decoder: Any  # None: a PerceiverEncoder alone
    enc: str  # the encoder's path prefix: "0." in a PerceiverIO, "" alone
    dec: str  # the decoder's: "1."
    cross: tuple[_Layer, ...]  # our cross.i
    self_: tuple[_Layer, ...]  # our self.j
    dec_layer: _Layer | None
    per_block: int  # L, the layers of one SelfAttentionBlock


def _layer(module: Any, path: str) -> _Layer:
    attn_residual = _is(module.get_submodule(path)[0], "Residual")
    return _Layer(f"{path}.0.module" if attn_residual else f"{path}.0", f"{path}.1.module")


def _layout(module: Any) -> _Layout:
    if _is(module, "PerceiverAR"):
        raise ValueError(f"module: {type(module).__name__} is Perceiver AR (causal attention with rotary "
                         "position embeddings over a prefix); perceiver_np is the Perceiver / Perceiver IO "
                         "without either")
    if _is(module, "PerceiverIO"):
        encoder, decoder, enc, dec = module[0], module[1], "0.", "1."
    elif _is(module, "PerceiverEncoder"):
        encoder, decoder, enc, dec = module, None, "", ""
    else:
        raise TypeError(f"module: expected a perceiver-io (perceiver.model.core) PerceiverIO or "
                        f"PerceiverEncoder, got {type(module).__module__}.{type(module).__name__}")
    if not _is(encoder, "PerceiverEncoder") or (decoder is not None and not _is(decoder, "PerceiverDecoder")):
        raise TypeError("module: expected a PerceiverIO of a PerceiverEncoder and a PerceiverDecoder, got "
                        f"{type(encoder).__name__} and {type(decoder).__name__}")
    per_block = len(encoder.self_attn_1)
    cross = [_layer(module, f"{enc}cross_attn_1")]
    if encoder.extra_cross_attention_layer:
        cross.append(_layer(module, f"{enc}cross_attn_n"))
    blocks = ["self_attn_1"] + (["self_attn_n"] if encoder.extra_self_attention_block else [])
    self_ = [_layer(module, f"{enc}{b}.{j}") for b in blocks for j in range(per_block)]
    dec_layer = _layer(module, f"{dec}cross_attn") if decoder is not None else None
    return _Layout(encoder, decoder, enc, dec, tuple(cross), tuple(self_), dec_layer, per_block)


def _check_layers(module: Any) -> bool:
    """Refuse what no option expresses; -> whether the q/k/v projections have biases."""
    biases = set()
    for path, sub in module.named_modules():
        if _is(sub, "MultiHeadAttention"):
            if sub.causal_attention:
                raise ValueError(f"module: {path} has causal_attention=True; perceiver_np's attention "
                                 "is not causal (Perceiver AR's is)")
            if sub.o_proj.bias is None:
                raise ValueError(f"module: {path} has out_bias=False; perceiver_np's attention output "
                                 "projection always has a bias")
            biases.add(all(p.bias is not None for p in (sub.q_proj, sub.k_proj, sub.v_proj)))
        if _is(sub, "MLP") and (sub[1].bias is None or sub[3].bias is None):
            raise ValueError(f"module: {path} has mlp_bias=False; perceiver_np's feed-forward Linears "
                             "always have biases")
    if len(biases) > 1:
        raise ValueError("module: some attention layers have q/k/v biases and some do not; "
                         "perceiver_np's qkv_bias is one switch for the whole model")
    return biases != {False}


def _attention_fields(module: Any, layer: _Layer) -> tuple[int, int, int, int]:
    """(heads, qk width, v width, MLP widening factor) of one of their layers."""
    mha = module.get_submodule(layer.attn).attention
    up = module.get_submodule(layer.mlp)[1]
    return mha.num_heads, mha.num_qk_channels, mha.num_v_channels, up.out_features // up.in_features


def options_of(module: Any) -> dict[str, Any]:
    """The options of the perceiver_np model a live perceiver-io ``PerceiverIO`` (or
    ``PerceiverEncoder``) computes on its input adapter's output, read off the module and given
    to :func:`krasserm_options` as their config. Refused: Perceiver AR, causal attention, an
    output projection or MLP without biases, an output query provider other than their
    ``TrainableQueryProvider`` (e.g. optical flow's, which reuses the adapted input) and an output
    adapter other than their ``ClassificationOutputAdapter`` (a Linear, then ``squeeze(dim=1)``)."""
    lay = _layout(module)
    qkv_bias = _check_layers(module)
    encoder = lay.encoder
    num_latents, latent_channels = (int(s) for s in encoder.latent_provider._query.shape)
    cross_heads, cross_qk, cross_v, cross_wide = _attention_fields(module, lay.cross[0])
    self_heads, self_qk, self_v, self_wide = _attention_fields(module, lay.self_[0])
    config: dict[str, Any] = {
        "num_latents": num_latents, "num_latent_channels": latent_channels,
        "encoder": {
            "num_cross_attention_heads": cross_heads, "num_cross_attention_qk_channels": cross_qk,
            "num_cross_attention_v_channels": cross_v,
            "num_cross_attention_layers": encoder.num_cross_attention_layers,
            "first_cross_attention_layer_shared": encoder.first_cross_attention_layer_shared,
            "cross_attention_widening_factor": cross_wide,
            "num_self_attention_heads": self_heads, "num_self_attention_qk_channels": self_qk,
            "num_self_attention_v_channels": self_v, "num_self_attention_layers_per_block": lay.per_block,
            "num_self_attention_blocks": encoder.num_self_attention_blocks,
            "first_self_attention_block_shared": encoder.first_self_attention_block_shared,
            "self_attention_widening_factor": self_wide,
        },
    }
    use_query_residual = lay.cross[0].attn.endswith(".module")
    if lay.decoder is not None and lay.dec_layer is not None:
        provider, adapter = lay.decoder.output_query_provider, lay.decoder.output_adapter
        if not _is(provider, "TrainableQueryProvider"):
            raise ValueError(f"module: the decoder's output_query_provider is a {type(provider).__name__}; "
                             "perceiver_np's decoder queries are trainable (their TrainableQueryProvider) "
                             "or given, never computed from the input")
        if not _is(adapter, "ClassificationOutputAdapter"):
            raise ValueError(f"module: the decoder's output_adapter is a {type(adapter).__name__}; only "
                             "their ClassificationOutputAdapter (one Linear, then squeeze(dim=1)) is "
                             "perceiver_np's decoder output (docs/verify.md says why the others are not)")
        heads, qk, v, wide = _attention_fields(module, lay.dec_layer)
        num_queries, query_channels = (int(s) for s in provider._query.shape)
        config["decoder"] = {
            "num_cross_attention_heads": heads, "num_cross_attention_qk_channels": qk,
            "num_cross_attention_v_channels": v, "cross_attention_widening_factor": wide,
            "cross_attention_residual": lay.dec_layer.attn.endswith(".module"),
            "num_output_queries": num_queries, "num_output_query_channels": query_channels,
            "num_classes": adapter.linear.out_features,
        }
    return krasserm_options(config, input_channels=encoder.input_adapter.num_input_channels,
                            qkv_bias=qkv_bias, use_query_residual=use_query_residual)


# --- the name maps -----------------------------------------------------------------------------

#: Our block-local names -> their names under a layer's attention, MLP: LayerNorms, then Linears.
_PROJECTIONS = (("attn.q", "attention.q_proj"), ("attn.k", "attention.k_proj"),
                ("attn.v", "attention.v_proj"), ("attn.out", "attention.o_proj"))
_MLP = (("ffn_norm", "0", ("gamma", "beta")), ("ffn.up", "1", ("weight", "bias")),
        ("ffn.down", "3", ("weight", "bias")))


def _layer_params(ours: str, layer: _Layer, norms: tuple[str, ...]) -> dict[str, str]:
    """Our names of one of their layers' parameters -> theirs (``norms``: the attention's
    LayerNorms, named alike on both sides)."""
    names = {}
    for norm in norms:
        names[f"{ours}.{norm}.gamma"] = f"{layer.attn}.{norm}.weight"
        names[f"{ours}.{norm}.beta"] = f"{layer.attn}.{norm}.bias"
    for our, their in _PROJECTIONS:
        for kind in ("weight", "bias"):
            names[f"{ours}.{our}.{kind}"] = f"{layer.attn}.{their}.{kind}"
    for our, index, (weight, bias) in _MLP:
        names[f"{ours}.{our}.{weight}"] = f"{layer.mlp}.{index}.weight"
        names[f"{ours}.{our}.{bias}"] = f"{layer.mlp}.{index}.bias"
    return names


def _name_map(cfg: PerceiverConfig, lay: _Layout) -> dict[str, str]:
    names: dict[str, str] = {"latents": f"{lay.enc}latent_provider._query"}
    for i, layer in enumerate(lay.cross):
        names.update(_layer_params(f"cross.{i}", layer, ("q_norm", "kv_norm")))
    for j, layer in enumerate(lay.self_):
        names.update(_layer_params(f"self.{j}", layer, ("norm",)))
    if lay.dec_layer is not None:
        names["decoder.queries"] = f"{lay.dec}output_query_provider._query"
        names.update(_layer_params("decoder", lay.dec_layer, ("q_norm", "kv_norm")))
        names["decoder.output.weight"] = f"{lay.dec}output_adapter.linear.weight"
        names["decoder.output.bias"] = f"{lay.dec}output_adapter.linear.bias"
    order = list(param_shapes(cfg))  # without qkv_bias, the q/k/v biases drop out here
    missing = [k for k in order if k not in names]
    assert not missing, missing  # every parameter of the schema has a source
    return {k: names[k] for k in order}


def krasserm_name_map(module: Any) -> dict[str, str]:
    """Our parameter name -> the perceiver-io module's parameter name (``named_parameters``),
    in our schema order: the ``params`` of :func:`perceiver_np.verify.record_torch`."""
    return _name_map(make_config(**options_of(module)), _layout(module))


def _layer_taps(step: str, layer: _Layer, norms: tuple[str, ...],
                call: int) -> dict[str, tuple[str, str, int]]:
    """Golden names -> their submodules, for one use (``call``) of one of their layers."""
    taps = {f"{step}.{norm}.out": (f"{layer.attn}.{norm}", "output", call) for norm in norms}
    for our, their in _PROJECTIONS:  # attn.q.out, attn.k.out, attn.v.out; the output projection's: attn.out
        name = f"{step}.{our}" if our == "attn.out" else f"{step}.{our}.out"
        taps[name] = (f"{layer.attn}.{their}", "output", call)
    taps[f"{step}.attn.heads.out"] = (f"{layer.attn}.attention.o_proj", "input", call)  # the merged heads
    taps[f"{step}.attn_residual.out"] = (layer.mlp, "input", call)  # the MLP's input
    for our, index in (("ffn_norm", "0"), ("ffn.up", "1"), ("ffn.act", "2"), ("ffn.down", "3")):
        taps[f"{step}.{our}.out"] = (f"{layer.mlp}.{index}", "output", call)
    return taps


def _record_names(cfg: PerceiverConfig, lay: _Layout) -> dict[str, tuple[str, str, int]]:
    first_norm = {"cross": "q_norm", "self": "norm"}
    schedule = cfg.schedule
    uses = [sum(1 for s in schedule[:idx] if s == step) for idx, step in enumerate(schedule)]
    layers = [(lay.cross if kind == "cross" else lay.self_)[i] for kind, i in schedule]
    taps: dict[str, tuple[str, str, int]] = {"input": (f"{lay.cross[0].attn}.kv_norm", "input", 0)}
    for idx, ((kind, _), step) in enumerate(zip(schedule, step_names(cfg), strict=True)):
        norms = ("q_norm", "kv_norm") if kind == "cross" else ("norm",)
        taps.update(_layer_taps(step, layers[idx], norms, uses[idx]))
        # a layer's output is a residual sum inside their Residual: it is the next layer's input
        if idx + 1 < len(schedule):
            nxt = f"{layers[idx + 1].attn}.{first_norm[schedule[idx + 1][0]]}"
            taps[f"{step}.out"] = (nxt, "input", uses[idx + 1])
        elif lay.dec_layer is not None:
            taps[f"{step}.out"] = (f"{lay.dec_layer.attn}.kv_norm", "input", 0)
    if lay.dec_layer is not None:
        taps.update(_layer_taps("decoder", lay.dec_layer, ("q_norm", "kv_norm"), 0))
        taps["decoder.out"] = (f"{lay.dec}output_adapter.linear", "input", 0)
    return taps


def krasserm_record_names(module: Any) -> dict[str, tuple[str, str, int]]:
    """Golden activation name -> (perceiver-io submodule, ``"output"`` | ``"input"``, call): the
    ``activations`` of :func:`perceiver_np.verify.record_torch`. Every golden activation but the
    attention scores and probabilities (computed inside their ``MultiHeadAttention``): the
    LayerNorms, the query, key and value projections, the merged heads (the output projection's
    input), the output projection, the attention residual (the MLP's input), the MLP's layers,
    a layer's output (the next layer's first LayerNorm's input: their residual sums happen
    inside ``Residual`` modules, whose outputs are not tensors). A shared layer is recorded at
    each of its calls. An encoder alone has no next layer: its last output is ``act/output``."""
    return _record_names(make_config(**options_of(module)), _layout(module))


# --- weights and runs -------------------------------------------------------------------------


def from_krasserm(module: Any, *, dtype: str = "float64") -> Perceiver:
    """A perceiver_np model equal to the live perceiver-io ``module`` (a ``PerceiverIO`` of their
    ``PerceiverEncoder`` and ``PerceiverDecoder``, or a ``PerceiverEncoder``), its weights copied
    (Linear weights transposed to our ``[in, out]``). Its input is their input adapter's output,
    x [B, N, C] with ``C = input_adapter.num_input_channels``; the adapter's own parameters
    (embeddings, ...) are not part of it. Every other parameter of the module is used, or the
    structure is refused (:func:`options_of` says what and why)."""
    import torch

    lay = _layout(module)
    cfg = make_config(**options_of(module), dtype=dtype)
    names = _name_map(cfg, lay)
    by_name = {k: v.detach().to(torch.float64).cpu().numpy() for k, v in module.named_parameters()}
    adapter = f"{lay.enc}input_adapter."
    unused = sorted(set(by_name) - set(names.values()) - {k for k in by_name if k.startswith(adapter)})
    if unused:
        raise ValueError(f"module: parameters with no place in the model: {unused[:5]}")
    params = {}
    for ours, theirs in names.items():
        value = by_name[theirs]
        if ours.endswith(".weight") and value.ndim == 2:
            value = value.T  # torch's Linear weight [out, in] -> our [in, out]
        params[ours] = np.ascontiguousarray(value, dtype=cfg.np_dtype)
    return Perceiver(cfg, params)


def record_krasserm(module: Any, x: Any, dy: Any, *, mask: Any = None) -> dict[str, np.ndarray]:
    """One forward and backward of a float64 perceiver-io ``module`` on our layout, recorded
    under the golden names (:func:`perceiver_np.verify.record_torch` with
    :func:`krasserm_record_names` and :func:`krasserm_name_map`): x [B, N, C], their input
    adapter's output (the adapter is set aside for the call, and put back also on error), mask
    [B, N] bool, True = keep (passed as their ``pad_mask = ~mask``); ``dy`` the golden file's
    ``loss/dy``. Runs ``decoder(encoder(x, pad_mask=...))``, as their classifiers' ``forward``
    does. Their latents and output queries are [1, ...] and broadcast inside the attention: the
    activations computed from them alone (the first cross layer's and the decoder's query side)
    are recorded [1, ...] and broadcast to [B, ...] here."""
    import torch

    lay = _layout(module)
    cfg = make_config(**options_of(module))
    checkpointed = [path for path, sub in module.named_modules() if "forward" in vars(sub)]
    if checkpointed:
        raise ValueError(f"module: {checkpointed[0]} runs through fairscale's checkpoint_wrapper "
                         "(activation_checkpointing=True), which returns a tuple where perceiver-io "
                         "expects its ModuleOutput under torch 2 (their model fails); build it without: "
                         "the computation is the same")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"x: expected shape [B, N, C] with C = {cfg.input_dim}, got {x.shape}")
    expect_shape("x", x, (None, None, cfg.input_dim), "[B, N, C]")
    inputs: dict[str, Any] = {"x": x}
    keep = as_mask(mask, x.shape[0], x.shape[1])
    if keep is not None:
        inputs["pad_mask"] = ~keep  # theirs: True = padding

    def forward(mod: Any, given: dict[str, Any]) -> Any:
        encoder = lay.encoder
        adapter = encoder._modules["input_adapter"]
        encoder._modules["input_adapter"] = torch.nn.Identity()  # x is the adapter's output
        try:
            z = encoder(given["x"], pad_mask=given.get("pad_mask"))
        finally:
            encoder._modules["input_adapter"] = adapter
        return z if lay.decoder is None else lay.decoder(z)

    out = record_torch(module, inputs, dy, activations=_record_names(cfg, lay), params=_name_map(cfg, lay),
                       forward=forward)
    batch = x.shape[0]
    for name, value in out.items():
        if name.startswith("act/") and value.shape[:1] == (1,) and batch > 1:
            out[name] = np.ascontiguousarray(np.broadcast_to(value, (batch, *value.shape[1:])))
    return out
