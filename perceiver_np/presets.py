"""Presets: option sets that reproduce the published Perceivers (docs/presets.md).

Each preset is a function returning a plain dict of :class:`~perceiver_np.PerceiverConfig`
options; every switch in it is an ordinary option, so a preset can be overridden field by field::

    model = pnp.build(**pnp.presets.deepmind(input_dim=3, latent_dim=64, num_latents=32))

- ``edifice``: the seed model (Edifice's ``Perceiver.build``), perceiver_np's default.
- ``deepmind``: DeepMind's Perceiver IO encoder (JAX/Haiku, the paper's code) with its ImageNet
  sizes: no input projection (LayerNorm on the raw input), cross-attention qk width from the
  input, 1 cross head and 8 self heads, widening 1, tanh GELU, one cross block then
  ``num_blocks`` repeats of the shared self blocks, masked logits -1e30 with rows that see no
  key zeroed, no final LayerNorm, the latents as the output (its decoders follow).
- ``hf``: Hugging Face ``transformers``' ``PerceiverModel`` with ``PerceiverConfig()``'s
  defaults: as DeepMind but exact GELU, dropout only on attention probabilities (0.1), and a
  row that sees no key attending uniformly over all keys (HF's additive ``finfo.min`` mask).

- ``lucidrains``: lucidrains' ``perceiver-pytorch`` ``Perceiver`` with its defaults: GEGLU
  feed-forwards (x4), bias-free query and key/value projections, 1 cross head of 64 channels and
  8 self heads of 64, no input projection and no final LayerNorm, a row that sees no key
  attending uniformly (its ``-finfo.max`` fill), and its classifier head ``LN(mean(z)) @ W``.

:func:`from_deepmind` turns the keyword arguments of DeepMind's own ``PerceiverEncoder`` and
``BasicDecoder`` / ``ClassificationDecoder`` (perceiver/perceiver.py of deepmind-research) into
options, every argument checked by name; :func:`from_lucidrains` and :func:`from_lucidrains_io`
do the same for perceiver-pytorch's ``Perceiver`` and ``PerceiverIO``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .config import RECOMMENDED_DEFAULTS

PRESETS = ("edifice", "deepmind", "hf", "lucidrains")


def edifice(**overrides: Any) -> dict[str, Any]:
    """The seed: Edifice's defaults (``input_dim`` is required, as in Edifice)."""
    return {**RECOMMENDED_DEFAULTS, **overrides}


def deepmind(**overrides: Any) -> dict[str, Any]:
    """DeepMind's Perceiver IO encoder (ImageNet configuration of the paper's code)."""
    opts: dict[str, Any] = {
        "latent_dim": 1024, "num_latents": 512,
        "input_projection": False, "qk_channels": None, "v_channels": None,
        "cross_heads": 1, "num_heads": 8,
        "cross_widening_factor": 1, "self_widening_factor": 1,
        "num_cross_layers": 1, "num_layers": 6, "num_blocks": 8,
        "use_query_residual": True, "gelu": "tanh",
        "dropout": 0.0, "attention_dropout": 0.0, "masked_rows": "zero",
        "final_norm": False, "decoder": "latents", "query_masking": "attention",
    }
    return {**opts, **overrides}


def hf(**overrides: Any) -> dict[str, Any]:
    """Hugging Face ``PerceiverModel`` with ``transformers.PerceiverConfig()``'s defaults:
    d_latents 1280, 256 latents, 26 self-attends in 1 block, 8 heads each side."""
    opts: dict[str, Any] = {
        **deepmind(),
        "latent_dim": 1280, "num_latents": 256,
        "cross_heads": 8, "num_heads": 8, "num_layers": 26, "num_blocks": 1,
        "gelu": "exact", "dropout": 0.0, "attention_dropout": 0.1, "masked_rows": "uniform",
        "query_masking": "output",
    }
    return {**opts, **overrides}


