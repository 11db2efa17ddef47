"""perceiver_np.hf_files: our safetensors reader and writer against the safetensors package (both
ways, every dtype, the same bytes), save_pretrained directories of small random HF Perceivers
(single file, sharded, pytorch_model.bin) read back equal to ``state_dict()``, and an
HFFileError naming the file, the tensor and the problem for every damaged or hostile file,
refused from its header alone, in bounded memory."""

from __future__ import annotations

import json
import os
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from perceiver_np import hf_files
from perceiver_np.hf_files import (
    MAX_HEADER_BYTES,
    HFFileError,
    read_pretrained_dir,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors,
)

ALL_DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8",
              "uint64", "uint32", "uint16", "uint8", "bool"]


def sample_arrays(rng):
    """One array of every dtype we write, of assorted shapes (a scalar, an empty one)."""
    out = {}
    for i, name in enumerate(ALL_DTYPES):
        shape = [(2, 3), (5,), (), (0, 4), (3, 1, 2)][i % 5]
        if name == "bool":
            out[f"t.{name}"] = rng.random(shape) < 0.5
        elif name.startswith("float"):
            out[f"t.{name}"] = rng.normal(size=shape).astype(name)
        else:
            info = np.iinfo(name)
            out[f"t.{name}"] = rng.integers(info.min, info.max, size=shape, dtype=name, endpoint=True)
    return out


def assert_same_arrays(got, want):
    assert set(got) == set(want)
    for name in want:
        a, b = got[name], np.asarray(want[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == np.ascontiguousarray(b).tobytes(), name


def raw_file(path, header, data=b"", length=None):
    """A safetensors file written by hand: the 8-byte length, the JSON header, ``data``."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def f32(offsets, shape=(4,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_of_every_dtype_is_bit_identical(tmp_path, rng):
    arrays = sample_arrays(rng)
    arrays["t.float64"][0, 0] = -0.0
    arrays["t.float32"][0] = np.nan
    path = write_safetensors(tmp_path / "a.safetensors", arrays, metadata={"format": "np", "é": "ü"})
    assert path == tmp_path / "a.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temporary file left behind
    got = read_safetensors(path)
    assert_same_arrays(got, arrays)
    assert all(a.flags.writeable for a in got.values())
    assert read_safetensors_metadata(path) == {"format": "np", "é": "ü"}


def test_writes_the_bytes_safetensors_writes(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package is the reference")
    arrays = sample_arrays(rng)
    arrays["zz"] = np.arange(3.0)
    arrays["aa"] = np.arange(3.0)
    write_safetensors(tmp_path / "a.safetensors", arrays, {"k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == st.save(arrays, metadata={"k": "v"})
    write_safetensors(tmp_path / "b.safetensors", arrays)
    assert (tmp_path / "b.safetensors").read_bytes() == st.save(arrays)


def test_round_trips_both_ways_with_the_safetensors_package(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package is the reference")
    arrays = sample_arrays(rng)
    write_safetensors(tmp_path / "ours.safetensors", arrays)
    assert_same_arrays(st.load_file(tmp_path / "ours.safetensors"), arrays)
    st.save_file(arrays, tmp_path / "theirs.safetensors", metadata={"a": "b"})
    assert_same_arrays(read_safetensors(tmp_path / "theirs.safetensors"), arrays)
    assert read_safetensors_metadata(tmp_path / "theirs.safetensors") == {"a": "b"}


def test_writes_the_values_of_non_contiguous_and_big_endian_arrays(tmp_path):
    """The logical values, C-ordered and little-endian, whatever the array's layout (the
    safetensors package writes a transposed array's memory as it lies, i.e. transposed again)."""
    arrays = {"t": np.arange(6.0).reshape(2, 3).T, "s": np.arange(10, dtype=np.int32)[::3],
              "b": np.arange(4, dtype=">f4")}
    write_safetensors(tmp_path / "a.safetensors", arrays)
    got = read_safetensors(tmp_path / "a.safetensors")
    for name, want in arrays.items():
        assert np.array_equal(got[name], want) and got[name].dtype == want.dtype.newbyteorder("=")


def test_bf16_is_widened_to_float32_exactly(tmp_path, rng):
    values = rng.normal(size=(3, 4)).astype(np.float32)
    top = (values.view(np.uint32) >> 16).astype("<u2")  # bf16 by truncation: exact upper halves
    raw_file(tmp_path / "a.safetensors", {"w": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 24]}},
             top.tobytes())
    got = read_safetensors(tmp_path / "a.safetensors")["w"]
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), top.astype(np.uint32) << 16)


