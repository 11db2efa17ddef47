"""Hugging Face's published Perceivers (the ``PerceiverFor*`` classes), forward and backward.

::

    model = perceiver_np.from_pretrained("path/to/save_pretrained-dir")   # no torch needed
    logits = model(inputs, mask)          # inputs as the HF class's forward(inputs=...) takes them

A published Perceiver is the encoder of :mod:`perceiver_np.model` with three pieces around it::

    x, x_raw = preprocessor(inputs)       inputs -> [B, N, C] (x_raw: the features before positions)
    z = encoder(x, mask)                  [B, N, C] -> [B, M, D]   (a Perceiver, decoder="latents")
    y = decoder(z, x, x_raw)              [B, M, D] -> [B, O, out] (cross-attention from queries)
    logits = postprocessor(y)             (the tied embedding decoder of the language model)

Each piece follows the layers' contract: ``forward -> (y, cache)`` and ``backward(dy, cache) ->
(d_inputs, grads)``, built from the layers of :mod:`perceiver_np.prep_layers`,
:mod:`perceiver_np.position` and :mod:`perceiver_np.blocks`. ``model.params`` is one flat
dict: the encoder's names (``latents``, ``cross.0.*``, ``self.*``, as every Perceiver here) and
``preprocessor.*``, ``decoder.*``, ``postprocessor.*``; ``model.buffers`` holds what is not
trained (batch norm's running statistics). :func:`hf_names` maps every name to the HF key.

Every structure is what the HF class builds from its config (``transformers`` 5.x,
``modeling_perceiver.py``); docs/pretrained.md lists each class and its pieces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import engine, interop
from . import prep_layers as pl
from .backends import engine_ops
from .blocks import CrossBlockCache, cross_block_backward, cross_block_forward
from .config import PerceiverConfig, make_config, param_shapes
from .hf_files import read_pretrained_dir
from .hf_specs import HF_PREFIX, ParamSpec, _cross_specs, _linear_specs, decoder_ops
from .interop import (
    HF_CONFIG_DEFAULTS,
    InteropError,
    _as_param,
    _check_keys,
    _hf_num_labels,
    _hf_options,
    _int,
    hf_name_map,
)
from .layers import (
    LinearCache,
    Params,
    Record,
    linear_backward,
    linear_forward,
    params_under,
    tap,
)
from .model import ModelCache, Perceiver
from .multimodal import structure as multimodal_structure
from .position import (
    PositionCache,
    add_position_encoding,
    add_position_encoding_backward,
    fourier_channels,
    shared_fourier_position_encoding,
)
from .shapes import as_mask, as_real_input, expect_finite_output, expect_shape, first_nonfinite
from .workspace import Alloc, StepArena, scoped

#: ``transformers.PerceiverConfig``'s defaults of the fields the ``PerceiverFor*`` classes read
#: besides the encoder's (:data:`perceiver_np.interop.HF_CONFIG_DEFAULTS`).
HF_TASK_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262, "max_position_embeddings": 2048, "image_size": 56,
    "train_size": [368, 496], "num_frames": 16, "audio_samples_per_frame": 1920,
    "samples_per_patch": 16, "output_shape": [1, 16, 224, 224], "output_num_channels": 512,
    "_label_trainable_num_channels": 1024, "d_model": 768,
}
#: HF's ``PerceiverForOpticalFlow`` divides the decoded flow by this (``rescale_factor``).
FLOW_RESCALE = 100.0


# ---------------------------------------------------------------------------------------------
# Preprocessors: inputs -> x [B, N, C] (and x_raw, the features before positions)
# ---------------------------------------------------------------------------------------------


class TextCache(NamedTuple):
    embedding: pl.EmbeddingCache  # ids [B, N]
    n: int  # N, the positions used


class TextPreprocessor:
    """HF's ``PerceiverTextPreprocessor``: ``x = E[ids] + P[:N]``; ids [B, N] -> x [B, N, C]."""

    def __init__(self, vocab: int, max_positions: int, width: int) -> None:
        self.vocab, self.max_positions, self.num_channels = vocab, max_positions, width
        pre = HF_PREFIX + "input_preprocessor"
        self.specs = {
            "preprocessor.embeddings.weight": ParamSpec((vocab, width), f"{pre}.embeddings.weight", False),
            "preprocessor.position_embeddings.weight": ParamSpec(
                (max_positions, width), f"{pre}.position_embeddings.weight", False),
        }
        self.buffer_specs: dict[str, ParamSpec] = {}

    def check(self, inputs: Any, dtype: np.dtype) -> np.ndarray:
        """inputs -> int ids [B, N], or a clear error."""
        ids = np.asarray(inputs)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"inputs: expected integer token ids [B, N], got dtype {ids.dtype.name}")
        if ids.ndim != 2 or ids.shape[0] == 0 or not 1 <= ids.shape[1] <= self.max_positions:
            raise ValueError(f"inputs: expected token ids [B, N] with B >= 1 and 1 <= N <= "
                             f"max_position_embeddings = {self.max_positions}, got shape {ids.shape}")
        return ids

    def forward(self, ids: np.ndarray, p: Params, buffers: Params, record: Record = None
                ) -> tuple[np.ndarray, np.ndarray, TextCache]:
        n = ids.shape[1]
        table = {"weight": p["preprocessor.embeddings.weight"]}
        e, emb = pl.embedding_forward(ids, table)  # [B, N] -> [B, N, C]
        x = e + p["preprocessor.position_embeddings.weight"][:n]  # [B, N, C] + [N, C] -> [B, N, C]
        tap(record, "preprocessor.out", x)
        return x, e, TextCache(emb, n)

    def backward(self, dx: np.ndarray, dx_raw: np.ndarray | None, cache: TextCache) -> Params:
        """dx [B, N, C], dx_raw [B, N, C] (the context E[ids]) or None -> grads."""
        # in the forward pass this was x = e + P[:N] (P broadcast over the batch)
        dpos = np.zeros((self.max_positions, self.num_channels), dtype=dx.dtype)
        dpos[:cache.n] = dx.sum(axis=0)  # [B, N, C] -> [N, C]
        de = dx if dx_raw is None else dx + dx_raw
        # in the forward pass this was e = E[ids]
        _, g = pl.embedding_backward(de, cache.embedding)
        return {"preprocessor.embeddings.weight": g["weight"],
                "preprocessor.position_embeddings.weight": dpos}


