"""Attention maps: which input positions each latent reads, computed from the log-sum-exp.

::

    maps = viz.attention_maps(model, x, mask, latents=[0, 3], heads=[1])   # [B, 1, 2, N]
    fig = viz.draw_attention_maps(maps[0], image_shape=(8, 8), path="attention.png")

The weights of latent i in head h of a cross block are row i of that head's softmax
``P = softmax(scale q k^T)`` [B, H, M, N]. The plain path holds all of P; the tiled kernel never
does: it keeps per row only ``lse = log sum_j exp(s_j)`` over the visible keys (FlashAttention's
log-sum-exp, the one number of a row its backward needs). Any single weight is then one score
away, ``p_j = exp(s_j - lse)``, so the maps of a few chosen rows cost their own size
[B, h, m, N] and one pass over the input in chunks, never M x N (docs/attention-maps.md)::

    z = the encoder's steps before the chosen block      the inference engine, the input in chunks
    q = LN_q(z) @ W_q + b_q, the chosen latents and heads          [B, h, m, dh]
    for each chunk x_c [B, n, C] of the input:
        k_c  = LN_kv(x_c @ W_in + b_in) @ W_k + b_k, the chosen heads    [B, h, n, dh]
        lse  = logaddexp(lse, lse_c)       lse_c: the (o, lse) attention of q over k_c
        maps[..., chunk] = scale q k_c^T   masked keys MASK_FILL       [B, h, m, n]
    maps = exp(maps - lse)                 in place: masked keys exactly 0

A sample with no visible key has no lse: its weights are 0 (``masked_rows="zero"``) or 1/N on
every key (``"uniform"``), as the model's forward gives them. ``lse`` comes from the model's own
attention implementation (the tiled kernel, or with ``backend="numpy"`` its plain twin).

Drawing needs matplotlib, imported only by :func:`draw_attention_maps`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import engine
from ._files import atomic_write
from .backends import EngineOps, engine_ops
from .config import PerceiverConfig
from .constants import MASK_FILL
from .layers import Params, params_under
from .model import Perceiver
from .shapes import as_mask, expect_finite_output

#: Above this many positions a sequence's map is drawn as the maximum over bins of positions
#: (one point per bin), so that a peak of a single position still shows.
MAX_LINE_POINTS = 4096

Pieces = Iterator[tuple[np.ndarray, "np.ndarray | None"]]


def attention_maps(
    model: Perceiver,
    x: Any,
    mask: Any = None,
    *,
    latents: Any = None,
    heads: Any = None,
    block: int = 0,
    use: int = 0,
) -> np.ndarray:
    """The cross-attention weights of the chosen latents and heads over the input positions.

    x: [B, N, C], mask: [B, N] bool (True = keep) -> maps [B, len(heads), len(latents), N] in
    the model's dtype, ``maps[b, j, i]`` the weights with which latent ``latents[i]`` reads
    the N inputs in head ``heads[j]``: each row sums to 1 over the visible keys, masked keys are
    exactly 0. ``latents``, ``heads``: indices (an int or a sequence), default all of them
    (then ``maps`` is the block's whole P, [B, H, M, N]). ``block``: which cross block
    (``cross.{block}``); ``use``: which of its uses, for a block the schedule runs more than
    once (``block_order``; the golden names ``cross.{block}.use{use}``).

    Equal to the probabilities the plain path records (``model.forward(x, mask, record=r)`` on
    ``backend="numpy"``: ``r["cross.0.attn.probs"]``), but held only for the chosen rows: the
    extra memory is the maps and chunk-sized buffers, whatever N is.
    """
    if not isinstance(model, Perceiver):
        raise TypeError(f"model: expected a perceiver_np.Perceiver, got {type(model).__name__}")
    cfg, p = model.config, model.checked_params()
    latent_ids, head_ids, step = selection(cfg, latents=latents, heads=heads, block=block, use=use)
    x = model.checked_x(x)
    b, n, _ = x.shape
    mask = as_mask(mask, b, n)
    size = engine.chunk_positions(b)
    for x_c, _ in _pieces(model, x, mask, size):  # the model's refusal of a too large input
        engine.check_input_range("x", cfg, p, x_c)

    ops = engine_ops(cfg.backend)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is named by expect_finite_output
        z = _latents_before(cfg, p, step, lambda: _pieces(model, x, mask, size), b, ops)
        maps = _maps(cfg, p, z, _pieces(model, x, mask, size), latent_ids, head_ids, block, n, ops)
    if mask is not None:
        # a sample with no visible key: the forward's weights do not depend on its scores
        blind = ~mask.any(axis=1)  # [B]
        maps[blind] = 0.0 if cfg.masked_rows == "zero" else maps.dtype.type(1) / maps.dtype.type(n)
    return maps


def selection(
    cfg: PerceiverConfig, *, latents: Any = None, heads: Any = None, block: int = 0, use: int = 0
) -> tuple[list[int], list[int], int]:
    """Check the rows :func:`attention_maps` is asked for against ``cfg`` -> (latent indices,
    head indices, the step of ``cfg.schedule`` that is use ``use`` of cross block ``block``).
    A ValueError's message starts with the argument's name (``latents: ...``)."""
    latent_ids = _indices("latents", latents, cfg.num_latents, "num_latents")
    head_ids = _indices("heads", heads, cfg.cross_num_heads, "the cross-attention's heads")
    block = _index("block", block, cfg.num_cross_layers, "num_cross_layers")
    steps = [s for s, step in enumerate(cfg.iter_schedule()) if step == ("cross", block)]
    use = _index("use", use, len(steps), f"the uses of cross block {block} in the schedule")
    return latent_ids, head_ids, steps[use]


def _index(name: str, value: Any, size: int, what: str) -> int:
    """``value`` as an int in [0, size), else a ValueError naming ``name``."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer in [0, {size}) ({what}: {size}), "
                         f"got {value!r}") from None
    if not 0 <= index < size:
        raise ValueError(f"{name}: expected an integer in [0, {size}) ({what}: {size}), got {index}")
    return index


