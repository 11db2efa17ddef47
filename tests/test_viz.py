"""Attention maps (perceiver_np.viz, perceiver-np attention): equal to the plain path's recorded
probabilities, computed from the log-sum-exp without holding M x N, drawn as PNGs."""

from __future__ import annotations

import sys
import tracemalloc

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import engine, viz
from perceiver_np.checkpoint import save_checkpoint
from perceiver_np.cli import main as cli
from perceiver_np.model import step_names
from perceiver_np.tolerances import ATTENTION_MAPS_FLOAT64_ATOL, float32_forward_rtol

from .helpers import random_model

PNG = b"\x89PNG\r\n\x1a\n"

CASES = {
    "one-cross": {},
    "two-cross": {"num_cross_layers": 2, "num_layers": 2},
    "cross-used-twice": {"block_order": (("cross", 0), ("self", 0), ("cross", 0), ("self", 1))},
    "shared-self-blocks": {"num_cross_layers": 2, "num_layers": 3, "num_blocks": 2},
    "uniform-rows": {"masked_rows": "uniform", "num_cross_layers": 2, "num_layers": 2},
    "raw-input-positions": {"input_projection": False, "input_fourier": "lucidrains",
                            "input_index_dims": (29,), "cross_heads": 1},
    "no-qkv-bias-geglu": {"qkv_bias": False, "ffn_kind": "geglu", "num_heads": 4, "latent_dim": 16},
}


def _inputs(rng, b=3, n=29):
    x = rng.normal(size=(b, n, 5))
    mask = rng.random((b, n)) < 0.7
    mask[1] = False  # a sample with no visible input
    return x, mask


def _cross_steps(cfg):
    """(block, use, recorded name) of every cross step of the schedule."""
    names, seen, out = step_names(cfg), {}, []
    for (kind, i), name in zip(cfg.schedule, names, strict=True):
        if kind == "cross":
            out.append((i, seen.get(i, 0), name))
            seen[i] = seen.get(i, 0) + 1
    return out


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", list(CASES))
def test_maps_equal_the_recorded_probabilities(rng, case, backend, monkeypatch):
    plain = random_model(rng, num_latents=5, backend="numpy", **CASES[case])
    cfg = plain.config
    if backend == "numba" and cfg.masked_rows != "zero":
        backend = "auto"  # the kernel for the cross-attention's lse; "numba" refuses uniform rows
    model = pnp.Perceiver(cfg.replace(backend=backend), plain.params)
    x, mask = _inputs(rng)
    record: dict[str, np.ndarray] = {}
    plain.forward(x, mask, record=record)
    steps = _cross_steps(cfg)
    assert len(steps) == (2 if case in ("two-cross", "cross-used-twice", "shared-self-blocks",
                                        "uniform-rows") else 1)
    heads = cfg.cross_num_heads
    chosen_heads = [heads - 1, 0] if heads > 1 else [0]
    for rows in (None, 3):  # the engine's chunks: all positions at once, and 3 positions a chunk
        if rows is not None:
            monkeypatch.setattr(engine, "CHUNK_ROWS", rows * x.shape[0])
        for block, use, name in steps:
            want = record[f"{name}.attn.probs"]  # [B, H, M, N]
            got = viz.attention_maps(model, x, mask, block=block, use=use)
            assert got.shape == want.shape and got.dtype == np.float64
            assert np.abs(got - want).max() <= ATTENTION_MAPS_FLOAT64_ATOL, (name, rows)
            some = viz.attention_maps(model, x, mask, latents=[4, 0, 2], heads=chosen_heads,
                                      block=block, use=use)
            assert some.shape == (3, len(chosen_heads), 3, x.shape[1])
            assert np.abs(some - want[:, chosen_heads][:, :, [4, 0, 2]]).max() <= ATTENTION_MAPS_FLOAT64_ATOL
            # masked keys exactly 0; the sample with no visible key as the forward has it
            seen = np.delete(got, 1, axis=0)
            assert np.all(seen[np.broadcast_to(~np.delete(mask, 1, axis=0)[:, None, None], seen.shape)] == 0)
            blind = 0.0 if cfg.masked_rows == "zero" else 1.0 / x.shape[1]
            assert np.all(got[1] == blind) and np.all(want[1] == blind)