class ImageCache(NamedTuple):
    stages: tuple[tuple[str, Any], ...]  # (layer name, its cache), in forward order
    grid: tuple[int, ...]  # the index dims of the features (H', W')
    features: int  # c, the channels before positions
    position: PositionCache
    projection: LinearCache | None  # trainable positions [N, Cp] through positions_projection


class ImagePreprocessor:
    """HF's ``PerceiverImagePreprocessor`` for the published image models:

    - ``"conv1x1"`` (vision-perceiver-learned): a 1x1 conv to ``out_channels``, then trainable
      positions through ``positions_projection`` (a Linear), concatenated;
    - ``"pixels"`` (vision-perceiver-fourier): the pixels themselves and Fourier positions;
    - ``"conv"`` (vision-perceiver-conv): conv 7x7/2 without bias, batch norm (running
      statistics), ReLU, max pool 3x3/2, and Fourier positions;
    - ``"patches"`` (optical-flow-perceiver): two frames [B, 2, 3, H, W] cut into 3x3 patches
      (or HF's already-cut [B, 2, 27, H, W]), frames stacked on channels (space-to-depth in
      time), a Linear to ``out_channels``, and Fourier positions.

    pixel_values [B, 3, H, W] -> x [B, H'W', C], x_raw [B, H'W', c].
    """

    def __init__(self, prep_type: str, *, in_channels: int = 3, out_channels: int = 64,
                 spatial_downsample: int = 1, image_size: int | None = None,
                 fourier: Mapping[str, Any] | None = None, trainable_positions: int | None = None,
                 project_pos_dim: int = -1, frames: int = 1) -> None:
        self.prep_type, self.in_channels, self.out_channels = prep_type, in_channels, out_channels
        self.spatial_downsample, self.image_size, self.frames = spatial_downsample, image_size, frames
        self.fourier = None if fourier is None else dict(fourier)
        self.trainable_positions = trainable_positions
        pre = HF_PREFIX + "input_preprocessor"
        specs: dict[str, ParamSpec] = {}
        buffers: dict[str, ParamSpec] = {}
        if prep_type == "conv1x1":
            specs["preprocessor.conv.weight"] = ParamSpec((out_channels, in_channels, 1, 1),
                                                          f"{pre}.convnet_1x1.weight", False)
            specs["preprocessor.conv.bias"] = ParamSpec((out_channels,), f"{pre}.convnet_1x1.bias", False)
            c = out_channels
        elif prep_type == "conv":
            specs["preprocessor.conv.weight"] = ParamSpec((out_channels, in_channels, 7, 7),
                                                          f"{pre}.convnet.conv.weight", False)
            for k in ("weight", "bias"):
                specs[f"preprocessor.batchnorm.{k}"] = ParamSpec(
                    (out_channels,), f"{pre}.convnet.batchnorm.{k}", False)
            for k in ("running_mean", "running_var"):
                buffers[f"preprocessor.batchnorm.{k}"] = ParamSpec((out_channels,),
                                                                   f"{pre}.convnet.batchnorm.{k}", False)
            c = out_channels
        elif prep_type == "pixels":
            c = in_channels
        elif prep_type == "patches":
            specs.update(_linear_specs("preprocessor.conv_after_patches", f"{pre}.conv_after_patches",
                                       in_channels * 9 * frames, out_channels))
            c = out_channels
        else:
            raise InteropError(f"prep_type: {prep_type!r} is not one the published models use")
        if trainable_positions is not None:
            cp = out_channels
            specs["preprocessor.position_embeddings"] = ParamSpec(
                (trainable_positions, cp), f"{pre}.position_embeddings.position_embeddings", False)
            if project_pos_dim > 0:
                specs.update(_linear_specs("preprocessor.positions_projection", f"{pre}.positions_projection",
                                           cp, project_pos_dim))
                cp = project_pos_dim
        else:
            assert self.fourier is not None
            cp = fourier_channels(len(self.fourier["max_resolution"]), self.fourier["num_bands"],
                                  self.fourier["concat_pos"], self.fourier["sine_only"])
        self.features, self.num_channels = c, c + cp
        self.specs, self.buffer_specs = specs, buffers

    def check(self, inputs: Any, dtype: np.dtype) -> np.ndarray:
        """inputs -> finite pixel values of ``dtype``, or a clear error."""
        arr = np.asarray(inputs)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"inputs: expected real pixel values, got dtype {arr.dtype.name}")
        if self.prep_type == "patches":
            if arr.ndim != 5 or arr.shape[1] != self.frames or arr.shape[2] not in (self.in_channels,
                                                                                   9 * self.in_channels):
                raise ValueError(f"inputs: expected frames [B, {self.frames}, {self.in_channels}, H, W] (or "
                                 f"their 3x3 patches [B, {self.frames}, {9 * self.in_channels}, H, W]), "
                                 f"got shape {arr.shape}")
        elif arr.ndim != 4 or arr.shape[1] != self.in_channels:
            raise ValueError(f"inputs: expected pixel values [B, {self.in_channels}, H, W], "
                             f"got shape {arr.shape}")
        if arr.shape[0] == 0 or 0 in arr.shape[-2:]:
            raise ValueError(f"inputs: expected a non-empty batch of images, got shape {arr.shape}")
        return as_real_input("inputs", arr, dtype)

    def forward(self, px: np.ndarray, p: Params, buffers: Params, record: Record = None
                ) -> tuple[np.ndarray, np.ndarray, ImageCache]:
        stages: list[tuple[str, Any]] = []
        c: Any  # each stage's cache
        if self.prep_type == "conv1x1":
            f, c = pl.conv2d_forward(px, params_under(p, "preprocessor.conv"),
                                     stride=(self.spatial_downsample,) * 2)  # [B, 3, H, W] -> [B, c, H, W]
            stages.append(("conv", c))
        elif self.prep_type == "conv":
            f, c = pl.conv2d_forward(px, params_under(p, "preprocessor.conv"), stride=(2, 2),
                                     padding=pl.same_padding((7, 7)))  # [B, 3, H, W] -> [B, c, H/2, W/2]
            stages.append(("conv", c))
            f, c = pl.batchnorm_forward(f, params_under(p, "preprocessor.batchnorm"),
                                        running_mean=buffers["preprocessor.batchnorm.running_mean"],
                                        running_var=buffers["preprocessor.batchnorm.running_var"])
            stages.append(("batchnorm", c))
            f, c = pl.relu_forward(f)
            stages.append(("relu", c))
            f, c = pl.maxpool2d_forward(f, kernel=(3, 3), stride=(2, 2))  # -> [B, c, H', W']
            stages.append(("maxpool", c))
        elif self.prep_type == "pixels":
            f, c = pl.subsample_pixels_forward(px, spatial=self.spatial_downsample)
            stages.append(("subsample", c))
        if self.prep_type != "patches":
            f = np.ascontiguousarray(f.transpose(0, 2, 3, 1))  # [B, c, H', W'] -> [B, H', W', c]
        else:
            b, t, ch, hh, ww = px.shape
            f = px
            if ch == self.in_channels:
                f, c = pl.extract_patches_forward(px.reshape(b * t, ch, hh, ww), size=3)
                stages.append(("patches", c))
                f = f.reshape(b, t, 9 * ch, hh, ww)  # [B*T, 9c, H, W] -> [B, T, 9c, H, W]
            f, c = pl.space_to_depth_forward(f, temporal_block=t, spatial_block=1)  # -> [B, 1, H, W, T*9c]
            stages.append(("space_to_depth", c))
            f = f[:, 0]  # [B, 1, H, W, T*9c] -> [B, H, W, T*9c]
            f, c = linear_forward(f, params_under(p, "preprocessor.conv_after_patches"))  # -> [B, H, W, c]
            stages.append(("conv_after_patches", c))
        b, grid = f.shape[0], tuple(int(s) for s in f.shape[1:3])
        x_raw = f.reshape(b, math.prod(grid), f.shape[3])  # [B, H', W', c] -> [B, N, c]
        projection = None
        if self.trainable_positions is not None:
            pos = p["preprocessor.position_embeddings"]  # [N, Cp]
            expect_shape("preprocessor.position_embeddings", pos, (x_raw.shape[1], None), "[N, Cp]")
            if "preprocessor.positions_projection.weight" in p:
                pos, projection = linear_forward(pos, params_under(p, "preprocessor.positions_projection"))
        else:
            assert self.fourier is not None
            pos = shared_fourier_position_encoding(grid, self.fourier["num_bands"],
                                                   max_resolution=self.fourier["max_resolution"],
                                                   concat_pos=self.fourier["concat_pos"],
                                                   sine_only=self.fourier["sine_only"], dtype=px.dtype)
        x, position = add_position_encoding(x_raw, pos, "concat")  # [B, N, c] ++ [N, Cp] -> [B, N, C]
        tap(record, "preprocessor.out", x)
        return x, x_raw, ImageCache(tuple(stages), grid, x_raw.shape[2], position, projection)

    def backward(self, dx: np.ndarray, dx_raw: np.ndarray | None, cache: ImageCache) -> Params:
        grads: Params = {}
        # in the forward pass this was x = concat(x_raw, pos)
        if self.trainable_positions is not None:
            dpos = dx[..., cache.features:].sum(axis=0)  # [B, N, Cp] -> [N, Cp]
            if cache.projection is not None:
                dpos, g = linear_backward(dpos, cache.projection)
                grads.update({f"preprocessor.positions_projection.{k}": v for k, v in g.items()})
            grads["preprocessor.position_embeddings"] = dpos
        d_raw, _ = add_position_encoding_backward(dx, cache.position)
        if dx_raw is not None:
            d_raw = d_raw + dx_raw
        b = d_raw.shape[0]
        df = d_raw.reshape(b, *cache.grid, cache.features)  # [B, N, c] -> [B, H', W', c]
        if self.prep_type != "patches":
            df = np.ascontiguousarray(df.transpose(0, 3, 1, 2))  # [B, H', W', c] -> [B, c, H', W']
        backward: dict[str, Callable[[np.ndarray, Any], tuple[Any, Params]]] = {
            "conv": pl.conv2d_backward, "batchnorm": pl.batchnorm_backward, "relu": pl.relu_backward,
                    "maxpool": pl.maxpool2d_backward, "subsample": pl.subsample_pixels_backward,
                    "patches": pl.extract_patches_backward, "space_to_depth": pl.space_to_depth_backward,
                    "conv_after_patches": linear_backward}
        for name, c in reversed(cache.stages):
            if name == "space_to_depth":
                df = df[:, None]  # in the forward pass this was f[:, 0]
            elif name == "patches":
                df = df.reshape(-1, *df.shape[2:])  # [B, T, 9c, H, W] -> [B*T, 9c, H, W]
            df, g = backward[name](df, c)
            prefix = {"conv": "preprocessor.conv", "batchnorm": "preprocessor.batchnorm",
                      "conv_after_patches": "preprocessor.conv_after_patches"}.get(name)
            if prefix is not None:
                grads.update({f"{prefix}.{k}": v for k, v in g.items()})
        return grads


