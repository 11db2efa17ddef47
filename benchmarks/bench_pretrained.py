"""Head-to-head: the published Perceivers, perceiver_np against Hugging Face transformers.

    python benchmarks/bench_pretrained.py            # the three released sizes (make bench)
    python benchmarks/bench_pretrained.py --quick    # one round, the image model made shallow

One forward (inference, B = 1) of each released structure (``pretrained.PUBLISHED``) with
random weights:

- deepmind/vision-perceiver-fourier: pixel values [1, 3, 224, 224];
- deepmind/language-perceiver: 2,048 byte ids and an attention mask of all ones;
- deepmind/optical-flow-perceiver: one frame pair as HF takes it, its 3x3 patches
  [1, 2, 27, 368, 496] (perceiver_np takes the same array).

Both systems run the same weights: a setup process builds the HF class from
``transformers.PerceiverConfig(**config)`` after ``torch.manual_seed(0)`` and writes it with
``save_pretrained`` to a temporary directory; perceiver_np's worker loads that directory with
``pnp.from_pretrained(dir, dtype="float32")`` (after ``pnp.runtime.tune(threads)``), the HF worker
with ``transformers.<Class>.from_pretrained(dir)`` and runs it in PyTorch eager under
``torch.inference_mode()`` with ``torch.set_num_threads(threads)``. Each system lives in a worker
process of its own, fresh for every model, with the same number of threads; after one warm-up
run each (its outputs, written to .npy files, are the ones compared: max |ours - HF| / max |HF|
over the whole output), the driver asks for one run at a time, each system going first in turn
after a settle pause, so each round's ratio (HF time / our time) is paired. Every figure is from
this run:

- the machine's sgemm peak (NumPy float32 4096^3, best of 3) and each system's FLOP/s against it,
  the model's FLOPs counted by :func:`flops` (which the setup process checks against
  ``torch.utils.flop_counter`` on a tiny model of each class, every run);
- peak RSS: each worker's resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs once the model is loaded and the inputs made), so the model, the inputs,
  the activations and the libraries all count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (  # benchmarks/
    WorkerProcess,
    machine,
    paired_times,
    reset_high_water,
    rss_high_water,
    rss_now,
    sgemm_peaks,
    write_page,
)
from bench_model import SETTLE, fmt3, stats  # benchmarks/

ROOT = Path(__file__).resolve().parents[1]
#: The released checkpoints measured, and the input shape of one forward (B = 1).
MODELS: dict[str, tuple[int, ...]] = {
    "deepmind/vision-perceiver-fourier": (1, 3, 224, 224),
    "deepmind/language-perceiver": (1, 2048),
    "deepmind/optical-flow-perceiver": (1, 2, 27, 368, 496),
}
#: ``--quick``: the image model only, with one self-attention layer used once.
QUICK = {"deepmind/vision-perceiver-fourier": {"num_blocks": 1, "num_self_attends_per_block": 1}}
#: Tiny models of each class on which :func:`flops` must equal torch's own count of HF's forward
#: (and perceiver_np's logits HF's): config changes and the input shape.
TINY: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "deepmind/vision-perceiver-fourier": (
        {"num_latents": 4, "d_latents": 16, "num_blocks": 2, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "num_labels": 5}, (1, 3, 8, 12)),
    "deepmind/language-perceiver": (
        {"num_latents": 4, "d_latents": 16, "d_model": 32, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "num_cross_attention_heads": 1, "qk_channels": 8,
         "v_channels": 16, "max_position_embeddings": 24, "vocab_size": 40}, (1, 20)),
    "deepmind/optical-flow-perceiver": (
        {"num_latents": 4, "d_latents": 16, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "train_size": [6, 8]}, (1, 2, 27, 6, 8)),
}


# ---- the FLOPs ------------------------------------------------------------------------------


def _fourier_channels(dims: int, num_bands: int = 64) -> int:
    """HF's Fourier position features with concat_pos and sine and cosine: the positions, then
    sin and cos of every band of every dimension."""
    return dims + 2 * dims * num_bands


def _layer(rows_q: int, rows_kv: int, q_dim: int, kv_dim: int, qk: int, v: int, out: int,
           widening: int) -> int:
    """Multiply-adds of one HF ``PerceiverLayer``: the query, key and value projections, QK^T
    and PV (over all heads: the head count does not change them), the output projection
    [v -> out] and the MLP [q_dim -> widening * q_dim -> q_dim] on every query row."""
    return (rows_q * q_dim * qk + rows_kv * kv_dim * (qk + v) + rows_q * rows_kv * (qk + v)
            + rows_q * v * out + 2 * rows_q * q_dim * widening * q_dim)


def _cross_qk(c: dict[str, Any], q_dim: int, kv_dim: int) -> int:
    """HF's cross-attention width when none is given: the queries' or the keys' channels."""
    return q_dim if c.get("cross_attention_shape_for_attention", "kv") == "q" else kv_dim


