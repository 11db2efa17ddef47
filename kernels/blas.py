"""Which BLAS the kernels' products call: SciPy's (the default) or Intel MKL, chosen at run time.

::

    from perceiver_np.kernels import blas
    blas.current().name        # "scipy": the sgemm/dgemm SciPy's BLAS exports (OpenBLAS in its wheels)
    blas.use("mkl")            # MKL's sgemm/dgemm from the ``mkl`` wheel, on its sequential layer
    blas.use("scipy")          # back

Every product of the kernels (:func:`perceiver_np.kernels.gemm.gemm_rows` and everything built
on it: the tiled products, the attention kernel's tile products) calls the BLAS through a table
of two function pointers, ``sgemm`` and ``dgemm``, both with the Fortran BLAS interface (every
argument by reference, column-major), and the index of their name in CHOICES. The compiled
kernels read the table at each call (its address is an LLVM symbol that this module registers
when it is first imported, before any kernel is compiled or loaded from Numba's cache; a second
copy of the module uses the same table), so :func:`use` switches every kernel at once, cached
ones included. Products below ``gemm.SMALL_PRODUCT`` multiply-adds stay NumPy's ``@``.

Why MKL: on the seed model's product shapes, MKL's single-threaded sgemm is faster than
OpenBLAS's (docs/performance-gemm.md), and the engine's products are most of a step.

The same bits on any number of threads: a product is split into tiles, one BLAS call each.
OpenBLAS gives a tile's entries the same bits whatever the tile's shape (it never splits the
sum over K by the shape of the output block), so its tiles follow the thread count. MKL does
not: at K >= 1024 and in the weight gradients, a tile of other rows or columns sums in another
order (docs/performance-gemm.md, "tiles differ"). Under MKL the tiles are therefore cut as if
for :data:`FIXED_TILE_THREADS` threads, whatever the real count: the same calls on the same
blocks, so the same bits on 1, 2 or 16 threads (tests/test_blas.py). MKL gives the same bits
wherever the blocks lie in memory (also tested), so the workspace's placement does not matter.

MKL comes from the ``mkl`` wheel (``pip install perceiver_np[mkl]``): its ``libmkl_rt``, whose
threading layer :func:`use` sets to sequential (each call on the calling thread: the threads
are Numba's). That setting is MKL's own and process-wide, so it is made only when asked for,
and refused when MKL was already started on another layer in this process.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from llvmlite import binding as llvm

#: The LLVM symbol of the table: ``void *[3]``, the sgemm and the dgemm the kernels call, then
#: the index in CHOICES of the BLAS they belong to.
TABLE_SYMBOL = "perceiver_np_gemm_table"
#: The tiles of a product under a BLAS whose bits depend on the tile's shape (MKL) are cut as
#: for this many threads, whatever the real count (8: two tiles per thread on 4 threads, and
#: the seed's products keep tiles of 256 rows or more).
FIXED_TILE_THREADS = 8
#: The names :func:`use` takes.
CHOICES = ("scipy", "mkl")
#: MKL's runtime library in the ``mkl`` wheel, newest soname first.
MKL_LIBRARIES = ("libmkl_rt.so.3", "libmkl_rt.so.2")
_MKL_THREADING_SEQUENTIAL = 1
_MKL_INTERFACE_LP64 = 0


@dataclass(frozen=True)
class Blas:
    """One BLAS the kernels can call."""

    name: str  # one of CHOICES
    sgemm: int  # the address of its Fortran-interface sgemm
    dgemm: int  # and dgemm
    tiles_follow_threads: bool  # its bits do not depend on a tile's shape (else FIXED_TILE_THREADS)
    library: str  # where it came from, for reports


def _shared_table() -> tuple[ctypes.Array, bool]:
    """The table [sgemm, dgemm, index of the chosen name in CHOICES], and whether it is new.

    One per process: if this file was already imported under another module name (the folder
    is also importable as a top-level ``kernels`` package from the repository's root, and
    transformers imports any package of that name it finds), the symbol is already registered
    and that table is used, so the two copies of the module never disagree on the BLAS."""
    address = llvm.address_of_symbol(TABLE_SYMBOL)
    if address:
        return (ctypes.c_void_p * 3).from_address(address), False
    table = (ctypes.c_void_p * 3)()
    llvm.add_symbol(TABLE_SYMBOL, ctypes.addressof(table))
    return table, True


_TABLE, _NEW_TABLE = _shared_table()
_lock = threading.Lock()
_loaded: dict[str, Blas] = {}


def _capsule_pointer(capsule: object) -> int:
    """The C pointer a PyCapsule holds (how Cython exports its functions)."""
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get_pointer(capsule, get_name(capsule)))


def _scipy() -> Blas:
    """SciPy's BLAS (the one Numba's ``np.dot`` calls): its Cython exports of sgemm and dgemm."""
    from scipy.linalg import cython_blas

    capi = cython_blas.__pyx_capi__
    return Blas("scipy", _capsule_pointer(capi["sgemm"]), _capsule_pointer(capi["dgemm"]), True,
                "scipy.linalg.cython_blas")


def mkl_library() -> Path:
    """The ``mkl`` wheel's ``libmkl_rt`` (under ``sys.prefix/lib``); ImportError naming the
    package when it is not installed."""
    for name in MKL_LIBRARIES:
        path = Path(sys.prefix) / "lib" / name
        if path.exists():
            return path
    raise ImportError(f"blas 'mkl': expected MKL's runtime library ({' or '.join(MKL_LIBRARIES)}) "
                      f"in {Path(sys.prefix) / 'lib'}, found none; install it with "
                      "pip install 'perceiver_np[mkl]' (the mkl package)")


def load_mkl() -> ctypes.CDLL:
    """``libmkl_rt`` loaded, on MKL's sequential threading layer and 32-bit integers (LP64).
    RuntimeError when this process had already started MKL on another threading layer."""
    lib = ctypes.CDLL(str(mkl_library()))
    lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
    lib.MKL_Set_Threading_Layer.restype = ctypes.c_int
    lib.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
    lib.MKL_Set_Interface_Layer.restype = ctypes.c_int
    layer = lib.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
    interface = lib.MKL_Set_Interface_Layer(_MKL_INTERFACE_LP64)
    if layer != _MKL_THREADING_SEQUENTIAL or interface != _MKL_INTERFACE_LP64:
        raise RuntimeError(f"blas 'mkl': MKL was already started in this process on threading layer "
                           f"{layer} and interface {interface}; the kernels need the sequential layer "
                           f"({_MKL_THREADING_SEQUENTIAL}) and LP64 ({_MKL_INTERFACE_LP64})")
    return lib


def _mkl() -> Blas:
    lib = load_mkl()
    address = [ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in ("sgemm", "dgemm")]
    assert address[0] and address[1]
    return Blas("mkl", int(address[0]), int(address[1]), False, str(mkl_library()))


def _load(name: str) -> Blas:
    with _lock:
        if name not in _loaded:
            _loaded[name] = _scipy() if name == "scipy" else _mkl()
        return _loaded[name]


def use(name: str) -> Blas:
    """Make every kernel call the BLAS ``name`` (one of CHOICES) from now on; returns it. Call
    it between runs, not while a kernel runs on another thread."""
    if name not in CHOICES:
        raise ValueError(f"blas: expected one of {', '.join(map(repr, CHOICES))}, got {name!r}")
    chosen = _load(name)
    with _lock:
        _TABLE[0], _TABLE[1], _TABLE[2] = chosen.sgemm, chosen.dgemm, CHOICES.index(name)
    return chosen


def current() -> Blas:
    """The BLAS the kernels call now (as the table says)."""
    return _load(CHOICES[int(_TABLE[2] or 0)])


def available() -> list[str]:
    """The names of CHOICES that can be used here (MKL when its library is installed)."""
    out = ["scipy"]
    try:
        mkl_library()
        out.append("mkl")
    except ImportError:
        pass
    return out


if _NEW_TABLE:
    use("scipy")