# ---------------------------------------------------------------------------------------------
# Decoders: z [B, M, D] -> y
# ---------------------------------------------------------------------------------------------


class DecoderCache(NamedTuple):
    batch: int
    block: CrossBlockCache  # queries [B, O, Cq] over the latents [B, M, D]
    output: LinearCache | None  # the final Linear [Cq] -> [out]; None without final_project


class BasicDecoder:
    """HF's ``PerceiverBasicDecoder`` (and the classification and optical-flow decoders around
    it): queries [B, O, Cq] cross-attend to the latents, then an optional Linear to ``out``.

    ``queries``: ``"trainable"`` (a learned [O, Cq] table) or ``"inputs"`` (the preprocessed
    input x itself, the optical-flow decoder). ``kind``: ``"basic"`` -> y [B, O, out],
    ``"classification"`` -> y [B, out] (one query), ``"flow"`` -> y [B, H, W, 2] = the output
    divided by :data:`FLOW_RESCALE` on the image grid.
    """

    def __init__(self, kind: str, *, hf: str, queries: str, num_queries: int, q_dim: int, kv_dim: int,
                 qk: int, v: int, heads: int, widening: int, query_residual: bool, out: int | None,
                 grid: tuple[int, ...] = ()) -> None:
        self.kind, self.queries, self.num_queries, self.q_dim = kind, queries, num_queries, q_dim
        self.heads, self.query_residual, self.out, self.grid = heads, query_residual, out, grid
        self.specs = _cross_specs("decoder", f"{hf}.decoding_cross_attention", q_dim, kv_dim, qk, v, widening)
        if queries == "trainable":
            self.specs["decoder.queries"] = ParamSpec(
                (num_queries, q_dim), f"{hf}.output_position_encodings.position_embeddings", False)
        if out is not None:
            self.specs.update(_linear_specs("decoder.output", f"{hf}.final_layer", q_dim, out))
        self.buffer_specs: dict[str, ParamSpec] = {}

    def forward(self, z: np.ndarray, x: np.ndarray, context: Any, p: Params, *, cfg: PerceiverConfig,
                training: bool, rng: np.random.Generator | None, record: Record = None,
                options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, DecoderCache]:
        if options:
            raise ValueError(f"{sorted(options)}: this model's decoder takes no options")
        b = z.shape[0]
        q = self._queries(b, x, p)  # [B, O, Cq]
        tap(record, "decoder.queries", q)
        u, block = cross_block_forward(
            q, z, params_under(p, "decoder"), num_heads=self.heads, use_query_residual=self.query_residual,
            gelu="exact", attention_dropout=cfg.attention_dropout, training=training, rng=rng,
            record=record, name="decoder", ops=decoder_ops(cfg, training),
        )  # [B, O, Cq] x [B, M, D] -> [B, O, Cq]
        output = None
        y = u
        if self.out is not None:
            y, output = linear_forward(u, params_under(p, "decoder.output"))  # [B, O, Cq] -> [B, O, out]
        y = self._shaped(y)
        tap(record, "decoder.out", y)
        return y, DecoderCache(b, block, output)

    def infer(self, z: np.ndarray, x: np.ndarray, p: Params, *, cfg: PerceiverConfig, alloc: Alloc
              ) -> np.ndarray:
        """:meth:`forward` in inference (``model(inputs)``), without a cache: the cross block on
        the inference engine (:func:`perceiver_np.engine.decode_queries`, its intermediates from
        ``alloc``), the output Linear on the engine's product. Tested equal to forward."""
        b = z.shape[0]
        ops = engine_ops(cfg.backend)
        # [B, O, Cq] x [B, M, D] -> [B, O, Cq]
        y = engine.decode_queries(self._queries(b, x, p), z, params_under(p, "decoder"), ops,
                                  num_heads=self.heads, use_query_residual=self.query_residual,
                                  gelu="exact", alloc=scoped(alloc, "decoder"))
        if self.out is not None:
            w = p["decoder.output.weight"]
            # [B, O, Cq] -> [B*O, Cq] -> [B*O, out] -> [B, O, out]
            y = ops.matmul(y.reshape(-1, y.shape[-1]), w).reshape(b, -1, w.shape[1])
            y += p["decoder.output.bias"]
        return self._shaped(y)

    def _queries(self, b: int, x: np.ndarray, p: Params) -> np.ndarray:
        """The decoder's queries [B, O, Cq]: the learned table broadcast over the batch, or the
        preprocessed input x itself (the optical-flow decoder)."""
        if self.queries == "trainable":
            table = p["decoder.queries"]
            return np.broadcast_to(table, (b, *table.shape))  # [O, Cq] -> [B, O, Cq]
        return x  # [B, N, C]

    def _shaped(self, y: np.ndarray) -> np.ndarray:
        """The decoded queries [B, O, out] as the HF class returns them."""
        if self.kind == "classification":
            return y[:, 0]  # [B, 1, out] -> [B, out]
        if self.kind == "flow":
            # [B, H*W, 2] -> [B, H, W, 2]
            return (y / FLOW_RESCALE).reshape(y.shape[0], *self.grid, y.shape[-1])
        return y

    def backward(self, dy: np.ndarray, cache: DecoderCache
                 ) -> tuple[np.ndarray, np.ndarray | None, Any, Params]:
        """-> (dz [B, M, D], dx [B, N, C] (queries from the input) or None, None (no gradient
        of the preprocessor's context), grads)."""
        grads: Params = {}
        b = cache.batch
        if self.kind == "classification":
            dy = dy[:, None, :]  # in the forward pass this was y = y[:, 0]
        elif self.kind == "flow":
            # in the forward pass this was y / rescale, on the grid
            dy = dy.reshape(b, -1, dy.shape[-1]) / FLOW_RESCALE  # [B, H, W, 2] -> [B, H*W, 2]
        du = dy
        if cache.output is not None:
            du, g = linear_backward(dy, cache.output)  # [B, O, out] -> [B, O, Cq]
            grads.update({f"decoder.output.{k}": v for k, v in g.items()})
        (dq, dz), g = cross_block_backward(du, cache.block)
        grads.update({f"decoder.{k}": v for k, v in g.items()})
        if self.queries == "trainable":
            grads["decoder.queries"] = dq.sum(axis=0)  # broadcast over the batch: [B, O, Cq] -> [O, Cq]
            return dz, None, None, grads
        return dz, dq, None, grads


