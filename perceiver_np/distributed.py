"""Batch inference and evaluation over many shards: on a Dask cluster, or one after another here.

::

    from perceiver_np import distributed

    report = distributed.predict("model.npz", "shards/*.npy", "preds/")              # this process
    report = distributed.predict("model.npz", "shards/*.npy", "preds/", client="tcp://sched:8786")
    report = distributed.predict("model.npz", "data.zarr", "preds/", client=distributed.local_client(2))
    report = distributed.evaluate("model.npz", "test/*.npz", client=client)
    print(report, report.metrics)

A shard is one input file or one block of rows of a Zarr array (docs/distributed.md):

- ``.npy`` [S, N, C]: memory-mapped, read a batch at a time, every position kept;
- ``.npz`` of sequences [n_i, C] of any lengths, padded and masked a batch at a time (as
  ``perceiver-np predict`` reads it); for :func:`evaluate`, an ``.npz`` dataset with ``x``
  [S, N, C], ``y`` and optionally ``mask``, ``queries``, ``query_mask`` (as ``perceiver-np eval``);
- a Zarr array x [S, N, C], or a Zarr group with ``x`` (and ``y``, ``mask``, ... as the
  ``.npz`` datasets): one shard per ``x.chunks[0]`` rows.

Every shard is computed exactly as the single-process command computes that file: the same
batches (``batch_size`` rows; sequences padded per batch), the same ``model(x, mask)`` (or, for
:func:`evaluate`, the same forward and loss as :func:`perceiver_np.train.evaluate`). The model's
results do not depend on the thread count (docs/reliability.md), so a shard's output is the same
bits whichever worker, with however many threads, computes it.

Each worker process loads the checkpoint once (a cache keyed by its path and SHA-256, which the
worker checks against the one the run started with) and runs :func:`perceiver_np.runtime.tune`
once; each task then uses its share of the worker's cores (``threads``). Tasks carry file names,
not arrays: workers read their shards and write their outputs themselves, so every path must be
the same on every worker (a shared file system, or a Zarr store they can all open).

:func:`predict` writes ``out_dir/<input stem>.npy`` per shard (``<store stem>-<chunk>.npy`` for
Zarr) atomically and records each shard in ``out_dir/manifest.json`` (input, output, rows, the
output's SHA-256), itself replaced atomically. A rerun skips every shard whose recorded output is
still there with its checksum, and refuses an ``out_dir`` whose manifest holds another
checkpoint's or another batch size's results. A worker that dies mid-task leaves at most a
temporary file, which the retry's write removes; Dask runs the task again elsewhere
(``distributed.scheduler.allowed-failures`` times).

Importing this module imports neither Dask nor Zarr: they are imported by the functions that
need them (the ``distributed`` extra installs them).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ._files import atomic_write
from .checkpoint import differences, load_checkpoint
from .config import PerceiverConfig
from .model import Perceiver
from .shapes import pad_sequences
from .train import Loss, batch_sums

if TYPE_CHECKING:
    from distributed import Client

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "perceiver_np.distributed"
MANIFEST_VERSION = 1
#: The manifest is rewritten after a shard completes at most this often (and always at the end
#: of a run, a failed or interrupted one included): a run of many small shards does not spend
#: its time rewriting the list of the shards done. A shard finished since the last write is
#: computed again by a rerun after a crash of the driver.
MANIFEST_INTERVAL_SECONDS = 1.0
#: Models each worker process keeps loaded (the most recently used): two runs of different
#: checkpoints that share a cluster do not load them again for every task.
MODEL_CACHE_SIZE = 2
#: The arrays of a labelled shard that go into a batch (as ``perceiver-np eval`` reads them).
DATA_KEYS = ("x", "y", "mask", "queries", "query_mask")
_HASH_CHUNK = 1 << 20

PathLike = str | os.PathLike[str]


class WorkerLost(RuntimeError):
    """Every worker that ran a shard died while running it (Dask's ``KilledWorker``)."""


# ---- the shards -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One unit of work: a file, or rows ``start:stop`` of a Zarr array or group."""

    name: str  # unique; the output is <name>.npy and the manifest's key
    source: str  # the file (absolute), or "<store>[start:stop]"
    kind: str  # "npy", "npz" (sequences for predict, a dataset for evaluate), "zarr"
    rows: int  # samples S
    tokens: int  # positions read: S * N, or the sum of the sequences' lengths
    identity: dict[str, int]  # the file's size and mtime_ns, or the rows: a rerun's test of "same input"
    start: int = 0
    stop: int = 0


def _where(shard: Shard | str) -> str:
    return f"shard {shard.source if isinstance(shard, Shard) else shard}"


def _is_zarr(inputs: object) -> bool:
    if type(inputs).__module__.split(".")[0] == "zarr":
        return True
    if not isinstance(inputs, (str, os.PathLike)):
        return False
    text = os.fspath(inputs).rstrip("/")
    path = Path(text)
    return text.endswith(".zarr") or (path.is_dir() and any(
        (path / marker).exists() for marker in ("zarr.json", ".zarray", ".zgroup")))


def _shards(inputs: Any, cfg: PerceiverConfig, labelled: bool) -> tuple[list[Shard], Any]:
    """The shards of ``inputs`` in order, every one checked (its header read, its width compared
    with the model's) before any work starts -> (shards, the opened Zarr array or group, or None)."""
    if _is_zarr(inputs):
        store = _open_zarr(inputs)
        return _zarr_shards(store, inputs, cfg, labelled), store
    shards = [_file_shard(path, cfg, labelled) for path in _paths(inputs)]
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(f"inputs: {seen[shard.name]} and {shard.source} have the same stem "
                             f"{shard.name!r}, so their outputs would be one file; rename one")
        seen[shard.name] = shard.source
    return shards, None


def _paths(inputs: Any) -> list[Path]:
    """A glob pattern, one path or a sequence of paths -> the files, absolute."""
    if isinstance(inputs, (str, os.PathLike)):
        text = os.fspath(inputs)
        if any(c in text for c in "*?["):
            found = sorted(glob.glob(text, recursive=True))
            if not found:
                raise ValueError(f"inputs {text!r}: no file matches this pattern")
            return [Path(p).absolute() for p in found]
        return [Path(text).absolute()]
    if isinstance(inputs, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in inputs):
        if not inputs:
            raise ValueError("inputs: an empty list; give at least one shard")
        return [Path(p).absolute() for p in inputs]
    raise TypeError(f"inputs: expected a glob pattern, a path, a list of paths or a Zarr array or group, "
                    f"got {type(inputs).__name__}")


def _file_shard(path: Path, cfg: PerceiverConfig, labelled: bool) -> Shard:
    where = _where(str(path))
    if not path.exists():
        raise ValueError(f"{where}: no such file")
    if not path.is_file():
        raise ValueError(f"{where}: not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{where}: cannot be read (permission denied)")
    stat = path.stat()
    identity = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = path.stem
    if path.suffix == ".npy" and not labelled:
        shape, dtype, offset = _npy_header(path)
        _check_x(shape, dtype, cfg, where)
        need = offset + math.prod(shape) * dtype.itemsize
        if stat.st_size < need:
            raise ValueError(f"{where}: truncated: its header says {dtype.name} {shape}, {need:,} bytes with "
                             f"the header, but the file holds {stat.st_size:,}")
        return Shard(name, str(path), "npy", shape[0], shape[0] * shape[1], identity)
    if path.suffix == ".npz":
        headers = _npz_headers(path)
        if labelled:
            rows, tokens = _check_dataset(headers, cfg, where)
        else:
            rows, tokens = _check_sequences(headers, cfg, where)
        return Shard(name, str(path), "npz", rows, tokens, identity)
    wanted = ".npz datasets (x, y, ...)" if labelled else ".npy arrays [S, N, C] or .npz of sequences"
    raise ValueError(f"{where}: expected {wanted}, got a {path.suffix or 'file without suffix'}")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of the .npy file ``path``, its data unread."""
    try:
        with open(path, "rb") as f:
            shape, dtype = _read_header(f)
            return shape, dtype, f.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as err:
        raise ValueError(f"{_where(str(path))}: not a readable .npy file "
                         f"({type(err).__name__}: {err})") from err


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), dtype


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every array of the .npz ``path``, in the file's order, unread."""
    try:
        with zipfile.ZipFile(path) as z:
            out = {}
            for name in z.namelist():
                with z.open(name) as member:
                    out[name.removesuffix(".npy")] = _read_header(member)
            return out
    except (OSError, ValueError, EOFError, SyntaxError, zipfile.BadZipFile) as err:
        raise ValueError(f"{_where(str(path))}: not a readable .npz file "
                         f"({type(err).__name__}: {err})") from err


def _check_x(shape: tuple[int, ...], dtype: np.dtype, cfg: PerceiverConfig, where: str,
             what: str = "x") -> None:
    if dtype.kind not in "iuf":
        raise ValueError(f"{where}: {what} must hold numbers, got dtype {dtype}")
    if len(shape) != 3 or 0 in shape:
        raise ValueError(f"{where}: {what} must be [S, N, C] with S, N, C >= 1, got shape {shape}")
    _check_width(shape[2], cfg, where, what)


def _check_width(channels: int, cfg: PerceiverConfig, where: str, what: str) -> None:
    if channels != cfg.input_dim:
        raise ValueError(f"{where}: {what} has {channels} channels per position, but the model takes "
                         f"input_dim = {cfg.input_dim}")


def _check_sequences(headers: Mapping[str, tuple[tuple[int, ...], np.dtype]], cfg: PerceiverConfig,
                     where: str) -> tuple[int, int]:
    if not headers:
        raise ValueError(f"{where}: holds no sequence")
    for k, (shape, dtype) in enumerate(headers.values()):
        if len(shape) != 2 or shape[0] == 0 or dtype.kind not in "iuf":
            raise ValueError(f"{where}: sequence {k} must be [n, C] numbers with n >= 1, got {dtype} {shape}")
        _check_width(shape[1], cfg, where, f"sequence {k}")
    return len(headers), sum(shape[0] for shape, _ in headers.values())


def _check_dataset(headers: Mapping[str, tuple[tuple[int, ...], Any]], cfg: PerceiverConfig,
                   where: str) -> tuple[int, int]:
    """(S, S * N) of a labelled shard's arrays (name -> (shape, dtype)), checked."""
    if "x" not in headers or "y" not in headers:
        raise ValueError(f"{where}: expected arrays 'x' [S, N, C] and 'y' (labels [S] or targets "
                         f"[S, O, out]), found {sorted(headers)}")
    shape, dtype = headers["x"]
    _check_x(shape, np.dtype(dtype), cfg, where)
    for key in DATA_KEYS:
        if key in headers and (len(headers[key][0]) == 0 or headers[key][0][0] != shape[0]):
            raise ValueError(f"{where}: {key} has shape {headers[key][0]}, not the {shape[0]} samples "
                             f"of x {shape}")
    if "mask" in headers and tuple(headers["mask"][0]) != shape[:2]:
        raise ValueError(f"{where}: mask must be [S, N] = {shape[:2]}, got {headers['mask'][0]}")
    return shape[0], shape[0] * shape[1]


def _open_zarr(inputs: Any) -> Any:
    """The Zarr array or group ``inputs``, opened for reading (a local path made absolute: the
    opened store goes to workers whose working directory may differ)."""
    zarr = _import("zarr")
    if isinstance(inputs, (zarr.Array, zarr.Group)):
        return inputs
    try:
        return zarr.open(_zarr_label(inputs), mode="r")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"inputs {os.fspath(inputs)}: not a readable Zarr array or group "
                         f"({type(err).__name__}: {err})") from err