def test_maps_without_a_mask_and_of_one_latent(rng):
    model = random_model(rng, backend="numpy")
    x = rng.normal(size=(2, 11, 5))
    record: dict[str, np.ndarray] = {}
    model.forward(x, record=record)
    want = record["cross.0.attn.probs"]
    got = viz.attention_maps(model, x, latents=1, heads=np.array([1]))
    assert got.shape == (2, 1, 1, 11)
    assert np.abs(got - want[:, 1:, 1:2]).max() <= ATTENTION_MAPS_FLOAT64_ATOL
    assert np.all(got > 0)  # every key visible


def test_float32_maps_within_float32_rounding(rng):
    m64 = random_model(rng, num_latents=5)
    m32 = pnp.Perceiver(m64.config.replace(dtype="float32"),
                        {k: v.astype(np.float32) for k, v in m64.params.items()})
    x, mask = _inputs(rng, n=300)
    want = viz.attention_maps(m64, x, mask)
    got = viz.attention_maps(m32, x.astype(np.float32), mask)
    assert got.dtype == np.float32
    # the chain to a weight: input projection, LN_kv, key and query projections (with LN_q),
    # the score, exp(s - lse) and lse's sum over N keys
    assert np.abs(got - want).max() / np.abs(want).max() <= float32_forward_rtol(7, 300)


def test_a_million_positions_without_m_by_n(rng):
    n, latents = 1 << 20, [0, 31, 63]
    opts = dict(input_dim=2, latent_dim=8, num_latents=64, num_layers=1, num_heads=2, dropout=0.0,
                dtype="float64")
    x = rng.normal(size=(1, n, 2))
    mask = rng.random((1, n)) < 0.9
    maps = {}
    for backend in ("numpy", "numba"):
        model = pnp.build(**opts, backend=backend)
        viz.attention_maps(model, x[:, :300], mask[:, :300], latents=latents, heads=[1])  # compiled
        tracemalloc.start()  # numpy's allocations are traced (the kernels' own scratch is not)
        try:
            maps[backend] = viz.attention_maps(model, x, mask, latents=latents, heads=[1])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        requested = maps[backend].nbytes  # [1, 1, 3, N] float64: 24 MiB
        # chunk-sized buffers: projections, LayerNorm steps, keys, scores of one chunk, each at
        # most [chunk, 8] float64; the measured peak holds about 7 of them (numpy backend)
        chunk_buffers = 16 * engine.chunk_positions(1) * 8 * 8
        m_by_n = opts["num_latents"] * n * 8  # 512 MiB; the plain path's P is H times that
        assert peak <= requested + chunk_buffers, (backend, peak)
        assert requested + chunk_buffers < m_by_n / 10
        rows = maps[backend][0, 0]  # [3, N]
        assert np.all(rows[:, ~mask[0]] == 0)
        assert np.abs(rows.sum(axis=-1) - 1).max() <= ATTENTION_MAPS_FLOAT64_ATOL
    # two implementations of lse (the kernel's and its plain twin's) give the same maps
    assert np.abs(maps["numba"] - maps["numpy"]).max() <= ATTENTION_MAPS_FLOAT64_ATOL