class EmbeddingDecoder:
    """HF's ``PerceiverEmbeddingDecoder`` (the language model's output): logits = y @ E^T + b,
    with E the input embedding table (tied: its gradient adds to the preprocessor's)."""

    def __init__(self, vocab: int) -> None:
        self.specs = {"postprocessor.bias": ParamSpec((vocab,), "embedding_decoder.bias", False)}
        self.buffer_specs: dict[str, ParamSpec] = {}

    def forward(self, y: np.ndarray, context: Any, p: Params, record: Record = None
                ) -> tuple[np.ndarray, Any]:
        logits, cache = pl.embedding_decoder_forward(
            y, {"weight": p["preprocessor.embeddings.weight"], "bias": p["postprocessor.bias"]}
        )  # [B, N, C] -> [B, N, V]
        tap(record, "postprocessor.out", logits)
        return logits, cache

    def backward(self, dlogits: np.ndarray, cache: Any) -> tuple[np.ndarray, Params]:
        dy, g = pl.embedding_decoder_backward(dlogits, cache)
        return dy, {"preprocessor.embeddings.weight": g["weight"], "postprocessor.bias": g["bias"]}


# ---------------------------------------------------------------------------------------------
# The structures of the PerceiverFor* classes
# ---------------------------------------------------------------------------------------------