def _zarr_label(inputs: PathLike) -> str:
    """A Zarr store's path or URL: a local path made absolute, a URL (``s3://...``) as given."""
    text = os.fspath(inputs)
    return text if "://" in text else str(Path(text).absolute())


def _zarr_shards(store: Any, inputs: Any, cfg: PerceiverConfig, labelled: bool) -> list[Shard]:
    zarr = _import("zarr")
    label = _zarr_label(inputs) if isinstance(inputs, (str, os.PathLike)) else str(store.store_path)
    stem = label.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr") or "zarr"
    where = f"inputs {label}"
    if isinstance(store, zarr.Group):
        arrays = {k: store[k] for k in DATA_KEYS if k in set(store.array_keys())}
        if labelled:
            _check_dataset({k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}, cfg, where)
        elif "x" not in arrays:
            raise ValueError(f"{where}: a Zarr group needs an array 'x' [S, N, C], found "
                             f"{sorted(store.array_keys())}")
        x = arrays["x"]
        mask = arrays.get("mask")
        if not labelled and mask is not None and (mask.dtype != np.bool_
                                                  or tuple(mask.shape) != tuple(x.shape[:2])):
            raise ValueError(f"{where}: mask must be bool [S, N] = {tuple(x.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    elif labelled:
        raise ValueError(f"{where}: evaluate needs a Zarr group with arrays 'x' and 'y', got a single array")
    else:
        x = store
    _check_x(tuple(x.shape), np.dtype(x.dtype), cfg, where)
    step = int(x.chunks[0])
    count = math.ceil(x.shape[0] / step)
    digits = max(5, len(str(count - 1)))
    shards = []
    for i, start in enumerate(range(0, x.shape[0], step)):
        stop = min(start + step, x.shape[0])
        shards.append(Shard(f"{stem}-{i:0{digits}d}", f"{label}[{start}:{stop}]", "zarr", stop - start,
                            (stop - start) * x.shape[1], {"start": start, "stop": stop}, start, stop))
    return shards


# ---- what a worker does with one shard --------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """Everything a task needs besides its shard (sent with every task: names, not arrays)."""

    task: str  # "predict" or "evaluate"
    checkpoint: str  # absolute path
    checkpoint_sha256: str
    batch_size: int
    out_dir: str | None  # predict: where outputs go
    loss: Loss | None  # evaluate
    threads: int | None  # compute threads per task; None: the worker's share of its host's cores
    host_threads: dict[str, int]  # task threads of all the workers on each host, when the run started
    store: Any = None  # the opened Zarr array or group of Zarr shards


@dataclass(frozen=True)
class ShardResult:
    """What one shard's task returns (and what the manifest records of it)."""

    name: str
    input: str
    rows: int
    tokens: int
    seconds: float  # the task's time in its worker: read, compute, write
    worker: str  # "<host>:<pid>" of the process that ran it ("" when read from the manifest)
    loaded_model: bool  # the task loaded the checkpoint (once per worker process)
    output: str | None = None  # predict: the file name in out_dir
    sha256: str | None = None  # predict: of the output file's bytes
    #: evaluate: per batch, its samples and its sums (each metric's batch mean times the samples),
    #: in order: what train.evaluate adds, so the run's totals add the same numbers in the same order
    batches: tuple[tuple[int, dict[str, float]], ...] | None = None


def _predict_shard(model: Perceiver, job: _Job, shard: Shard, loaded: bool) -> ShardResult:
    """The model over one shard's batches, exactly as ``perceiver-np predict`` runs that file,
    the output written atomically to ``out_dir/<name>.npy``."""
    t0 = time.perf_counter()
    y = np.concatenate([model(x, mask) for x, mask in _input_batches(shard, job, model.config)])
    buffer = io.BytesIO()
    np.save(buffer, y)  # the bytes of perceiver-np predict's output file
    data = buffer.getvalue()
    output = f"{shard.name}.npy"
    assert job.out_dir is not None
    atomic_write(Path(job.out_dir) / output, lambda f: f.write(data))
    return ShardResult(shard.name, shard.source, shard.rows, shard.tokens, time.perf_counter() - t0, _me(),
                       loaded, output, hashlib.sha256(data).hexdigest())


def _input_batches(shard: Shard, job: _Job,
                   cfg: PerceiverConfig) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(x [b, N, C], mask [b, N] or None) of ``job.batch_size`` samples at a time."""
    size = job.batch_size
    if shard.kind == "npz":  # sequences [n_i, C]: padded and masked a batch at a time
        with _reading(shard, ".npz file"), np.load(shard.source, allow_pickle=False) as z:
            seqs = [z[k] for k in z.files]
        _check_sequences({str(k): (s.shape, s.dtype) for k, s in enumerate(seqs)}, cfg, _where(shard))
        for i in range(0, len(seqs), size):
            yield pad_sequences(seqs[i:i + size])
        return
    if shard.kind == "npy":  # memory-mapped, read a batch at a time
        with _reading(shard, ".npy file"):
            x = np.load(shard.source, mmap_mode="r", allow_pickle=False)
        _check_x(x.shape, x.dtype, cfg, _where(shard))
        for i in range(0, len(x), size):
            yield np.asarray(x[i:i + size]), None
        return
    arrays = _zarr_rows(shard, job.store, ("x", "mask"))
    _check_x(arrays["x"].shape, arrays["x"].dtype, cfg, _where(shard))
    mask = arrays.get("mask")
    for i in range(0, shard.rows, size):
        yield arrays["x"][i:i + size], None if mask is None else mask[i:i + size]




def _zarr_rows(shard: Shard, store: Any, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows start:stop of the shard's Zarr array (as x) or of each of ``keys`` in its group."""
    zarr = _import("zarr")
    with _reading(shard, "Zarr store"):
        if isinstance(store, zarr.Array):
            return {"x": np.asarray(store[shard.start:shard.stop])}
        present = set(store.array_keys())
        return {k: np.asarray(store[k][shard.start:shard.stop]) for k in keys if k in present}


@contextlib.contextmanager
def _reading(shard: Shard, what: str) -> Iterator[None]:
    """Errors while reading a shard as ValueErrors naming it (running out of memory included)."""
    try:
        yield
    except MemoryError as err:
        raise ValueError(f"{_where(shard)}: too large to load into memory ({err})") from err
    except (OSError, ValueError, EOFError, KeyError, SyntaxError, zipfile.BadZipFile) as err:
        if isinstance(err, ValueError) and shard.source in str(err):
            raise
        raise ValueError(f"{_where(shard)}: not a readable {what} ({type(err).__name__}: {err})") from err


def _evaluate_shard(model: Perceiver, job: _Job, shard: Shard, loaded: bool) -> ShardResult:
    """The loss and metrics of one labelled shard as :func:`perceiver_np.train.evaluate` computes
    them, kept as per-batch sums instead of averaged."""
    t0 = time.perf_counter()
    if shard.kind == "npz":
        with _reading(shard, ".npz file"), np.load(shard.source, allow_pickle=False) as z:
            data = {k: z[k] for k in DATA_KEYS if k in z.files}
    else:
        data = _zarr_rows(shard, job.store, DATA_KEYS)
    where = _where(shard)
    _check_dataset({k: (v.shape, v.dtype) for k, v in data.items()}, model.config, where)
    assert job.loss is not None
    sums = batch_sums(model, data, job.loss, job.batch_size, name=where)
    return ShardResult(shard.name, shard.source, shard.rows, shard.tokens, time.perf_counter() - t0, _me(),
                       loaded, batches=tuple(sums))


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---- the worker process: the model once, the threads of each task ------------------------------

_MODELS: collections.OrderedDict[tuple[str, str], Perceiver] = collections.OrderedDict()
_MODELS_LOCK = threading.Lock()


def _worker_model(job: _Job) -> tuple[Perceiver, bool]:
    """The job's model, loaded by the first task of this process that needs it -> (model, whether
    this call loaded it). The first load in the process also tunes it (runtime.tune)."""
    from .runtime import tune

    key = (job.checkpoint, job.checkpoint_sha256)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key], False
        if not _MODELS:
            tune(_task_threads(job))
        found = _sha256(Path(job.checkpoint))
        if found != job.checkpoint_sha256:
            raise ValueError(f"checkpoint {job.checkpoint}: changed since the run started (SHA-256 "
                             f"{found[:16]}..., the run's {job.checkpoint_sha256[:16]}...); rerun")
        _MODELS[key] = _restore(Path(job.checkpoint))
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
        return _MODELS[key], True