def test_bad_arguments_are_named(rng):
    model = random_model(rng, num_cross_layers=2, num_layers=2)
    x, mask = _inputs(rng, n=6)
    cases = [
        (dict(latents=[0, 3]), ValueError,
         r"latents: expected an integer in \[0, 3\) \(num_latents: 3\), got 3"),
        (dict(latents=[]), ValueError, "latents: expected at least one index"),
        (dict(latents=True), ValueError, "latents: expected an integer or a sequence"),
        (dict(latents="0,1"), ValueError, "latents: expected an integer or a sequence"),
        (dict(heads=[2]), ValueError, r"heads: expected an integer in \[0, 2\)"),
        (dict(heads=[0.5]), ValueError, "heads: expected an integer in"),
        (dict(block=2), ValueError, r"block: expected an integer in \[0, 2\) \(num_cross_layers: 2\), got 2"),
        (dict(use=1), ValueError, r"use: expected an integer in \[0, 1\) \(the uses of cross block 0"),
        (dict(mask=mask.astype(int)), TypeError, "mask: expected dtype bool"),
        (dict(mask=mask[:, :5]), ValueError, r"mask: expected shape \[B, N\]"),
        (dict(x=x[..., :4]), ValueError, r"x: expected shape \[B, N, C\]"),
        (dict(x=x[0]), ValueError, r"x: expected shape \[B, N, C\] with C = 5"),
        (dict(x=x.astype(complex)), TypeError, "x: expected real-valued numbers"),
    ]
    for change, error, message in cases:
        args = {"x": x, "mask": mask, **change}
        with pytest.raises(error, match=message):
            viz.attention_maps(model, args.pop("x"), args.pop("mask"), **args)
    with pytest.raises(TypeError, match=r"model: expected a perceiver_np\.Perceiver, got dict"):
        viz.attention_maps({}, x)


# ---- drawing ---------------------------------------------------------------------------------------


def test_draws_a_sequence_and_an_image(rng, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing is optional (the bench and demo extras install it)")
    model = random_model(rng, num_latents=4, num_heads=2)
    x = rng.normal(size=(1, 64, 5))
    maps = viz.attention_maps(model, x, latents=[3, 1, 0])[0]  # [2, 3, 64]
    fig = viz.draw_attention_maps(maps, path=tmp_path / "seq.png", latents=[3, 1, 0])
    assert (tmp_path / "seq.png").read_bytes()[:8] == PNG
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"latent {i}, head {h}" for i in (3, 1, 0) for h in (0, 1)]
    image = rng.random((8, 8))
    fig = viz.draw_attention_maps(maps, path=tmp_path / "img.png", image=image, title="a digit")
    assert (tmp_path / "img.png").read_bytes()[:8] == PNG
    assert len([ax for ax in fig.axes if ax.get_title()]) == 6
    assert viz.draw_attention_maps(maps, image_shape=(4, 16)) is not None  # no path: nothing written
    long = np.full((1, 1, 10_000), 1e-4)
    long[0, 0, 1234] = 0.5  # one peak among more positions than MAX_LINE_POINTS
    fig = viz.draw_attention_maps(long)
    line = fig.axes[0].get_lines()[0]
    assert len(line.get_xdata()) <= viz.MAX_LINE_POINTS and line.get_ydata().max() == 0.5