def _hf_config(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config_dict, Mapping):
        raise InteropError(f"config: expected a mapping (config.json), got {type(config_dict).__name__}")
    return {**HF_TASK_DEFAULTS, **dict(config_dict)}


def _cross_widths(c: Mapping[str, Any], q_dim: int, kv_dim: int, qk: int | None, v: int | None
                  ) -> tuple[int, int]:
    """HF's ``PerceiverAttention`` widths of a cross-attention: qk from the queries or the
    keys (``cross_attention_shape_for_attention``) unless given; v = qk unless given."""
    if qk is None:
        qk = q_dim if c.get("cross_attention_shape_for_attention", "kv") == "q" else kv_dim
    return qk, qk if v is None else v


def _classification(c: Mapping[str, Any]) -> BasicDecoder:
    d = _int("d_latents", c["d_latents"])
    qk, v = _cross_widths(c, d, d, None, None)
    return BasicDecoder("classification", hf=HF_PREFIX + "decoder.decoder", queries="trainable",
                        num_queries=1, q_dim=d, kv_dim=d, qk=qk, v=v, heads=1, widening=1,
                        query_residual=True, out=_hf_num_labels(c))


def _structure(architecture: str, c: dict[str, Any]) -> tuple[Any, BasicDecoder, Any]:
    """(preprocessor, decoder, postprocessor) of an HF class, from its config."""
    d_latents, d_model = _int("d_latents", c["d_latents"]), _int("d_model", c["d_model"])
    if architecture in ("PerceiverForMaskedLM", "PerceiverForSequenceClassification"):
        pre: Any = TextPreprocessor(_int("vocab_size", c["vocab_size"]),
                                    _int("max_position_embeddings", c["max_position_embeddings"]), d_model)
        if architecture == "PerceiverForSequenceClassification":
            return pre, _classification(c), None
        qk, v = 8 * 32, d_model
        dec = BasicDecoder("basic", hf=HF_PREFIX + "decoder", queries="trainable",
                           num_queries=pre.max_positions, q_dim=d_model, kv_dim=d_latents, qk=qk, v=v,
                           heads=8, widening=1, query_residual=False, out=None)
        return pre, dec, EmbeddingDecoder(pre.vocab)
    size = _int("image_size", c["image_size"])
    if architecture == "PerceiverForImageClassificationLearned":
        pre = ImagePreprocessor("conv1x1", out_channels=256, trainable_positions=size * size,
                                project_pos_dim=256)
        return pre, _classification(c), None
    if architecture == "PerceiverForImageClassificationFourier":
        fourier = {"num_bands": 64, "max_resolution": (224, 224), "concat_pos": True, "sine_only": False}
        return ImagePreprocessor("pixels", fourier=fourier), _classification(c), None
    if architecture == "PerceiverForImageClassificationConvProcessing":
        fourier = {"num_bands": 64, "max_resolution": (56, 56), "concat_pos": True, "sine_only": False}
        return ImagePreprocessor("conv", fourier=fourier), _classification(c), None
    if architecture == "PerceiverForOpticalFlow":
        train_size = tuple(_int("train_size", s) for s in c["train_size"])
        fourier = {"num_bands": 64, "max_resolution": train_size, "concat_pos": True, "sine_only": False}
        pre = ImagePreprocessor("patches", out_channels=64, fourier=fourier, frames=2)
        qk, v = _cross_widths(c, pre.num_channels, d_latents, None, None)
        dec = BasicDecoder("flow", hf=HF_PREFIX + "decoder.decoder", queries="inputs",
                           num_queries=math.prod(train_size), q_dim=pre.num_channels, kv_dim=d_latents, qk=qk,
                           v=v, heads=1, widening=1, query_residual=False, out=2, grid=train_size)
        return pre, dec, None
    if architecture == "PerceiverForMultimodalAutoencoding":
        return multimodal_structure(c, num_labels=_hf_num_labels(c))  # type: ignore[return-value]
    raise InteropError(f"architecture: {architecture!r} is not supported; supported: {sorted(ARCHITECTURES)}")


