"""A vectorisable ``exp`` for the kernels.

Without Intel SVML (PyPI's llvmlite is not built with it), ``np.exp`` inside a Numba loop
compiles to a scalar library call and the loop does not vectorise; the softmax then costs as
much as the matrix products around it (docs/kernel.md: the forward ran at half speed).
``fast_exp`` is, for float32, the textbook vectorisable exp:

1. Cody-Waite range reduction: ``n = round(x / ln 2)``, ``r = x - n ln2_hi - n ln2_lo`` with
   ``|r| <= ln(2) / 2`` (ln 2 split in two so that ``n ln2_hi`` is exact);
2. ``e^r`` by its Taylor polynomial of degree 7 (truncation error ``0.347^8 / 8! < 6e-9``, a
   tenth of float32's unit roundoff), in Horner form;
3. ``2^n`` built directly as the bits of a float32, ``(n + 127) << 23``, by an LLVM bitcast.

Every step is plain arithmetic, so LLVM vectorises a loop that calls it. Arguments below -87.34
(where ``e^x`` leaves float32's normal range) are clamped there, giving ~1.2e-38 instead of a
subnormal or 0:
the kernels only exponentiate ``score - running max <= 0``, where such terms are below 1e-38 of
the largest one and vanish in the sum. Masked keys are skipped, never exponentiated.
For float64, ``fast_exp`` is ``np.exp`` (the float64 path is the precise one, not the fast one).
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

_LN2_HI = 0.693145751953125  # 8 significant bits: n * _LN2_HI is exact for |n| < 2^16
_LN2_LO = 1.428606765330187e-06
_LOG2E = 1.4426950408889634
_TAYLOR = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040)


@intrinsic
def _bits_to_float32(typingctx, bits):  # pragma: no cover - compiled
    """Reinterpret an int32's bits as a float32 (an LLVM bitcast: one vector instruction)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


def fast_exp(x):
    """exp(x); inside Numba-compiled code the float32 version is the vectorisable one."""
    return np.exp(x)


@overload(fast_exp)
def _fast_exp_overload(x):  # pragma: no cover - compiled
    if x == types.float32:
        lo_clamp = np.float32(-87.33654)  # ~ -126 ln 2: e^x stays a normal float32
        log2e = np.float32(_LOG2E)
        ln2_hi, ln2_lo = np.float32(_LN2_HI), np.float32(_LN2_LO)
        c0, c1, c2, c3, c4, c5, c6, c7 = (np.float32(c) for c in _TAYLOR)
        half = np.float32(0.5)

        def impl(x):
            x = max(x, lo_clamp)
            n = np.floor(x * log2e + half)  # round to nearest, n >= -126
            r = (x - n * ln2_hi) - n * ln2_lo  # |r| <= ln(2) / 2
            p = c7
            p = p * r + c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = p * r + c1
            p = p * r + c0
            return p * _bits_to_float32(np.int32((np.int64(n) + 127) << 23))

        return impl
    if isinstance(x, types.Float):
        return lambda x: np.exp(x)
    return None
