"""Checkpoints: bit-identical round trips (params, optimizer state, step, RNG, extra), models and
training runs resumed from them, atomic writes, stale temporary files of killed saves, and a
CheckpointError naming the path and the thing for every damaged, hand-crafted, hostile
(decompression bombs, lying .npy headers) or pickled file, every non-finite tensor and every bad
argument on save."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import _files
from perceiver_np import checkpoint as checkpoint_module
from perceiver_np._files import atomic_write, remove_stale_temps
from perceiver_np.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_META_BYTES,
    MIN_ENTRY_BYTES,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def small_config(**changes):
    opts = dict(input_dim=5, latent_dim=8, num_latents=3, num_layers=2, num_heads=2,
                dtype="float64", backend="numpy")
    opts.update(changes)
    return pnp.PerceiverConfig(**opts)


CFG = small_config()


def assert_bitwise_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Same dtype, shape and bytes (array_equal would accept -0.0 for 0.0, and fail on NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def assert_arrays_bitwise_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert_bitwise_equal(a[name], b[name])


def adam_state(params, step=0):
    """An optimizer state of the documented flat form."""
    state = {"step": np.array(step, dtype=np.int64)}
    for name, v in params.items():
        state[f"m/{name}"] = np.zeros_like(v)
        state[f"v/{name}"] = np.zeros_like(v)
    return state


def saved(tmp_path, name="ckpt.npz", **kw):
    """A real checkpoint of CFG at tmp_path/name, with every optional part filled in."""
    params = pnp.init_params(CFG)
    rng = np.random.default_rng(7)
    rng.normal(size=3)
    opt = adam_state(params, step=2)
    opt["m/latents"] += 0.25
    args = dict(config=CFG, params=params, step=5, opt_state=opt, rng=rng, extra={"loss": 0.125})
    args.update(kw)
    return save_checkpoint(tmp_path / name, **args), args


def entries(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def get_meta(ents):
    return json.loads(ents["meta.json"].tobytes().decode("utf-8"))


def set_meta(ents, meta):
    ents["meta.json"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def craft(path, ents):
    """Write ``ents`` by hand, as np.savez does (str(path) ends with .npz, so nothing is added)."""
    np.savez(path, **ents)
    return path


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_is_bit_identical(tmp_path):
    params = pnp.init_params(CFG)
    params["latents"][0, 0] = -0.0  # the sign of zero survives too
    rng = np.random.default_rng(123)
    rng.normal(size=5)
    opt = adam_state(params, step=3)
    opt["v/latents"] += 1e-300
    extra = {"metrics": {"loss": 0.5, "acc": [0.25, 1.0]}, "epoch": 2, "note": "ünïcode", "none": None}
    path = save_checkpoint(tmp_path / "ckpt.npz", config=CFG, params=params, step=11, opt_state=opt,
                           rng=rng, extra=extra)
    assert path == tmp_path / "ckpt.npz"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]

    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.config == CFG and ckpt.step == 11 and ckpt.extra == extra
    assert_arrays_bitwise_equal(ckpt.params, params)
    assert list(ckpt.params) == list(pnp.param_shapes(CFG))  # schema order
    assert np.signbit(ckpt.params["latents"][0, 0])
    assert ckpt.opt_state is not None
    assert_arrays_bitwise_equal(ckpt.opt_state, opt)
    json.dumps(ckpt.rng_state)  # JSON-able

    restored = ckpt.rng()
    assert type(restored.bit_generator) is type(rng.bit_generator)
    assert_bitwise_equal(restored.normal(size=7), rng.normal(size=7))
    assert_bitwise_equal(restored.integers(0, 2**62, size=5), rng.integers(0, 2**62, size=5))
    assert_bitwise_equal(restored.random(3), rng.random(3))
    assert_bitwise_equal(ckpt.rng().random(2), ckpt.rng().random(2))  # a fresh one every call


@pytest.mark.parametrize("name", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_every_numpy_bit_generator_continues_exactly(tmp_path, name):
    rng = np.random.Generator(getattr(np.random, name)(99))
    rng.integers(0, 2**32, size=3, dtype=np.uint32)  # an odd number of 32-bit draws: a buffered half
    path = save_checkpoint(tmp_path / "c.npz", config=CFG, params=pnp.init_params(CFG), rng=rng)
    restored = load_checkpoint(path).rng()
    assert type(restored.bit_generator).__name__ == name
    assert_bitwise_equal(restored.integers(0, 2**32, size=5, dtype=np.uint32),
                         rng.integers(0, 2**32, size=5, dtype=np.uint32))
    assert_bitwise_equal(restored.standard_normal(9), rng.standard_normal(9))


def test_optional_parts_default_and_stay_distinct(tmp_path):
    params = pnp.init_params(CFG)
    a = load_checkpoint(save_checkpoint(tmp_path / "a.npz", config=CFG, params=params))
    assert (a.step, a.opt_state, a.rng_state, a.extra) == (0, None, None, {})
    with pytest.raises(CheckpointError, match="no RNG state"):
        a.rng()
    b = load_checkpoint(save_checkpoint(tmp_path / "b.npz", config=CFG, params=params, opt_state={}))
    assert b.opt_state == {}


def test_config_with_extended_options_and_numpy_ints_round_trips(tmp_path):
    cfg = small_config(input_dim=np.int64(6), input_projection=False, qk_channels=4, v_channels=2,
                       cross_heads=1, self_widening_factor=2, final_norm=False, gelu="tanh",
                       dtype="float32", seed=9)
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "c.npz", config=cfg, params=pnp.init_params(cfg)))
    assert ckpt.config == cfg and type(ckpt.config.input_dim) is int
    assert_arrays_bitwise_equal(ckpt.params, pnp.init_params(cfg))


def test_extra_converts_numpy_scalars_and_keeps_nan(tmp_path):
    extra = {"loss": np.float32(0.1), "n": np.int64(3), "ok": np.bool_(True), "bad": float("nan")}
    got = load_checkpoint(save_checkpoint(tmp_path / "c.npz", config=CFG, params=pnp.init_params(CFG),
                                          extra=extra)).extra
    assert got["loss"] == float(np.float32(0.1)) and got["n"] == 3 and got["ok"] is True
    assert np.isnan(got["bad"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_rebuilt_from_checkpoint_gives_bit_identical_outputs(tmp_path, dtype):
    cfg = small_config(dtype=dtype, seed=4)
    rng = np.random.default_rng(0)
    model = pnp.Perceiver(cfg)
    for name, v in model.params.items():  # not the init values: every tensor matters
        model.params[name] = (v + 0.1 * rng.normal(size=v.shape)).astype(v.dtype)
    path = save_checkpoint(tmp_path / "m.npz", config=model.config, params=model.params)
    ckpt = load_checkpoint(path, expect_config=cfg)
    rebuilt = pnp.Perceiver(ckpt.config, ckpt.params)
    x = rng.normal(size=(2, 4, cfg.input_dim))
    mask = np.array([[True, True, False, True], [True, True, True, True]])
    assert_bitwise_equal(rebuilt(x, mask), model(x, mask))


def test_training_resumed_from_a_checkpoint_is_bit_identical(tmp_path):
    """Adam with dropout: 4 steps in one go == 2 steps, save, load, 2 more steps."""
    cfg = small_config(dropout=0.2, seed=1)
    data = np.random.default_rng(5).normal(size=(4, 2, 6, cfg.input_dim))

    def train(params, opt, rng, steps):
        model = pnp.Perceiver(cfg, params)
        for _ in range(steps):
            t = int(opt["step"]) + 1
            y, cache = model.forward(data[t - 1], training=True, rng=rng)
            grads, _ = model.backward(2 * y, cache)  # d/dy of sum(y**2)
            for name, g in grads.items():
                m = opt[f"m/{name}"] = 0.9 * opt[f"m/{name}"] + 0.1 * g
                v = opt[f"v/{name}"] = 0.999 * opt[f"v/{name}"] + 0.001 * g * g
                m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
                model.params[name] = model.params[name] - 1e-2 * m_hat / (np.sqrt(v_hat) + 1e-8)
            opt["step"] = np.array(t, dtype=np.int64)
        return model.params, opt, rng

    straight = train(pnp.init_params(cfg), adam_state(pnp.init_params(cfg)), np.random.default_rng(3), 4)

    params, opt, rng = train(pnp.init_params(cfg), adam_state(pnp.init_params(cfg)),
                             np.random.default_rng(3), 2)
    path = save_checkpoint(tmp_path / "run.npz", config=cfg, params=params, step=int(opt["step"]),
                           opt_state=opt, rng=rng)
    del params, opt, rng
    ckpt = load_checkpoint(path, expect_config=cfg)
    assert ckpt.step == 2 and ckpt.opt_state is not None
    resumed = train(ckpt.params, dict(ckpt.opt_state), ckpt.rng(), 2)

    assert_arrays_bitwise_equal(resumed[0], straight[0])
    assert_arrays_bitwise_equal(resumed[1], straight[1])
    assert_bitwise_equal(resumed[2].random(4), straight[2].random(4))


def test_file_layout(tmp_path):
    path, args = saved(tmp_path)
    ents = entries(path)  # a plain npz: readable by numpy alone, without pickle
    meta = get_meta(ents)
    assert meta["format"] == FORMAT_NAME and meta["version"] == FORMAT_VERSION == 1
    assert meta["config"]["latent_dim"] == 8 and meta["step"] == 5 and meta["extra"] == {"loss": 0.125}
    assert [p["name"] for p in meta["params"]] == list(pnp.param_shapes(CFG))
    assert meta["params"][0] == {"name": "input_proj.weight", "shape": [5, 8], "dtype": "<f8"}
    assert [o["name"] for o in meta["opt"]] == list(args["opt_state"])
    assert meta["rng"]["bit_generator"] == "PCG64" and isinstance(meta["rng"]["state"]["state"]["state"], int)
    assert set(ents) == {"meta.json"} | {f"params/{k}" for k in pnp.param_shapes(CFG)} | {
        f"opt/{k}" for k in args["opt_state"]}


def test_params_come_back_in_schema_order_whatever_the_file_order(tmp_path):
    path, _ = saved(tmp_path)
    craft(tmp_path / "rev.npz", dict(reversed(list(entries(path).items()))))
    assert list(load_checkpoint(tmp_path / "rev.npz").params) == list(pnp.param_shapes(CFG))


# --- atomic writes ------------------------------------------------------------------------------


def _fail_in_savez(monkeypatch):
    def partial_savez(file, *args, **kwds):
        file.write(b"PK\x03\x04" + b"\x00" * 1000)  # the start of a zip, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", partial_savez)


def _fail_in_write_array(monkeypatch):
    real, calls = np.lib.format.write_array, []

    def failing(*args, **kwargs):  # the real np.savez, dying after a few members
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing)


def _fail_in_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_in_replace(monkeypatch):
    def replace(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail", [_fail_in_savez, _fail_in_write_array, _fail_in_fsync, _fail_in_replace])
def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch, fail):
    path, args = saved(tmp_path)
    before = path.read_bytes()
    good = load_checkpoint(path)
    new_params = {k: v + 1 for k, v in args["params"].items()}
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises((OSError, KeyboardInterrupt)):
            save_checkpoint(path, config=CFG, params=new_params, step=6)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    assert path.read_bytes() == before
    again = load_checkpoint(path)
    assert_arrays_bitwise_equal(again.params, good.params)
    assert again.opt_state is not None and good.opt_state is not None
    assert_arrays_bitwise_equal(again.opt_state, good.opt_state)
    assert again.step == 5


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    _fail_in_savez(monkeypatch)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c.npz", config=CFG, params=pnp.init_params(CFG))
    assert os.listdir(tmp_path) == []


def test_saving_again_replaces_the_file_with_ordinary_permissions(tmp_path):
    path, args = saved(tmp_path)
    save_checkpoint(path, config=CFG, params=args["params"], step=9)
    assert load_checkpoint(path).step == 9
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    (tmp_path / "plain").write_bytes(b"")  # what open() gives under the current umask
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode


# --- damaged files ------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["half", "all_but_one", "two", "none"])
def test_truncated_file_is_reported_with_its_path(tmp_path, keep):
    path, _ = saved(tmp_path)
    data = path.read_bytes()
    n = {"half": len(data) // 2, "all_but_one": len(data) - 1, "two": 2, "none": 0}[keep]
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_flipped_bit_in_tensor_data_is_caught(tmp_path):
    path, args = saved(tmp_path)
    data = bytearray(path.read_bytes())
    i = data.find(args["params"]["latents"].tobytes())
    assert i > 0
    data[i + 13] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "params/latents" in str(err.value)


def test_corruption_anywhere_is_an_error_or_changes_nothing(tmp_path):
    """Flip bytes all over a tiny checkpoint (zip headers, .npy headers, meta.json, data, the
    central directory): every load either raises CheckpointError naming the file or returns
    exactly the original. (Run over every byte with both flips by hand, last with the zipfile
    reader that checks headers before data: 35,266 loads, 30,029 refused, no other exception, no
    silent change; the harmless flips are all in local zip headers, whose fields zipfile takes
    from the central directory instead.)"""
    cfg = pnp.PerceiverConfig(input_dim=1, latent_dim=2, num_latents=1, num_layers=1, num_heads=1,
                              cross_widening_factor=1, self_widening_factor=1, dtype="float64")
    params = pnp.init_params(cfg)
    path = save_checkpoint(tmp_path / "tiny.npz", config=cfg, params=params, step=3,
                           opt_state={"step": np.array(3), "m/latents": np.ones((1, 2))},
                           rng=np.random.default_rng(1), extra={"loss": 0.5})
    ref = load_checkpoint(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    caught = 0
    for k, i in enumerate(np.linspace(0, len(data) - 1, 300).astype(int)):
        b = bytearray(data)
        b[i] ^= 0x01 if k % 2 else 0xFF
        bad.write_bytes(bytes(b))
        try:
            got = load_checkpoint(bad)
        except CheckpointError as exc:
            assert str(bad) in str(exc)
            caught += 1
            continue
        assert got.config == ref.config and got.step == ref.step and got.extra == ref.extra
        assert got.rng_state == ref.rng_state
        assert_arrays_bitwise_equal(got.params, ref.params)
        assert got.opt_state is not None and ref.opt_state is not None
        assert_arrays_bitwise_equal(got.opt_state, ref.opt_state)
    assert caught > 200


def test_not_a_file_not_an_npz(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as err:
        load_checkpoint(tmp_path / "missing.npz")
    assert "missing.npz" in str(err.value)
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)
    (tmp_path / "text.npz").write_text("hello, world\n")
    with pytest.raises(CheckpointError, match="not an npz file"):
        load_checkpoint(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match=r"single \.npy array"):
        load_checkpoint(tmp_path / "one.npy")


UNPICKLED: list[str] = []


class Trap:
    """Unpickling this records it: the test proves loading never unpickles."""

    def __reduce__(self):
        return (UNPICKLED.append, ("unpickled!",))


def test_a_pickled_object_array_is_never_loaded(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents["params/latents"] = np.array([Trap()], dtype=object)
    craft(tmp_path / "obj.npz", ents)  # np.savez pickles object arrays
    with pytest.raises(CheckpointError, match="pickled object array") as err:
        load_checkpoint(tmp_path / "obj.npz")
    assert "params/latents" in str(err.value) and str(tmp_path / "obj.npz") in str(err.value)

    ents = entries(path)
    ents["opt/m/latents"] = np.array([Trap()], dtype=object)
    craft(tmp_path / "obj2.npz", ents)
    with pytest.raises(CheckpointError, match="pickled object array"):
        load_checkpoint(tmp_path / "obj2.npz")

    with open(tmp_path / "whole.npz", "wb") as f:  # the whole file a pickle
        pickle.dump({"params": Trap()}, f)
    with pytest.raises(CheckpointError, match="not an npz file"):
        load_checkpoint(tmp_path / "whole.npz")
    assert UNPICKLED == []


def test_bad_meta_json(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    del ents["meta.json"]
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*no meta\.json"):
        load_checkpoint(craft(tmp_path / "a.npz", ents))
    ents = entries(path)
    ents["meta.json"] = np.frombuffer(b'{"format": "perceiver_np.checkpoint", "vers', dtype=np.uint8)
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        load_checkpoint(craft(tmp_path / "b.npz", ents))
    ents = entries(path)
    ents["meta.json"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="not uint8 bytes"):
        load_checkpoint(craft(tmp_path / "c.npz", ents))


def test_unknown_format_version_and_foreign_format(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    meta = get_meta(ents)
    set_meta(ents, {**meta, "version": 2})
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format version 2; .* reads version 1"):
        load_checkpoint(craft(tmp_path / "v2.npz", ents))
    set_meta(ents, {**meta, "format": "something.else"})
    with pytest.raises(CheckpointError, match="not a perceiver_np checkpoint"):
        load_checkpoint(craft(tmp_path / "f.npz", ents))


def refused_for_its_entry_count(path, held, described):
    """``path`` is refused because its zip directory holds ``held`` entries and its meta.json
    describes ``described`` (checked before zipfile parses the directory)."""
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(
        f"{path}: truncated or corrupt checkpoint file (the zip directory holds {held} entries, "
        f"meta.json describes {described} (meta.json, the "
    ), str(err.value)


def test_unexpected_zip_entry(tmp_path):
    """One entry more than meta.json describes is refused from the zip directory's record count;
    an unexpected entry in place of another one by its name."""
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents["notes"] = np.zeros(2)
    refused_for_its_entry_count(craft(tmp_path / "x.npz", ents), len(ents), len(ents) - 1)
    del ents["opt/step"]
    with pytest.raises(CheckpointError, match="unexpected entry 'notes'"):
        load_checkpoint(craft(tmp_path / "y.npz", ents))


# --- tensors against the stored config ----------------------------------------------------------


def test_missing_tensor(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    del ents["params/self.1.ffn.up.weight"]  # fewer entries than meta.json describes: named
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['self\.1\.ffn\.up\.weight'\]") as err:
        load_checkpoint(craft(tmp_path / "c.npz", ents))
    assert str(tmp_path / "c.npz") in str(err.value)
    ents["opt/other"] = np.zeros(1)  # as many entries as meta.json describes: named too
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['self\.1\.ffn\.up\.weight'\]") as err:
        load_checkpoint(craft(tmp_path / "m.npz", ents))
    assert str(tmp_path / "m.npz") in str(err.value)


def test_extra_tensor(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents["params/self.2.norm.gamma"] = np.ones(8)
    refused_for_its_entry_count(craft(tmp_path / "c.npz", ents), len(ents), len(ents) - 1)
    del ents["opt/step"]  # as many entries as meta.json describes: named
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['self\.2\.norm\.gamma'\]"):
        load_checkpoint(craft(tmp_path / "e.npz", ents))


def test_mis_shaped_tensor_names_tensor_and_both_shapes(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents["params/latents"] = np.zeros((4, 8))
    meta = get_meta(ents)  # the listing updated too: the schema of the config still says (3, 8)
    for item in meta["params"]:
        if item["name"] == "latents":
            item["shape"] = [4, 8]
    set_meta(ents, meta)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(craft(tmp_path / "s.npz", ents))
    msg = str(err.value)
    assert "'params/latents'" in msg and "expected shape (3, 8)" in msg and "got (4, 8)" in msg


def test_wrong_dtype_names_tensor_and_both_dtypes(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents["params/cross.0.attn.q.bias"] = ents["params/cross.0.attn.q.bias"].astype(np.float32)
    ents["params/latents"] = ents["params/latents"].astype(">f8")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(craft(tmp_path / "d.npz", ents))
    msg = str(err.value)
    assert "2 problems" in msg
    assert "tensor 'params/cross.0.attn.q.bias': expected dtype float64 (config.dtype), got float32" in msg
    assert "tensor 'params/latents': expected dtype float64 (config.dtype), got float64 ('>f8'" in msg


def test_meta_listing_disagreeing_with_the_arrays_is_corruption(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    meta = get_meta(ents)
    meta["params"][0]["shape"] = [5, 9]
    set_meta(ents, meta)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*'input_proj\.weight'"):
        load_checkpoint(craft(tmp_path / "l.npz", ents))
    ents = entries(path)
    del ents["opt/m/latents"]
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*\['m/latents'\]"):
        load_checkpoint(craft(tmp_path / "c.npz", ents))
    ents["opt/other"] = np.zeros(1)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*\['m/latents'\].*\['other'\]"):
        load_checkpoint(craft(tmp_path / "o.npz", ents))


# --- the stored config --------------------------------------------------------------------------


def test_stored_config_with_an_unknown_field(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    meta = get_meta(ents)
    meta["config"]["decoder_widgets"] = 3
    set_meta(ents, meta)
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['decoder_widgets'\]"):
        load_checkpoint(craft(tmp_path / "u.npz", ents))


def test_stored_config_invalid_or_incomplete(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    meta = get_meta(ents)
    meta["config"]["gelu"] = "relu"
    set_meta(ents, meta)
    with pytest.raises(CheckpointError, match="stored config is invalid: gelu: expected one of"):
        load_checkpoint(craft(tmp_path / "i.npz", ents))
    del meta["config"]["input_dim"]
    set_meta(ents, meta)
    with pytest.raises(CheckpointError, match=r"lacks required field\(s\) \['input_dim'\]"):
        load_checkpoint(craft(tmp_path / "r.npz", ents))


def test_stored_config_missing_a_defaulted_field_takes_the_default(tmp_path):
    """A checkpoint written before a field existed loads with that field's default."""
    path, _ = saved(tmp_path)
    ents = entries(path)
    meta = get_meta(ents)
    del meta["config"]["attention_dropout"]
    set_meta(ents, meta)
    assert load_checkpoint(craft(tmp_path / "old.npz", ents)).config == CFG