def _task_threads(job: _Job) -> int:
    """Compute threads for one task in this worker: ``job.threads``, or the worker's usable cores
    divided by the task threads of every worker on its host; at least 1, at most Numba's pool."""
    from distributed import get_worker
    from distributed.comm import get_address_host

    from .threads import max_threads

    if job.threads is not None:
        return min(job.threads, max_threads())
    worker = get_worker()
    sharing = job.host_threads.get(get_address_host(worker.address), worker.state.nthreads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores // max(sharing, 1), max_threads()))


def _use_threads(n: int) -> None:
    """``n`` threads for this task's thread (Numba's count is per calling thread)."""
    import numba

    from .threads import set_num_threads

    if numba.get_num_threads() != n:
        set_num_threads(n)


def _predict_task(job: _Job, shard: Shard) -> ShardResult:
    """One shard of :func:`predict`, in a Dask worker."""
    model, loaded = _worker_model(job)
    _use_threads(_task_threads(job))
    return _predict_shard(model, job, shard, loaded)


def _evaluate_task(job: _Job, shard: Shard) -> ShardResult:
    """One shard of :func:`evaluate`, in a Dask worker."""
    model, loaded = _worker_model(job)
    _use_threads(_task_threads(job))
    return _evaluate_shard(model, job, shard, loaded)


# ---- the driver -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What a run did. ``rows``, ``tokens`` and ``seconds`` count the shards run now (not those
    skipped as done); ``seconds`` is the wall time from the first task submitted to the last
    result. ``metrics``: :func:`evaluate`'s, as :func:`perceiver_np.train.evaluate` returns them."""

    shards: int
    skipped: int
    rows: int
    tokens: int
    seconds: float
    results: tuple[ShardResult, ...]  # the shards run now, in input order
    out_dir: Path | None
    metrics: dict[str, float] | None = None

    @property
    def run(self) -> int:
        return len(self.results)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def model_loads(self) -> int:
        """Checkpoint loads in worker processes during the run (at most one per process)."""
        return sum(r.loaded_model for r in self.results)

    def __str__(self) -> str:
        head = f"{self.run} shards run, {self.skipped} already done ({self.shards} in all)"
        if not self.run:
            return head
        return (f"{head}: {self.rows} samples ({self.tokens:,} tokens) in {self.seconds:.2f} s: "
                f"{self.rows_per_second:.1f} samples/s, {self.tokens_per_second:,.0f} tokens/s")