def lucidrains(**overrides: Any) -> dict[str, Any]:
    """lucidrains' ``perceiver_pytorch.Perceiver`` with its defaults (without its Fourier input
    features, which need the input grid: :func:`from_lucidrains` adds them)."""
    return {**from_lucidrains({"num_freq_bands": 6, "depth": 1, "max_freq": 10.0,
                               "fourier_encode_data": False}), **overrides}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset called ``name`` (one of :data:`PRESETS`) with ``overrides`` applied."""
    table = {"edifice": edifice, "deepmind": deepmind, "hf": hf, "lucidrains": lucidrains}
    if name not in table:
        raise ValueError(f"preset: expected one of {PRESETS}, got {name!r}")
    return table[name](**overrides)


#: DeepMind's ``PerceiverEncoder`` keyword arguments and their defaults (deepmind-research,
#: perceiver/perceiver.py). ``z_pos_enc_init_scale`` and ``name`` change no computation.
DEEPMIND_ENCODER_DEFAULTS: dict[str, Any] = {
    "num_self_attends_per_block": 6, "num_blocks": 8, "z_index_dim": 512, "num_z_channels": 1024,
    "qk_channels": None, "v_channels": None, "num_cross_attend_heads": 1, "num_self_attend_heads": 8,
    "cross_attend_widening_factor": 1, "self_attend_widening_factor": 1, "dropout_prob": 0.0,
    "z_pos_enc_init_scale": 0.02, "cross_attention_shape_for_attn": "kv", "use_query_residual": True,
    "name": "perceiver_encoder",
}
#: DeepMind's ``BasicDecoder`` keyword arguments and their defaults (``ClassificationDecoder``
#: takes ``num_classes`` instead of ``output_num_channels`` and ``output_index_dims``).
#: ``output_w_init``, the encodings' ``init_scale`` and ``name`` change no computation.
DEEPMIND_DECODER_DEFAULTS: dict[str, Any] = {
    "output_num_channels": None, "position_encoding_type": "trainable", "output_index_dims": None,
    "subsampled_index_dims": None, "num_z_channels": 1024, "qk_channels": None, "v_channels": None,
    "use_query_residual": False, "output_w_init": None, "concat_preprocessed_input": False,
    "num_heads": 1, "final_project": True, "trainable_position_encoding_kwargs": None,
    "fourier_position_encoding_kwargs": None, "num_classes": None, "name": "basic_decoder",
}


def _kwargs(what: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    if given is None:
        return dict(defaults)
    if not isinstance(given, Mapping):
        raise TypeError(f"{what}: expected a dict of DeepMind's keyword arguments, "
                        f"got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown argument(s) {unknown}; DeepMind's are {sorted(defaults)}")
    return {**defaults, **given}


def from_deepmind(
    encoder_kwargs: Mapping[str, Any] | None = None,
    decoder_kwargs: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Options of the model DeepMind's ``PerceiverEncoder(**encoder_kwargs)`` followed by its
    decoder (``decoder_kwargs``: a ``ClassificationDecoder``'s when they hold ``num_classes``,
    else a ``BasicDecoder``'s; None: no decoder, the latents are the output) computes, on inputs
    of ``input_dim`` channels (an override, like every other option)::

        opts = presets.from_deepmind(dict(num_z_channels=256, z_index_dim=64, num_blocks=2),
                                     dict(num_classes=10, num_z_channels=256), input_dim=261)

    Every argument is checked by name (a misspelt one would otherwise leave DeepMind's default
    in place silently) and every value that perceiver_np does not compute is refused with the
    reason. ``cross_attention_shape_for_attn='q'`` without ``qk_channels`` becomes
    ``qk_channels = num_z_channels`` (DeepMind's cross-attention then takes its qk width from
    the latents; the self-attention's default is that width too). DeepMind's GELU is the tanh
    approximation, its ``dropout_prob`` drops after each attention and MLP (``dropout``), its
    masked rows are zero, and there is no input projection and no final LayerNorm.
    """
    enc = _kwargs("encoder_kwargs", encoder_kwargs, DEEPMIND_ENCODER_DEFAULTS)
    shape_for = enc["cross_attention_shape_for_attn"]
    if shape_for not in ("kv", "q"):
        raise ValueError("encoder_kwargs['cross_attention_shape_for_attn']: expected 'kv' or 'q', "
                         f"got {shape_for!r}")
    qk = enc["qk_channels"]
    if qk is None and shape_for == "q":
        qk = enc["num_z_channels"]
    opts: dict[str, Any] = {
        **deepmind(),
        "latent_dim": enc["num_z_channels"], "num_latents": enc["z_index_dim"],
        "num_layers": enc["num_self_attends_per_block"], "num_blocks": enc["num_blocks"],
        "qk_channels": qk, "v_channels": enc["v_channels"],
        "cross_heads": enc["num_cross_attend_heads"], "num_heads": enc["num_self_attend_heads"],
        "cross_widening_factor": enc["cross_attend_widening_factor"],
        "self_widening_factor": enc["self_attend_widening_factor"],
        "dropout": enc["dropout_prob"], "use_query_residual": enc["use_query_residual"],
    }
    if decoder_kwargs is not None:
        opts.update(_deepmind_decoder(_kwargs("decoder_kwargs", decoder_kwargs, DEEPMIND_DECODER_DEFAULTS),
                                      enc["num_z_channels"]))
    return {**opts, **overrides}


