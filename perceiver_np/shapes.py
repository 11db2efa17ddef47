"""The one shape vocabulary of perceiver_np, and the checks that keep shape comments true.

Every docstring and every ``# [..] -> [..]`` comment in the package uses these letters:

    B    batch size
    N    input length (number of input positions, the keys of the input cross-attention)
    C    input channels (``input_dim``)
    M    number of latents (``num_latents``)
    D    latent channels (``latent_dim``)
    H    attention heads
    dh   channels per head of queries and keys (qk / H)
    dv   channels per head of values (v / H)
    O    number of output queries (Perceiver IO decoders)

Derived widths: ``Ckv`` the width the cross-attention keys and values are projected from
(D with the input projection, C without), ``qk`` and ``v`` the total query/key and value widths,
``wD`` the FFN hidden width (widening factor times D).

A generic attention call has queries of length M and keys of length N; self-attention is the
case N = M. Functions check their boundaries with :func:`expect_shape` and :func:`expect_array`,
so a wrong shape fails loudly with the argument's name instead of broadcasting silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

class Alloc(Protocol):
    """What every engine op takes as ``alloc``: (name, shape, dtype) -> an uninitialised
    C-contiguous array of that shape and dtype (a model's workspace,
    :mod:`perceiver_np.workspace`)."""

    def __call__(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray: ...


class OverflowRisk(ValueError):
    """Finite inputs and parameters whose computation overflows, or could overflow, the dtype:
    ``tensor`` names what holds (or would hold) the non-finite values, ``detail`` says why.
    A ValueError like every other bad-input error; training turns it into its own
    ``NonFiniteError`` at the step where it happens (the parameters grew until it did)."""

    def __init__(self, tensor: str, detail: str) -> None:
        super().__init__(f"{tensor}: {detail}")
        self.tensor, self.detail = tensor, detail


class ChunkState(NamedTuple):
    """The running online-softmax state of attention over keys that arrive in chunks (the
    plain :func:`perceiver_np.attention.merge_chunk` and the kernel's update it alike)."""

    m: np.ndarray  # [B, H, M] float64, running max of the chunks' lse
    l: np.ndarray  # [B, H, M] float64, running sum of exp(lse_c - m)  # noqa: E741
    acc: np.ndarray  # [B, H, M, dv] float64, running sum of exp(lse_c - m) o_c


def expect_shape(name: str, array: np.ndarray, shape: Sequence[int | None], letters: str) -> None:
    """Raise ValueError unless ``array.shape`` matches ``shape`` (``None`` = any size).

    ``letters`` spells the expected shape in the vocabulary above, e.g. ``"[B, N, C]"``.
    """
    got = tuple(array.shape)
    ok = len(got) == len(shape) and all(e is None or e == g for e, g in zip(shape, got, strict=True))
    if not ok:
        sizes = ["?" if e is None else str(e) for e in shape]
        want = "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {letters} = {want}, got {got}")


def expect_array(
    name: str, value: object, dtype: np.dtype | None = None, ndim: int | None = None
) -> np.ndarray:
    """Return ``value`` as an ndarray, raising TypeError/ValueError that names ``name``.

    With ``dtype`` given the array must already have exactly that dtype (no silent cast).
    """
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {value.dtype.name}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {value.shape}")
    return value


def as_real_input(name: str, value: object, dtype: np.dtype, *, scan: bool = True) -> np.ndarray:
    """Cast real-valued input (int, unsigned or float) to ``dtype``; reject everything else.

    Complex, boolean, object and string input is a TypeError; NaN or infinity, or a finite
    value too large for ``dtype``, is a ValueError (a NaN input would otherwise reach the output
    silently, even through masked positions). ``scan=False``: an input already of ``dtype`` is
    not scanned for NaN and infinity here, because the caller does it next in a pass of its own
    (:func:`perceiver_np.engine.check_input_range`, which finds the largest magnitude and raises
    the same ValueError); one that needs a cast is scanned as always.
    """
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{name}: expected real-valued numbers (int or float), got dtype {arr.dtype.name}"
        )
    if not scan and arr.dtype == dtype:
        return arr
    problem = first_nonfinite(name, arr)
    if problem is not None:
        raise ValueError(problem)
    with np.errstate(over="ignore"):  # a finite value beyond the dtype's range is named below
        cast = arr.astype(dtype, copy=False)
    if cast is not arr:
        problem = first_nonfinite(name, cast)
        if problem is not None:
            top = float(np.max(np.abs(arr.astype(np.float64))))
            raise ValueError(f"{name}: values up to {top:.3g} do not fit in {np.dtype(dtype).name} "
                             f"(largest {float(np.finfo(dtype).max):.3g}), the model's dtype")
    return cast