def predict(checkpoint: PathLike, inputs: Any, out_dir: PathLike, client: Client | str | int | None = None, *,
            batch_size: int = 64, threads: int | None = None, progress: bool = True,
            timeout: float | None = None) -> Report:
    """Run the checkpoint's model over every shard of ``inputs``; write ``out_dir/<stem>.npy``
    per shard (the same bytes as ``perceiver-np predict --batch-size batch_size`` writes for that
    file) and ``out_dir/manifest.json``.

    ``inputs``: a glob pattern (``"shards/*.npy"``), a path or a list of paths of ``.npy``
    [S, N, C] or ``.npz`` sequence shards, or a Zarr array [S, N, C] or group (``x``, optional
    ``mask``), opened or as a path ending in ``.zarr``. ``client``: a ``distributed.Client``, a
    scheduler address (connected to within ``timeout`` seconds, default Dask's
    ``distributed.comm.timeouts.connect``), a number N of local worker processes
    (:func:`local_client`), or None to run the shards one after another in this process (no Dask
    needed); a client the run makes itself (from an address or N) is made after every check, only
    when there is work to do, and closed at the end. ``threads``: compute threads per task (Dask
    only; default: each worker's cores shared among the task threads on its host).

    Every shard is checked before any work starts (it exists, its header reads, its width is the
    model's ``input_dim``), each a ValueError naming it. Shards already done (recorded in the
    manifest with their input unchanged and their output's checksum intact) are skipped.
    """
    return _run("predict", checkpoint, inputs, out_dir, client, batch_size=batch_size, loss=None,
                threads=threads, progress=progress, timeout=timeout)


