"""The ``perceiver-np`` command (also ``python -m perceiver_np``).

    perceiver-np info --input-dim 287 --length 4096       # options, shapes, counts, FLOPs, memory, vs O(N^2)
    perceiver-np train --data train.npz --eval-data test.npz --input-dim 35 --decoder classification \\
        --output-dim 10 --epochs 30 --out model.npz
    perceiver-np eval --checkpoint model.npz --data test.npz
    perceiver-np predict --checkpoint model.npz --input x.npy --out y.npy
    perceiver-np gradcheck --input-dim 5 --latent-dim 8 --num-latents 3 --num-heads 2
    perceiver-np golden --preset edifice --input-dim 7 --seed 0 --out golden.npz
    perceiver-np compare golden.npz theirs.npz [--json] [--allow-missing]
    perceiver-np precision-report golden.npz [--recorded theirs.npz] [--plot out.png] [--json out.json]
    perceiver-np attention model.npz --x x.npy [--latents 0,1,2] [--heads 0] [--image-shape 8 8] --out a.png
    perceiver-np fill-mask DIR "This is an [MASK:9] sentence" [--top K]
    perceiver-np classify-image DIR cat.jpg dog.png [--top 5]
    perceiver-np flow DIR frame1.png frame2.png --out flow.npy [--png flow.png]

Every model option of :class:`perceiver_np.PerceiverConfig` is a flag (``--latent-dim``,
``--no-final-norm``, ...) with the same default. Data files are ``.npz`` holding ``x``
[S, N, C], ``y`` (labels [S] or targets [S, O, out]) and optionally ``mask`` [S, N]; they are
loaded without pickle. ``info`` computes everything from the options alone (no model is built).
``fill-mask``, ``classify-image`` and ``flow`` run Hugging Face's published Perceivers from a
directory as ``save_pretrained`` writes it (config.json and the weights; no torch needed;
docs/pretrained.md).

Exit status: 0 success; 1 a check that failed (``compare`` beyond tolerance, ``gradcheck``,
training that diverged) or a Dask run that lost its workers (``predict``/``eval`` with
``--dask``: the shards written so far are kept, a rerun resumes); 2 a usage or input error (a
flag out of range, a missing or unreadable file, an output path that cannot be written: all
checked before any work starts), reported as one line
``perceiver-np <command>: error: <message>`` naming the flag or path; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import cost, optim
from .config import (
    BACKENDS,
    DECODERS,
    DTYPES,
    FFN_KINDS,
    GELU_KINDS,
    INPUT_FOURIER,
    MASKED_ROWS,
    QUERY_MASKINGS,
    QUERY_SOURCES,
    PerceiverConfig,
    cross_block_shapes,
    decoder_shapes,
    self_block_shapes,
)
from .model import Perceiver, output_shape, step_names
from .shapes import pad_sequences

# ---- argument types: each refuses a value out of its range, naming the range --------------------

#: The largest size numpy can index (sizes, widths and lengths beyond it cannot exist).
INT_MAX = int(np.iinfo(np.intp).max)


def _integer(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if not low <= value <= INT_MAX:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}{'' if value < low else f' and <= {INT_MAX}'}, got {text!r}")
        return value

    return parse


def _real(test: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _integer(1)
positive_int.__name__ = "positive_int"
nonnegative_int = _integer(0)
nonnegative_int.__name__ = "nonnegative_int"
positive_float = _real(lambda v: v > 0, "a finite number > 0")
positive_float.__name__ = "positive_float"
nonnegative_float = _real(lambda v: v >= 0, "a finite number >= 0")
nonnegative_float.__name__ = "nonnegative_float"
fraction = _real(lambda v: 0 <= v <= 1, "a number in [0, 1]")
fraction.__name__ = "fraction"
rate = _real(lambda v: 0 <= v < 1, "a rate in [0, 1)")
rate.__name__ = "rate"
any_float = _real(lambda v: True, "a finite number")
any_float.__name__ = "float"

_CHOICES: dict[str, tuple[str, ...]] = {
    "gelu": GELU_KINDS, "decoder": DECODERS, "masked_rows": MASKED_ROWS,
    "query_source": QUERY_SOURCES, "dtype": DTYPES, "backend": BACKENDS, "ffn_kind": FFN_KINDS,
    "input_fourier": INPUT_FOURIER, "query_masking": QUERY_MASKINGS,
}


def block_step(text: str) -> tuple[str, int]:
    """``cross.0`` / ``self.3`` -> ("cross", 0) / ("self", 3): one step of ``--block-order``."""
    kind, _, index = text.partition(".")
    if kind not in ("cross", "self") or not index.isdigit():
        raise argparse.ArgumentTypeError(f"expected cross.I or self.J (a block and its index), got {text!r}")
    return kind, int(index)


block_step.__name__ = "block_step"
_RATES = {"dropout", "attention_dropout"}
_SKIP = {"input_dim"}  # required, added by hand


def _add_config_flags(parser: argparse.ArgumentParser, required_input_dim: bool = True) -> None:
    group = parser.add_argument_group("model options (PerceiverConfig; see docs/architecture.md)")
    group.add_argument("--input-dim", type=positive_int, required=required_input_dim,
                       help="C, channels of each input position")
    for f in dataclasses.fields(PerceiverConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"(default {default})")
        elif f.name == "block_order":
            group.add_argument(flag, type=block_step, nargs="+", default=default,
                               help="the blocks in the order they run, e.g. cross.0 self.0 cross.1 self.1 "
                                    "cross.1 self.1 (a repeated block shares its weights; default: the "
                                    "schedule of num_cross_layers, num_layers and num_blocks)")
        elif "tuple" in kind:
            group.add_argument(flag, type=positive_int, nargs="+", default=default,
                               help=f"(default {default})")
        elif f.name in _CHOICES:
            group.add_argument(flag, choices=_CHOICES[f.name], default=default, help=f"(default {default})")
        elif "int" in kind:
            group.add_argument(flag, type=nonnegative_int if f.name == "seed" else positive_int,
                               default=default, help=f"(default {default})")
        elif "float" in kind:
            group.add_argument(flag, type=rate if f.name in _RATES else any_float, default=default,
                               help=f"(default {default})")
        else:
            group.add_argument(flag, default=default, help=f"(default {default})")


def _config_from(args: argparse.Namespace) -> PerceiverConfig:
    """The flags as a config; with ``--preset``, the preset's options overridden by every flag
    given a value other than its default."""
    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(PerceiverConfig)}
    for name in ("output_index_dims", "input_index_dims", "block_order"):
        if opts.get(name) is not None:
            opts[name] = tuple(opts[name])
    if getattr(args, "preset", None):
        from .presets import preset

        defaults = {f.name: f.default for f in dataclasses.fields(PerceiverConfig)}
        changed = {k: v for k, v in opts.items() if k == "input_dim" or v != defaults.get(k)}
        opts = {**opts, **preset(args.preset), **changed}
    return PerceiverConfig(**opts)


# ---- the user's files: checked before any work, read with errors that name them ---------------

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a first member, or an empty archive
_NPY_MAGIC = b"\x93NUMPY"
#: What reading a damaged .npz / .npy can raise (zipfile, zlib, numpy's header parser).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error, struct.error,
)


def _input_file(path: Path, flag: str = "") -> Path:
    """``path`` (given to ``flag``) if it is an existing, readable file; else a ValueError."""
    where = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise ValueError(f"{where}: no such file")
    if path.is_dir():
        raise ValueError(f"{where}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{where}: cannot be read (permission denied)")
    return path


def _output_file(path: Path, flag: str, append: bool = False) -> Path:
    """``path``, given to ``flag``, if it can be written: not a directory, in an existing
    writable directory (and itself writable when ``append``ed to); else a ValueError."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    folder = path.parent
    if not folder.exists():
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")
    if append and path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: is not writable")
    return path


def _signature(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(_NPY_MAGIC))


