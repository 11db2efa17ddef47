"""Hugging Face files without torch: ``.safetensors`` read and written by our own code, and a
model directory as ``save_pretrained`` writes it.

::

    arrays = read_safetensors("model.safetensors")        # {name: ndarray}, validated first
    write_safetensors("out.safetensors", arrays, metadata={"format": "np"})   # atomic
    config, arrays = read_pretrained_dir("path/to/dir")   # config.json + weights

The safetensors format: 8 bytes, the header's length N (unsigned little-endian 64-bit); N bytes
of UTF-8 JSON, ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` with an optional
``"__metadata__"`` object of str -> str; then the data buffer, which the tensors' byte ranges
(relative to its start) cover exactly, without holes or overlaps. Each tensor is C-ordered and
little-endian.

Reading checks the whole header before any tensor data is read: a header length of at most
:data:`MAX_HEADER_BYTES` (the safetensors library's own limit) that fits in the file; JSON that
parses to an object, without duplicate names; for every tensor a known dtype, a shape of
non-negative ints, offsets whose byte count is the shape's size times the dtype's, inside the
buffer; and byte ranges that tile the buffer exactly. Only then is each tensor read, straight
into an array of its checked size, so a hostile file costs at most its own size in memory (and
the parse of a header at most :data:`MAX_HEADER_BYTES` long). Every refusal is an
:class:`HFFileError` whose message starts with the file's path and names the tensor. Nothing is
ever unpickled, except ``pytorch_model.bin`` by ``torch.load(weights_only=True)`` when torch is
installed.

Arrays returned are copies in native byte order that own their memory (writable, not memory
maps: the file can be changed or deleted afterwards). BF16 tensors are returned as float32, exactly
(a bfloat16 is the upper half of the float32 with the same value); every other dtype keeps its
width.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._files import atomic_write

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "HFFileError",
    "read_pretrained_dir",
    "read_safetensors",
    "read_safetensors_metadata",
    "write_safetensors",
]

PathLike = str | os.PathLike[str]

#: The longest safetensors header read (the safetensors library refuses longer ones too). Real
#: headers take ~100-150 bytes a tensor: 1.5 MB for a model of 10,000 tensors.
MAX_HEADER_BYTES = 100_000_000
#: The largest config.json or index file read: real ones are a few KB (ImageNet's 1,000 labels
#: in id2label and label2id take ~70 KB; an index ~100 bytes a tensor).
MAX_CONFIG_BYTES = 16 << 20

_LENGTH = struct.Struct("<Q")
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
#: safetensors dtype -> the little-endian dtype its bytes are read as. BF16 is read as uint16
#: and widened to float32; BOOL is read as uint8, checked to be 0 or 1, then viewed as bool.
_READ_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}
#: numpy dtype -> safetensors dtype, for writing (numpy has no bfloat16).
_WRITE_NAMES: dict[np.dtype[Any], str] = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
#: The order the safetensors library lays tensors out in (then by name): widest dtypes first, so
#: that every tensor starts at a multiple of its item size. We write the same bytes it does.
_WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


class HFFileError(ValueError):
    """Every problem with a Hugging Face file or model directory, and with what is to be written."""


# ---------------------------------------------------------------------------------------------
# safetensors: read
# ---------------------------------------------------------------------------------------------


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """The tensors of the ``.safetensors`` file at ``path``, in the header's order.

    Everything the header says is checked before any tensor data is read (the module docstring
    lists the checks); every problem is an :class:`HFFileError` naming the file and the tensor.
    The arrays are native-byte-order copies (BF16 becomes float32, exactly). A BOOL tensor holding
    a byte other than 0 or 1 is refused.
    """
    p = Path(path)
    with _open(p) as f:
        entries, _, data_start = _read_header(f, p)
        out: dict[str, np.ndarray] = {}
        for name, (kind, shape, begin, end) in entries.items():
            f.seek(data_start + begin)
            out[name] = _read_tensor(f, p, name, kind, shape, end - begin)
    return out


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The header's ``__metadata__`` (``{}`` when it has none), after the same checks of the whole
    header as :func:`read_safetensors`; no tensor data is read."""
    p = Path(path)
    with _open(p) as f:
        return _read_header(f, p)[1]