def flops(architecture: str, config: dict[str, Any], input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of HF class ``architecture`` with ``config`` (config.json's values)
    on inputs of ``input_shape`` (pixel values [B, 3, H, W], byte ids [B, N] or flow patches
    [B, 2, 27, H, W]): 2 x the multiply-adds of every Linear, convolution and attention product
    (QK^T and PV) of the preprocessor, the encoder (the cross-attention layer once, each of the
    ``num_self_attends_per_block`` self-attention layers ``num_blocks`` times), the decoder and
    the postprocessor (the language model's logits against the embedding table). Element-wise
    work (biases, LayerNorm, GELU, softmax, the Fourier features) is not counted, as
    ``torch.utils.flop_counter`` does not count it."""
    b = input_shape[0]
    m, d = config["num_latents"], config["d_latents"]
    pre = post = 0
    if architecture == "PerceiverForMaskedLM":
        n, c = input_shape[1], config["d_model"]
    elif architecture == "PerceiverForImageClassificationFourier":
        n, c = input_shape[2] * input_shape[3], 3 + _fourier_channels(2)
    elif architecture == "PerceiverForOpticalFlow":
        _, frames, patch, h, w = input_shape
        n, features = h * w, 64  # conv_after_patches: a Linear [frames * 27 -> 64] per pixel
        pre = n * frames * patch * features
        c = features + _fourier_channels(2)
    else:
        raise ValueError(f"architecture: {architecture} is not one this benchmark counts")
    qk = config["qk_channels"] or _cross_qk(config, d, c)
    v = config["v_channels"] or qk
    encoder = _layer(m, n, d, c, qk, v, d, config["cross_attention_widening_factor"])
    qk = config["qk_channels"] or d
    v = config["v_channels"] or qk
    encoder += (config["num_blocks"] * config["num_self_attends_per_block"]
                * _layer(m, m, d, d, qk, v, v, config["self_attention_widening_factor"]))
    if architecture == "PerceiverForMaskedLM":  # every position queried, then the embedding table
        o = config["max_position_embeddings"]
        decoder = _layer(o, m, c, d, 8 * 32, c, c, 1)
        post = o * c * config["vocab_size"]
    elif architecture == "PerceiverForImageClassificationFourier":  # one trainable query
        labels = len(config["id2label"]) if config.get("id2label") else config["num_labels"]
        decoder = _layer(1, m, d, d, _cross_qk(config, d, d), _cross_qk(config, d, d), d, 1) + d * labels
    else:  # optical flow: the preprocessed input queries, a Linear to 2 channels
        qk = _cross_qk(config, c, d)
        decoder = _layer(n, m, c, d, qk, qk, c, 1) + n * c * 2
    return 2 * b * (pre + encoder + decoder + post)


# ---- the workers ----------------------------------------------------------------------------


def make_inputs(shape: tuple[int, ...], vocab: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(inputs, attention mask or None) of ``shape``: byte ids and a mask of ones for [B, N],
    standard normal float32 values otherwise."""
    rng = np.random.default_rng(0)
    if len(shape) == 2:
        return rng.integers(0, vocab, size=shape), np.ones(shape, dtype=np.int64)
    return rng.standard_normal(shape, dtype=np.float32), None


class Ours:
    def __init__(self, threads: int) -> None:
        import perceiver_np as pnp

        # threads, as the CLI; glibc's default malloc, as HF runs (the engine's
        # buffers are its workspace's, docs/fast.md)
        pnp.runtime.tune(threads, keep_memory=False)
        self.pnp = pnp
        self.job: Any = None

    def setup(self, arch: str, directory: str, x: np.ndarray, mask: np.ndarray | None) -> None:
        model = self.pnp.from_pretrained(directory, dtype="float32")
        assert model.architecture == arch
        self.job = lambda: model(x, mask)


class HF:
    def __init__(self, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.torch, self.transformers = torch, transformers
        self.job: Any = None

    def setup(self, arch: str, directory: str, x: np.ndarray, mask: np.ndarray | None) -> None:
        torch = self.torch
        model = getattr(self.transformers, arch).from_pretrained(directory)
        assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
        kwargs = {"inputs": torch.from_numpy(x)}
        if mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(mask)

        def infer() -> np.ndarray:
            with torch.inference_mode():
                return model(**kwargs).logits.numpy()

        self.job = infer


def worker(system: str, threads: int) -> None:
    impl = Ours(threads) if system == "ours" else HF(threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # only the protocol on stdout
    for line in sys.stdin:
        msg = json.loads(line)
        reply: dict[str, Any] = {}
        if msg["cmd"] == "setup":
            impl.job = None
            gc.collect()
            x, mask = make_inputs(tuple(msg["shape"]), msg["vocab"])
            impl.setup(msg["arch"], msg["dir"], x, mask)
            reset_high_water()  # the high-water mark starts here: model loaded, inputs made
            reply = {"rss": rss_now()}
        elif msg["cmd"] == "run":
            t0 = time.perf_counter()
            y = np.asarray(impl.job())
            reply = {"time": time.perf_counter() - t0}
            if msg.get("save"):
                np.save(msg["save"], y)
        elif msg["cmd"] == "peak":
            reply = {"peak": rss_high_water()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def prepare(spec: dict[str, Any]) -> None:
    """The setup process: check :func:`flops` (and our logits) on a tiny model of each class,
    then write each model measured with random weights: ``save_pretrained`` of the HF class built
    after ``torch.manual_seed(0)``."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from perceiver_np import pretrained

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def build(arch: str, cfg: dict[str, Any]) -> Any:
        torch.manual_seed(0)
        return getattr(transformers, arch)(transformers.PerceiverConfig(
            **{k: v for k, v in cfg.items() if k != "architectures"})).eval()

    for name, (changes, shape) in TINY.items():
        arch, cfg = pretrained.published_config(name)
        cfg = {**cfg, **changes}
        hf = build(arch, cfg)
        x, mask = make_inputs(shape, cfg["vocab_size"])
        kwargs = {"inputs": torch.from_numpy(x)}
        if mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(mask)
        counter = FlopCounterMode(display=False)
        with counter:  # with autograd on: the counter's module hooks refuse no_grad's outputs
            want = hf(**kwargs).logits.detach().numpy()
        counted, ours = counter.get_total_flops(), flops(arch, cfg, shape)
        assert ours == counted, f"{name} (tiny): flops() {ours:,} != torch's count {counted:,}"
        got = pretrained.from_hf(hf, dtype="float32")(x, mask)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        assert rel <= 1e-4, f"{name} (tiny): our logits differ from HF's by {rel:.1e} (relative)"
        print(f"  {name} (tiny, {shape}): flops() = torch's count = {counted:,}; "
              f"logits agree to {rel:.1e}", flush=True)
    for name, directory in spec["dirs"].items():
        hf = build(pretrained.published_config(name)[0], spec["configs"][name])
        hf.save_pretrained(directory)
        del hf
        gc.collect()


# ---- the driver -----------------------------------------------------------------------------


def Worker(system: str, threads: int) -> WorkerProcess:
    return WorkerProcess(__file__, [system, "--threads", str(threads)], {"HF_HUB_OFFLINE": "1"})


def run_model(name: str, arch: str, cfg: dict[str, Any], directory: str, shape: tuple[int, ...],
              threads: int, rounds: int, peak: float) -> dict[str, Any]:
    workers = {k: Worker(k, threads) for k in ("ours", "hf")}  # fresh per model
    try:
        rss = {k: w.ask(cmd="setup", arch=arch, dir=directory, shape=shape, vocab=cfg["vocab_size"])["rss"]
               for k, w in workers.items()}
        first = {k: w.ask(cmd="run", save=f"{directory}/out_{k}.npy")["time"] for k, w in workers.items()}
        y = {k: np.load(f"{directory}/out_{k}.npy") for k in workers}
        agree = float(np.max(np.abs(y["ours"] - y["hf"])) / max(float(np.max(np.abs(y["hf"]))), 1e-30))
        times = paired_times(workers, rounds, SETTLE)
        peaks = {k: w.ask(cmd="peak")["peak"] for k, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    count = flops(arch, cfg, shape)
    ratios = [h / o for h, o in zip(times["hf"], times["ours"], strict=True)]
    row = {"name": name, "arch": arch, "shape": list(shape), "times": times, "first": first,
           "ratios": ratios, "peak": peaks, "rss_before": rss, "agree": agree, "flops": count,
           "fraction": {k: count / float(np.median(v)) / (peak * 1e9) for k, v in times.items()}}
    print(f"  {name} {list(shape)}: ours {fmt3(stats(times['ours']), 1e3, 0)} ms, HF "
          f"{fmt3(stats(times['hf']), 1e3, 0)} ms, ratio {fmt3(stats(ratios))}, outputs agree "
          f"{agree:.1e}", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | input | GFLOP | ours ms | HF ms | ratio HF/ours | ours % peak | HF % peak "
            "| peak RSS MB ours / HF | HF − ours MB | outputs agree |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        po, ph = r["peak"]["ours"] / 2**20, r["peak"]["hf"] / 2**20
        out.append(
            f"| {r['name']} | {' x '.join(map(str, r['shape']))} | {r['flops'] / 1e9:,.0f} "
            f"| {fmt3(stats(r['times']['ours']), 1e3, 0)} | {fmt3(stats(r['times']['hf']), 1e3, 0)} "
            f"| {fmt3(stats(r['ratios']))} | {100 * r['fraction']['ours']:.0f}% "
            f"| {100 * r['fraction']['hf']:.0f}% | {po:,.0f} / {ph:,.0f} | {ph - po:,.0f} "
            f"| {r['agree']:.1e} |"
        )
    return "\n".join(out)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    out = []
    for r in rows:
        lo, med, hi = stats(r["ratios"])
        out.append(f"{r['name']}: ours >= 1.0x HF: median {med:.2f}x ({lo:.2f}–{hi:.2f}) -> "
                   f"{verdict(med >= 1.0)}")
    for r in rows:
        po, ph = r["peak"]["ours"] / 2**20, r["peak"]["hf"] / 2**20
        out.append(f"{r['name']}: our peak RSS below HF's: {po:,.0f} MB against {ph:,.0f} MB -> "
                   f"{verdict(po < ph)}")
    return out


def write_markdown(path: Path, text: str) -> None:
    write_page(path, "# Performance: the published Perceivers against Hugging Face transformers\n\n```sh\n"
               "make bench-pretrained   # benchmarks/bench_pretrained.py --markdown "
               "docs/performance-pretrained.md\n```\n\nWritten by that command (the method is in the "
               "script's docstring). The seed model against PyTorch: [performance.md](performance.md). "
               "One run on this machine:\n\n", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 round, vision-perceiver-fourier only, 1 self-attention layer used once")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads)
        return 0
    sys.path.insert(0, str(ROOT))
    if args.prepare:
        prepare(json.loads(args.prepare))
        return 0
    from perceiver_np.pretrained import published_config

    names = list(QUICK) if args.quick else [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {list(MODELS)}")
    rounds = 1 if args.quick else args.rounds
    configs = {n: {**published_config(n)[1], **(QUICK[n] if args.quick else {})} for n in names}
    info = machine(args.threads)
    peak = sgemm_peaks(args.threads)["OpenBLAS (NumPy)"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {n: str(Path(tmp) / n.replace("/", "--")) for n in names}
        print("setup: flops() against torch's count on tiny models; random weights written", flush=True)
        spec = json.dumps({"dirs": dirs, "configs": configs})
        subprocess.run([sys.executable, __file__, "--prepare", spec], check=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for n in names:
            arch = published_config(n)[0]
            rows.append(run_model(n, arch, configs[n], dirs[n], MODELS[n], args.threads, rounds, peak))
            for f in Path(dirs[n]).iterdir():  # the weights are not needed any more
                f.unlink()
    structure = ("--quick: the image model's released structure (`pretrained.PUBLISHED`) cut to "
                 "num_blocks 1 and num_self_attends_per_block 1" if args.quick
                 else "the released structures (`pretrained.PUBLISHED`)")
    report = [
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"- sgemm peak (NumPy float32 4096^3, best of 3, this run): {peak:.0f} GFLOP/s",
        f"- {structure}, random weights (HF's initialisation after "
        "`torch.manual_seed(0)`, saved with `save_pretrained` and loaded by both), fp32, B = 1, one "
        f"forward; {rounds} paired round(s) per model after a warm-up, fresh worker processes per model; "
        "times median (min–max); ratio = HF time / our time per round, median (min–max); % peak = "
        "the model's FLOPs (`flops()` of the script: 2 x the multiply-adds of every Linear, "
        "convolution, QK^T and PV, equal to torch.utils.flop_counter's count on tiny models of each "
        "class) / median time / sgemm peak; peak RSS = each worker's high-water mark from the "
        "loaded model and inputs on (the model, the inputs, the activations and the libraries "
        "count); outputs agree = max |ours - HF| / max |HF| over the whole output of the warm-up "
        "run (HF computes the Fourier positions in float32, ours exactly: docs/pretrained.md)",
        "",
        table(rows),
        "",
        "Targets, as this run measured them:",
        "",
        *("- " + t for t in targets(rows)),
    ]
    text = "\n".join(report)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    if args.json:
        args.json.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
