"""Hugging Face's ``PerceiverForMultimodalAutoencoding`` (Perceiver IO's video + audio + label
autoencoder, ``deepmind/multimodal-perceiver``): its preprocessor, decoder and postprocessor,
forward and backward. :mod:`perceiver_np.pretrained` puts the encoder between them::

    inputs = {"audio": [B, L], "image": [B, T, 3, H, W], "label": [B, K]}
    x, context = preprocessor(inputs)     -> x [B, Na + Ni + 1, C]   (modalities in sorted order)
    z = encoder(x)                        -> z [B, M, D]
    y = decoder(z, subsampled_output_points)   -> {modality: [B, n_m, out]}
    logits = postprocessor(y)             -> {"audio": [B, na * spp], "image": [B, ni, 3], "label": [B, K]}

What HF computes, step by step (``modeling_perceiver.py`` of transformers 5.x):

- **Preprocessor** (``PerceiverMultimodalPreprocessor``). Audio [B, L] is cut into patches of
  ``samples_per_patch`` = spp samples, [B, Na, spp] with Na = L / spp, and gets the 1-D Fourier
  features of ``linear_positions((Na,))`` (192 bands, max_resolution = num_frames *
  audio_samples_per_frame). The video [B, T, 3, H, W] goes through space-to-depth with 4x4
  spatial blocks (``space_to_depth``: [B, T, H/4, W/4, 48]) and gets the 3-D Fourier features of
  its (T, H/4, W/4) grid (32 bands, max_resolution = (num_frames, image_size, image_size)). The
  label [B, K] becomes one position [B, 1, K]. Each is padded to the common width C = max of the
  three widths + 4 with a trainable row (``padding.<modality>``, [1, C - c]), then masked:
  ``(1 - mask) * x + mask * token`` with ``mask = bernoulli(mask_probs[modality])``; HF's
  mask_probs are 0 (audio, video) and 1 (label), so the draw is deterministic: audio and video
  are kept exactly, and the label's input is replaced by the token ``mask.label`` ([1, C]) at
  every position (the label values never reach the output). Gradients follow the same
  formula: a token gets the sum of ``mask * dy`` (zero for audio and video), the input's padding
  ``(1 - mask) * dy`` (zero for the label's). The modalities are concatenated along N in
  sorted order: audio, image, label (HF's ``restructure`` order).
- **Decoder** (``PerceiverMultimodalDecoder``). Every modality's queries come from positions
  only (``position_encoding_only``): audio queries are the 1-D Fourier features of the output
  points among ``num_frames * audio_samples_per_frame // spp`` patches, image queries the 3-D
  Fourier features of the output points among ``output_shape[1:4]`` = (T, H, W) pixels, the
  label query one trainable row ([1, Kq], ``_label_trainable_num_channels``). The point with flat
  index i sits at ``-1 + 2 * unravel_index(i, dims) / dims`` per axis, a grid in [-1, 1) that
  differs from the encoder's ``linspace(-1, 1, n)`` (HF's ``decoder_query`` with
  ``subsampled_points``). Each query is padded to the common width Cq = max + 2 with a
  trainable row (``decoder.padding.<modality>``), they are concatenated in sorted order, and one
  shared cross block (one head, no query residual) and a Linear to ``output_num_channels``
  decode them all. The output is split per modality by the numbers of queries.
- **Postprocessor** (``PerceiverMultimodalPostprocessor``): a Linear per modality; audio
  [B, na, spp] flattened to [B, na * spp], image [B, ni, 3], label the one row [B, K].

``subsampled_output_points`` (HF's forward argument): ``{"audio": indices, "image": indices}``
(flat, 1-D, each in [0, number of output points); ``"label"`` absent or None). Without it every
output point is decoded: the same as HF with ``np.arange`` of all of them. HF's own forward
fails without it (its non-subsampled queries are built on the grid of the input's channel
axis, ``inputs.shape[2:]``, and do not fit the padding), and fails on label indices.

Names: ``preprocessor.padding.<m>`` [1, C - c_m], ``preprocessor.mask.<m>`` [1, C],
``decoder.padding.<m>`` [1, Cq - cq_m], ``decoder.queries.label`` [1, Kq], ``decoder.*`` (the
cross block, as the encoder's) and ``decoder.output.*``, ``postprocessor.<m>.weight|bias``
(Linear, ours [in, out]). The modality letters besides :mod:`perceiver_np.shapes`' ones: L audio
samples, spp samples per patch, Na / Ni input positions of audio / video, na / ni decoded
points, K labels, c_m a modality's width before padding, Cq the queries' common width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import prep_layers as pl
from .blocks import CrossBlockCache, cross_block_backward, cross_block_forward
from .config import PerceiverConfig
from .hf_specs import HF_PREFIX, ParamSpec, _cross_specs, _linear_specs, decoder_ops
from .interop import InteropError, _int
from .layers import LinearCache, Params, Record, linear_backward, linear_forward, params_under, tap
from .position import (
    add_position_encoding,
    fourier_channels,
    fourier_features,
    shared_fourier_position_encoding,
)
from .shapes import as_real_input, expect_shape

#: The modalities in HF's order of concatenation (sorted by name, ``restructure``).
MODALITIES = ("audio", "image", "label")
#: HF's ``mask_probs``: the probability that a position's input is replaced by the mask token.
MASK_PROBS = {"audio": 0.0, "image": 0.0, "label": 1.0}
#: Padding channels at least added to the widest modality: preprocessor and decoder.
PREPROCESSOR_MIN_PADDING = 4
DECODER_MIN_PADDING = 2
#: Fourier bands of the audio and the video positions (inputs and queries alike).
AUDIO_BANDS = 192
IMAGE_BANDS = 32
#: The video's space-to-depth blocks (HF's spatial_downsample, temporal_downsample) and channels.
SPATIAL_BLOCK = 4
TEMPORAL_BLOCK = 1
IMAGE_CHANNELS = 3


# ---------------------------------------------------------------------------------------------
# Two small layers: the mask token, and HF's restructure
# ---------------------------------------------------------------------------------------------


class MaskTokenCache(NamedTuple):
    mask: np.ndarray  # [B, N, 1], 1 where the token replaced the input


def mask_token_forward(x: np.ndarray, params: Params, *, mask_prob: float
                       ) -> tuple[np.ndarray, MaskTokenCache]:
    """HF's masking of a modality: x [B, N, C], token [1, C] -> y = (1 - m) * x + m * token [B, N, C],
    m [B, N, 1] drawn Bernoulli(mask_prob). Only the deterministic draws exist here: mask_prob
    0 (y = x exactly) or 1 (y = the token at every position, exactly)."""
    if mask_prob not in (0.0, 1.0):
        raise ValueError(f"mask_prob: expected 0 or 1 (a deterministic Bernoulli draw), got {mask_prob!r}")
    b, n, c = x.shape
    token = params["token"]
    expect_shape("mask token", token, (1, c), "[1, C]")
    m = np.full((b, n, 1), mask_prob, dtype=x.dtype)  # [B, N, 1]
    y = (1 - m) * x + m * token  # [B, N, 1] * [B, N, C] + [B, N, 1] * [1, C] -> [B, N, C]
    return y, MaskTokenCache(m)


def mask_token_backward(dy: np.ndarray, cache: MaskTokenCache) -> tuple[np.ndarray, Params]:
    """dy [B, N, C] -> (dx [B, N, C], {"token": [1, C]})."""
    m = cache.mask
    # in the forward pass this was y = (1 - m) * x + m * token (token broadcast over B and N)
    dx = (1 - m) * dy  # [B, N, C]
    dtoken = (m * dy).sum(axis=(0, 1))[None]  # [B, N, C] -> [C] -> [1, C]
    return dx, {"token": dtoken}


def restructure(sizes: Mapping[str, int], x: np.ndarray) -> dict[str, np.ndarray]:
    """HF's ``restructure``: x [B, N, ...] -> {modality: x[:, start:start + N_m]}, the modalities
    taking consecutive slices in sorted order; sizes: modality -> N_m (summing to N)."""
    out: dict[str, np.ndarray] = {}
    start = 0
    for m in sorted(sizes):
        out[m] = x[:, start:start + sizes[m]]
        start += sizes[m]
    if start != x.shape[1]:
        raise ValueError(f"restructure: the sizes {dict(sizes)} sum to {start}, x has N = {x.shape[1]}")
    return out


def restructure_backward(dys: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> np.ndarray:
    """{modality: dy [B, N_m, ...]} -> dx [B, N, ...]: the slices put back in sorted order."""
    missing = [m for m in sorted(sizes) if m not in dys]
    if missing or set(dys) - set(sizes):
        raise ValueError(f"dy: expected the modalities {sorted(sizes)}, got {sorted(dys)}")
    for m in sorted(sizes):
        if dys[m].ndim < 2 or dys[m].shape[1] != sizes[m]:
            raise ValueError(f"dy[{m!r}]: expected {sizes[m]} positions on axis 1, got shape {dys[m].shape}")
    # in the forward pass these were consecutive slices of x along N
    return np.concatenate([dys[m] for m in sorted(sizes)], axis=1)


# ---------------------------------------------------------------------------------------------
# Preprocessor: {"audio", "image", "label"} -> x [B, N, C]
# ---------------------------------------------------------------------------------------------


class MultimodalContext(NamedTuple):
    sizes: dict[str, int]  # modality -> N_m, its positions in x (HF's modality_sizes)
    inputs_without_pos: dict[str, np.ndarray]  # modality -> [B, N_m, c_m] before positions and padding


class MultimodalPreprocessorCache(NamedTuple):
    pads: dict[str, pl.PadChannelsCache]  # modality -> [B, N_m, c_m] padded to [B, N_m, C]
    masks: dict[str, MaskTokenCache]  # modality -> [B, N_m, 1]
    concat: pl.ConcatCache  # the modalities along N, sorted


class MultimodalPreprocessor:
    """HF's ``PerceiverMultimodalPreprocessor`` of ``PerceiverForMultimodalAutoencoding`` (module
    docstring): inputs {"audio": [B, L] (or [B, L, 1]), "image": [B, T, 3, H, W], "label": [B, K]}
    -> x [B, Na + Ni + 1, C]. The inputs get no gradient (HF's take none either)."""

    def __init__(self, *, num_frames: int, image_size: int, audio_samples_per_frame: int,
                 samples_per_patch: int, num_labels: int) -> None:
        self.samples_per_patch, self.num_labels = samples_per_patch, num_labels
        self.audio_resolution = (num_frames * audio_samples_per_frame,)
        self.image_resolution = (num_frames, image_size, image_size)
        self.widths = {
            "audio": samples_per_patch + fourier_channels(1, AUDIO_BANDS),
            "image": IMAGE_CHANNELS * SPATIAL_BLOCK**2 * TEMPORAL_BLOCK + fourier_channels(3, IMAGE_BANDS),
            "label": num_labels,
        }
        self.num_channels = max(self.widths.values()) + PREPROCESSOR_MIN_PADDING
        pre = HF_PREFIX + "input_preprocessor"
        self.specs: dict[str, ParamSpec] = {}
        for m in MODALITIES:
            self.specs[f"preprocessor.padding.{m}"] = ParamSpec((1, self.num_channels - self.widths[m]),
                                                                f"{pre}.padding.{m}", False)
        for m in MODALITIES:
            self.specs[f"preprocessor.mask.{m}"] = ParamSpec((1, self.num_channels), f"{pre}.mask.{m}", False)
        self.buffer_specs: dict[str, ParamSpec] = {}

    def check(self, inputs: Any, dtype: np.dtype) -> dict[str, np.ndarray]:
        """inputs -> {modality: finite array of ``dtype``} (audio as [B, L]), or a clear error
        naming the modality, the expected and the received shape."""
        if not isinstance(inputs, Mapping):
            raise TypeError("inputs: expected a dict {'audio': [B, L], 'image': [B, T, 3, H, W], "
                            f"'label': [B, {self.num_labels}]}}, got {type(inputs).__name__}")
        missing = [m for m in MODALITIES if m not in inputs]
        extra = sorted(str(k) for k in inputs if k not in MODALITIES)
        if missing or extra:
            raise ValueError(f"inputs: expected the modalities {list(MODALITIES)}, missing {missing}, "
                             f"unexpected {extra}")
        arrs = {m: np.asarray(inputs[m]) for m in MODALITIES}
        spp = self.samples_per_patch
        a = arrs["audio"]
        if (a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 1) or a.shape[0] == 0
                or a.shape[1] == 0 or a.shape[1] % spp):
            raise ValueError(f"inputs['audio']: expected audio samples [B, L] (or [B, L, 1]) with L a "
                             f"positive multiple of samples_per_patch = {spp}, got shape {a.shape}")
        v = arrs["image"]
        if (v.ndim != 5 or v.shape[2] != IMAGE_CHANNELS or v.shape[0] == 0 or v.shape[1] < 2
                or 0 in v.shape[3:] or v.shape[3] % SPATIAL_BLOCK or v.shape[4] % SPATIAL_BLOCK):
            raise ValueError(f"inputs['image']: expected video frames [B, T, {IMAGE_CHANNELS}, H, W] with "
                             f"T >= 2 (HF drops the time axis of one frame and then fails) and H, W "
                             f"positive multiples of {SPATIAL_BLOCK}, got shape {v.shape}")
        lab = arrs["label"]
        if lab.ndim != 2 or lab.shape[0] == 0 or lab.shape[1] != self.num_labels:
            raise ValueError(f"inputs['label']: expected [B, num_labels] = [B, {self.num_labels}], "
                             f"got shape {lab.shape}")
        batches = {m: arrs[m].shape[0] for m in MODALITIES}
        if len(set(batches.values())) != 1:
            raise ValueError(f"inputs: every modality needs the same batch size B, got {batches}")
        out = {m: as_real_input(f"inputs[{m!r}]", arrs[m], dtype) for m in MODALITIES}
        out["audio"] = out["audio"].reshape(a.shape[0], a.shape[1])  # [B, L(, 1)] -> [B, L]
        return out

    def features(self, inputs: Mapping[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Each modality with its positions, before padding ({m: [B, N_m, c_m]}), and without
        them (HF's inputs_without_pos). No parameters, so no backward."""
        dt = inputs["audio"].dtype
        audio, video, label = inputs["audio"], inputs["image"], inputs["label"]
        b = audio.shape[0]
        raw: dict[str, np.ndarray] = {}
        pos: dict[str, np.ndarray] = {}
        raw["audio"] = audio.reshape(b, -1, self.samples_per_patch)  # [B, L] -> [B, Na, spp]
        pos["audio"] = shared_fourier_position_encoding(
            (raw["audio"].shape[1],), AUDIO_BANDS, max_resolution=self.audio_resolution, dtype=dt
        )  # [Na, Cpa]
        f, _ = pl.space_to_depth_forward(
            video, temporal_block=TEMPORAL_BLOCK, spatial_block=SPATIAL_BLOCK
        )  # [B, T, 3, H, W] -> [B, T, H/4, W/4, 48]
        grid = tuple(int(s) for s in f.shape[1:4])
        raw["image"] = f.reshape(b, math.prod(grid), f.shape[4])  # -> [B, Ni, 48]
        pos["image"] = shared_fourier_position_encoding(
            grid, IMAGE_BANDS, max_resolution=self.image_resolution, dtype=dt)  # [Ni, Cpi]
        raw["label"] = label[:, None, :]  # [B, K] -> [B, 1, K]
        feats = {m: add_position_encoding(raw[m], pos[m], "concat")[0] if m in pos else raw[m]
                 for m in MODALITIES}  # [B, N_m, c] ++ [N_m, Cp] -> [B, N_m, c_m]
        return feats, raw

    def forward(self, inputs: Mapping[str, np.ndarray], p: Params, buffers: Params, record: Record = None
                ) -> tuple[np.ndarray, MultimodalContext, MultimodalPreprocessorCache]:
        feats, raw = self.features(inputs)
        pads: dict[str, pl.PadChannelsCache] = {}
        masks: dict[str, MaskTokenCache] = {}
        padded = []
        for m in MODALITIES:  # sorted
            h, pads[m] = pl.pad_channels_forward(feats[m], {"pad": p[f"preprocessor.padding.{m}"]},
                                                 width=self.num_channels)  # [B, N_m, c_m] -> [B, N_m, C]
            h, masks[m] = mask_token_forward(h, {"token": p[f"preprocessor.mask.{m}"]},
                                             mask_prob=MASK_PROBS[m])  # [B, N_m, C]
            padded.append(h)
        x, concat = pl.concat_forward(padded, axis=1)  # -> [B, Na + Ni + 1, C]
        tap(record, "preprocessor.out", x)
        context = MultimodalContext({m: int(feats[m].shape[1]) for m in MODALITIES}, raw)
        return x, context, MultimodalPreprocessorCache(pads, masks, concat)

    def backward(self, dx: np.ndarray, dcontext: Any, cache: MultimodalPreprocessorCache) -> Params:
        """dx [B, N, C] (dcontext: None, the decoder does not use the context) -> grads."""
        if dcontext is not None:
            raise ValueError("dcontext: the multimodal decoder takes no gradient through the context")
        grads: Params = {}
        # in the forward pass this was x = concat(padded, axis=1), sorted modalities
        dpadded, _ = pl.concat_backward(dx, cache.concat)
        for m, dh in zip(MODALITIES, dpadded, strict=True):
            dh, g = mask_token_backward(dh, cache.masks[m])
            grads[f"preprocessor.mask.{m}"] = g["token"]
            _, g = pl.pad_channels_backward(dh, cache.pads[m])  # the features themselves take no gradient
            grads[f"preprocessor.padding.{m}"] = g["pad"]
        return grads


# ---------------------------------------------------------------------------------------------
# Decoder: latents z [B, M, D] -> {modality: [B, n_m, out]}
# ---------------------------------------------------------------------------------------------


def subsampled_positions(points: np.ndarray, index_dims: tuple[int, ...]) -> np.ndarray:
    """HF's positions of subsampled output points: flat indices [n] into a grid of
    ``index_dims`` -> pos [n, d] float64, ``-1 + 2 * unravel_index(points, index_dims) / index_dims``
    per axis (a grid in [-1, 1), not :func:`perceiver_np.position.linear_positions`' linspace)."""
    idx = np.stack(np.unravel_index(points, index_dims), axis=1)  # [n] -> [n, d] int
    return -1 + (2 * idx) / np.array(index_dims)  # [n, d] / [d] -> [n, d] float64


class MultimodalDecoderCache(NamedTuple):
    batch: int
    sizes: dict[str, int]  # modality -> n_m, its queries
    pads: dict[str, pl.PadChannelsCache]  # modality -> queries [B, n_m, cq_m] padded to [B, n_m, Cq]
    concat: pl.ConcatCache  # the queries along O, sorted
    block: CrossBlockCache  # queries [B, O, Cq] over the latents [B, M, D]
    output: LinearCache  # [B, O, Cq] -> [B, O, out]


class MultimodalDecoder:
    """HF's ``PerceiverMultimodalDecoder`` of ``PerceiverForMultimodalAutoencoding`` (module
    docstring): z [B, M, D] -> {modality: [B, n_m, out]}, n_m the decoded points of a modality
    (every point, or ``options["subsampled_output_points"]``), one for the label."""

    def __init__(self, *, audio_points: int, audio_resolution: tuple[int, ...],
                 image_dims: tuple[int, ...], image_resolution: tuple[int, ...], label_channels: int,
                 kv_dim: int, out: int, qk_from: str = "kv") -> None:
        self.index_dims = {"audio": (audio_points,), "image": tuple(image_dims)}
        self.resolution = {"audio": tuple(audio_resolution), "image": tuple(image_resolution)}
        self.bands = {"audio": AUDIO_BANDS, "image": IMAGE_BANDS}
        self.widths = {"audio": fourier_channels(1, AUDIO_BANDS), "image": fourier_channels(3, IMAGE_BANDS),
                       "label": label_channels}
        self.num_query_channels = max(self.widths.values()) + DECODER_MIN_PADDING
        cq = self.num_query_channels
        if qk_from not in ("kv", "q"):
            raise InteropError(f"cross_attention_shape_for_attention: expected 'kv' or 'q', got {qk_from!r}")
        qk = kv_dim if qk_from == "kv" else cq  # HF's qk width (and v width) from the keys or the queries
        hf = HF_PREFIX + "decoder"
        self.specs = _cross_specs("decoder", f"{hf}.decoder.decoding_cross_attention", cq, kv_dim, qk, qk, 1)
        self.specs.update(_linear_specs("decoder.output", f"{hf}.decoder.final_layer", cq, out))
        for m in MODALITIES:
            self.specs[f"decoder.padding.{m}"] = ParamSpec((1, cq - self.widths[m]), f"{hf}.padding.{m}",
                                                           False)
        label = f"{hf}.modalities.label.decoder.output_position_encodings.position_embeddings"
        self.specs["decoder.queries.label"] = ParamSpec((1, label_channels), label, False)
        self.buffer_specs: dict[str, ParamSpec] = {}

    def points(self, options: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        """The decoded points of audio and image, flat int64 indices [n_m], from the call
        options (every point without ``subsampled_output_points``), or a clear error."""
        options = dict(options or {})
        extra = sorted(k for k in options if k != "subsampled_output_points")
        if extra:
            raise ValueError(f"{extra}: the multimodal decoder takes only the option "
                             "subsampled_output_points")
        sub = options.get("subsampled_output_points")
        if sub is None:
            return {m: np.arange(math.prod(dims)) for m, dims in self.index_dims.items()}
        if not isinstance(sub, Mapping):
            raise TypeError("subsampled_output_points: expected a dict {'audio': indices, 'image': indices}, "
                            f"got {type(sub).__name__}")
        unknown = sorted(str(k) for k in sub if k not in MODALITIES)
        if unknown:
            raise ValueError(f"subsampled_output_points: unexpected keys {unknown}; the modalities are "
                             f"{list(MODALITIES)}")
        if sub.get("label") is not None:
            raise ValueError("subsampled_output_points['label']: expected None (the label's one output is "
                             "always decoded; HF's forward fails on label indices)")
        out: dict[str, np.ndarray] = {}
        for m, dims in self.index_dims.items():
            n = math.prod(dims)
            name = f"subsampled_output_points[{m!r}]"
            if sub.get(m) is None:
                raise ValueError(f"{name}: missing; HF's forward needs the indices of both 'audio' and "
                                 f"'image' (np.arange({n}) for every {m} point)")
            idx = np.asarray(sub[m])
            if idx.dtype.kind not in "iu" or idx.ndim != 1 or idx.size == 0:
                raise ValueError(f"{name}: expected a non-empty 1-D array of integer indices into the {n} "
                                 f"output points of {m} (grid {dims}), got dtype {idx.dtype.name} and "
                                 f"shape {idx.shape}")
            if idx.min() < 0 or idx.max() >= n:
                raise ValueError(f"{name}: expected indices in [0, {n}) (grid {dims}), got values in "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
            out[m] = idx.astype(np.int64)
        return out

    def query_positions(self, modality: str, points: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """The Fourier queries of ``modality`` ("audio" or "image") at ``points`` (flat indices
        [n]) -> [n, cq_m] in ``dtype``: HF's ``decoder_query`` with ``subsampled_points``."""
        pos = subsampled_positions(points, self.index_dims[modality])  # [n] -> [n, d]
        enc = fourier_features(pos, self.bands[modality],
                               max_resolution=self.resolution[modality])  # [n, d] -> [n, cq_m]
        return enc.astype(dtype, copy=False)

    def forward(self, z: np.ndarray, x: np.ndarray, context: Any, p: Params, *, cfg: PerceiverConfig,
                training: bool, rng: np.random.Generator | None, record: Record = None,
                options: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, np.ndarray], MultimodalDecoderCache]:
        points = self.points(options)
        b = z.shape[0]
        cq = self.num_query_channels
        pads: dict[str, pl.PadChannelsCache] = {}
        queries = []
        for m in MODALITIES:  # sorted
            if m == "label":
                table = p["decoder.queries.label"]
                q = np.broadcast_to(table, (b, *table.shape))  # [1, Kq] -> [B, 1, Kq]
            else:
                enc = self.query_positions(m, points[m], z.dtype)
                q = np.broadcast_to(enc, (b, *enc.shape))  # [n_m, cq_m] -> [B, n_m, cq_m]
            q, pads[m] = pl.pad_channels_forward(q, {"pad": p[f"decoder.padding.{m}"]},
                                                 width=cq)  # [B, n_m, cq_m] -> [B, n_m, Cq]
            queries.append(q)
        q, concat = pl.concat_forward(queries, axis=1)  # -> [B, O, Cq]
        tap(record, "decoder.queries", q)
        u, block = cross_block_forward(
            q, z, params_under(p, "decoder"), num_heads=1, use_query_residual=False, gelu="exact",
            attention_dropout=cfg.attention_dropout, training=training, rng=rng, record=record,
            name="decoder", ops=decoder_ops(cfg, training),
        )  # [B, O, Cq] x [B, M, D] -> [B, O, Cq]
        y, output = linear_forward(u, params_under(p, "decoder.output"))  # [B, O, Cq] -> [B, O, out]
        sizes = dict(zip(MODALITIES, concat.sizes, strict=True))
        ys = restructure(sizes, y)  # -> {modality: [B, n_m, out]}
        for m, v in ys.items():
            tap(record, f"decoder.out.{m}", v)
        return ys, MultimodalDecoderCache(b, sizes, pads, concat, block, output)

    def backward(self, dy: Mapping[str, np.ndarray], cache: MultimodalDecoderCache
                 ) -> tuple[np.ndarray, None, None, Params]:
        """{modality: dy [B, n_m, out]} -> (dz [B, M, D], None, None, grads): the queries come from
        positions and parameters only, not from x or the context."""
        grads: Params = {}
        # in the forward pass this was ys = restructure(sizes, y)
        dy_all = restructure_backward(dy, cache.sizes)  # -> [B, O, out]
        # in the forward pass this was y = u @ W + b
        du, g = linear_backward(dy_all, cache.output)  # [B, O, out] -> [B, O, Cq]
        grads.update({f"decoder.output.{k}": v for k, v in g.items()})
        (dq, dz), g = cross_block_backward(du, cache.block)
        grads.update({f"decoder.{k}": v for k, v in g.items()})
        # in the forward pass this was q = concat(queries, axis=1), sorted modalities
        dqs, _ = pl.concat_backward(dq, cache.concat)
        for m, dqm in zip(MODALITIES, dqs, strict=True):
            dqm, g = pl.pad_channels_backward(dqm, cache.pads[m])  # [B, n_m, Cq] -> [B, n_m, cq_m]
            grads[f"decoder.padding.{m}"] = g["pad"]
            if m == "label":
                grads["decoder.queries.label"] = dqm.sum(axis=0)  # broadcast over B: [B, 1, Kq] -> [1, Kq]
        return dz, None, None, grads


# ---------------------------------------------------------------------------------------------
# Postprocessor: {modality: [B, n_m, out]} -> logits
# ---------------------------------------------------------------------------------------------


class MultimodalPostprocessorCache(NamedTuple):
    batch: int
    linears: dict[str, LinearCache]  # modality -> [B, n_m, out] -> [B, n_m, k_m]


class MultimodalPostprocessor:
    """HF's ``PerceiverMultimodalPostprocessor`` of ``PerceiverForMultimodalAutoencoding``: a
    Linear per modality; audio ``PerceiverAudioPostprocessor`` ([B, na, spp] -> [B, na * spp]),
    image ``PerceiverProjectionPostprocessor`` ([B, ni, 3]), label
    ``PerceiverClassificationPostprocessor`` (the first row, [B, K])."""

    def __init__(self, *, in_channels: int, samples_per_patch: int, num_labels: int) -> None:
        self.outputs = {"audio": samples_per_patch, "image": IMAGE_CHANNELS, "label": num_labels}
        hf = HF_PREFIX + "output_postprocessor.modalities"
        self.specs: dict[str, ParamSpec] = {}
        for m in MODALITIES:
            self.specs.update(_linear_specs(f"postprocessor.{m}", f"{hf}.{m}.classifier", in_channels,
                                            self.outputs[m]))
        self.buffer_specs: dict[str, ParamSpec] = {}

    def forward(self, y: Mapping[str, np.ndarray], context: Any, p: Params, record: Record = None
                ) -> tuple[dict[str, np.ndarray], MultimodalPostprocessorCache]:
        linears: dict[str, LinearCache] = {}
        logits: dict[str, np.ndarray] = {}
        b = y["audio"].shape[0]
        for m in MODALITIES:
            h, linears[m] = linear_forward(y[m], params_under(p, f"postprocessor.{m}"))  # -> [B, n_m, k_m]
            if m == "audio":
                h = h.reshape(b, -1)  # [B, na, spp] -> [B, na * spp]
            elif m == "label":
                h = h[:, 0, :]  # [B, 1, K] -> [B, K]
            logits[m] = h
            tap(record, f"postprocessor.out.{m}", h)
        return logits, MultimodalPostprocessorCache(b, linears)

    def backward(self, dlogits: Mapping[str, np.ndarray], cache: MultimodalPostprocessorCache
                 ) -> tuple[dict[str, np.ndarray], Params]:
        """{modality: dlogits shaped like the logits} -> ({modality: dy [B, n_m, out]}, grads)."""
        if not isinstance(dlogits, Mapping) or sorted(dlogits) != sorted(MODALITIES):
            got = sorted(dlogits) if isinstance(dlogits, Mapping) else type(dlogits).__name__
            raise ValueError(f"dy: expected a dict of the logits' modalities {list(MODALITIES)}, got {got}")
        grads: Params = {}
        dy: dict[str, np.ndarray] = {}
        b = cache.batch
        for m in MODALITIES:
            lin = cache.linears[m]
            n, k = lin.x.shape[1], lin.weight.shape[1]
            dh = dlogits[m]
            if m == "audio":
                expect_shape("dy['audio']", dh, (b, n * k), "[B, na * spp]")
                dh = dh.reshape(b, n, k)  # in the forward pass this was h.reshape(B, -1)
            elif m == "label":
                expect_shape("dy['label']", dh, (b, k), "[B, K]")
                dh = dh[:, None, :]  # in the forward pass this was h[:, 0, :] (of one row)
            else:
                expect_shape("dy['image']", dh, (b, n, k), "[B, ni, 3]")
            dy[m], g = linear_backward(dh, lin)  # [B, n_m, k_m] -> [B, n_m, out]
            grads.update({f"postprocessor.{m}.{key}": v for key, v in g.items()})
        return dy, grads


# ---------------------------------------------------------------------------------------------
# The structure from an HF config
# ---------------------------------------------------------------------------------------------


def structure(c: Mapping[str, Any], *, num_labels: int
              ) -> tuple[MultimodalPreprocessor, MultimodalDecoder, MultimodalPostprocessor]:
    """(preprocessor, decoder, postprocessor) of ``PerceiverForMultimodalAutoencoding`` from its
    config dict (HF's defaults filled in); ``num_labels`` as HF counts them."""
    frames, size = _int("num_frames", c["num_frames"]), _int("image_size", c["image_size"])
    per_frame = _int("audio_samples_per_frame", c["audio_samples_per_frame"])
    spp = _int("samples_per_patch", c["samples_per_patch"])
    shape = c["output_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 4:
        raise InteropError(f"output_shape: expected [batch, frames, height, width], got {shape!r}")
    image_dims = tuple(_int("output_shape", s) for s in shape[1:4])
    out = _int("output_num_channels", c["output_num_channels"])
    label_channels = _int("_label_trainable_num_channels", c["_label_trainable_num_channels"])
    d_latents, d_model = _int("d_latents", c["d_latents"]), _int("d_model", c["d_model"])
    n_audio = frames * per_frame
    if n_audio // spp < 1:
        raise InteropError(f"samples_per_patch: {spp} is more than the num_frames * "
                           f"audio_samples_per_frame = {n_audio} samples decoded")
    pre = MultimodalPreprocessor(num_frames=frames, image_size=size, audio_samples_per_frame=per_frame,
                                 samples_per_patch=spp, num_labels=num_labels)
    if d_model != pre.num_channels:
        raise InteropError(f"d_model: the encoder of PerceiverForMultimodalAutoencoding takes inputs of "
                           f"width {pre.num_channels} (the widest modality of {pre.widths} + "
                           f"{PREPROCESSOR_MIN_PADDING}), the config has d_model = {d_model}")
    dec = MultimodalDecoder(audio_points=n_audio // spp, audio_resolution=(n_audio,), image_dims=image_dims,
                            image_resolution=(frames, size, size), label_channels=label_channels,
                            kv_dim=d_latents, out=out,
                            qk_from=c.get("cross_attention_shape_for_attention", "kv"))
    post = MultimodalPostprocessor(in_channels=out, samples_per_patch=spp, num_labels=num_labels)
    return pre, dec, post