def _deepmind_decoder(dec: dict[str, Any], latent_dim: int) -> dict[str, Any]:
    """Our decoder options from DeepMind's BasicDecoder / ClassificationDecoder arguments."""
    refused = {
        "concat_preprocessed_input": (False, "our queries are not concatenated with the input"),
        "final_project": (True, "our decoders end with their output Linear"),
        "subsampled_index_dims": (None, "decode the whole output (subsampling is a call option "
                                  "of the published multimodal model only)"),
    }
    for key, (want, why) in refused.items():
        if dec[key] != want:
            raise ValueError(f"decoder_kwargs[{key!r}]: {dec[key]!r} is not supported ({why})")
    if dec["num_z_channels"] != latent_dim:
        raise ValueError(f"decoder_kwargs['num_z_channels']: {dec['num_z_channels']} but the encoder's "
                         f"num_z_channels is {latent_dim}: the decoder reads the encoder's latents")
    opts: dict[str, Any] = {
        "decoder_heads": dec["num_heads"], "decoder_qk_channels": dec["qk_channels"],
        "decoder_v_channels": dec["v_channels"], "decoder_widening_factor": 1,
        "decoder_query_residual": dec["use_query_residual"],
    }
    kind = dec["position_encoding_type"]
    if dec["num_classes"] is not None:
        if dec["output_num_channels"] is not None or dec["output_index_dims"] is not None:
            raise ValueError("decoder_kwargs: a ClassificationDecoder takes num_classes, not "
                             "output_num_channels or output_index_dims")
        opts.update(decoder="classification", output_dim=dec["num_classes"])
        dims: tuple[int, ...] = (1,)
    else:
        if dec["output_num_channels"] is None or dec["output_index_dims"] is None:
            raise ValueError("decoder_kwargs: a BasicDecoder needs output_num_channels and "
                             "output_index_dims (or give num_classes for a ClassificationDecoder)")
        raw = dec["output_index_dims"]
        dims = (int(raw),) if isinstance(raw, int) else tuple(int(d) for d in raw)
        opts.update(decoder="query", output_dim=dec["output_num_channels"])
    if kind == "trainable":
        pos = dict(dec["trainable_position_encoding_kwargs"] or {})
        unknown = sorted(set(pos) - {"num_channels", "init_scale"})
        if unknown:
            raise ValueError(f"decoder_kwargs['trainable_position_encoding_kwargs']: unknown {unknown}")
        opts["query_dim"] = pos.get("num_channels", 128)  # DeepMind's TrainablePositionEncoding default
        if opts["decoder"] == "query":
            opts.update(query_source="trainable", num_outputs=math.prod(dims))
    elif kind == "fourier" and opts["decoder"] == "query":
        pos = dict(dec["fourier_position_encoding_kwargs"] or {})
        expected = {"concat_pos": True, "sine_only": False, "max_resolution": None}
        for key, value in pos.items():
            if key == "num_bands" or (key in expected and value in (expected[key], list(dims), dims)):
                continue
            raise ValueError(f"decoder_kwargs['fourier_position_encoding_kwargs'][{key!r}]: {value!r} is not "
                             "supported (our Fourier queries: concat_pos, both phases, the output grid "
                             "as the resolution)")
        if "num_bands" not in pos:
            raise ValueError("decoder_kwargs['fourier_position_encoding_kwargs']: num_bands is required")
        opts.update(query_source="fourier", output_index_dims=dims, query_num_bands=pos["num_bands"])
    else:
        raise ValueError(f"decoder_kwargs['position_encoding_type']: {kind!r} is not supported for this "
                         "decoder (trainable queries, or Fourier queries of a BasicDecoder)")
    return opts


