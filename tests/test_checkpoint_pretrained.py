"""Checkpoints of the published Perceivers (save_checkpoint(..., model=pretrained_model)):
bit-identical round trips of parameters, buffers, architecture and hf_config, the model rebuilt
from them, expect_model, and the hostile-file guarantees of tests/test_checkpoint.py for what
these checkpoints add (the stored hf_config, the buffers)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import pretrained
from perceiver_np.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .test_checkpoint import (
    GIB,
    ZEROS,
    adam_state,
    assert_arrays_bitwise_equal,
    craft,
    deflate_bomb,
    entries,
    get_meta,
    npy_header,
    refusal_peak,
    rewrite,
    set_meta,
)

SMALL = dict(num_latents=6, d_latents=16, num_blocks=1, num_self_attends_per_block=2,
             num_self_attention_heads=2, num_cross_attention_heads=1, attention_probs_dropout_prob=0.0)
CONV = "PerceiverForImageClassificationConvProcessing"
#: id2label with int keys, as transformers' config.to_dict() has them (config.json: strings)
CONFIG = {**SMALL, "d_model": 322, "num_labels": 3, "id2label": {0: "cat", 1: "dog", 2: "eel"}}


def conv_model(dtype="float64", **changes):
    rng = np.random.default_rng(1)
    buffers = {"preprocessor.batchnorm.running_mean": 0.1 * rng.standard_normal(64),
               "preprocessor.batchnorm.running_var": 0.5 + rng.random(64)}
    return pretrained.PretrainedPerceiver(CONV, {**CONFIG, **changes}, None,
                                          {k: v.astype(dtype) for k, v in buffers.items()}, dtype=dtype)


def saved(tmp_path, model=None, name="ck.npz"):
    model = conv_model() if model is None else model
    rng = np.random.default_rng(7)
    rng.normal(size=3)
    path = save_checkpoint(tmp_path / name, model=model, params=model.params, step=3,
                           opt_state=adam_state(model.params, step=3), rng=rng, extra={"epoch": 1})
    return path, model


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_round_trip_is_bit_identical_and_rebuilds_the_model(tmp_path, dtype):
    path, model = saved(tmp_path, conv_model(dtype))
    ck = load_checkpoint(path, expect_model=model)
    assert ck.architecture == CONV and ck.config == model.config and ck.step == 3
    assert ck.hf_config == json.loads(json.dumps(model.hf_config))  # id2label's keys as strings
    assert_arrays_bitwise_equal(ck.params, model.checked_params())
    assert_arrays_bitwise_equal(ck.buffers, model.buffers)
    assert set(ck.opt_state) == set(adam_state(model.params))
    again = ck.model()
    assert isinstance(again, pretrained.PretrainedPerceiver) and again.architecture == CONV
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 20)).astype(dtype)
    assert model(x).tobytes() == again(x).tobytes()
    # the file: meta.json's pretrained entry and buffer listing, one member per tensor
    ents = entries(path)
    meta = get_meta(ents)
    assert meta["pretrained"]["architecture"] == CONV and meta["pretrained"]["hf_config"]["num_labels"] == 3
    assert [b["name"] for b in meta["buffers"]] == list(model.buffer_specs())
    assert {k for k in ents if k.startswith("buffers/")} == {f"buffers/{k}" for k in model.buffers}


def test_a_text_model_without_buffers_and_a_perceiver_through_model(tmp_path):
    text = pretrained.PretrainedPerceiver("PerceiverForMaskedLM", {**SMALL, "d_model": 16, "vocab_size": 262,
                                                                   "max_position_embeddings": 10})
    path, _ = saved(tmp_path, text)
    ck = load_checkpoint(path, expect_model=text)
    assert ck.buffers == {} and ck.architecture == "PerceiverForMaskedLM"
    plain = pnp.Perceiver(pnp.PerceiverConfig(input_dim=5, latent_dim=8, num_latents=3, num_layers=1,
                                              num_heads=2, dtype="float64"))
    p = save_checkpoint(tmp_path / "plain.npz", model=plain, params=plain.params)
    assert "pretrained" not in get_meta(entries(p))
    ck = load_checkpoint(p, expect_model=plain)
    assert ck.architecture is ck.hf_config is ck.buffers is None
    assert isinstance(ck.model(), pnp.Perceiver)


def test_expect_model_names_what_differs(tmp_path):
    path, model = saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"hf_config differs from expect_model's in 2 field\(s\): "
                                              r"num_labels: checkpoint 3, expected 4; id2label: "):
        load_checkpoint(path, expect_model=conv_model(num_labels=4, id2label=None))
    with pytest.raises(CheckpointError, match=rf"holds a published {CONV}, expect_model is a Perceiver"):
        load_checkpoint(path, expect_model=pnp.Perceiver(model.config))
    fourier = pretrained.PretrainedPerceiver("PerceiverForImageClassificationFourier",
                                             {**CONFIG, "d_model": 261})
    with pytest.raises(CheckpointError, match=rf"holds a {CONV}, expect_model is a "
                                              "PerceiverForImageClassificationFourier"):
        load_checkpoint(path, expect_model=fourier)
    with pytest.raises(CheckpointError,
                       match=r"config differs from expect_model.config in 1 field\(s\): dtype"):
        load_checkpoint(path, expect_model=conv_model("float32"))
    with pytest.raises(TypeError, match="expect_model: expected a Perceiver, a PretrainedPerceiver or None"):
        load_checkpoint(path, expect_model=model.config)


def test_save_checks_params_buffers_and_arguments(tmp_path):
    model = conv_model()
    bad_buffer = conv_model()
    bad_buffer.buffers["preprocessor.batchnorm.running_var"] = np.ones(63)
    nan_buffer = conv_model()
    nan_buffer.buffers["preprocessor.batchnorm.running_mean"] = np.full(64, np.nan)
    params = dict(model.params)
    del params["decoder.queries"]
    cases = [
        (dict(model=model, params=params),
         r"params: missing tensor\(s\) \['decoder.queries'\] required by the model"),
        (dict(model=bad_buffer, params=model.params),
         r"buffers: buffers\['preprocessor.batchnorm.running_var'\]: expected shape \(64,\) from the model, "
         r"got \(63,\)"),
        (dict(model=nan_buffer, params=model.params),
         r"buffers\['preprocessor.batchnorm.running_mean'\]: 64 of 64 entries are not finite"),
        (dict(model=model, params={k: v.astype(np.float32) for k, v in model.params.items()}),
         r"params\['latents'\]: expected dtype float64 \(config.dtype\), got float32"),
        (dict(model=model, config=model.config, params=model.params), "config, model: expected one of them"),
        (dict(params=model.params), "config: expected a PerceiverConfig, got NoneType"),
        (dict(model=model.config, params=model.params),
         "model: expected a Perceiver or a PretrainedPerceiver"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CheckpointError, match=message):
            save_checkpoint(tmp_path / "c.npz", **kwargs)
    assert not list(tmp_path.iterdir())


# --- hostile and damaged files -------------------------------------------------------------------


def _forged(tmp_path, change, name="bad.npz"):
    """The saved checkpoint with meta.json changed by ``change(meta)`` (and entries by its return)."""
    path, _ = saved(tmp_path)
    ents = entries(path)
    meta = get_meta(ents)
    change(meta, ents)
    set_meta(ents, meta)
    return craft(tmp_path / name, ents)


@pytest.mark.parametrize(("change", "message"), [
    (lambda meta, ents: meta.pop("buffers"), r"truncated or corrupt .*lacks keys \['buffers'\]"),
    (lambda meta, ents: meta.update(pretrained=[CONV]), "the pretrained entry of meta.json is malformed"),
    (lambda meta, ents: meta["pretrained"].update(architecture="PerceiverForTea"),
     r"the stored model \(PerceiverForTea, hf_config\) is invalid: architecture: 'PerceiverForTea' is not "
     "supported"),
    (lambda meta, ents: meta["pretrained"]["hf_config"].update(hidden_act="relu"),
     r"the stored model .* is invalid: hidden_act: 'relu' is not supported"),
    (lambda meta, ents: meta["pretrained"]["hf_config"].update(d_latents=32),
     r"the stored config is not the encoder config of its .* and hf_config: latent_dim: stored 16, "
     r"rebuilt 32"),
    (lambda meta, ents: ents.update({"buffers/preprocessor.batchnorm.running_var": np.ones(63)}),
     r"tensor 'buffers/preprocessor.batchnorm.running_var': expected shape \(64,\) from the stored "),
    (lambda meta, ents: ents.pop("buffers/preprocessor.batchnorm.running_mean"),
     r"missing tensor\(s\) \['preprocessor.batchnorm.running_mean'\] required by the stored "),
    (lambda meta, ents: ents.update({"buffers/preprocessor.batchnorm.running_mean": np.full(64, np.inf)}),
     "tensor 'buffers/preprocessor.batchnorm.running_mean': 64 of 64 entries are not finite"),
    (lambda meta, ents: meta["buffers"][0].update(shape=[65]),
     r"meta.json lists buffers 'preprocessor.batchnorm.running_mean' as <f8 \(65,\)"),
])
def test_a_damaged_or_forged_published_checkpoint_is_refused(tmp_path, change, message):
    bad = _forged(tmp_path, change)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(bad)
    assert str(err.value).startswith(str(bad))


def test_buffers_in_a_perceiver_checkpoint_are_unexpected(tmp_path):
    plain = pnp.Perceiver(pnp.PerceiverConfig(input_dim=5, latent_dim=8, num_latents=3, num_layers=1,
                                              num_heads=2, dtype="float64"))
    ents = entries(save_checkpoint(tmp_path / "p.npz", model=plain, params=plain.params))
    ents.pop("params/latents")
    ents["buffers/latents"] = plain.params["latents"]
    with pytest.raises(CheckpointError, match=r"unexpected entry 'buffers/latents' \(a checkpoint holds only "
                                              r"meta.json, params/<name> and opt/<name>\)"):
        load_checkpoint(craft(tmp_path / "bad.npz", ents))


def test_more_entries_than_described_are_refused_before_zipfile_parses_them(tmp_path):
    def add(meta, ents):
        ents.update({f"buffers/extra{i}": np.zeros(1) for i in range(3)})

    bad = _forged(tmp_path, add)
    _, model = saved(tmp_path, name="again.npz")
    n_params, n_opt = len(model.specs()), len(adam_state(model.params))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert (f"the zip directory holds {1 + n_params + 2 + n_opt + 3} entries, meta.json describes "
            f"{1 + n_params + 2 + n_opt} (meta.json, the {n_params} parameters and 2 buffers of its {CONV} "
            f"and {n_opt} optimizer-state tensors)") in str(err.value)


@pytest.mark.parametrize("forge", ["hf_config", "hf_config_and_config"])
def test_an_hf_config_of_a_billion_blocks_is_refused_before_its_schema_is_built(tmp_path, forge):
    def change(meta, ents):
        meta["pretrained"]["hf_config"]["num_self_attends_per_block"] = 10**9
        if forge == "hf_config_and_config":
            meta["config"]["num_layers"] = 10**9

    bad = _forged(tmp_path, change)
    msg, peak = refusal_peak(bad)
    if forge == "hf_config":
        assert "the stored config is not the encoder config" in msg and "num_layers: stored 2, rebuilt" in msg
    else:
        assert "meta.json describes at least 1000000003" in msg
    assert peak < 4 << 20, peak  # a schema of 1e9 blocks would be ~1e10 objects


def test_a_decompression_bomb_in_a_buffer_is_refused_from_its_header(tmp_path, monkeypatch):
    path, _ = saved(tmp_path)
    member = "buffers/preprocessor.batchnorm.running_mean"
    bomb = deflate_bomb(npy_header((2**28,), "<f8"), 2 * GIB // len(ZEROS), monkeypatch)
    bad = rewrite(path, tmp_path / "bomb.npz", {f"{member}.npy": bomb})
    with zipfile.ZipFile(bad) as z:
        assert max(i.file_size for i in z.infolist()) >= 2 * GIB
    msg, peak = refusal_peak(bad)
    assert repr(member) in msg and "expected shape (64,)" in msg, msg
    assert peak < 2 * path.stat().st_size, peak