def evaluate(checkpoint: PathLike, data: Any, client: Client | str | int | None = None, *,
             batch_size: int = 256, loss: str | Loss = "cross_entropy", out_dir: PathLike | None = None,
             threads: int | None = None, progress: bool = True, timeout: float | None = None) -> Report:
    """The loss and metrics of the checkpoint's model over every labelled shard of ``data``, in
    ``Report.metrics``: the dict :func:`perceiver_np.train.evaluate` returns.

    ``data``: a glob pattern, path or list of ``.npz`` datasets (``x``, ``y``, optional
    ``mask``, ``queries``, ``query_mask``), or a Zarr group of those arrays. Each shard returns
    its per-batch sums and sample counts, and the totals add them in the order of the shards and
    their batches, exactly as ``train.evaluate`` adds its batches: the metrics equal
    single-process ``perceiver-np eval`` on the shards concatenated, bit for bit, when every shard
    but the last holds a multiple of ``batch_size`` samples (the batches are then the same).
    ``out_dir``: keep each shard's sums in ``out_dir/manifest.json`` so that a rerun skips the
    shards done. ``client``, ``threads``, ``timeout``: as :func:`predict`.
    """
    if isinstance(loss, str):
        loss = Loss(loss)
    if not isinstance(loss, Loss):
        raise TypeError(f"loss: expected 'cross_entropy', 'mse' or a train.Loss, got {type(loss).__name__}")
    return _run("evaluate", checkpoint, data, out_dir, client, batch_size=batch_size, loss=loss,
                threads=threads, progress=progress, timeout=timeout)