@contextlib.contextmanager
def _reading(path: Path, flag: str, kind: str | None = None) -> Iterator[None]:
    """Errors while reading the user's file ``path`` as ValueErrors naming it: running out of
    memory always; with ``kind`` (".npz", ".npy") also every way a damaged file fails to read,
    unless the message names the path already."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        yield
    except MemoryError as err:
        raise ValueError(f"{where}: too large to load into memory ({err})") from err
    except _READ_ERRORS as err:
        if kind is None or str(path) in str(err):
            raise
        raise ValueError(f"{where}: not a readable {kind} file ({type(err).__name__}: {err})") from err


def _read_npz(path: Path, flag: str) -> dict[str, np.ndarray]:
    """Every array of the .npz ``path`` (no pickle)."""
    _input_file(path, flag)
    with _reading(path, flag, ".npz"):
        head = _signature(path)
        if head == _NPY_MAGIC:
            raise ValueError(f"{flag} {path}: not a readable .npz file (a single .npy array)")
        if not head.startswith(_ZIP_MAGIC):
            raise ValueError(f"{flag} {path}: not a readable .npz file (no zip signature at the start)")
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def _read_npy(path: Path, flag: str) -> np.ndarray:
    """The .npy ``path``, memory-mapped (no pickle)."""
    _input_file(path, flag)
    with _reading(path, flag, ".npy"):
        if _signature(path) != _NPY_MAGIC:
            raise ValueError(f"{flag} {path}: not a readable .npy file (no .npy signature at the start)")
        array: np.ndarray = np.load(path, allow_pickle=False, mmap_mode="r")
        return array


#: The arrays of a data file that go into a batch (others are ignored).
_DATA_KEYS = ("x", "y", "mask", "queries", "query_mask")


def _load_data(path: Path, flag: str, cfg: PerceiverConfig) -> dict[str, np.ndarray]:
    """A dataset .npz: ``x`` [S, N, C] with C = ``cfg.input_dim``, ``y`` and the optional
    arrays, each with the S samples of x."""
    arrays = _read_npz(path, flag)
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(f"{flag} {path}: expected arrays 'x' [S, N, C] and 'y' (labels [S] or "
                             f"targets [S, O, out]), found {sorted(arrays)}")
    data = {k: arrays[k] for k in _DATA_KEYS if k in arrays}
    x = data["x"]
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"{flag} {path}: x must be [S, N, C] with S, N, C >= 1, got shape {x.shape}")
    _check_width(x.shape[-1], path, flag, cfg)
    for key, value in data.items():
        if value.ndim == 0 or len(value) != len(x):
            raise ValueError(f"{flag} {path}: {key} has shape {value.shape}, not the {len(x)} samples "
                             f"of x {x.shape}")
    if "mask" in data and data["mask"].shape != x.shape[:2]:
        raise ValueError(f"{flag} {path}: mask must be [S, N] = {x.shape[:2]}, got {data['mask'].shape}")
    return data


def _check_width(channels: int, path: Path, flag: str, cfg: PerceiverConfig, what: str = "x") -> None:
    if channels != cfg.input_dim:
        raise ValueError(f"{flag} {path}: {what} has {channels} channels per position, but the model "
                         f"takes input_dim = {cfg.input_dim}")


# ---- the commands --------------------------------------------------------------------------------


def summary(cfg: PerceiverConfig) -> str:
    """:meth:`Perceiver.summary` from the config alone (no parameter is allocated); the same
    text, except that very deep models list their first blocks only."""
    lines = ["Perceiver (perceiver_np)", "options:"]
    for field in cfg.__dataclass_fields__:
        lines.append(f"  {field:<24}{getattr(cfg, field)!r}")
    lines.append("parameters:")
    d = cfg.latent_dim
    rows: list[tuple[str, int | None]] = []
    if cfg.input_projection:
        rows.append(("input_proj", cfg.encoder_input_channels * d + d))
    rows.append(("latents", cfg.num_latents * d))
    rows += _elided("cross", cfg.num_cross_layers, _size(cross_block_shapes(cfg)))
    rows += _elided("self", cfg.num_layers, _size(self_block_shapes(cfg)))
    if cfg.final_norm:
        rows.append(("final_norm", 2 * d))
    if cfg.decoder not in ("pool", "latents"):
        rows.append(("decoder", _size(decoder_shapes(cfg))))
    for name, count in rows:
        lines.append(f"  {name:<24}" + ("" if count is None else f"{count:>12,}"))
    lines.append(f"  {'total':<24}{cost.param_count(cfg):>12,}")
    steps = cost.transformer_layers(cfg)  # one per step of the schedule
    shown = [f"{k}.{i}" for k, i in _schedule(cfg, limit=64)]
    more = f" -> ... ({steps:,} steps)" if steps > len(shown) else ""
    lines.append("schedule: " + " -> ".join(shown) + more)
    lines.append(f"output:   {output_shape(cfg)} from x [B, N, {cfg.input_dim}]")
    return "\n".join(lines)


def _size(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _elided(kind: str, count: int, each: int, keep: int = 16) -> list[tuple[str, int | None]]:
    """One row per block, or for more than ``keep`` blocks the first ones, a count, the last."""
    if count <= keep:
        return [(f"{kind}.{i}", each) for i in range(count)]
    return ([(f"{kind}.{i}", each) for i in range(keep - 1)]
            + [(f"... {count - keep:,} more", None), (f"{kind}.{count - 1}", each)])


def _schedule(cfg: PerceiverConfig, limit: int) -> list[tuple[str, int]]:
    """The first ``limit`` steps of ``cfg.schedule``, without building all of it."""
    return list(itertools.islice(cfg.iter_schedule(), limit))


def cmd_info(args: argparse.Namespace) -> int:
    cfg = _config_from(args)  # everything below from the config: no parameter is allocated
    print(summary(cfg))
    print("\nparameter shapes (docs/params.md):")
    for name, shape in {**{f"cross.i.{k}": s for k, s in cross_block_shapes(cfg).items()},
                        **{f"self.j.{k}": s for k, s in self_block_shapes(cfg).items()},
                        **({f"decoder.{k}": s for k, s in decoder_shapes(cfg).items()}
                           if cfg.decoder not in ("pool", "latents") else {})}.items():
        print(f"  {name:<32}{shape}")
    n = args.length
    print(f"\nforward FLOPs per sample as functions of N (2 per multiply-add; a training step is "
          f"about 3x), and at N = {n:,}:")
    at_0, at_1 = cost.forward_flops(cfg, 0), cost.forward_flops(cfg, 1)
    at_n = cost.forward_flops(cfg, n)
    for part in at_0:
        a, b = at_1[part] - at_0[part], at_0[part]
        print(f"  {part:<24}{a:>12,} N + {b:>14,}  = {at_n[part] / 1e9:>10.4f} GFLOP")
    item = cfg.np_dtype.itemsize
    a, b = cost.training_bytes_line(cfg)
    print(f"\nactivation memory ({cfg.dtype}):")
    print(f"  training, kept for the backward: {a:,} N + {b:,} bytes per sample "
          f"= {(a * n + b) / 2**20:.2f} MiB at N = {n:,}")
    for batch in (1, 32):
        extra = cost.inference_extra_bytes(cfg, batch, n)
        held = batch * n * cfg.input_dim * item / 2**20
        same = cfg.num_cross_layers == 1 or not cfg.input_projection
        print(f"  inference (inference engine), B = {batch}: the input {held:,.2f} MiB + at most "
              f"{extra / 2**20:,.2f} MiB of buffers at N = {n:,}"
              + (" (the same for any larger N)" if same else ""))
    layers = cost.transformer_layers(cfg)
    width = cfg.latent_dim if cfg.input_projection else cfg.input_dim
    print(f"\nagainst a standard transformer on the same input ({layers} layers of width {width}, full "
          f"self-attention over the N positions: O(N^2); the Perceiver: O(N M + M^2), "
          f"M = {cfg.num_latents}):")
    print(f"  {'N':>9}  {'Perceiver GFLOP':>16}  {'transformer GFLOP':>18}  {'transformer / Perceiver':>24}")
    for length in sorted({64, 256, 1024, 4096, 16384, 65536, n}):
        p_f, t_f = cost.forward_flops(cfg, length)["total"], cost.transformer_flops(cfg, length)
        print(f"  {length:>9,}  {p_f / 1e9:>16.3f}  {t_f / 1e9:>18.3f}  {t_f / p_f:>24.2f}")
    print(f"  crossover: the Perceiver costs less from N = {cost.crossover(cfg):,} on")
    return 0


def _optimizer(args: argparse.Namespace, steps: int) -> optim.Optimizer:
    lr: float | optim.Schedule = args.lr
    if args.schedule == "cosine":
        lr = optim.warmup_cosine(args.lr, max(1, int(args.warmup * steps)), steps)
    if args.optimizer == "adamw":
        return optim.adamw(lr, weight_decay=args.weight_decay)
    if args.optimizer == "lamb":
        return optim.lamb(lr, weight_decay=args.weight_decay)
    return optim.sgd(lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay)


def cmd_train(args: argparse.Namespace) -> int:
    from . import train as training

    cfg = _config_from(args)
    _output_file(args.out, "--out")
    if args.resume and not args.out.is_file():
        raise ValueError(f"--out {args.out}: --resume continues from this checkpoint, which does not exist")
    if args.log is not None:
        _output_file(args.log, "--log", append=True)
    train = _load_data(args.data, "--data", cfg)
    evald = _load_data(args.eval_data, "--eval-data", cfg) if args.eval_data else None
    model = Perceiver(cfg)
    steps = args.epochs * math.ceil(len(train["x"]) / args.batch_size)
    loss = training.Loss(args.loss, label_smoothing=args.label_smoothing)
    try:
        _, history = training.fit(
            model, _optimizer(args, steps), loss, train, epochs=args.epochs,
            batch_size=args.batch_size, eval_data=evald, seed=args.seed, clip_norm=args.clip_norm,
            patience=args.patience, log_path=args.log, checkpoint_path=args.out, resume=args.resume,
            progress=not args.quiet)
    except FloatingPointError as err:  # train.NonFiniteError: the loss or the gradients diverged
        _error("train", f"training diverged: {err}")
        return 1
    print(json.dumps(history.rows[-1] if history.rows else {}))
    return 0


def _restore(path: Path) -> Perceiver:
    from .checkpoint import load_checkpoint

    _input_file(path, "--checkpoint")
    with _reading(path, "--checkpoint"):
        ck = load_checkpoint(path)  # every problem a CheckpointError naming the path
    if ck.architecture is not None:
        raise ValueError(f"--checkpoint {path}: holds a published model ({ck.architecture}); eval and "
                         "predict take a Perceiver's checkpoint (run a published model with fill-mask, "
                         "classify-image, flow or perceiver_np.pretrained)")
    return Perceiver(ck.config, ck.params)


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import Loss, evaluate

    if args.dask is not None or args.dask_workers is not None:
        return _eval_on_dask(args)
    model = _restore(args.checkpoint)
    data = _load_data(args.data, "--data", model.config)
    print(json.dumps(evaluate(model, model.params, data, Loss(args.loss), args.batch_size)))
    return 0


def _sequences(path: Path, cfg: PerceiverConfig) -> list[np.ndarray]:
    """The arrays of an .npz of sequences [n_i, C] of different lengths, in the file's order."""
    seqs = list(_read_npz(path, "--input").values())
    if not seqs:
        raise ValueError(f"--input {path}: holds no sequence")
    for k, s in enumerate(seqs):
        if s.ndim != 2 or s.shape[0] == 0:
            raise ValueError(f"--input {path}: sequence {k} must be [n, C] with n >= 1, got shape {s.shape}")
        _check_width(s.shape[1], path, "--input", cfg, f"sequence {k}")
    return seqs




