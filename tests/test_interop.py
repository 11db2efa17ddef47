"""Weight import and export (perceiver_np.interop) against Hugging Face ``transformers``' own
``PerceiverModel``, DeepMind's Haiku names and plain parameter files.

For every configuration below an HF model is built in code with random weights (nothing is
downloaded: ``torch.manual_seed``, then every Linear weight N(0, 1/fan_in), every bias, LayerNorm
weight and bias, the latents and the trainable queries random too, so that nothing is trivially
0 or 1 and the softmaxes are neither uniform nor saturated), imported with ``from_hf``, and:

- float32 (HF float32, ours float32): outputs agree to INTEROP_FLOAT32_RTOL;
- float64 (HF ``.double()``, ours float64): outputs agree to INTEROP_FLOAT64_RTOL, and EVERY
  parameter gradient and the input gradient of ``sum(y * dy)`` (random ``dy``) agree with torch
  autograd to INTEROP_GRAD_RTOL, through the same name map (Linear weights transposed);
- a sample with no visible input (forward only: HF's autograd gradient of such a row is not the
  derivative of its forward, docs/verify.md);
- round trips: HF -> ours -> HF state dict bit-identical, loaded strictly into a fresh HF model
  built from ``to_hf_config`` giving HF's outputs bit for bit; ours -> Haiku -> ours
  bit-identical, and the Haiku names turned into HF's by a transcription of HF's conversion
  script landing on exactly our HF export.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import interop
from perceiver_np.interop import InteropError
from perceiver_np.tolerances import (
    INTEROP_FLOAT32_RTOL,
    INTEROP_FLOAT64_RTOL,
    INTEROP_GRAD_FLOOR,
    INTEROP_GRAD_RTOL,
)

HF_REASON = "the Hugging Face comparison needs torch and transformers: pip install -e '.[compare]'"
B, N = 3, 7

#: Each case: HF config kwargs, the decoder (its type and HF constructor kwargs, exactly the
#: documented ``decoder_config``), the LinearPreprocessor's input width (None: no preprocessor),
#: and whether the samples are partially masked.
CASES: dict[str, dict[str, Any]] = {
    "one_head": dict(
        config=dict(num_latents=3, d_latents=8, d_model=5, num_self_attends_per_block=2,
                    num_self_attention_heads=1, num_cross_attention_heads=1),
        decoder=None, pre=None, mask=False),
    "heads_mask": dict(
        config=dict(num_latents=4, d_latents=8, d_model=6, num_self_attends_per_block=2,
                    num_self_attention_heads=4, num_cross_attention_heads=2),
        decoder=None, pre=None, mask=True),
    "qk_v": dict(
        config=dict(num_latents=4, d_latents=8, d_model=6, num_self_attends_per_block=2,
                    num_self_attention_heads=2, num_cross_attention_heads=2,
                    qk_channels=4, v_channels=8),
        decoder=None, pre=None, mask=True),
    "blocks": dict(
        config=dict(num_latents=3, d_latents=8, d_model=5, num_blocks=3, num_self_attends_per_block=2,
                    num_self_attention_heads=2, num_cross_attention_heads=1,
                    cross_attention_widening_factor=2, self_attention_widening_factor=3,
                    use_query_residual=False),
        decoder=None, pre=None, mask=True),
    "classification": dict(
        config=dict(num_latents=4, d_latents=8, d_model=8, num_self_attends_per_block=2,
                    num_self_attention_heads=2, num_cross_attention_heads=2, num_labels=5),
        decoder=dict(type="classification", num_channels=6, num_heads=2, qk_channels=4,
                     widening_factor=2, use_query_residual=True,
                     trainable_position_encoding_kwargs=dict(num_channels=6, index_dims=1)),
        pre=7, mask=True),
    "basic_300": dict(
        config=dict(num_latents=4, d_latents=8, d_model=5, num_self_attends_per_block=1,
                    num_self_attention_heads=2, num_cross_attention_heads=1,
                    cross_attention_shape_for_attention="q"),
        decoder=dict(type="basic", output_num_channels=3, num_channels=4, output_index_dims=300,
                     trainable_position_encoding_kwargs=dict(num_channels=4, index_dims=300)),
        pre=None, mask=True),
    "preprocessor": dict(
        config=dict(num_latents=3, d_latents=8, d_model=8, num_self_attends_per_block=2,
                    num_self_attention_heads=2, num_cross_attention_heads=4,
                    attention_probs_dropout_prob=0.1),
        decoder=None, pre=4, mask=True),
}
#: Cases whose forward is also checked with a sample that sees no input at all.
FULLY_MASKED_CASES = ["heads_mask", "classification", "basic_300"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One BLAS and one torch thread: the models are tiny, and two shared cores oversubscribe."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(1, user_api="blas"))
        torch = sys.modules.get("torch")
        if torch is not None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, threads)
        yield


@pytest.fixture(scope="module")
def hf() -> Any:
    """transformers' perceiver module (skips the test without torch and transformers)."""
    pytest.importorskip("torch", reason=HF_REASON)
    pytest.importorskip("transformers", reason=HF_REASON)
    from transformers.models.perceiver import modeling_perceiver

    return modeling_perceiver