#: The released checkpoints: name on the Hugging Face hub -> (class, the config.json values that
#: differ from ``transformers.PerceiverConfig``'s defaults), as HF's conversion script
#: (``convert_perceiver_haiku_to_pytorch.py``) sets them. ``published_config(name)`` gives the
#: whole config dict; a random model of that structure is what the tests and benchmarks run.
_IMAGENET = {"num_latents": 512, "d_latents": 1024, "num_blocks": 8, "num_self_attends_per_block": 6,
             "num_cross_attention_heads": 1, "num_self_attention_heads": 8, "num_labels": 1000}
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "deepmind/language-perceiver": ("PerceiverForMaskedLM", {"qk_channels": 256, "v_channels": 1280}),
    "deepmind/vision-perceiver-learned": ("PerceiverForImageClassificationLearned", {
        **_IMAGENET, "d_model": 512, "image_size": 224}),
    "deepmind/vision-perceiver-fourier": ("PerceiverForImageClassificationFourier", {
        **_IMAGENET, "d_model": 261}),
    "deepmind/vision-perceiver-conv": ("PerceiverForImageClassificationConvProcessing", {
        **_IMAGENET, "d_model": 322}),
    "deepmind/optical-flow-perceiver": ("PerceiverForOpticalFlow", {
        "num_latents": 2048, "d_latents": 512, "d_model": 322, "num_blocks": 1,
        "num_self_attends_per_block": 24, "num_self_attention_heads": 16, "num_cross_attention_heads": 1}),
    "deepmind/multimodal-perceiver": ("PerceiverForMultimodalAutoencoding", {
        "num_latents": 784, "d_latents": 512, "d_model": 704, "num_blocks": 1,
        "num_self_attends_per_block": 8, "num_self_attention_heads": 8, "num_cross_attention_heads": 1,
        "num_labels": 700}),
}


def published_config(name: str) -> tuple[str, dict[str, Any]]:
    """(architecture, config dict) of a released checkpoint (:data:`PUBLISHED`)."""
    if name not in PUBLISHED:
        raise InteropError(f"name: {name!r} is not a released Perceiver; known: {sorted(PUBLISHED)}")
    arch, changes = PUBLISHED[name]
    return arch, {**HF_CONFIG_DEFAULTS, **HF_TASK_DEFAULTS, **changes, "architectures": [arch]}


ARCHITECTURES = (
    "PerceiverForMaskedLM", "PerceiverForSequenceClassification", "PerceiverForImageClassificationLearned",
    "PerceiverForImageClassificationFourier", "PerceiverForImageClassificationConvProcessing",
    "PerceiverForOpticalFlow", "PerceiverForMultimodalAutoencoding",
)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _layout(architecture: str, config: Mapping[str, Any], dtype: str
            ) -> tuple[dict[str, Any], tuple[Any, Any, Any], PerceiverConfig]:
    """(the full HF config, (preprocessor, decoder, postprocessor), the encoder's config)."""
    if architecture not in ARCHITECTURES:
        raise InteropError(f"architecture: {architecture!r} is not supported; "
                           f"supported: {list(ARCHITECTURES)}")
    hf_config = _hf_config(config)
    pieces = _structure(architecture, hf_config)
    opts = _hf_options(hf_config)
    opts.update(input_dim=pieces[0].num_channels, input_projection=False, decoder="latents", dtype=dtype)
    return hf_config, pieces, make_config(**opts)


def _specs(cfg: PerceiverConfig, pieces: list[Any]) -> dict[str, ParamSpec]:
    """The encoder's parameters (HF names under ``perceiver.``), then the pieces'."""
    hf = {k: HF_PREFIX + v for k, v in hf_name_map(cfg).items()}
    out = {k: ParamSpec(s, hf[k], k.endswith(".weight") and len(s) == 2 and k != "latents")
           for k, s in param_shapes(cfg).items()}
    for piece in pieces:
        out.update(piece.specs)
    return out


class PretrainedCache(NamedTuple):
    owner: object  # the model that made it
    pre: Any  # the preprocessor's cache
    encoder: ModelCache  # x [B, N, C] -> z [B, M, D]
    decoder: DecoderCache
    post: Any  # the postprocessor's cache, or None


