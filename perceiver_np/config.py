"""The model configuration: every option, its default, its validation, and what follows from it.

``PerceiverConfig`` is a frozen dataclass. The seed options (Edifice's ``Perceiver.build``) come
first with Edifice's defaults; the extended options make DeepMind's and Hugging Face's encoders
expressible (docs/architecture.md, "Extended options"). Options documented as "defaults to ..."
stay ``None`` in the config and are resolved by the ``cross_*`` / ``self_*`` properties, so a
config round-trips through ``dataclasses.asdict`` and ``PerceiverConfig(**d)`` unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .position import fourier_channels

GELU_KINDS = ("exact", "tanh")
DECODERS = ("pool", "latents", "classification", "query", "pool_linear")
FFN_KINDS = ("gelu", "geglu")
INPUT_FOURIER = ("none", "lucidrains")
QUERY_MASKINGS = ("output", "attention")
MASKED_ROWS = ("zero", "uniform")
QUERY_SOURCES = ("trainable", "fourier", "given")
BACKENDS = ("auto", "numba", "numpy")
DTYPES = ("float32", "float64")

#: Edifice's ``recommended_defaults/0``: the seed configuration without ``input_dim``.
RECOMMENDED_DEFAULTS: dict[str, Any] = {
    "latent_dim": 256,
    "num_latents": 64,
    "num_layers": 4,
    "num_cross_layers": 1,
    "num_heads": 4,
    "dropout": 0.1,
}


@dataclass(frozen=True)
class PerceiverConfig:
    """Every option of a Perceiver encoder (docs/architecture.md explains each)."""

    # --- the seed's options (Edifice Perceiver.build) ---
    input_dim: int
    latent_dim: int = 256
    num_latents: int = 64
    num_layers: int = 4
    num_cross_layers: int = 1
    num_heads: int = 4
    dropout: float = 0.1
    # --- extended options (DeepMind / Hugging Face encoders) ---
    input_projection: bool = True
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_heads: int | None = None
    cross_widening_factor: int = 4
    self_widening_factor: int = 4
    use_query_residual: bool = True
    gelu: str = "exact"
    num_blocks: int = 1
    final_norm: bool = True
    attention_dropout: float = 0.0
    masked_rows: str = "zero"
    # --- extended options (lucidrains' perceiver-pytorch, krasserm's perceiver-io) ---
    cross_qk_channels: int | None = None
    cross_v_channels: int | None = None
    self_qk_channels: int | None = None
    self_v_channels: int | None = None
    qkv_bias: bool = True
    ffn_kind: str = "gelu"
    block_order: tuple[tuple[str, int], ...] | None = None
    input_fourier: str = "none"
    input_index_dims: tuple[int, ...] | None = None
    input_num_bands: int = 4
    input_max_freq: float = 10.0
    # --- decoding (Perceiver IO, docs/architecture.md) ---
    decoder: str = "pool"
    output_dim: int | None = None
    num_outputs: int | None = None
    query_source: str = "trainable"
    query_dim: int | None = None
    output_index_dims: tuple[int, ...] | None = None
    query_num_bands: int = 16
    decoder_heads: int = 1
    decoder_qk_channels: int | None = None
    decoder_v_channels: int | None = None
    decoder_widening_factor: int = 1
    decoder_query_residual: bool = False
    decoder_ffn: bool = True
    decoder_output: bool = True
    query_masking: str = "output"
    # --- construction and execution ---
    dtype: str = "float32"
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.block_order, (list, tuple)):  # JSON gives lists: one canonical form
            order = tuple(tuple(step) if isinstance(step, (list, tuple)) else step
                          for step in self.block_order)
            object.__setattr__(self, "block_order", order)
        if isinstance(self.input_index_dims, list):
            object.__setattr__(self, "input_index_dims", tuple(self.input_index_dims))
        _validate(self)

    # ---- derived widths -------------------------------------------------------------------

    @property
    def position_channels(self) -> int:
        """P, the Fourier features the model appends to every input position (``input_fourier``):
        ``len(input_index_dims) * (2 * input_num_bands + 1)``, else 0."""
        if self.input_fourier == "none":
            return 0
        return len(self.input_index_dims or ()) * (2 * self.input_num_bands + 1)

    @property
    def encoder_input_channels(self) -> int:
        """C + P: the width of an input position with its appended Fourier features, what the
        input projection (or, without one, the cross-attention's key/value side) reads."""
        return self.input_dim + self.position_channels

    @property
    def kv_channels(self) -> int:
        """Ckv: the width of what the cross-attention keys/values project from (D, or C + P raw)."""
        return self.latent_dim if self.input_projection else self.encoder_input_channels

    @property
    def cross_num_heads(self) -> int:
        return self.num_heads if self.cross_heads is None else self.cross_heads

    @property
    def cross_qk(self) -> int:
        """Cross-attention query/key width: ``cross_qk_channels``, else ``qk_channels``, else the
        KV input width (DeepMind)."""
        if self.cross_qk_channels is not None:
            return self.cross_qk_channels
        return self.kv_channels if self.qk_channels is None else self.qk_channels

    @property
    def cross_v(self) -> int:
        """Cross-attention value width: ``cross_v_channels``, else ``v_channels``, else its qk width."""
        if self.cross_v_channels is not None:
            return self.cross_v_channels
        return self.cross_qk if self.v_channels is None else self.v_channels

    @property
    def self_qk(self) -> int:
        """Self-attention query/key width: ``self_qk_channels``, else ``qk_channels``, else D."""
        if self.self_qk_channels is not None:
            return self.self_qk_channels
        return self.latent_dim if self.qk_channels is None else self.qk_channels

    @property
    def self_v(self) -> int:
        """Self-attention value width: ``self_v_channels``, else ``v_channels``, else its qk width."""
        if self.self_v_channels is not None:
            return self.self_v_channels
        return self.self_qk if self.v_channels is None else self.v_channels

    @property
    def decoder_queries(self) -> int:
        """O, the number of output queries: 1 for classification, ``num_outputs`` for trainable
        queries, the product of ``output_index_dims`` for Fourier queries, 0 when the caller
        supplies them (any number) or the decoder is the mean pool."""
        if self.decoder == "classification":
            return 1
        if self.decoder == "query" and self.query_source == "trainable":
            return int(self.num_outputs or 0)
        if self.decoder == "query" and self.query_source == "fourier":
            return math.prod(self.output_index_dims or ())
        return 0

    @property
    def decoder_query_channels(self) -> int:
        """Cq, the width of the output queries: ``query_dim`` (default D for trainable queries),
        or the Fourier feature count of ``output_index_dims`` with ``query_num_bands`` bands."""
        if self.decoder == "query" and self.query_source == "fourier":
            return fourier_channels(len(self.output_index_dims or ()), self.query_num_bands)
        return self.latent_dim if self.query_dim is None else self.query_dim

    @property
    def decoder_qk(self) -> int:
        """The decoder attention's query/key width: ``decoder_qk_channels``, else D, the width
        of the latents it attends to (DeepMind's BasicDecoder, ``shape_for_attn='kv'``)."""
        return self.latent_dim if self.decoder_qk_channels is None else self.decoder_qk_channels

    @property
    def decoder_v(self) -> int:
        return self.decoder_qk if self.decoder_v_channels is None else self.decoder_v_channels

    @property
    def output_width(self) -> int:
        """The last axis of the model's output: D for the mean pool and the latents, Cq for a
        query decoder without its output projection, else ``output_dim``."""
        if self.decoder in ("pool", "latents"):
            return self.latent_dim
        if not self.decoder_output:
            return self.decoder_query_channels
        return int(self.output_dim or 0)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def self_group(self, c: int) -> range:
        """The global indices of the self blocks run after cross block ``c`` (Edifice's
        interleaving): ``per_cross = max(num_layers // num_cross_layers, 1)`` each, the last
        group takes the rest."""
        per_cross = max(self.num_layers // self.num_cross_layers, 1)
        last = c == self.num_cross_layers - 1
        count = self.num_layers - per_cross * (self.num_cross_layers - 1) if last else per_cross
        return range(per_cross * c, per_cross * c + count)

    @property
    def self_groups(self) -> tuple[tuple[int, ...], ...]:
        """:meth:`self_group` of every cross block."""
        return tuple(tuple(self.self_group(c)) for c in range(self.num_cross_layers))

    def iter_schedule(self) -> Iterator[tuple[str, int]]:
        """The order the blocks run in, one step at a time (no list of a huge model's steps)."""
        if self.block_order is not None:
            yield from self.block_order
            return
        for c in range(self.num_cross_layers):
            yield ("cross", c)
            for _ in range(self.num_blocks):
                yield from (("self", j) for j in self.self_group(c))

    @property
    def schedule(self) -> tuple[tuple[str, int], ...]:
        """The order the blocks run in: ``("cross", i)`` then its self group, ``num_blocks``
        times in a row (the repeats share weights), for every cross block i; or ``block_order``
        as given (a block index that appears twice is one set of weights used twice)."""
        return tuple(self.iter_schedule())

    def attention_backend(self, kind: str, training: bool) -> str:
        """The attention implementation of a ``kind`` ("cross" | "self") block: ``"numba"``, the
        tiled kernel, or ``"numpy"``, the plain path. ``backend="auto"`` uses the kernel for
        every attention, and the plain path where the kernel cannot do what is asked: attention
        probabilities dropped (training with ``attention_dropout > 0``), or a cross-attention's
        rows with no visible key made uniform (``masked_rows="uniform"``; the kernel zeroes
        them)."""
        if self.backend == "numpy" or (training and self.attention_dropout > 0):
            return "numpy"
        if kind == "cross" and self.masked_rows != "zero":
            return "numpy"  # the kernel zeroes rows with no visible key
        return "numba"

    def replace(self, **changes: Any) -> PerceiverConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _validate(cfg: PerceiverConfig) -> None:
    def is_int(v: object) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    for name in (
        "input_dim", "latent_dim", "num_latents", "num_layers", "num_cross_layers", "num_heads",
        "cross_widening_factor", "self_widening_factor", "num_blocks",
    ):
        v = getattr(cfg, name)
        if not is_int(v) or v <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    for name in ("decoder_heads", "decoder_widening_factor", "query_num_bands"):
        v = getattr(cfg, name)
        if not is_int(v) or v <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    for name in ("qk_channels", "v_channels", "cross_heads", "output_dim", "num_outputs",
                 "query_dim", "decoder_qk_channels", "decoder_v_channels", "cross_qk_channels",
                 "cross_v_channels", "self_qk_channels", "self_v_channels"):
        v = getattr(cfg, name)
        if v is not None and (not is_int(v) or v <= 0):
            raise ValueError(f"{name}: expected a positive integer or None, got {v!r}")
    if not is_int(cfg.seed) or cfg.seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {cfg.seed!r}")
    for name in ("dropout", "attention_dropout"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a rate in [0, 1), got {v!r}")
    for name in ("input_projection", "use_query_residual", "final_norm", "decoder_query_residual",
                 "qkv_bias", "decoder_ffn", "decoder_output"):
        v = getattr(cfg, name)
        if not isinstance(v, bool):
            raise ValueError(f"{name}: expected True or False, got {v!r}")
    _validate_decoder(cfg, is_int)
    _validate_lucidrains(cfg, is_int)
    if cfg.gelu not in GELU_KINDS:
        raise ValueError(f"gelu: expected one of {GELU_KINDS}, got {cfg.gelu!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.backend == "numba" and cfg.attention_dropout > 0:
        raise ValueError(
            f"backend: 'numba' has no dropout on attention probabilities, but attention_dropout "
            f"is {cfg.attention_dropout}; use backend 'auto' (the plain path where needed) or 'numpy'"
        )
    if cfg.masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows: expected one of {MASKED_ROWS}, got {cfg.masked_rows!r}")
    if cfg.backend == "numba" and cfg.masked_rows != "zero":
        raise ValueError("backend: 'numba' zeroes attention rows with no visible key, but "
                         f"masked_rows is {cfg.masked_rows!r}; use backend 'auto' or 'numpy'")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.block_order is None and cfg.num_layers < cfg.num_cross_layers:
        raise ValueError(
            f"num_layers ({cfg.num_layers}) < num_cross_layers ({cfg.num_cross_layers}): every "
            "cross block needs at least one self block after it"
        )
    for heads_field, heads, widths in (
        ("cross_heads" if cfg.cross_heads is not None else "num_heads (cross_heads defaults to it)",
         cfg.cross_num_heads,
         (("cross qk width", cfg.cross_qk), ("cross v width", cfg.cross_v))),
        ("num_heads", cfg.num_heads,
         (("self qk width", cfg.self_qk), ("self v width", cfg.self_v))),
    ):
        for what, width in widths:
            if width % heads:
                source = _width_source(cfg, what)
                raise ValueError(
                    f"{heads_field}: {heads} heads do not divide the {what} {width} ({source})"
                )


def _validate_decoder(cfg: PerceiverConfig, is_int: Any) -> None:
    if cfg.decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {cfg.decoder!r}")
    if cfg.query_masking not in QUERY_MASKINGS:
        raise ValueError(f"query_masking: expected one of {QUERY_MASKINGS}, got {cfg.query_masking!r}")
    if cfg.query_source not in QUERY_SOURCES:
        raise ValueError(f"query_source: expected one of {QUERY_SOURCES}, got {cfg.query_source!r}")
    if not cfg.decoder_output and cfg.decoder != "query":
        raise ValueError(f"decoder_output: only the query decoder can leave out its output "
                         f"projection, got decoder {cfg.decoder!r}")
    if cfg.decoder in ("pool", "latents"):
        return
    if cfg.decoder_output and cfg.output_dim is None:
        raise ValueError(f"output_dim: decoder {cfg.decoder!r} needs the width of its output "
                         "(the number of classes, or channels per output query)")
    if not cfg.decoder_output and cfg.output_dim is not None:
        raise ValueError(f"output_dim: decoder_output=False outputs the decoded queries as they "
                         f"are (width Cq); leave output_dim None, got {cfg.output_dim!r}")
    if cfg.decoder == "pool_linear":
        return
    if cfg.decoder == "query":
        if cfg.query_source == "trainable" and cfg.num_outputs is None:
            raise ValueError("num_outputs: trainable output queries need their number O")
        if cfg.query_source == "fourier":
            dims = cfg.output_index_dims
            if (not isinstance(dims, tuple) or not dims
                    or not all(is_int(d) and d > 0 for d in dims)):
                raise ValueError("output_index_dims: Fourier output queries need the output grid "
                                 f"as a tuple of positive ints, got {dims!r}")
            if cfg.query_dim is not None:
                raise ValueError("query_dim: Fourier queries take their width from "
                                 "output_index_dims and query_num_bands; leave query_dim None")
        if cfg.query_source == "given" and cfg.query_dim is None:
            raise ValueError("query_dim: caller-supplied queries need their width Cq")
    for what, width, source in (
        ("decoder qk width", cfg.decoder_qk,
         "decoder_qk_channels" if cfg.decoder_qk_channels is not None else "defaults to latent_dim"),
        ("decoder v width", cfg.decoder_v,
         "decoder_v_channels" if cfg.decoder_v_channels is not None else "defaults to the qk width"),
    ):
        if width % cfg.decoder_heads:
            raise ValueError(f"decoder_heads: {cfg.decoder_heads} heads do not divide the {what} "
                             f"{width} ({source})")


def _validate_lucidrains(cfg: PerceiverConfig, is_int: Any) -> None:
    """The options of the ports' structures: the FFN kind, the block order, input positions."""
    if cfg.ffn_kind not in FFN_KINDS:
        raise ValueError(f"ffn_kind: expected one of {FFN_KINDS}, got {cfg.ffn_kind!r}")
    if cfg.input_fourier not in INPUT_FOURIER:
        raise ValueError(f"input_fourier: expected one of {INPUT_FOURIER}, got {cfg.input_fourier!r}")
    if cfg.input_fourier != "none":
        dims = cfg.input_index_dims
        if not isinstance(dims, tuple) or not dims or not all(is_int(d) and d > 0 for d in dims):
            raise ValueError("input_index_dims: input Fourier features need the input grid as a "
                             f"tuple of positive ints, got {dims!r}")
        if not is_int(cfg.input_num_bands) or cfg.input_num_bands <= 0:
            raise ValueError(f"input_num_bands: expected a positive integer, got {cfg.input_num_bands!r}")
        freq = cfg.input_max_freq
        if isinstance(freq, bool) or not isinstance(freq, (int, float)) or not 0 < freq < math.inf:
            raise ValueError(f"input_max_freq: expected a positive finite number, got {freq!r}")
    elif cfg.input_index_dims is not None:
        raise ValueError("input_index_dims: only input_fourier='lucidrains' uses it; leave it None")
    order = cfg.block_order
    if order is None:
        return
    steps_ok = isinstance(order, tuple) and all(
        isinstance(step, tuple) and len(step) == 2 and step[0] in ("cross", "self") and is_int(step[1])
        for step in order)
    if not steps_ok or not order:
        raise ValueError("block_order: expected a non-empty tuple of ('cross', i) / ('self', j) steps, "
                         f"got {order!r}")
    if order[0][0] != "cross":
        raise ValueError(f"block_order: the first step must be a cross block (the latents read the "
                         f"input first), got {order[0]!r}")
    if cfg.num_blocks != 1:
        raise ValueError(f"num_blocks: block_order lists every step itself; leave num_blocks 1, "
                         f"got {cfg.num_blocks}")
    for kind, count, field in (("cross", cfg.num_cross_layers, "num_cross_layers"),
                               ("self", cfg.num_layers, "num_layers")):
        used = sorted({i for k, i in order if k == kind})
        if used != list(range(count)):
            raise ValueError(f"block_order: the {kind} steps must use each of the {field}={count} "
                             f"{kind} blocks (indices 0..{count - 1}), got indices {used}")


def _width_source(cfg: PerceiverConfig, what: str) -> str:
    kind = "cross" if what.startswith("cross") else "self"
    for field in (f"{kind}_v_channels",) * what.endswith("v width") + (f"{kind}_qk_channels",):
        if getattr(cfg, field) is not None:
            return field
    if what.endswith("v width") and cfg.v_channels is not None:
        return "v_channels"
    if cfg.qk_channels is not None:
        return "qk_channels"
    if what.startswith("cross"):
        if cfg.input_projection:
            return "defaults to latent_dim"
        if cfg.position_channels:
            return "defaults to input_dim + the input's Fourier features, as input_projection=False"
        return "defaults to input_dim, as input_projection=False"
    return "defaults to latent_dim"


def _check_names(opts: dict[str, Any]) -> None:
    fields = {f.name for f in dataclasses.fields(PerceiverConfig)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {sorted(fields)}")


def make_config(**opts: Any) -> PerceiverConfig:
    """A validated config from keyword options; unknown options are a TypeError naming them."""
    _check_names(opts)
    if "input_dim" not in opts:
        raise TypeError("input_dim: required option is missing")
    return PerceiverConfig(**opts)


# ---------------------------------------------------------------------------------------------
# The parameter schema (docs/params.md): names and shapes in order, and the counts from it
# ---------------------------------------------------------------------------------------------


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (n_in, n_out))] + ([(f"{prefix}.bias", (n_out,))] if bias else [])


def _attention(cfg: PerceiverConfig, cq: int, ckv: int, qk: int, v: int, dout: int
               ) -> list[tuple[str, tuple[int, ...]]]:
    """attn.{q,k,v,out}: the q/k/v projections without biases when ``qkv_bias=False``."""
    b = cfg.qkv_bias
    return (_linear("attn.q", cq, qk, b) + _linear("attn.k", ckv, qk, b) + _linear("attn.v", ckv, v, b)
            + _linear("attn.out", v, dout))


def _ffn(cfg: PerceiverConfig, width: int, factor: int) -> list[tuple[str, tuple[int, ...]]]:
    """ffn.up / ffn.down: the up projection twice as wide for GEGLU (value half, then gate half)."""
    hidden = factor * width
    up = 2 * hidden if cfg.ffn_kind == "geglu" else hidden
    return _norm("ffn_norm", width) + _linear("ffn.up", width, up) + _linear("ffn.down", hidden, width)


def _norm(prefix: str, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.gamma", (width,)), (f"{prefix}.beta", (width,))]


def cross_block_shapes(cfg: PerceiverConfig) -> dict[str, tuple[int, ...]]:
    """Block-local parameter names and shapes of one cross block."""
    d, ckv, qk, v = cfg.latent_dim, cfg.kv_channels, cfg.cross_qk, cfg.cross_v
    return dict(_norm("q_norm", d) + _norm("kv_norm", ckv) + _attention(cfg, d, ckv, qk, v, d)
                + _ffn(cfg, d, cfg.cross_widening_factor))


def self_block_shapes(cfg: PerceiverConfig) -> dict[str, tuple[int, ...]]:
    """Block-local parameter names and shapes of one self block."""
    d, qk, v = cfg.latent_dim, cfg.self_qk, cfg.self_v
    return dict(_norm("norm", d) + _attention(cfg, d, d, qk, v, d) + _ffn(cfg, d, cfg.self_widening_factor))


def param_shapes(cfg: PerceiverConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the model and its shape, in schema order."""
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.input_projection:
        shapes.update(_linear("input_proj", cfg.encoder_input_channels, cfg.latent_dim))
    shapes["latents"] = (cfg.num_latents, cfg.latent_dim)
    for i in range(cfg.num_cross_layers):
        shapes.update({f"cross.{i}.{k}": s for k, s in cross_block_shapes(cfg).items()})
    for j in range(cfg.num_layers):
        shapes.update({f"self.{j}.{k}": s for k, s in self_block_shapes(cfg).items()})
    if cfg.final_norm:
        shapes.update(_norm("final_norm", cfg.latent_dim))
    if cfg.decoder not in ("pool", "latents"):
        shapes.update({f"decoder.{k}": s for k, s in decoder_shapes(cfg).items()})
    return shapes


def decoder_shapes(cfg: PerceiverConfig) -> dict[str, tuple[int, ...]]:
    """Names (under ``decoder.``) and shapes of the decoder: the trainable queries (when they
    are), a cross block with the queries as its query side and the latents as its keys and
    values, and the output projection."""
    d, cq, qk, v = cfg.latent_dim, cfg.decoder_query_channels, cfg.decoder_qk, cfg.decoder_v
    out_dim = int(cfg.output_dim or 0)
    if cfg.decoder == "pool_linear":  # LN(mean_M(z)) @ W + b
        return dict(_norm("norm", d) + _linear("output", d, out_dim))
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if cfg.decoder == "classification" or cfg.query_source == "trainable":
        shapes.append(("queries", (cfg.decoder_queries, cq)))
    shapes += _norm("q_norm", cq) + _norm("kv_norm", d) + _attention(cfg, cq, d, qk, v, cq)
    if cfg.decoder_ffn:
        shapes += _ffn(cfg, cq, cfg.decoder_widening_factor)
    if cfg.decoder_output:
        shapes += _linear("output", cq, out_dim)
    return dict(shapes)


def param_count(**opts: Any) -> int:
    """The EXACT number of parameters the model built with ``opts`` has.

    Edifice's ``param_count`` is an approximation, ``M*D + C*D + 12*D^2*(cross + self)``,
    that leaves out every bias and LayerNorm. For the seed it is
    ``M*D + (C*D + D) + cross*(12D^2 + 15D) + self*(12D^2 + 13D) + 2D``:
    4,039,936 for input_dim=287 with the defaults, where Edifice's formula says 4,022,016.
    """
    return sum(math.prod(s) for s in param_shapes(make_config(**opts)).values())


def output_size(**opts: Any) -> int:
    """The width of the model's output: ``latent_dim`` for the mean pool (``[B, D]``) and the
    latents themselves (``[B, M, D]``), else
    ``output_dim`` (``[B, output_dim]`` for classification, ``[B, O, output_dim]`` per query).

    Like Edifice's ``output_size/1`` it needs no ``input_dim``; the options given are validated
    as a whole when ``input_dim`` is among them."""
    if "input_dim" in opts:
        return make_config(**opts).output_width
    _check_names(opts)
    if opts.get("decoder", "pool") not in ("pool", "latents"):
        return make_config(input_dim=1, **opts).output_width
    latent_dim = opts.get("latent_dim", PerceiverConfig.latent_dim)
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, (int, np.integer)) or latent_dim <= 0:
        raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim!r}")
    return int(latent_dim)


def recommended_defaults() -> dict[str, Any]:
    """Edifice's recommended configuration for sequence processing (without ``input_dim``)."""
    return dict(RECOMMENDED_DEFAULTS)