def _check_mask(mask_shape: tuple[int, ...], mask_dtype: np.dtype, x_shape: tuple[int, ...],
                path: Path) -> None:
    if mask_dtype != np.bool_ or tuple(mask_shape) != tuple(x_shape[:2]):
        raise ValueError(f"--mask {path}: expected bool [S, N] = {tuple(x_shape[:2])} like --input, "
                         f"got {np.dtype(mask_dtype).name} {tuple(mask_shape)}")


def _check_input_shape(shape: tuple[int, ...], path: Path, cfg: PerceiverConfig) -> None:
    if len(shape) != 3 or 0 in shape:
        raise ValueError(f"--input {path}: expected [S, N, C] with S, N, C >= 1, got shape {tuple(shape)}")
    _check_width(shape[2], path, "--input", cfg)


def _npy_chunks(path: Path, flag: str, chunk_size: int) -> Any:
    """The .npy ``path`` as :class:`perceiver_np.stream.NpyChunks`: read a chunk at a time into
    one reused buffer, never whole."""
    from .stream import NpyChunks

    _input_file(path, flag)
    with _reading(path, flag, ".npy"):
        if _signature(path) != _NPY_MAGIC:
            raise ValueError(f"{flag} {path}: not a readable .npy file (no .npy signature at the start)")
        return NpyChunks(str(path), chunk_size)


def _predict_stream(model: Perceiver, args: argparse.Namespace) -> tuple[np.ndarray, int, int]:
    """One [B, N, C] array streamed from its file through the encoder -> (y, samples, tokens)."""
    x = _npy_chunks(args.input, "--input", args.chunk_size)
    _check_input_shape(x.shape, args.input, model.config)
    mask = _npy_chunks(args.mask, "--mask", args.chunk_size) if args.mask else None
    if mask is not None:
        _check_mask(mask.shape, mask.dtype, x.shape, args.mask)
    y = model.encode_stream(x, mask, chunk_size=args.chunk_size)
    return y, x.shape[0], x.shape[0] * x.shape[1]


def _predict_batches(model: Perceiver, args: argparse.Namespace) -> tuple[np.ndarray, int, int]:
    """An .npy [S, N, C] (memory-mapped) or an .npz of sequences, in batches -> (y, samples, tokens)."""
    batches: Iterator[tuple[np.ndarray, np.ndarray | None]]
    size = args.batch_size
    if args.input.suffix == ".npz":  # sequences of different lengths: padded and masked
        if args.mask:
            raise ValueError(f"--mask {args.mask}: sequences in an .npz are masked by their lengths; "
                             "--mask goes with an .npy --input")
        seqs = _sequences(args.input, model.config)
        batches = (pad_sequences(seqs[i:i + size]) for i in range(0, len(seqs), size))
        count, tokens = len(seqs), sum(len(s) for s in seqs)
    else:
        x = _read_npy(args.input, "--input")
        _check_input_shape(x.shape, args.input, model.config)
        mask = _read_npy(args.mask, "--mask") if args.mask else None
        if mask is not None:
            _check_mask(mask.shape, mask.dtype, x.shape, args.mask)
        batches = ((np.asarray(x[i:i + size]), None if mask is None else np.asarray(mask[i:i + size]))
                   for i in range(0, len(x), size))
        count, tokens = x.shape[0], x.shape[0] * x.shape[1]
    outs = []
    bar = _bar(math.ceil(count / size), not args.quiet)
    for xb, mb in batches:
        outs.append(model(xb, mb))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return np.concatenate(outs), count, tokens


def cmd_predict(args: argparse.Namespace) -> int:
    if args.dask is not None or args.dask_workers is not None:
        return _predict_on_dask(args)
    _output_file(args.out, "--out")
    model = _restore(args.checkpoint)
    t0 = time.perf_counter()
    y, count, tokens = (_predict_stream if args.stream else _predict_batches)(model, args)
    with open(args.out, "wb") as f:  # exactly the path given (np.save(path) would append .npy)
        np.save(f, y)
    seconds = time.perf_counter() - t0
    print(f"{count} samples ({tokens:,} tokens) -> {args.out} {y.shape} in {seconds:.2f} s: "
          f"{count / seconds:.1f} samples/s, {tokens / seconds:,.0f} tokens/s")
    return 0


