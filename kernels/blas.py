"""Which BLAS the kernels' products call: SciPy's (the default), Intel MKL or BLIS, chosen at run time.

::

    from perceiver_np.kernels import blas
    blas.current().name        # "scipy": the sgemm/dgemm SciPy's BLAS exports (OpenBLAS in its wheels)
    blas.use("mkl")            # MKL's sgemm/dgemm from the ``mkl`` wheel, on its sequential layer
    blas.use("blis")           # BLIS's from the ``blis`` wheel, on the widest kernels this CPU runs
    blas.use("scipy")          # back
    blas.preferred()           # the rule runtime.tune(blas="auto") follows on this machine

Every product of the kernels (:func:`perceiver_np.kernels.gemm.gemm_rows` and everything built
on it: the tiled products, the attention kernel's tile products) calls the BLAS through a table
of two function pointers, ``sgemm`` and ``dgemm``, both with the Fortran BLAS interface (every
argument by reference, column-major), and the index of their name in CHOICES. The compiled
kernels read the table at each call (its address is an LLVM symbol that this module registers
when it is first imported, before any kernel is compiled or loaded from Numba's cache; a second
copy of the module uses the same table), so :func:`use` switches every kernel at once, cached
ones included. Products below ``gemm.SMALL_PRODUCT`` multiply-adds stay NumPy's ``@``.

Why MKL: on the seed model's product shapes on an Intel CPU, MKL's single-threaded sgemm is
faster than OpenBLAS's (docs/performance-gemm.md), and the engine's products are most of a step.

Why BLIS: on an AVX-512 CPU that is not Intel's (AMD Zen 5), neither MKL (its AVX-512 code
runs on Intel CPUs only) nor OpenBLAS (whose kernel choice the environment may pin, as
``OPENBLAS_CORETYPE=Haswell`` does on the machine of docs/performance-gemm.md) multiplies with
512-bit vectors. (Zen 4 has AVX-512 too, but on 256-bit data paths: there "auto" keeps SciPy's,
:func:`full_width_avx512`.) The ``blis`` wheel carries BLIS's AVX-512 kernels (its "skx" sub-configuration)
but its CPU detection predates these CPUs and falls back to its generic C kernels. So this
module asks BLIS for a sub-configuration by what the CPU can run (:data:`BLIS_CONFIGS`: "skx"
when the CPU has AVX-512 F, DQ, BW and VL, "haswell" with AVX2 and FMA) and passes that context
to every call (``bli_sgemm_ex``). The kernels call a Fortran-interface function, so a small
compiled adapter (:func:`_blis_adapter`, a Numba ``cfunc``) takes the Fortran arguments and
makes the BLIS call. One thing is set in BLIS for the whole process: its packing buffers are
sized for that context when it is loaded (:func:`_blis_pools`, which says why).

The same bits on any number of threads: a product is split into tiles, one BLAS call each, and
no BLAS promises that a tile's entries get the same bits whatever the tile's shape. MKL's do
not at K >= 1024 on an Intel Xeon (docs/performance-gemm.md, "tiles differ"), and SciPy's
OpenBLAS's do not at any K on an AMD Zen 5, where they did on the Xeon. So the tiles are cut
as if for :data:`FIXED_TILE_THREADS` threads under every BLAS, whatever the real count
(``gemm._threads``): the same calls on the same blocks, so the same bits on 1, 2 or 16 threads
(tests/test_blas.py, tests/test_threads.py). MKL and BLIS give the same bits wherever the
blocks lie in memory (tested; SciPy's OpenBLAS is not held to it), so the workspace's placement
does not matter to them.

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
#: The tiles of a product are cut as for this many threads, whatever the real count (a BLAS's
#: bits may depend on the tile's shape): 8, two tiles per thread on 4 threads, and the seed's
#: products keep tiles of 256 rows or more. Products of many rows get more tiles than this
#: (tiles of at most BIAS_BLOCK_ROWS or PROJECT_BLOCK_ROWS rows, kernels/gemm.py).
FIXED_TILE_THREADS = 8
#: The names :func:`use` takes.
CHOICES = ("scipy", "mkl", "blis")
#: MKL's runtime library in the ``mkl`` wheel, newest soname first.
MKL_LIBRARIES = ("libmkl_rt.so.3", "libmkl_rt.so.2")
#: BLIS's sub-configurations this module may pick, best first, each with the CPU features
#: (LLVM's names, llvmlite.binding.get_host_cpu_features) its kernels need.
BLIS_CONFIGS = (("skx", ("avx512f", "avx512dq", "avx512bw", "avx512vl")), ("haswell", ("avx2", "fma")))
#: Under "blis", products of at most this many multiply-adds (the attention kernel's tiles of
#: the latents' self-attention, 64 x 64 x 64) go to SciPy's BLAS: BLIS's fixed cost per call
#: (its objects, packing into its own buffers) made the seed's self-attention (B 32, H 4, 64
#: latents of 64 per head, 2 threads) about 1.1x slower than on OpenBLAS (1.3x at 32 per
#: head), while bigger products gain 1.5x and more.
BLIS_SMALL_PRODUCT = 64 * 64 * 64
#: The first AMD cpu family whose AVX-512 runs on 512-bit data paths: 0x1A, Zen 5
#: (:func:`full_width_avx512`).
AMD_FULL_WIDTH_FAMILY = 0x1A
_BLIS_NO_TRANSPOSE, _BLIS_TRANSPOSE = 0, 8  # BLIS's trans_t values (BLIS_BITVAL_TRANS = 0x8)
_BLIS_MAX_ARCHS = 64  # a bound on BLIS's arch_t values (0.7 has 21, "generic" the last)
_MKL_THREADING_SEQUENTIAL = 1
_MKL_INTERFACE_LP64 = 0


@dataclass(frozen=True)
class Blas:
    """One BLAS the kernels can call."""

    name: str  # one of CHOICES
    sgemm: int  # the address of its Fortran-interface sgemm
    dgemm: int  # and dgemm
    library: str  # where it came from, for reports
    config: str = ""  # BLIS's sub-configuration whose kernels run ("skx", "haswell"); else ""


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
    return Blas("scipy", _capsule_pointer(capi["sgemm"]), _capsule_pointer(capi["dgemm"]),
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
    return Blas("mkl", int(address[0]), int(address[1]), str(mkl_library()))


def blis_library() -> Path:
    """The ``blis`` wheel's extension module, which holds BLIS and exports its C API;
    ImportError naming the package when it is not installed."""
    try:
        import blis.cy
    except ImportError as err:
        raise ImportError("blas 'blis': the blis package is not installed; install it with "
                          "pip install 'perceiver_np[blis]'") from err
    return Path(blis.cy.__file__)


def blis_config(lib: ctypes.CDLL, features: dict[str, bool] | None = None) -> tuple[str, int]:
    """The first of BLIS_CONFIGS that this build of BLIS holds and whose features the CPU has
    (``features``: LLVM's host CPU features by default), with the address of its context; else
    BLIS's own choice. RuntimeError when BLIS has no context for the sub-configuration."""
    if features is None:
        features = dict(llvm.get_host_cpu_features())
    arch_string = lib.bli_arch_string
    arch_string.restype, arch_string.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lookup = lib.bli_gks_lookup_nat_cntx
    lookup.restype, lookup.argtypes = ctypes.c_void_p, [ctypes.c_int]
    lib.bli_init()
    names = {}
    for arch_id in range(_BLIS_MAX_ARCHS):  # BLIS's arch_t enumeration, which ends with "generic":
        name = arch_string(arch_id)  # reading past it would read past BLIS's table of names
        if name:
            names[name.decode()] = arch_id
        if name == b"generic":
            break
    else:
        raise RuntimeError(f"blas 'blis': no 'generic' among BLIS's first {_BLIS_MAX_ARCHS} "
                           "sub-configurations; this BLIS numbers them in a way this module does not know")
    for name, needs in BLIS_CONFIGS:
        if name in names and all(features.get(f) for f in needs) and lookup(names[name]):
            return name, int(lookup(names[name]))
    own = lib.bli_arch_query_id()
    context = lookup(own)
    if not context:
        raise RuntimeError(f"blas 'blis': BLIS has no context for its own sub-configuration "
                           f"{arch_string(own)!r}")
    return arch_string(own).decode(), int(context)


def _blis_adapter(function: int, context: int, small: int) -> int:
    """The address of a Fortran-interface ``?gemm`` (every argument by reference, column-major)
    that calls BLIS's ``bli_?gemm_ex`` (at ``function``) with the context at ``context``:
    strides (1, ld) for each column-major operand, BLIS's default runtime (single-threaded:
    the wheel is built without threads; the kernels' threads are Numba's). A product of at most
    BLIS_SMALL_PRODUCT multiply-adds goes to ``small`` instead (SciPy's ``?gemm``, the same
    Fortran interface), by that fixed rule on its shape."""
    import numpy as np
    from numba import carray, cfunc, njit, types

    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    blis_gemm = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, i64, i64, i64, ptr, ptr, i64, i64,
                                 ptr, i64, i64, ptr, ptr, i64, i64, i64, i64)(function)
    small_gemm = ctypes.CFUNCTYPE(None, *[ptr] * 13)(small)
    limit = BLIS_SMALL_PRODUCT
    signature = types.void(*[types.voidptr] * 13)  # every argument by reference

    @njit
    def int32_at(p):  # pragma: no cover - compiled
        return np.int64(carray(p, 1, np.int32)[0])

    no, yes, lower_n, upper_n = _BLIS_NO_TRANSPOSE, _BLIS_TRANSPOSE, ord("n"), ord("N")

    @cfunc(signature)  # nopython: a cfunc has no object mode
    def gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):  # pragma: no cover
        mi, ni, ki = int32_at(m), int32_at(n), int32_at(k)
        if mi * ni * ki <= limit:
            small_gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
            return
        # 'N' or 'n': the operand as it lies; anything else ('T', 't', 'C', 'c'; real data): transposed
        flag_a, flag_b = carray(transa, 1, np.uint8)[0], carray(transb, 1, np.uint8)[0]
        ta = no if flag_a == upper_n or flag_a == lower_n else yes
        tb = no if flag_b == upper_n or flag_b == lower_n else yes
        blis_gemm(ta, tb, mi, ni, ki, alpha, a, 1, int32_at(lda), b, 1, int32_at(ldb), beta, c, 1,
                  int32_at(ldc), context, 0)

    _adapters.append(gemm)  # the compiled function lives as long as the process
    address = gemm.address
    assert address is not None  # compiled on creation
    return address


