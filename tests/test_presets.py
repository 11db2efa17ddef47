"""Presets and the switches they set: masked_rows, the latents output."""

from __future__ import annotations

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.gradcheck import check_model
from perceiver_np.tolerances import FLOAT64_RTOL, GRADCHECK_RTOL

from .helpers import small_opts


@pytest.mark.parametrize("name", pnp.presets.PRESETS)
def test_presets_build_and_run(rng, name):
    small = {"latent_dim": 8, "num_latents": 3, "num_layers": 2, "num_blocks": 2, "num_heads": 2,
             "cross_heads": 1, "dtype": "float64"}
    opts = pnp.presets.preset(name, input_dim=4, **small)
    model = pnp.build(**opts)
    y = model(rng.normal(size=(2, 5, 4)))
    assert np.isfinite(y).all()
    if name == "edifice":
        assert y.shape == (2, 8)
        assert pnp.presets.edifice(input_dim=287) == {**pnp.recommended_defaults(), "input_dim": 287}
    elif name == "lucidrains":
        assert y.shape == (2, 1000)  # perceiver-pytorch's classifier head, 1000 classes by default
    else:
        assert y.shape == (2, 3, 8)  # the latents: DeepMind's encoder output, HF's last_hidden_state
    with pytest.raises(ValueError, match="preset: expected one of"):
        pnp.presets.preset("perceiver-tf")


def test_preset_defaults_are_the_published_ones():
    dm = pnp.PerceiverConfig(input_dim=3, **pnp.presets.deepmind())
    assert (dm.gelu, dm.input_projection, dm.cross_num_heads, dm.num_heads, dm.num_blocks) == (
        "tanh", False, 1, 8, 8)
    assert (dm.cross_qk, dm.masked_rows, dm.final_norm) == (3, "zero", False)
    hf = pnp.PerceiverConfig(input_dim=768, **pnp.presets.hf())
    assert (hf.gelu, hf.latent_dim, hf.num_latents, hf.num_layers, hf.dropout, hf.attention_dropout,
            hf.masked_rows) == ("exact", 1280, 256, 26, 0.0, 0.1, "uniform")


def test_uniform_masked_rows_attend_to_every_key(rng):
    model = pnp.build(**small_opts(masked_rows="uniform", decoder="latents", final_norm=False,
                                   num_layers=1, backend="numpy"))
    for name, v in model.params.items():
        model.params[name] = v + 0.3 * rng.normal(size=v.shape)
    x = rng.normal(size=(2, 4, 5))
    mask = np.array([[0, 0, 0, 0], [1, 0, 1, 1]], dtype=bool)
    _, cache = model.forward(x, mask)
    p = cache.steps[0].attn.attn.softmax.p  # [B, H, M, N]
    assert np.abs(p[0] - 0.25).max() <= FLOAT64_RTOL  # uniform over all 4 keys
    assert np.all(p[1][..., ~mask[1]] == 0)
    zero = pnp.Perceiver(model.config.replace(masked_rows="zero", backend="numpy"), model.params)
    y_zero = zero.forward(x, mask)[0]  # the same plain composition, rows with no key zeroed
    assert np.array_equal(model(x, mask)[1], y_zero[1])  # only fully masked rows differ
    assert np.abs(model(x, mask)[0] - y_zero[0]).max() > 1e-3
    report = check_model(model, x, mask, max_entries=8)  # the backward is this forward's derivative
    assert report.max_rel_error <= GRADCHECK_RTOL, str(report)
    _, dx = model.backward(rng.normal(size=(2, 3, 8)), cache)
    # the uniform row averages every key's value, the masked ones included (HF's semantics: no
    # mask invariance for such a sample), so its masked inputs do get a gradient, through v only
    assert np.abs(dx[0]).max() > 0


def test_uniform_masked_rows_use_the_plain_path(rng):
    auto = pnp.build(**small_opts(masked_rows="uniform"))
    _, cache = auto.forward(rng.normal(size=(1, 4, 5)))
    assert type(cache.steps[0].attn.attn).__name__ == "AttentionCache"
    with pytest.raises(ValueError, match="backend: 'numba' zeroes attention rows"):
        pnp.build(**small_opts(masked_rows="uniform", backend="numba"))
    with pytest.raises(ValueError, match="masked_rows: expected one of"):
        pnp.build(**small_opts(masked_rows="nan"))


