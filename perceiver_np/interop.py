"""Weights in and out: Hugging Face ``transformers``, DeepMind's Haiku trees, plain ``.npz`` /
``.safetensors`` files (docs/verify.md, "Importing weights").

::

    model = from_hf(hf_model)                              # a transformers.PerceiverModel
    model = from_hf_state_dict(arrays, config.json dict, decoder_config=...)   # no torch needed
    state = to_hf_state_dict(model)                        # HF key names, Linear weights [out, in]
    hf_config, decoder_config = to_hf_config(model)        # what to build the HF model with
    model = from_haiku(tree, config)                       # DeepMind's Haiku parameter tree
    tree = to_haiku(model)
    save_params("w.npz", model); model = load_params("w.npz", config)   # keyed by our schema

The imported model computes what the HF model computes: ``model(x, mask=m.astype(bool))`` equals
``hf_model(inputs=x, attention_mask=m).logits`` (``.last_hidden_state`` without a decoder, as
``decoder="latents"``), gradients included. The maps are total and strict: every tensor of the
source must land on exactly one parameter and vice versa, with the shape the configuration
implies; anything else is an :class:`InteropError` naming the tensors and both shapes.

Importing this module does not import torch or transformers; :func:`from_hf` and
:data:`LinearPreprocessor` import them when used.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_write
from .config import PerceiverConfig, make_config, param_shapes
from .model import Perceiver, check_params

__all__ = [
    "HF_CONFIG_DEFAULTS",
    "HF_DECODER_DEFAULTS",
    "InteropError",
    "LinearPreprocessor",  # noqa: F822 - built on first access by the module __getattr__
    "from_haiku",
    "from_hf",
    "from_hf_state_dict",
    "haiku_name_map",
    "hf_name_map",
    "load_params",
    "save_params",
    "to_haiku",
    "to_hf_config",
    "to_hf_state_dict",
]

PathLike = str | os.PathLike[str]


class InteropError(ValueError):
    """Every problem with imported or exported weights, their configuration or their file."""


# ---------------------------------------------------------------------------------------------
# Name maps: ours <-> Hugging Face <-> Haiku
# ---------------------------------------------------------------------------------------------

#: Block-local names of a cross block -> HF sub-keys under the layer (``PerceiverLayer``).
_HF_CROSS = {
    "q_norm.gamma": "attention.self.layernorm1.weight",
    "q_norm.beta": "attention.self.layernorm1.bias",
    "kv_norm.gamma": "attention.self.layernorm2.weight",
    "kv_norm.beta": "attention.self.layernorm2.bias",
    "attn.q.weight": "attention.self.query.weight",
    "attn.q.bias": "attention.self.query.bias",
    "attn.k.weight": "attention.self.key.weight",
    "attn.k.bias": "attention.self.key.bias",
    "attn.v.weight": "attention.self.value.weight",
    "attn.v.bias": "attention.self.value.bias",
    "attn.out.weight": "attention.output.dense.weight",
    "attn.out.bias": "attention.output.dense.bias",
    "ffn_norm.gamma": "layernorm.weight",
    "ffn_norm.beta": "layernorm.bias",
    "ffn.up.weight": "mlp.dense1.weight",
    "ffn.up.bias": "mlp.dense1.bias",
    "ffn.down.weight": "mlp.dense2.weight",
    "ffn.down.bias": "mlp.dense2.bias",
}
#: A self block: the same, with ``norm`` for the query LayerNorm and no kv LayerNorm.
_HF_SELF = {
    ("norm." + k.split(".", 1)[1] if k.startswith("q_norm.") else k): v
    for k, v in _HF_CROSS.items() if not k.startswith("kv_norm.")
}

#: Block-local names -> (Haiku module path under the block, parameter name). DeepMind's
#: ``CrossAttention`` holds ``layer_norm`` (query), ``layer_norm_1`` (kv), ``attention``
#: (``MultiHeadAttention``: ``linear`` q, ``linear_1`` k, ``linear_2`` v, ``linear_3`` output),
#: ``layer_norm_2`` (before the MLP) and ``mlp`` (``linear``, ``linear_1``); its
#: ``SelfAttention`` holds ``layer_norm``, ``attention``, ``layer_norm_1`` and ``mlp``
#: (HF's convert_perceiver_haiku_to_pytorch.py, ``rename_keys``).
_HAIKU_CROSS = {
    "q_norm.gamma": ("layer_norm", "scale"),
    "q_norm.beta": ("layer_norm", "offset"),
    "kv_norm.gamma": ("layer_norm_1", "scale"),
    "kv_norm.beta": ("layer_norm_1", "offset"),
    "attn.q.weight": ("attention/linear", "w"),
    "attn.q.bias": ("attention/linear", "b"),
    "attn.k.weight": ("attention/linear_1", "w"),
    "attn.k.bias": ("attention/linear_1", "b"),
    "attn.v.weight": ("attention/linear_2", "w"),
    "attn.v.bias": ("attention/linear_2", "b"),
    "attn.out.weight": ("attention/linear_3", "w"),
    "attn.out.bias": ("attention/linear_3", "b"),
    "ffn_norm.gamma": ("layer_norm_2", "scale"),
    "ffn_norm.beta": ("layer_norm_2", "offset"),
    "ffn.up.weight": ("mlp/linear", "w"),
    "ffn.up.bias": ("mlp/linear", "b"),
    "ffn.down.weight": ("mlp/linear_1", "w"),
    "ffn.down.bias": ("mlp/linear_1", "b"),
}
_HAIKU_SELF = {
    "norm.gamma": ("layer_norm", "scale"),
    "norm.beta": ("layer_norm", "offset"),
    **{k: v for k, v in _HAIKU_CROSS.items() if k.startswith(("attn.", "ffn."))},
    "ffn_norm.gamma": ("layer_norm_1", "scale"),
    "ffn_norm.beta": ("layer_norm_1", "offset"),
}
_HAIKU_ENCODER = "perceiver_encoder/~/"


def _hf_decoder_prefix(cfg: PerceiverConfig) -> str:
    return "decoder.decoder." if cfg.decoder == "classification" else "decoder."


def _haiku_decoder_prefix(cfg: PerceiverConfig) -> str:
    return "classification_decoder/~/basic_decoder" if cfg.decoder == "classification" else "basic_decoder"


def _structure_problems(cfg: PerceiverConfig, target: str = "Hugging Face") -> list[str]:
    """What in ``cfg`` has no place in an HF ``PerceiverModel`` (or DeepMind's Haiku tree)."""
    problems = []
    if cfg.num_cross_layers != 1:
        problems.append(f"num_cross_layers={cfg.num_cross_layers}: {target}'s encoder has exactly one "
                        "cross-attention")
    if cfg.final_norm:
        problems.append(f"final_norm=True: {target}'s encoder has no final LayerNorm (final_norm.gamma/beta "
                        "would have no name); build with final_norm=False")
    defaults = PerceiverConfig(input_dim=1)
    for field, why in (
        ("ffn_kind", "its MLPs are GELU, not GEGLU"), ("qkv_bias", "its q/k/v projections have biases"),
        ("block_order", "its blocks run in the fixed order of num_blocks"),
        ("input_fourier", "its encoder appends no input positions (its preprocessors do)"),
        ("cross_qk_channels", "one qk_channels for both attentions"),
        ("cross_v_channels", "one v_channels for both attentions"),
        ("self_qk_channels", "one qk_channels for both attentions"),
        ("self_v_channels", "one v_channels for both attentions"),
        ("decoder_ffn", "its decoders have an MLP"), ("decoder_output", "its decoders project their output"),
    ):
        if getattr(cfg, field) != getattr(defaults, field):
            problems.append(f"{field}={getattr(cfg, field)!r}: {target} has {why}")
    if cfg.decoder == "pool_linear":
        problems.append(f"decoder='pool_linear': {target} has no mean-pool classifier head")
    if target == "Hugging Face" and cfg.decoder == "query" and cfg.query_source != "trainable":
        problems.append(f"query_source={cfg.query_source!r}: only trainable output queries map to a "
                        "decoder with trainable position encodings")
    return problems


def _require_structure(cfg: PerceiverConfig, target: str) -> None:
    problems = _structure_problems(cfg, target)
    if problems:
        raise InteropError(f"this configuration has no {target} equivalent: " + "; ".join(problems))


def hf_name_map(config: PerceiverConfig) -> dict[str, str]:
    """Our parameter name -> the HF ``PerceiverModel.state_dict()`` key, in schema order.

    Our ``*.weight`` entries are Linear weights, stored ``[in, out]`` here and ``[out, in]`` by
    HF (transposed on the way); everything else (LayerNorms, latents, queries, biases) keeps its
    layout. The input projection is a :data:`LinearPreprocessor`'s ``input_preprocessor.linear``.
    """
    _require_structure(config, "Hugging Face")
    names: dict[str, str] = {}
    for name in param_shapes(config):
        head, _, rest = name.partition(".")
        if name == "latents":
            names[name] = "embeddings.latents"
        elif head == "input_proj":
            names[name] = f"input_preprocessor.linear.{rest}"
        elif head == "cross":
            names[name] = "encoder.cross_attention." + _HF_CROSS[rest.partition(".")[2]]
        elif head == "self":
            j, _, local = rest.partition(".")
            names[name] = f"encoder.self_attends.{j}." + _HF_SELF[local]
        elif head == "decoder":
            prefix = _hf_decoder_prefix(config)
            if rest == "queries":
                names[name] = prefix + "output_position_encodings.position_embeddings"
            elif rest.startswith("output."):
                names[name] = prefix + "final_layer." + rest.partition(".")[2]
            else:
                names[name] = prefix + "decoding_cross_attention." + _HF_CROSS[rest]
        else:  # pragma: no cover - _require_structure refused everything else
            raise InteropError(f"{name}: no Hugging Face name")
    return names


def haiku_name_map(config: PerceiverConfig) -> dict[str, tuple[str, str]]:
    """Our parameter name -> (Haiku module path, parameter name), in schema order.

    DeepMind's names, as HF's ``convert_perceiver_haiku_to_pytorch.py`` reads them:
    ``perceiver_encoder/~/trainable_position_encoding`` (``pos_embs``, the latents),
    ``perceiver_encoder/~/cross_attention/...``, ``perceiver_encoder/~/self_attention``,
    ``.../self_attention_1``, ... for the self blocks, and the decoders
    ``classification_decoder/~/basic_decoder/...`` or ``basic_decoder/...`` with
    ``~/trainable_position_encoding`` (``pos_embs``, the queries), ``cross_attention/...`` and
    ``output``. Two names are ours, as DeepMind has no such module: ``input_projection``
    (``w``, ``b``) for the input projection, and the bare decoder's ``basic_decoder/output``
    (the script converts only the classification decoder's ``output``; this is the same
    module one level up). Haiku Linear ``w`` is ``[in, out]`` like ours: nothing is transposed.
    """
    _require_structure(config, "Haiku")
    names: dict[str, tuple[str, str]] = {}
    for name in param_shapes(config):
        head, _, rest = name.partition(".")
        if name == "latents":
            names[name] = (_HAIKU_ENCODER + "trainable_position_encoding", "pos_embs")
        elif head == "input_proj":
            names[name] = ("input_projection", "w" if rest == "weight" else "b")
        elif head == "cross":
            module, param = _HAIKU_CROSS[rest.partition(".")[2]]
            names[name] = (_HAIKU_ENCODER + "cross_attention/" + module, param)
        elif head == "self":
            j, _, local = rest.partition(".")
            block = "self_attention" if j == "0" else f"self_attention_{j}"
            module, param = _HAIKU_SELF[local]
            names[name] = (f"{_HAIKU_ENCODER}{block}/{module}", param)
        elif head == "decoder":
            prefix = _haiku_decoder_prefix(config)
            if rest == "queries":
                names[name] = (prefix + "/~/trainable_position_encoding", "pos_embs")
            elif rest.startswith("output."):
                names[name] = (prefix + "/output", "w" if rest == "output.weight" else "b")
            else:
                module, param = _HAIKU_CROSS[rest]
                names[name] = (f"{prefix}/cross_attention/{module}", param)
        else:  # pragma: no cover
            raise InteropError(f"{name}: no Haiku name")
    return names


def _is_linear_weight(name: str) -> bool:
    return name.endswith(".weight")


# ---------------------------------------------------------------------------------------------
# Arrays: checked conversion into the model's dtype
# ---------------------------------------------------------------------------------------------


def _as_param(where: str, value: Any, shape: tuple[int, ...], dtype: np.dtype,
              transpose: bool = False, ours: str | None = None, owned: bool = False) -> np.ndarray:
    """``value`` as a contiguous array of ``dtype`` (transposed first when ``transpose``), or an
    InteropError naming ``where`` (and our name) and both shapes. A copy, unless ``owned`` (the
    caller hands over an array nothing else refers to) and it already is that array."""
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise InteropError(f"{where}: expected floating-point numbers, got dtype {arr.dtype.name}")
    want = tuple(reversed(shape)) if transpose else tuple(shape)
    if arr.shape != want:
        also = f" (our {ours})" if ours else ""
        hint = ""
        if arr.ndim == 2 and arr.shape == want[::-1]:
            hint = (" - transposed? HF Linear weights are [out, in]" if transpose
                    else " - transposed? this layout is [in, out]")
        raise InteropError(f"{where}{also}: expected shape {want}, got {arr.shape}{hint}")
    if not np.isfinite(arr).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise InteropError(f"{where}: contains NaN or infinity (first at index {bad})")
    if owned and not transpose and arr.dtype == dtype and arr.flags.c_contiguous and arr.flags.writeable:
        return arr
    return np.array(arr.T if transpose else arr, dtype=dtype, order="C", copy=True)  # never a view


def _check_keys(what: str, expected: list[str], given: Mapping[str, Any], shapes: Mapping[str, Any]) -> None:
    missing = [k for k in expected if k not in given]
    wanted = set(expected)
    extra = [k for k in given if k not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"{k} {tuple(shapes[k])}" for k in missing))
        if extra:
            parts.append("unexpected " + ", ".join(
                f"{k} {tuple(np.shape(given[k]))}" for k in extra))
        raise InteropError(f"{what}: " + "; ".join(parts))