def _indices(name: str, value: Any, size: int, what: str) -> list[int]:
    """``value`` (None: all; an int; a sequence of ints) as a non-empty list of indices in [0, size)."""
    if value is None:
        return list(range(size))
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return [_index(name, value, size, what)]
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, range, np.ndarray)):
        raise ValueError(f"{name}: expected an integer or a sequence of integers in [0, {size}), "
                         f"got {type(value).__name__}")
    items = list(np.asarray(value).reshape(-1)) if isinstance(value, np.ndarray) else list(value)
    if not items:
        raise ValueError(f"{name}: expected at least one index in [0, {size}), got none")
    return [_index(name, v, size, what) for v in items]


def _pieces(model: Perceiver, x: np.ndarray, mask: np.ndarray | None, size: int) -> Pieces:
    """What the encoder reads, ``size`` positions at a time: (x_c [B, n, C + P], mask_c [B, n]),
    x_c with the model's input positions appended (``input_fourier``), else a view of x."""
    b, n, _ = x.shape
    positions = model.input_positions  # [N, P] or None
    for start in range(0, n, size):
        x_c = x[:, start:start + size]
        if positions is not None:
            pos = positions[start:start + size]  # [n, P]
            x_c = np.concatenate([x_c, np.broadcast_to(pos, (b, *pos.shape))], axis=-1)
        yield x_c, None if mask is None else mask[:, start:start + size]


def _latents_before(cfg: PerceiverConfig, p: Params, step: int, passes: Callable[[], Pieces], batch: int,
                    ops: EngineOps) -> np.ndarray:
    """z [B, M, D]: the latents entering step ``step`` of the schedule, the steps before it run
    on the inference engine (:mod:`perceiver_np.engine`), the input read in chunks. A sample with
    no visible key gets zero attention here whatever ``masked_rows`` says: its maps do not
    depend on its latents (:func:`attention_maps` sets them)."""
    z = np.repeat(p["latents"][None], batch, axis=0)  # [M, D] -> [B, M, D], owned
    in_weight = p["input_proj.weight"] if cfg.input_projection else None
    in_bias = p["input_proj.bias"] if cfg.input_projection else None
    for kind, i in cfg.schedule[:step]:
        if kind == "cross":
            z, _ = engine.cross_block(z, passes(), params_under(p, f"cross.{i}"), ops,
                                      num_heads=cfg.cross_num_heads, in_weight=in_weight,
                                      in_bias=in_bias, use_query_residual=cfg.use_query_residual,
                                      gelu=cfg.gelu, ffn_kind=cfg.ffn_kind)
        else:
            z = engine.self_block(z, params_under(p, f"self.{i}"), ops, num_heads=cfg.num_heads,
                                  gelu=cfg.gelu, ffn_kind=cfg.ffn_kind)
        expect_finite_output(f"{kind}.{i} output", z)
    return z