# -- predict and eval on a Dask cluster (perceiver_np.distributed, docs/distributed.md) -------------


def _dask_flags(parser: argparse.ArgumentParser, files: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dask", metavar="SCHEDULER_ADDRESS",
                       help=f"run on the Dask cluster of this scheduler (tcp://host:8786): {files}; every "
                            "path must be the same on every worker (docs/distributed.md)")
    group.add_argument("--dask-workers", type=positive_int, metavar="N",
                       help="the same on a local Dask cluster of N worker processes")


def _on_dask(args: argparse.Namespace, run: Callable[[Any, Any], Any]) -> Any:
    """``run(perceiver_np.distributed, client)`` with --dask's address or --dask-workers' count
    as the client (connected to or started after every check, closed at the end)."""
    from . import distributed

    try:
        return run(distributed, args.dask if args.dask is not None else args.dask_workers)
    except ImportError as err:
        raise ValueError(f"{'--dask' if args.dask is not None else '--dask-workers'}: {err}") from err


def _predict_on_dask(args: argparse.Namespace) -> int:
    from .distributed import WorkerLost

    if args.mask is not None:
        raise ValueError("--mask: not with --dask or --dask-workers (shards bring their masks: the lengths "
                         "of an .npz's sequences, a Zarr group's mask)")
    if args.stream:
        raise ValueError("--stream: not with --dask or --dask-workers (it streams one long input; shards "
                         "are read a batch at a time)")
    try:
        report = _on_dask(args, lambda d, client: d.predict(
            args.checkpoint, str(args.input), args.out, client, batch_size=args.batch_size,
            progress=not args.quiet))
    except WorkerLost as err:
        _error("predict", err)
        return 1
    print(f"{report}; the outputs and manifest.json in {report.out_dir}")
    return 0


def _eval_on_dask(args: argparse.Namespace) -> int:
    from .distributed import WorkerLost

    try:
        report = _on_dask(args, lambda d, client: d.evaluate(
            args.checkpoint, str(args.data), client, batch_size=args.batch_size, loss=args.loss,
            progress=sys.stderr.isatty()))
    except WorkerLost as err:
        _error("eval", err)
        return 1
    print(report, file=sys.stderr)
    print(json.dumps(report.metrics))
    return 0


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="batch", leave=False)


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck import check_model
    from .tolerances import GRADCHECK_RTOL

    cfg = dataclasses.replace(_config_from(args), dtype="float64")
    model = Perceiver(cfg)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, args.length, cfg.input_dim))
    queries = None
    if cfg.decoder == "query" and cfg.query_source == "given":
        queries = rng.standard_normal((args.batch, 3, cfg.decoder_query_channels))
    report = check_model(model, x, training=cfg.dropout > 0, max_entries=args.entries, queries=queries)
    print(report)
    return 0 if report.max_rel_error <= GRADCHECK_RTOL else 1


def cmd_golden(args: argparse.Namespace) -> int:
    from .interop import load_params
    from .verify import write_golden

    cfg = dataclasses.replace(_config_from(args), dtype="float64", backend="numpy")
    _output_file(args.out, "--out")
    if args.params:
        _input_file(args.params, "--params")
        with _reading(args.params, "--params"):
            model = load_params(args.params, cfg)  # every problem an InteropError naming the path
    else:
        model = Perceiver(cfg)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, args.length, cfg.input_dim))
    mask = None
    if args.mask:  # the last sample keeps only its first half
        mask = np.ones((args.batch, args.length), dtype=bool)
        mask[-1, (args.length + 1) // 2:] = False
    queries = None
    if cfg.decoder == "query" and cfg.query_source == "given":
        queries = rng.standard_normal((args.batch, args.num_queries, cfg.decoder_query_channels))
    path = write_golden(args.out, model, x, mask, seed=args.seed, queries=queries)
    with np.load(path, allow_pickle=False) as z:
        acts = sum(1 for k in z.files if k.startswith("act/"))
        grads = sum(1 for k in z.files if k.startswith("grad/"))
    print(f"{path}: {acts} activations, {grads} gradients, {len(model.params)} parameters, float64")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .verify import compare

    for path in (args.golden, args.theirs):
        _input_file(path)
        with _reading(path, "", ".npz"):
            if not _signature(path).startswith(_ZIP_MAGIC):
                raise ValueError(f"{path}: not a readable .npz file (no zip signature at the start)")
    try:
        report = compare(args.golden, args.theirs, allow_missing=args.allow_missing)
    except MemoryError as err:
        raise ValueError(f"{args.golden}, {args.theirs}: too large to compare in memory ({err})") from err
    print(json.dumps(report.to_json(), indent=1) if args.json else report)
    return 0 if report.ok else 1


def _precision_formats(text: str) -> tuple[str, ...]:
    from .precision import FORMATS

    formats = tuple(f.strip() for f in text.split(","))
    if not all(f in FORMATS for f in formats) or len(set(formats)) != len(formats):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(FORMATS)}, each "
                                         f"once, got {text!r}")
    return formats


_precision_formats.__name__ = "formats"


def _golden_or_checkpoint(path: Path) -> tuple[Any, dict[str, Any] | None]:
    """(model, its golden run's arguments) of a golden file, or (model, None) of a checkpoint."""
    from .checkpoint import load_checkpoint
    from .verify import FORMAT, golden_model

    _input_file(path)
    with _reading(path, "", ".npz"):
        if not _signature(path).startswith(_ZIP_MAGIC):
            raise ValueError(f"{path}: not a readable .npz file (no zip signature at the start)")
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            meta = json.loads(z["meta.json"].tobytes()) if "meta.json" in z.files else None
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            return golden_model(path)
    with _reading(path, ""):
        return load_checkpoint(path).model(), None  # every problem a CheckpointError naming the path


def _precision_inputs(args: argparse.Namespace, model: Any, golden: dict[str, Any] | None
                      ) -> tuple[Any, Any, Any, Any]:
    """(x, mask, queries, options) of precision-report: the --x/--mask/--queries files, or the
    golden file's own run."""
    if args.x is None:
        if golden is None:
            raise ValueError(f"--x: required with the checkpoint {args.model} (a golden file holds its own "
                             "input)")
        for flag, value in (("--mask", args.mask), ("--queries", args.queries)):
            if value is not None:
                raise ValueError(f"{flag} {value}: goes with --x; the golden file {args.model} brings its "
                                 "own input, mask and queries")
        return golden["x"], golden.get("mask"), golden.get("queries"), golden.get("options")
    x = np.asarray(_read_npy(args.x, "--x"))
    mask = None if args.mask is None else np.asarray(_read_npy(args.mask, "--mask"))
    queries = None if args.queries is None else np.asarray(_read_npy(args.queries, "--queries"))
    if isinstance(model, Perceiver):
        if x.ndim != 3 or 0 in x.shape:
            raise ValueError(f"--x {args.x}: expected [B, N, C] with B, N, C >= 1, got shape {x.shape}")
        _check_width(x.shape[2], args.x, "--x", model.config)
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != x.shape[:2]):
            raise ValueError(f"--mask {args.mask}: expected bool [B, N] = {x.shape[:2]} like --x, got "
                             f"{mask.dtype.name} {mask.shape}")
    return x, mask, queries, golden.get("options") if golden else None


