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

Nothing is ever pickled: arrays are read with ``np.load(path, allow_pickle=False)`` and all
metadata is JSON. Writes are atomic (a temporary file in the same directory, fsynced, then
``os.replace``), so a crash mid-save leaves the previous checkpoint at ``path`` intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_savez
from .config import PerceiverConfig, param_shapes

FORMAT_NAME = "perceiver_np.checkpoint"
FORMAT_VERSION = 1

META_KEY = "meta.json"
PARAMS_PREFIX = "params/"
OPT_PREFIX = "opt/"
_META_KEYS = ("format", "version", "config", "step", "params", "opt", "rng", "extra", "written_by")
#: dtype kinds an optimizer-state array may have: bool, signed / unsigned int, float, complex.
_OPT_KINDS = "biufc"
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
#: What reading a damaged zip / .npy member can raise (zipfile, zlib, numpy.lib.format). An
#: encrypted-flag or compression-method bit flipped by corruption surfaces as RuntimeError /
#: NotImplementedError from zipfile; a damaged .npy header as tokenize.TokenError (numpy parses
#: the header before zipfile has checked the member's CRC).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, RuntimeError, zlib.error,
    struct.error, OverflowError, IndexError, TypeError, SyntaxError, tokenize.TokenError,
)

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
    config: PerceiverConfig,
    params: Mapping[str, np.ndarray],
    step: int = 0,
    opt_state: Mapping[str, np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically and return ``path`` as a Path.

    ``params`` must match ``param_shapes(config)`` exactly (names, shapes, dtype ``config.dtype``);
    ``opt_state`` is a flat dict of numeric arrays (names like ``"m/<param>"``); ``rng`` a
    ``numpy.random.Generator`` whose state is stored; ``extra`` small JSON-able metadata (None,
    bool, int, float, str, list, dict with str keys; numpy scalars are converted). Every problem
    with these is a :class:`CheckpointError` raised before anything is written. The path is used
    as given (no ``.npz`` is appended).
    """
    if not isinstance(config, PerceiverConfig):
        raise CheckpointError(f"config: expected a PerceiverConfig, got {type(config).__name__}")
    config_json = _config_to_json(config)
    ordered = _check_params_for_save(config, params)
    step = _check_step(step, "step")
    opt = _check_opt_state_for_save(opt_state)
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
    meta_bytes = json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")
    arrays: dict[str, np.ndarray] = {META_KEY: np.frombuffer(meta_bytes, dtype=np.uint8)}
    arrays.update({PARAMS_PREFIX + name: value for name, value in ordered.items()})
    if opt is not None:
        arrays.update({OPT_PREFIX + name: value for name, value in opt.items()})
    target = Path(path)
    atomic_savez(target, arrays)
    return target


def _check_params_for_save(cfg: PerceiverConfig, params: object) -> dict[str, np.ndarray]:
    if not isinstance(params, Mapping):
        raise CheckpointError(f"params: expected a dict of arrays, got {type(params).__name__}")
    problems = _param_problems(cfg, params, lambda k: f"params[{k!r}]", "the config")
    if problems:
        raise CheckpointError(_join("params", problems))
    return {name: params[name] for name in param_shapes(cfg)}


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


def _listing(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": v.dtype.str} for k, v in arrays.items()]


def _package_version() -> str:
    from . import __version__  # deferred: the package imports its modules first

    return str(__version__)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: PathLike, *, expect_config: PerceiverConfig | None = None) -> Checkpoint:
    """Read and validate the checkpoint at ``path``.

    Every problem is a :class:`CheckpointError` whose message starts with the path: not a file,
    not an npz, truncated or corrupt, unknown format version, a stored config that does not
    rebuild, tensors missing, unexpected, mis-shaped or of the wrong dtype for the stored config.
    With ``expect_config`` given, a stored config that differs from it in any field is an error
    listing every differing field with both values.
    """
    if expect_config is not None and not isinstance(expect_config, PerceiverConfig):
        raise TypeError(
            f"expect_config: expected a PerceiverConfig or None, got {type(expect_config).__name__}"
        )
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise CheckpointError(f"{where}: no such file")
    if not p.is_file():
        raise CheckpointError(f"{where}: not a file")
    try:
        f = open(p, "rb")  # closed below; np.load(path) leaks its own handle when the zip is bad
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
        f.seek(0)
        try:
            npz = np.load(f, allow_pickle=False)
        except _READ_ERRORS as exc:
            raise _corrupt(where, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(npz, np.lib.npyio.NpzFile):  # pragma: no cover - the zip magic was checked
            raise CheckpointError(f"{where}: not an npz file")
        with npz:
            return _load(npz, where, expect_config)


def _load(npz: Any, where: str, expect_config: PerceiverConfig | None) -> Checkpoint:
    files = list(npz.files)
    if len(set(files)) != len(files):
        dupes = sorted({f for f in files if files.count(f) > 1})
        raise _corrupt(where, f"duplicate entries {dupes}")
    if META_KEY not in files:
        raise _corrupt(where, f"no {META_KEY} entry")
    meta = _read_meta(npz, where)

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

    param_names: list[str] = []
    opt_names: list[str] = []
    for name in files:
        if name.startswith(PARAMS_PREFIX):
            param_names.append(name[len(PARAMS_PREFIX):])
        elif name.startswith(OPT_PREFIX):
            opt_names.append(name[len(OPT_PREFIX):])
        elif name != META_KEY:
            raise CheckpointError(
                f"{where}: unexpected entry {name!r} (a checkpoint holds only {META_KEY}, "
                f"{PARAMS_PREFIX}<name> and {OPT_PREFIX}<name>)"
            )

    # parameters: against the schema of the stored config first (the most telling message),
    # then against the listing in meta.json (a disagreement there means a damaged file)
    shapes = param_shapes(config)
    params = {name: _read(npz, PARAMS_PREFIX + name, where) for name in param_names if name in shapes}
    present = {name: _UNREAD for name in param_names}  # the names in file order, unread
    problems = _param_problems(config, {**present, **params}, lambda k: f"tensor {PARAMS_PREFIX + k!r}",
                               "the stored config")
    if problems:
        raise CheckpointError(_join(where, problems))
    params = {name: params[name] for name in shapes}  # schema order
    _check_against_listing(params, param_listing, "params", where)

    opt_state = None
    if opt_listing is None:
        if opt_names:
            raise _corrupt(where, f"{META_KEY} records no optimizer state but the file holds {opt_names}")
    else:
        opt_state = {name: _read(npz, OPT_PREFIX + name, where) for name in opt_names}
        for name, value in opt_state.items():
            if value.dtype.kind not in _OPT_KINDS:
                raise CheckpointError(
                    f"{where}: tensor {OPT_PREFIX + name!r}: expected a bool, integer, float or complex "
                    f"array, got dtype {_dtype_name(value.dtype)}"
                )
        opt_state = {name: opt_state[name] for name in opt_listing if name in opt_state}
        _check_against_listing(opt_state, opt_listing, "opt", where, present_names=opt_names)

    return Checkpoint(
        config=config, params=params, step=step, opt_state=opt_state, rng_state=rng_state, extra=extra
    )


def _corrupt(where: str, detail: str) -> CheckpointError:
    return CheckpointError(f"{where}: truncated or corrupt checkpoint file ({detail})")


def _read(npz: Any, key: str, where: str) -> np.ndarray:
    """One array of the archive; every failure a CheckpointError naming the path and entry."""
    try:
        value = npz[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise CheckpointError(
                f"{where}: entry {key!r} is a pickled object array; checkpoints are never unpickled "
                "(np.load(..., allow_pickle=False)), so this file was not written by save_checkpoint"
            ) from exc
        raise _corrupt(where, f"entry {key!r}: {type(exc).__name__}: {exc}") from exc
    except _READ_ERRORS as exc:
        raise _corrupt(where, f"entry {key!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, np.ndarray):
        raise _corrupt(where, f"entry {key!r} is not a .npy array")
    return value


def _read_meta(npz: Any, where: str) -> dict[str, Any]:
    raw = _read(npz, META_KEY, where)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _corrupt(where, f"{META_KEY} is a {raw.dtype.name} array of shape {raw.shape}, not uint8 bytes")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
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
    unknown = [k for k in meta if k not in _META_KEYS]
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
    arrays: dict[str, np.ndarray],
    listing: dict[str, tuple[tuple[int, ...], str]],
    what: str,
    where: str,
    present_names: list[str] | None = None,
) -> None:
    names = list(arrays) if present_names is None else present_names
    if set(names) != set(listing):
        raise _corrupt(
            where,
            f"{META_KEY} lists {what} {sorted(set(listing) - set(names))} that the file lacks and the "
            f"file holds {sorted(set(names) - set(listing))} that {META_KEY} does not list",
        )
    for name, value in arrays.items():
        shape, dtype = listing[name]
        if value.shape != shape or value.dtype.str != dtype:
            raise _corrupt(
                where,
                f"{META_KEY} lists {what} {name!r} as {dtype} {shape}, the array is "
                f"{value.dtype.str} {value.shape}",
            )


# ---------------------------------------------------------------------------------------------
# parameters against the schema (shared by save and load)
# ---------------------------------------------------------------------------------------------


def _param_problems(cfg: PerceiverConfig, params: Mapping[Any, Any], label: Any, source: str) -> list[str]:
    """Every way ``params`` differs from ``param_shapes(cfg)``: names, types, shapes, dtype.
    Values that are ``_UNREAD`` are checked by name only (load does not read unexpected tensors)."""
    shapes = param_shapes(cfg)
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
        if not isinstance(value, np.ndarray):
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


def _compare_configs(stored: PerceiverConfig, expected: PerceiverConfig, where: str) -> None:
    diffs = [
        f"{f.name}: checkpoint {getattr(stored, f.name)!r}, expected {getattr(expected, f.name)!r}"
        for f in dataclasses.fields(PerceiverConfig)
        if getattr(stored, f.name) != getattr(expected, f.name)
    ]
    if diffs:
        raise CheckpointError(
            f"{where}: the checkpoint's config differs from expect_config in {len(diffs)} field(s): "
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