class PretrainedPerceiver:
    """A published Perceiver: ``inputs -> logits`` as the HF class ``architecture`` computes
    them (module docstring). Build one with :func:`from_pretrained`, :func:`from_hf` or
    :func:`from_state_dict`; ``model(inputs, mask)`` for inference, ``forward``/``backward``
    for gradients (``grads`` keyed like ``params``)."""

    def __init__(self, architecture: str, config: Mapping[str, Any], params: Params | None = None,
                 buffers: Params | None = None, *, dtype: str = "float32") -> None:
        self.architecture = architecture
        self.hf_config, (self.preprocessor, self.decoder, self.postprocessor), cfg = _layout(
            architecture, config, dtype)
        enc_names = list(param_shapes(cfg))
        if params is None:  # random: the encoder's own initialisation, 0.02 * N(0, 1) elsewhere
            self.encoder = Perceiver(cfg)
            self.params: Params = dict(self.encoder.params)
            rng = np.random.default_rng(cfg.seed)
            for name, spec in self.specs().items():
                if name not in self.params:
                    self.params[name] = (0.02 * rng.standard_normal(spec.shape)).astype(cfg.np_dtype)
        else:
            if not isinstance(params, Mapping):
                raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
            self.params = dict(params)
            missing = [k for k in enc_names if k not in self.params]
            if missing:
                raise ValueError(f"params: missing {missing}")
            self.encoder = Perceiver(cfg, {k: self.params[k] for k in enc_names})
        self.buffers: Params = {
            name: (np.ones if name.endswith("running_var") else np.zeros)(spec.shape, dtype=cfg.np_dtype)
            for name, spec in self.buffer_specs().items()
        } if buffers is None else dict(buffers)
        self._token = object()

    @property
    def config(self) -> PerceiverConfig:
        """The encoder's config (dtype, heads, widths)."""
        return self.encoder.config

    def _pieces(self) -> list[Any]:
        return [x for x in (self.preprocessor, self.decoder, self.postprocessor) if x is not None]

    def specs(self) -> dict[str, ParamSpec]:
        """Every parameter: our name -> (shape, HF key, transposed), the encoder's first."""
        return _specs(self.config, self._pieces())

    def buffer_specs(self) -> dict[str, ParamSpec]:
        out: dict[str, ParamSpec] = {}
        for piece in self._pieces():
            out.update(piece.buffer_specs)
        return out

    def with_params(self, params: Params) -> PretrainedPerceiver:
        """The same architecture, config and buffers with ``params`` (checked at every call)."""
        return PretrainedPerceiver(self.architecture, self.hf_config, params, self.buffers,
                                   dtype=self.config.dtype)

    def step_arena(self) -> StepArena:
        """The calling thread's :class:`~perceiver_np.workspace.StepArena` for
        :func:`perceiver_np.train.train_step`: the encoder's (:meth:`Perceiver.step_arena`)."""
        return self.encoder.step_arena()

    @property
    def param_count(self) -> int:
        return sum(v.size for v in self.params.values())

    def __repr__(self) -> str:
        return (f"PretrainedPerceiver({self.architecture}, {self.param_count:,} parameters, "
                f"{self.config.dtype})")

    def checked_params(self) -> Params:
        """``self.params`` checked (names, shapes, dtype, finite values; the encoder's through
        :func:`perceiver_np.model.check_params` when the encoder runs), in schema order."""
        specs = self.specs()
        missing = [k for k in specs if k not in self.params]
        extra = [k for k in self.params if k not in specs]
        if missing or extra:
            raise ValueError(f"params: missing {missing}, unexpected {extra}")
        for name, spec in specs.items():
            v = self.params[name]
            if not isinstance(v, np.ndarray) or v.shape != spec.shape or v.dtype != self.config.np_dtype:
                got = (v.shape, v.dtype.name) if isinstance(v, np.ndarray) else type(v).__name__
                raise ValueError(f"params[{name!r}]: expected shape {spec.shape} of {self.config.dtype}, "
                                 f"got {got}")
        self.encoder.params = {k: self.params[k] for k in self.encoder.params}
        for name in specs:
            if name not in self.encoder.params:
                problem = first_nonfinite(f"params[{name!r}]", self.params[name])
                if problem is not None:
                    raise ValueError(problem)
        return {k: self.params[k] for k in specs}

    def _inputs(self, inputs: Any, mask: Any) -> tuple[Any, np.ndarray | None]:
        arr = self.preprocessor.check(inputs, self.config.np_dtype)
        if mask is None:
            return arr, None
        if not isinstance(self.preprocessor, TextPreprocessor):
            raise ValueError(f"mask: {self.architecture} takes no attention mask (only the text models do)")
        m = np.asarray(mask)
        if m.dtype.kind in "iu":  # HF's attention_mask: 1 = keep, 0 = padding
            if not np.isin(m, (0, 1)).all():
                raise ValueError(f"mask: an integer attention mask holds only 0 (padding) and 1 (keep), "
                                 f"got the values {np.unique(m)[:8].tolist()}")
            m = m.astype(bool)
        return arr, as_mask(m, arr.shape[0], arr.shape[1], name="mask")

    def __call__(self, inputs: Any, mask: Any = None, **options: Any) -> Any:
        """Inference: the HF output's ``.logits`` (a dict of them for the multimodal model).
        The encoder runs the inference engine (``Perceiver.__call__``), the decoder the kernel."""
        p = self.checked_params()
        arr, m = self._inputs(inputs, mask)
        with np.errstate(over="ignore", invalid="ignore"):
            x, context, _ = self.preprocessor.forward(arr, p, self.buffers)
            z = self.encoder(x, m)  # [B, N, C] -> [B, M, D]
            if isinstance(self.decoder, BasicDecoder) and not options:
                y = self.decoder.infer(z, x, p, cfg=self.config, alloc=self.encoder.workspace())
            else:
                y, _ = self.decoder.forward(z, x, context, p, cfg=self.config, training=False, rng=None,
                                            options=options)
            if self.postprocessor is not None:
                y, _ = self.postprocessor.forward(y, context, p)
            for key, value in (y.items() if isinstance(y, dict) else [("output", y)]):
                expect_finite_output(key, value)
        return y

    def forward(self, inputs: Any, mask: Any = None, training: bool = False,
                rng: np.random.Generator | None = None, *, record: Record = None, **options: Any
                ) -> tuple[Any, PretrainedCache]:
        """inputs (as HF's ``forward(inputs=...)``), mask [B, N] (HF's ``attention_mask``, text
        only) -> (logits, cache). ``options``: the decoder's call options (the multimodal
        model's ``subsampled_output_points``)."""
        p = self.checked_params()
        arr, m = self._inputs(inputs, mask)
        with np.errstate(over="ignore", invalid="ignore"):
            x, context, pre = self.preprocessor.forward(arr, p, self.buffers, record)
            z, enc = self.encoder.forward(x, m, training, rng, record=record)  # [B, N, C] -> [B, M, D]
            y, dec = self.decoder.forward(z, x, context, p, cfg=self.config, training=training, rng=rng,
                                          record=record, options=options)
            post = None
            if self.postprocessor is not None:
                y, post = self.postprocessor.forward(y, context, p, record)
            for key, value in (y.items() if isinstance(y, dict) else [("output", y)]):
                expect_finite_output(key, value)
        tap(record, "output", y)
        return y, PretrainedCache(self._token, pre, enc, dec, post)

    def backward(self, dy: Any, cache: PretrainedCache) -> Params:
        """dy shaped like the logits -> grads keyed exactly like ``params``."""
        if not isinstance(cache, PretrainedCache) or cache.owner is not self._token:
            raise ValueError("cache: expected the cache of this model's own forward")
        p = self.checked_params()
        grads: Params = {k: np.zeros_like(v) for k, v in p.items()}

        def add(g: Params) -> None:
            for k, v in g.items():
                grads[k] += v

        if isinstance(dy, Mapping):
            dy = {k: np.asarray(v, dtype=self.config.np_dtype) for k, v in dy.items()}
        else:
            dy = np.asarray(dy, dtype=self.config.np_dtype)
        if self.postprocessor is not None:
            dy, g = self.postprocessor.backward(dy, cache.post)
            add(g)
        dz, dq, dcontext, g = self.decoder.backward(dy, cache.decoder)
        add(g)
        g, dx = self.encoder.backward(dz, cache.encoder)
        add(g)
        if dq is not None:
            dx = dx + dq  # the decoder queried with x too (optical flow)
        add(self.preprocessor.backward(dx, dcontext, cache.pre))
        return grads


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def hf_names(model: PretrainedPerceiver) -> dict[str, str]:
    """Our parameter and buffer names -> HF state-dict keys."""
    return {k: s.hf for k, s in {**model.specs(), **model.buffer_specs()}.items()}


