"""Checkpoints: a model's config and parameters, and a training run's state, in one ``.npz`` file.

::

    save_checkpoint(path, config=cfg, params=params, step=100, opt_state=opt, rng=rng, extra={...})
    ckpt = load_checkpoint(path)                      # validated; CheckpointError on any problem
    model = Perceiver(ckpt.config, ckpt.params)       # bit-identical to the model that was saved
    rng = ckpt.rng()                                  # continues exactly where the saved one was

The file is an uncompressed ``np.savez`` archive (docs/checkpoints.md):

    meta.json          uint8 array of UTF-8 JSON: format name and version, the config
                       (``dataclasses.asdict``), step, RNG state, tensor listings, ``extra``
    params/<name>      one array per entry of ``param_shapes(config)``, in schema order
    opt/<name>         one array per entry of the optimizer state (if any)
    buffers/<name>     a published model's buffers (batch norm's running statistics; below)

A checkpoint of a :class:`perceiver_np.pretrained.PretrainedPerceiver` (``save_checkpoint(path,
model=model, params=...)``) also holds, in ``meta.json``, the HF class (``architecture``) and
its config.json (``hf_config``), from which its parameter schema and the encoder's config are
rebuilt and checked before any tensor is read, and the model's buffers (not trained: fit never
changes them). ``load_checkpoint(path).model()`` rebuilds either kind of model.

Nothing is ever pickled: each member is read through ``zipfile`` and numpy's ``.npy`` header
functions, and all metadata is JSON. Loading reads every member's header first and checks it
against the listing in ``meta.json``, the stored config's parameter schema and the member's size
in the zip directory; only then is any array data read, straight into arrays of the checked size.
meta.json itself is read and checked before zipfile parses the zip directory, and the directory
must hold exactly the entries it describes. A hostile file (a deflate bomb, a header claiming
100 GiB, a zip directory of 20,000 or 40,000 entries) is refused with a CheckpointError in memory
far below the size of the checkpoint it imitates. No checkpoint holds NaN or inf: save refuses
them, load refuses a file that has them.

Writes are atomic (a temporary file in the same directory, locked while written, fsynced, then
``os.replace``), so a crash mid-save leaves the previous checkpoint at ``path`` intact; the
temporary files of killed saves are removed by the next save or load of the same path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._files import atomic_savez, remove_stale_temps
from .config import PerceiverConfig, param_shapes
from .model import Perceiver
from .pretrained import PretrainedPerceiver, _layout, _specs
from .version import __version__


def differences(old: Mapping[str, Any], new: Mapping[str, Any], old_name: str, new_name: str) -> list[str]:
    """One line per key whose value differs between two flat dicts (absent on one side
    included): ``"key: <old_name> 1, <new_name> 2"``, in ``old``'s key order, then ``new``'s."""
    missing = object()

    def show(value: Any) -> str:
        return "(absent)" if value is missing else repr(value)

    return [f"{k}: {old_name} {show(old.get(k, missing))}, {new_name} {show(new.get(k, missing))}"
            for k in [*old, *(k for k in new if k not in old)]
            if old.get(k, missing) != new.get(k, missing)]


FORMAT_NAME = "perceiver_np.checkpoint"
FORMAT_VERSION = 1

META_KEY = "meta.json"
PARAMS_PREFIX = "params/"
OPT_PREFIX = "opt/"
BUFFERS_PREFIX = "buffers/"
_META_KEYS = ("format", "version", "config", "step", "params", "opt", "rng", "extra", "written_by")
#: The keys of meta.json a published model's checkpoint adds (both or neither): ``pretrained``
#: = {"architecture": the HF class, "hf_config": its config.json}, ``buffers`` = the listing of
#: its ``buffers/<name>`` tensors.
_PRETRAINED_META_KEYS = ("pretrained", "buffers")
#: dtype kinds an optimizer-state array may have: bool, signed / unsigned int, float, complex.
_OPT_KINDS = "biufc"
_ZIP_MAGIC = b"PK\x03\x04"
#: The zip structures read before zipfile parses the directory, as zipfile lays them out: the end
#: of central directory record (22 bytes, then a comment of at most 65,535), the zip64 locator
#: (20 bytes) and the zip64 end record (56 bytes) that precede it when present, and the 46-byte
#: head of each record in the central directory (then its name, extra field and comment).
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_MAGIC = b"PK\x05\x06"
_EOCD_SEARCH = (1 << 16) + _EOCD.size  # zipfile searches this much of the file's end for it
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_MAGIC = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_CENTRAL_MAGIC = b"PK\x01\x02"
#: meta.json's member is read before zipfile parses the directory, from its record there and its
#: local header (30 bytes, then its name and extra field), as zipfile reads it. Its record is the
#: one whose name, up to a NUL (zipfile drops the rest), zipfile would list as META_KEY.
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_META_NAMES = ((META_KEY + ".npy").encode(), META_KEY.encode())
_ZIP64_UNKNOWN = 0xFFFF_FFFF  # a size or offset that is in the record's zip64 extra field
_ZIP64_EXTRA_TAG = 0x0001
#: Flag bits zipfile refuses to read a member with: encrypted, compressed patched data, strong
#: encryption. Compression methods it reads a checkpoint's members with: stored and deflated.
_UNREADABLE_FLAGS = 0x0001 | 0x0020 | 0x0040
_STORED, _DEFLATED = 0, 8
_NPY_MAGIC = b"\x93NUMPY"
#: The largest meta.json, in bytes of JSON, that save_checkpoint writes and load_checkpoint
#: reads; a larger meta.json member is refused before it is read. meta.json holds the config,
#: the tensor listings (~95 bytes a tensor: 0.23 MB for a 48-layer model with AdamW's moments,
#: 2,375 tensors), the RNG state and ``extra`` (fit's history: ~260 bytes an epoch). Measured,
#: real ones are under 0.5 MB, even with 1,000 epochs of history; 4 MiB leaves room for ~15,000.
#: The cap bounds what a hostile meta.json costs to read and parse: JSON of small containers
#: (``[[],[],...]``) parses to ~25x its size in Python objects, ~100 MB at 4 MiB (about twice
#: the seed config's 49 MB checkpoint with optimizer state).
MAX_META_BYTES = 4 << 20
#: The longest .npy header that is read: numpy's own limit (``max_header_size``) for headers it
#: parses from untrusted files. save_checkpoint writes 128-byte headers.
_MAX_NPY_HEADER_BYTES = 10_000
#: Array data is read from its zip member in pieces of this size, straight into the array (as
#: numpy's read_array does): a tensor is never held twice.
_READ_CHUNK = 1 << 18
#: The fewest bytes of the file that one entry of a loadable checkpoint occupies: its local header
#: (30 bytes and its name), its record in the zip directory (46 bytes and its name again), a name
#: of at least 5 bytes ("opt/x") and its data, which starts with a .npy header numpy parses: 55
#: bytes at the least (the 10 bytes of magic, version and length, then
#: "{'descr':'?','fortran_order':False,'shape':()}"), 57 deflated. 30 + 46 + 2*5 + 55 = 141;
#: 128 leaves a margin. Files save_checkpoint writes hold far more: at least 242 bytes an entry
#: (numpy's 20-byte zip64 field, 128-byte .npy headers), ~300 with the entry's line in meta.json;
#: measured with AdamW state, 388 for a 24-layer model of the smallest widths (1,223 entries),
#: 772 for the tests' 2-layer model, 11,473 for a 1.9 MB one. A zip directory of more than
#: ``file_size // MIN_ENTRY_BYTES`` entries is refused before zipfile parses it: zipfile builds
#: ~500 bytes of objects for every entry (a ZipInfo and its name), so 40,000 entries pointing at
#: one local header, a 2.5 MB file, would cost 22 MB. This coarse bound protects the walk over the
#: directory that finds meta.json's record; meta.json, read from it, then says exactly how many
#: entries the directory must hold (1 + parameters + optimizer-state tensors), and a directory
#: that holds another number is refused before zipfile parses it too.
MIN_ENTRY_BYTES = 128
#: What reading a damaged zip / .npy member can raise (zipfile, zlib, numpy.lib.format). An
#: encrypted-flag or compression-method bit flipped by corruption surfaces as RuntimeError /
#: NotImplementedError from zipfile; a damaged .npy header as tokenize.TokenError (numpy parses
#: the header before zipfile has checked the member's CRC).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, RuntimeError, zlib.error,
    struct.error, OverflowError, IndexError, TypeError, SyntaxError, tokenize.TokenError,
)
#: ... and parsing a .npy header (at most _MAX_NPY_HEADER_BYTES long: a RecursionError or
#: MemoryError there comes from the parser's nesting limits, not from a shortage of memory).
_HEADER_ERRORS: tuple[type[BaseException], ...] = (*_READ_ERRORS, RecursionError, MemoryError)

PathLike = str | os.PathLike[str]
_UNREAD = object()


class CheckpointError(ValueError):
    """Every problem with a checkpoint file or its contents, on save and on load."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What :func:`load_checkpoint` returns. ``params`` are in schema order.

    ``rng_state`` is the saved ``Generator.bit_generator.state`` in JSON form (arrays of the
    state, e.g. MT19937's key, as lists of ints); :meth:`rng` turns it back into a Generator.
    Compared by identity (the fields hold arrays).
    """

    config: PerceiverConfig
    params: dict[str, np.ndarray]
    step: int
    opt_state: dict[str, np.ndarray] | None
    rng_state: dict[str, Any] | None
    extra: dict[str, Any]
    #: A published model's checkpoint: its HF class, config.json and buffers (schema order);
    #: None, None, None for a Perceiver's. ``config`` is then its encoder's config.
    architecture: str | None = None
    hf_config: dict[str, Any] | None = None
    buffers: dict[str, np.ndarray] | None = None

    def model(self) -> Perceiver | PretrainedPerceiver:
        """The saved model with the saved parameters: a ``Perceiver(config, params)``, or for a
        published model's checkpoint a ``PretrainedPerceiver(architecture, hf_config, params,
        buffers, dtype=config.dtype)``."""
        if self.architecture is None:

            return Perceiver(self.config, self.params)

        assert self.hf_config is not None
        return PretrainedPerceiver(self.architecture, self.hf_config, self.params, self.buffers,
                                   dtype=self.config.dtype)

    def rng(self) -> np.random.Generator:
        """A new Generator of the saved bit generator class, restored to ``rng_state``: its draws
        continue exactly where the saved generator's would have. Each call returns a fresh one."""
        if self.rng_state is None:
            raise CheckpointError("rng_state: this checkpoint holds no RNG state (saved without rng=)")
        return _restore_generator(self.rng_state, "rng_state")


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    path: PathLike,
    *,
    config: PerceiverConfig | None = None,
    params: Mapping[str, np.ndarray],
    step: int = 0,
    opt_state: Mapping[str, np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    extra: Mapping[str, Any] | None = None,
    model: Perceiver | PretrainedPerceiver | None = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically and return ``path`` as a Path.

    The schema comes from ``config`` or from ``model`` (give one): ``params`` must match
    ``param_shapes(config)`` exactly (names, shapes, dtype ``config.dtype``); with ``model`` a
    :class:`~perceiver_np.model.Perceiver`, its config; with ``model`` a
    :class:`~perceiver_np.pretrained.PretrainedPerceiver`, the schema of its HF class and
    config.json (``model.specs()``, dtype ``model.config.dtype``), and the checkpoint stores
    its architecture, hf_config and buffers too (``model.buffers``, checked against its
    ``buffer_specs()``). ``params`` are the ones to save (e.g. a training state's), not
    necessarily ``model.params``.

    ``opt_state`` is a flat dict of numeric arrays (names like ``"m/<param>"``); ``rng`` a
    ``numpy.random.Generator`` whose state is stored; ``extra`` small JSON-able metadata (None,
    bool, int, float, str, list, dict with str keys; numpy scalars are converted; at most
    :data:`MAX_META_BYTES` of JSON with the rest of meta.json). Every problem with these is a
    :class:`CheckpointError` raised before anything is written, NaN or inf in ``params``,
    ``opt_state`` or the buffers included (naming the first such tensor and how many entries
    are not finite): the file already at ``path`` stays as it was. The path is used as given
    (no ``.npz`` is appended). Temporary files of earlier saves of ``path`` that were killed are
    removed.
    """
    schema = _schema_for_save(config, model)
    config_json = _config_to_json(schema.config)
    ordered = _check_tensors_for_save(schema, schema.params, params, "params")
    buffers = None
    if schema.buffers is not None:  # a published model's
        buffers = _check_tensors_for_save(schema, schema.buffers, getattr(model, "buffers", None), "buffers")
    step = _check_step(step, "step")
    opt = _check_opt_state_for_save(opt_state)
    target = Path(path)
    _check_finite_for_save(ordered, "params", target)
    if buffers is not None:
        _check_finite_for_save(buffers, "buffers", target)
    if opt is not None:
        _check_finite_for_save(opt, "opt_state", target)
    rng_json = None if rng is None else _generator_to_json(rng)
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise CheckpointError(f"extra: expected a dict, got {type(extra).__name__}")
    extra_json = _to_json(dict(extra), "extra")

    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": config_json,
        "step": step,
        "params": _listing(ordered),
        "opt": None if opt is None else _listing(opt),
        "rng": None if rng_json is None else {"bit_generator": rng_json["bit_generator"], "state": rng_json},
        "extra": extra_json,
        "written_by": {"perceiver_np": _package_version(), "numpy": np.__version__},
    }
    if buffers is not None:
        meta["pretrained"] = {"architecture": schema.architecture, "hf_config": schema.hf_config}
        meta["buffers"] = _listing(buffers)
    meta_bytes = json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")
    if len(meta_bytes) > MAX_META_BYTES:
        raise CheckpointError(
            f"{META_KEY}: would be {len(meta_bytes)} bytes of JSON, more than the {MAX_META_BYTES}-byte "
            "limit (MAX_META_BYTES) that load_checkpoint reads; keep extra small"
        )
    arrays: dict[str, np.ndarray] = {META_KEY: np.frombuffer(meta_bytes, dtype=np.uint8)}
    arrays.update({PARAMS_PREFIX + name: value for name, value in ordered.items()})
    if buffers is not None:
        arrays.update({BUFFERS_PREFIX + name: value for name, value in buffers.items()})
    if opt is not None:
        arrays.update({OPT_PREFIX + name: value for name, value in opt.items()})
    atomic_savez(target, arrays)
    return target


@dataclass(frozen=True, eq=False)
class _Schema:
    """What a checkpoint's tensors are checked against: the (encoder's) config, the parameters'
    names and shapes in schema order, and for a published model its buffers', HF class and
    config.json (as JSON values); ``buffers`` is None for a Perceiver."""

    config: PerceiverConfig
    params: dict[str, tuple[int, ...]]
    buffers: dict[str, tuple[int, ...]] | None = None
    architecture: str | None = None
    hf_config: dict[str, Any] | None = None
    source: str = "the config"  # what the messages call the schema's origin


def _schema_for_save(config: object, model: object) -> _Schema:
    if config is not None and model is not None:
        raise CheckpointError("config, model: expected one of them (model= brings its own config), got both")
    if model is None:
        if not isinstance(config, PerceiverConfig):
            raise CheckpointError(f"config: expected a PerceiverConfig, got {type(config).__name__}")
        return _Schema(config, param_shapes(config))
    if isinstance(model, Perceiver):
        return _Schema(model.config, param_shapes(model.config))
    if not isinstance(model, PretrainedPerceiver):
        raise CheckpointError(
            f"model: expected a Perceiver or a PretrainedPerceiver, got {type(model).__name__}")
    return _schema_of(model)


def hf_config_json(model: PretrainedPerceiver) -> dict[str, Any]:
    """A published ``model``'s hf_config as the JSON values a checkpoint (or a golden file)
    stores: ``id2label``'s int keys as strings and tuples as lists, as config.json has them;
    checked to rebuild exactly the model's parameter and buffer shapes."""
    hf_config = _schema_of(model).hf_config
    assert hf_config is not None
    return hf_config


def _schema_of(model: PretrainedPerceiver) -> _Schema:
    """The schema a checkpoint of the published ``model`` stores: its hf_config as JSON values
    (``id2label``'s int keys as strings, tuples as lists, as config.json has them), verified to
    rebuild exactly the model's parameter and buffer shapes (a field that does not survive JSON
    fails the save, naming it)."""
    hf_json = _hf_config_to_json(model.hf_config)
    try:
        rebuilt = _pretrained_schema(model.architecture, json.loads(json.dumps(hf_json)), model.config.dtype,
                                     hf_json, "the model")
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"hf_config: does not survive the JSON round trip of a checkpoint: {exc}") from exc
    want = {k: s.shape for k, s in model.specs().items()}
    want_buffers = {k: s.shape for k, s in model.buffer_specs().items()}
    if rebuilt.params != want or rebuilt.buffers != want_buffers:
        differ = sorted(k for k in {*want, *rebuilt.params} if want.get(k) != rebuilt.params.get(k))
        raise CheckpointError(f"hf_config: does not survive the JSON round trip of a checkpoint: the "
                              f"rebuilt model's tensors {differ or sorted(want_buffers)} differ")
    return rebuilt