#: lucidrains' ``perceiver_pytorch.Perceiver`` keyword arguments and their defaults
#: (perceiver-pytorch 0.11.0; ``num_freq_bands``, ``depth`` and ``max_freq`` have none).
LUCIDRAINS_DEFAULTS: dict[str, Any] = {
    "num_freq_bands": None, "depth": None, "max_freq": None, "input_channels": 3, "input_axis": 2,
    "num_latents": 512, "latent_dim": 512, "cross_heads": 1, "latent_heads": 8, "cross_dim_head": 64,
    "latent_dim_head": 64, "num_classes": 1000, "attn_dropout": 0.0, "ff_dropout": 0.0,
    "weight_tie_layers": False, "fourier_encode_data": True, "self_per_cross_attn": 1,
    "final_classifier_head": True, "inverted_cross_attn": False, "attn_residual": False,
    "attn_residual_rank": 64,
}
#: lucidrains' ``perceiver_pytorch.PerceiverIO`` keyword arguments and their defaults
#: (``depth``, ``dim`` and ``queries_dim`` have none).
LUCIDRAINS_IO_DEFAULTS: dict[str, Any] = {
    "depth": None, "dim": None, "queries_dim": None, "logits_dim": None, "num_latents": 512,
    "latent_dim": 512, "cross_heads": 1, "latent_heads": 8, "cross_dim_head": 64, "latent_dim_head": 64,
    "weight_tie_layers": False, "decoder_ff": False, "seq_dropout_prob": 0.0, "attn_residual": False,
    "attn_residual_rank": 64, "inverted_cross_attn": False,
}
#: perceiver-pytorch's FeedForward widening (``mult=4``, not an argument of its models).
LUCIDRAINS_FF_MULT = 4


def _lucidrains_kwargs(what: str, given: Mapping[str, Any], defaults: Mapping[str, Any],
                       required: tuple[str, ...]) -> dict[str, Any]:
    kw = _kwargs(what, given, defaults)
    missing = sorted(k for k in required if kw[k] is None)
    if missing:
        raise ValueError(f"{what}: missing required argument(s) {missing}")
    for key, why in (("inverted_cross_attn", "inverted (slot-style) cross-attention"),
                     ("attn_residual", "the Enformer attention residual over block outputs")):
        value = kw[key]
        if value is not False and not (isinstance(value, tuple) and not any(value)):
            raise ValueError(f"{what}[{key!r}]: {value!r} is not supported (perceiver_np has no {why}; "
                             "it is not part of the published Perceiver)")
    return kw


def _lucidrains_common(kw: Mapping[str, Any]) -> dict[str, Any]:
    """The options every perceiver-pytorch model shares: GEGLU x4 feed-forwards with exact GELU,
    bias-free q and kv projections of ``heads * dim_head`` channels, pre-LayerNorm blocks with
    residuals, masked logits filled with ``-finfo.max`` (a row with no visible key attends
    uniformly), no input projection, no final LayerNorm. Dropout rates are not carried over:
    they act only in training, where no two libraries draw the same masks."""
    return {
        "latent_dim": kw["latent_dim"], "num_latents": kw["num_latents"],
        "input_projection": False, "cross_heads": kw["cross_heads"], "num_heads": kw["latent_heads"],
        "cross_qk_channels": kw["cross_heads"] * kw["cross_dim_head"],
        "cross_v_channels": kw["cross_heads"] * kw["cross_dim_head"],
        "self_qk_channels": kw["latent_heads"] * kw["latent_dim_head"],
        "self_v_channels": kw["latent_heads"] * kw["latent_dim_head"],
        "cross_widening_factor": LUCIDRAINS_FF_MULT, "self_widening_factor": LUCIDRAINS_FF_MULT,
        "ffn_kind": "geglu", "gelu": "exact", "qkv_bias": False, "use_query_residual": True,
        "final_norm": False, "masked_rows": "uniform", "dropout": 0.0, "attention_dropout": 0.0,
        "num_blocks": 1,
    }