def test_expect_config_lists_every_differing_field(tmp_path):
    path, _ = saved(tmp_path)
    assert load_checkpoint(path, expect_config=CFG).config == CFG
    other = CFG.replace(num_latents=4, dtype="float32", gelu="tanh")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expect_config=other)
    msg = str(err.value)
    assert str(path) in msg and "3 field(s)" in msg
    assert "num_latents: checkpoint 3, expected 4" in msg
    assert "dtype: checkpoint 'float64', expected 'float32'" in msg
    assert "gelu: checkpoint 'exact', expected 'tanh'" in msg
    with pytest.raises(TypeError, match="expect_config"):
        load_checkpoint(path, expect_config={"input_dim": 5})


# --- validation on save -------------------------------------------------------------------------


def _bad_params(kind):
    p = pnp.init_params(CFG)
    if kind == "missing":
        del p["latents"]
    elif kind == "extra":
        p["bonus"] = np.zeros(1)
    elif kind == "shape":
        p["latents"] = np.zeros((3, 9))
    elif kind == "dtype":
        p["latents"] = p["latents"].astype(np.float32)
    elif kind == "type":
        p["latents"] = p["latents"].tolist()
    return p


@pytest.mark.parametrize("kind,pattern", [
    ("missing", r"params: missing tensor\(s\) \['latents'\] required by the config"),
    ("extra", r"params: unexpected tensor\(s\) \['bonus'\]"),
    ("shape", r"params\['latents'\]: expected shape \(3, 8\) from the config, got \(3, 9\)"),
    ("dtype", r"params\['latents'\]: expected dtype float64 \(config.dtype\), got float32"),
    ("type", r"params\['latents'\]: expected a numpy.ndarray, got list"),
])
def test_save_validates_params(tmp_path, kind, pattern):
    with pytest.raises(CheckpointError, match=pattern):
        save_checkpoint(tmp_path / "c.npz", config=CFG, params=_bad_params(kind))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kw,pattern", [
    (dict(step=-1), "step: expected a non-negative integer, got -1"),
    (dict(step=1.0), "step: expected a non-negative integer, got 1.0"),
    (dict(step=True), "step: expected a non-negative integer, got True"),
    (dict(opt_state={"m": [1.0]}), r"opt_state\['m'\]: expected a numpy.ndarray, got list"),
    (dict(opt_state={"m": np.array([None])}), r"opt_state\['m'\]: expected a bool, integer, float"),
    (dict(opt_state={"a//b": np.zeros(1)}), "cannot be stored"),
    (dict(opt_state={3: np.zeros(1)}), "keys must be non-empty strings"),
    (dict(opt_state=[np.zeros(1)]), "opt_state: expected a dict of arrays or None, got list"),
    (dict(rng=np.random.RandomState(0)), "rng: expected a numpy.random.Generator or None, got RandomState"),
    (dict(extra={"shape": (3, 4)}), r"extra\['shape'\]: a tuple is not JSON-able \(it would come back"),
    (dict(extra={"w": np.zeros(2)}), r"extra\['w'\]: a ndarray is not JSON-able"),
    (dict(extra={1: "x"}), "extra: key 1 is not a str"),
    (dict(extra=[1]), "extra: expected a dict, got list"),
    (dict(config=dict(input_dim=5)), "config: expected a PerceiverConfig, got dict"),
])
def test_save_validates_everything_else(tmp_path, kw, pattern):
    args = dict(config=CFG, params=pnp.init_params(CFG))
    args.update(kw)
    with pytest.raises(CheckpointError, match=pattern):
        save_checkpoint(tmp_path / "c.npz", **args)
    assert os.listdir(tmp_path) == []