def _maps(cfg: PerceiverConfig, p: Params, z: np.ndarray, pieces: Pieces, latent_ids: list[int],
          head_ids: list[int], block: int, n: int, ops: EngineOps) -> np.ndarray:
    """The weights of the chosen rows of cross block ``block`` over its input: z [B, M, D] ->
    [B, h, m, N], one pass over ``pieces``. Rows with no visible key are left for the caller."""
    bp = params_under(p, f"cross.{block}")
    heads = cfg.cross_num_heads
    b = z.shape[0]

    def chosen(w: np.ndarray) -> np.ndarray:
        """The chosen heads' columns: [in, H*dh] -> [in, h*dh] (head j owns [j*dh, (j+1)*dh))."""
        return np.ascontiguousarray(w.reshape(w.shape[0], heads, -1)[:, head_ids].reshape(w.shape[0], -1))

    def chosen_bias(name: str) -> np.ndarray:
        """A projection's bias of the chosen heads, shaped to add to [B, h, L, dh]."""
        return bp[name].reshape(heads, -1)[head_ids][None, :, None, :]  # [H*dh] -> [1, h, 1, dh]

    h = len(head_ids)
    zq = np.ascontiguousarray(z[:, latent_ids])  # [B, M, D] -> [B, m, D]
    (q,) = ops.project_heads(zq, [chosen(bp["attn.q.weight"])], h,
                             norm=(bp["q_norm.gamma"], bp["q_norm.beta"], None))  # [B, h, m, dh]
    if "attn.q.bias" in bp:
        q += chosen_bias("attn.q.bias")
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    w_k = chosen(bp["attn.k.weight"])  # [Ckv, h*dh]
    in_weight = p["input_proj.weight"] if cfg.input_projection else None
    in_bias = p["input_proj.bias"] if cfg.input_projection else None
    maps = np.empty((b, h, len(latent_ids), n), dtype=z.dtype)  # scores first, then weights
    lse: np.ndarray | None = None  # [B, h, m], over the chunks read so far
    start = 0
    for x_c, mask_c in pieces:
        width = x_c.shape[1]
        feats = x_c if in_weight is None else ops.matmul_batched(x_c, in_weight)  # [B, n, Ckv]
        (k,) = ops.project_heads(np.ascontiguousarray(feats), [w_k], h,
                                 norm=(bp["kv_norm.gamma"], bp["kv_norm.beta"], in_bias))  # [B, h, n, dh]
        if "attn.k.bias" in bp:
            k += chosen_bias("attn.k.bias")
        # the (o, lse) attention for its lse alone: the values are one channel of zeros
        _, lse_c = ops.attention_forward(q, k, np.zeros((*k.shape[:3], 1), dtype=k.dtype), mask_c)
        lse = lse_c if lse is None else np.logaddexp(lse, lse_c)  # log(e^lse + e^lse_c): [B, h, m]
        s = (q @ k.transpose(0, 1, 3, 2)) * scale  # [B, h, m, dh] @ [B, h, dh, n] -> [B, h, m, n]
        if mask_c is not None:
            s = np.where(mask_c[:, None, None, :], s, s.dtype.type(MASK_FILL))
        maps[..., start:start + width] = s
        start += width
    assert lse is not None and start == n
    maps -= lse[..., None]
    return np.exp(maps, out=maps)  # p = exp(s - lse); exp(MASK_FILL - lse) is exactly 0


# ---------------------------------------------------------------------------------------------
# Drawing (matplotlib, imported here only)
# ---------------------------------------------------------------------------------------------