def as_mask(
    mask: object, batch: int, length: int, *, name: str = "mask", letters: str = "[B, N]"
) -> np.ndarray | None:
    """Validate a padding mask: bool ``[B, N]`` (or ``[B, O]``), True = keep. ``None`` passes."""
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        hint = "e.g. mask = (padding == 0)"
        if arr.dtype.kind in "iu":  # the ports' integer masks are keep-masks, not padding masks
            hint = ("a keep-mask (Hugging Face's attention_mask, DeepMind's input_mask: 1 = keep) "
                    "converts as mask = keep.astype(bool); a padding mask (1 = padding) as "
                    "mask = (padding == 0)")
        raise TypeError(
            f"{name}: expected dtype bool (True = keep this position), got {arr.dtype.name}; "
            f"convert explicitly: {hint}"
        )
    expect_shape(name, arr, (batch, length), letters)
    return arr


def first_nonfinite(name: str, array: np.ndarray) -> str | None:
    """None when every entry of the float array is finite, else a message naming ``name``, the
    count of NaN/inf entries and the first one's index. One sum in the array's own dtype decides
    the common case: a NaN or an infinity among the entries makes the sum NaN or infinite, so a
    finite sum proves every entry finite. Only a non-finite sum (a bad entry, or finite entries
    whose sum overflowed) pays for the entry-by-entry look."""
    if array.dtype.kind != "f" or array.size == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the case decided below
        if np.isfinite(array.sum()):
            return None
    bad = ~np.isfinite(array)
    if not bad.any():  # finite entries whose sum overflowed
        return None
    if array.ndim == 0:
        return f"{name}: {array.item()} is not finite"
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{name}: {int(bad.sum())} non-finite value(s) (NaN or inf), first at index {first}"


def expect_finite_output(name: str, array: np.ndarray) -> None:
    """Raise :class:`OverflowRisk` naming ``name`` when ``array``, computed from finite and
    in-range inputs and finite parameters, holds NaN or infinity: an overflow inside the step."""
    problem = first_nonfinite(name, array)
    if problem is not None:
        raise OverflowRisk(name, problem.partition(": ")[2] + "; produced from finite inputs and parameters: "
                           "an overflow, the parameters are too large for the dtype")


def expect_in_range(name: str, array: np.ndarray, bound: float, limit: float, what: str) -> None:
    """Raise :class:`OverflowRisk` when ``bound`` (a bound on the magnitudes a computation on
    ``array`` can reach) is not below ``limit``: the computation ``what`` (which names the
    parameters it involves) could overflow ``array``'s dtype. Checked before the computation,
    so every path refuses the same input."""
    if not bound < limit:
        top = float(max(np.max(array), -np.min(array)))
        raise OverflowRisk(name, (
            f"values up to {top:.3g} are too large for {array.dtype.name}: {what} could reach "
            f"{bound:.3g}, and LayerNorm's variance of it would overflow (the bound is {limit:.3g}); "
            "scale the input or the parameters down, or use dtype='float64'"))


def check_attention_args(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float | None
) -> float:
    """Validate the shapes and dtypes shared by both paths; return the scale to use."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype.name}")
        if a.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype.name} like q, got {a.dtype.name}")
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [B, H, M, dh], got {q.shape}")
    b, h, m, dh = q.shape
    if k.ndim != 4:
        raise ValueError(f"k: expected shape [B, H, N, dh], got {k.shape}")
    n = k.shape[2]
    expect_shape("k", k, (b, h, n, dh), "[B, H, N, dh]")
    expect_shape("v", v, (b, h, n, None), "[B, H, N, dv]")
    if min(b, h, m, n, dh, v.shape[3]) == 0:
        raise ValueError(f"q, k, v: every size must be positive, got q {q.shape}, v {v.shape}")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            got = mask.dtype.name if isinstance(mask, np.ndarray) else type(mask).__name__
            raise TypeError(f"mask: expected a bool array (True = keep), got {got}")
        expect_shape("mask", mask, (b, n), "[B, N]")
    if scale is None:
        return 1.0 / math.sqrt(dh)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number, got {scale}")
    return float(scale)


def pad_sequences(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sequences [n_i, C] -> (x [B, max n, C] zero-padded, mask [B, max n], True = real): how
    ``perceiver-np predict`` and :mod:`perceiver_np.distributed` batch ragged inputs."""
    n = max(len(s) for s in seqs)
    x = np.zeros((len(seqs), n, seqs[0].shape[1]), dtype=np.result_type(*seqs))
    mask = np.zeros((len(seqs), n), dtype=bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    return x, mask
