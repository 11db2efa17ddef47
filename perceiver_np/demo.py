"""``make demo`` / ``python -m perceiver_np.demo``: the seed model, its summary, a forward pass
on a random batch, and the whole-model gradient check in float64."""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import build
from .gradcheck import check_model
from .tolerances import GRADCHECK_RTOL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input-dim", type=int, default=287)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=16, help="input length N")
    parser.add_argument("--entries", type=int, default=3,
                        help="entries per tensor in the gradient check (sampled, seeded)")
    args = parser.parse_args(argv)

    model = build(input_dim=args.input_dim)
    print(model.summary())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.length, args.input_dim)).astype(np.float32)
    mask = np.ones((args.batch, args.length), dtype=bool)
    mask[-1, args.length // 2:] = False  # the last sample is padded to half its length
    t0 = time.perf_counter()
    y = model(x, mask)
    ms = 1e3 * (time.perf_counter() - t0)
    print(f"\nforward (float32): x {x.shape} with mask -> y {y.shape}, {ms:.1f} ms; "
          f"y[0, :4] = {np.array2string(y[0, :4], precision=4)}")

    ref = build(input_dim=args.input_dim, dtype="float64", dropout=model.config.dropout)
    print(f"\ngradient check (float64, training with dropout {ref.config.dropout}, "
          f"{args.entries} sampled entries of each of {len(ref.params) + 1} tensors, x included):")
    t0 = time.perf_counter()
    report = check_model(ref, x.astype(np.float64), mask, training=True, max_entries=args.entries)
    print(report)
    ok = report.max_rel_error <= GRADCHECK_RTOL
    print(f"worst relative error {report.max_rel_error:.2e} (bar {GRADCHECK_RTOL:.0e}): "
          f"{'PASS' if ok else 'FAIL'} in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