def cmd_precision_report(args: argparse.Namespace) -> int:
    from .precision import _pyplot, report, write_json

    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        if path is not None:
            _output_file(path, flag)
    if args.plot is not None and args.json is not None and args.plot.resolve() == args.json.resolve():
        raise ValueError(f"--json {args.json}: the same file as --plot; give two file names")
    if args.plot is not None:
        try:
            _pyplot()
        except ImportError as err:
            raise ValueError(f"--plot {args.plot}: {err}") from err
    if args.recorded is not None:
        _input_file(args.recorded, "--recorded")
        with _reading(args.recorded, "--recorded", ".npz"):
            if not _signature(args.recorded).startswith(_ZIP_MAGIC):
                raise ValueError(f"--recorded {args.recorded}: not a readable .npz file (no zip signature "
                                 "at the start)")
    model, golden = _golden_or_checkpoint(args.model)
    x, mask, queries, options = _precision_inputs(args, model, golden)
    rep = report(model, x, mask, formats=args.formats, recorded=args.recorded, queries=queries,
                 options=options)
    print(rep)
    if args.json is not None:
        write_json(args.json, rep)
    if args.plot is not None:
        rep.plot(args.plot)
    return 0


# ---- attention maps (perceiver_np.viz, docs/attention-maps.md) ----------------------------------


def _index_list(text: str) -> tuple[int, ...]:
    """``0,3,5`` -> (0, 3, 5): indices for --latents and --heads (their ranges are the model's)."""
    parts = [t.strip() for t in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", t) for t in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, e.g. 0,1,2, got {text!r}")
    return tuple(int(t) for t in parts)


_index_list.__name__ = "indices"


def _perceiver_checkpoint(path: Path) -> Perceiver:
    """The Perceiver of the checkpoint ``path`` (a positional argument: errors name the path)."""
    from .checkpoint import load_checkpoint

    _input_file(path)
    with _reading(path, ""):
        ck = load_checkpoint(path)  # every problem a CheckpointError naming the path
    if ck.architecture is not None:
        raise ValueError(f"{path}: holds a published model ({ck.architecture}); attention draws the maps "
                         "of a Perceiver's checkpoint (train --out, save_checkpoint)")
    return Perceiver(ck.config, ck.params)


def cmd_attention(args: argparse.Namespace) -> int:
    from . import viz
    from .shapes import as_real_input

    _output_file(args.out, "--out")
    try:
        viz._figure_class()
    except ImportError as err:
        raise ValueError(f"--out {args.out}: {err}") from err
    model = _perceiver_checkpoint(args.checkpoint)
    cfg = model.config
    latents = args.latents if args.latents is not None else tuple(range(min(4, cfg.num_latents)))
    try:  # each message starts with the argument's name: "latents: ..." -> "--latents: ..."
        latents, heads, step = viz.selection(cfg, latents=latents, heads=args.heads, block=args.block,
                                             use=args.use)
    except ValueError as err:
        raise ValueError(f"--{err}") from err
    x = _read_npy(args.x, "--x")
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"--x {args.x}: expected [S, N, C] with S, N, C >= 1, got shape {x.shape}")
    _check_width(x.shape[2], args.x, "--x", cfg)
    mask = None if args.mask is None else _read_npy(args.mask, "--mask")
    if mask is not None and (mask.dtype != np.bool_ or mask.shape != x.shape[:2]):
        raise ValueError(f"--mask {args.mask}: expected bool [S, N] = {x.shape[:2]} like --x, got "
                         f"{mask.dtype.name} {mask.shape}")
    if args.sample >= x.shape[0]:
        raise ValueError(f"--sample: expected a sample of --x in [0, {x.shape[0]}), got {args.sample}")
    image = None if args.image is None else np.asarray(_read_npy(args.image, "--image"))
    shape = args.image_shape
    if image is not None:
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        planes = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
        if not planes or image.dtype.kind not in "iuf":
            raise ValueError(f"--image {args.image}: expected numbers [H, W] or [H, W, 3], got "
                             f"{image.dtype.name} {image.shape}")
        if shape is not None and tuple(shape) != image.shape[:2]:
            raise ValueError(f"--image {args.image}: {image.shape[0]} x {image.shape[1]} pixels, but "
                             f"--image-shape is {shape[0]} x {shape[1]}")
        shape = image.shape[:2]
    n = x.shape[1]
    if shape is not None and shape[0] * shape[1] != n:
        raise ValueError(f"--image-shape: expected H W with H * W = N = {n} (the positions of --x), got "
                         f"{shape[0]} {shape[1]}")
    s = args.sample
    xs = as_real_input(f"--x {args.x} sample {s}", x[s:s + 1], cfg.np_dtype)  # [1, N, C]: read alone
    ms = None if mask is None else np.asarray(mask[s:s + 1])
    maps = viz.attention_maps(model, xs, ms, latents=latents, heads=heads, block=args.block,
                              use=args.use)  # [1, h, m, N]
    name = step_names(cfg)[step]  # cross.{block}, or cross.{block}.use{use} for a shared block
    viz.draw_attention_maps(maps[0], path=args.out, image_shape=shape, image=image, latents=latents,
                            heads=heads, title=f"{name} attention of sample {s} of {args.x.name}")
    print(f"{args.out}: {name}, latents {','.join(map(str, latents))} x heads "
          f"{','.join(map(str, heads))} over {n:,} positions of sample {s}")
    return 0


# ---- Hugging Face's published Perceivers (a directory as save_pretrained writes it) -----------

#: The classes each command runs.
_COMMAND_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "fill-mask": ("PerceiverForMaskedLM",),
    "classify-image": ("PerceiverForImageClassificationLearned", "PerceiverForImageClassificationFourier",
                       "PerceiverForImageClassificationConvProcessing"),
    "flow": ("PerceiverForOpticalFlow",),
}


def _model_dir(path: Path, command: str) -> tuple[str, dict[str, Any]]:
    """(architecture, config.json with HF's defaults for the fields left out) of the model
    directory ``path``, if it holds a class ``command`` runs; else a ValueError. The weights are
    not read here."""
    from .hf_files import CONFIG_NAME, _read_json
    from .pretrained import HF_TASK_DEFAULTS

    if not path.exists():
        raise ValueError(f"{path}: no such directory (expected a model directory as save_pretrained "
                         "writes it)")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a model directory as save_pretrained writes it: "
                         f"{CONFIG_NAME} and the weights)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be read (permission denied)")
    config = _read_json(path / CONFIG_NAME, "the model's configuration")  # an HFFileError naming it
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    archs = config.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)):
        raise ValueError(f"{path / CONFIG_NAME}: expected one model class in 'architectures', "
                         f"got {archs!r:.200}")
    wanted = _COMMAND_ARCHITECTURES[command]
    if archs[0] not in wanted:
        need = wanted[0] if len(wanted) == 1 else ", ".join(wanted[:-1]) + " or " + wanted[-1]
        raise ValueError(f"{command} needs a {need}, {path} holds {archs[0]}")
    return archs[0], {**HF_TASK_DEFAULTS, **config}


def _positive(config: dict[str, Any], key: str, where: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where / 'config.json'}: {key} must be a positive integer, got {value!r:.100}")
    return value


def _load_model(path: Path, dtype: str) -> Any:
    from .pretrained import from_pretrained

    return from_pretrained(path, dtype=dtype)  # every problem an HFFileError / InteropError naming it


def _need_pillow() -> None:
    from .images import _pillow

    try:
        _pillow()
    except ImportError as err:
        raise ValueError(str(err)) from err


def _image(path: Path) -> np.ndarray:
    """The image file ``path`` as [H, W, 3] uint8 RGB (images.load_image); errors name it."""
    from .images import load_image

    _input_file(path)
    with _reading(path, ""):
        return load_image(path)  # a ValueError naming the path when pillow cannot read it


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# -- fill-mask ------------------------------------------------------------------------------------

#: ``[MASK]`` (one masked byte) or ``[MASK:N]`` (N masked bytes) in fill-mask's TEXT.
_MASK_MARK = re.compile(r"\[MASK(?::([^\[\]]*))?\]")