def from_state_dict(architecture: str, config: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                    dtype: str = "float32") -> PretrainedPerceiver:
    """The model of HF class ``architecture`` with config ``config`` (config.json) and weights
    ``state_dict`` (HF key -> array; every key and shape checked, ``num_batches_tracked``
    ignored). The model's arrays are copies: ``state_dict`` is left as it is."""
    if not isinstance(state_dict, Mapping):
        raise InteropError("state_dict: expected a mapping of name -> array, "
                           f"got {type(state_dict).__name__}")
    return _build(architecture, config, dict(state_dict), dtype, owned=False)


def _build(architecture: str, config: Mapping[str, Any], given: dict[str, Any], dtype: str, *,
           owned: bool) -> PretrainedPerceiver:
    """:func:`from_state_dict` on ``given``, which it empties: each array is dropped as soon as
    it is converted, so that a model read from a file never needs twice its size in memory
    (``owned``: the arrays are the caller's to give, used as they are where they fit)."""
    hf_config, pieces, cfg = _layout(architecture, config, dtype)
    present = [x for x in pieces if x is not None]
    specs = _specs(cfg, present)
    bspecs: dict[str, ParamSpec] = {}
    for piece in present:
        bspecs.update(piece.buffer_specs)
    for key in [k for k in given if k.endswith("num_batches_tracked")]:
        del given[key]
    every = (*specs.values(), *bspecs.values())
    hf_shapes = {s.hf: (s.shape[::-1] if s.transpose else s.shape) for s in every}
    _check_keys("state_dict", [s.hf for s in every], given, hf_shapes)
    params = {k: _as_param(s.hf, given.pop(s.hf), s.shape, cfg.np_dtype, transpose=s.transpose, ours=k,
                           owned=owned) for k, s in specs.items()}
    buffers = {k: _as_param(s.hf, given.pop(s.hf), s.shape, cfg.np_dtype, ours=k, owned=owned)
               for k, s in bspecs.items()}
    return PretrainedPerceiver(architecture, hf_config, params, buffers, dtype=dtype)


def from_hf(hf_model: Any, *, dtype: str = "float64") -> Perceiver | PretrainedPerceiver:
    """A live Hugging Face Perceiver -> the equal perceiver_np model: a ``PerceiverModel``
    through :func:`perceiver_np.interop.from_hf` (a :class:`Perceiver`), any ``PerceiverFor*``
    class of :data:`ARCHITECTURES` as a :class:`PretrainedPerceiver`."""
    name = type(hf_model).__name__
    if name == "PerceiverModel":
        return interop.from_hf(hf_model, dtype=dtype)
    if name not in ARCHITECTURES:
        raise InteropError(f"hf_model: {name} is not supported; supported: PerceiverModel and "
                           f"{list(ARCHITECTURES)}")
    state = {k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}
    return from_state_dict(name, hf_model.config.to_dict(), state, dtype=dtype)


def from_pretrained(path: Any, *, dtype: str = "float32") -> PretrainedPerceiver:
    """A directory as HF's ``save_pretrained`` writes it (config.json and model.safetensors)."""
    config, state = read_pretrained_dir(path)  # fresh arrays, ours to hand over
    archs = config.get("architectures") or []
    if len(archs) != 1:
        raise InteropError(f"{path}/config.json: expected one entry in 'architectures', got {archs!r}")
    return _build(archs[0], config, state, dtype, owned=True)