def test_from_deepmind_defaults_are_the_deepmind_preset():
    assert pnp.presets.from_deepmind() == pnp.presets.deepmind()


def test_from_deepmind_imagenet_classifier():
    """DeepMind's ImageNet configuration (its experiment config's encoder and decoder
    arguments), made small; the model it describes, built."""
    enc = dict(num_self_attends_per_block=2, num_blocks=3, z_index_dim=8, num_z_channels=16,
               num_cross_attend_heads=1, num_self_attend_heads=4, cross_attend_widening_factor=1,
               self_attend_widening_factor=1, dropout_prob=0.0, z_pos_enc_init_scale=0.02,
               cross_attention_shape_for_attn="kv", use_query_residual=True)
    dec = dict(num_z_channels=16, use_query_residual=True, position_encoding_type="trainable",
               trainable_position_encoding_kwargs=dict(num_channels=16, init_scale=0.02), num_classes=5)
    opts = pnp.presets.from_deepmind(enc, dec, input_dim=11, dtype="float64")
    model = pnp.build(**opts)
    cfg = model.config
    assert (cfg.latent_dim, cfg.num_latents, cfg.num_layers, cfg.num_blocks) == (16, 8, 2, 3)
    assert (cfg.cross_heads, cfg.num_heads, cfg.gelu, cfg.masked_rows) == (1, 4, "tanh", "zero")
    assert (cfg.decoder, cfg.output_dim, cfg.decoder_query_channels) == ("classification", 5, 16)
    assert cfg.decoder_query_residual and not cfg.input_projection and not cfg.final_norm
    assert model.params["cross.0.attn.q.weight"].shape == (16, 11)  # qk width from the input ('kv')
    assert model.params["decoder.queries"].shape == (1, 16)
    assert model(np.zeros((2, 3, 11))).shape == (2, 5)


def test_from_deepmind_q_shape_takes_the_qk_width_from_the_latents():
    opts = pnp.presets.from_deepmind(dict(num_z_channels=16, z_index_dim=4, num_self_attend_heads=2,
                                          cross_attention_shape_for_attn="q"), input_dim=7)
    assert pnp.build(**opts).params["cross.0.attn.q.weight"].shape == (16, 16)


def test_from_deepmind_basic_decoders():
    enc = dict(num_z_channels=16, z_index_dim=4, num_self_attend_heads=2)
    trainable = pnp.presets.from_deepmind(enc, dict(num_z_channels=16, output_num_channels=3,
                                                    output_index_dims=(2, 3), num_heads=2,
                                                    trainable_position_encoding_kwargs={"num_channels": 8}))
    assert (trainable["decoder"], trainable["num_outputs"], trainable["query_dim"]) == ("query", 6, 8)
    fourier = pnp.presets.from_deepmind(enc, dict(num_z_channels=16, output_num_channels=3,
                                                  output_index_dims=5, position_encoding_type="fourier",
                                                  fourier_position_encoding_kwargs={"num_bands": 4}))
    assert (fourier["query_source"], fourier["output_index_dims"], fourier["query_num_bands"]) == \
        ("fourier", (5,), 4)
    for opts in (trainable, fourier):
        assert pnp.build(input_dim=3, **opts).config.decoder == "query"


@pytest.mark.parametrize("enc, dec, message", [
    (dict(num_z_channel=16), None, r"encoder_kwargs: unknown argument\(s\) \['num_z_channel'\]"),
    (None, dict(num_classes=3, num_heads=1, widening_factor=2), r"decoder_kwargs: unknown .*widening_factor"),
    (None, dict(num_classes=3, concat_preprocessed_input=True), "concat_preprocessed_input.*not supported"),
    (None, dict(num_classes=3, final_project=False), "final_project.*not supported"),
    (None, dict(num_classes=3, num_z_channels=8), r"num_z_channels'\]: 8 but the encoder's .* is 1024"),
    (None, dict(output_num_channels=3), "needs output_num_channels and output_index_dims"),
    (dict(cross_attention_shape_for_attn="qk"), None, "expected 'kv' or 'q', got 'qk'"),
])
def test_from_deepmind_refuses_what_it_cannot_map(enc, dec, message):
    with pytest.raises(ValueError, match=message):
        pnp.presets.from_deepmind(enc, dec)