_FILL_MASK_TEXT = """\
the text, with the bytes to predict marked: [MASK] masks one byte, [MASK:N] masks N bytes
(N >= 1); masks next to each other form one span ("[MASK][MASK:2]" is "[MASK:3]"). The rest is
UTF-8 bytes, except the literal texts of the other special tokens ([PAD] [BOS] [EOS] [CLS]
[SEP]), which become those tokens, as in HF's PerceiverTokenizer"""


def _mask_spans(text: str) -> list[str | int]:
    """fill-mask's TEXT -> its pieces in order: plain text (str) and masked spans (int: the
    bytes masked), adjacent masks merged into one span."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"TEXT: character {err.start} ({text[err.start]!r}) cannot be encoded as UTF-8 "
                         "(a lone surrogate: bytes the command line could not decode)") from err
    pieces: list[str | int] = []
    pos = 0
    for m in _MASK_MARK.finditer(text):
        count = 1
        if m.group(1) is not None:
            digits = m.group(1).lstrip("0")
            if not re.fullmatch(r"[0-9]+", m.group(1)) or not digits:
                raise ValueError(f"TEXT: {m.group()!r} at character {m.start()}: expected [MASK] (one masked "
                                 "byte) or [MASK:N] with N a whole number >= 1")
            count = int(digits) if len(digits) <= 18 else INT_MAX  # more than any model's positions
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        if pieces and isinstance(pieces[-1], int):
            pieces[-1] += count
        else:
            pieces.append(count)
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    for piece in pieces:
        if isinstance(piece, str) and "[MASK:" in piece:
            at = text.index("[MASK:")
            raise ValueError(f"TEXT: '[MASK:' at character {at} is not closed; write [MASK:N]")
    if not any(isinstance(p, int) for p in pieces):
        raise ValueError(f"TEXT: {text!r:.80} has no [MASK]; mark the bytes to predict with [MASK] (one "
                         "byte) or [MASK:N] (N bytes)")
    return pieces


def _token_text(token: int) -> str:
    """One id of the byte tokenizer as a label: ``b' '``, ``b'\\xc3'``, ``[PAD]``."""
    from .tokenizer import NUM_SPECIAL_TOKENS, SPECIAL_TOKENS

    if token < NUM_SPECIAL_TOKENS:
        return next(t for t, i in SPECIAL_TOKENS.items() if i == token)
    return repr(bytes([token - NUM_SPECIAL_TOKENS]))


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from .tokenizer import VOCAB_SIZE, ByteTokenizer

    _, config = _model_dir(args.dir, "fill-mask")
    vocab = _positive(config, "vocab_size", args.dir)
    if vocab != VOCAB_SIZE:
        raise ValueError(f"{args.dir / 'config.json'}: vocab_size is {vocab}, but the language Perceiver's "
                         f"byte tokenizer has {VOCAB_SIZE} ids")
    positions = _positive(config, "max_position_embeddings", args.dir)
    pieces = _mask_spans(args.text)
    tok = ByteTokenizer()
    text_ids = sum(len(tok.tokenize(p, name="TEXT")) for p in pieces if isinstance(p, str))
    masked = sum(p for p in pieces if isinstance(p, int))
    if 2 + text_ids + masked > positions:
        raise ValueError(f"TEXT: {2 + text_ids + masked} ids ([CLS], {text_ids} of text, {masked} masked, "
                         f"[SEP]), more than the model's max_position_embeddings = {positions}")
    expanded = "".join(p if isinstance(p, str) else "[MASK]" * p for p in pieces)
    batch = tok.encode(expanded, max_length=positions, padding="max_length")  # as HF's tokenizer
    ids = batch["input_ids"]  # [1, positions]
    where = np.flatnonzero(ids[0] == tok.mask_id)
    assert len(where) == masked, "every [MASK] id comes from a mask of TEXT"
    model = _load_model(args.dir, args.dtype)
    logits = model(ids, batch["attention_mask"] == 1)[0]  # [positions, vocab]
    out, spans, start = [], [], 0
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        span = where[start:start + piece]
        start += piece
        best = logits[span].argmax(axis=-1)  # [n]
        out.append(tok.decode(best))  # as HF decodes: special ids as their text, bad UTF-8 as U+FFFD
        spans.append(span)
    print("".join(out))
    if args.top is not None:
        k = min(args.top, logits.shape[-1])
        for s, span in enumerate(spans, 1):
            probs = _softmax(logits[span])  # [n, vocab]
            for b, (position, p) in enumerate(zip(span, probs, strict=True), 1):
                order = np.argsort(-p, kind="stable")[:k]
                best = "  ".join(f"{_token_text(int(i))} {p[i]:.6f}" for i in order)
                print(f"span {s}, byte {b} (input position {position}): {best}")
    return 0


# -- classify-image -------------------------------------------------------------------------------

#: What HF's PerceiverImageProcessor does besides the sizes, mean and std: the only settings the
#: image processor here implements.
_PROCESSOR_FIXED: dict[str, Any] = {"do_resize": True, "do_center_crop": True, "do_rescale": True,
                                    "do_normalize": True, "resample": 3}


def _square(value: Any, key: str, where: Path) -> int:
    """A processor config's size: an int, or {"height": s, "width": s}."""
    if isinstance(value, dict) and set(value) == {"height", "width"} and value["height"] == value["width"]:
        value = value["height"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} = {value!r:.100}: expected a positive int or "
                         '{"height": s, "width": s} (a square; the image processor here crops and resizes '
                         "to squares, as PerceiverImageProcessor's defaults do)")
    return value


def _image_processor(path: Path, architecture: str, config: dict[str, Any]) -> Any:
    """HF's PerceiverImageProcessor for the model in ``path``: its defaults (a centre crop of
    224/256 of the shorter side resized to 224 x 224, ImageNet's mean and std), the size
    image_size for the learned-positions model (its positions fix it), and the values of
    ``path/preprocessor_config.json`` when the directory has one (the hub's do)."""
    from .hf_files import _read_json
    from .images import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor

    learned = architecture == "PerceiverForImageClassificationLearned"
    size = _positive(config, "image_size", path) if learned else 224
    crop: int = 256
    mean: Any = IMAGENET_MEAN
    std: Any = IMAGENET_STD
    file = path / "preprocessor_config.json"
    if file.exists():
        pc = _read_json(file, "the image processor's configuration")
        if not isinstance(pc, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(pc).__name__}")
        for key, want in _PROCESSOR_FIXED.items():
            if key in pc and pc[key] != want:
                raise ValueError(f"{file}: {key} = {pc[key]!r:.100} is not supported; the image processor "
                                 f"here implements {key} = {want!r} (PerceiverImageProcessor's default)")
        factor = pc.get("rescale_factor", 1 / 255)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-15:
            raise ValueError(f"{file}: rescale_factor = {factor!r:.100} is not supported; the image "
                             "processor here divides by 255 (PerceiverImageProcessor's default)")
        size = _square(pc.get("size", size), "size", file)
        crop = _square(pc.get("crop_size", crop), "crop_size", file)
        mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
        if learned and size != config["image_size"]:
            raise ValueError(f"{file}: size {size} differs from the model's image_size "
                             f"{config['image_size']} (its trainable positions take image_size x "
                             "image_size pixels)")
    try:
        return ImageProcessor(size=size, crop_size=crop, mean=mean, std=std)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from err


def _labels(config: dict[str, Any], count: int) -> list[str]:
    """id2label of config.json as a list (HF's LABEL_i where it has none)."""
    id2label = config.get("id2label")
    table = id2label if isinstance(id2label, dict) else {}
    return [str(table.get(str(i), table.get(i, f"LABEL_{i}"))) for i in range(count)]