def _figure_class() -> Any:
    """matplotlib's Figure (drawn without pyplot: no backend is chosen, no figure is kept), or
    an ImportError saying how to get it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("drawing attention maps needs matplotlib, which is not installed: "
                          "pip install matplotlib (or perceiver_np's [demo] extra)") from err
    return Figure


def draw_attention_maps(
    maps: Any,
    *,
    path: str | Path | None = None,
    image_shape: Sequence[int] | None = None,
    image: Any = None,
    latents: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> Any:
    """Draw one sample's maps [h, m, N] (``attention_maps(...)[b]``) over the input positions:
    one panel per (latent, head), a row per latent and a column per head.

    Without ``image_shape`` the N positions are a sequence: each panel plots the weight against
    the position (above MAX_LINE_POINTS positions, the maximum over bins of positions). With
    ``image_shape=(H, W)`` (N = H*W, positions in row-major order, as
    :func:`perceiver_np.position.image_to_inputs` flattens an image) each panel is the map as
    an H x W image; ``image`` [H, W] or [H, W, 3] (which implies ``image_shape``) is drawn
    beneath it. ``latents``, ``heads``: the indices to print in the panels' titles (default
    0, 1, ...). Writes a PNG to ``path`` (atomically) when given; returns the matplotlib
    Figure (``display(fig)`` in a notebook)."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.dtype.kind != "f" or 0 in maps.shape:
        raise ValueError(f"maps: expected one sample's float maps [heads, latents, N] "
                         f"(attention_maps(...)[b]), got {maps.dtype.name} {maps.shape}")
    n_heads, n_latents, n = maps.shape
    latent_labels = list(range(n_latents)) if latents is None else list(latents)
    head_labels = list(range(n_heads)) if heads is None else list(heads)
    for name, labels, count in (("latents", latent_labels, n_latents), ("heads", head_labels, n_heads)):
        if len(labels) != count:
            raise ValueError(f"{name}: expected {count} labels like maps {maps.shape}, got {len(labels)}")
    picture = None
    if image is not None:
        picture = np.asarray(image)
        if picture.ndim == 3 and picture.shape[2] == 1:
            picture = picture[..., 0]
        if picture.ndim not in (2, 3) or (picture.ndim == 3 and picture.shape[2] != 3):
            raise ValueError(f"image: expected [H, W] or [H, W, 3], got {picture.shape}")
        if picture.ndim == 3 and picture.dtype.kind == "f":  # RGB floats are shown in [0, 1]
            low, high = float(picture.min()), float(picture.max())
            picture = (picture - low) / (high - low if high > low else 1.0)
        if image_shape is None:
            image_shape = picture.shape[:2]
    grid = None
    if image_shape is not None:
        grid = tuple(int(s) for s in image_shape)
        if len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] != n:
            raise ValueError(f"image_shape: expected (H, W) with H * W = N = {n}, got {tuple(image_shape)}")
        if picture is not None and picture.shape[:2] != grid:
            raise ValueError(f"image: expected {grid} pixels like image_shape, got {picture.shape}")
    figure_class = _figure_class()
    panel = (2.4, 2.2) if grid else (max(4.0, 8.0 / n_heads), 1.6)
    fig = figure_class(figsize=(panel[0] * n_heads, panel[1] * n_latents + (0.4 if title else 0.0)),
                       layout="constrained")
    axes = np.asarray(fig.subplots(n_latents, n_heads, squeeze=False))  # [m, h]
    for i in range(n_latents):
        for j in range(n_heads):
            ax, weights = axes[i, j], maps[j, i]
            ax.set_title(f"latent {latent_labels[i]}, head {head_labels[j]}", fontsize=8)
            if grid is None:
                _draw_sequence(ax, weights, last_row=i == n_latents - 1, first_column=j == 0)
            else:
                _draw_image(fig, ax, weights.reshape(grid), picture)
    if title:
        fig.suptitle(title)
    if path is not None:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=120))
    return fig


def _draw_sequence(ax: Any, weights: np.ndarray, *, last_row: bool, first_column: bool) -> None:
    """weights [N] against the position; above MAX_LINE_POINTS, each bin's maximum."""
    n = weights.size
    step = math.ceil(n / MAX_LINE_POINTS)
    starts = np.arange(0, n, step)
    ax.plot(starts, np.maximum.reduceat(weights, starts) if step > 1 else weights, linewidth=0.8)
    ax.set_xlim(0, n - 1 if n > 1 else 1)
    ax.set_ylim(bottom=0.0)
    ax.tick_params(labelsize=7)
    if last_row:
        ax.set_xlabel("input position" + (f" (max over {step} positions)" if step > 1 else ""), fontsize=8)
    if first_column:
        ax.set_ylabel("weight", fontsize=8)


def _draw_image(fig: Any, ax: Any, weights: np.ndarray, picture: np.ndarray | None) -> None:
    """weights [H, W] as an image with its colour bar; over ``picture`` [H, W(, 3)] when given,
    each pixel of the map as opaque as its weight is large, so the picture shows where the
    latent reads little."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ax.set_axis_off()
    cmap = colormaps["viridis"]
    norm = Normalize(vmin=0.0, vmax=max(float(weights.max()), np.finfo(np.float64).tiny))
    if picture is None:
        shown = ax.imshow(weights, cmap=cmap, norm=norm, interpolation="nearest")
    else:
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
        rgba = cmap(norm(weights))  # [H, W, 4]
        rgba[..., 3] = 0.9 * norm(weights)  # opacity: the weight relative to the largest
        ax.imshow(rgba, interpolation="nearest")
        shown = ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=6)