def _run(task: str, checkpoint: PathLike, inputs: Any, out_dir: PathLike | None, client: Any, *,
         batch_size: int, loss: Loss | None, threads: int | None, progress: bool,
         timeout: float | None) -> Report:
    workers = client if isinstance(client, int) and not isinstance(client, bool) else None
    for name, value in (("batch_size", batch_size), ("threads", threads), ("client", workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if client is None and threads is not None:
        raise ValueError("threads: sets the threads of Dask tasks; in this process, call "
                         "perceiver_np.set_num_threads (or runtime.tune) yourself")
    _check_client(client)
    path = Path(checkpoint).absolute()
    digest = _sha256(_readable(path, "checkpoint"))
    model = _restore(path)
    shards, store = _shards(inputs, model.config, labelled=task == "evaluate")
    folder = None if out_dir is None else _out_dir(Path(out_dir))
    if task == "predict" and folder is not None:
        _check_no_input_replaced(folder, shards)
    head = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "task": task, "checkpoint": str(path),
            "checkpoint_sha256": digest, "batch_size": batch_size,
            **({} if loss is None else {"loss": dataclasses.asdict(loss)})}
    manifest = None if folder is None else _Manifest(folder, head, shards)
    done = {s.name: manifest.done(s) for s in shards} if manifest is not None else {}
    todo = [s for s in shards if done.get(s.name) is None]

    client, owned = _client(client if todo else None, timeout)
    try:
        job = _Job(task, str(path), digest, batch_size, None if folder is None else str(folder), loss,
                   threads, _host_threads(client), store)
        t0 = time.perf_counter()
        results = _execute(job, todo, client, model, progress, manifest)
        seconds = time.perf_counter() - t0
    finally:
        if owned and client is not None:
            client.close()
    order = {s.name: i for i, s in enumerate(shards)}
    results.sort(key=lambda r: order[r.name])
    metrics = None
    if task == "evaluate":
        by_name = {**{k: v for k, v in done.items() if v is not None}, **{r.name: r for r in results}}
        metrics = _reduce([by_name[s.name] for s in shards])
    return Report(len(shards), len(shards) - len(todo), sum(r.rows for r in results),
                  sum(r.tokens for r in results), seconds, tuple(results), folder, metrics)


def _check_no_input_replaced(folder: Path, shards: list[Shard]) -> None:
    """A ValueError if a shard's output, ``folder/<name>.npy``, would be the shard itself."""
    for shard in shards:
        output = folder / f"{shard.name}.npy"
        if shard.kind != "zarr" and output.resolve() == Path(shard.source).resolve():
            raise ValueError(f"out_dir {folder}: {_where(shard)} would be replaced by its own output; give "
                             "another out_dir")


def _execute(job: _Job, todo: list[Shard], client: Any, model: Perceiver, progress: bool,
             manifest: _Manifest | None) -> list[ShardResult]:
    """Run the shards (on ``client``, or here with ``model``), recording each in the manifest."""
    results: list[ShardResult] = []
    bar = _bar(len(todo), progress)
    t0 = time.perf_counter()

    def finished(result: ShardResult) -> None:
        results.append(result)
        if manifest is not None:
            manifest.add(result)
        if bar is not None:
            rate = sum(r.tokens for r in results) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
            bar.update(1)

    try:
        if client is None:
            run = _predict_shard if job.task == "predict" else _evaluate_shard
            for shard in todo:
                finished(run(model, job, shard, False))
        elif todo:
            _on_cluster(job, todo, client, finished)
    finally:
        if bar is not None:
            bar.close()
        if manifest is not None:
            manifest.save()
    return results


def _on_cluster(job: _Job, todo: list[Shard], client: Any, finished: Callable[[ShardResult], None]) -> None:
    from distributed import KilledWorker, as_completed

    task = _predict_task if job.task == "predict" else _evaluate_task
    run = uuid.uuid4().hex[:8]
    futures = {client.submit(task, job, shard, key=f"perceiver-np-{job.task}-{shard.name}-{run}", pure=False):
               shard for shard in todo}
    try:
        for future in as_completed(futures):
            try:
                finished(future.result())
            except KilledWorker as err:
                raise WorkerLost(f"{_where(futures[future])}: every worker that ran it died while running it "
                                 f"({err}); a shard that needs more memory than a worker has kills "
                                 "its workers: give workers more memory or make shards smaller "
                                 "(docs/distributed.md)") from err
    finally:
        client.cancel([f for f in futures if not f.done()])


def _reduce(results: list[ShardResult]) -> dict[str, float]:
    """train.evaluate's totals: every batch's sums added in order, divided by the samples."""
    totals: dict[str, float] = {}
    count = 0
    for result in results:
        assert result.batches is not None
        for n, sums in result.batches:
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
            count += n
    return {k: v / count for k, v in totals.items()}


def _host_threads(client: Any) -> dict[str, int]:
    """Host -> the task threads of all the workers the scheduler lists on it."""
    if client is None:
        return {}
    out: dict[str, int] = {}
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        out[info["host"]] = out.get(info["host"], 0) + int(info["nthreads"])
    return out


def _check_client(client: Any) -> None:
    """A client of a type _client takes, or a TypeError."""
    if client is None or isinstance(client, str) or type(client) is int:
        return
    distributed = _import("distributed")
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client: expected a distributed.Client, a scheduler address, a number of local "
                        f"workers or None, got {type(client).__name__}")