def test_drawing_refuses_bad_shapes(rng, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing is optional (the bench and demo extras install it)")
    maps = rng.random((2, 3, 12))
    cases = [
        (dict(maps=maps[None]), r"maps: expected one sample's float maps \[heads, latents, N\]"),
        (dict(image_shape=(3, 5)), r"image_shape: expected \(H, W\) with H \* W = N = 12, got \(3, 5\)"),
        (dict(image=np.zeros((3, 4, 2))), r"image: expected \[H, W\] or \[H, W, 3\]"),
        (dict(image=np.zeros((4, 3)), image_shape=(3, 4)), r"image: expected \(3, 4\) pixels"),
        (dict(latents=[0, 1]), "latents: expected 3 labels"),
    ]
    for change, message in cases:
        args = {"maps": maps, **change}
        with pytest.raises(ValueError, match=message):
            viz.draw_attention_maps(args.pop("maps"), path=tmp_path / "a.png", **args)
    assert not (tmp_path / "a.png").exists()


def test_drawing_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="drawing attention maps needs matplotlib, which is not installed"):
        viz.draw_attention_maps(np.ones((1, 1, 4)) / 4, path=tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


# ---- the command -----------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, rng):
    order = (("cross", 0), ("self", 0), ("cross", 0), ("self", 1))
    model = random_model(rng, num_latents=4, block_order=order)
    save_checkpoint(tmp_path / "ck.npz", config=model.config.replace(dtype="float32"),
                    params={k: v.astype(np.float32) for k, v in model.params.items()})
    x = rng.normal(size=(3, 16, 5)).astype(np.float32)
    mask = np.ones((3, 16), dtype=bool)
    mask[2, 10:] = False
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "m.npy", mask)
    np.save(tmp_path / "img.npy", rng.random((4, 4, 3)))
    np.save(tmp_path / "m_int.npy", mask.astype(np.int64))
    x[1, 3, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    return model, x, mask, tmp_path


def test_the_command_writes_a_png(files, capsys):
    pytest.importorskip("matplotlib", reason="drawing is optional (the bench and demo extras install it)")
    _, _, _, d = files
    base = ["attention", d / "ck.npz", "--x", d / "x.npy"]
    for more in ([], ["--mask", d / "m.npy", "--sample", "2", "--latents", "3,1", "--heads", "1",
                      "--use", "1", "--image-shape", "4", "4"],
                 ["--image", d / "img.npy", "--latents", "0"]):
        out = d / "attention.png"
        out.unlink(missing_ok=True)
        capsys.readouterr()
        assert cli([str(a) for a in [*base, *more, "--out", out]]) == 0, more
        assert out.read_bytes()[:8] == PNG
        printed = capsys.readouterr().out
        assert printed.startswith(f"{out}: cross.0.use") and "over 16 positions" in printed


def test_the_command_names_bad_flags(files, capsys):
    pytest.importorskip("matplotlib", reason="drawing is optional (the bench and demo extras install it)")
    _, _, _, d = files
    out = d / "attention.png"
    base = ["attention", d / "ck.npz", "--x", d / "x.npy", "--out", out]
    cases = [
        (["--latents", "0,4"], "--latents: expected an integer in [0, 4)"),
        (["--latents", "a,b"], "--latents: expected comma-separated integers >= 0"),
        (["--heads", "2"], "--heads: expected an integer in [0, 2)"),
        (["--block", "1"], "--block: expected an integer in [0, 1)"),
        (["--use", "2"], "--use: expected an integer in [0, 2)"),
        (["--sample", "3"], "--sample: expected a sample of --x in [0, 3), got 3"),
        (["--sample", "-1"], "--sample"),
        (["--image-shape", "3", "5"], "--image-shape: expected H W with H * W = N = 16"),
        (["--image-shape", "2", "8", "--image", d / "img.npy"], "--image-shape is 2 x 8"),
        (["--mask", d / "m_int.npy"], "--mask " + str(d / "m_int.npy") + ": expected bool [S, N]"),
        (["--mask", d / "missing.npy"], "--mask " + str(d / "missing.npy") + ": no such file"),
        (["--x", d / "img.npy"], "--x " + str(d / "img.npy") + ": x has 3 channels per position"),
        (["--x", d / "nan.npy", "--sample", "1"], "--x " + str(d / "nan.npy") + " sample 1: 1 non-finite"),
        (["--out", d / "nowhere" / "a.png"], "--out"),
    ]
    for more, message in cases:
        capsys.readouterr()
        assert cli([str(a) for a in [*base, *more]]) == 2, more
        err = capsys.readouterr().err
        assert message in err, (more, err)
        assert err.count("\n") == 1 or err.startswith("usage:"), err
        assert not out.exists()
    capsys.readouterr()
    assert cli(["attention", str(d / "x.npy"), "--x", str(d / "x.npy"), "--out", str(out)]) == 2
    assert str(d / "x.npy") in capsys.readouterr().err