def test_path_is_used_as_given(tmp_path):
    path = save_checkpoint(str(tmp_path / "run.ckpt"), config=CFG, params=pnp.init_params(CFG))
    assert path == Path(tmp_path / "run.ckpt") and path.is_file()
    assert load_checkpoint(path).config == CFG


# --- hostile files: every member's .npy header is checked before its data is read ----------------


def rewrite(src, dst, replace):
    """Copy the zip ``src`` to ``dst`` with zipfile, member by member (same order, same
    compression); a member named in ``replace`` is written by ``replace[name](zout, name)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in replace:
                replace[info.filename](zout, info.filename)
            else:
                zout.writestr(info, zin.read(info))
    return dst


def npy_header(shape, dtype, version=(1, 0)):
    """The bytes of a .npy header (magic included) claiming ``shape`` and ``dtype``."""
    f = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
         "shape": tuple(shape)}
    fmt = np.lib.format
    (fmt.write_array_header_1_0 if version == (1, 0) else fmt.write_array_header_2_0)(f, d)
    return f.getvalue()


def npy_bytes(array):
    f = io.BytesIO()
    np.lib.format.write_array(f, array, allow_pickle=False)
    return f.getvalue()


def stored(data):
    """A replacement writing ``data`` as a stored (uncompressed) member."""
    return lambda zout, name: zout.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)


ZEROS = bytes(16 << 20)


class RepeatingDeflate:
    """zlib's raw deflate, fully flushed after every write. A full flush resets the compressor,
    so every 16 MiB of zeros compresses to the same bytes (about 16 KB at level 9): they are
    computed once, and 2 GiB of zeros is written in the time its CRC takes (~1 s)."""

    def __init__(self):
        self._c = zlib.compressobj(9, zlib.DEFLATED, -15)
        self._zeros = None

    def compress(self, data):
        if data is ZEROS and self._zeros is not None:
            return self._zeros
        out = self._c.compress(data) + self._c.flush(zlib.Z_FULL_FLUSH)
        if data is ZEROS:
            self._zeros = out
        return out

    def flush(self):
        return self._c.flush()


def deflate_bomb(head, zero_chunks, monkeypatch):
    """A replacement writing a deflated member: ``head``, then ``zero_chunks`` x 16 MiB of zeros
    (a real zip member, CRC and zip64 sizes included; zipfile's compressor is swapped for
    :class:`RepeatingDeflate` while it is written)."""

    def write(zout, name):
        info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with monkeypatch.context() as m:
            m.setattr(zipfile, "_get_compressor", lambda *args, **kwargs: RepeatingDeflate())
            with zout.open(info, "w", force_zip64=True) as w:
                w.write(head)
                for _ in range(zero_chunks):
                    w.write(ZEROS)

    return write


def refusal_peak(path):
    """The CheckpointError that loading ``path`` raises, and the peak of memory traced
    (tracemalloc: Python objects and numpy's array buffers) while it was raised."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        return str(err.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BIG = small_config(input_dim=32, latent_dim=64, num_latents=32, num_heads=4, dtype="float32")
GIB = 2**30


@pytest.mark.parametrize("attack", [
    "header_shape",                 # the header claims (8, 2**26) float32 = 2 GiB, the data is there
    "header_shape_and_listing",     # ... and meta.json's listing is forged to agree
    "header_listing_and_config",    # ... and the stored config too (latent_dim 2**26)
    "trailing_data",                # an honest header and array, then 2 GiB more in the member
    "header_length",                # a v2 header whose length field claims 4 GiB
    "meta_json",                    # meta.json's header claims 1 GiB, and it inflates to that
])
def test_a_decompression_bomb_is_refused_from_its_header_in_bounded_memory(tmp_path, monkeypatch, attack):
    """A ~2 MB file whose deflated member inflates to 1-2 GiB is refused from the member's .npy
    header and zip listing, before its data is inflated: the peak memory of the refusal stays
    under 2x the size of the legitimate checkpoint it was made from."""
    params = pnp.init_params(BIG)
    legit = save_checkpoint(tmp_path / "legit.npz", config=BIG, params=params, opt_state=adam_state(params))
    meta = get_meta(entries(legit))
    member, replace = "params/latents", {}  # the member the refusal names; the bomb is in `replace`
    if attack.startswith("header_"):
        head = npy_header((8, 2**26), "<f4")
        if attack == "header_length":
            head = b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little")
        replace["params/latents.npy"] = deflate_bomb(head, 2 * GIB // len(ZEROS), monkeypatch)
        if attack in ("header_shape_and_listing", "header_listing_and_config"):
            for item in meta["params"]:
                if item["name"] == "latents":
                    item["shape"] = [8, 2**26]
            if attack == "header_listing_and_config":  # latents now agree: the other tensors do not
                meta["config"].update(num_latents=8, latent_dim=2**26)
                member = "params/input_proj.weight"
            replace["meta.json.npy"] = stored(npy_bytes(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
    elif attack == "trailing_data":
        head = npy_bytes(params["latents"])
        replace["params/latents.npy"] = deflate_bomb(head, 2 * GIB // len(ZEROS), monkeypatch)
    else:
        member = "meta.json"
        replace["meta.json.npy"] = deflate_bomb(npy_header((GIB,), "|u1"), GIB // len(ZEROS), monkeypatch)
    bad = rewrite(legit, tmp_path / "bomb.npz", replace)
    with zipfile.ZipFile(bad) as z:
        (info,) = [i for i in z.infolist() if i.file_size >= GIB]
    assert info.compress_size < 2_500_000  # ~2 MB that inflate to 1-2 GiB

    msg, peak = refusal_peak(bad)
    assert str(bad) in msg and repr(member) in msg, msg
    size = legit.stat().st_size
    assert peak < 2 * size, f"refusing {bad.name} peaked at {peak} bytes; the legit checkpoint is {size}"


@pytest.mark.parametrize("member", ["params/latents", "opt/m/latents", "meta.json"])
def test_a_stored_member_whose_header_claims_100_gib_is_a_checkpoint_error(tmp_path, member):
    path, _ = saved(tmp_path)
    with zipfile.ZipFile(path) as z:
        data = z.read(member + ".npy")
    head_len = len(npy_header((3, 8), "<f8"))
    dtype = "|u1" if member == "meta.json" else "<f8"
    forged = npy_header((100 * GIB // np.dtype(dtype).itemsize,), dtype) + data[head_len:]
    bad = rewrite(path, tmp_path / "big.npz", {member + ".npy": stored(forged)})
    msg, peak = refusal_peak(bad)
    assert str(bad) in msg and repr(member) in msg
    assert "truncated or corrupt" in msg and "header" in msg
    assert peak < 1_000_000


def test_data_past_the_array_in_a_member_is_corruption(tmp_path):
    """The zip member's size must be exactly the .npy header plus shape x itemsize."""
    path, args = saved(tmp_path)
    member = npy_bytes(args["params"]["latents"]) + b"\x00" * 8
    bad = rewrite(path, tmp_path / "t.npz", {"params/latents.npy": stored(member)})
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*'params/latents'") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and "bytes" in str(err.value)


# --- hostile zip directories: checked before zipfile parses them ---------------------------------


def split_zip(path):
    """The bytes of a zip written by zipfile / numpy (no comment, no zip64 end record) before its
    central directory, the directory, and how many records it holds."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        start, count = z.start_dir, len(z.infolist())
    assert data[-22:-18] == b"PK\x05\x06" and data[-2:] == b"\0\0"
    return data[:start], data[start:-22], count


def first_record(directory):
    """The first record of a central directory (46 bytes, then name, extra field, comment)."""
    name, extra, comment = struct.unpack("<3H", directory[28:34])
    return directory[:46 + name + extra + comment]


def end_record(count, size, offset, comment=b""):
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, size, offset, len(comment)) + comment


def zip64_end_records(count, size, offset):
    """A zip64 end record and its locator, then an end record deferring to them (as zipfile
    writes them for more than 65,535 entries or 4 GiB)."""
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, offset + size, 1)
    return record + locator + end_record(0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)


def directory_bomb(legit, dst, records, *, listed=None, pad=0, zip64=False, comment=b""):
    """``legit``'s members, ``pad`` zero bytes, then its central directory with its first record
    (meta.json's) repeated until it holds ``records`` records, every copy pointing at meta.json's
    local header, and a correct end record (zip64 ones with ``zip64``) listing ``listed`` entries
    (default ``records``)."""
    head, directory, count = split_zip(legit)
    directory += first_record(directory) * (records - count)
    offset, listed = len(head) + pad, records if listed is None else listed
    if zip64:
        end = zip64_end_records(listed, len(directory), offset)
    else:
        end = end_record(listed, len(directory), offset, comment)
    dst.write_bytes(head + bytes(pad) + directory + end)
    return dst


def zipfile_peak(path):
    """The peak of memory traced while zipfile.ZipFile parses the directory of ``path``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with zipfile.ZipFile(path) as z:
            count = len(z.infolist())
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("variant", [
    "listed",       # the end record lists all 40,000 entries
    "comment",      # ... and is followed by an archive comment (found by searching the file's end)
    "zip64",        # ... in a zip64 end record, behind a zip64 locator (numpy's large files)
    "understated",  # the end record lists 167 entries; the directory holds 40,000 (zipfile counts
                    # the records itself), and the file is padded so that it is under half of it
])
def test_a_zip_directory_bomb_is_refused_before_zipfile_parses_it(tmp_path, variant):
    """A ~2.4 MB file whose zip directory repeats one record 40,000 times (all pointing at one
    local header) made zipfile build ~22 MB of ZipInfo objects before any check ran. It is
    refused from its end record, or by counting the records without keeping them, at a peak far
    under 2x the size of the legitimate checkpoint it was made from."""
    legit, _ = saved(tmp_path)
    _, directory, count = split_zip(legit)
    records = 40_000
    kw = {
        "listed": {},
        "comment": {"comment": b"an archive comment, " * 5},
        "zip64": {"zip64": True},
        "understated": {"listed": count, "pad": records * len(first_record(directory))},
    }[variant]
    bad = directory_bomb(legit, tmp_path / "bomb.npz", records, **kw)
    size = bad.stat().st_size
    assert records > size // MIN_ENTRY_BYTES
    if variant == "listed":  # what such a file cost before the check (~3 s under tracemalloc)
        parsed, unguarded = zipfile_peak(bad)
        assert unguarded > 400 * records, unguarded  # ~500 bytes of objects a record
    else:
        with zipfile.ZipFile(bad) as z:
            parsed = len(z.infolist())
    assert parsed == records

    msg, peak = refusal_peak(bad)
    assert msg.startswith(f"{bad}: truncated or corrupt checkpoint file (its zip directory "), msg
    assert f"at most {size // MIN_ENTRY_BYTES}" in msg and "MIN_ENTRY_BYTES" in msg, msg
    if variant == "understated":
        assert f"holds more than {size // MIN_ENTRY_BYTES} records (its end record says {count})" in msg
    else:
        assert f"lists {records} entries" in msg
    legit_size = legit.stat().st_size
    assert peak < 2 * legit_size, f"refusing {variant} peaked at {peak} bytes; the legit file is {legit_size}"


def test_a_directory_under_the_bound_is_refused_by_what_meta_json_describes(tmp_path):
    """20,000 records (all meta.json's, pointing at its local header) in a 2.56 MB file: the most
    MIN_ENTRY_BYTES lets it hold. zipfile would build ~11 MB of ZipInfo objects for them (4.3x
    the file, ~85x the legitimate checkpoint it was made from) before the duplicate names could be
    refused. meta.json is read from its record as the directory is walked, before zipfile parses
    it, and describes 1 + parameters + optimizer-state entries: the directory holds another
    number, so it is refused there, at a peak under 2x the legitimate checkpoint's size."""
    legit, _ = saved(tmp_path)
    head, directory, count = split_zip(legit)
    records = 20_000
    unpadded = len(head) + len(directory) + (records - count) * len(first_record(directory)) + 22
    pad = records * MIN_ENTRY_BYTES - unpadded  # the smallest file of 20,000 records that passes
    bad = directory_bomb(legit, tmp_path / "under.npz", records, pad=pad)
    size = bad.stat().st_size
    assert size // MIN_ENTRY_BYTES == records and 2 * (size - pad - len(head) - 22) <= size
    msg, peak = refusal_peak(bad)
    assert msg.startswith(
        f"{bad}: truncated or corrupt checkpoint file (the zip directory holds {records} entries, "
        f"meta.json describes {count} (meta.json, the {len(pnp.param_shapes(CFG))} parameters of "
    ), msg
    legit_size = legit.stat().st_size
    assert peak < 2 * legit_size, f"{peak} bytes to refuse {records} records; the legit file is {legit_size}"


def test_a_config_of_more_blocks_than_entries_is_refused_before_its_schema_is_built(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    meta = get_meta(ents)
    meta["config"]["num_layers"] = 10**12  # a schema of 1.6e13 names
    set_meta(ents, meta)
    bad = craft(tmp_path / "deep.npz", ents)
    msg, peak = refusal_peak(bad)
    assert msg.startswith(
        f"{bad}: truncated or corrupt checkpoint file (the zip directory holds {len(ents)} entries, "
        f"meta.json describes at least {10**12 + 3} (meta.json, the latents and {10**12 + 1} blocks"
    ), msg
    assert peak < 1_000_000


def patch(data, at, fmt, *values):
    out = bytearray(data)
    struct.pack_into(fmt, out, at, *values)
    return bytes(out)


@pytest.mark.parametrize("damage", ["method", "encrypted", "crc", "stored_size", "zip64", "offset",
                                    "local_name", "no_meta"])
def test_meta_json_is_read_from_its_zip_records_and_checked(tmp_path, damage):
    """meta.json is read from its records (the central one, then its local header) before zipfile
    parses the directory: every way they can be wrong is a CheckpointError naming the file."""
    legit, _ = saved(tmp_path)
    head, directory, count = split_zip(legit)
    meta = first_record(directory)
    assert meta[46:46 + len(b"meta.json.npy")] == b"meta.json.npy" and head[30:43] == b"meta.json.npy"
    expected = {
        "method": (meta, "<H", 10, 12, "compression method 12, not stored (0) or deflated (8)"),
        "encrypted": (meta, "<H", 8, 1, "encrypted or patched (flag bits 0x0001)"),
        "crc": (meta, "<L", 16, zlib.crc32(b"x"), "its CRC-32 is not the one in the zip directory"),
        "stored_size": (meta, "<L", 20, 1, "is stored in 1 bytes, but its size is"),
        "zip64": (meta, "<L", 24, 0xFFFF_FFFF, "its zip64 extra field lacks a size or offset"),
        "offset": (meta, "<L", 42, 1, "no local header at byte 1"),
        "local_name": (head, "<3s", 40, b"npz", "its local header names another member"),
        "no_meta": (meta, "<4s", 46, b"ateM", "no meta.json entry"),
    }
    part, fmt, at, value, detail = expected[damage]
    if part is meta:
        directory = patch(meta, at, fmt, value) + directory[len(meta):]
    else:
        head = patch(head, at, fmt, value)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(head + directory + end_record(count, len(directory), len(head)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: truncated or corrupt checkpoint file ("), msg
    assert detail in msg and (damage == "no_meta" or "entry 'meta.json'" in msg), msg


def test_meta_json_in_zip64_fields_or_deflated_loads_as_zipfile_reads_it(tmp_path):
    """meta.json's sizes and offset in its record's zip64 extra field (as zip tools that always
    write zip64 put them), or every member deflated: the file loads bit-identically."""
    legit, args = saved(tmp_path)
    ref = load_checkpoint(legit)

    def same(path):
        got = load_checkpoint(path)
        assert got.config == ref.config and got.step == ref.step and got.extra == ref.extra
        assert got.rng_state == ref.rng_state
        assert_arrays_bitwise_equal(got.params, ref.params)
        assert got.opt_state is not None
        assert_arrays_bitwise_equal(got.opt_state, args["opt_state"])

    head, directory, count = split_zip(legit)
    meta = first_record(directory)
    csize, usize = struct.unpack("<2L", meta[20:28])
    (offset,) = struct.unpack("<L", meta[42:46])
    name_size, extra_size = struct.unpack("<2H", meta[28:32])
    zip64 = struct.pack("<2H3Q", 1, 24, usize, csize, offset)
    record = patch(meta, 20, "<2L", 0xFFFF_FFFF, 0xFFFF_FFFF)
    record = patch(record, 42, "<L", 0xFFFF_FFFF)
    record = patch(record, 30, "<H", extra_size + len(zip64))
    record = record[:46 + name_size] + zip64 + record[46 + name_size:]
    directory = record + directory[len(meta):]
    path = tmp_path / "zip64.npz"
    path.write_bytes(head + directory + end_record(count, len(directory), len(head)))
    same(path)

    deflated = tmp_path / "deflated.npz"
    with zipfile.ZipFile(legit) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with zipfile.ZipFile(deflated) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    same(deflated)


def test_meta_json_is_never_inflated_past_its_size(tmp_path):
    """A deflated meta.json that goes on inflating (64 MiB of zeros after its bytes) is read
    only up to the size in its record, as zipfile reads it: in bounded memory."""
    data = b"the bytes of meta.json"
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(data) + c.compress(bytes(64 << 20)) + c.flush()
    assert len(stream) < 100_000
    tracemalloc.start()
    try:
        got = checkpoint_module._inflate(io.BytesIO(stream), len(stream), len(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == data and peak < 1_000_000
    short = zlib.compressobj(9, zlib.DEFLATED, -15)
    short = short.compress(data) + short.flush()  # a stream that ends before the size in its record
    with pytest.raises(EOFError, match="inflates to 22 bytes, not its 23"):
        checkpoint_module._inflate(io.BytesIO(short), 100, len(data) + 1)


def test_two_meta_json_records_are_duplicate_entries(tmp_path):
    """A second meta.json record in place of another entry: the entry count is right, the walk
    reads the first, and the duplicate is refused once zipfile has parsed the directory."""
    legit, _ = saved(tmp_path)
    head, directory, count = split_zip(legit)
    meta = first_record(directory)
    rest, records = directory[len(meta):], [meta]
    while rest:  # the records after meta.json's, the last one replaced by meta.json's
        records.append(first_record(rest))
        rest = rest[len(records[-1]):]
    directory = b"".join(records[:-1]) + meta
    bad = tmp_path / "two.npz"
    bad.write_bytes(head + directory + end_record(count, len(directory), len(head)))
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*duplicate entries \['meta\.json'\]"):
        load_checkpoint(bad)


@pytest.mark.parametrize("forge", ["size_past_end", "offset_past_end", "offset_before", "count"])
def test_a_zip_directory_that_does_not_fit_or_disagrees_with_its_end_record(tmp_path, forge):
    legit, _ = saved(tmp_path)
    head, directory, count = split_zip(legit)
    size, offset = len(directory), len(head)
    end = {
        "size_past_end": end_record(count, size + 2**31, offset),
        "offset_past_end": end_record(count, size, offset + 1000),
        "offset_before": end_record(count, size, offset - 46),  # zipfile would shift every member
        "count": end_record(count - 1, size, offset),
    }[forge]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(head + directory + end)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: truncated or corrupt checkpoint file ("), msg
    if forge == "count":
        assert f"holds {count} records in {size} bytes; its end record says {count - 1}" in msg
    else:
        assert "do not fit in the file" in msg


def test_the_records_of_a_zip_directory_are_checked_as_zipfile_walks_them(tmp_path):
    legit, _ = saved(tmp_path)
    head, directory, count = split_zip(legit)
    bad = tmp_path / "bad.npz"
    broken = bytearray(directory)
    broken[len(first_record(directory))] ^= 0xFF  # the second record's signature
    bad.write_bytes(head + bytes(broken) + end_record(count, len(directory), len(head)))
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*record 1 has no record signature"):
        load_checkpoint(bad)
    cut = directory[:-10]  # the last record's name runs past the directory's end
    bad.write_bytes(head + cut + end_record(count, len(cut), len(head)))
    overrun = rf"truncated or corrupt.*holds {count} records in {len(directory)} bytes"
    with pytest.raises(CheckpointError, match=overrun):
        load_checkpoint(bad)
    longer = directory + b"PK\x01\x02" + bytes(26)  # ... a record's 46-byte head past it
    bad.write_bytes(head + longer + end_record(count + 1, len(longer), len(head)))
    with pytest.raises(CheckpointError, match=rf"truncated or corrupt.*record {count} is truncated"):
        load_checkpoint(bad)


def test_a_checkpoint_of_many_small_tensors_loads_whatever_its_end_records(tmp_path, monkeypatch):
    """The bound refuses no real file: a 24-layer model of the smallest widths with AdamW's state
    (407 tensors, 1,223 entries) holds ~390 bytes an entry, 3x MIN_ENTRY_BYTES; it loads, with an
    archive comment, and with zip64 end records."""
    from perceiver_np.optim import adamw

    cfg = small_config(input_dim=1, latent_dim=2, num_latents=1, num_layers=24, num_heads=1,
                       cross_widening_factor=1, self_widening_factor=1, dtype="float32")
    params = pnp.init_params(cfg)
    opt = adamw(1e-3).init(params)
    assert len(params) >= 200
    path = save_checkpoint(tmp_path / "many.npz", config=cfg, params=params, step=1, opt_state=opt,
                           rng=np.random.default_rng(3))
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        n = len(z.infolist())
    assert n == 1 + 3 * len(params) + 1
    assert size / n > 2.5 * MIN_ENTRY_BYTES, f"{size / n:.0f} bytes an entry"
    assert MIN_ENTRY_BYTES <= 30 + 46 + 2 * len("opt/x") + 55  # what the docstring of the constant says

    def check(p):
        ckpt = load_checkpoint(p, expect_config=cfg)
        assert_arrays_bitwise_equal(ckpt.params, params)
        assert ckpt.opt_state is not None
        assert_arrays_bitwise_equal(ckpt.opt_state, opt)

    check(path)
    with zipfile.ZipFile(path, "a") as z:  # an archive comment: the end record is searched for
        z.comment = b"an archive comment"
    assert not path.read_bytes().endswith(b"\0\0")
    check(path)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 100)  # zipfile writes zip64 end records
    path = save_checkpoint(tmp_path / "zip64.npz", config=cfg, params=params, step=1, opt_state=opt)
    data = path.read_bytes()
    assert data[-42:-38] == b"PK\x06\x07" and data[-98:-94] == b"PK\x06\x06"
    check(path)


def test_meta_json_size_is_capped_on_save_and_on_load(tmp_path, monkeypatch):
    assert 1 << 20 <= MAX_META_BYTES <= 64 << 20
    path, args = saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"meta\.json.*MAX_META_BYTES"):
        save_checkpoint(tmp_path / "big.npz", config=CFG, params=args["params"],
                        extra={"log": "x" * MAX_META_BYTES})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    monkeypatch.setattr(checkpoint_module, "MAX_META_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"'meta\.json'.*more than the 1000-byte limit") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


# --- non-finite values ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("part", ["params", "opt_state"])
def test_save_refuses_non_finite_values_and_keeps_the_previous_file(tmp_path, part, bad):
    path, args = saved(tmp_path)
    before = path.read_bytes()
    params = {k: v.copy() for k, v in args["params"].items()}
    opt = {k: v.copy() for k, v in args["opt_state"].items()}
    if part == "params":
        first, later, values = "cross.0.attn.q.weight", "self.1.ffn.up.bias", params
    else:
        first, later, values = "m/latents", "v/final_norm.beta", opt
    values[first].flat[[1, 5, 9]] = bad
    values[later][0] = np.nan
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, config=CFG, params=params, step=6, opt_state=opt)
    msg = str(err.value)
    assert msg.startswith(f"{part}[{first!r}]: 3 of {values[first].size} entries are not finite"), msg
    assert later not in msg
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    save_checkpoint(tmp_path / "ok.npz", config=CFG, params=args["params"],  # finite is fine,
                    opt_state={"n": np.array([1, 2]), "f": np.ones(2, np.complex64)})  # ints too


@pytest.mark.parametrize("member", ["params/latents", "opt/v/latents"])
def test_load_refuses_non_finite_tensors(tmp_path, member):
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents[member] = ents[member].copy()
    ents[member][0, 1], ents[member][2, 7] = np.nan, -np.inf
    bad = craft(tmp_path / "n.npz", ents)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert str(err.value).startswith(f"{bad}: tensor {member!r}: 2 of 24 entries are not finite")


# --- temporary files of killed saves ------------------------------------------------------------

posix_only = pytest.mark.skipif(
    _files.fcntl is None or not hasattr(signal, "SIGKILL"), reason="needs fcntl.flock and SIGKILL"
)

SAVE_AND_HANG = """
import sys, time
from pathlib import Path
from perceiver_np._files import atomic_write

def write(f):
    f.write(b"half a checkpoint " * 50_000)
    f.flush()
    print("writing", flush=True)
    time.sleep(300)

atomic_write(Path(sys.argv[1]), write)
"""


def start_hanging_saves(*targets):
    """One child process per target, each stopped inside atomic_write(target) with its temp
    file written and locked: a save in progress, until it is killed."""
    children = [subprocess.Popen([sys.executable, "-c", SAVE_AND_HANG, str(t)], stdout=subprocess.PIPE,
                                 text=True) for t in targets]
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline() != "writing\n":
            kill(*children)
            pytest.fail("a child save did not start")
    return children


def kill(*children):
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)  # no handler runs: the temp file stays behind
        child.wait()
        child.stdout.close()


def temps(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


@posix_only
def test_the_next_save_removes_temps_of_killed_saves_but_not_of_a_live_one(tmp_path):
    path, args = saved(tmp_path)
    (live,) = start_hanging_saves(path)
    try:
        (live_temp,) = temps(tmp_path)
        assert live_temp.startswith(".ckpt.npz.")
        save_checkpoint(path, config=CFG, params=args["params"], step=6)  # while the other one writes
        assert remove_stale_temps(path) == []
        assert temps(tmp_path) == [live_temp]
        assert load_checkpoint(path).step == 6
        kill(live)  # now it is a killed save's leftover
        assert temps(tmp_path) == [live_temp]
        save_checkpoint(path, config=CFG, params=args["params"], step=7)
        assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
        assert load_checkpoint(path).step == 7
    finally:
        kill(live)


@posix_only
def test_loading_removes_stale_temps_of_that_checkpoint_only(tmp_path):
    path, _ = saved(tmp_path)
    other = tmp_path / "ckpt.npz.bak"
    children = start_hanging_saves(path, path, other)
    try:
        ours = temps(tmp_path)
        assert len(ours) == 3
        (tmp_path / ".ckpt.npz.notes.tmp").write_bytes(b"not a temp of ours")
        kill(*children)
        assert len(load_checkpoint(path).params) == len(pnp.param_shapes(CFG))  # what fit(resume=True) calls
        left = temps(tmp_path)
        assert left == sorted([".ckpt.npz.notes.tmp", *(n for n in ours if n.startswith(".ckpt.npz.bak."))])
        assert len(left) == 2
        assert [p.name for p in remove_stale_temps(other)] == [left[0]]
    finally:
        kill(*children)


@posix_only
def test_atomic_write_holds_an_exclusive_lock_on_its_temp(tmp_path):
    import fcntl

    target = tmp_path / "t.bin"

    def write(f):
        (name,) = temps(tmp_path)
        fd = os.open(tmp_path / name, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert remove_stale_temps(target) == []
        f.write(b"written")

    atomic_write(target, write)
    assert target.read_bytes() == b"written" and temps(tmp_path) == []


@posix_only
def test_a_temp_a_cleaner_removed_before_the_writer_locked_it_is_made_again(tmp_path, monkeypatch):
    import fcntl

    target, raced, real = tmp_path / "t.bin", [], fcntl.flock

    def flock(fd, op):
        if op == fcntl.LOCK_EX and not raced:  # the writer's first lock: a cleaner got there first
            raced.extend(remove_stale_temps(target))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    atomic_write(target, lambda f: f.write(b"written"))
    assert len(raced) == 1 and not raced[0].exists()
    assert target.read_bytes() == b"written" and temps(tmp_path) == []


def test_without_fcntl_only_old_temps_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(_files, "fcntl", None)
    target = tmp_path / "ckpt.npz"
    old, fresh = _files._new_temp_path(target), _files._new_temp_path(target)
    old.write_bytes(b"old")
    fresh.write_bytes(b"fresh")
    t = time.time() - _files.STALE_TEMP_AGE_SECONDS - 60
    os.utime(old, (t, t))
    assert remove_stale_temps(target) == [old]
    atomic_write(target, lambda f: f.write(b"data"))
    assert target.read_bytes() == b"data" and temps(tmp_path) == [fresh.name]


def test_temps_of_long_names_are_told_apart(tmp_path, monkeypatch):
    """Names too long to be kept whole in a temp's name are told apart by a digest."""
    monkeypatch.setattr(_files, "fcntl", None)
    a, b = tmp_path / ("é" * 120 + "a.npz"), tmp_path / ("é" * 120 + "b.npz")
    ta, tb = _files._new_temp_path(a), _files._new_temp_path(b)
    assert len(os.fsencode(ta.name)) <= 255 and ta.name.startswith(".") and ta.name.endswith(".tmp")
    t = time.time() - _files.STALE_TEMP_AGE_SECONDS - 60
    for p in (ta, tb):
        p.write_bytes(b"")
        os.utime(p, (t, t))
    assert remove_stale_temps(a) == [ta] and tb.exists()
