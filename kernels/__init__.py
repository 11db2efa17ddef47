"""Numba kernels of perceiver_np, installed as the subpackage ``perceiver_np.kernels``.

The tiled cross-attention kernel lands here (see docs/architecture.md); this package is
empty until then so that nothing imports a kernel that is not written and tested.
"""