def from_lucidrains(
    kwargs: Mapping[str, Any], index_dims: tuple[int, ...] | None = None, **overrides: Any
) -> dict[str, Any]:
    """Options of the model ``perceiver_pytorch.Perceiver(**kwargs)`` computes::

        opts = presets.from_lucidrains(dict(num_freq_bands=6, depth=2, max_freq=10.0,
                                            input_channels=3, num_classes=10), index_dims=(8, 8))

    ``index_dims``: the input grid (the data's axes, ``data.shape[1:-1]``), needed with
    ``fourier_encode_data`` (the default): the model then appends lucidrains' Fourier features
    (``input_fourier="lucidrains"``) to x [B, N, C], the data flattened to N = prod(index_dims)
    positions. ``depth`` blocks of one cross block and ``self_per_cross_attn`` self blocks;
    ``weight_tie_layers``: every block after the first shares the second's weights
    (``block_order``). The classifier head ``mean -> LayerNorm -> Linear`` is
    ``decoder="pool_linear"``; without it (``final_classifier_head=False``) the latents.
    Every argument is checked by name; inverted cross-attention and the attention residual are
    refused (not part of the published Perceiver)."""
    kw = _lucidrains_kwargs("kwargs", kwargs, LUCIDRAINS_DEFAULTS, ("num_freq_bands", "depth", "max_freq"))
    depth, spc = kw["depth"], kw["self_per_cross_attn"]
    if spc < 1:
        raise ValueError(f"kwargs['self_per_cross_attn']: {spc} is not supported (every cross block "
                         "of perceiver_np is followed by a self block)")
    opts = _lucidrains_common(kw)
    opts["input_dim"] = kw["input_channels"]
    if kw["fourier_encode_data"]:
        if index_dims is None or len(tuple(index_dims)) != kw["input_axis"]:
            raise ValueError(f"index_dims: fourier_encode_data needs the input grid, {kw['input_axis']} "
                             f"axes (input_axis), got {index_dims!r}")
        opts.update(input_fourier="lucidrains", input_index_dims=tuple(int(d) for d in index_dims),
                    input_num_bands=kw["num_freq_bands"], input_max_freq=float(kw["max_freq"]))
    tied = kw["weight_tie_layers"] and depth > 2  # with depth 2 the second block is its own anyway
    crosses = 2 if tied else depth
    opts.update(num_cross_layers=crosses, num_layers=crosses * spc)
    if tied:
        opts["block_order"] = tuple(step for i in range(depth) for step in (
            ("cross", min(i, 1)), *(("self", min(i, 1) * spc + s) for s in range(spc))))
    if kw["final_classifier_head"]:
        opts.update(decoder="pool_linear", output_dim=kw["num_classes"])
    else:
        opts["decoder"] = "latents"
    return {**opts, **overrides}


def from_lucidrains_io(kwargs: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Options of the model ``perceiver_pytorch.PerceiverIO(**kwargs)`` computes with its
    ``queries`` given (``query_source="given"``, [B, O, queries_dim]: a 2-D ``queries`` of theirs
    broadcast over the batch)::

        opts = presets.from_lucidrains_io(dict(depth=2, dim=32, queries_dim=16, logits_dim=10))

    One cross block (no self block of its own), then ``depth`` self blocks (``weight_tie_layers``:
    one, run ``depth`` times), then the decoder: a cross block from the queries to the latents
    with no query residual, its GEGLU feed-forward only with ``decoder_ff``, and the output
    Linear only with ``logits_dim``. Every argument is checked by name."""
    kw = _lucidrains_kwargs("kwargs", kwargs, LUCIDRAINS_IO_DEFAULTS, ("depth", "dim", "queries_dim"))
    opts = _lucidrains_common(kw)
    depth = kw["depth"]
    tied = kw["weight_tie_layers"] and depth > 1
    cross_width = kw["cross_heads"] * kw["cross_dim_head"]
    opts.update(
        input_dim=kw["dim"], num_cross_layers=1, num_layers=1 if tied else depth,
        num_blocks=depth if tied else 1,
        decoder="query", query_source="given", query_dim=kw["queries_dim"],
        decoder_heads=kw["cross_heads"], decoder_qk_channels=cross_width, decoder_v_channels=cross_width,
        decoder_query_residual=False, decoder_ffn=bool(kw["decoder_ff"]),
        decoder_widening_factor=LUCIDRAINS_FF_MULT, decoder_output=kw["logits_dim"] is not None,
        output_dim=kw["logits_dim"],
    )
    return {**opts, **overrides}
