"""The ``perceiver-np`` command (also ``python -m perceiver_np``).

    perceiver-np info --input-dim 287 --length 4096       # options, shapes, counts, FLOPs, memory, vs O(N^2)
    perceiver-np train --data train.npz --eval-data test.npz --input-dim 35 --decoder classification \\
        --output-dim 10 --epochs 30 --out model.npz
    perceiver-np eval --checkpoint model.npz --data test.npz
    perceiver-np predict --checkpoint model.npz --input x.npy --out y.npy
    perceiver-np gradcheck --input-dim 5 --latent-dim 8 --num-latents 3 --num-heads 2
    perceiver-np golden --preset edifice --input-dim 7 --seed 0 --out golden.npz
    perceiver-np compare golden.npz theirs.npz [--json]

Every model option of :class:`perceiver_np.PerceiverConfig` is a flag (``--latent-dim``,
``--no-final-norm``, ...) with the same default. Data files are ``.npz`` holding ``x``
[S, N, C], ``y`` (labels [S] or targets [S, O, out]) and optionally ``mask`` [S, N]; they are
loaded without pickle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import cost, optim
from .config import PerceiverConfig, cross_block_shapes, decoder_shapes, self_block_shapes
from .model import Perceiver

_SKIP = {"input_dim"}  # required, added by hand


def _add_config_flags(parser: argparse.ArgumentParser, required_input_dim: bool = True) -> None:
    group = parser.add_argument_group("model options (PerceiverConfig; see docs/architecture.md)")
    group.add_argument("--input-dim", type=int, required=required_input_dim,
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
        elif "tuple" in kind:
            group.add_argument(flag, type=int, nargs="+", default=default, help=f"(default {default})")
        else:
            py = int if "int" in kind else float if "float" in kind else str
            group.add_argument(flag, type=py, default=default, help=f"(default {default})")


def _config_from(args: argparse.Namespace) -> PerceiverConfig:
    """The flags as a config; with ``--preset``, the preset's options overridden by every flag
    given a value other than its default."""
    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(PerceiverConfig)}
    if opts.get("output_index_dims") is not None:
        opts["output_index_dims"] = tuple(opts["output_index_dims"])
    if getattr(args, "preset", None):
        from .presets import preset

        defaults = {f.name: f.default for f in dataclasses.fields(PerceiverConfig)}
        changed = {k: v for k, v in opts.items() if k == "input_dim" or v != defaults.get(k)}
        opts = {**opts, **preset(args.preset), **changed}
    return PerceiverConfig(**opts)


def _load_data(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    if "x" not in data:
        raise SystemExit(f"{path}: expected an array named 'x' [S, N, C], found {sorted(data)}")
    return data


def cmd_info(args: argparse.Namespace) -> int:
    cfg = _config_from(args)
    model = Perceiver(cfg)
    print(model.summary())
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
        print(f"  inference (fast path), B = {batch}: the input {held:,.2f} MiB + at most "
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
    from .train import Loss, fit

    cfg = _config_from(args)
    train = _load_data(args.data)
    evald = _load_data(args.eval_data) if args.eval_data else None
    model = Perceiver(cfg)
    steps = args.epochs * math.ceil(len(train["x"]) / args.batch_size)
    loss = Loss(args.loss, label_smoothing=args.label_smoothing)
    _, history = fit(model, _optimizer(args, steps), loss, train, epochs=args.epochs,
                         batch_size=args.batch_size, eval_data=evald, seed=args.seed,
                         clip_norm=args.clip_norm, patience=args.patience, log_path=args.log,
                         checkpoint_path=args.out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(history.rows[-1] if history.rows else {}))
    return 0


def _restore(path: Path) -> Perceiver:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    return Perceiver(ck.config, ck.params)


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import Loss, evaluate

    model = _restore(args.checkpoint)
    print(json.dumps(evaluate(model, model.params, _load_data(args.data), Loss(args.loss), args.batch_size)))
    return 0


def _sequences(path: Path) -> list[np.ndarray]:
    """The arrays of an .npz of sequences [n_i, C] of different lengths, in the file's order."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        seqs = [z[k] for k in z.files]
    for k, s in zip(range(len(seqs)), seqs, strict=True):
        if s.ndim != 2:
            raise ValueError(f"{path}: sequence {k} must be [n, C], got shape {s.shape}")
    return seqs