def test_bf16_written_by_torch(tmp_path, rng):
    torch = pytest.importorskip("torch", reason="torch writes the bfloat16 reference")
    st_torch = pytest.importorskip("safetensors.torch", reason="safetensors' torch API writes bfloat16")
    t = torch.from_numpy(rng.normal(size=(5, 3)) * 1e3).bfloat16()
    st_torch.save_file({"w": t}, str(tmp_path / "a.safetensors"))
    got = read_safetensors(tmp_path / "a.safetensors")["w"]
    assert np.array_equal(got, t.float().numpy()) and got.dtype == np.float32


def test_null_metadata_is_no_metadata(tmp_path):
    path = raw_file(tmp_path / "a.safetensors", {"__metadata__": None, "a": f32([0, 16])}, bytes(16))
    assert read_safetensors_metadata(path) == {}
    assert read_safetensors(path)["a"].tolist() == [0.0] * 4


def test_an_empty_file_of_no_tensors_round_trips(tmp_path):
    write_safetensors(tmp_path / "e.safetensors", {})
    assert read_safetensors(tmp_path / "e.safetensors") == {}
    assert read_safetensors_metadata(tmp_path / "e.safetensors") == {}


@pytest.mark.parametrize(("arrays", "metadata", "match"), [
    ([1, 2], None, r"^arrays: expected a dict"),
    ({"x": [1.0]}, None, r"^arrays\['x'\]: expected a numpy.ndarray, got list"),
    ({"x": np.zeros(2, np.complex64)}, None, r"^arrays\['x'\]: dtype complex64 cannot be stored"),
    ({"x": np.array(["a"])}, None, r"^arrays\['x'\]: dtype <U1 cannot be stored"),
    ({"__metadata__": np.zeros(2)}, None, r"^arrays: names must be strings other than '__metadata__'"),
    ({1: np.zeros(2)}, None, r"^arrays: names must be strings"),
    ({"x": np.zeros(2)}, {"k": 1}, r"^metadata: expected a dict of str -> str"),
])
def test_write_refuses_bad_arguments_and_writes_nothing(tmp_path, arrays, metadata, match):
    (tmp_path / "a.safetensors").write_bytes(b"old")
    with pytest.raises(HFFileError, match=match):
        write_safetensors(tmp_path / "a.safetensors", arrays, metadata)
    assert (tmp_path / "a.safetensors").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_safetensors(tmp_path / "a.safetensors", {"x": np.arange(3.0)})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "ascontiguousarray", boom)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"x": np.arange(4.0)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


# --- damaged and hostile files ------------------------------------------------------------------


def refused(path, monkeypatch):
    """The HFFileError reading ``path`` raises, with no tensor data read: reading a tensor fails
    the test."""

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was read before the header was refused")

    monkeypatch.setattr(hf_files, "_read_tensor", no_data)
    with pytest.raises(HFFileError) as err:
        read_safetensors(path)
    message = str(err.value)
    assert message.startswith(str(path) + ": ")
    with pytest.raises(HFFileError):
        read_safetensors_metadata(path)
    return message


