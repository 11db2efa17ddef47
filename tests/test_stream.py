"""The streaming encoder equals the one-shot forward, chunk by chunk, in bounded memory."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.tolerances import FLOAT64_RTOL, float32_forward_rtol

from .helpers import random_model

CASES = {
    "seed-small": {},
    "two-cross-shared": {"num_cross_layers": 2, "num_layers": 3, "num_blocks": 2},
    "raw-input": {"input_projection": False, "cross_heads": 1, "gelu": "tanh"},
    "classification": {"decoder": "classification", "output_dim": 3},
    "query-decoder": {"decoder": "query", "output_dim": 2, "num_outputs": 6},
}


_model = random_model


@pytest.mark.parametrize("case", list(CASES))
def test_stream_equals_forward(rng, case):
    model = _model(rng, **CASES[case])
    x = rng.normal(size=(3, 37, 5))
    mask = rng.random((3, 37)) < 0.7
    mask[1] = False  # a sample with no visible input
    want = model(x, mask)
    for chunk in (1, 5, 37, 100):
        got = model.encode_stream(x, mask, chunk_size=chunk)
        assert np.abs(got - want).max() <= FLOAT64_RTOL * np.abs(want).max(), chunk
    # an iterable of chunks of varying length, for a model with one cross block
    if model.config.num_cross_layers == 1:
        cuts = [0, 3, 4, 20, 37]
        got = model.encode_stream((x[:, a:b] for a, b in itertools.pairwise(cuts)),
                                  (mask[:, a:b] for a, b in itertools.pairwise(cuts)))
        assert np.abs(got - want).max() <= FLOAT64_RTOL * np.abs(want).max()


def test_stream_float32_within_float32_rounding(rng):
    m64 = _model(rng)
    m32 = pnp.Perceiver(m64.config.replace(dtype="float32"),
                        {k: v.astype(np.float32) for k, v in m64.params.items()})
    x = rng.normal(size=(2, 500, 5))
    want = m64(x)
    got = m32.encode_stream(x.astype(np.float32), chunk_size=64)
    assert np.abs(got - want).max() / np.abs(want).max() <= float32_forward_rtol(30, 500)


def test_stream_errors(rng):
    two = _model(rng, num_cross_layers=2, num_layers=2)
    x = rng.normal(size=(2, 8, 5))
    with pytest.raises(ValueError, match="an iterator can be streamed once"):
        two.encode_stream(iter([x]))
    assert two.encode_stream(lambda: iter([x[:, :3], x[:, 3:]])).shape == (2, 8)
    with pytest.raises(ValueError, match="the input is empty"):
        _model(rng).encode_stream(iter([]))
    with pytest.raises(ValueError, match=r"chunk: expected shape \[B, n, C\]"):
        _model(rng).encode_stream(iter([x, x[:1]]))
    with pytest.raises(ValueError, match="fewer mask chunks than input chunks"):
        _model(rng).encode_stream(iter([x[:, :3], x[:, 3:]]), iter([np.ones((2, 3), bool)]))
    with pytest.raises(ValueError, match="masked_rows"):
        _model(rng, masked_rows="uniform").encode_stream(x)


def test_streaming_memory_does_not_grow_with_n(tmp_path):
    # peak resident memory of streaming a memory-mapped input, at N and 4N: about equal
    script = textwrap.dedent("""
        import resource, sys, numpy as np, perceiver_np as pnp
        n = int(sys.argv[1])
        x = np.lib.format.open_memmap(sys.argv[2], mode="w+", dtype=np.float32, shape=(1, n, 64))
        for i in range(0, n, 1 << 16):
            x[:, i:i + (1 << 16)] = np.random.default_rng(i).standard_normal((1, min(1 << 16, n - i), 64))
        x.flush(); del x
        model = pnp.build(input_dim=64, latent_dim=64, num_latents=32, num_heads=4, num_layers=1)
        model.encode_stream(np.load(sys.argv[2], mmap_mode="r")[:, :1000], chunk_size=1 << 14)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model.encode_stream(np.load(sys.argv[2], mmap_mode="r"), chunk_size=1 << 14)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    extra = {}
    for n in (1 << 18, 1 << 20):
        out = subprocess.run([sys.executable, "-c", script, str(n), str(tmp_path / f"x{n}.npy")],
                             capture_output=True, text=True, check=True)
        extra[n] = int(out.stdout)
    input_bytes = (1 << 20) * 64 * 4  # 256 MiB at the larger N
    # the file's pages count as resident while read; what the encoder allocates must not grow
    assert extra[1 << 20] - extra[1 << 18] < input_bytes / 2, extra
