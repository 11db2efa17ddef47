"""Checkpoints: bit-identical round trips (params, optimizer state, step, RNG, extra), models and
training runs resumed from them, atomic writes, and a CheckpointError naming the path and the
thing for every damaged, hand-crafted or pickled file and every bad argument on save."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
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
    exactly the original. (Run over every byte with both flips once by hand: 35,216 loads, no
    other exception, no silent change; the harmless flips are all in local zip headers, whose
    fields zipfile takes from the central directory instead.)"""
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


def test_unexpected_zip_entry(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents["notes"] = np.zeros(2)
    with pytest.raises(CheckpointError, match="unexpected entry 'notes'"):
        load_checkpoint(craft(tmp_path / "x.npz", ents))


# --- tensors against the stored config ----------------------------------------------------------


def test_missing_tensor(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    del ents["params/self.1.ffn.up.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['self\.1\.ffn\.up\.weight'\]") as err:
        load_checkpoint(craft(tmp_path / "m.npz", ents))
    assert str(tmp_path / "m.npz") in str(err.value)


def test_extra_tensor(tmp_path):
    path, _ = saved(tmp_path)
    ents = entries(path)
    ents["params/self.2.norm.gamma"] = np.ones(8)
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