def _client(client: Any, timeout: float | None) -> tuple[Any, bool]:
    """(the ``distributed.Client`` to run on, or None; whether the run made it, to close it)."""
    if isinstance(client, str):
        return connect(client, timeout), True
    if isinstance(client, int):
        return local_client(client), True
    return client, False


def connect(address: str, timeout: float | None = None) -> Client:
    """A ``distributed.Client`` of the scheduler at ``address`` (``tcp://host:8786``), or a
    ConnectionError naming the address when none answers within ``timeout`` seconds (default:
    Dask's ``distributed.comm.timeouts.connect``)."""
    distributed = _import("distributed")
    dask = _import("dask")
    if timeout is None:
        timeout = float(dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect")))
    try:
        return distributed.Client(address, timeout=timeout)
    except ValueError as err:
        raise ValueError(f"scheduler address {address!r}: not an address ({err}); expected e.g. "
                         "tcp://host:8786") from err
    except OSError as err:
        raise ConnectionError(f"Dask scheduler {address}: no answer within {timeout:g} s ({err}); is a "
                              "scheduler running there, and reachable from this machine?") from err


def local_client(workers: int, threads_per_worker: int = 1, processes: bool = True) -> Client:
    """A ``distributed.Client`` of a new ``LocalCluster`` of ``workers`` worker processes (or
    threads, ``processes=False``) of ``threads_per_worker`` task threads each, its scheduler and
    dashboard on free ports (``client.dashboard_link``); closing the client stops the cluster.
    ``perceiver-np ... --dask-workers N``."""
    distributed = _import("distributed")
    return distributed.Client(n_workers=workers, threads_per_worker=threads_per_worker, processes=processes,
                              dashboard_address=":0")


# ---- the manifest -------------------------------------------------------------------------------


class _Manifest:
    """``out_dir/manifest.json``: the run's settings and one entry per shard done, rewritten
    atomically (at most every MANIFEST_INTERVAL_SECONDS while shards complete, and at the end)."""

    def __init__(self, folder: Path, head: dict[str, Any], shards: list[Shard]) -> None:
        self.path = folder / MANIFEST_NAME
        self.head = head
        self.identity = {s.name: s.identity for s in shards}  # what add records of each input
        self.shards: dict[str, dict[str, Any]] = {}
        self.written = time.monotonic()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            old = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: not a readable manifest ({type(err).__name__}: {err}); move it "
                             "away to start the run afresh") from err
        if not (isinstance(old, dict) and old.get("format") == MANIFEST_FORMAT
                and isinstance(old.get("shards"), dict)):
            raise ValueError(f"{self.path}: not a manifest of {MANIFEST_FORMAT}; give another out_dir")
        same = ("task", "checkpoint_sha256", "batch_size", "loss", "version")
        diffs = differences({k: old.get(k) for k in same}, {k: self.head.get(k) for k in same},
                            "manifest", "this run")
        if diffs:
            raise ValueError(f"{self.path}: holds the results of another run ({'; '.join(diffs)}); give "
                             "another out_dir, or remove it to start afresh")
        self.shards = {k: v for k, v in old["shards"].items() if isinstance(v, dict)}

    def done(self, shard: Shard) -> ShardResult | None:
        """The shard's recorded result, if it is done: recorded for the same input, and (predict)
        its output file still there with the recorded SHA-256."""
        entry = self.shards.get(shard.name)
        if entry is None or (entry.get("input"), entry.get("source"), entry.get("rows")) != (
                shard.source, shard.identity, shard.rows):
            return None
        if self.head["task"] == "predict":
            output = self.path.parent / f"{shard.name}.npy"
            intact = output.is_file() and _sha256(output) == entry.get("sha256")
            if entry.get("output") != output.name or not intact:
                return None
            return ShardResult(shard.name, shard.source, shard.rows, shard.tokens, 0.0, "", False,
                               output.name, entry["sha256"])
        batches = entry.get("batches")
        if not isinstance(batches, list):
            return None
        return ShardResult(shard.name, shard.source, shard.rows, shard.tokens, 0.0, "", False,
                           batches=tuple((int(n), dict(sums)) for n, sums in batches))

    def add(self, result: ShardResult) -> None:
        entry: dict[str, Any] = {"input": result.input, "source": self.identity[result.name],
                                 "rows": result.rows, "tokens": result.tokens}
        if result.output is not None:
            entry.update(output=result.output, sha256=result.sha256)
        if result.batches is not None:
            entry["batches"] = [[n, sums] for n, sums in result.batches]
        self.shards[result.name] = entry
        if time.monotonic() - self.written >= MANIFEST_INTERVAL_SECONDS:
            self.save()

    def save(self) -> None:
        text = json.dumps({**self.head, "shards": self.shards}, indent=1)
        atomic_write(self.path, lambda f: f.write(text.encode()))
        self.written = time.monotonic()


# ---- small helpers ------------------------------------------------------------------------------


def _import(name: str) -> Any:
    """The optional package ``name`` (dask, distributed, zarr), or an ImportError saying how to
    install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"perceiver_np.distributed needs {name}: pip install 'perceiver_np[distributed]' "
                          f"({err})") from err


def _readable(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{what} {path}: {'not a file' if path.exists() else 'no such file'}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {path}: cannot be read (permission denied)")
    return path


def _restore(path: Path) -> Perceiver:
    ck = load_checkpoint(path)  # every problem a CheckpointError naming the path
    if ck.architecture is not None:
        raise ValueError(f"checkpoint {path}: holds a published model ({ck.architecture}); distributed "
                         "predict and evaluate take a Perceiver's checkpoint")
    return Perceiver(ck.config, ck.params)


def _out_dir(folder: Path) -> Path:
    folder = folder.absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out_dir {folder}: exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {folder}: is not writable")
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="shard", leave=False, file=sys.stderr)