# ---------------------------------------------------------------------------------------------
# building HF models and running both
# ---------------------------------------------------------------------------------------------


def build_hf(hf: Any, config: dict[str, Any], decoder: dict[str, Any] | None, pre: int | None,
             seed: int = 0, randomise: bool = True) -> Any:
    """A float32 HF PerceiverModel in eval mode, every parameter random (see the module doc)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    cfg = hf.PerceiverConfig(**config)
    dec = None
    if decoder is not None:
        kwargs = {k: v for k, v in decoder.items() if k != "type"}
        classification = decoder["type"] == "classification"
        cls = hf.PerceiverClassificationDecoder if classification else hf.PerceiverBasicDecoder
        dec = cls(cfg, **kwargs)
    prep = None if pre is None else interop.LinearPreprocessor(pre, cfg.d_latents)
    model = hf.PerceiverModel(cfg, decoder=dec, input_preprocessor=prep).eval()
    if randomise:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, module.in_features ** -0.5)
                    module.bias.normal_(0.0, 0.5)
                elif isinstance(module, nn.LayerNorm):
                    module.weight.normal_(1.0, 0.5)
                    module.bias.normal_(0.0, 0.5)
            model.embeddings.latents.normal_(0.0, 1.0)
            for name, p in model.named_parameters():
                if name.endswith("position_embeddings"):
                    p.normal_(0.0, 1.0)
    return model


def case_model(hf: Any, name: str, seed: int = 0) -> Any:
    case = CASES[name]
    return build_hf(hf, case["config"], case["decoder"], case["pre"], seed=seed)


def inputs(
    model: Any, case: str, seed: int, fully_masked: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """x [B, N, C] and the mask (True = keep): sample 0 all visible, sample 1 with a padded tail,
    sample 2 scattered padding (or, ``fully_masked``, nothing visible)."""
    rng = np.random.default_rng(seed)
    c = model.input_preprocessor.linear.in_features if model.input_preprocessor else model.config.d_model
    x = rng.standard_normal((B, N, c))
    if not CASES[case]["mask"] and not fully_masked:
        return x, None
    mask = np.ones((B, N), dtype=bool)
    mask[1, 4:] = False
    mask[2, ::2] = False
    if fully_masked:
        mask[2] = False
    return x, mask


def hf_output(model: Any, x: np.ndarray, mask: np.ndarray | None, grad: bool = False) -> Any:
    import torch

    tx = torch.from_numpy(x).to(next(model.parameters()).dtype).requires_grad_(grad)
    tmask = None if mask is None else torch.from_numpy(mask.astype(np.int64))
    out = model(inputs=tx, attention_mask=tmask)
    y = out.logits if out.logits is not None else out.last_hidden_state
    return tx, y


def normwise(ours: np.ndarray, theirs: np.ndarray, scale: float | None = None) -> float:
    """max|ours - theirs| / max|theirs| (or / ``scale``)."""
    diff = float(np.max(np.abs(ours - theirs)))
    denom = float(np.max(np.abs(theirs))) if scale is None else scale
    return diff / denom if denom else (0.0 if diff == 0.0 else float("inf"))


# ---------------------------------------------------------------------------------------------
# outputs and gradients against HF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_float32_outputs_match_hf(hf: Any, case: str) -> None:
    import torch

    model = case_model(hf, case)
    ours = interop.from_hf(model, dtype="float32")
    assert ours.config.dtype == "float32" and ours.config.masked_rows == "uniform"
    x, mask = inputs(model, case, seed=1)
    with torch.no_grad():
        _, ref = hf_output(model, x, mask)
    y = ours(x.astype(np.float32), mask)
    assert y.dtype == np.float32 and y.shape == tuple(ref.shape)
    err = normwise(y.astype(np.float64), ref.numpy().astype(np.float64))
    assert err <= INTEROP_FLOAT32_RTOL, f"{case}: float32 output error {err:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_float64_outputs_and_every_gradient_match_hf(hf: Any, case: str) -> None:
    import torch

    model = case_model(hf, case).double()
    ours = interop.from_hf(model, dtype="float64")
    x, mask = inputs(model, case, seed=2)
    tx, ref = hf_output(model, x, mask, grad=True)
    y, cache = ours.forward(x, mask)
    err = normwise(y, ref.detach().numpy())
    assert err <= INTEROP_FLOAT64_RTOL, f"{case}: float64 output error {err:.2e}"

    dy = np.random.default_rng(3).standard_normal(y.shape)
    grads, dx = ours.backward(dy, cache)
    named = dict(model.named_parameters())
    names = interop.hf_name_map(ours.config)
    assert sorted(names.values()) == sorted(named), "the name map covers exactly HF's parameters"
    order = list(names)
    tgrads = torch.autograd.grad((ref * torch.from_numpy(dy)).sum(), [tx, *(named[names[k]] for k in order)])
    tdx = tgrads[0].numpy()
    theirs = {  # HF Linear weights are [out, in]: their gradients too
        k: (g.numpy().T if k.endswith(".weight") else g.numpy())
        for k, g in zip(order, tgrads[1:], strict=True)
    }
    scale = max(float(np.max(np.abs(g))) for g in theirs.values())
    worst = {}
    for k in order:
        # the key-projection biases' exact gradient is 0 (they shift a whole softmax row): both
        # sides return rounding noise there, compared against the floor, not its own size
        floor = INTEROP_GRAD_FLOOR * scale
        worst[k] = normwise(grads[k], theirs[k], max(float(np.max(np.abs(theirs[k]))), floor))
    bad = {k: f"{e:.2e}" for k, e in worst.items() if not e <= INTEROP_GRAD_RTOL}
    assert not bad, f"{case}: gradients off: {bad}"
    err_dx = normwise(dx, tdx)
    assert err_dx <= INTEROP_GRAD_RTOL, f"{case}: input gradient error {err_dx:.2e}"


@pytest.mark.parametrize("case", FULLY_MASKED_CASES)
def test_fully_masked_sample_forward_matches_hf(hf: Any, case: str) -> None:
    """A sample with no visible input attends uniformly over its padding in HF (every logit plus
    finfo.min rounds to finfo.min): masked_rows='uniform' reproduces it, in both precisions."""
    import torch

    model = case_model(hf, case)
    x, mask = inputs(model, case, seed=4, fully_masked=True)
    assert mask is not None and not mask[2].any()
    for dtype, tol in (("float32", INTEROP_FLOAT32_RTOL), ("float64", INTEROP_FLOAT64_RTOL)):
        m = model.double() if dtype == "float64" else model.float()
        with torch.no_grad():
            _, ref = hf_output(m, x, mask)
        y = interop.from_hf(m, dtype=dtype)(x, mask)
        err = normwise(y.astype(np.float64), ref.numpy().astype(np.float64))
        assert err <= tol, f"{case} {dtype}: {err:.2e}"
        # the fully masked sample itself, not only the batch's largest output
        err2 = normwise(y[2].astype(np.float64), ref[2].numpy().astype(np.float64))
        assert err2 <= tol, f"{case} {dtype}: fully masked sample {err2:.2e}"


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


def assert_same_params(a: pnp.Perceiver, b: pnp.Perceiver) -> None:
    assert a.config == b.config
    assert list(a.params) == list(b.params)
    for k in a.params:
        assert a.params[k].dtype == b.params[k].dtype and a.params[k].shape == b.params[k].shape, k
        assert a.params[k].tobytes() == b.params[k].tobytes(), f"{k} differs"


@pytest.mark.parametrize("case", list(CASES))
def test_hf_round_trip_is_bit_identical(hf: Any, case: str) -> None:
    import torch

    model = case_model(hf, case)
    ours = interop.from_hf(model, dtype="float32")
    state = interop.to_hf_state_dict(ours)
    theirs = model.state_dict()
    assert list(state) == list(interop.hf_name_map(ours.config).values())
    assert set(state) == set(theirs)
    for k, v in state.items():
        assert v.dtype == np.float32 and v.flags.c_contiguous
        assert v.tobytes() == theirs[k].numpy().tobytes(), f"{k}: export differs from HF's tensor"
    config_kwargs, decoder_config = interop.to_hf_config(ours)
    again = interop.from_hf_state_dict(state, config_kwargs, decoder_config=decoder_config, dtype="float32")
    assert_same_params(ours, again)
    # the documented decoder_config (HF's decoder kwargs + type) and config.to_dict() do it too
    plain = {k: v.numpy() for k, v in model.state_dict().items()}
    direct = interop.from_hf_state_dict(plain, model.config.to_dict(), decoder_config=CASES[case]["decoder"],
                                        dtype="float32")
    assert_same_params(ours, direct)
    # float32 -> float64 -> float32 is exact too
    assert_same_params(ours, interop.from_hf_state_dict(
        interop.to_hf_state_dict(interop.from_hf(model)), config_kwargs,
        decoder_config=decoder_config, dtype="float32"))

    # our export, loaded strictly into a fresh HF model built from to_hf_config, is the model
    pre = ours.config.input_dim if ours.config.input_projection else None
    fresh = build_hf(hf, config_kwargs, decoder_config, pre, seed=99)
    assert any(not torch.equal(p, theirs[k]) for k, p in fresh.state_dict().items())
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x, mask = inputs(model, case, seed=5)
    with torch.no_grad():
        _, ref = hf_output(model, x, mask)
        _, out = hf_output(fresh, x, mask)
    assert torch.equal(ref, out)


def hf_rename(name: str) -> tuple[str, bool]:
    """A transcription of ``rename_keys`` of transformers' convert_perceiver_haiku_to_pytorch.py
    (the encoder and decoder rules, in the script's order): Haiku ``module/param`` -> the HF key
    (without the script's ``perceiver.`` prefix) and whether the script transposes it."""
    for old, new in (
        ("classification_decoder/~/basic_decoder/~/trainable_position_encoding/pos_embs",
         "decoder.decoder.output_position_encodings.position_embeddings"),
        ("basic_decoder/~/trainable_position_encoding/pos_embs",
         "decoder.output_position_encodings.position_embeddings"),
        ("classification_decoder/~/basic_decoder/cross_attention/",
         "decoder.decoder.decoding_cross_attention."),
        ("classification_decoder/~/basic_decoder/output/b", "decoder.decoder.final_layer.bias"),
        ("classification_decoder/~/basic_decoder/output/w", "decoder.decoder.final_layer.weight"),
        ("classification_decoder/~/basic_decoder/~/", "decoder.decoder."),
        ("basic_decoder/cross_attention/", "decoder.decoding_cross_attention."),
        ("basic_decoder/~/", "decoder."),
        ("perceiver_encoder/~/trainable_position_encoding/pos_embs", "embeddings.latents"),
    ):
        name = name.replace(old, new)
    if name.startswith("perceiver_encoder/~/"):
        suffix = "self_attends." if "self_attention" in name else ""
        name = name.replace("perceiver_encoder/~/", "encoder." + suffix)
    name = name.replace("offset", "bias") if "offset" in name else name
    name = name.replace("scale", "weight") if "scale" in name else name
    if "cross_attention" in name and "layer_norm_2" in name:
        name = name.replace("layer_norm_2", "layernorm")
    if "self_attention" in name and "layer_norm_1" in name:
        name = name.replace("layer_norm_1", "layernorm")
    if "cross_attention" in name and "layer_norm_1" in name:
        name = name.replace("layer_norm_1", "attention.self.layernorm2")
    if "cross_attention" in name and "layer_norm" in name:
        name = name.replace("layer_norm", "attention.self.layernorm1")
    if "self_attention" in name and "layer_norm" in name:
        name = name.replace("layer_norm", "attention.self.layernorm1")
    name = name.replace("-", ".").replace("/", ".")
    if ("cross_attention" in name or "self_attention" in name) and "mlp" not in name:
        for old, new in (("linear.b", "self.query.bias"), ("linear.w", "self.query.weight"),
                         ("linear_1.b", "self.key.bias"), ("linear_1.w", "self.key.weight"),
                         ("linear_2.b", "self.value.bias"), ("linear_2.w", "self.value.weight"),
                         ("linear_3.b", "output.dense.bias"), ("linear_3.w", "output.dense.weight")):
            if old in name:
                name = name.replace(old, new)
    if "self_attention_" in name:
        name = name.replace("self_attention_", "")
    if "self_attention" in name:
        name = name.replace("self_attention", "0")
    if "mlp" in name:
        for old, new in (("linear.b", "dense1.bias"), ("linear.w", "dense1.weight"),
                         ("linear_1.b", "dense2.bias"), ("linear_1.w", "dense2.weight")):
            if old in name:
                name = name.replace(old, new)
    return name, name[-6:] == "weight" and "embeddings" not in name


#: Our own Haiku names (DeepMind has no such module; the script has no rule for them).
OWN_HAIKU = {"input_projection/w": ("input_preprocessor.linear.weight", True),
             "input_projection/b": ("input_preprocessor.linear.bias", False),
             "basic_decoder/output/w": ("decoder.final_layer.weight", True),
             "basic_decoder/output/b": ("decoder.final_layer.bias", False)}


def haiku_cases() -> list[pnp.Perceiver]:
    """Models of every shape the Haiku map covers, with random parameters (no torch needed)."""
    specs = [
        dict(input_dim=5, latent_dim=8, num_latents=3, num_layers=12, input_projection=False,
             cross_heads=1, num_heads=2, decoder="latents", final_norm=False),
        dict(input_dim=7, latent_dim=8, num_latents=4, num_layers=2, num_heads=2, qk_channels=4,
             decoder="classification", output_dim=5, query_dim=6, decoder_heads=2, final_norm=False),
        dict(input_dim=5, latent_dim=8, num_latents=4, num_layers=1, input_projection=False,
             cross_heads=1, num_heads=2, decoder="query", num_outputs=300, query_dim=4, output_dim=3,
             final_norm=False),
        dict(input_dim=5, latent_dim=8, num_latents=4, num_layers=1, input_projection=False,
             cross_heads=1, num_heads=2, decoder="query", query_source="fourier",
             output_index_dims=(6,), query_num_bands=2, output_dim=3, final_norm=False),
        pnp.presets.deepmind(input_dim=6, latent_dim=8, num_latents=4, num_layers=2, num_blocks=2),
    ]
    rng = np.random.default_rng(6)
    models = []
    for spec in specs:
        model = pnp.build(**{"dropout": 0.0, **spec, "dtype": "float64"})
        model.params = {k: rng.standard_normal(v.shape) for k, v in model.params.items()}
        models.append(model)
    return models


@pytest.mark.parametrize("index", range(5))
def test_haiku_round_trip_with_deepmind_names(index: int) -> None:
    model = haiku_cases()[index]
    tree = interop.to_haiku(model)
    cfg = model.config
    latents = tree["perceiver_encoder/~/trainable_position_encoding"]["pos_embs"]
    assert latents.shape == (cfg.num_latents, cfg.latent_dim)
    q = tree["perceiver_encoder/~/cross_attention/attention/linear"]["w"]
    assert q.tobytes() == model.params["cross.0.attn.q.weight"].tobytes()
    last = f"self_attention_{cfg.num_layers - 1}" if cfg.num_layers > 1 else "self_attention"
    assert f"perceiver_encoder/~/{last}/mlp/linear_1" in tree
    again = interop.from_haiku(tree, cfg)
    assert_same_params(model, again)
    options = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    assert_same_params(model, interop.from_haiku(tree, options))
    tree["perceiver_encoder/~/cross_attention/attention/linear"]["w"][0, 0] += 1.0
    assert again.params["cross.0.attn.q.weight"][0, 0] == model.params["cross.0.attn.q.weight"][0, 0], \
        "to_haiku hands out copies"

    # HF's conversion script turns our Haiku tree into exactly our HF export (where HF has one)
    if cfg.decoder == "query" and cfg.query_source != "trainable":
        return
    converted = {}
    for module, leaves in interop.to_haiku(model).items():
        for param, value in leaves.items():
            key, transpose = OWN_HAIKU.get(f"{module}/{param}") or hf_rename(f"{module}/{param}")
            converted[key] = np.transpose(value) if transpose else value
    exported = interop.to_hf_state_dict(model)
    assert set(converted) == set(exported)
    for k, v in exported.items():
        assert v.tobytes() == np.ascontiguousarray(converted[k]).tobytes(), k


def test_haiku_errors_name_the_tensor() -> None:
    model = haiku_cases()[1]
    tree = interop.to_haiku(model)
    bad = {m: dict(p) for m, p in tree.items()}
    bad["perceiver_encoder/~/self_attention_1/mlp/linear"]["w"] = tree[
        "perceiver_encoder/~/self_attention_1/mlp/linear"]["w"].T.copy()
    with pytest.raises(InteropError, match=r"self_attention_1/mlp/linear/w \(our self.1.ffn.up.weight\): "
                                            r"expected shape \(8, 32\), got \(32, 8\) - transposed"):
        interop.from_haiku(bad, model.config)
    bad = {m: dict(p) for m, p in tree.items()}
    del bad["classification_decoder/~/basic_decoder/output"]["b"]
    bad["perceiver_encoder/~/self_attention_2/layer_norm"] = {"scale": np.ones(8)}
    with pytest.raises(InteropError, match=r"missing classification_decoder/~/basic_decoder/output/b "
                       r"\(5,\); unexpected perceiver_encoder/~/self_attention_2/layer_norm/scale"):
        interop.from_haiku(bad, model.config)
    with pytest.raises(InteropError, match="final_norm=True"):
        interop.to_haiku(pnp.build(input_dim=3, latent_dim=8, num_latents=2, num_layers=1))


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def test_state_dict_errors_name_the_tensor(hf: Any) -> None:
    model = case_model(hf, "one_head")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    interop.from_hf_state_dict(state, cfg)  # the unmodified state dict loads

    extra = {**state, "encoder.self_attends.2.layernorm.weight": np.ones(8, np.float32)}
    with pytest.raises(InteropError, match=r"unexpected encoder\.self_attends\.2\.layernorm\.weight \(8,\)"):
        interop.from_hf_state_dict(extra, cfg)
    missing = {k: v for k, v in state.items() if k != "encoder.self_attends.1.mlp.dense2.bias"}
    with pytest.raises(InteropError, match=r"missing encoder\.self_attends\.1\.mlp\.dense2\.bias \(8,\)"):
        interop.from_hf_state_dict(missing, cfg)
    key = "encoder.cross_attention.attention.self.query.weight"  # [qk=5, D=8]
    transposed = {**state, key: state[key].T}
    with pytest.raises(InteropError, match=r"query\.weight \(our cross\.0\.attn\.q\.weight\): expected "
                       r"shape \(5, 8\), got \(8, 5\) - transposed\? HF Linear weights are \[out, in\]"):
        interop.from_hf_state_dict(transposed, cfg)
    wrong = {**state, "embeddings.latents": np.zeros((4, 8), np.float32)}
    with pytest.raises(InteropError,
                       match=r"embeddings\.latents \(our latents\): expected shape \(3, 8\), got \(4, 8\)"):
        interop.from_hf_state_dict(wrong, cfg)
    nan = {**state, "embeddings.latents": np.full((3, 8), np.nan, np.float32)}
    with pytest.raises(InteropError, match=r"embeddings\.latents: contains NaN"):
        interop.from_hf_state_dict(nan, cfg)
    ints = {**state, "embeddings.latents": np.zeros((3, 8), np.int64)}
    with pytest.raises(InteropError, match=r"embeddings\.latents: expected floating-point"):
        interop.from_hf_state_dict(ints, cfg)


def test_unsupported_hf_models_are_refused(hf: Any) -> None:
    import torch

    base = dict(num_latents=3, d_latents=8, d_model=5, num_self_attends_per_block=1,
                num_self_attention_heads=2, num_cross_attention_heads=1)
    for act in ("relu", "gelu_new", "gelu_pytorch_tanh"):
        model = build_hf(hf, {**base, "hidden_act": act}, None, None, randomise=False)
        with pytest.raises(InteropError, match=rf"hidden_act: '{act}' is not supported; only 'gelu'"):
            interop.from_hf(model)
    to_6 = interop.LinearPreprocessor(4, 6)
    narrow = hf.PerceiverModel(hf.PerceiverConfig(**base), input_preprocessor=to_6)
    with pytest.raises(InteropError, match=r"input_preprocessor\.linear\.weight: shape \(6, 4\) projects "):
        interop.from_hf(narrow)
    text_cfg = hf.PerceiverConfig(**{**base, "d_model": 8})
    text = hf.PerceiverModel(text_cfg, input_preprocessor=hf.PerceiverTextPreprocessor(text_cfg))
    with pytest.raises(InteropError, match="input_preprocessor: PerceiverTextPreprocessor is not supported"):
        interop.from_hf(text)
    with pytest.raises(InteropError, match=r"input_preprocessor: only a LinearPreprocessor"):
        interop.from_hf_state_dict({k: v.numpy() for k, v in text.state_dict().items()}, text_cfg.to_dict())
    cfg = hf.PerceiverConfig(**base)
    postprocessor = hf.PerceiverClassificationPostprocessor(cfg, in_channels=8)
    post = hf.PerceiverModel(cfg, output_postprocessor=postprocessor)
    with pytest.raises(InteropError, match="output_postprocessor"):
        interop.from_hf(post)
    fourier = hf.PerceiverBasicDecoder(
        cfg, output_num_channels=2, position_encoding_type="fourier", num_channels=6,
        fourier_position_encoding_kwargs=dict(num_bands=1, max_resolution=(4,)))
    with pytest.raises(InteropError, match="position_encoding_type'\\]: 'fourier' is not supported"):
        interop.from_hf(hf.PerceiverModel(cfg, decoder=fourier))
    projected = hf.PerceiverBasicDecoder(
        cfg, output_num_channels=2, num_channels=6, project_pos_dim=6, out_channels=3,
        trainable_position_encoding_kwargs=dict(num_channels=3, index_dims=4))
    with pytest.raises(InteropError, match="project_pos_dim'\\]: 6 is not supported"):
        interop.from_hf(hf.PerceiverModel(cfg, decoder=projected))
    raw = hf.PerceiverBasicDecoder(cfg, output_num_channels=2, num_channels=6, final_project=False,
                                   trainable_position_encoding_kwargs=dict(num_channels=6, index_dims=4))
    with pytest.raises(InteropError, match="final_project'\\]: False is not supported"):
        interop.from_hf(hf.PerceiverModel(cfg, decoder=raw))
    with pytest.raises(InteropError, match="decoder: Identity is not supported"):
        interop.from_hf(hf.PerceiverModel(cfg, decoder=torch.nn.Identity()))
    with pytest.raises(InteropError, match=r"expected a transformers\.PerceiverModel"):
        interop.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(InteropError, match=r"decoder_config: unknown key\(s\) \['num_queries'\]"):
        interop.from_hf_state_dict({}, base, decoder_config={"type": "basic", "num_queries": 3})
    with pytest.raises(InteropError, match="output_num_channels'\\]: required for type 'basic'"):
        interop.from_hf_state_dict({}, base, decoder_config={
            "type": "basic", "trainable_position_encoding_kwargs": {"index_dims": 3, "num_channels": 128}})


def test_unexpressible_models_are_refused_on_export() -> None:
    small = dict(input_dim=3, latent_dim=8, num_latents=2, num_layers=2, final_norm=False, decoder="latents")
    for opts, message in (
        ({"final_norm": True}, "final_norm=True"),
        ({"num_cross_layers": 2}, "num_cross_layers=2"),
        ({"decoder": "query", "query_source": "given", "query_dim": 4, "output_dim": 2},
         "query_source='given'"),
    ):
        model = pnp.build(**{**small, **opts})
        with pytest.raises(InteropError, match=message):
            interop.to_hf_state_dict(model)
        with pytest.raises(InteropError, match=message):
            interop.to_hf_config(model)
    with pytest.raises(InteropError, match="gelu='tanh'"):
        interop.to_hf_config(pnp.build(**small, gelu="tanh"))
    with pytest.raises(InteropError, match="self value width 4 != latent_dim 8"):
        interop.to_hf_config(pnp.build(**small, v_channels=4))
    with pytest.raises(InteropError, match="cross_heads: 3 does not divide latent_dim 8"):
        interop.to_hf_config(pnp.build(**small, cross_heads=3, qk_channels=6, v_channels=6, num_heads=2))


def test_importing_interop_does_not_import_torch() -> None:
    code = ("import sys, perceiver_np.interop as i; assert 'torch' not in sys.modules; "
            "assert 'transformers' not in sys.modules; assert 'LinearPreprocessor' in i.__all__")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# plain parameter files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_params_file_round_trip(tmp_path: Path, suffix: str) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="the .safetensors format needs the safetensors package")
    for model in [*haiku_cases()[:3], pnp.build(input_dim=3, latent_dim=8, num_latents=2, num_layers=2)]:
        path = tmp_path / f"w{suffix}"
        assert interop.save_params(path, model) == path
        assert_same_params(model, interop.load_params(path, model.config))
        cfg32 = model.config.replace(dtype="float32")
        loaded = interop.load_params(path, cfg32)
        for k, v in model.params.items():
            assert loaded.params[k].dtype == np.float32
            assert np.array_equal(loaded.params[k], v.astype(np.float32))
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file is left behind"


def test_params_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = pnp.build(input_dim=3, latent_dim=8, num_latents=2, num_layers=1, dtype="float64")
    path = tmp_path / "w.npz"
    interop.save_params(path, model)
    params = dict(model.params)

    def write(arrays: dict[str, np.ndarray]) -> Path:
        p = tmp_path / "bad.npz"
        np.savez(p, **arrays)
        return p

    bad = {k: v for k, v in params.items() if k != "self.0.ffn.up.bias"}
    bad["self.1.norm.gamma"] = np.ones(8)
    with pytest.raises(InteropError, match=r"missing self\.0\.ffn\.up\.bias \(32,\); "
                       r"unexpected self\.1\.norm\.gamma \(8,\)"):
        interop.load_params(write(bad), model.config)
    narrow = write({**params, "cross.0.attn.k.weight": np.zeros((8, 4))})
    with pytest.raises(InteropError, match=r"cross\.0\.attn\.k\.weight: expected shape \(8, 8\), got \(8, 4"):
        interop.load_params(narrow, model.config)
    transposed = write({**params, "input_proj.weight": params["input_proj.weight"].T})
    with pytest.raises(InteropError, match=r"input_proj\.weight: expected shape \(3, 8\), got \(8, 3\) - tr"):
        interop.load_params(transposed, model.config)
    obj = tmp_path / "obj.npz"
    np.savez(obj, **{**params, "latents": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(InteropError, match=r"not a readable \.npz parameter file"):
        interop.load_params(obj, model.config)  # allow_pickle=False: object arrays are refused
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InteropError, match=r"not a readable \.npz"):
        interop.load_params(tmp_path / "junk.npz", model.config)
    with pytest.raises(InteropError, match="no such file"):
        interop.load_params(tmp_path / "none.npz", model.config)
    with pytest.raises(InteropError, match=r"unknown format '\.pt'"):
        interop.save_params(tmp_path / "w.pt", model)

    before = path.read_bytes()

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        interop.save_params(path, pnp.build(input_dim=3, latent_dim=8, num_latents=2, num_layers=1, seed=5))
    assert path.read_bytes() == before, "a failed save leaves the previous file intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "junk.npz", "obj.npz", "w.npz"]