def _blis_pools(lib: ctypes.CDLL, context: int) -> None:
    """Size BLIS's packing-buffer pools for ``context`` (its largest blocks, every datatype),
    as BLIS itself does at start-up for the sub-configuration it detected. Needed because a
    pool whose blocks are too small for a request is rebuilt on the spot, which BLIS aborts
    the process over when another thread holds one of its blocks: exactly what two of the
    kernels' threads would meet in their first calls with a context larger than BLIS's own.
    Made once, when the BLIS is loaded (no call of ours in flight; pools are filled lazily,
    so nothing is allocated here)."""
    query = lib.bli_membrk_query
    query.restype = ctypes.c_void_p
    lib.bli_membrk_finalize_pools.argtypes = [ctypes.c_void_p]
    lib.bli_membrk_init_pools.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    broker = query()
    lib.bli_membrk_finalize_pools(broker)
    lib.bli_membrk_init_pools(context, broker)


def _blis() -> Blas:
    path = blis_library()
    lib = ctypes.CDLL(str(path))
    config, context = blis_config(lib)
    _blis_pools(lib, context)
    address = [ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in ("bli_sgemm_ex", "bli_dgemm_ex")]
    scipy = _scipy()
    pairs = zip(address, (scipy.sgemm, scipy.dgemm), strict=True)
    sgemm, dgemm = (_blis_adapter(a, context, small) for a, small in pairs if a)
    return Blas("blis", sgemm, dgemm, str(path), config)