def _pretrained_layout(architecture: str, hf_config: dict[str, Any], dtype: str
                       ) -> tuple[PerceiverConfig, list[Any]]:
    """The encoder's config and the pieces (preprocessor, decoder, postprocessor) of HF class
    ``architecture`` with config.json ``hf_config``; cheap whatever the sizes (shapes only)."""

    _, pieces, cfg = _layout(architecture, hf_config, dtype)
    return cfg, [x for x in pieces if x is not None]


def _pretrained_shapes(cfg: PerceiverConfig, pieces: list[Any]
                       ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Parameter and buffer shapes in schema order (``PretrainedPerceiver.specs()`` and
    ``buffer_specs()``): ~16 entries a block of the encoder, a fixed number for the pieces."""

    buffers: dict[str, tuple[int, ...]] = {}
    for piece in pieces:
        buffers.update({k: s.shape for k, s in piece.buffer_specs.items()})
    return {k: s.shape for k, s in _specs(cfg, pieces).items()}, buffers


def _pretrained_schema(architecture: str, hf_config: dict[str, Any], dtype: str, hf_json: dict[str, Any],
                       source: str) -> _Schema:
    cfg, pieces = _pretrained_layout(architecture, hf_config, dtype)
    params, buffers = _pretrained_shapes(cfg, pieces)
    return _Schema(cfg, params, buffers, architecture, hf_json, source)


def _hf_config_to_json(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """An HF config dict as JSON values: integer keys (``id2label``'s) become strings, as
    ``json.dumps`` and config.json have them; everything else as :func:`_to_json` (tuples as
    lists)."""

    def keys_as_str(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {(str(int(k)) if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))
                     else k): keys_as_str(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [keys_as_str(v) for v in value]
        return value

    if not isinstance(hf_config, Mapping):
        raise CheckpointError(f"hf_config: expected a dict (config.json), got {type(hf_config).__name__}")
    return dict(_to_json(keys_as_str(hf_config), "hf_config", tuples=True))


def _check_tensors_for_save(schema: _Schema, shapes: dict[str, tuple[int, ...]], arrays: object,
                            what: str) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise CheckpointError(f"{what}: expected a dict of arrays, got {type(arrays).__name__}")
    problems = _tensor_problems(schema.config, shapes, arrays, lambda k: f"{what}[{k!r}]", schema.source)
    if problems:
        raise CheckpointError(_join(what, problems))
    return {name: arrays[name] for name in shapes}


def _check_step(step: object, where: str) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
        raise CheckpointError(f"{where}: expected a non-negative integer, got {step!r}")
    return int(step)


def _check_opt_state_for_save(opt_state: object) -> dict[str, np.ndarray] | None:
    if opt_state is None:
        return None
    if not isinstance(opt_state, Mapping):
        raise CheckpointError(f"opt_state: expected a dict of arrays or None, got {type(opt_state).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, value in opt_state.items():
        _check_opt_name(name)
        where = f"opt_state[{name!r}]"
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{where}: expected a numpy.ndarray, got {type(value).__name__}")
        if value.dtype.kind not in _OPT_KINDS:
            raise CheckpointError(
                f"{where}: expected a bool, integer, float or complex array, "
                f"got dtype {_dtype_name(value.dtype)}"
            )
        out[name] = value
    return out


def _check_opt_name(name: object) -> None:
    """Names become zip member names ``opt/<name>.npy``: they must come back unchanged."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"opt_state: keys must be non-empty strings, got {name!r}")
    bad = (
        "\x00" in name or "\\" in name or name.startswith("/") or name.endswith("/")
        or "//" in name or any(part in (".", "..") for part in name.split("/"))
    )
    if bad:
        raise CheckpointError(
            f"opt_state: key {name!r} cannot be stored (no NUL, backslash, empty, '.' or '..' path parts)"
        )


def _check_finite_for_save(arrays: Mapping[str, np.ndarray], what: str, target: Path) -> None:
    for name, value in arrays.items():
        bad = _count_non_finite(value)
        if bad:
            raise CheckpointError(
                f"{what}[{name!r}]: {bad} of {value.size} entries are not finite (NaN or inf); a "
                f"checkpoint never holds non-finite values, so nothing was written to {target}"
            )


def _count_non_finite(value: np.ndarray) -> int:
    """How many entries are NaN or +-inf (0 for bool and integer arrays). Any NaN or inf makes
    the sum NaN or inf, so the usual case, a finite sum, needs no temporary array."""
    if value.dtype.kind not in "fc" or value.size == 0:
        return 0
    with np.errstate(all="ignore"):
        if np.isfinite(value.sum()):
            return 0
    return int(value.size - np.count_nonzero(np.isfinite(value)))


def _listing(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": v.dtype.str} for k, v in arrays.items()]


def _package_version() -> str:
    return str(__version__)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: PathLike, *, expect_config: PerceiverConfig | None = None,
                    expect_model: Perceiver | PretrainedPerceiver | None = None) -> Checkpoint:
    """Read and validate the checkpoint at ``path``.

    Every problem is a :class:`CheckpointError` whose message starts with the path: not a file,
    not an npz, truncated or corrupt, unknown format version, a stored config that does not
    rebuild, tensors missing, unexpected, mis-shaped, of the wrong dtype for the stored config or
    holding NaN or inf. With ``expect_config`` given, a stored config that differs from it in any
    field is an error listing every differing field with both values. With ``expect_model``
    given, the checkpoint must be of the same kind of model with the same schema: a Perceiver's
    with ``expect_model.config``, or a published model's with its architecture, hf_config
    (compared as JSON values, listing every differing key) and encoder config.

    A published model's checkpoint (``save_checkpoint(..., model=pretrained_model)``) is checked
    the same way, against the schema rebuilt from its stored architecture and hf_config (which
    must give the stored encoder config): its parameters, and its buffers ``buffers/<name>``;
    a stored hf_config of more encoder blocks than the file has entries is refused before its
    schema is built.

    Every member's ``.npy`` header is checked (against ``meta.json``'s listing, the stored
    config's parameter schema and the member's size in the zip directory) before any array data
    is read, and ``meta.json`` is refused unread when it is larger than :data:`MAX_META_BYTES`:
    a hostile file is refused in memory far below the size of the checkpoint it imitates. Before
    that, before zipfile parses the zip directory, a directory that does not fit in the file or
    has more than ``file_size // MIN_ENTRY_BYTES`` entries is refused (:data:`MIN_ENTRY_BYTES`);
    then ``meta.json`` is read from its records and checked, and a directory that holds more or
    fewer entries than it describes (``meta.json``, the stored config's parameters and the
    optimizer-state tensors listed) is refused.

    Temporary files of killed saves of ``path`` (``.<name>.<hex>.tmp``, not locked by a save
    still running) are removed first: this is what ``fit(..., resume=True)`` calls.
    """
    if expect_config is not None and not isinstance(expect_config, PerceiverConfig):
        raise TypeError(
            f"expect_config: expected a PerceiverConfig or None, got {type(expect_config).__name__}"
        )
    if expect_model is not None:
        if not isinstance(expect_model, (Perceiver, PretrainedPerceiver)):
            raise TypeError("expect_model: expected a Perceiver, a PretrainedPerceiver or None, got "
                            f"{type(expect_model).__name__}")
    p = Path(path)
    where = str(p)
    remove_stale_temps(p)
    if not p.exists():
        raise CheckpointError(f"{where}: no such file")
    if not p.is_file():
        raise CheckpointError(f"{where}: not a file")
    try:
        f = open(p, "rb")
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot be read ({exc})") from exc
    with f:
        head = f.read(len(_ZIP_MAGIC))
        if head != _ZIP_MAGIC:
            if _ZIP_MAGIC.startswith(head):
                raise _corrupt(where, f"only {len(head)} bytes long")
            if head == _NPY_MAGIC[: len(head)]:
                raise CheckpointError(f"{where}: a single .npy array, not an npz checkpoint")
            raise CheckpointError(f"{where}: not an npz file (no zip signature at the start)")
        try:
            entries, record = _check_zip_directory(f, where)
        except (OSError, struct.error) as exc:
            raise _corrupt(where, f"{type(exc).__name__}: {exc}") from exc
        meta = _read_meta(_read_meta_member(f, record, where), where)
        checked = _parse_meta(meta, record.offset, entries, where, expect_config, expect_model)
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
        except _READ_ERRORS as exc:
            raise _corrupt(where, f"{type(exc).__name__}: {exc}") from exc
        with zf:
            return _load(zf, checked, where)


@dataclass(frozen=True, eq=False)
class _MetaRecord:
    """meta.json's record in the zip directory (zip64 fields decoded): where its member is."""

    name: bytes  # as stored; its local header must repeat it
    offset: int  # of its local header
    flags: int
    method: int
    crc: int
    compress_size: int
    file_size: int


def _check_zip_directory(f: IO[bytes], where: str) -> tuple[int, _MetaRecord]:
    """Refuse, before zipfile parses it, a zip directory no checkpoint can have; return how many
    records it holds and meta.json's record (the first, if there are several).

    zipfile reads the whole central directory and builds a ZipInfo (~500 bytes) for every record
    in it before anything else can be checked, and it counts the records itself: the end record's
    entry count is not used. So the directory zipfile will read is found here as zipfile finds it
    (:func:`_find_zip_directory`), and refused when it does not end where its end record starts,
    when its end record lists more than ``file_size // MIN_ENTRY_BYTES`` entries or when it takes
    more than half the file (every record is smaller than the local header and data it describes).
    Then its records are counted the way zipfile walks them, none kept but meta.json's: more than
    that bound, a record zipfile would refuse, a count other than the end record's or no meta.json
    is refused too. The caller reads meta.json from its record and compares the count with the
    entries it describes (:func:`_parse_meta`).
    """
    file_size = f.seek(0, os.SEEK_END)
    entries, cd_size, cd_offset, end = _find_zip_directory(f, file_size, where)
    if cd_offset + cd_size != end:
        raise _corrupt(
            where, f"the zip directory's offset {cd_offset} and size {cd_size} do not fit in the file: "
            f"it would end at byte {cd_offset + cd_size}, but its end record starts at byte {end}"
        )
    max_entries = file_size // MIN_ENTRY_BYTES

    def too_many(what: str) -> CheckpointError:
        return _corrupt(
            where, f"its zip directory {what}, more than a {file_size}-byte file can hold (at most "
            f"{max_entries}, {MIN_ENTRY_BYTES} bytes an entry: MIN_ENTRY_BYTES); the directory was not read"
        )

    if entries > max_entries:
        raise too_many(f"lists {entries} entries")
    if 2 * cd_size > file_size:
        raise _corrupt(
            where, f"the zip directory is {cd_size} bytes, more than half of the {file_size}-byte file; "
            "a checkpoint's directory records are smaller than the members they describe"
        )
    f.seek(cd_offset)
    done = count = 0
    meta: tuple[tuple[Any, ...], bytes, bytes] | None = None
    while done < cd_size:
        if count == max_entries:
            raise too_many(f"holds more than {max_entries} records (its end record says {entries})")
        record = f.read(_CENTRAL.size)
        if done + _CENTRAL.size > cd_size or len(record) != _CENTRAL.size:
            raise _corrupt(where, f"zip directory record {count} is truncated")
        fields = _CENTRAL.unpack(record)
        if fields[0] != _CENTRAL_MAGIC:
            raise _corrupt(where, f"zip directory record {count} has no record signature")
        name_size, extra_size, comment_size = fields[12:15]
        skip = name_size + extra_size + comment_size
        if meta is None and name_size >= len(META_KEY):
            name = f.read(name_size)
            if name.split(b"\0", 1)[0] in _META_NAMES:
                meta = fields, name, f.read(extra_size)
                f.seek(comment_size, os.SEEK_CUR)
            else:
                f.seek(extra_size + comment_size, os.SEEK_CUR)
        else:
            f.seek(skip, os.SEEK_CUR)
        done += _CENTRAL.size + skip
        count += 1
    if done != cd_size or count != entries:
        raise _corrupt(
            where, f"the zip directory holds {count} records in {done} bytes; its end record says "
            f"{entries} in {cd_size}"
        )
    if meta is None:
        raise _corrupt(where, f"no {META_KEY} entry")
    return count, _meta_record(*meta, where)


def _meta_record(fields: tuple[Any, ...], name: bytes, extra: bytes, where: str) -> _MetaRecord:
    """meta.json's record from its 46-byte head, name and extra field; sizes and offset that are
    0xFFFFFFFF are read from its zip64 extra field, in zipfile's order (``_decodeExtra``)."""
    values = [fields[11], fields[10], fields[18]]  # file size, compressed size, header offset
    zip64 = b""
    while len(extra) >= 4:
        tag, size = struct.unpack("<2H", extra[:4])
        if tag == _ZIP64_EXTRA_TAG:
            zip64 = extra[4:4 + size]
            break
        extra = extra[4 + size:]
    for i, value in enumerate(values):
        if value == _ZIP64_UNKNOWN:
            if len(zip64) < 8:
                raise _corrupt(where, f"entry {META_KEY!r}: its zip64 extra field lacks a size or offset")
            values[i], zip64 = int.from_bytes(zip64[:8], "little"), zip64[8:]
    file_size, compress_size, offset = values
    return _MetaRecord(name, offset, fields[5], fields[6], fields[9], compress_size, file_size)


def _read_meta_member(f: IO[bytes], record: _MetaRecord, where: str) -> bytes:
    """The bytes of meta.json's member (a .npy header, then the JSON), read from its local header
    as zipfile would read them, before zipfile parses the directory: its size is checked against
    the cap first, it is never inflated past the size in its record, and its CRC is checked."""
    if record.flags & _UNREADABLE_FLAGS:
        raise _corrupt(where, f"entry {META_KEY!r} is encrypted or patched (flag bits {record.flags:#06x})")
    if record.method not in (_STORED, _DEFLATED):
        raise _corrupt(
            where, f"entry {META_KEY!r} has compression method {record.method}, not stored (0) or "
            "deflated (8)"
        )
    if record.file_size > MAX_META_BYTES + _MAX_NPY_HEADER_BYTES:
        raise CheckpointError(
            f"{where}: entry {META_KEY!r} is {record.file_size} bytes, more than the {MAX_META_BYTES}-byte "
            "limit (MAX_META_BYTES) and a .npy header; it was not read"
        )
    if record.method == _STORED and record.compress_size != record.file_size:
        raise _corrupt(
            where, f"entry {META_KEY!r} is stored in {record.compress_size} bytes, but its size is "
            f"{record.file_size}"
        )
    try:
        f.seek(record.offset)
        local = _LOCAL.unpack(_read_exactly(f, _LOCAL.size, "local header"))
        if local[0] != _ZIP_MAGIC:
            raise _corrupt(where, f"entry {META_KEY!r}: no local header at byte {record.offset}")
        if _read_exactly(f, local[10], "local header") != record.name:
            raise _corrupt(where, f"entry {META_KEY!r}: its local header names another member")
        f.seek(local[11], os.SEEK_CUR)
        if record.method == _STORED:
            data = _read_exactly(f, record.file_size, "data")
        else:
            data = _inflate(f, record.compress_size, record.file_size)
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        raise _corrupt(where, f"entry {META_KEY!r}: {type(exc).__name__}: {exc}") from exc
    if zlib.crc32(data) != record.crc:
        raise _corrupt(where, f"entry {META_KEY!r}: its CRC-32 is not the one in the zip directory")
    return data


def _inflate(f: IO[bytes], compress_size: int, size: int) -> bytes:
    """``size`` bytes inflated from the raw deflate data (at most ``compress_size`` bytes) at the
    file's position, read in pieces; nothing past ``size`` is inflated (as zipfile reads)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending, left = b"", compress_size
    while len(out) < size and not inflater.eof:
        if not pending:
            if not left:
                break
            pending = f.read(min(_READ_CHUNK, left))
            if not pending:
                raise EOFError("the file ends inside the member's deflated data")
            left -= len(pending)
        out += inflater.decompress(pending, size - len(out))
        pending = inflater.unconsumed_tail
    if len(out) != size:
        raise EOFError(f"the member inflates to {len(out)} bytes, not its {size}")
    return bytes(out)


def _find_zip_directory(f: IO[bytes], file_size: int, where: str) -> tuple[int, int, int, int]:
    """The entry count, size and offset of the zip directory, and where the end records that
    describe it start, found exactly as zipfile finds them (``_EndRecData``, ``_EndRecData64``):
    the end record in the last 22 bytes if it has no comment, else the last signature in the last
    64 KiB + 22 bytes; then a zip64 end record (numpy's large files), if a zip64 locator and the
    record are right before it. zipfile then reads the directory that ends where those start."""
    window = b""
    if file_size >= _EOCD.size:
        f.seek(file_size - _EOCD.size)
        window = f.read(_EOCD.size)
    if window[:4] == _EOCD_MAGIC and window[-2:] == b"\0\0":
        pos = file_size - _EOCD.size
    else:
        start = max(file_size - _EOCD_SEARCH, 0)
        f.seek(start)
        window = f.read(_EOCD_SEARCH)
        i = window.rfind(_EOCD_MAGIC)
        if i < 0 or len(window) - i < _EOCD.size:
            raise _corrupt(where, "no zip end-of-central-directory record at its end")
        pos, window = start + i, window[i:i + _EOCD.size]
    _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack(window)
    if pos < _ZIP64_LOCATOR.size:
        return entries, cd_size, cd_offset, pos
    f.seek(pos - _ZIP64_LOCATOR.size)
    magic, disk, _, disks = _ZIP64_LOCATOR.unpack(f.read(_ZIP64_LOCATOR.size))
    if magic != _ZIP64_LOCATOR_MAGIC:
        return entries, cd_size, cd_offset, pos
    if disk != 0 or disks > 1:
        raise _corrupt(where, "a zip file spanning several disks")
    end = pos - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if end < 0:
        raise _corrupt(where, "a zip64 locator with no room for its zip64 end record")
    f.seek(end)
    record = _ZIP64_EOCD.unpack(f.read(_ZIP64_EOCD.size))
    if record[0] != _ZIP64_EOCD_MAGIC:
        return entries, cd_size, cd_offset, pos
    return record[7], record[8], record[9], end


@dataclass(frozen=True, eq=False)
class _Member:
    """A zip member whose ``.npy`` header has been read (and nothing after it): what it claims."""

    key: str  # the entry's name, e.g. "params/latents" (the member is "params/latents.npy")
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header: bytes  # the header's bytes, magic included; the array data follows them

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, eq=False)
class _Meta:
    """meta.json, read and checked before zipfile parses the zip directory."""

    offset: int  # of its member's local header: the member zipfile must list as META_KEY
    config: PerceiverConfig
    shapes: dict[str, tuple[int, ...]]  # param_shapes(config), or a published model's schema
    step: int
    params: dict[str, tuple[tuple[int, ...], str]]
    opt: dict[str, tuple[tuple[int, ...], str]] | None
    rng_state: dict[str, Any] | None
    extra: dict[str, Any]
    schema: _Schema  # what the tensors are checked against (buffers None: a Perceiver's)
    buffers: dict[str, tuple[tuple[int, ...], str]] | None = None  # the listing of buffers/<name>


def _parse_meta(
    meta: dict[str, Any], offset: int, entries: int, where: str, expect_config: PerceiverConfig | None,
    expect_model: Perceiver | PretrainedPerceiver | None = None,
) -> _Meta:
    """The parts of meta.json (from :func:`_read_meta`), checked, and the number of entries the
    zip directory holds checked against them: exactly meta.json, one per parameter of the stored
    config (or of a published model's stored architecture and hf_config, and one per buffer)
    and one per optimizer-state tensor listed. Called before zipfile parses the directory,
    whose cost (~500 bytes an entry) is then what the checkpoint meta.json describes would cost."""
    config = _config_from_json(meta["config"], where)
    if expect_config is not None:
        _compare_configs(config, expect_config, where)
    step = meta["step"]
    if type(step) is not int or step < 0:
        raise _corrupt(where, f"step in {META_KEY} is {step!r}, not a non-negative integer")
    param_listing = _parse_listing(meta["params"], "params", where)
    opt_listing = None if meta["opt"] is None else _parse_listing(meta["opt"], "opt", where)
    rng_state = _parse_rng(meta["rng"], where)
    extra = meta["extra"]
    if not isinstance(extra, dict):
        raise _corrupt(where, f"extra in {META_KEY} is {type(extra).__name__}, not an object")
    architecture, hf_config, buffer_listing = None, None, None
    if "pretrained" in meta:
        architecture, hf_config = _parse_pretrained(meta["pretrained"], where)
        buffer_listing = _parse_listing(meta["buffers"], "buffers", where)
    if expect_model is not None:
        _compare_models(config, architecture, hf_config, expect_model, where)

    def differs(expected: str) -> CheckpointError:
        return _corrupt(where, f"the zip directory holds {entries} entries, {META_KEY} describes {expected}")

    # every block has a tensor: a config of more blocks than entries is refused before its
    # schema (~16 tensors a block) is built
    blocks = config.num_layers + config.num_cross_layers
    if entries < 2 + blocks:
        raise differs(f"at least {2 + blocks} ({META_KEY}, the latents and {blocks} blocks of its config)")
    n_opt = 0 if opt_listing is None else len(opt_listing)
    if architecture is None:
        schema = _Schema(config, param_shapes(config), source="the stored config")
        expected = 1 + len(schema.params) + n_opt
        described = f"the {len(schema.params)} parameters of its config"
    else:
        assert hf_config is not None
        schema = _stored_pretrained_schema(config, architecture, hf_config, where)
        assert schema.buffers is not None
        expected = 1 + len(schema.params) + len(schema.buffers) + n_opt
        described = (f"the {len(schema.params)} parameters and {len(schema.buffers)} buffers of its "
                     f"{architecture}")
    if entries > expected:  # fewer entries cost nothing: the tensor checks name what is missing
        raise differs(f"{expected} ({META_KEY}, {described} and {n_opt} optimizer-state tensors)")
    return _Meta(offset, config, schema.params, step, param_listing, opt_listing, rng_state, extra, schema,
                 buffer_listing)


def _parse_pretrained(value: object, where: str) -> tuple[str, dict[str, Any]]:
    """meta.json's ``pretrained`` entry: (architecture, hf_config), or a CheckpointError."""
    if not (isinstance(value, dict) and set(value) == {"architecture", "hf_config"}
            and isinstance(value["architecture"], str) and isinstance(value["hf_config"], dict)):
        raise _corrupt(where, f"the pretrained entry of {META_KEY} is malformed (expected "
                              "{'architecture': str, 'hf_config': object})")
    return value["architecture"], value["hf_config"]


def _stored_pretrained_schema(config: PerceiverConfig, architecture: str, hf_config: dict[str, Any],
                              where: str) -> _Schema:
    """The schema of a published model's checkpoint, rebuilt from its stored architecture and
    hf_config, which must give the stored (encoder) config. Its blocks were checked against the
    file's entries; the derived config is compared before the schema is built, so a hostile
    hf_config of more blocks is refused from its config alone."""
    try:
        derived, pieces = _pretrained_layout(architecture, hf_config, config.dtype)
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as exc:
        raise CheckpointError(
            f"{where}: the stored model ({architecture}, hf_config) is invalid: {exc}") from exc
    diffs = [f"{f.name}: stored {getattr(config, f.name)!r}, rebuilt {getattr(derived, f.name)!r}"
             for f in dataclasses.fields(PerceiverConfig)
             if getattr(config, f.name) != getattr(derived, f.name)]
    if diffs:
        raise _corrupt(where, f"the stored config is not the encoder config of its {architecture} and "
                              f"hf_config: " + "; ".join(diffs))
    params, buffers = _pretrained_shapes(derived, pieces)
    return _Schema(config, params, buffers, architecture, hf_config, f"the stored {architecture}")


def _compare_models(config: PerceiverConfig, architecture: str | None, hf_config: dict[str, Any] | None,
                    expected: Perceiver | PretrainedPerceiver, where: str) -> None:
    """The checkpoint is of ``expected``'s kind and schema (load_checkpoint's expect_model)."""

    want_arch = expected.architecture if isinstance(expected, PretrainedPerceiver) else None
    if not isinstance(expected, PretrainedPerceiver) or architecture is None or hf_config is None:
        if want_arch != architecture:
            held = "a Perceiver" if architecture is None else f"a published {architecture}"
            want_kind = "a Perceiver" if want_arch is None else f"a published {want_arch}"
            raise CheckpointError(f"{where}: the checkpoint holds {held}, expect_model is {want_kind}")
        _compare_configs(config, expected.config, where, "expect_model.config")
        return
    if architecture != want_arch:
        raise CheckpointError(
            f"{where}: the checkpoint holds a {architecture}, expect_model is a {want_arch}")
    want = _hf_config_to_json(expected.hf_config)
    diffs = differences(hf_config, want, "checkpoint", "expected")
    if diffs:
        raise CheckpointError(f"{where}: the checkpoint's hf_config differs from expect_model's in "
                              f"{len(diffs)} field(s): " + "; ".join(diffs))
    _compare_configs(config, expected.config, where, "expect_model.config")


def _load(zf: zipfile.ZipFile, meta: _Meta, where: str) -> Checkpoint:
    members: dict[str, zipfile.ZipInfo] = {}
    dupes: set[str] = set()
    for info in zf.infolist():  # names as np.savez writes them: "<entry>.npy"
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if key in members:
            dupes.add(key)
        members[key] = info
    if dupes:
        raise _corrupt(where, f"duplicate entries {sorted(dupes)}")
    if META_KEY not in members or members[META_KEY].header_offset != meta.offset:
        raise _corrupt(where, f"zipfile lists another {META_KEY} entry than the one read")
    config = meta.config

    schema = meta.schema
    param_names: list[str] = []
    opt_names: list[str] = []
    buffer_names: list[str] = []
    for name in members:
        if name.startswith(PARAMS_PREFIX):
            param_names.append(name[len(PARAMS_PREFIX):])
        elif name.startswith(OPT_PREFIX):
            opt_names.append(name[len(OPT_PREFIX):])
        elif name.startswith(BUFFERS_PREFIX) and schema.buffers is not None:
            buffer_names.append(name[len(BUFFERS_PREFIX):])
        elif name != META_KEY:
            kinds = "" if schema.buffers is None else f", {BUFFERS_PREFIX}<name>"
            raise CheckpointError(
                f"{where}: unexpected entry {name!r} (a checkpoint holds only {META_KEY}, "
                f"{PARAMS_PREFIX}<name>{kinds} and {OPT_PREFIX}<name>)"
            )

    def header(key: str) -> _Member:
        return _read_header(zf, key, members[key], where)

    # Headers only, first: parameters against the schema of the stored config (the most telling
    # message), then against the listing in meta.json (a disagreement there means a damaged file)
    shapes = meta.shapes
    params_in = {name: header(PARAMS_PREFIX + name) for name in param_names if name in shapes}
    present = {name: _UNREAD for name in param_names}  # the names in file order, unread
    problems = _tensor_problems(config, shapes, {**present, **params_in},
                                lambda k: f"tensor {PARAMS_PREFIX + k!r}", schema.source)
    if problems:
        raise CheckpointError(_join(where, problems))
    params_in = {name: params_in[name] for name in shapes}  # schema order
    _check_against_listing(params_in, meta.params, "params", where)

    buffers_in = None
    if schema.buffers is not None:  # a published model's: its buffers, as its parameters
        assert meta.buffers is not None
        bshapes = schema.buffers
        buffers_in = {name: header(BUFFERS_PREFIX + name) for name in buffer_names if name in bshapes}
        present = {name: _UNREAD for name in buffer_names}
        problems = _tensor_problems(config, bshapes, {**present, **buffers_in},
                                    lambda k: f"tensor {BUFFERS_PREFIX + k!r}", schema.source)
        if problems:
            raise CheckpointError(_join(where, problems))
        buffers_in = {name: buffers_in[name] for name in bshapes}
        _check_against_listing(buffers_in, meta.buffers, "buffers", where)

    opt_in, opt_listing = None, meta.opt
    if opt_listing is None:
        if opt_names:
            raise _corrupt(where, f"{META_KEY} records no optimizer state but the file holds {opt_names}")
    else:
        opt_in = {name: header(OPT_PREFIX + name) for name in opt_names}
        for name, member in opt_in.items():
            if member.dtype.kind not in _OPT_KINDS:
                raise CheckpointError(
                    f"{where}: tensor {OPT_PREFIX + name!r}: expected a bool, integer, float or complex "
                    f"array, got dtype {_dtype_name(member.dtype)}"
                )
        opt_in = {name: opt_in[name] for name in opt_listing if name in opt_in}
        _check_against_listing(opt_in, opt_listing, "opt", where, present_names=opt_names)

    # every header agrees with the listing, the schema and its member's size: now the data
    params = {name: _read_tensor(zf, member, where) for name, member in params_in.items()}
    buffers = None
    if buffers_in is not None:
        buffers = {name: _read_tensor(zf, member, where) for name, member in buffers_in.items()}
    opt_state = None
    if opt_in is not None:
        opt_state = {name: _read_tensor(zf, member, where) for name, member in opt_in.items()}
    return Checkpoint(
        config=config, params=params, step=meta.step, opt_state=opt_state, rng_state=meta.rng_state,
        extra=meta.extra, architecture=schema.architecture, hf_config=schema.hf_config, buffers=buffers,
    )


def _corrupt(where: str, detail: str) -> CheckpointError:
    return CheckpointError(f"{where}: truncated or corrupt checkpoint file ({detail})")


def _read_exactly(fp: IO[bytes], n: int, what: str) -> bytes:
    """``n`` bytes of a member (``n`` is small, or checked against the member's size first)."""
    data = b""
    while len(data) < n:
        piece = fp.read(n - len(data))
        if not piece:
            raise EOFError(f"the member ends inside its {what} ({len(data)} of {n} bytes)")
        data += piece
    return data


def _read_header(zf: zipfile.ZipFile, key: str, info: zipfile.ZipInfo, where: str) -> _Member:
    """The ``.npy`` header of member ``key`` (nothing after it is read), checked against the
    member's uncompressed size in the zip directory."""
    return _Member(key, info, *_npy_header(lambda: zf.open(info), key, info.file_size, where))


def _npy_header(
    open_member: Callable[[], IO[bytes]], key: str, size: int, where: str
) -> tuple[tuple[int, ...], np.dtype, bool, bytes]:
    """Shape, dtype, Fortran order and bytes (magic included) of the ``.npy`` header of member
    ``key`` of ``size`` bytes (read with numpy's header functions from the start of
    ``open_member()``; nothing after the header is read), checked against ``size``: every failure
    a CheckpointError naming the path and the entry."""
    fmt = np.lib.format
    try:
        with open_member() as fp:
            major, minor = fmt.read_magic(fp)
            if (major, minor) == (1, 0):
                length_format, read_header = "<H", fmt.read_array_header_1_0
            elif (major, minor) == (2, 0):
                length_format, read_header = "<I", fmt.read_array_header_2_0
            else:
                raise _corrupt(where, f"entry {key!r}: .npy format version {major}.{minor}, not 1.0 or 2.0")
            length_bytes = _read_exactly(fp, struct.calcsize(length_format), ".npy header length")
            (length,) = struct.unpack(length_format, length_bytes)
            if length > _MAX_NPY_HEADER_BYTES:
                raise _corrupt(
                    where, f"entry {key!r}: its .npy header claims to be {length} bytes long; a header "
                    f"has at most {_MAX_NPY_HEADER_BYTES}"
                )
            text = _read_exactly(fp, length, ".npy header")
            shape, fortran_order, dtype = read_header(
                io.BytesIO(length_bytes + text), max_header_size=_MAX_NPY_HEADER_BYTES
            )
    except CheckpointError:
        raise
    except _HEADER_ERRORS as exc:
        raise _corrupt(where, f"entry {key!r}: {type(exc).__name__}: {exc}") from exc
    if dtype.hasobject:
        raise CheckpointError(
            f"{where}: entry {key!r} is a pickled object array; checkpoints are never unpickled "
            "(nothing was read past its .npy header), so this file was not written by save_checkpoint"
        )
    if any(n < 0 for n in shape):
        raise _corrupt(where, f"entry {key!r}: its .npy header claims shape {shape}")
    header = fmt.MAGIC_PREFIX + bytes((major, minor)) + length_bytes + text
    nbytes = math.prod(shape) * dtype.itemsize
    if size != len(header) + nbytes:
        raise _corrupt(
            where, f"entry {key!r}: the zip member holds {size} bytes, but its .npy header "
            f"describes {len(header) + nbytes} (a {len(header)}-byte header and "
            f"{nbytes} bytes of {_dtype_name(dtype)} {tuple(shape)})"
        )
    return tuple(shape), dtype, fortran_order, header


def _read_data(zf: zipfile.ZipFile, member: _Member, where: str) -> np.ndarray:
    """The array of a member whose header was checked: read in pieces straight into an array of
    the checked size. The zip CRC is verified as the last byte is read."""
    try:
        with zf.open(member.info) as fp:
            if _read_exactly(fp, len(member.header), ".npy header") != member.header:
                raise _corrupt(where, f"entry {member.key!r}: its .npy header changed while it was read")
            flat = np.empty(math.prod(member.shape), dtype=member.dtype)
            raw = flat.view(np.uint8)
            done = 0
            while done < member.nbytes:
                piece = fp.read(min(_READ_CHUNK, member.nbytes - done))
                if not piece:
                    raise EOFError(f"the member ends after {done} of its {member.nbytes} data bytes")
                raw[done:done + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                done += len(piece)
            if fp.read(1):  # pragma: no cover - zipfile stops at the size checked against the header
                raise EOFError("data past the end of its array")
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        raise _corrupt(where, f"entry {member.key!r}: {type(exc).__name__}: {exc}") from exc
    if member.fortran_order:
        return flat.reshape(member.shape[::-1]).transpose()
    return flat.reshape(member.shape)


def _read_tensor(zf: zipfile.ZipFile, member: _Member, where: str) -> np.ndarray:
    value = _read_data(zf, member, where)
    bad = _count_non_finite(value)
    if bad:
        raise CheckpointError(
            f"{where}: tensor {member.key!r}: {bad} of {value.size} entries are not finite (NaN or inf); "
            "save_checkpoint never writes non-finite values"
        )
    return value


def _read_meta(data: bytes, where: str) -> dict[str, Any]:
    """meta.json from its member's bytes (a .npy header of uint8 bytes, then UTF-8 JSON): the
    JSON object, its format, version and keys checked."""
    shape, dtype, _, header = _npy_header(lambda: io.BytesIO(data), META_KEY, len(data), where)
    if dtype != np.uint8 or len(shape) != 1:
        raise _corrupt(where, f"{META_KEY} is a {dtype.name} array of shape {shape}, not uint8 bytes")
    if shape[0] > MAX_META_BYTES:
        raise CheckpointError(
            f"{where}: entry {META_KEY!r} holds {shape[0]} bytes of JSON, more than the "
            f"{MAX_META_BYTES}-byte limit (MAX_META_BYTES); it was not read"
        )
    try:
        meta = json.loads(str(memoryview(data)[len(header):], "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(where, f"{META_KEY} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise _corrupt(where, f"{META_KEY} holds a {type(meta).__name__}, not an object")
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise CheckpointError(
            f"{where}: not a perceiver_np checkpoint (format {fmt!r}, expected {FORMAT_NAME!r})"
        )
    version = meta.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: unknown checkpoint format version {version!r}; this perceiver_np reads version "
            f"{FORMAT_VERSION}"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if any(k in meta for k in _PRETRAINED_META_KEYS):  # a published model's checkpoint
        missing += [k for k in _PRETRAINED_META_KEYS if k not in meta]
    unknown = [k for k in meta if k not in _META_KEYS and k not in _PRETRAINED_META_KEYS]
    if missing or unknown:
        raise _corrupt(where, f"{META_KEY} lacks keys {missing} / has unknown keys {unknown}")
    return meta


def _parse_listing(listing: object, what: str, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    bad = _corrupt(where, f"the {what!r} listing in {META_KEY} is malformed")
    if not isinstance(listing, list):
        raise bad
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for item in listing:
        if not isinstance(item, dict) or set(item) != {"name", "shape", "dtype"}:
            raise bad
        name, shape, dtype = item["name"], item["shape"], item["dtype"]
        if (
            not isinstance(name, str) or name in out or not isinstance(dtype, str)
            or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)
        ):
            raise bad
        out[name] = (tuple(shape), dtype)
    return out


def _check_against_listing(
    members: dict[str, _Member],
    listing: dict[str, tuple[tuple[int, ...], str]],
    what: str,
    where: str,
    present_names: list[str] | None = None,
) -> None:
    """The members' headers (shape, dtype) against the listing in meta.json."""
    names = list(members) if present_names is None else present_names
    if set(names) != set(listing):
        raise _corrupt(
            where,
            f"{META_KEY} lists {what} {sorted(set(listing) - set(names))} that the file lacks and the "
            f"file holds {sorted(set(names) - set(listing))} that {META_KEY} does not list",
        )
    for name, member in members.items():
        shape, dtype = listing[name]
        if member.shape != shape or member.dtype.str != dtype:
            raise _corrupt(
                where,
                f"{META_KEY} lists {what} {name!r} as {dtype} {shape}, the array's .npy header says "
                f"{member.dtype.str} {member.shape}",
            )


# ---------------------------------------------------------------------------------------------
# parameters against the schema (shared by save and load)
# ---------------------------------------------------------------------------------------------


def _param_problems(cfg: PerceiverConfig, params: Mapping[Any, Any], label: Any, source: str) -> list[str]:
    """Every way ``params`` differs from ``param_shapes(cfg)``: :func:`_tensor_problems`."""
    return _tensor_problems(cfg, param_shapes(cfg), params, label, source)


def _tensor_problems(cfg: PerceiverConfig, shapes: Mapping[str, tuple[int, ...]], params: Mapping[Any, Any],
                     label: Any, source: str) -> list[str]:
    """Every way ``params`` differs from ``shapes`` (names and shapes) and ``cfg.dtype``: names,
    types, shapes, dtype. Values may be arrays (save) or members' .npy headers (load, before any
    data is read); those that are ``_UNREAD`` are checked by name only (load does not read
    unexpected tensors)."""
    missing = [k for k in shapes if k not in params]
    unexpected = [k for k in params if k not in shapes]
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {missing} required by {source}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected} not in the parameter schema of {source}")
    for name, shape in shapes.items():
        value = params.get(name, _UNREAD)
        if value is _UNREAD:
            continue
        if not isinstance(value, (np.ndarray, _Member)):
            problems.append(f"{label(name)}: expected a numpy.ndarray, got {type(value).__name__}")
            continue
        if value.shape != shape:
            problems.append(f"{label(name)}: expected shape {shape} from {source}, got {value.shape}")
        if value.dtype != cfg.np_dtype:
            problems.append(
                f"{label(name)}: expected dtype {cfg.dtype} (config.dtype), got {_dtype_name(value.dtype)}"
            )
    return problems


def _join(prefix: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{prefix}: {problems[0]}"
    return f"{prefix}: {len(problems)} problems: " + "; ".join(problems)


def _dtype_name(dtype: np.dtype) -> str:
    """``float64``, or ``float64 ('>f8')`` when the byte order is not the machine's."""
    if dtype.isnative:
        return dtype.name
    return f"{dtype.name} ({dtype.str!r}, non-native byte order)"


# ---------------------------------------------------------------------------------------------
# the config as JSON
# ---------------------------------------------------------------------------------------------


def _config_to_json(cfg: PerceiverConfig) -> dict[str, Any]:
    """``dataclasses.asdict(cfg)`` as JSON values (tuples as lists), verified to rebuild ``cfg``
    exactly: a future field whose type does not survive JSON fails the save, naming it."""
    as_json = _to_json(dataclasses.asdict(cfg), "config", tuples=True)
    try:
        rebuilt = _build_config(json.loads(json.dumps(as_json)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config: does not survive the JSON round trip of a checkpoint: {exc}") from exc
    differ = [f.name for f in dataclasses.fields(cfg) if getattr(rebuilt, f.name) != getattr(cfg, f.name)]
    if differ:
        raise CheckpointError(f"config: field(s) {differ} do not survive the JSON round trip of a checkpoint")
    return as_json


def _build_config(d: dict[str, Any]) -> PerceiverConfig:
    """JSON lists become tuples (a frozen config holds no lists)."""
    return PerceiverConfig(**{k: _lists_to_tuples(v) for k, v in d.items()})


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def _config_from_json(d: object, where: str) -> PerceiverConfig:
    if not isinstance(d, dict):
        raise _corrupt(where, f"the stored config is a {type(d).__name__}, not an object")
    fields = [f for f in dataclasses.fields(PerceiverConfig) if f.init]
    names = {f.name for f in fields}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise CheckpointError(
            f"{where}: the stored config has unknown field(s) {unknown} (written by a newer "
            f"perceiver_np?); PerceiverConfig's fields are {sorted(names)}"
        )
    required = [
        f.name for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in d]
    if missing:
        raise CheckpointError(f"{where}: the stored config lacks required field(s) {missing}")
    try:
        return _build_config(d)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the stored config is invalid: {exc}") from exc


def _compare_configs(stored: PerceiverConfig, expected: PerceiverConfig, where: str,
                     what: str = "expect_config") -> None:
    diffs = [
        f"{f.name}: checkpoint {getattr(stored, f.name)!r}, expected {getattr(expected, f.name)!r}"
        for f in dataclasses.fields(PerceiverConfig)
        if getattr(stored, f.name) != getattr(expected, f.name)
    ]
    if diffs:
        raise CheckpointError(
            f"{where}: the checkpoint's config differs from {what} in {len(diffs)} field(s): "
            + "; ".join(diffs)
        )


# ---------------------------------------------------------------------------------------------
# JSON values and the RNG state
# ---------------------------------------------------------------------------------------------


def _to_json(value: Any, where: str, tuples: bool = False) -> Any:
    """``value`` as plain JSON values, or a CheckpointError naming the first part that is not.

    numpy bool / integer / float16-64 scalars become Python ones (same value). Tuples are
    refused (they would come back as lists) unless ``tuples``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.float16, np.float32, np.float64)):
        return float(value)
    if isinstance(value, list) or (tuples and isinstance(value, tuple)):
        return [_to_json(v, f"{where}[{i}]", tuples) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is not a str (JSON object keys are strings)")
            out[str(k)] = _to_json(v, f"{where}[{k!r}]", tuples)
        return out
    hint = " (it would come back as a list; pass a list)" if isinstance(value, tuple) else ""
    raise CheckpointError(
        f"{where}: a {type(value).__name__} is not JSON-able{hint}; use None, bool, int, float, str, "
        "list, or dict with str keys"
    )


def _plain_state(value: Any) -> Any:
    """A bit generator's state with its arrays (MT19937's key, Philox's counter, ...) as lists."""
    if isinstance(value, dict):
        return {k: _plain_state(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _bit_generator_class(name: object, where: str) -> type[np.random.BitGenerator]:
    cls = getattr(np.random, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise CheckpointError(f"{where}: {name!r} is not a numpy.random bit generator class")
    return cls


def _generator_to_json(rng: object) -> dict[str, Any]:
    if not isinstance(rng, np.random.Generator):
        raise CheckpointError(f"rng: expected a numpy.random.Generator or None, got {type(rng).__name__}")
    cls = type(rng.bit_generator)
    if getattr(np.random, cls.__name__, None) is not cls:
        raise CheckpointError(
            f"rng: bit generator {cls.__name__} is not a numpy.random class, so it could not be restored"
        )
    state = _to_json(_plain_state(rng.bit_generator.state), "rng state")
    _restore_generator(state, "rng state")  # proves the saved state restores exactly
    return dict(state)


def _restore_generator(state: Mapping[str, Any], where: str) -> np.random.Generator:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: expected a dict, got {type(state).__name__}")
    cls = _bit_generator_class(state.get("bit_generator"), where)
    bit_generator = cls()
    try:
        bit_generator.state = dict(state)
    except (TypeError, ValueError, KeyError, OverflowError, IndexError) as exc:
        raise CheckpointError(
            f"{where}: not a valid {cls.__name__} state: {type(exc).__name__}: {exc}"
        ) from exc
    if _plain_state(bit_generator.state) != _plain_state(dict(state)):
        raise CheckpointError(f"{where}: the {cls.__name__} state does not restore exactly")
    return np.random.Generator(bit_generator)


def _parse_rng(rng: object, where: str) -> dict[str, Any] | None:
    if rng is None:
        return None
    keys = {"bit_generator", "state"}
    if not (isinstance(rng, dict) and set(rng) == keys and isinstance(rng["state"], dict)):
        raise _corrupt(where, f"the rng entry of {META_KEY} is malformed")
    state = rng["state"]
    if state.get("bit_generator") != rng["bit_generator"]:
        raise _corrupt(where, f"the rng entry of {META_KEY} names two bit generators")
    try:
        _restore_generator(state, "rng state")
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return state
