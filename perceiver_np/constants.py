"""The numerical constants every path shares: the plain layers, the blocks and the kernels.

A leaf module (it imports nothing of perceiver_np), so that the kernels and the plain layers can
both use it without importing each other.
"""

from __future__ import annotations

#: LayerNorm epsilon, added to the biased variance (Edifice/Axon, DeepMind and HF all use 1e-5).
LN_EPS = 1e-5
#: Logit given to masked keys before the softmax: DeepMind's large finite negative. Finite (not
#: -inf) so that a fully masked row gives a finite softmax that is then zeroed, never NaN; any
#: real logit exceeds it by so much that exp() of the difference is exactly 0 in float32 and
#: float64, so masked keys get exactly zero weight.
MASK_FILL = -1e30