_adapters: list = []
_LOADERS = {"scipy": _scipy, "mkl": _mkl, "blis": _blis}


def _load(name: str) -> Blas:
    with _lock:
        if name not in _loaded:
            _loaded[name] = _LOADERS[name]()
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
    """The names of CHOICES that can be used here (MKL and BLIS when their packages are installed)."""
    out = ["scipy"]
    for name, find in (("mkl", mkl_library), ("blis", blis_library)):
        try:
            find()
            out.append(name)
        except ImportError:
            pass
    return out


def preferred(features: dict[str, bool] | None = None, vendor: str | None = None,
              family: int | None = None) -> str:
    """The BLAS ``runtime.tune(blas="auto")`` picks, by a fixed rule on what the CPU is (never by
    timing, so that two runs on one machine compute the same bits), from what is installed:
    MKL on an Intel CPU; BLIS on another CPU whose AVX-512 is full width (:func:`full_width_avx512`:
    MKL's and a pinned OpenBLAS's products run there at the AVX2 width only); else SciPy's.
    ``features``: LLVM's host CPU features, ``vendor`` and ``family``: /proc/cpuinfo's vendor_id
    and cpu family (all read here by default). The measured reasons are in docs/fast.md."""
    if features is None:
        features = dict(llvm.get_host_cpu_features())
    if vendor is None or family is None:
        read_vendor, read_family = cpu_id()
        vendor = read_vendor if vendor is None else vendor
        family = read_family if family is None else family
    have = available()
    if vendor == "GenuineIntel" and "mkl" in have:
        return "mkl"
    if full_width_avx512(features, vendor, family) and "blis" in have:
        return "blis"
    return "scipy"


def full_width_avx512(features: dict[str, bool], vendor: str, family: int) -> bool:
    """Whether the CPU has the AVX-512 that BLIS's "skx" kernels need (BLIS_CONFIGS[0]) and runs
    it on 512-bit data paths: any such Intel CPU, and AMD's from family AMD_FULL_WIDTH_FAMILY
    (Zen 5) on. AMD's Zen 4 (family 0x19) runs each 512-bit instruction as two 256-bit halves,
    so its AVX-512 multiplies no faster than AVX2; there SciPy's OpenBLAS beat BLIS on the
    whole model (docs/fast.md)."""
    if not all(features.get(f) for f in BLIS_CONFIGS[0][1]):
        return False
    return vendor == "GenuineIntel" or (vendor == "AuthenticAMD" and family >= AMD_FULL_WIDTH_FAMILY)


def cpu_id() -> tuple[str, int]:
    """The CPU's vendor_id and cpu family from /proc/cpuinfo (("GenuineIntel", 6),
    ("AuthenticAMD", 26)); ("", 0) for what cannot be read."""
    vendor, family = "", 0
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value
                elif key == "cpu family" and not family and value.isdigit():
                    family = int(value)
                if vendor and family:
                    break
    except OSError:
        pass
    return vendor, family


if _NEW_TABLE:
    use("scipy")
