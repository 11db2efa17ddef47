"""The inference engine: what ``model(x)`` and ``model.encode_stream(chunks)`` run, on either backend.

::

    ops = backends.engine_ops(cfg.backend)                   # the kernels, or their plain twins
    z = engine.encode(cfg, params, passes, batch=B, ops=ops)  # [B, M, D]: encoder + final LN
    y = model.decode(z)[0]                                    # = model(x) = model.forward(x)[0]

One encoder for a whole input and for an input that arrives in chunks: ``passes()`` returns a
fresh iterable of ``(x_c [B, n, C], mask_c [B, n] or None)`` pieces along N (one pass per cross
block); ``model(x)`` hands it the whole array, the streaming encoder
(:mod:`perceiver_np.stream`) a file read a chunk at a time. The same function as
:meth:`Perceiver.forward` in inference (tested equal on both backends: float64 to
FAST_FLOAT64_RTOL, float32 within its bound), with fewer passes over memory. Per cross block::

    h  = x_c @ W_in                                per chunk of the input, [B, n, C] -> [B, n, D]
    k, v = LN_kv(h + b_in) @ [W_k | W_v]           [B, n, Ckv] -> [B, H, n, dh | dv]
    o_c, lse_c = attention(q, k, v, mask_c)        per chunk, merged over the chunks (merge_chunk)
    o  = o + b_v   (rows with a visible key)       [B, H, M, dv]
    z += merge(o) @ W_out + b_out; u = LN_ffn(z)   z owned, updated in place
    g  = GELU(u @ W_up + b_up)                     bias and GELU in one pass, in place
         (GEGLU: g = (u @ W_up + b_up)[:, :wD] * GELU((u @ W_up + b_up)[:, wD:]))
    z += g @ W_down + b_down

Without q/k/v biases (``qkv_bias=False``) their steps are left out.

Two biases are moved, not dropped from the math:

- ``b_k`` adds ``q . b_k`` to every score of a query's row; the softmax is invariant to that, so
  the keys are used without it (exactly so in exact arithmetic, and masked keys are skipped, not
  shifted). Its gradient is exactly 0 (docs/backward.md).
- ``b_v``: ``P (V + 1 b_v^T) = P V + b_v`` because a softmax row sums to 1; added once per
  output row instead of once per key, and only on rows that see a key (a row with no visible
  key is 0, as in the forward).

With the ``"numba"`` ops every product runs on Numba's pool and everything between two products
is one fused row kernel; with the ``"numpy"`` ops (the plain twins of
:mod:`perceiver_np.backends`) the same steps are plain NumPy, for reading and for checking.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .backends import EngineOps, engine_ops
from .config import PerceiverConfig, param_shapes
from .kernels.gemm import PRODUCT, reads_in_place
from .layers import Params, params_under
from .shapes import (
    ChunkState,
    OverflowRisk,
    expect_finite_output,
    expect_in_range,
    expect_shape,
    first_nonfinite,
)
from .workspace import Alloc, fresh, scoped

#: Rows (batch x positions) per chunk of the cross-attentions' input side: every buffer of the
#: input side is [CHUNK_ROWS, width], so the engine's extra memory does not grow with N
#: (docs/fast.md has the measurement behind the size).
CHUNK_ROWS = 16384

#: The weights of a block that the engine reads only through products checked with
#: ``finite=True`` (their outputs looked at for NaN and infinity while in cache).
CHECKED_BY_PRODUCT = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.out.weight",
                      "ffn.up.weight", "ffn.down.weight")

Piece = tuple[np.ndarray, "np.ndarray | None"]  # (x_c [B, n, C], mask_c [B, n] bool or None)
Passes = Callable[[], Iterable[Piece]]  # a fresh pass over the input's pieces, along N


def check_owned_latents(z: np.ndarray) -> np.ndarray:
    """``z``, the latents a block updates in place: a writeable C-contiguous [B, M, D] array."""
    if not (isinstance(z, np.ndarray) and z.ndim == 3 and z.flags.c_contiguous and z.flags.writeable):
        raise ValueError("z: expected a writeable C-contiguous array [B, M, D] (the engine's blocks "
                         "update the latents in place)")
    return z


def after_attention(
    z: np.ndarray, o: np.ndarray, visible: np.ndarray | None, p: Params, ops: EngineOps, *,
    query_residual: bool, gelu: str, ffn_kind: str = "gelu", alloc: Alloc = fresh,
) -> np.ndarray:
    """The rest of a block after its attention core, on owned latents z [B, M, D] (updated in
    place when ``query_residual``): the value bias, the output projection and its residual, and
    the whole FFN sublayer. o: [B, H, M, dv] -> z [B, M, D]. Every intermediate comes from
    ``alloc`` (:mod:`perceiver_np.workspace`), named by the step that makes it."""
    b, _, m, _ = o.shape
    d = p["attn.out.weight"].shape[1]
    if query_residual:
        expect_shape("z", check_owned_latents(z), (b, m, d), "[B, M, D]")
    # o + b_v (on the rows of samples that saw a key): [B, H, M, dv] -> [B, M, H, dv] = [B*M, H*dv]
    merged = ops.merge_heads(o, p.get("attn.v.bias"), visible, alloc=scoped(alloc, "merged"))
    if not query_residual:
        z = np.zeros((b, m, d), dtype=o.dtype)  # the new latents: the caller keeps them
    z2 = z.reshape(b * m, d)  # [B, M, D] -> [B*M, D], a view: updated in place
    # z += merged @ W_out + b_out, then u = LN_ffn(z): [B*M, H*dv] -> [B*M, D]
    u = ops.matmul_residual(merged, p["attn.out.weight"], z2, p["attn.out.bias"],
                            norm=(p["ffn_norm.gamma"], p["ffn_norm.beta"]), alloc=scoped(alloc, "out"),
                            finite=True)
    if ffn_kind == "geglu":
        g = ops.matmul(u, p["ffn.up.weight"], alloc=scoped(alloc, "ffn.up"), finite=True)  # [B*M, 2wD]
        wd = g.shape[1] // 2
        gate = alloc("ffn.gate", (b * m, wd), g.dtype)
        gate[...] = g[:, wd:]  # [B*M, 2wD] -> [B*M, wD]
        ops.bias_gelu(gate, p["ffn.up.bias"][wd:], gelu)
        value = alloc("ffn.value", (b * m, wd), g.dtype)
        np.add(g[:, :wd], p["ffn.up.bias"][:wd], out=value)
        value *= gate  # value half times GELU(gate half): [B*M, wD]
        g = value
    else:  # GELU(u @ W_up + b_up): [B*M, D] -> [B*M, wD]
        g = ops.matmul(u, p["ffn.up.weight"], bias=p["ffn.up.bias"], gelu=gelu, alloc=scoped(alloc, "ffn.up"),
                       finite=True)
    # z += g @ W_down + b_down: [B*M, wD] -> [B*M, D]
    ops.matmul_residual(g, p["ffn.down.weight"], z2, p["ffn.down.bias"], alloc=scoped(alloc, "ffn.down"),
                        finite=True)
    return z


def chunk_positions(b: int) -> int:
    """Positions per chunk for a batch of b: CHUNK_ROWS rows of every [B*n, ·] buffer."""
    return max(1, CHUNK_ROWS // b)


def pieces_of(x: np.ndarray, mask: np.ndarray | None, size: int) -> list[Piece]:
    """x [B, N, C] and mask [B, N] cut along N into views of ``size`` positions."""
    return [(x[:, i:i + size], None if mask is None else mask[:, i:i + size])
            for i in range(0, x.shape[1], size)]


def cross_block(
    z: np.ndarray, pieces: Iterable[Piece], p: Params, ops: EngineOps, *, num_heads: int,
    in_weight: np.ndarray | None, in_bias: np.ndarray | None, use_query_residual: bool, gelu: str,
    ffn_kind: str = "gelu", alloc: Alloc = fresh,
) -> tuple[np.ndarray, int]:
    """z: [B, M, D] owned latents (updated in place) attend to an input that arrives in pieces
    along N -> (z [B, M, D], N).

    The pieces (x_c [B, n, C], views into a longer array are fine, with their masks
    mask_c [B, n]) are cut to ``chunk_positions(B)`` positions. Per chunk: the keys and values of
    ``LN_kv(x_c @ in_weight + in_bias)`` (or ``LN_kv(x_c)`` with no input projection), in the
    attention's layout (``ops.project_input``: on the kernels the projection, the LayerNorm and
    the key and value products are done tile by tile, in cache), the attention's ``(o_c, lse_c)``, folded
    into the running float64 state with ``merge_chunk``. Every buffer is chunk-sized, and taken
    from ``alloc``: a chunk's buffers are reused by the next chunk, so the first chunk's result
    is folded into the running state before the second is computed."""
    b, m, _ = check_owned_latents(z).shape
    # LN_q(z) @ W_q, the LayerNorm fused into the product: [B, M, D] -> [B, H, M, dh]
    (q,) = ops.project_heads(z, [p["attn.q.weight"]], num_heads,
                             norm=(p["q_norm.gamma"], p["q_norm.beta"], None), alloc=scoped(alloc, "q"),
                             finite=True)
    if "attn.q.bias" in p:
        q += p["attn.q.bias"].reshape(num_heads, -1)[None, :, None, :]
    ckv = p["kv_norm.gamma"].shape[0]
    dh, dv = q.shape[3], p["attn.v.weight"].shape[1] // num_heads
    norm = (p["kv_norm.gamma"], p["kv_norm.beta"], in_bias)
    pieces = iter(pieces)
    head = next(pieces, None)  # the first piece's length decides the way (a stream only adds more)
    pieces = itertools.chain([] if head is None else [head], pieces)
    folded = in_weight is not None and head is not None and folds(head[0].shape[1], m, num_heads, ckv, dh, dv)
    if folded:
        # the keys' projection moved onto the queries: scores q_h . (h W_k,h) = (q_h W_k,h^T) . h
        # [B, H, M, dh] -> [B, M*H, Ckv]
        qf = fold_queries(q, p["attn.k.weight"], ops, alloc=scoped(alloc, "fold"))
        chunks = (chunk for piece in pieces for chunk in _whole_or_chunks(piece, b))
    else:
        chunks = (chunk for piece in pieces for chunk in pieces_of(*piece, chunk_positions(b)))
    state: ChunkState | None = None  # made at the second chunk: one chunk needs no merging
    first: tuple[np.ndarray, np.ndarray] | None = None
    visible = np.zeros(b, dtype=bool)  # [B]: the sample saw a key
    n_total = 0
    for x_c, mask_c in chunks:
        n = x_c.shape[1]
        if first is not None and state is None:  # the second chunk: fold the first one in first
            state = ops.chunk_state(*first[0].shape, alloc=scoped(alloc, "state"))
            ops.merge_chunk(state, *first)
        if in_weight is not None:
            expect_shape("input projection", in_weight, (x_c.shape[2], ckv), "[C, Ckv]")
        if folded:
            # h = LN_kv(x_c @ W_in + b_in) is each key and its value: [B, n, C] -> [B, n, Ckv],
            # made tile by tile in cache; softmax(qf h^T / sqrt(dh)) h: [B, 1, M*H, Ckv]
            o_c, lse_c = ops.input_attention(x_c, in_weight, norm, qf, mask_c, 1.0 / math.sqrt(dh),
                                             alloc=scoped(alloc, "attention"), finite=True)
        else:
            if in_weight is not None:
                # LN_kv(x_c @ W_in + b_in) @ W_k, @ W_v: [B, n, C] -> [B, n, Ckv] -> [B, H, n, dh]
                # (no b_k), [B, H, n, dv] (b_v later); the projection h never leaves the cache
                k, v = ops.project_input(x_c, in_weight, norm, [p["attn.k.weight"], p["attn.v.weight"]],
                                         num_heads, alloc=scoped(alloc, "kv"), finite=True)
            else:
                h = np.ascontiguousarray(x_c)  # [B, n, Ckv]
                expect_shape("cross input chunk", h, (b, n, ckv), "[B, n, Ckv]")
                # LN_kv(h) @ W_k, @ W_v: [B, n, Ckv] -> [B, H, n, dh] (no b_k), [B, H, n, dv] (b_v later)
                k, v = ops.project_heads(h, [p["attn.k.weight"], p["attn.v.weight"]], num_heads,
                                         norm=norm, alloc=scoped(alloc, "kv"), finite=True)
            o_c, lse_c = ops.attention_forward(q, k, v, mask_c,
                                               alloc=scoped(alloc, "attention"))  # [B, H, M, dv], [B, H, M]
        if state is None:
            first = (o_c, lse_c)
        else:
            ops.merge_chunk(state, o_c, lse_c)
        visible |= True if mask_c is None else mask_c.any(axis=1)
        n_total += n
    if n_total == 0:
        raise ValueError("chunks: the input is empty (N = 0)")
    assert first is not None
    o = first[0] if state is None else ops.finish_chunks(state, z.dtype, alloc=scoped(alloc, "state"))
    if folded:  # the values' projection after the weighted sum: (P h) W_v,h = P (h W_v,h)
        # [B, 1, M*H, Ckv] -> [B, H, M, dv]
        o = unfold_values(o, p["attn.v.weight"], num_heads, ops, alloc=scoped(alloc, "fold"))
    return after_attention(z, o, visible, p, ops, query_residual=use_query_residual, gelu=gelu,
                           ffn_kind=ffn_kind, alloc=alloc), n_total


#: The folded cross-attention is taken when it needs at most this fraction of the plain way's
#: multiply-adds (:func:`folds`): its kernel's products are smaller than the plain way's
#: large projections, so it needs a margin to win (docs/fast.md: 3% slower at N = 256 with
#: equal counts, 4% faster at N = 1k and 17% at N = 4k on the seed model, B = 32).
FOLD_MAX_COST = 0.9


def folds(n: int, m: int, heads: int, ckv: int, dh: int, dv: int) -> bool:
    """Whether the cross-attention of ``m`` queries with ``heads`` heads (dh-wide keys, dv-wide
    values) to ``n`` input positions of width ``ckv`` is run folded (docs/fast.md, "The folded
    cross-attention"): when that needs at most FOLD_MAX_COST of the plain way's multiply-adds.
    Per sample, the plain way projects the keys and values, n * ckv * H * (dh + dv), then
    scores and sums them, n * H * m * (dh + dv); folded, the queries are moved into the input's
    space and back, m * H * ckv * (dh + dv), and score and sum the normalised input itself,
    n * 2 * H * m * ckv."""
    plain = n * heads * (dh + dv) * (ckv + m)
    folded = m * heads * ckv * (dh + dv) + n * 2 * heads * m * ckv
    return folded <= FOLD_MAX_COST * plain


def fold_queries(q: np.ndarray, w_k: np.ndarray, ops: EngineOps, *, alloc: Alloc = fresh) -> np.ndarray:
    """q: [B, H, M, dh] (the head-split view of a [B, M, H*dh] buffer, or any layout), w_k:
    [Ckv, H*dh] -> qf [B, M*H, Ckv] with qf[b, m*H + h] = q[b, h, m] @ W_k,h^T, W_k,h the
    columns of head h: each query moved into the input's space, where its score with a key
    h_j W_k,h is qf . h_j. A checked product (``finite``: a NaN or inf in W_k shows in its
    output, q being finite)."""
    b, heads, m, dh = q.shape
    ckv = w_k.shape[0]
    expect_shape("attn.k.weight", w_k, (ckv, heads * dh), "[Ckv, H*dh]")
    rows = q.transpose(0, 2, 1, 3).reshape(b * m, heads * dh)  # [B, H, M, dh] -> [B*M, H*dh]
    # [B*M, H*dh] -> [B*M, H*Ckv], head by head: [B*M, dh] @ [dh, Ckv]
    qf = ops.head_products(rows, w_k, heads, transpose_w=True, alloc=alloc, finite=True)
    return qf.reshape(b, m * heads, ckv)  # [B*M, H*Ckv] -> [B, M*H, Ckv]


def unfold_values(of: np.ndarray, w_v: np.ndarray, heads: int, ops: EngineOps, *,
                  alloc: Alloc = fresh) -> np.ndarray:
    """of: [B, 1, M*H, Ckv] (the folded attention's output, rows as :func:`fold_queries` made
    them), w_v: [Ckv, H*dv] -> o [B, H, M, dv] with o[b, h, m] = of[b, 0, m*H + h] @ W_v,h,
    the head-split view of a [B, M, H*dv] buffer. A checked product (a NaN or inf in W_v
    shows in its output)."""
    b, _, mh, ckv = of.shape
    m, dv = mh // heads, w_v.shape[1] // heads
    expect_shape("attn.v.weight", w_v, (ckv, heads * dv), "[Ckv, H*dv]")
    rows = of.reshape(b * m, heads * ckv)  # [B, 1, M*H, Ckv] -> [B*M, H*Ckv]
    # [B*M, H*Ckv] -> [B*M, H*dv], head by head: [B*M, Ckv] @ [Ckv, dv]
    o = ops.head_products(rows, w_v, heads, alloc=alloc, finite=True)
    return o.reshape(b, m, heads, dv).transpose(0, 2, 1, 3)  # [B*M, H*dv] -> [B, H, M, dv]


def _whole_or_chunks(piece: Piece, b: int) -> list[Piece]:
    """The folded attention keeps nothing per input position, so a piece the kernel reads where
    it lies is taken whole (one call: nothing to merge); one it would copy first (a read-only
    memory map, a transposed view) is cut to ``chunk_positions(b)`` positions, so that the copy
    is chunk-sized as on the plain way."""
    x_c, _ = piece
    return [piece] if reads_in_place(x_c) else pieces_of(*piece, chunk_positions(b))


def decode_queries(queries: np.ndarray, z: np.ndarray, p: Params, ops: EngineOps, *, num_heads: int,
                   use_query_residual: bool, gelu: str, ffn_kind: str = "gelu", name: str = "decoder",
                   alloc: Alloc = fresh) -> np.ndarray:
    """A decoder's cross block in inference: queries [B, O, Cq] attend to the latents z [B, M, D]
    -> [B, O, Cq], a new array. :func:`cross_block` with the queries in the latents' place and the
    latents as its input, one unmasked chunk of M keys (the same function as
    :func:`perceiver_np.blocks.cross_block_forward` in inference, tested equal). An overflow in
    a product is named ``"{name} output"``."""
    owned = np.array(queries, dtype=z.dtype, order="C")  # [B, O, Cq], updated in place
    with products_named(f"{name} output"):
        y, _ = cross_block(owned, [(z, None)], p, ops, num_heads=num_heads, in_weight=None, in_bias=None,
                           use_query_residual=use_query_residual, gelu=gelu, ffn_kind=ffn_kind,
                           alloc=alloc)
    expect_finite_output(f"{name} output", y)
    return y


def self_block(z: np.ndarray, p: Params, ops: EngineOps, *, num_heads: int, gelu: str,
               ffn_kind: str = "gelu", alloc: Alloc = fresh) -> np.ndarray:
    """z: [B, M, D] owned latents, updated in place -> [B, M, D]; intermediates from ``alloc``."""
    check_owned_latents(z)
    # LN(z) @ W_q, @ W_k, @ W_v, the LayerNorm fused into the product:
    # [B, M, D] -> [B, H, M, dh|dh|dv] (no b_k, b_v later)
    q, k, v = ops.project_heads(z, [p["attn.q.weight"], p["attn.k.weight"], p["attn.v.weight"]],
                                num_heads, norm=(p["norm.gamma"], p["norm.beta"], None),
                                alloc=scoped(alloc, "qkv"), finite=True)
    if "attn.q.bias" in p:
        q += p["attn.q.bias"].reshape(num_heads, -1)[None, :, None, :]
    o, _ = ops.attention_forward(q, k, v, None, alloc=scoped(alloc, "attention"))  # [B, H, M, dv]
    return after_attention(z, o, None, p, ops, query_residual=True, gelu=gelu, ffn_kind=ffn_kind,
                           alloc=alloc)


@contextlib.contextmanager
def products_named(name: str) -> Iterator[None]:
    """A product checked inside (``finite=True``) that saw NaN or infinity raises OverflowRisk
    of ``gemm.PRODUCT``; here it becomes the OverflowRisk of ``name``, the step's output."""
    try:
        yield
    except OverflowRisk as e:
        if e.tensor != PRODUCT:
            raise
        raise OverflowRisk(name, "non-finite values in a product of the block; produced from finite "
                           "inputs and parameters: an overflow, the parameters are too large for "
                           "the dtype") from None


def product_weights(cfg: PerceiverConfig) -> frozenset[str]:
    """The parameters whose finiteness the engine checks itself, through the outputs of the
    products that read them: every block's attention and FFN weights (CHECKED_BY_PRODUCT). The
    inputs of those products are finite (checked, or the output of a checked step), so a NaN or
    an infinity in such a weight always shows in the product's output (NaN or inf times anything,
    0 included, is NaN or inf), which ends the call with OverflowRisk before any other kernel
    reads it. So a call of the engine need not scan these weights, which are most of a model's
    bytes (a memory-bound pass over all of them on every call: docs/fast.md). The model scans
    them only when a product has seen NaN or infinity, to name the parameter at fault
    (:meth:`perceiver_np.model.Perceiver.naming_bad_params`)."""
    names = set()
    for name in param_shapes(cfg):
        kind, _, rest = name.partition(".")  # "self.3.attn.q.weight" -> "self", "3.attn.q.weight"
        if kind in ("cross", "self") and rest.partition(".")[2] in CHECKED_BY_PRODUCT:
            names.add(name)
    return frozenset(names)


def encode(cfg: PerceiverConfig, p: Params, passes: Passes, *, batch: int, ops: EngineOps,
           alloc: Alloc = fresh) -> np.ndarray:
    """The encoder up to (and including) the final LayerNorm: the input of ``passes()`` -> z
    [B, M, D]. ``p`` are the model's checked parameters; ``passes`` is called once per cross
    block (so an input streamed from a file is read once per cross block). With several cross
    blocks and an input projection, the caller may project once and pass ``h`` instead (see
    :func:`encode_array`). Intermediates come from ``alloc`` (a model's workspace,
    :mod:`perceiver_np.workspace`; the default allocates afresh); z itself is always new."""
    in_weight = p["input_proj.weight"] if cfg.input_projection else None
    in_bias = p["input_proj.bias"] if cfg.input_projection else None
    return _encode(cfg, p, passes, batch, ops, in_weight, in_bias, alloc)


def encode_array(cfg: PerceiverConfig, p: Params, x: np.ndarray, mask: np.ndarray | None,
                 ops: EngineOps, alloc: Alloc = fresh) -> np.ndarray:
    """:func:`encode` for an input held whole, x [B, N, C] and mask [B, N] (as checked by the
    model): with several cross blocks the input projection is computed once for all of them
    (h [B, N, D] is then held whole, allocated afresh: a workspace keeps only chunk-sized
    buffers), else each chunk is projected when it is read."""
    crosses = sum(1 for kind, _ in cfg.schedule if kind == "cross")
    in_bias = p["input_proj.bias"] if cfg.input_projection else None
    if cfg.input_projection and crosses > 1:
        h = ops.matmul_batched(x, p["input_proj.weight"])  # [B, N, C] -> [B, N, D]
        return _encode(cfg, p, lambda: [(h, mask)], x.shape[0], ops, None, in_bias, alloc)
    return encode(cfg, p, lambda: [(x, mask)], batch=x.shape[0], ops=ops, alloc=alloc)


def _encode(cfg: PerceiverConfig, p: Params, passes: Passes, batch: int, ops: EngineOps,
            in_weight: np.ndarray | None, in_bias: np.ndarray | None, alloc: Alloc) -> np.ndarray:
    z = np.repeat(p["latents"][None], batch, axis=0)  # [M, D] -> [B, M, D], owned
    n_seen: int | None = None
    for kind, i in cfg.schedule:
        with products_named(f"{kind}.{i} output"):
            if kind == "cross":
                z, n = cross_block(z, passes(), params_under(p, f"cross.{i}"), ops,
                                   num_heads=cfg.cross_num_heads, in_weight=in_weight, in_bias=in_bias,
                                   use_query_residual=cfg.use_query_residual, gelu=cfg.gelu,
                                   ffn_kind=cfg.ffn_kind, alloc=scoped(alloc, "cross"))
                if n_seen is not None and n != n_seen:
                    raise ValueError(f"chunks: the input changed length between passes ({n_seen} then {n})")
                n_seen = n
            else:
                z = self_block(z, params_under(p, f"self.{i}"), ops, num_heads=cfg.num_heads, gelu=cfg.gelu,
                               ffn_kind=cfg.ffn_kind, alloc=scoped(alloc, "self"))
        expect_finite_output(f"{kind}.{i} output", z)
    if cfg.final_norm:
        z2 = z.reshape(-1, z.shape[-1])  # [B, M, D] -> [B*M, D], a view: normalised in place
        ops.layernorm(z2, p["final_norm.gamma"], p["final_norm.beta"], out=z2)
    expect_shape("encoded latents", z, (batch, cfg.num_latents, cfg.latent_dim), "[B, M, D]")
    return z


def overflow_limit(dtype: np.dtype, width: int) -> float:
    """The largest magnitude a LayerNorm input of ``width`` channels may reach: the sum of
    ``width`` squared deviations (each at most (2 v)^2) must stay below finfo.max, so that the
    plain path's variance is finite: v < sqrt(finfo.max / (4 width))."""
    return float(np.sqrt(np.finfo(dtype).max / (4.0 * width)))


def check_input_range(name: str, cfg: PerceiverConfig, p: Params, x: np.ndarray) -> None:
    """Refuse (:class:`~perceiver_np.shapes.OverflowRisk`, naming ``name``) an input x [B, n, C]
    so large that the input side could overflow the dtype: :func:`input_bound` against
    :func:`overflow_limit` of the key/value LayerNorm's width. ``model(x)``, ``forward`` and the
    streaming encoder all call it before computing anything, so they refuse the same input.
    NaN or infinity in x is a ValueError naming ``name``, the count and the first index (as
    :func:`~perceiver_np.shapes.as_real_input` raises it): the pass that finds max|x| finds
    them too, so the callers need not scan x twice."""
    bound, what = input_bound(cfg, p, x)
    if not math.isfinite(bound):  # NaN or infinity in x, or a bound beyond float64 (refused below)
        problem = first_nonfinite(name, x)
        if problem is not None:
            raise ValueError(problem)
    expect_in_range(name, x, bound, overflow_limit(cfg.np_dtype, cfg.kv_channels), what)


def input_bound(cfg: PerceiverConfig, p: Params, x: np.ndarray) -> tuple[float, str]:
    """A bound on the magnitude of what the cross blocks' key/value LayerNorm reads, and its
    name: with the input projection, ``max|x| * max_j sum_i |W_in[i, j]| + max|b_in|``
    (every entry of x @ W_in + b_in, and every partial sum of it, stays below it); without, max|x|
    (one parallel pass over x on the kernels: ``ops.max_abs``)."""
    top = engine_ops(cfg.backend).max_abs(x)
    if not cfg.input_projection:
        return top, "the key/value LayerNorm's input"
    w, bias = p["input_proj.weight"], p["input_proj.bias"]
    col, b_top = float(np.abs(w).sum(axis=0, dtype=np.float64).max()), float(np.abs(bias).max())
    return top * col + b_top, (f"the input projection x @ W_in + b_in (params['input_proj.weight']: "
                               f"column sums of |W_in| up to {col:.3g}; |b_in| up to {b_top:.3g})")