def cmd_classify_image(args: argparse.Namespace) -> int:
    architecture, config = _model_dir(args.dir, "classify-image")
    _need_pillow()
    processor = _image_processor(args.dir, architecture, config)
    pixels = []
    for path in args.images:  # every image read and prepared before the model is loaded
        rgb = _image(path)
        try:
            pixels.append(processor(rgb))  # [1, 3, size, size]
        except ValueError as err:
            raise ValueError(f"{path}: {str(err).removeprefix('images: ')}") from err
    model = _load_model(args.dir, args.dtype)
    labels: list[str] | None = None
    for path, px in zip(args.images, pixels, strict=True):
        probs = _softmax(model(px)[0])  # [1, 3, size, size] -> logits [num_labels] -> probabilities
        if labels is None:
            labels = _labels(model.hf_config, len(probs))
        print(path)
        for i in np.argsort(-probs, kind="stable")[:args.top]:
            print(f"  {probs[i]:.6f}  {labels[i]}")
    return 0


# -- flow -----------------------------------------------------------------------------------------


def cmd_flow(args: argparse.Namespace) -> int:
    from ._files import atomic_write
    from .images import flow_to_color, frames_for_flow, save_png

    _output_file(args.out, "--out")
    if args.png is not None:
        _output_file(args.png, "--png")
        if args.png.resolve() == args.out.resolve():
            raise ValueError(f"--png {args.png}: the same file as --out; give two file names")
    _, config = _model_dir(args.dir, "flow")
    size = config.get("train_size")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{args.dir / 'config.json'}: train_size must be [height, width], got {size!r:.100}")
    h, w = size
    _need_pillow()
    frames = []
    for path in (args.frame1, args.frame2):
        rgb = _image(path)
        if rgb.shape[:2] != (h, w):
            raise ValueError(f"{path}: {rgb.shape[0]}x{rgb.shape[1]} pixels (height x width), but the model "
                             f"takes frames of its train_size, {h}x{w}; resize or crop both frames to "
                             f"{h}x{w} first")
        frames.append(rgb)
    x = frames_for_flow(frames[0], frames[1])  # [1, 2, 3, H, W]; the model cuts the 3x3 patches
    model = _load_model(args.dir, args.dtype)
    flow = np.ascontiguousarray(model(x)[0], dtype=np.float32)  # [H, W, 2]
    atomic_write(args.out, lambda f: np.save(f, flow))  # exactly the path given
    if args.png is not None:
        save_png(args.png, flow_to_color(flow))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perceiver-np", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="a configuration's summary, shapes, counts, FLOPs, memory "
                          "(from the options alone: no model is built)")
    _add_config_flags(info)
    info.add_argument("--length", type=positive_int, default=1024,
                      help="N, the input length for FLOPs and memory")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a model on an .npz dataset")
    _add_config_flags(train)
    train.add_argument("--data", type=Path, required=True, help=".npz with x [S, N, C], y, optional mask")
    train.add_argument("--eval-data", type=Path, help="held-out .npz, evaluated after every epoch")
    train.add_argument("--loss", choices=("cross_entropy", "mse"), default="cross_entropy")
    train.add_argument("--label-smoothing", type=fraction, default=0.0, help="in [0, 1]")
    train.add_argument("--optimizer", choices=("adamw", "lamb", "sgd"), default="adamw")
    train.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate, > 0")
    train.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                       help="cosine: linear warmup then half cosine to 0")
    train.add_argument("--warmup", type=fraction, default=0.1,
                       help="warmup as a fraction of all steps, in [0, 1]")
    train.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    train.add_argument("--momentum", type=nonnegative_float, default=0.9, help="SGD only")
    train.add_argument("--nesterov", action="store_true", help="SGD only")
    train.add_argument("--clip-norm", type=positive_float, default=1.0,
                       help="global gradient norm limit, > 0")
    train.add_argument("--epochs", type=positive_int, default=10)
    train.add_argument("--batch-size", type=positive_int, default=64)
    train.add_argument("--patience", type=positive_int,
                       help="stop after this many epochs without a better eval loss")
    train.add_argument("--out", type=Path, default=Path("checkpoint.npz"),
                       help="checkpoint, written after every epoch")
    train.add_argument("--log", type=Path, help="JSON-lines metrics log, appended to")
    train.add_argument("--resume", action="store_true", help="continue from --out bit-identically")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="loss and accuracy of a checkpoint on an .npz dataset")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--loss", choices=("cross_entropy", "mse"), default="cross_entropy")
    ev.add_argument("--batch-size", type=positive_int, default=256)
    _dask_flags(ev, "--data is then a glob of .npz datasets (quoted), one, or a Zarr group")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="run a checkpoint on x.npy, write y.npy")
    pr.add_argument("--checkpoint", type=Path, required=True)
    pr.add_argument("--input", type=Path, required=True,
                    help=".npy [S, N, C] (memory-mapped), or .npz of sequences [n_i, C] of any lengths "
                         "(padded and masked automatically)")
    pr.add_argument("--mask", type=Path, help=".npy bool [S, N], True = keep")
    pr.add_argument("--out", type=Path, required=True, help=".npy written to exactly this path")
    pr.add_argument("--batch-size", type=positive_int, default=64)
    pr.add_argument("--stream", action="store_true",
                    help="stream one long input through the encoder chunk by chunk (any N, bounded memory)")
    pr.add_argument("--chunk-size", type=positive_int, default=16384,
                    help="positions per chunk with --stream (read into one reused buffer)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    _dask_flags(pr, "--input is then a glob of .npy / .npz shards (quoted), one, or a Zarr store, and "
                    "--out a directory: <input stem>.npy per shard and manifest.json")
    pr.set_defaults(func=cmd_predict)

    gc = sub.add_parser("gradcheck", help="finite-difference check of a configuration, in float64; "
                        "exit 1 when it fails")
    _add_config_flags(gc)
    gc.add_argument("--length", type=positive_int, default=4, help="N")
    gc.add_argument("--batch", type=positive_int, default=2, help="B")
    gc.add_argument("--entries", type=positive_int, default=4, help="entries checked per tensor")
    gc.set_defaults(func=cmd_gradcheck)

    go = sub.add_parser("golden", help="write a golden file: params, inputs, every activation and "
                        "gradient in float64 (docs/verify.md)")
    go.add_argument("--preset", choices=("edifice", "deepmind", "hf"),
                    help="start from a preset; flags given other values override it")
    _add_config_flags(go)
    go.add_argument("--params", type=Path,
                    help=".npz or .safetensors keyed by our schema: weights trained elsewhere")
    go.add_argument("--batch", type=positive_int, default=2, help="B")
    go.add_argument("--length", type=positive_int, default=8, help="N")
    go.add_argument("--mask", action="store_true", help="pad the last sample to half its length")
    go.add_argument("--num-queries", type=positive_int, default=4, help="O, for query_source given")
    go.add_argument("--out", type=Path, required=True)
    go.set_defaults(func=cmd_golden)

    cp = sub.add_parser("compare", help="compare another implementation's tensors with a golden "
                        "file; exit 1 when any breaks its tolerance")
    cp.add_argument("golden", type=Path)
    cp.add_argument("theirs", type=Path, help=".npz with act/<name>, grad/<name> (docs/verify.md)")
    cp.add_argument("--json", action="store_true", help="the report as JSON")
    cp.add_argument("--allow-missing", action="store_true",
                    help="compare only the tensors present in theirs; still fails when no activation "
                         "or no gradient was compared")
    cp.set_defaults(func=cmd_compare)

    pq = sub.add_parser(
        "precision-report", help="the error of every layer of a model run in float16 and bfloat16 "
        "(emulated), and of a recorded run, against float64 (docs/precision.md)",
        description="Emulate the model in float16 and bfloat16 (parameters and every golden-file\n"
        "activation rounded to the format, float32 arithmetic in between) and print, per\n"
        "activation in forward order, its max and rms relative error against the float64 run:\n"
        "accumulated, and local (the layer alone, fed the exact inputs as the format holds them).\n"
        "A golden file brings its own input; a checkpoint needs --x.\n\n"
        "    perceiver-np precision-report golden.npz --recorded onnx_run.npz --plot precision.png\n"
        "    perceiver-np precision-report model.npz --x x.npy --mask mask.npy --json precision.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pq.add_argument("model", type=Path, metavar="CHECKPOINT_OR_GOLDEN",
                    help="a checkpoint (train --out, save_checkpoint) or a golden file (golden, "
                         "write_golden)")
    pq.add_argument("--x", type=Path, help=".npy input [B, N, C] (a published model's: what its HF class "
                    "takes); default: the golden file's own")
    pq.add_argument("--mask", type=Path, help=".npy [B, N], True = keep (with --x)")
    pq.add_argument("--queries", type=Path, help=".npy [B, O, Cq] for query_source given (with --x)")
    pq.add_argument("--formats", type=_precision_formats, default=("float16", "bfloat16"),
                    help="comma-separated formats to emulate (default float16,bfloat16)")
    pq.add_argument("--recorded", type=Path,
                    help=".npz of another implementation's run of the same parameters and input, in the "
                         "golden layout (act/<name>; docs/verify.md)")
    pq.add_argument("--plot", type=Path, help="also write the error per layer as a PNG (needs matplotlib)")
    pq.add_argument("--json", type=Path, help="also write the report as JSON to this path")
    pq.set_defaults(func=cmd_precision_report)

    at = sub.add_parser(
        "attention", help="draw a checkpoint's cross-attention maps over one input as a PNG "
        "(docs/attention-maps.md)",
        description="Draw the cross-attention weights of chosen latents and heads of a Perceiver\n"
        "checkpoint over the positions of one sample of --x (one panel per latent and head),\n"
        "computed from the attention's log-sum-exp without holding all M x N weights\n"
        "(perceiver_np.viz). A sequence is drawn as weight against position; with --image-shape\n"
        "H W (N = H * W, row-major) or --image, as an H x W image.\n\n"
        "    perceiver-np attention model.npz --x x.npy --latents 0,1,2 --heads 0 --out attention.png\n"
        "    perceiver-np attention digits.npz --x x.npy --sample 3 --image-shape 8 8 --out a.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    at.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                    help="a Perceiver checkpoint (train --out, save_checkpoint)")
    at.add_argument("--x", type=Path, required=True, help=".npy input [S, N, C] (memory-mapped)")
    at.add_argument("--mask", type=Path, help=".npy bool [S, N], True = keep")
    at.add_argument("--sample", type=nonnegative_int, default=0, help="which sample of --x (default 0)")
    at.add_argument("--latents", type=_index_list,
                    help="comma-separated latent indices, e.g. 0,1,2 (default the first 4)")
    at.add_argument("--heads", type=_index_list, help="comma-separated head indices (default all)")
    at.add_argument("--block", type=nonnegative_int, default=0, help="which cross block (default 0)")
    at.add_argument("--use", type=nonnegative_int, default=0,
                    help="which use of a cross block the schedule runs several times (default 0)")
    at.add_argument("--image-shape", type=positive_int, nargs=2, metavar=("H", "W"),
                    help="draw the N = H * W positions as an image (row-major)")
    at.add_argument("--image", type=Path,
                    help=".npy [H, W] or [H, W, 3] drawn beneath the maps (implies --image-shape)")
    at.add_argument("--out", type=Path, required=True, help="the PNG, written atomically")
    at.set_defaults(func=cmd_attention)

    dtype_help = "the dtype the model computes in (HF's published models: float32)"
    fm = sub.add_parser(
        "fill-mask", help="fill the masked bytes of a text with a PerceiverForMaskedLM (the language "
        "Perceiver)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict the masked bytes of TEXT with a PerceiverForMaskedLM directory (as\n"
        "save_pretrained writes it). TEXT is tokenised as HF's PerceiverTokenizer does it, padded\n"
        "to max_position_embeddings with the attention mask; each masked span is filled with its\n"
        "most likely bytes, decoded as the tokenizer decodes (a special id as its text, invalid\n"
        "UTF-8 as U+FFFD), and the whole text printed.\n\n"
        "    perceiver-np fill-mask DIR \"This is an incomplete sentence where some words are[MASK:9]\"\n"
        "    perceiver-np fill-mask DIR \"a[MASK]c\" --top 3")
    fm.add_argument("dir", type=Path, metavar="DIR", help="a PerceiverForMaskedLM directory")
    fm.add_argument("text", metavar="TEXT", help=_FILL_MASK_TEXT)
    fm.add_argument("--top", type=positive_int, metavar="K",
                    help="also print, for every masked byte, the K most likely ids with their "
                         "probabilities (one line a byte)")
    fm.add_argument("--dtype", choices=DTYPES, default="float32", help=dtype_help)
    fm.set_defaults(func=cmd_fill_mask)

    ci = sub.add_parser(
        "classify-image", help="the top labels of images with a PerceiverForImageClassification* model",
        description="Classify each IMAGE with a PerceiverForImageClassificationLearned, -Fourier or\n"
        "-ConvProcessing directory: the image prepared as HF's PerceiverImageProcessor does it\n"
        "(a centre crop of 224/256 of the shorter side, a bicubic resize to 224 x 224, or to\n"
        "image_size for the learned-positions model, ImageNet's mean and std; the values of\n"
        "DIR/preprocessor_config.json when there is one), then for each image its path and the\n"
        "top labels of config.json's id2label, each with its probability (softmax of the logits).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ci.add_argument("dir", type=Path, metavar="DIR", help="a PerceiverForImageClassification* directory")
    ci.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files pillow can read")
    ci.add_argument("--top", type=positive_int, default=5, metavar="K",
                    help="labels printed per image (default 5; at most the model's labels)")
    ci.add_argument("--dtype", choices=DTYPES, default="float32", help=dtype_help)
    ci.set_defaults(func=cmd_classify_image)

    fl = sub.add_parser(
        "flow", help="the optical flow from FRAME1 to FRAME2 with a PerceiverForOpticalFlow",
        description="The optical flow from FRAME1 to FRAME2 with a PerceiverForOpticalFlow directory.\n"
        "Both frames must have the model's train_size (config.json, [height, width]; 368 x 496\n"
        "for deepmind/optical-flow-perceiver). They are scaled to [-1, 1] and the model cuts the\n"
        "3x3 patches itself. Writes the flow [H, W, 2] float32 (x then y, in pixels) to --out\n"
        "with np.save, and with --png its Middlebury colour coding. Prints nothing.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    fl.add_argument("dir", type=Path, metavar="DIR", help="a PerceiverForOpticalFlow directory")
    fl.add_argument("frame1", type=Path, metavar="FRAME1", help="the first frame (an image file)")
    fl.add_argument("frame2", type=Path, metavar="FRAME2", help="the second frame, the same size")
    fl.add_argument("--out", type=Path, required=True,
                    help=".npy written to exactly this path (atomically): the flow [H, W, 2] float32")
    fl.add_argument("--png", type=Path, help="also write the flow's colour coding here as a PNG")
    fl.add_argument("--dtype", choices=DTYPES, default="float32", help=dtype_help)
    fl.set_defaults(func=cmd_flow)
    return p


def _error(command: str, message: object) -> None:
    print(f"perceiver-np {command}: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit status (see the module docstring)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already reported by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"perceiver-np {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError as err:
        _error(args.command, f"out of memory ({err})")
        return 2
    except OSError as err:  # a user's path that cannot be read or written
        _error(args.command, f"{err.filename}: {err.strerror}" if err.filename and err.strerror else err)
        return 2
    except (ValueError, TypeError) as err:  # bad options or data: one clear line, no traceback
        _error(args.command, err)
        return 2


def run() -> int:
    """The ``perceiver-np`` executable: :func:`perceiver_np.runtime.tune` (the process-wide
    settings a command-line run wants: threads from PERCEIVER_NP_NUM_THREADS, freed memory kept
    unless PERCEIVER_NP_KEEP_MEMORY=0), then :func:`main`. ``main``
    itself tunes nothing, so calling it from Python changes nothing process-wide."""
    from .runtime import tune

    tune()
    return main()