def _open(p: Path) -> io.BufferedReader:
    if not p.exists():
        raise HFFileError(f"{p}: no such file")
    if not p.is_file():
        raise HFFileError(f"{p}: not a file")
    try:
        return open(p, "rb")
    except OSError as exc:
        raise HFFileError(f"{p}: cannot be read ({exc})") from exc


_Entry = tuple[str, tuple[int, ...], int, int]  # dtype name, shape, begin, end (in the buffer)


def _read_header(f: io.BufferedReader, p: Path) -> tuple[dict[str, _Entry], dict[str, str], int]:
    """The checked tensor entries, the metadata and where the data buffer starts."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise HFFileError(f"{p}: only {len(head)} bytes long; a safetensors file starts with an "
                          "8-byte header length")
    (n,) = _LENGTH.unpack(head)
    if n > MAX_HEADER_BYTES:
        raise HFFileError(f"{p}: header length {n} is more than the {MAX_HEADER_BYTES} bytes a "
                          "safetensors header may have (MAX_HEADER_BYTES); not a safetensors file?")
    if _LENGTH.size + n > size:
        raise HFFileError(f"{p}: header length {n} runs past the end of the {size}-byte file "
                          "(truncated, or not a safetensors file)")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HFFileError(f"{p}: header: not valid UTF-8 JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise HFFileError(f"{p}: header: expected a JSON object, got {type(header).__name__}")
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is None:  # absent or null: no metadata (the safetensors library reads both)
        metadata = {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise HFFileError(f"{p}: header: {_METADATA_KEY} must be an object of strings, got {metadata!r:.200}")
    data_start = _LENGTH.size + n
    buffer = size - data_start
    entries = {name: _check_entry(p, name, value, buffer) for name, value in header.items()}
    _check_tiling(p, entries, buffer)
    return entries, metadata, data_start


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the name {key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _check_entry(p: Path, name: str, value: object, buffer: int) -> _Entry:
    where = f"{p}: tensor {name!r}"
    if not isinstance(value, dict):
        raise HFFileError(f"{where}: expected an object with {list(_ENTRY_KEYS)}, got {value!r:.200}")
    missing = [k for k in _ENTRY_KEYS if k not in value]
    unknown = [k for k in value if k not in _ENTRY_KEYS]
    if missing or unknown:
        raise HFFileError(f"{where}: expected exactly the fields {list(_ENTRY_KEYS)}; "
                          f"missing {missing}, unknown {unknown}")
    kind, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(kind, str) or kind not in _READ_DTYPES:
        raise HFFileError(f"{where}: dtype {kind!r:.50} is not supported; expected one of "
                          f"{list(_READ_DTYPES)}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise HFFileError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise HFFileError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                          f"got {offsets!r:.200}")
    begin, end = offsets
    want = math.prod(shape) * _READ_DTYPES[kind].itemsize
    if end - begin != want:
        raise HFFileError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape "
                          f"{shape} of {kind} takes {want}")
    if end > buffer:
        raise HFFileError(f"{where}: data_offsets {offsets} end past the {buffer}-byte data buffer "
                          "(truncated file?)")
    return kind, tuple(shape), begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(p: Path, entries: Mapping[str, _Entry], buffer: int) -> None:
    """The byte ranges, in order, must start where the previous one ended and end at the end
    of the buffer (empty tensors too: the format allows no holes and no overlaps)."""
    pos, previous = 0, "the start of the buffer"
    for begin, end, name in sorted((e[2], e[3], n) for n, e in entries.items()):
        if begin != pos:
            what = "overlap" if begin < pos else f"leave a gap of {begin - pos} bytes after"
            raise HFFileError(f"{p}: tensor {name!r}: data_offsets [{begin}, {end}] {what} {previous}")
        pos, previous = end, f"tensor {name!r} (which ends at byte {end})"
    if pos != buffer:
        raise HFFileError(f"{p}: the tensors cover {pos} bytes of the {buffer}-byte data buffer; "
                          f"{buffer - pos} bytes at its end belong to no tensor")


def _read_tensor(
    f: io.BufferedReader, p: Path, name: str, kind: str, shape: tuple[int, ...], nbytes: int
) -> np.ndarray:
    raw = np.empty(shape, dtype=_READ_DTYPES[kind])
    got = f.readinto(raw.reshape(-1).view(np.uint8).data) if nbytes else 0
    if got != nbytes:
        raise HFFileError(f"{p}: tensor {name!r}: read {got} of its {nbytes} bytes (the file changed?)")
    if kind == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)  # exact: bf16 is float32's top half
    if kind == "BOOL":
        if raw.size and raw.max() > 1:
            raise HFFileError(f"{p}: tensor {name!r}: a BOOL tensor holds bytes other than 0 and 1")
        return raw.view(np.bool_)
    return raw.astype(raw.dtype.newbyteorder("="), copy=False)


# ---------------------------------------------------------------------------------------------
# safetensors: write
# ---------------------------------------------------------------------------------------------


def write_safetensors(
    path: PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``arrays`` to ``path`` as safetensors, atomically (a temporary file next to it,
    fsynced, then renamed); return ``path`` as a Path.

    ``arrays``: str -> numpy array of float64/32/16, int64/32/16/8, uint64/32/16/8 or bool (any
    byte order or memory layout; written C-ordered, little-endian). ``metadata``: str -> str,
    stored as ``__metadata__``. The bytes are those ``safetensors.numpy.save`` writes for the
    same input (tensors ordered by dtype width, then name; header padded with spaces to a multiple
    of 8). Bad arguments are an :class:`HFFileError` raised before anything is written.
    """
    if not isinstance(arrays, Mapping):
        raise HFFileError(f"arrays: expected a dict of name -> numpy array, got {type(arrays).__name__}")
    kinds: dict[str, str] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise HFFileError(f"arrays: names must be strings other than {_METADATA_KEY!r}, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise HFFileError(f"arrays[{name!r}]: expected a numpy.ndarray, got {type(value).__name__}")
        kind = _WRITE_NAMES.get(value.dtype.newbyteorder("="))
        if kind is None:
            raise HFFileError(f"arrays[{name!r}]: dtype {value.dtype} cannot be stored; expected one of "
                              f"{sorted(str(d) for d in _WRITE_NAMES)}")
        kinds[name] = kind
    header: dict[str, Any] = {}
    if metadata is not None:
        if not (isinstance(metadata, Mapping)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise HFFileError(f"metadata: expected a dict of str -> str or None, got {metadata!r:.200}")
        header[_METADATA_KEY] = dict(metadata)
    order = sorted(kinds, key=lambda n: (_WRITE_ORDER.index(kinds[n]), n))
    pos = 0
    for name in order:
        size = arrays[name].size * arrays[name].dtype.itemsize
        header[name] = {"dtype": kinds[name], "shape": list(arrays[name].shape),
                        "data_offsets": [pos, pos + size]}
        pos += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(_LENGTH.pack(len(blob)))
        f.write(blob)
        for name in order:
            value = arrays[name]
            f.write(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes())

    target = Path(path)
    atomic_write(target, write)
    return target


# ---------------------------------------------------------------------------------------------
# save_pretrained directories
# ---------------------------------------------------------------------------------------------


def read_pretrained_dir(path: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, arrays)`` of a model directory as ``save_pretrained`` writes it.

    ``config`` is config.json parsed, unchanged (its ``"architectures"`` name the model class).
    ``arrays`` are the weights, keyed as the model's ``state_dict()``, from the first of these
    that exists: ``model.safetensors``; ``model.safetensors.index.json`` and its shards;
    ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` and its shards, read with
    ``torch.load(..., map_location="cpu", weights_only=True)`` (needs torch; a bfloat16 tensor
    becomes float32, exactly). Every problem is an :class:`HFFileError` naming the path and what
    was expected: no such directory, no config.json, no weights file, a shard the index names
    that is missing or holds other tensors than the index says, a .bin without torch.
    """
    d = Path(path)
    if not d.is_dir():
        raise HFFileError(f"{d}: no such directory (expected a directory written by save_pretrained)")
    config = _read_json(d / CONFIG_NAME, "the model's configuration")
    if not isinstance(config, dict):
        raise HFFileError(f"{d / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    if (d / SAFETENSORS_NAME).is_file():
        return config, read_safetensors(d / SAFETENSORS_NAME)
    if (d / SAFETENSORS_INDEX_NAME).is_file():
        return config, _read_sharded(d / SAFETENSORS_INDEX_NAME, read_safetensors)
    if (d / BIN_NAME).is_file():
        return config, _read_bin(d / BIN_NAME)
    if (d / BIN_INDEX_NAME).is_file():
        return config, _read_sharded(d / BIN_INDEX_NAME, _read_bin)
    raise HFFileError(f"{d}: no weights file; expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
                      f"{BIN_NAME} or {BIN_INDEX_NAME} next to {CONFIG_NAME}")


def _read_json(p: Path, what: str) -> Any:
    if not p.is_file():
        raise HFFileError(f"{p}: no such file ({what}; expected in a directory written by save_pretrained)")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise HFFileError(f"{p}: {size} bytes, more than the {MAX_CONFIG_BYTES} read "
                          "(MAX_CONFIG_BYTES); not read")
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HFFileError(f"{p}: not valid UTF-8 JSON ({type(exc).__name__}: {exc})") from exc


def _read_sharded(index_path: Path, read: Callable[[Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The tensors of every shard an index's ``weight_map`` names, each shard holding exactly the
    tensors the index maps to it."""
    index = _read_json(index_path, "the index of the weight shards")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise HFFileError(f"{index_path}: expected an object with a 'weight_map' of tensor name -> "
                          "shard file")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
            raise HFFileError(f"{index_path}: tensor {name!r}: shard {shard!r} is not a file name in the "
                              "index's directory")
        shards.setdefault(shard, []).append(name)
    out: dict[str, np.ndarray] = {}
    for shard, names in shards.items():
        p = index_path.parent / shard
        if not p.is_file():
            raise HFFileError(f"{p}: no such file (the shard {index_path.name} maps {names[0]!r} to)")
        arrays = read(p)
        missing = [n for n in names if n not in arrays]
        extra = [n for n in arrays if weight_map.get(n) != shard]
        if missing or extra:
            raise HFFileError(f"{p}: does not hold the tensors {index_path.name} maps to it: missing "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, not listed there "
                              f"{extra[:5]}{'...' if len(extra) > 5 else ''}")
        out.update(arrays)
    return out


def _read_bin(p: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as exc:
        raise HFFileError(
            f"{p}: a PyTorch pickle; reading it needs torch (pip install torch), or convert the "
            "model to safetensors once where torch is installed (save_pretrained writes model.safetensors)"
        ) from exc
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # every way torch's restricted unpickler refuses a file
        raise HFFileError(f"{p}: not a readable PyTorch state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise HFFileError(f"{p}: expected a state dict (name -> tensor), got {type(state).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
            raise HFFileError(f"{p}: entry {name!r}: expected a str name and a tensor, "
                              f"got {type(tensor).__name__}")
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # exact
        try:
            out[name] = np.array(t.numpy(), copy=True)  # its own memory: tied tensors share storage
        except (TypeError, RuntimeError) as exc:
            raise HFFileError(f"{p}: tensor {name!r}: dtype {t.dtype} has no numpy equivalent") from exc
    return out