def _pad(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sequences [n_i, C] -> (x [B, max n, C] zero-padded, mask [B, max n], True = real)."""
    n = max(len(s) for s in seqs)
    x = np.zeros((len(seqs), n, seqs[0].shape[1]), dtype=np.result_type(*seqs))
    mask = np.zeros((len(seqs), n), dtype=bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    return x, mask


def cmd_predict(args: argparse.Namespace) -> int:
    model = _restore(args.checkpoint)
    t0 = time.perf_counter()
    if args.stream:  # one [B, N, C] array read from its file chunk by chunk
        from .stream import NpyChunks

        x = NpyChunks(args.input, args.chunk_size)  # read into one reused buffer, never whole
        mask = NpyChunks(args.mask, args.chunk_size) if args.mask else None
        y = model.encode_stream(x, mask, chunk_size=args.chunk_size)
        count, tokens = x.shape[0], x.shape[0] * x.shape[1]
    else:
        batches: Iterator[tuple[np.ndarray, np.ndarray | None]]
        if args.input.suffix == ".npz":  # sequences of different lengths: padded and masked
            seqs = _sequences(args.input)
            batches = (_pad(seqs[i:i + args.batch_size]) for i in range(0, len(seqs), args.batch_size))
            count, tokens = len(seqs), sum(len(s) for s in seqs)
        else:
            x = np.load(args.input, allow_pickle=False, mmap_mode="r")
            mask = np.load(args.mask, allow_pickle=False, mmap_mode="r") if args.mask else None
            batches = ((np.asarray(x[i:i + args.batch_size]),
                        None if mask is None else np.asarray(mask[i:i + args.batch_size]))
                       for i in range(0, len(x), args.batch_size))
            count, tokens = x.shape[0], x.shape[0] * x.shape[1]
        outs = []
        bar = _bar(math.ceil(count / args.batch_size), not args.quiet)
        for xb, mb in batches:
            outs.append(model(xb, mb))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        y = np.concatenate(outs)
    np.save(args.out, y)
    seconds = time.perf_counter() - t0
    print(f"{count} samples ({tokens:,} tokens) -> {args.out} {y.shape} in {seconds:.2f} s: "
          f"{count / seconds:.1f} samples/s, {tokens / seconds:,.0f} tokens/s")
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
    model = load_params(args.params, cfg) if args.params else Perceiver(cfg)
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

    report = compare(args.golden, args.theirs)
    print(json.dumps(report.to_json(), indent=1) if args.json else report)
    return 0 if report.ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perceiver-np", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="a configuration's summary, shapes, counts, FLOPs, memory")
    _add_config_flags(info)
    info.add_argument("--length", type=int, default=1024, help="N, the input length for FLOPs and memory")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a model on an .npz dataset")
    _add_config_flags(train)
    train.add_argument("--data", type=Path, required=True, help=".npz with x [S, N, C], y, optional mask")
    train.add_argument("--eval-data", type=Path, help="held-out .npz, evaluated after every epoch")
    train.add_argument("--loss", choices=("cross_entropy", "mse"), default="cross_entropy")
    train.add_argument("--label-smoothing", type=float, default=0.0)
    train.add_argument("--optimizer", choices=("adamw", "lamb", "sgd"), default="adamw")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                       help="cosine: linear warmup then half cosine to 0")
    train.add_argument("--warmup", type=float, default=0.1, help="warmup as a fraction of all steps")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    train.add_argument("--nesterov", action="store_true", help="SGD only")
    train.add_argument("--clip-norm", type=float, default=1.0, help="global gradient norm limit")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--patience", type=int, help="stop after this many epochs without a better eval loss")
    train.add_argument("--out", type=Path, default=Path("checkpoint.npz"),
                       help="checkpoint, written after every epoch")
    train.add_argument("--log", type=Path, help="JSON-lines metrics log")
    train.add_argument("--resume", action="store_true", help="continue from --out bit-identically")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="loss and accuracy of a checkpoint on an .npz dataset")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--loss", choices=("cross_entropy", "mse"), default="cross_entropy")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="run a checkpoint on x.npy, write y.npy")
    pr.add_argument("--checkpoint", type=Path, required=True)
    pr.add_argument("--input", type=Path, required=True,
                    help=".npy [S, N, C] (memory-mapped), or .npz of sequences [n_i, C] of any lengths "
                         "(padded and masked automatically)")
    pr.add_argument("--mask", type=Path, help=".npy bool [S, N], True = keep")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--stream", action="store_true",
                    help="stream one long input through the encoder chunk by chunk (any N, bounded memory)")
    pr.add_argument("--chunk-size", type=int, default=16384,
                    help="positions per chunk with --stream (read into one reused buffer)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_predict)

    gc = sub.add_parser("gradcheck", help="finite-difference check of a configuration, in float64")
    _add_config_flags(gc)
    gc.add_argument("--length", type=int, default=4, help="N")
    gc.add_argument("--batch", type=int, default=2, help="B")
    gc.add_argument("--entries", type=int, default=4, help="entries checked per tensor")
    gc.set_defaults(func=cmd_gradcheck)

    go = sub.add_parser("golden", help="write a golden file: params, inputs, every activation and "
                        "gradient in float64 (docs/verify.md)")
    go.add_argument("--preset", choices=("edifice", "deepmind", "hf"),
                    help="start from a preset; flags given other values override it")
    _add_config_flags(go)
    go.add_argument("--params", type=Path,
                    help=".npz or .safetensors keyed by our schema: weights trained elsewhere")
    go.add_argument("--batch", type=int, default=2, help="B")
    go.add_argument("--length", type=int, default=8, help="N")
    go.add_argument("--mask", action="store_true", help="pad the last sample to half its length")
    go.add_argument("--num-queries", type=int, default=4, help="O, for query_source given")
    go.add_argument("--out", type=Path, required=True)
    go.set_defaults(func=cmd_golden)

    cp = sub.add_parser("compare", help="compare another implementation's tensors with a golden "
                        "file; exit 1 when any breaks its tolerance")
    cp.add_argument("golden", type=Path)
    cp.add_argument("theirs", type=Path, help=".npz with act/<name>, grad/<name> (docs/verify.md)")
    cp.add_argument("--json", action="store_true", help="the report as JSON")
    cp.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as err:  # bad options or data: one clear line, no traceback
        print(f"perceiver-np {args.command}: error: {err}", file=sys.stderr)
        return 2