def _as_config(config: PerceiverConfig | Mapping[str, Any]) -> PerceiverConfig:
    if isinstance(config, PerceiverConfig):
        return config
    if isinstance(config, Mapping):
        return make_config(**dict(config))
    raise InteropError(
        f"config: expected a PerceiverConfig or a dict of options, got {type(config).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face: configuration
# ---------------------------------------------------------------------------------------------

#: ``transformers.PerceiverConfig``'s defaults of the fields that shape a ``PerceiverModel``
#: (used for a field the config dict leaves out, as ``PerceiverConfig(**d)`` would).
HF_CONFIG_DEFAULTS: dict[str, Any] = {
    "num_latents": 256, "d_latents": 1280, "d_model": 768, "num_blocks": 1,
    "num_self_attends_per_block": 26, "num_self_attention_heads": 8,
    "num_cross_attention_heads": 8, "qk_channels": None, "v_channels": None,
    "cross_attention_shape_for_attention": "kv", "self_attention_widening_factor": 1,
    "cross_attention_widening_factor": 1, "hidden_act": "gelu",
    "attention_probs_dropout_prob": 0.1, "use_query_residual": True,
}

#: The keys ``decoder_config`` may hold: HF's ``PerceiverBasicDecoder`` keyword arguments
#: (``PerceiverClassificationDecoder`` passes them on) with their defaults, plus ``type``.
#: ``None`` marks a key without a usable default: ``type`` always, ``output_num_channels`` and
#: ``trainable_position_encoding_kwargs`` for ``type="basic"``.
HF_DECODER_DEFAULTS: dict[str, Any] = {
    "type": None,
    "output_num_channels": None,
    "trainable_position_encoding_kwargs": None,
    "num_channels": 128,
    "qk_channels": None,
    "v_channels": None,
    "num_heads": 1,
    "widening_factor": 1,
    "use_query_residual": False,
    "position_encoding_type": "trainable",
    "project_pos_dim": -1,
    "final_project": True,
    "concat_preprocessed_input": False,
    "position_encoding_only": False,
    "output_index_dims": None,
    "subsampled_index_dims": None,
}


def _int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InteropError(f"{where}: expected a positive integer, got {value!r}")
    return int(value)


def _hf_options(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Our encoder options from an HF config dict (``PerceiverConfig.to_dict()`` / config.json)."""
    if not isinstance(config_dict, Mapping):
        raise InteropError(f"config_dict: expected a mapping, got {type(config_dict).__name__}")
    c = {k: config_dict.get(k, v) for k, v in HF_CONFIG_DEFAULTS.items()}
    act = c["hidden_act"]
    if act != "gelu":
        raise InteropError(
            f"hidden_act: {act!r} is not supported; only 'gelu' (HF's exact erf GELU, our "
            "gelu='exact') maps onto perceiver_np"
        )
    shape_for = c["cross_attention_shape_for_attention"]
    if shape_for not in ("kv", "q"):
        raise InteropError(f"cross_attention_shape_for_attention: expected 'kv' or 'q', got {shape_for!r}")
    d = _int("d_latents", c["d_latents"])
    qk = c["qk_channels"]
    if qk is None and shape_for == "q":
        qk = d  # the cross-attention's qk width from its queries: ours says so explicitly
    rate = c["attention_probs_dropout_prob"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise InteropError(f"attention_probs_dropout_prob: expected a rate in [0, 1), got {rate!r}")
    if not isinstance(c["use_query_residual"], bool):
        raise InteropError(f"use_query_residual: expected True or False, got {c['use_query_residual']!r}")
    return dict(
        latent_dim=d,
        num_latents=_int("num_latents", c["num_latents"]),
        num_layers=_int("num_self_attends_per_block", c["num_self_attends_per_block"]),
        num_cross_layers=1,
        num_blocks=_int("num_blocks", c["num_blocks"]),
        num_heads=_int("num_self_attention_heads", c["num_self_attention_heads"]),
        cross_heads=_int("num_cross_attention_heads", c["num_cross_attention_heads"]),
        qk_channels=None if qk is None else _int("qk_channels", qk),
        v_channels=None if c["v_channels"] is None else _int("v_channels", c["v_channels"]),
        cross_widening_factor=_int("cross_attention_widening_factor", c["cross_attention_widening_factor"]),
        self_widening_factor=_int("self_attention_widening_factor", c["self_attention_widening_factor"]),
        use_query_residual=c["use_query_residual"],
        gelu="exact", dropout=0.0, attention_dropout=float(rate), masked_rows="uniform",
        final_norm=False,
    )


def _hf_num_labels(config_dict: Mapping[str, Any]) -> int:
    if config_dict.get("num_labels") is not None:
        return _int("num_labels", config_dict["num_labels"])
    if config_dict.get("id2label") is not None:
        return _int("len(id2label)", len(config_dict["id2label"]))
    return 2  # transformers' PretrainedConfig default


def _decoder_options(decoder_config: Mapping[str, Any], config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Our decoder options from ``decoder_config`` (see :data:`HF_DECODER_DEFAULTS`)."""
    if not isinstance(decoder_config, Mapping):
        raise InteropError(f"decoder_config: expected a mapping or None, got {type(decoder_config).__name__}")
    unknown = sorted(set(decoder_config) - set(HF_DECODER_DEFAULTS))
    if unknown:
        raise InteropError(
            f"decoder_config: unknown key(s) {unknown}; the keys are {sorted(HF_DECODER_DEFAULTS)}"
        )
    c = {**HF_DECODER_DEFAULTS, **decoder_config}
    kind = c["type"]
    if kind not in ("classification", "basic"):
        raise InteropError(f"decoder_config['type']: expected 'classification' or 'basic', got {kind!r}")
    refused = {
        "position_encoding_type": ("trainable", "only trainable output queries map (Fourier queries "
                                   "from HF's decoder_query depend on the input's trailing shape)"),
        "final_project": (True, "our decoders end with the output Linear"),
        "concat_preprocessed_input": (False, "our queries are not concatenated with the input"),
        "position_encoding_only": (False, "a decoder without its cross-attention decodes nothing"),
    }
    for key, (want, why) in refused.items():
        if c[key] != want:
            raise InteropError(f"decoder_config[{key!r}]: {c[key]!r} is not supported ({why})")
    if c["project_pos_dim"] is not None and c["project_pos_dim"] > 0:
        raise InteropError(f"decoder_config['project_pos_dim']: {c['project_pos_dim']!r} is not supported "
                           "(a Linear projection of the queries has no place in our decoder)")
    cq = _int("decoder_config['num_channels']", c["num_channels"])
    pos = c["trainable_position_encoding_kwargs"]
    if kind == "classification" and pos is None:
        pos = {"num_channels": cq, "index_dims": 1}
    if not isinstance(pos, Mapping) or "index_dims" not in pos:
        raise InteropError("decoder_config['trainable_position_encoding_kwargs']: expected a dict with "
                           f"'index_dims' (and 'num_channels', default 128), got {pos!r}")
    pos_channels = pos.get("num_channels", 128)
    if pos_channels != cq:
        raise InteropError(f"decoder_config: the trainable queries have {pos_channels!r} channels but "
                           f"num_channels is {cq} (HF's decoder would fail on these shapes)")
    dims = pos["index_dims"]
    dims_t = (dims,) if isinstance(dims, (int, np.integer)) else tuple(dims)
    num_outputs = _int("decoder_config['trainable_position_encoding_kwargs']['index_dims']",
                       math.prod(int(_int("index_dims", d)) for d in dims_t))
    if not isinstance(c["use_query_residual"], bool):
        raise InteropError("decoder_config['use_query_residual']: expected True or False, "
                           f"got {c['use_query_residual']!r}")
    opts: dict[str, Any] = dict(
        query_dim=cq,
        decoder_heads=_int("decoder_config['num_heads']", c["num_heads"]),
        decoder_widening_factor=_int("decoder_config['widening_factor']", c["widening_factor"]),
        decoder_query_residual=c["use_query_residual"],
    )
    # the widths resolved as HF resolves them, and stated explicitly, so that the config is the
    # same whichever way the decoder was described
    shape_for = config_dict.get("cross_attention_shape_for_attention", "kv")
    qk = c["qk_channels"]
    if qk is None:
        qk = cq if shape_for == "q" else config_dict.get("d_latents", HF_CONFIG_DEFAULTS["d_latents"])
    opts["decoder_qk_channels"] = _int("decoder_config['qk_channels']", qk)
    v = c["v_channels"]
    opts["decoder_v_channels"] = (
        opts["decoder_qk_channels"] if v is None else _int("decoder_config['v_channels']", v)
    )
    if kind == "classification":
        if num_outputs != 1:
            raise InteropError(f"decoder_config: a classification decoder has 1 query, got {num_outputs}")
        opts.update(decoder="classification", output_dim=_hf_num_labels(config_dict))
        if c["output_num_channels"] is not None and c["output_num_channels"] != opts["output_dim"]:
            raise InteropError(f"decoder_config['output_num_channels']: {c['output_num_channels']!r}, but "
                               f"a classification decoder outputs num_labels = {opts['output_dim']}")
    else:
        if c["output_num_channels"] is None:
            raise InteropError("decoder_config['output_num_channels']: required for type 'basic'")
        opts.update(decoder="query", query_source="trainable", num_outputs=num_outputs,
                    output_dim=_int("decoder_config['output_num_channels']", c["output_num_channels"]))
    return opts


# ---------------------------------------------------------------------------------------------
# Hugging Face: state dicts
# ---------------------------------------------------------------------------------------------


def from_hf_state_dict(
    state_dict: Mapping[str, Any],
    config_dict: Mapping[str, Any],
    *,
    decoder_config: Mapping[str, Any] | None = None,
    dtype: str = "float64",
) -> Perceiver:
    """A perceiver_np model from an HF ``PerceiverModel``'s state dict, without torch.

    ``state_dict``: HF key -> array (e.g. ``safetensors.numpy.load_file``), Linear weights
    ``[out, in]``, exactly the keys of a ``PerceiverModel`` whose input preprocessor is None or a
    :data:`LinearPreprocessor` (``input_preprocessor.linear.weight/bias``: their presence turns
    ``input_projection`` on; its output width must be ``d_latents``).
    ``config_dict``: the model's config (``PerceiverConfig.to_dict()``, or its config.json);
    fields left out take ``transformers.PerceiverConfig``'s defaults (:data:`HF_CONFIG_DEFAULTS`);
    ``num_labels`` (or ``len(id2label)``) is the classification decoder's output width.

    ``decoder_config``: None for a model without a decoder (our ``decoder="latents"``: the
    output is HF's ``last_hidden_state``). Otherwise a dict of the keyword arguments the HF
    decoder was constructed with, plus ``"type"``:

    - ``"type"``: ``"classification"`` (``PerceiverClassificationDecoder``) or ``"basic"``
      (``PerceiverBasicDecoder`` as the model's decoder);
    - ``"num_channels"``: the query width (HF default 128);
    - ``"trainable_position_encoding_kwargs"``: ``{"index_dims": O, "num_channels": Cq}``, the
      trainable queries (required for ``"basic"``; classification: ``index_dims`` 1);
    - ``"output_num_channels"``: the output width (required for ``"basic"``; classification
      uses ``num_labels``);
    - ``"num_heads"`` (1), ``"qk_channels"`` / ``"v_channels"`` (None: the ``d_latents`` width
      with ``cross_attention_shape_for_attention="kv"``, ``num_channels`` with ``"q"``),
      ``"widening_factor"`` (1), ``"use_query_residual"`` (False), as HF's defaults;
    - accepted only at their defaults: ``position_encoding_type="trainable"``,
      ``project_pos_dim=-1``, ``final_project=True``, ``concat_preprocessed_input=False``,
      ``position_encoding_only=False``; ``output_index_dims`` / ``subsampled_index_dims`` are
      accepted and ignored (they matter only for subsampled or Fourier queries).

    The model has ``masked_rows="uniform"`` (HF's fully masked rows), ``gelu="exact"``,
    ``dropout=0``, ``attention_dropout`` = ``attention_probs_dropout_prob``, ``final_norm=False``.
    """
    if not isinstance(state_dict, Mapping):
        raise InteropError(
            f"state_dict: expected a mapping of name -> array, got {type(state_dict).__name__}"
        )
    opts = _hf_options(config_dict)
    pre = [k for k in state_dict if k.startswith("input_preprocessor.")]
    if pre:
        w = state_dict.get("input_preprocessor.linear.weight")
        if w is None or np.ndim(w) != 2:
            raise InteropError(
                f"input_preprocessor: only a LinearPreprocessor (input_preprocessor.linear.weight "
                f"[D, C] and .bias [D]) maps onto our input projection; got keys {sorted(pre)}"
            )
        out_features, in_features = np.shape(w)
        if out_features != opts["latent_dim"]:
            raise InteropError(
                f"input_preprocessor.linear.weight: shape {tuple(np.shape(w))} projects to "
                f"{out_features} channels; our input projection maps C -> latent_dim = d_latents "
                f"= {opts['latent_dim']}, so only a Linear(C, d_latents) preprocessor maps"
            )
        opts.update(input_projection=True, input_dim=int(in_features))
    else:
        opts.update(input_projection=False,
                    input_dim=_int("d_model", config_dict.get("d_model", HF_CONFIG_DEFAULTS["d_model"])))
    opts["decoder"] = "latents"
    if decoder_config is not None:
        opts.update(_decoder_options(decoder_config, config_dict))
    opts["dtype"] = dtype
    try:
        cfg = make_config(**opts)
    except (TypeError, ValueError) as exc:
        raise InteropError(f"the HF configuration does not make a valid perceiver_np config: {exc}") from exc
    names = hf_name_map(cfg)
    shapes = param_shapes(cfg)
    hf_shapes = {hf: (shapes[ours][::-1] if _is_linear_weight(ours) else shapes[ours])
                 for ours, hf in names.items()}
    _check_keys("state_dict", list(names.values()), state_dict, hf_shapes)
    params = {
        ours: _as_param(hf, state_dict[hf], shapes[ours], cfg.np_dtype,
                        transpose=_is_linear_weight(ours), ours=ours)
        for ours, hf in names.items()
    }
    return Perceiver(cfg, params)


def to_hf_state_dict(model: Perceiver) -> dict[str, np.ndarray]:
    """The HF ``PerceiverModel`` state dict of ``model``: HF key -> a fresh contiguous array in
    the model's dtype, Linear weights ``[out, in]``. Load it with
    ``hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in ...}, strict=True)`` into the
    model that :func:`to_hf_config` describes."""
    cfg = model.config
    return {
        hf: np.ascontiguousarray(model.params[ours].T if _is_linear_weight(ours) else model.params[ours])
        for ours, hf in hf_name_map(cfg).items()
    }


def to_hf_config(model: Perceiver) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(config_kwargs, decoder_config)`` of the HF model equal to ``model``: build it with
    ``PerceiverModel(PerceiverConfig(**config_kwargs), decoder=..., input_preprocessor=...)``,
    the decoder from ``decoder_config`` as :func:`from_hf_state_dict` documents it, and a
    ``LinearPreprocessor(input_dim, latent_dim)`` when ``input_projection`` is on. Both dicts
    feed :func:`from_hf_state_dict` back unchanged.

    Refused (an InteropError naming the option): ``num_cross_layers > 1``, ``final_norm``,
    Fourier or given queries, ``gelu="tanh"``, a self-attention value width other than D (HF
    projects the self-attention output to its value width, so the residual needs it to be D),
    and head counts that do not divide ``latent_dim`` (HF's encoder refuses them).
    ``dropout`` (HF has none besides attention dropout) and ``masked_rows="zero"`` (rows with no
    visible key) are not checked: they change only training, or only fully masked samples.
    """
    cfg = model.config
    problems = _structure_problems(cfg)
    if cfg.gelu != "exact":
        problems.append(f"gelu={cfg.gelu!r}: HF's hidden_act 'gelu' is exact")
    if cfg.self_v != cfg.latent_dim:
        problems.append(f"self value width {cfg.self_v} != latent_dim {cfg.latent_dim}: "
                        "HF's self-attention output projection maps v -> v, and its residual needs D")
    for field, heads in (("num_heads", cfg.num_heads), ("cross_heads", cfg.cross_num_heads)):
        if cfg.latent_dim % heads:
            problems.append(f"{field}: {heads} does not divide latent_dim {cfg.latent_dim} "
                            "(HF's encoder refuses it)")
    if problems:
        raise InteropError("this configuration has no Hugging Face equivalent: " + "; ".join(problems))
    config_kwargs: dict[str, Any] = dict(
        num_latents=cfg.num_latents, d_latents=cfg.latent_dim,
        d_model=cfg.latent_dim if cfg.input_projection else cfg.input_dim,
        num_blocks=cfg.num_blocks, num_self_attends_per_block=cfg.num_layers,
        num_self_attention_heads=cfg.num_heads, num_cross_attention_heads=cfg.cross_num_heads,
        qk_channels=cfg.qk_channels, v_channels=cfg.v_channels,
        cross_attention_shape_for_attention="kv",
        self_attention_widening_factor=cfg.self_widening_factor,
        cross_attention_widening_factor=cfg.cross_widening_factor,
        hidden_act="gelu", attention_probs_dropout_prob=cfg.attention_dropout,
        use_query_residual=cfg.use_query_residual,
    )
    decoder_config: dict[str, Any] | None = None
    if cfg.decoder in ("classification", "query"):
        cq = cfg.decoder_query_channels
        decoder_config = dict(
            type="classification" if cfg.decoder == "classification" else "basic",
            num_channels=cq,
            trainable_position_encoding_kwargs={"num_channels": cq, "index_dims": cfg.decoder_queries},
            qk_channels=cfg.decoder_qk, v_channels=cfg.decoder_v, num_heads=cfg.decoder_heads,
            widening_factor=cfg.decoder_widening_factor, use_query_residual=cfg.decoder_query_residual,
        )
        if cfg.decoder == "classification":
            config_kwargs["num_labels"] = cfg.output_dim
        else:
            decoder_config.update(output_num_channels=cfg.output_dim, output_index_dims=cfg.decoder_queries)
    return config_kwargs, decoder_config


# ---------------------------------------------------------------------------------------------
# Hugging Face: torch modules
# ---------------------------------------------------------------------------------------------


@functools.cache
def _linear_preprocessor_class() -> type:
    from torch import nn

    class LinearPreprocessor(nn.Module):
        """An HF input preprocessor that is one ``nn.Linear(in_features, out_features)``: the
        Hugging Face side of our ``input_proj`` (``input_preprocessor.linear.weight/bias``).

        ``PerceiverModel(config, input_preprocessor=LinearPreprocessor(C, config.d_latents))``
        projects ``[B, N, C]`` inputs to ``d_latents`` channels before the encoder, exactly as
        ``input_projection=True`` does.
        """

        def __init__(self, in_features: int, out_features: int) -> None:
            super().__init__()
            self.linear = nn.Linear(in_features, out_features)

        @property
        def num_channels(self) -> int:
            """The encoder's kv width (``PerceiverModel`` reads it)."""
            return int(self.linear.out_features)

        def forward(self, inputs: Any, pos: Any = None, network_input_is_1d: bool = True,
                    interpolate_pos_encoding: bool = False) -> tuple[Any, None, Any]:
            """inputs [B, N, C] -> (projected [B, N, D], modality sizes None, projected)."""
            h = self.linear(inputs)
            return h, None, h

    LinearPreprocessor.__module__ = __name__
    LinearPreprocessor.__qualname__ = "LinearPreprocessor"
    return LinearPreprocessor


def __getattr__(name: str) -> Any:
    """``LinearPreprocessor`` is built on first use, so that importing this module needs no torch."""
    if name == "LinearPreprocessor":
        return _linear_preprocessor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _to_numpy(tensor: Any) -> np.ndarray:
    import torch

    t = tensor.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64) if t.is_floating_point() else t
    return np.asarray(t.numpy())


def _hf_decoder_config(decoder: Any) -> dict[str, Any]:
    """The decoder_config of an HF decoder module (see :func:`from_hf_state_dict`)."""
    from torch import nn
    from transformers.models.perceiver import modeling_perceiver as mp

    if isinstance(decoder, mp.PerceiverClassificationDecoder):
        kind, basic = "classification", decoder.decoder
    elif isinstance(decoder, mp.PerceiverBasicDecoder):
        kind, basic = "basic", decoder
    else:
        raise InteropError(
            f"decoder: {type(decoder).__name__} is not supported; only None, "
            "PerceiverClassificationDecoder and PerceiverBasicDecoder (trainable queries) map"
        )
    cfg: dict[str, Any] = {
        "type": kind,
        "position_encoding_type": basic.position_encoding_type,
        "final_project": bool(basic.final_project),
        "concat_preprocessed_input": bool(basic.concat_preprocessed_input),
        "position_encoding_only": bool(basic.position_encoding_only),
        "num_channels": basic.num_channels,
    }
    if basic.position_encoding_type == "trainable":
        enc = basic.output_position_encodings
        cfg["trainable_position_encoding_kwargs"] = {
            "num_channels": enc._num_channels, "index_dims": enc._index_dims}
        if not isinstance(basic.positions_projection, nn.Identity):
            cfg["project_pos_dim"] = int(basic.positions_projection.out_features)
    if kind == "basic":
        cfg["output_num_channels"] = basic.output_num_channels
    if not basic.position_encoding_only:
        layer = basic.decoding_cross_attention
        att = layer.attention.self
        cfg.update(
            num_heads=att.num_heads, qk_channels=att.qk_channels, v_channels=att.v_channels,
            widening_factor=layer.mlp.dense1.out_features // layer.mlp.dense1.in_features,
            use_query_residual=bool(layer.attention.use_query_residual),
        )
    return cfg


def from_hf(hf_model: Any, *, dtype: str = "float64") -> Perceiver:
    """A perceiver_np model equal to the HF ``transformers.PerceiverModel`` ``hf_model``.

    ``model(x, mask=attention_mask.astype(bool))`` equals
    ``hf_model(inputs=x, attention_mask=attention_mask).logits`` with a decoder, or its
    ``.last_hidden_state`` without one (``decoder="latents"``), and ``model.backward`` gives
    the gradients torch autograd gives (see docs/verify.md for the one exception, a sample
    with no visible input). Supported: ``input_preprocessor`` None (``input_dim = d_model``)
    or a :data:`LinearPreprocessor` (``input_projection=True``); ``decoder`` None, a
    ``PerceiverClassificationDecoder`` or a ``PerceiverBasicDecoder`` with trainable queries;
    no ``output_postprocessor``; ``hidden_act="gelu"``. The heads, widths and query residual
    are read from the modules themselves, the rest from ``hf_model.config``; then
    :func:`from_hf_state_dict` maps the weights (every key, every shape checked).
    """
    from transformers import PerceiverModel

    if not isinstance(hf_model, PerceiverModel):
        raise InteropError(f"hf_model: expected a transformers.PerceiverModel, got {type(hf_model).__name__}")
    if hf_model.output_postprocessor is not None:
        raise InteropError(f"output_postprocessor: {type(hf_model.output_postprocessor).__name__} "
                           "is not supported (only None maps)")
    pre = hf_model.input_preprocessor
    if pre is not None and not isinstance(pre, _linear_preprocessor_class()):
        raise InteropError(f"input_preprocessor: {type(pre).__name__} is not supported; only None and "
                           "perceiver_np.interop.LinearPreprocessor map")
    config_dict = dict(hf_model.config.to_dict())
    config_dict["num_labels"] = hf_model.config.num_labels
    cross = hf_model.encoder.cross_attention.attention
    config_dict["use_query_residual"] = bool(cross.use_query_residual)
    config_dict["num_cross_attention_heads"] = cross.self.num_heads
    heads = {layer.attention.self.num_heads for layer in hf_model.encoder.self_attends}
    if len(heads) > 1:
        raise InteropError(f"encoder.self_attends: the layers have different head counts {sorted(heads)}")
    if heads:
        config_dict["num_self_attention_heads"] = heads.pop()
    decoder_config = None if hf_model.decoder is None else _hf_decoder_config(hf_model.decoder)
    state = {k: _to_numpy(v) for k, v in hf_model.state_dict().items()}
    return from_hf_state_dict(state, config_dict, decoder_config=decoder_config, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# DeepMind Haiku trees
# ---------------------------------------------------------------------------------------------


def from_haiku(
    tree: Mapping[str, Mapping[str, Any]], config: PerceiverConfig | Mapping[str, Any]
) -> Perceiver:
    """A perceiver_np model from DeepMind's Haiku parameter tree (module path -> {param -> array},
    e.g. ``tree["perceiver_encoder/~/cross_attention/attention/linear"]["w"]`` is the cross
    query projection ``[D, qk]``); names in :func:`haiku_name_map`. ``config`` (a
    PerceiverConfig or a dict of options) supplies everything a tree does not say: heads,
    ``gelu`` (DeepMind: ``"tanh"``), ``masked_rows`` (DeepMind: ``"zero"``), ``num_blocks``, ...;
    ``presets.deepmind(...)`` is DeepMind's. Arrays are cast to ``config.dtype``."""
    cfg = _as_config(config)
    if not isinstance(tree, Mapping):
        raise InteropError(
            f"tree: expected a mapping of module path -> parameters, got {type(tree).__name__}"
        )
    flat: dict[str, Any] = {}
    for module, leaves in tree.items():
        if not isinstance(leaves, Mapping):
            raise InteropError(f"tree[{module!r}]: expected a mapping of parameter name -> array, "
                               f"got {type(leaves).__name__}")
        for param, value in leaves.items():
            flat[f"{module}/{param}"] = value
    names = haiku_name_map(cfg)
    shapes = param_shapes(cfg)
    _check_keys("tree", [f"{m}/{p}" for m, p in names.values()], flat,
                {f"{m}/{p}": shapes[ours] for ours, (m, p) in names.items()})
    params = {ours: _as_param(f"{m}/{p}", flat[f"{m}/{p}"], shapes[ours], cfg.np_dtype, ours=ours)
              for ours, (m, p) in names.items()}
    return Perceiver(cfg, params)


def to_haiku(model: Perceiver) -> dict[str, dict[str, np.ndarray]]:
    """``model``'s parameters as DeepMind's Haiku tree (fresh arrays, the model's dtype)."""
    tree: dict[str, dict[str, np.ndarray]] = {}
    for ours, (module, param) in haiku_name_map(model.config).items():
        tree.setdefault(module, {})[param] = model.params[ours].copy()
    return tree


# ---------------------------------------------------------------------------------------------
# Plain parameter files: .npz and .safetensors keyed by our schema
# ---------------------------------------------------------------------------------------------

_FORMATS = (".npz", ".safetensors")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise InteropError(
            f"{path}: unknown format {suffix!r}; expected a name ending in {' or '.join(_FORMATS)}"
        )
    if suffix == ".safetensors":
        try:
            import safetensors.numpy  # noqa: F401
        except ImportError as exc:
            raise InteropError(f"{path}: .safetensors needs the safetensors package "
                               "(pip install safetensors); or use .npz") from exc
    return suffix


def save_params(path: PathLike, model: Perceiver) -> Path:
    """Write ``model.params`` to ``path`` (``.npz``: ``np.savez``, uncompressed, no pickle;
    ``.safetensors``: needs the safetensors package), one array per schema name, in schema
    order and the model's dtype. Atomic: a temporary file in the same directory, fsynced, then
    renamed. No config is stored: it is the reader's (``load_params(path, config)``)."""
    path = Path(path)
    fmt = _format(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in check_params(model.config, model.params).items()}
    if fmt == ".npz":
        savez: Any = np.savez  # typed Any: parameter names are not valid keyword names

        def write(f: Any) -> None:
            savez(f, **arrays)
    else:
        import safetensors.numpy

        blob = safetensors.numpy.save(arrays)

        def write(f: Any) -> None:
            f.write(blob)
    atomic_write(path, write)
    return path


def _read_arrays(path: Path, fmt: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InteropError(f"{path}: no such file")
    try:
        if fmt == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        import safetensors.numpy

        return dict(safetensors.numpy.load_file(str(path)))
    except InteropError:
        raise
    except Exception as exc:  # every way a damaged file fails to read (zipfile, numpy, safetensors)
        raise InteropError(
            f"{path}: not a readable {fmt} parameter file: {type(exc).__name__}: {exc}"
        ) from exc


def load_params(path: PathLike, config: PerceiverConfig | Mapping[str, Any]) -> Perceiver:
    """The model ``config`` describes with the parameters in ``path`` (``.npz`` or
    ``.safetensors``, keyed by our schema names, Linear weights ``[in, out]``): the format other
    ports write. Every problem is an InteropError: missing and unexpected names (each with its
    shape), a shape other than the schema's, non-float or non-finite values. Float arrays are
    cast to ``config.dtype`` (float32 -> float64 is exact; float64 -> float32 rounds)."""
    path = Path(path)
    cfg = _as_config(config)
    arrays = _read_arrays(path, _format(path))
    shapes = param_shapes(cfg)
    _check_keys(str(path), list(shapes), arrays, shapes)
    params = {k: _as_param(f"{path}: {k}", arrays[k], shape, cfg.np_dtype) for k, shape in shapes.items()}
    return Perceiver(cfg, params)