HOSTILE = {
    # name: (header, data, header length (None: the true one), what the message must say)
    "length past EOF": ({"a": f32([0, 16])}, bytes(16), 10_000, "header length 10000 runs past the end"),
    "huge length": ({}, b"", 2**63, f"more than the {MAX_HEADER_BYTES} bytes"),
    "just over the limit": ({}, b"", MAX_HEADER_BYTES + 1, "more than the"),
    "not JSON": (b"{not json", b"", None, "header: not valid UTF-8 JSON"),
    "not UTF-8": (b'{"\xff": 1}', b"", None, "header: not valid UTF-8 JSON"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, b"", None, "header: not valid UTF-8 JSON"),
    "a list": (b"[]", b"", None, "header: expected a JSON object, got list"),
    "duplicate name": (b'{"a": ' + json.dumps(f32([0, 16])).encode() + b', "a": '
                       + json.dumps(f32([0, 16])).encode() + b"}", bytes(16), None, "'a' appears twice"),
    "metadata a list": ({"__metadata__": []}, b"", None, "__metadata__ must be an object of strings"),
    "metadata not strings": ({"__metadata__": {"k": 1}}, b"", None,
                             "__metadata__ must be an object of strings"),
    "entry not an object": ({"a": [1, 2]}, b"", None, "tensor 'a': expected an object"),
    "missing field": ({"a": {"dtype": "F32", "shape": [1]}}, b"", None,
                      "tensor 'a': expected exactly the fields"),
    "unknown field": ({"a": {**f32([0, 16]), "endian": "big"}}, bytes(16), None, "unknown ['endian']"),
    "unknown dtype": ({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4), None,
                      "tensor 'a': dtype 'F8_E4M3' is not supported"),
    "dtype not a string": ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, bytes(16), None,
                           "tensor 'a': dtype ['F32'] is not supported"),
    "negative dim": ({"a": f32([0, 16], shape=(-4,))}, bytes(16), None, "tensor 'a': shape must be a list of "
                     "non-negative integers"),
    "float dim": ({"a": f32([0, 16], shape=(4.0,))}, bytes(16), None, "tensor 'a': shape must be"),
    "bool dim": ({"a": f32([0, 4], shape=(True,))}, bytes(4), None, "tensor 'a': shape must be"),
    "offsets reversed": ({"a": f32([16, 0])}, bytes(16), None,
                         "tensor 'a': data_offsets must be [begin, end]"),
    "offsets not a pair": ({"a": f32([0, 8, 16])}, bytes(16), None, "tensor 'a': data_offsets must be"),
    "wrong byte count": ({"a": f32([0, 12])}, bytes(12), None,
                         "tensor 'a': data_offsets [0, 12] hold 12 bytes, but shape [4] of F32 takes 16"),
    "past the buffer": ({"a": f32([0, 16])}, bytes(12), None, "tensor 'a': data_offsets [0, 16] end past the "
                        "12-byte data buffer"),
    "overlap": ({"a": f32([0, 16]), "b": f32([8, 24])}, bytes(24), None, "tensor 'b': data_offsets [8, 24] "
                "overlap tensor 'a' (which ends at byte 16)"),
    "gap": ({"a": f32([0, 16]), "b": f32([20, 36])}, bytes(36), None, "tensor 'b': data_offsets [20, 36] "
            "leave a gap of 4 bytes after tensor 'a' (which ends at byte 16)"),
    "gap at the start": ({"a": f32([4, 20])}, bytes(20), None,
                         "leave a gap of 4 bytes after the start of the buffer"),
    "empty tensor inside another": ({"a": f32([0, 16]), "e": f32([8, 8], shape=(0,))}, bytes(16), None,
                                    "tensor 'e': data_offsets [8, 8] overlap tensor 'a'"),
    "trailing bytes": ({"a": f32([0, 16])}, bytes(20), None, "the tensors cover 16 bytes of the 20-byte "
                       "data buffer; 4 bytes"),
    # A header claiming 2**40 float32 (4 TiB): refused from the header, nothing allocated.
    "4 TiB claimed": ({"a": f32([0, 2**42], shape=(2**20, 2**20))}, bytes(64), None,
                      "tensor 'a': data_offsets [0, 4398046511104] end past the 64-byte data buffer"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_damaged_or_hostile_file_is_refused_from_its_header(tmp_path, monkeypatch, case):
    header, data, length, expected = HOSTILE[case]
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    assert expected in refused(path, monkeypatch)


def test_a_file_shorter_than_the_header_length_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    assert "only 3 bytes long; a safetensors file starts with an 8-byte header length" in refused(
        path, monkeypatch)


def test_a_truncated_real_file_is_refused_naming_the_tensor(tmp_path, rng, monkeypatch):
    arrays = {"a": rng.normal(size=100), "b": rng.normal(size=100)}
    path = write_safetensors(tmp_path / "a.safetensors", arrays)
    blob = path.read_bytes()
    path.write_bytes(blob[:-10])
    message = refused(path, monkeypatch)
    assert "tensor 'b': data_offsets [800, 1600] end past the 1590-byte data buffer" in message
    path.write_bytes(blob[:20])
    assert "runs past the end of the 20-byte file" in refused(path, monkeypatch)


def test_a_bool_tensor_of_other_bytes_is_refused(tmp_path):
    header = {"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    path = raw_file(tmp_path / "b.safetensors", header, b"\x00\x01\x02")
    with pytest.raises(HFFileError, match=r"tensor 'm': a BOOL tensor holds bytes other than 0 and 1"):
        read_safetensors(path)


def test_hostile_headers_are_refused_in_bounded_memory(tmp_path):
    """Peak memory while refusing each claim stays tiny: nothing is allocated from a claimed size."""
    cases = {
        "huge length": raw_file(tmp_path / "a", {}, b"", 2**62),
        "length past EOF": raw_file(tmp_path / "b", {}, b"", MAX_HEADER_BYTES),
        "4 TiB claimed": raw_file(tmp_path / "c", {"a": f32([0, 2**42], shape=(2**20, 2**20))}, bytes(64)),
    }
    for name, path in cases.items():
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            with pytest.raises(HFFileError):
                read_safetensors(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (name, peak)


@pytest.mark.parametrize(("make", "match"), [
    (lambda d: d / "missing.safetensors", "no such file"),
    (lambda d: d, "not a file"),
])
def test_a_path_that_is_no_file_is_refused(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(HFFileError, match=f"^{path}: {match}"):
        read_safetensors(path)


# --- save_pretrained directories ----------------------------------------------------------------


def _torch_and_transformers():
    torch = pytest.importorskip("torch", reason="the save_pretrained fixtures need torch")
    transformers = pytest.importorskip("transformers",
                                       reason="the save_pretrained fixtures need transformers")
    return torch, transformers


def small_hf_config(transformers, **changes):
    opts = dict(d_latents=32, d_model=16, num_latents=8, num_blocks=1, num_self_attends_per_block=2,
                num_self_attention_heads=2, num_cross_attention_heads=1, max_position_embeddings=24,
                image_size=16, num_labels=5)
    opts.update(changes)
    return transformers.PerceiverConfig(**opts)


def hf_model(kind):
    torch, transformers = _torch_and_transformers()
    torch.manual_seed(0)
    if kind == "masked_lm":
        return transformers.PerceiverForMaskedLM(small_hf_config(transformers))
    # The learned-position image classifier concatenates 256 conv channels and 256 position
    # channels: its d_model must be 512.
    return transformers.PerceiverForImageClassificationLearned(small_hf_config(transformers, d_model=512))


def assert_equal_state_dict(arrays, model):
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert_same_arrays(arrays, state)


@pytest.mark.parametrize("kind", ["image_learned", "masked_lm"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_save_pretrained_directory_reads_back_equal(tmp_path, kind, dtype):
    model = hf_model(kind)
    if dtype == "float64":
        model = model.double()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config, arrays = read_pretrained_dir(tmp_path)
    want = "PerceiverForMaskedLM" if kind == "masked_lm" else "PerceiverForImageClassificationLearned"
    assert config["architectures"] == [want]
    assert config["d_latents"] == 32
    assert_equal_state_dict(arrays, model)
    assert {a.dtype for a in arrays.values()} == {np.dtype(dtype)}


def test_masked_lm_has_no_tied_weights_to_restore():
    """PerceiverForMaskedLM's embedding decoder holds only a bias: its forward multiplies by
    ``perceiver.input_preprocessor.embeddings.weight`` itself. Nothing is tied, so save_pretrained
    writes every entry of ``state_dict()`` (checked above) and the embedding matrix once."""
    model = hf_model("masked_lm")
    names = list(model.state_dict())
    assert [n for n in names if n.startswith("embedding_decoder.")] == ["embedding_decoder.bias"]
    assert "perceiver.input_preprocessor.embeddings.weight" in names
    assert model.get_output_embeddings() is None


def test_a_sharded_save_pretrained_directory_reads_back_equal(tmp_path):
    model = hf_model("masked_lm")
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    config, arrays = read_pretrained_dir(tmp_path)
    assert config["architectures"] == ["PerceiverForMaskedLM"]
    assert_equal_state_dict(arrays, model)


def _bin_dir(tmp_path, model, sharded=False):
    """A directory as older transformers wrote it: config.json and pytorch_model.bin (or shards)."""
    torch, _ = _torch_and_transformers()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = model.state_dict()
    if not sharded:
        torch.save(state, tmp_path / "pytorch_model.bin")
        return
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
    for shard, part in halves.items():
        torch.save({n: state[n] for n in part}, tmp_path / shard)
    weight_map = {n: shard for shard, part in halves.items() for n in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_pytorch_model_bin_directory_reads_back_equal(tmp_path, sharded):
    model = hf_model("masked_lm")
    _bin_dir(tmp_path, model, sharded)
    config, arrays = read_pretrained_dir(tmp_path)
    assert config["architectures"] == ["PerceiverForMaskedLM"]
    assert_equal_state_dict(arrays, model)


def test_a_bfloat16_pytorch_model_bin_becomes_float32_exactly(tmp_path):
    model = hf_model("masked_lm").bfloat16()
    _bin_dir(tmp_path, model)
    _, arrays = read_pretrained_dir(tmp_path)
    for name, tensor in model.state_dict().items():
        assert arrays[name].dtype == np.float32
        assert np.array_equal(arrays[name], tensor.float().numpy()), name


def test_a_pytorch_model_bin_without_torch_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(HFFileError, match=r"pytorch_model.bin: a PyTorch pickle; reading it needs torch "
                       r"\(pip install torch\), or convert the model to safetensors"):
        read_pretrained_dir(tmp_path)


def test_a_pytorch_model_bin_that_is_not_a_state_dict_is_refused(tmp_path):
    torch, _ = _torch_and_transformers()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(HFFileError, match=r"pytorch_model\.bin: not a readable PyTorch state dict"):
        read_pretrained_dir(tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(HFFileError, match="expected a state dict"):
        read_pretrained_dir(tmp_path)


def test_safetensors_is_preferred_over_pytorch_model_bin(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"architectures": ["X"]}')
    write_safetensors(tmp_path / "model.safetensors", {"w": np.arange(3.0)})
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    monkeypatch.setitem(sys.modules, "torch", None)
    config, arrays = read_pretrained_dir(tmp_path)
    assert config == {"architectures": ["X"]} and list(arrays) == ["w"]


def _sharded_dir(tmp_path, weight_map, shards):
    (tmp_path / "config.json").write_text("{}")
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, arrays in shards.items():
        write_safetensors(tmp_path / name, arrays)


@pytest.mark.parametrize(("setup", "match"), [
    (lambda d: d / "nowhere",
     r"nowhere: no such directory \(expected a directory written by save_pretrained\)"),
    (lambda d: d, r"config.json: no such file \(the model's configuration"),
    (lambda d: (d / "config.json").write_text("{}") and d,
     r"no weights file; expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
     r"pytorch_model.bin.index.json next to config.json"),
    (lambda d: (d / "config.json").write_text("[1]") and d, r"config.json: expected a JSON object, got list"),
    (lambda d: (d / "config.json").write_text("{oops") and d, r"config.json: not valid UTF-8 JSON"),
    (lambda d: _sharded_dir(d, {"a": "s1.safetensors", "b": "s2.safetensors"},
                            {"s1.safetensors": {"a": np.zeros(2)}}) or d,
     r"s2.safetensors: no such file \(the shard model.safetensors.index.json maps 'b' to\)"),
    (lambda d: _sharded_dir(d, {"a": "s1.safetensors"},
                            {"s1.safetensors": {"a": np.zeros(2), "b": np.zeros(1)}}) or d,
     r"s1.safetensors: does not hold the tensors model.safetensors.index.json maps to it: missing \[\], "
     r"not listed there \['b'\]"),
    (lambda d: _sharded_dir(d, {"a": "s1.safetensors", "c": "s1.safetensors"},
                            {"s1.safetensors": {"a": np.zeros(2)}}) or d, r"missing \['c'\]"),
    (lambda d: _sharded_dir(d, {"a": "../s1.safetensors"}, {}) or d,
     r"tensor 'a': shard '../s1.safetensors' is not a file name in the index's directory"),
    (lambda d: _sharded_dir(d, [1], {}) or d, r"expected an object with a 'weight_map'"),
])
def test_a_bad_directory_is_refused_naming_what_was_expected(tmp_path, setup, match):
    path = setup(tmp_path)
    with pytest.raises(HFFileError, match=match) as err:
        read_pretrained_dir(path)
    assert str(err.value).startswith(str(tmp_path))


def test_a_huge_config_json_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_files, "MAX_CONFIG_BYTES", 10)
    (tmp_path / "config.json").write_text('{"a": "0123456789"}')
    with pytest.raises(HFFileError, match=r"config.json: 19 bytes, more than the 10 read"):
        read_pretrained_dir(tmp_path)


def test_read_returns_independent_writable_arrays(tmp_path):
    path = write_safetensors(tmp_path / "a.safetensors", {"a": np.arange(4.0)})
    got = read_safetensors(path)
    Path(path).unlink()
    got["a"][0] = 7.0
    assert got["a"].tolist() == [7.0, 1.0, 2.0, 3.0]
