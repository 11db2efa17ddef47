"""The Perceiver encoder: parameters, forward and backward through the whole model.

::

    x = [x, pos]                             [B, N, C] -> [B, N, C + P]  (input_fourier; else as is)
    h = x @ W_in + b_in                      [B, N, C + P] -> [B, N, D]  (input_projection; else h = x)
    z = broadcast(latents)                   [M, D] -> [B, M, D]
    for step in config.schedule:             cross blocks interleaved with groups of self blocks
        z = CrossBlock_i(z, h, mask)  or  z = SelfBlock_j(z)
    z = LN_final(z)                          (final_norm)
    decoder "pool":            y = mean_M(z)                                 [B, M, D] -> [B, D]
    decoder "latents":         y = z                                         [B, M, D]
    decoder "query":           u = CrossBlock_dec(queries, z)                [B, O, Cq]
                               y = u @ W_out + b_out                         [B, O, Cq] -> [B, O, out]
    decoder "classification":  the same with one trainable query, y[:, 0]    [B, out]
    decoder "pool_linear":     y = LN(mean_M(z)) @ W_out + b_out             [B, out]

The model holds only its config and parameters; ``forward`` returns a cache that ``backward``
consumes, so nothing grows between calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator
from typing import Any, NamedTuple

import numpy as np

from . import engine, stream
from .backends import engine_ops, layer_ops
from .blocks import (
    CrossBlockCache,
    SelfBlockCache,
    cross_block_backward,
    cross_block_forward,
    self_block_backward,
    self_block_forward,
)
from .config import PerceiverConfig, cross_block_shapes, make_config, param_shapes, self_block_shapes
from .layers import (
    LayerNormCache,
    LayerOps,
    LinearCache,
    MeanPoolCache,
    Params,
    Record,
    mean_pool_backward,
    mean_pool_forward,
    params_under,
    prefixed,
    tap,
)
from .position import fourier_position_encoding, lucidrains_fourier_encoding
from .shapes import (
    OverflowRisk,
    as_mask,
    as_real_input,
    expect_finite_output,
    expect_in_range,
    expect_shape,
    first_nonfinite,
)
from .workspace import StepArena, ThreadArenas, ThreadWorkspaces, Workspace


def init_params(cfg: PerceiverConfig) -> Params:
    """Fresh parameters for ``cfg``, seeded by ``cfg.seed``.

    Dense kernels, the latent array and trainable output queries: glorot-uniform
    ``U(±sqrt(6 / (fan_in + fan_out)))``
    (Axon's initialiser); biases 0; LayerNorm gamma 1 and beta 0. Values are drawn in float64 in
    schema order and then cast, so a float32 and a float64 model of the same seed hold the same
    weights up to float32 rounding.
    """
    rng = np.random.default_rng(cfg.seed)
    params: Params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".weight") or name in ("latents", "decoder.queries"):
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            value = rng.uniform(-limit, limit, size=shape)
        elif name.endswith(".gamma"):
            value = np.ones(shape)
        else:  # .bias, .beta
            value = np.zeros(shape)
        params[name] = value.astype(cfg.np_dtype)
    return params


def check_params(cfg: PerceiverConfig, params: Params, *, not_scanned: Collection[str] = ()) -> Params:
    """Validate ``params`` against the schema of ``cfg``: exact key set, shapes, dtype and
    finite values (every call of the model does this: parameters may be edited between calls).
    Returns them in schema order. The values of the names in ``not_scanned`` are not scanned for
    NaN and infinity here: the inference engine checks those through its products
    (:func:`perceiver_np.engine.product_weights`)."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    shapes = param_shapes(cfg)
    missing = [k for k in shapes if k not in params]
    extra = [k for k in params if k not in shapes]
    if missing or extra:
        raise ValueError(f"params: missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        value = params[name]
        if not isinstance(value, np.ndarray):
            raise TypeError(f"params[{name!r}]: expected a numpy.ndarray, got {type(value).__name__}")
        if value.shape != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {value.shape}")
        if value.dtype != cfg.np_dtype:
            raise TypeError(
                f"params[{name!r}]: expected dtype {cfg.dtype}, got {value.dtype.name}"
            )
        problem = None if name in not_scanned else first_nonfinite(f"params[{name!r}]", value)
        if problem is not None:
            raise ValueError(problem)
    return {name: params[name] for name in shapes}  # schema order


class DecoderCache(NamedTuple):
    block: CrossBlockCache  # queries [B, O, Cq] attending to the latents [B, M, D]
    output: LinearCache | None  # decoded queries [B, O, Cq], weight [Cq, out]; None: no projection
    query_mask: np.ndarray | None  # [B, O] bool, True = keep this output
    queries_shape: tuple[int, int, int]  # (B, O, Cq)


class PoolLinearCache(NamedTuple):
    pool: MeanPoolCache  # z [B, M, D] -> [B, D]
    norm: LayerNormCache  # the pooled latents [B, D]
    output: LinearCache  # LN(pooled) [B, D], weight [D, out]


class ModelCache(NamedTuple):
    owner: object  # the token of the Perceiver that made this cache (backward checks it)
    params_used: tuple[np.ndarray, ...]  # the parameter arrays of the forward, in schema order
    ops: LayerOps  # the implementations of the input projection, final LayerNorm and output head
    x_shape: tuple[int, int, int]  # (B, N, C)
    input_proj: LinearCache | None  # x [B, N, C], weight [C, D]; None without the projection
    steps: tuple[CrossBlockCache | SelfBlockCache, ...]  # one per entry of config.schedule
    final_norm: LayerNormCache | None  # z [B, M, D]
    head: MeanPoolCache | DecoderCache | PoolLinearCache | None  # the output head's cache, or none


class Perceiver:
    """A Perceiver encoder: ``x [B, N, C] -> y [B, D]`` (docs/architecture.md).

    Build one with :func:`build`. ``params`` is the flat dict of the schema (docs/params.md);
    replace arrays in it freely (same shapes and dtype) between calls: every call checks them
    against the schema again (names, shapes, dtype, finite values) and names the parameter at
    fault. A cache from :meth:`forward` belongs to this model and to the parameter arrays of
    that forward: :meth:`backward` refuses any other.
    """

    def __init__(self, config: PerceiverConfig, params: Params | None = None) -> None:
        self.config = config
        self.params = init_params(config) if params is None else check_params(config, params)
        self._token = object()  # identifies this model's caches
        self._workspaces = ThreadWorkspaces()  # the inference engine's buffers, one set per thread
        self._arenas = ThreadArenas()  # the training step's buffers, one arena per thread
        self._held: Params | None = None  # within holding_params(): the params checked on entry
        self.fixed_queries: np.ndarray | None = None  # [O, Cq]: Fourier output queries
        if config.decoder == "query" and config.query_source == "fourier":
            self.fixed_queries = fourier_position_encoding(
                tuple(config.output_index_dims or ()), config.query_num_bands, dtype=config.np_dtype
            )
        self.input_positions: np.ndarray | None = None  # [N, P]: Fourier features of the input grid
        if config.input_fourier == "lucidrains":
            self.input_positions = lucidrains_fourier_encoding(
                tuple(config.input_index_dims or ()), config.input_num_bands, config.input_max_freq,
                dtype=config.np_dtype)

    # ---- inference ------------------------------------------------------------------------

    def __call__(
        self, x: Any, mask: Any = None, *, queries: Any = None, query_mask: Any = None
    ) -> np.ndarray:
        """Inference: x [B, N, C], mask [B, N] bool (True = keep) -> y: [B, D] (mean pool),
        [B, out] (classification) or [B, O, out] (query decoder)."""
        cfg, p = self.config, self.checked_params(for_engine=True)  # forward() checks all
        x, mask = self._check_input(x, mask, p)
        x_in = self.encoder_input(x)  # [B, N, C] -> [B, N, C + P]
        if not (self.uses_engine or mask is None or mask.any(axis=1).all()):
            # masked_rows="uniform" differs from the engine's zero rows only for a sample whose
            # every input is masked: such a batch takes the probabilities path
            return self.forward(x, mask, queries=queries, query_mask=query_mask)[0]
        # an overflow is named by the engine's checks (expect_finite_output, the products')
        with np.errstate(over="ignore", invalid="ignore"), self.naming_bad_params():
            z = engine.encode_array(cfg, p, x_in, mask, engine_ops(cfg.backend),
                                        self.workspace())  # [B, N, C+P] -> [B, M, D]
            return self.decode(z, queries=queries, query_mask=query_mask)[0]

    def workspace(self) -> Workspace:
        """The calling thread's :class:`~perceiver_np.workspace.Workspace`: the buffers the
        inference engine (``model(x)``, ``encode_stream``) takes its intermediates from and
        reuses on the next call of the same shape, so no call faults its memory in again. It
        holds one buffer per intermediate, chunk-sized on the input side (``.nbytes``);
        ``.clear()`` hands them back. Each thread has its own, so concurrent calls never share
        a buffer; the outputs are always new arrays."""
        return self._workspaces.get()

    def step_arena(self) -> StepArena:
        """The calling thread's :class:`~perceiver_np.workspace.StepArena`: the buffers
        :func:`perceiver_np.train.train_step` of this model takes the kernels' activations,
        caches and gradients from, the same memory every step (``.nbytes``: about what one step
        allocates through the kernels; ``.clear()`` hands them back)."""
        return self._arenas.get()

    @property
    def uses_engine(self) -> bool:
        """Whether inference (``model(x)``) always runs the inference engine
        (:mod:`perceiver_np.engine`, on the kernels or, with ``backend="numpy"``, on their plain
        twins): unless ``masked_rows="uniform"``, which the engine's (o, lse) attention does not
        do. Such a model still runs the engine on a batch where every sample keeps an input."""
        return self.config.masked_rows == "zero"

    def with_params(self, params: Params) -> Perceiver:
        """A model of the same config with ``params`` (checked), e.g. a training state's."""
        return Perceiver(self.config, params)

    def checked_params(self, *, for_engine: bool = False) -> Params:
        """``self.params`` checked against the schema (:func:`check_params`), in schema order.
        ``for_engine``: for a call of the inference engine, which checks the weights of its
        products itself (:func:`perceiver_np.engine.product_weights`): those are not scanned
        here. Run the engine inside :meth:`naming_bad_params`."""
        held = self._held
        if held is not None and len(self.params) == len(held) and all(
                self.params.get(name) is value for name, value in held.items()):
            return held  # holding_params(): these very arrays were checked on entry
        skip = engine.product_weights(self.config) if for_engine else ()
        return check_params(self.config, self.params, not_scanned=skip)

    @contextlib.contextmanager
    def holding_params(self, *, scan: bool = True) -> Iterator[None]:
        """For a caller that owns this model and does not edit its parameters' values inside the
        block (:func:`perceiver_np.train.train_step`'s model of the step): ``self.params`` are
        checked once on entry (:func:`check_params`), and inside the block
        :meth:`checked_params` returns that checked dict without scanning the values again as
        long as ``self.params`` holds the very same arrays (a replaced array is checked in full,
        as outside). The step's forward and backward would otherwise scan every parameter twice
        more. ``scan=False``: the caller vouches that the values were scanned since they last
        changed (a model just built on them, whose constructor scanned them); names, shapes and
        dtypes are checked still."""
        checked = check_params(self.config, self.params, not_scanned=() if scan else self.params)
        self._held = checked
        try:
            yield
        finally:
            self._held = None

    @contextlib.contextmanager
    def naming_bad_params(self) -> Iterator[None]:
        """Around a call of the inference engine on ``checked_params(for_engine=True)``: when a
        step reports NaN or infinity (OverflowRisk), every parameter is scanned first, so that
        a non-finite parameter is named (ValueError ``params['...']: ...``) rather than the
        step it reached; with every parameter finite the step's OverflowRisk stands."""
        try:
            yield
        except OverflowRisk:
            check_params(self.config, self.params)
            raise

    def encoder_input(self, x: np.ndarray) -> np.ndarray:
        """x [B, N, C] (checked) -> what the encoder reads: [x, pos] [B, N, C + P] with the
        input grid's Fourier features (``input_fourier``), else x itself."""
        if self.input_positions is None:
            return x
        pos = self.input_positions  # [N, P]
        pos = np.broadcast_to(pos, (x.shape[0], *pos.shape))  # [N, P] -> [B, N, P]
        return np.concatenate([x, pos], axis=-1)  # [B, N, C] + [B, N, P] -> [B, N, C + P]

    def _check_input(self, x: Any, mask: Any, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        """x -> float array [B, N, C] of the model's dtype, mask -> bool [B, N] or None.

        Also refuses an input so large that the input side could overflow the dtype (the
        same refusal on every path, before anything is computed): see
        :func:`perceiver_np.engine.check_input_range`."""
        x = self.checked_x(x, scan=False)  # NaN and infinity: found by the range check's pass
        engine.check_input_range("x", self.config, p, self.encoder_input(x))
        return x, as_mask(mask, x.shape[0], x.shape[1])

    def checked_x(self, x: Any, *, scan: bool = True) -> np.ndarray:
        """x as a float array [B, N, C] of the model's dtype, its shape checked (B, N >= 1, C =
        ``input_dim``, N = the input grid's size with ``input_fourier``); not its range.
        ``scan=False``: NaN and infinity are left to the caller's own pass (as
        :func:`~perceiver_np.shapes.as_real_input`'s)."""
        cfg = self.config
        x = as_real_input("x", x, cfg.np_dtype, scan=scan)
        if x.ndim != 3:
            raise ValueError(f"x: expected shape [B, N, C] with C = {cfg.input_dim}, got {x.shape}")
        expect_shape("x", x, (None, None, cfg.input_dim), "[B, N, C]")
        b, n, _ = x.shape
        if b == 0 or n == 0:
            raise ValueError(f"x: expected B >= 1 and N >= 1, got shape {x.shape}")
        if self.input_positions is not None and n != self.input_positions.shape[0]:
            raise ValueError(f"x: input_index_dims={cfg.input_index_dims} makes N = "
                             f"{self.input_positions.shape[0]} positions (the grid flattened in "
                             f"row-major order), got shape {x.shape}")
        return x

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x: Any,
        mask: Any = None,
        training: bool = False,
        rng: np.random.Generator | None = None,
        *,
        queries: Any = None,
        query_mask: Any = None,
        record: Record = None,
    ) -> tuple[np.ndarray, ModelCache]:
        """x: [B, N, C], mask: [B, N] bool -> (y, cache); y as in :meth:`__call__`.

        With ``training=True`` dropout is active and draws from ``rng`` (a
        ``numpy.random.Generator``, required whenever a dropout rate is non-zero).
        ``queries`` [B, O, Cq]: the output queries, with ``query_source="given"`` (only then).
        ``query_mask`` [B, O] bool (query decoder): with ``query_masking="output"`` (the
        default) False outputs are exactly 0, and so is everything's gradient through them; with
        ``query_masking="attention"`` (DeepMind's ``query_mask``) a False query attends to
        nothing and the rest of the decoder still runs on it (its output is not 0). ``record``
        (a dict) receives every intermediate activation under a stable name
        (:func:`perceiver_np.verify.golden_names` lists them in forward order); the plain
        attention path records scores and probabilities too, the kernel does not.
        """
        cfg, p = self.config, self.checked_params()
        x, mask = self._check_input(x, mask, p)
        b, n, _ = x.shape
        if training and (cfg.dropout > 0 or cfg.attention_dropout > 0):
            if not isinstance(rng, np.random.Generator):
                raise ValueError(
                    "rng: training with dropout needs a numpy.random.Generator, "
                    f"got {type(rng).__name__}"
                )

        # an overflow shows as the named error of expect_finite_output below, not as numpy's warning
        with np.errstate(over="ignore", invalid="ignore"):
            ops = layer_ops(cfg, "model", training)  # the input projection's and final LayerNorm's
            input_proj = None
            tap(record, "input", x)
            x_in = self.encoder_input(x)  # [B, N, C] -> [B, N, C + P] (input_fourier; else x)
            h = x_in
            if cfg.input_projection:
                h, input_proj = ops.linear_forward(
                    x_in, params_under(p, "input_proj")
                )  # [B, N, C + P] -> [B, N, D]
                tap(record, "input_proj.out", h)
            names = step_names(cfg)
            z = np.broadcast_to(p["latents"], (b, *p["latents"].shape))  # [M, D] -> [B, M, D]
            steps: list[CrossBlockCache | SelfBlockCache] = []
            for (kind, i), step_name in zip(cfg.schedule, names, strict=True):
                if kind == "cross":
                    z, cross = cross_block_forward(
                        z, h, params_under(p, f"cross.{i}"), num_heads=cfg.cross_num_heads, mask=mask,
                        use_query_residual=cfg.use_query_residual, gelu=cfg.gelu,
                        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                        training=training, rng=rng, masked_rows=cfg.masked_rows, ffn_kind=cfg.ffn_kind,
                        record=record, name=step_name, ops=layer_ops(cfg, "cross", training),
                    )  # [B, M, D] x [B, N, Ckv] -> [B, M, D]
                    steps.append(cross)
                else:
                    z, self_ = self_block_forward(
                        z, params_under(p, f"self.{i}"), num_heads=cfg.num_heads, gelu=cfg.gelu,
                        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                        training=training, rng=rng, ffn_kind=cfg.ffn_kind, record=record,
                        name=step_name, ops=layer_ops(cfg, "self", training),
                    )  # [B, M, D] -> [B, M, D]
                    steps.append(self_)
                expect_finite_output(f"{step_name} output", z)
            final_norm = None
            if cfg.final_norm:
                z, final_norm = ops.layernorm_forward(z, params_under(p, "final_norm"))
                tap(record, "final_norm.out", z)
            y, head = self.decode(z, queries=queries, query_mask=query_mask, training=training,
                                  rng=rng, record=record)
        return y, ModelCache(self._token, tuple(p.values()), ops, (b, n, cfg.input_dim), input_proj,
                             tuple(steps), final_norm, head)

    def decode(
        self,
        z: np.ndarray,
        *,
        queries: Any = None,
        query_mask: Any = None,
        training: bool = False,
        rng: np.random.Generator | None = None,
        record: Record = None,
    ) -> tuple[np.ndarray, MeanPoolCache | DecoderCache | PoolLinearCache | None]:
        """The output head on the final (normed) latents z [B, M, D]: the mean pool, the
        latents themselves, or a decoder. -> (y, its cache)."""
        cfg, p = self.config, self.params
        b = z.shape[0]
        head: MeanPoolCache | DecoderCache | PoolLinearCache | None
        if cfg.decoder in ("pool", "latents", "pool_linear"):
            if queries is not None or query_mask is not None:
                raise ValueError(f"queries, query_mask: decoder {cfg.decoder!r} has no output queries")
            if cfg.decoder == "pool":
                y, head = mean_pool_forward(z)  # [B, M, D] -> [B, D]
            elif cfg.decoder == "pool_linear":
                ops = layer_ops(cfg, "model", training)
                pooled, pool = mean_pool_forward(z)  # [B, M, D] -> [B, D]
                tap(record, "decoder.pool.out", pooled)
                normed, norm = ops.layernorm_forward(pooled, params_under(p, "decoder.norm"))
                tap(record, "decoder.norm.out", normed)
                y, output = ops.linear_forward(
                    normed, params_under(p, "decoder.output"))  # [B, D] -> [B, out]
                head = PoolLinearCache(pool, norm, output)
            else:
                y, head = z, None  # the latents themselves (Hugging Face's last_hidden_state)
        else:
            q = self._queries(b, queries)  # [B, O, Cq]
            qmask = None
            if query_mask is not None:
                if cfg.decoder != "query":
                    raise ValueError("query_mask: only the query decoder has several outputs")
                qmask = as_mask(query_mask, b, q.shape[1], name="query_mask", letters="[B, O]")
            attention_only = qmask is not None and cfg.query_masking == "attention"
            u, block = cross_block_forward(
                q, z, params_under(p, "decoder"), num_heads=cfg.decoder_heads,
                query_mask=qmask if attention_only else None,
                use_query_residual=cfg.decoder_query_residual, gelu=cfg.gelu,
                dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                training=training, rng=rng, ffn_kind=cfg.ffn_kind, ffn=cfg.decoder_ffn,
                record=record, name="decoder", ops=layer_ops(cfg, "cross", training),
            )  # [B, O, Cq] x [B, M, D] -> [B, O, Cq]
            output = None
            y = u
            if cfg.decoder_output:
                y, output = layer_ops(cfg, "model", training).linear_forward(
                    u, params_under(p, "decoder.output")
                )  # [B, O, Cq] -> [B, O, out]
            if attention_only:
                qmask = None  # DeepMind's query_mask: applied inside the attention only
            if qmask is not None:
                y = y * qmask[..., None]
            if cfg.decoder == "classification":
                y = y[:, 0]  # [B, 1, out] -> [B, out]
            head = DecoderCache(block, output, qmask, q.shape)
        expect_finite_output("output", y)
        tap(record, "output", y)
        return y, head

    def encode_stream(
        self, chunks: Any, mask_chunks: Any = None, *, chunk_size: int | None = None
    ) -> np.ndarray:
        """Inference over an input streamed in chunks, never held whole (perceiver_np.stream);
        ``chunk_size`` cuts an array source (default ``stream.STREAM_CHUNK_POSITIONS`` positions)."""
        chunk_size = stream.STREAM_CHUNK_POSITIONS if chunk_size is None else chunk_size
        return stream.encode_stream(self, chunks, mask_chunks, chunk_size=chunk_size)

    def _queries(self, batch: int, queries: Any) -> np.ndarray:
        """The output queries broadcast over the batch: [B, O, Cq]."""
        cfg = self.config
        if cfg.decoder == "query" and cfg.query_source == "given":
            if queries is None:
                raise ValueError("queries: query_source='given' needs queries [B, O, Cq] in every call")
            q = as_real_input("queries", queries, cfg.np_dtype)
            expect_shape("queries", q, (batch, None, cfg.decoder_query_channels), "[B, O, Cq]")
            if q.shape[1] == 0:
                raise ValueError(f"queries: expected O >= 1, got shape {q.shape}")
            top = float(max(np.max(q), -np.min(q)))
            expect_in_range("queries", q, top, engine.overflow_limit(cfg.np_dtype, q.shape[2]),
                            "the queries' LayerNorm input")
            return q
        if queries is not None:
            raise ValueError(f"queries: query_source={cfg.query_source!r} makes its own queries; "
                             "pass queries only with query_source='given'")
        fixed = self.params["decoder.queries"] if self.fixed_queries is None else self.fixed_queries
        return np.broadcast_to(fixed, (batch, *fixed.shape))  # [O, Cq] -> [B, O, Cq]

    # ---- backward ---------------------------------------------------------------------------

    def backward(self, dy: Any, cache: ModelCache) -> tuple[Params, np.ndarray]:
        """dy: shaped like the forward's y -> (grads keyed exactly like ``params``, dx [B, N, C]).

        Gradients of a self block used several times (``num_blocks > 1``) sum over its uses;
        the input gradient sums over every cross block reading it; trainable output queries
        sum over the batch. (Caller-supplied queries get no gradient back.)
        """
        grads, dx = self._backward(dy, cache, input_grad=True)
        assert dx is not None
        return grads, dx

    def param_grads(self, dy: Any, cache: ModelCache) -> Params:
        """:meth:`backward`'s grads without dx: what a training step needs (its input is data).
        The same arrays' values, one product fewer: the input projection's [B, N, D] @ [D, C]."""
        return self._backward(dy, cache, input_grad=False)[0]

    def _backward(self, dy: Any, cache: ModelCache, *, input_grad: bool) -> tuple[Params, np.ndarray | None]:
        """:meth:`backward`; dx is None when not ``input_grad``."""
        cfg = self.config
        if not isinstance(cache, ModelCache):
            raise TypeError("cache: expected the ModelCache of this model's forward, got "
                            f"{type(cache).__name__}")
        if cache.owner is not self._token:
            raise ValueError("cache: made by the forward of another Perceiver; backward needs the cache of "
                             "this model's own forward")
        p = self.checked_params()
        changed = [k for k, a, b in zip(p, p.values(), cache.params_used, strict=True) if a is not b]
        if changed:
            raise ValueError(f"cache: params[{changed[0]!r}] was replaced after the forward that made this "
                             f"cache ({len(changed)} parameter(s) changed); run forward again")
        b, n, _ = cache.x_shape
        dy = as_real_input("dy", dy, cfg.np_dtype)
        grads: Params = {name: np.zeros_like(v) for name, v in p.items()}

        if cache.head is None:
            expect_shape("dy", dy, (b, cfg.num_latents, cfg.latent_dim), "[B, M, D]")
            dz = dy
        elif isinstance(cache.head, MeanPoolCache):
            expect_shape("dy", dy, (b, cfg.latent_dim), "[B, D]")
            # in the forward pass this was y = mean_M(z)
            dz, _ = mean_pool_backward(dy, cache.head)  # [B, D] -> [B, M, D]
        elif isinstance(cache.head, PoolLinearCache):
            expect_shape("dy", dy, (b, cfg.output_dim), "[B, out]")
            # in the forward pass this was y = LN(mean_M(z)) @ W_out + b_out
            dnormed, g = cache.ops.linear_backward(dy, cache.head.output)  # [B, out] -> [B, D]
            _accumulate(grads, prefixed(g, "decoder.output"))
            dpooled, g = cache.ops.layernorm_backward(dnormed, cache.head.norm)
            _accumulate(grads, prefixed(g, "decoder.norm"))
            dz, _ = mean_pool_backward(dpooled, cache.head.pool)  # [B, D] -> [B, M, D]
        else:
            dz = self._decoder_backward(dy, cache.head, grads, cache.ops)
        if cache.final_norm is not None:
            dz, g = cache.ops.layernorm_backward(dz, cache.final_norm)
            _accumulate(grads, prefixed(g, "final_norm"))
        d_h: np.ndarray | None = None  # gradient of h [B, N, Ckv]
        for (kind, i), step in zip(reversed(cfg.schedule), reversed(cache.steps), strict=True):
            if kind == "cross":
                assert isinstance(step, CrossBlockCache)
                (dz, d_h_i), g = cross_block_backward(dz, step)
                d_h = d_h_i if d_h is None else d_h + d_h_i  # every cross block read the same h
                _accumulate(grads, prefixed(g, f"cross.{i}"))
            else:
                assert isinstance(step, SelfBlockCache)
                dz, g = self_block_backward(dz, step)
                _accumulate(grads, prefixed(g, f"self.{i}"))  # shared repeats add up
        # in the forward pass this was z = broadcast(latents) over the batch
        grads["latents"] += dz.sum(axis=0)  # [B, M, D] -> [M, D]
        assert d_h is not None  # every schedule has a cross block
        expect_shape("d_h", d_h, (b, n, cfg.kv_channels), "[B, N, Ckv]")
        if not input_grad:  # the weights' half of the input projection's backward only
            if cache.input_proj is not None:
                _accumulate(grads, prefixed(cache.ops.linear_grads(d_h, cache.input_proj), "input_proj"))
            return grads, None
        if cache.input_proj is not None:
            dx, g = cache.ops.linear_backward(d_h, cache.input_proj)  # [B, N, D] -> [B, N, C + P]
            _accumulate(grads, prefixed(g, "input_proj"))
        else:
            dx = d_h
        # in the forward pass this was x_in = [x, pos]: the positions are constants
        return grads, dx[..., : cfg.input_dim]  # [B, N, C + P] -> [B, N, C]

    def _decoder_backward(self, dy: np.ndarray, cache: DecoderCache, grads: Params,
                          ops: LayerOps) -> np.ndarray:
        """dy: [B, out] or [B, O, out] -> dz [B, M, D], the gradient of the (normed) latents."""
        cfg = self.config
        b, o, _ = cache.queries_shape
        if cfg.decoder == "classification":
            expect_shape("dy", dy, (b, cfg.output_dim), "[B, out]")
            dy = dy[:, None, :]  # in the forward pass this was y = y[:, 0]: [B, out] -> [B, 1, out]
        else:
            expect_shape("dy", dy, (b, o, cfg.output_width), "[B, O, out]")
        if cache.query_mask is not None:
            dy = dy * cache.query_mask[..., None]  # masked outputs were set to 0
        du = dy
        if cache.output is not None:
            du, g = ops.linear_backward(dy, cache.output)  # [B, O, out] -> [B, O, Cq]
            _accumulate(grads, prefixed(g, "decoder.output"))
        (dq, dz), g = cross_block_backward(du, cache.block)
        _accumulate(grads, prefixed(g, "decoder"))
        if "decoder.queries" in grads:
            grads["decoder.queries"] += dq.sum(axis=0)  # broadcast over the batch: [B, O, Cq] -> [O, Cq]
        return dz

    # ---- description ------------------------------------------------------------------------

    @property
    def param_count(self) -> int:
        return sum(v.size for v in self.params.values())

    def summary(self) -> str:
        """Options, parameters per block, the block schedule and the output shape, as text."""
        cfg = self.config
        lines = ["Perceiver (perceiver_np)", "options:"]
        for field in cfg.__dataclass_fields__:
            lines.append(f"  {field:<24}{getattr(cfg, field)!r}")
        lines.append("parameters:")
        rows = []
        if cfg.input_projection:
            rows.append(("input_proj", _count(self.params, "input_proj.")))
        rows.append(("latents", self.params["latents"].size))
        cross_n = sum(math.prod(s) for s in cross_block_shapes(cfg).values())
        self_n = sum(math.prod(s) for s in self_block_shapes(cfg).values())
        rows += [(f"cross.{i}", cross_n) for i in range(cfg.num_cross_layers)]
        rows += [(f"self.{j}", self_n) for j in range(cfg.num_layers)]
        if cfg.final_norm:
            rows.append(("final_norm", _count(self.params, "final_norm.")))
        if cfg.decoder not in ("pool", "latents"):
            rows.append(("decoder", _count(self.params, "decoder.")))
        for name, count in rows:
            lines.append(f"  {name:<24}{count:>12,}")
        lines.append(f"  {'total':<24}{self.param_count:>12,}")
        lines.append("schedule: " + " -> ".join(f"{k}.{i}" for k, i in cfg.schedule))
        lines.append(f"output:   {output_shape(cfg)} from x [B, N, {cfg.input_dim}]")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Perceiver({self.config!r}, params={self.param_count:,})"


def output_shape(cfg: PerceiverConfig) -> str:
    """The output's shape in the shape vocabulary, e.g. ``[B, 256]`` or ``[B, O, 3]``."""
    if cfg.decoder == "latents":
        return f"[B, {cfg.num_latents}, {cfg.latent_dim}]"
    if cfg.decoder == "query":
        return f"[B, {cfg.decoder_queries or 'O'}, {cfg.output_width}]"
    return f"[B, {cfg.output_width}]"


def step_names(cfg: PerceiverConfig) -> list[str]:
    """The recorded name of every step of ``cfg.schedule``: ``cross.{i}``, ``self.{j}``, and
    ``{kind}.{i}.use{u}`` for the u-th use of a block the schedule runs more than once (a shared
    self block with ``num_blocks > 1``, or any block ``block_order`` repeats)."""
    schedule = cfg.schedule
    total: dict[tuple[str, int], int] = {}
    for step in schedule:
        total[step] = total.get(step, 0) + 1
    uses: dict[tuple[str, int], int] = {}
    names = []
    for kind, i in schedule:
        if total[(kind, i)] == 1:
            names.append(f"{kind}.{i}")
        else:
            names.append(f"{kind}.{i}.use{uses.get((kind, i), 0)}")
            uses[(kind, i)] = uses.get((kind, i), 0) + 1
    return names


def _accumulate(total: Params, part: Params) -> None:
    for name, g in part.items():
        total[name] += g


def _count(params: Params, prefix: str) -> int:
    return sum(v.size for k, v in params.items() if k.startswith(prefix))


def build(**opts: Any) -> Perceiver:
    """Build a Perceiver from Edifice's options (``input_dim`` required) and the extended ones.

    >>> model = build(input_dim=287)              # the seed configuration, float32
    >>> model.param_count
    4039936
    """
    return Perceiver(make_config(**opts))
