"""``make demo``: train a Perceiver IO classifier from scratch on a CPU, then show the IO part.

1. scikit-learn's bundled 8x8 digits (1,797 images, nothing downloaded), each image a sequence
   of 64 pixels with 2-D Fourier position features, classified by a Perceiver IO with a
   classification decoder; trained with AdamW, warmup + cosine, label smoothing and
   global-norm clipping; evaluated on 360 held-out images. Writes the checkpoint, a JSON-lines
   log and (with matplotlib) the training curve and the attention maps of a few latents over
   a test digit (perceiver_np.viz).
2. Many output queries: a signal sampled at 48 random, noisy points is decoded at 256 query
   positions (Fourier features of the positions as the queries) and compared with the clean
   signal there.

The last line printed is ``test accuracy: <value>`` of task 1.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from . import optim, position
from .model import Perceiver, build
from .train import Loss, evaluate, fit


def digits_task(out_dir: Path, epochs: int, seed: int, progress: bool) -> float:
    from sklearn.datasets import load_digits  # the demo extra: its data ships in the wheel

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]  # [S, 8, 8, 1], in [0, 1]
    x = position.image_to_inputs(images, num_bands=8)  # [S, 8, 8, 1] -> [S, 64, 1 + 34]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test_idx, train_idx = order[:360], order[360:]
    train = {"x": x[train_idx], "y": y[train_idx]}
    test = {"x": x[test_idx], "y": y[test_idx]}

    model = build(input_dim=x.shape[-1], latent_dim=64, num_latents=16, num_layers=2, num_heads=4,
                  dropout=0.0, decoder="classification", output_dim=10, seed=seed)
    batch_size = 64
    steps = epochs * math.ceil(len(train_idx) / batch_size)
    optimizer = optim.adamw(optim.warmup_cosine(2e-3, steps // 10, steps), weight_decay=0.01)
    print(f"digits: {len(train_idx)} training and {len(test_idx)} test images as sequences of "
          f"{x.shape[1]} pixels x {x.shape[2]} channels; {model.param_count:,} parameters")
    log = out_dir / "digits.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    state, history = fit(
        model, optimizer, Loss("cross_entropy", label_smoothing=0.1), train,
        epochs=epochs, batch_size=batch_size, eval_data=test, seed=seed, clip_norm=1.0,
        log_path=log, checkpoint_path=out_dir / "digits.npz", progress=progress,
    )
    print(f"trained {state.step} steps in {time.perf_counter() - t0:.1f} s; "
          f"checkpoint {out_dir / 'digits.npz'}, log {log}")
    _plot(history.rows, out_dir / "digits_curve.png")
    first = test_idx[0]
    _attention(model.with_params(state.params), x[first:first + 1], images[first, :, :, 0], int(y[first]),
               out_dir / "digits_attention.png")
    return float(evaluate(model, state.params, test, Loss("cross_entropy"))["accuracy"])


def signal_task(seed: int, progress: bool) -> None:
    """Decode a 1-D signal at 256 query positions from 48 noisy samples (Perceiver IO)."""
    rng = np.random.default_rng(seed)
    n_in, n_out, count = 48, 256, 1024

    def signals(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        freq = rng.uniform(0.5, 3.0, size=(k, 2, 1))
        phase = rng.uniform(0, 2 * np.pi, size=(k, 2, 1))
        amp = rng.uniform(0.3, 1.0, size=(k, 2, 1))

        def f(t: np.ndarray) -> np.ndarray:
            return (amp * np.sin(np.pi * freq * t[:, None, :] + phase)).sum(axis=1)  # [k, n]

        t_in = np.sort(rng.uniform(-1, 1, size=(k, n_in)), axis=1)
        t_out = np.broadcast_to(np.linspace(-1, 1, n_out), (k, n_out))
        return t_in, f(t_in) + 0.1 * rng.standard_normal((k, n_in)), t_out, f(t_out)

    def inputs(t_in: np.ndarray, v_in: np.ndarray) -> np.ndarray:
        return position.points_to_inputs(v_in[..., None].astype(np.float32), t_in[..., None],
                                         num_bands=16, max_resolution=(n_out,))

    t_in, v_in, _, v_out = signals(count)
    model = build(input_dim=inputs(t_in[:1], v_in[:1]).shape[-1], latent_dim=64, num_latents=16,
                  num_layers=2, num_heads=4, dropout=0.0, decoder="query", output_dim=1,
                  query_source="fourier", output_index_dims=(n_out,), query_num_bands=16,
                  decoder_heads=1, seed=seed)
    train = {"x": inputs(t_in, v_in), "y": v_out[..., None].astype(np.float32)}
    t_in, v_in, _, v_out = signals(128)
    test = {"x": inputs(t_in, v_in), "y": v_out[..., None].astype(np.float32)}
    epochs, batch_size = 12, 32
    steps = epochs * math.ceil(count / batch_size)
    optimizer = optim.adamw(optim.warmup_cosine(2e-3, steps // 10, steps), weight_decay=0.0)
    print(f"\nsignal: {n_in} noisy samples in, {n_out} output queries out "
          f"(Fourier features of the query positions); {model.param_count:,} parameters")
    t0 = time.perf_counter()
    state, _ = fit(model, optimizer, Loss("mse"), train, epochs=epochs, batch_size=batch_size,
                   seed=seed, clip_norm=1.0, progress=progress)
    mse = evaluate(model, state.params, test, Loss("mse"))["loss"]
    print(f"signal: held-out MSE at the {n_out} query positions {mse:.4f} (signal variance "
          f"{float(np.var(test['y'])):.4f}) after {time.perf_counter() - t0:.1f} s")


def _plot(rows: list[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no training curve; pip install -e '.[bench]')")
        return
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax[0].plot(epochs, [r["eval_loss"] for r in rows], label="test")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("cross-entropy (label smoothing 0.1 in training)")
    ax[0].legend()
    ax[1].plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    ax[1].plot(epochs, [r["eval_accuracy"] for r in rows], label="test")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("accuracy")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"training curve {path}")


def _attention(model: Perceiver, x: np.ndarray, image: np.ndarray, label: int, path: Path) -> None:
    """The cross-attention of latents 0-3 in every head over one test digit x [1, 64, C], drawn
    over its 8 x 8 pixels ``image``."""
    from .viz import attention_maps, draw_attention_maps

    latents = [0, 1, 2, 3]
    maps = attention_maps(model, x, latents=latents)  # [1, H, 4, 64]
    try:
        draw_attention_maps(maps[0], path=path, image=image, latents=latents,
                            title=f"which pixels of a test digit ({label}) latents 0-3 read")
    except ImportError:
        print("(matplotlib is not installed: no attention maps; pip install -e '.[demo]')")
        return
    print(f"attention maps {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="where outputs go")
    parser.add_argument("--epochs", type=int, default=30, help="digits training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    signal_task(args.seed, not args.no_progress)
    accuracy = digits_task(args.out, args.epochs, args.seed, not args.no_progress)
    print(f"test accuracy: {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
