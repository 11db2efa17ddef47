"""krasserm's perceiver-io (the real package from PyPI, its core modules) against perceiver_np:
from_krasserm copies a live PerceiverIO / PerceiverEncoder into a model that gives its outputs
in float64 to FLOAT64_RTOL and every gradient to INTEROP_GRAD_RTOL, with and without a mask (a
fully masked sample included), at several configurations; record_krasserm records it under the
golden names so that compare finds zero breaks, and names a perturbed weight first at its own
layer; krasserm_options gives the same options from their config as options_of reads off the
module their constructors build from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import krasserm, verify
from perceiver_np.tolerances import FLOAT64_RTOL, INTEROP_GRAD_RTOL

from .helpers import assert_same_gradients

REASON = ("the krasserm cross-checks need torch and perceiver-io: make test installs it "
          "(pip install --no-deps --ignore-requires-python perceiver-io==0.11.0 fairscale==0.4.13)")
torch = pytest.importorskip("torch", reason=REASON)
core = pytest.importorskip("perceiver.model.core", reason=REASON)


class Given(core.InputAdapter):
    """The simplest input adapter: the encoder reads the data as it is."""

    def forward(self, x):
        return x


#: (their EncoderConfig fields, ClassificationDecoderConfig fields or None, num_latents,
#: num_latent_channels, the input adapter). Small, but every switch of their structure: one
#: self block; three blocks sharing one set of weights (num_blocks) with per-kind qk/v widths and
#: a decoder of three queries without its query residual; two cross layers and a second self
#: block run twice (block_order) as an encoder alone; one cross layer shared by three uses;
#: token embeddings as the adapter; q/k/v projections without biases.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, int, int, str]] = {
    "classifier": (dict(num_cross_attention_heads=2, num_self_attention_heads=2,
                        num_self_attention_layers_per_block=2, cross_attention_widening_factor=2),
                   dict(num_cross_attention_heads=2, num_output_query_channels=6, num_classes=3,
                        cross_attention_widening_factor=2), 4, 8, "given"),
    "shared-blocks": (dict(num_cross_attention_heads=2, num_cross_attention_qk_channels=6,
                           num_cross_attention_v_channels=4, num_self_attention_heads=2,
                           num_self_attention_qk_channels=4, num_self_attention_v_channels=6,
                           num_self_attention_layers_per_block=2, num_self_attention_blocks=3,
                           self_attention_widening_factor=3),
                      dict(num_cross_attention_heads=2, num_cross_attention_qk_channels=4,
                           num_cross_attention_v_channels=6, cross_attention_residual=False,
                           num_output_queries=3, num_output_query_channels=5, num_classes=2), 3, 8, "given"),
    "interleaved": (dict(num_cross_attention_heads=1, num_self_attention_heads=2,
                         num_self_attention_layers_per_block=2, num_self_attention_blocks=3,
                         num_cross_attention_layers=2, first_self_attention_block_shared=False),
                    None, 4, 6, "given"),
    "cross-shared": (dict(num_cross_attention_heads=2, num_self_attention_heads=1,
                          num_self_attention_layers_per_block=1, num_self_attention_blocks=3,
                          num_cross_attention_layers=3, first_cross_attention_layer_shared=True,
                          first_self_attention_block_shared=False),
                     dict(num_cross_attention_heads=1, num_output_query_channels=4, num_classes=5), 3, 4,
                     "given"),
    "tokens": (dict(num_cross_attention_heads=2, num_self_attention_heads=2,
                    num_self_attention_layers_per_block=2, num_self_attention_blocks=2,
                    num_cross_attention_layers=2, first_self_attention_block_shared=False),
               dict(num_cross_attention_heads=2, num_output_query_channels=6, num_classes=4), 3, 8, "tokens"),
    "no-qkv-bias": (dict(num_cross_attention_heads=2, num_self_attention_heads=2,
                         num_self_attention_layers_per_block=1),
                    dict(num_cross_attention_heads=2, num_output_query_channels=4, num_classes=3), 3, 8,
                    "given"),
}
N, CHANNELS, VOCAB = 7, 5, 11


def their_config(case: str) -> Any:
    enc, dec, num_latents, channels, _ = CASES[case]
    return core.PerceiverIOConfig(
        encoder=core.EncoderConfig(**enc),
        decoder=None if dec is None else core.ClassificationDecoderConfig(**dec),
        num_latents=num_latents, num_latent_channels=channels)


def their_model(case: str) -> Any:
    """Their module, built from their config the way their ImageClassifier / TextClassifier
    build theirs (float64, every parameter moved off its initial value)."""
    cfg = their_config(case)
    torch.manual_seed(0)
    if CASES[case][4] == "tokens":
        adapter = core.TokenInputAdapter(vocab_size=VOCAB, max_seq_len=N, num_input_channels=6)
    else:
        adapter = Given(CHANNELS)
    module = core.PerceiverEncoder(adapter, num_latents=cfg.num_latents,
                                   num_latent_channels=cfg.num_latent_channels, **cfg.encoder.base_kwargs())
    if cfg.decoder is not None:
        dec = cfg.decoder
        decoder = core.PerceiverDecoder(
            core.ClassificationOutputAdapter(dec.num_classes, dec.num_output_query_channels),
            core.TrainableQueryProvider(dec.num_output_queries, dec.num_output_query_channels),
            num_latent_channels=cfg.num_latent_channels, **dec.base_kwargs())
        module = core.PerceiverIO(module, decoder)
    if case == "no-qkv-bias":  # as MultiHeadAttention(qkv_bias=False) builds them
        for mha in [m for m in module.modules() if isinstance(m, core.MultiHeadAttention)]:
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(mha, name)
                setattr(mha, name, torch.nn.Linear(old.in_features, old.out_features, bias=False))
    module = module.double()
    with torch.no_grad():  # their init zeroes the biases and leaves the LayerNorms at 1 and 0
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module.eval()


def encoder_of(module: Any) -> Any:
    return module[0] if isinstance(module, core.PerceiverIO) else module


def their_run(module: Any, case: str, masked: bool) -> tuple[Any, Any, np.ndarray | None]:
    """(their output, their input adapter's output x [B, N, C] in the graph, our keep-mask):
    ``decoder(encoder(data, pad_mask))`` as their classifiers run it."""
    rng = np.random.default_rng(1)
    if CASES[case][4] == "tokens":
        data = torch.from_numpy(rng.integers(0, VOCAB, (3, N)))
    else:
        data = torch.from_numpy(rng.standard_normal((3, N, CHANNELS))).requires_grad_()
    keep = None
    if masked:  # partial, fully masked, whole
        keep = np.stack([np.arange(N) % 3 != 1, np.zeros(N, bool), np.ones(N, bool)])
    captured = []
    encoder = encoder_of(module)
    handle = encoder.input_adapter.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        z = encoder(data, pad_mask=None if keep is None else torch.from_numpy(~keep))
    finally:
        handle.remove()
    y = z if encoder is module else module[1](z)
    return y, captured[0], keep


def adapter_params(module: Any) -> set[str]:
    prefix = "0.input_adapter." if isinstance(module, core.PerceiverIO) else "input_adapter."
    return {k for k, _ in module.named_parameters() if k.startswith(prefix)}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_perceiver_io(case, masked):
    module = their_model(case)
    model = krasserm.from_krasserm(module)
    skipped = adapter_params(module)
    assert model.param_count == sum(p.numel() for k, p in module.named_parameters() if k not in skipped)
    y_theirs, xt, keep = their_run(module, case, masked)
    x = xt.detach().numpy()
    y, cache = model.forward(x, keep)
    assert rel(y, y_theirs.detach().numpy()) <= FLOAT64_RTOL
    assert rel(model(x, keep), y_theirs.detach().numpy()) <= FLOAT64_RTOL  # the inference path
    dy = np.random.default_rng(2).standard_normal(y.shape)
    grads, dx = model.backward(dy, cache)
    names = krasserm.krasserm_name_map(module)
    by_name = dict(module.named_parameters())
    theirs_g = torch.autograd.grad((y_theirs * torch.from_numpy(dy)).sum(),
                                   [by_name[n] for n in names.values()] + [xt])
    want = {ours: g.numpy().T if ours.endswith(".weight") and g.ndim == 2 else g.numpy()
            for ours, g in zip(names, theirs_g, strict=False)}
    want["x"] = theirs_g[-1].numpy()
    assert_same_gradients({**grads, "x": dx}, want, INTEROP_GRAD_RTOL)


def test_their_sharing_is_our_schedule():
    steps = {case: pnp.model.step_names(krasserm.from_krasserm(their_model(case)).config)
             for case in ("shared-blocks", "interleaved", "cross-shared", "tokens")}
    assert steps["shared-blocks"] == ["cross.0", *(f"self.{j}.use{u}" for u in range(3) for j in range(2))]
    assert steps["interleaved"] == ["cross.0", "self.0", "self.1", "cross.1", "self.2.use0", "self.3.use0",
                                    "self.2.use1", "self.3.use1"]
    assert steps["cross-shared"] == ["cross.0.use0", "self.0", "cross.0.use1", "self.1.use0",
                                     "cross.0.use2", "self.1.use1"]
    assert steps["tokens"] == ["cross.0", "self.0", "self.1", "cross.1", "self.2", "self.3"]


@pytest.mark.parametrize("case", list(CASES))
def test_options_from_their_config_are_those_of_their_module(case):
    channels = 6 if CASES[case][4] == "tokens" else CHANNELS
    config = dataclasses.asdict(their_config(case))
    extra = {"qkv_bias": False} if case == "no-qkv-bias" else {}
    from_config = krasserm.krasserm_options(config, input_channels=channels, **extra)
    assert from_config == krasserm.options_of(their_model(case))


@pytest.mark.parametrize("case", list(CASES))
def test_recorded_run_compares_with_zero_breaks(tmp_path, case):
    module = their_model(case)
    model = krasserm.from_krasserm(module)
    _, xt, keep = their_run(module, case, masked=True)
    x = xt.detach().numpy()
    golden = verify.write_golden(tmp_path / "golden.npz", model, x, keep, seed=1)
    with np.load(golden) as g:
        dy = g["loss/dy"]
    np.savez(tmp_path / "theirs.npz", **verify.record_krasserm(module, x, dy, mask=keep))
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.ok, str(report)
    assert report.compared["gradients"] == len(model.params) + 1  # every parameter and x
    assert report.extra == ()
    # all that is missing: the scores and probabilities (inside their MultiHeadAttention) and,
    # for an encoder alone, its last layer's output, which is act/output
    last = pnp.model.step_names(model.config)[-1]
    allowed = (".attn.scores", ".attn.probs")
    if model.config.decoder == "latents":
        allowed += (f"{last}.out",)
    assert [n for n in report.missing if not n.endswith(allowed)] == []


@pytest.mark.parametrize(("case", "weight", "layer"), [
    ("interleaved", "cross_attn_n.1.module.1.weight", "act/cross.1.ffn.up.out"),
    ("interleaved", "self_attn_n.1.0.module.attention.k_proj.weight", "act/self.3.use0.attn.k.out"),
    ("shared-blocks", "0.self_attn_1.0.0.module.attention.v_proj.weight", "act/self.0.use0.attn.v.out"),
    ("shared-blocks", "1.cross_attn.0.q_norm.weight", "act/decoder.q_norm.out"),
    ("classifier", "1.cross_attn.1.module.3.bias", "act/decoder.ffn.down.out"),
    ("cross-shared", "1.output_adapter.linear.weight", "act/output"),
    ("tokens", "0.latent_provider._query", "act/cross.0.q_norm.out"),
])
def test_a_perturbed_weight_is_named_first(tmp_path, case, weight, layer):
    module = their_model(case)
    model = krasserm.from_krasserm(module)
    _, xt, keep = their_run(module, case, masked=False)
    x = xt.detach().numpy()
    golden = verify.write_golden(tmp_path / "golden.npz", model, x, keep, seed=1)
    with torch.no_grad():
        p = module.get_parameter(weight)
        p.view(-1)[1] += 1e-3 * p.abs().max()
    with np.load(golden) as g:
        dy = g["loss/dy"]
    np.savez(tmp_path / "theirs.npz", **verify.record_krasserm(module, x, dy, mask=keep))
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.first_break is not None and report.first_break.name == layer, str(report)


def test_options_check_their_config():
    good = dataclasses.asdict(their_config("classifier"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_self_attention_layer'\]"):
        krasserm.krasserm_options({**good, "encoder": {**good["encoder"], "num_self_attention_layer": 2}},
                                  input_channels=5)
    with pytest.raises(ValueError, match=r"missing required field 'num_latents'"):
        krasserm.krasserm_options({k: v for k, v in good.items() if k != "num_latents"}, input_channels=5)
    with pytest.raises(ValueError, match=r"\['image_shape'\]: an input adapter's setting.*input_channels="):
        krasserm.krasserm_options({**good, "encoder": {**good["encoder"], "image_shape": (4, 4, 3)}},
                                  input_channels=5)
    with pytest.raises(ValueError, match=r"\['vocab_size'\]: the masked language model's decoder"):
        krasserm.krasserm_options({**good, "decoder": {**good["decoder"], "vocab_size": 9}}, input_channels=5)
    with pytest.raises(ValueError, match=r"num_cross_attention_layers \(2\) must be <= num_self_attention"):
        krasserm.krasserm_options({**good, "encoder": {**good["encoder"], "num_cross_attention_layers": 2}},
                                  input_channels=5)
    with pytest.raises(ValueError, match=r"input_channels: expected a positive integer, got 0"):
        krasserm.krasserm_options(good, input_channels=0)


def _refused(module: Any, message: str, error: type[Exception] = ValueError) -> None:
    with pytest.raises(error, match=message):
        krasserm.from_krasserm(module)


def test_from_krasserm_refuses_what_it_cannot_compute():
    _refused(torch.nn.Linear(2, 2), "expected a perceiver-io .* PerceiverIO or PerceiverEncoder", TypeError)
    ar = core.CausalSequenceModel(core.CausalSequenceModelConfig(
        vocab_size=5, max_seq_len=8, max_latents=4, num_channels=8, num_heads=2, num_self_attention_layers=1))
    _refused(ar, "Perceiver AR")
    module = their_model("classifier")
    mha = module[0].cross_attn_1[0].module.attention
    mha.causal_attention = True
    _refused(module, r"0.cross_attn_1.0.module.attention has causal_attention=True")
    mha.causal_attention = False
    proj = mha.o_proj
    mha.o_proj = torch.nn.Linear(proj.in_features, proj.out_features, bias=False)
    _refused(module, "out_bias=False")
    mha.o_proj = proj
    mlp = module[0].self_attn_1[1][1].module
    up = mlp[1]
    mlp[1] = torch.nn.Linear(up.in_features, up.out_features, bias=False)
    _refused(module, r"0.self_attn_1.1.1.module has mlp_bias=False")
    mlp[1] = up
    q = mha.q_proj
    mha.q_proj = torch.nn.Linear(q.in_features, q.out_features, bias=False)
    _refused(module, "some attention layers have q/k/v biases and some do not")
    mha.q_proj = q
    module[1].output_adapter = core.TiedTokenOutputAdapter(vocab_size=3)
    _refused(module, "output_adapter is a TiedTokenOutputAdapter")

    class FromInput(torch.nn.Module, core.QueryProvider):  # optical flow's: the adapted input
        num_query_channels = CHANNELS

        def forward(self, x=None):
            return x

    module[1] = core.PerceiverDecoder(core.ClassificationOutputAdapter(3, CHANNELS), FromInput(),
                                      num_latent_channels=8, num_cross_attention_heads=1)
    _refused(module, "output_query_provider is a FromInput")


def test_record_refuses_checkpointed_layers_and_their_model_fails_with_them():
    torch.manual_seed(0)
    module = core.PerceiverEncoder(Given(CHANNELS), num_latents=2, num_latent_channels=4,
                                   num_cross_attention_heads=1, num_self_attention_heads=1,
                                   num_self_attention_layers_per_block=1,
                                   activation_checkpointing=True).double()
    model = krasserm.from_krasserm(module)
    assert model.param_count == sum(p.numel() for p in module.parameters())
    x = np.zeros((1, 3, CHANNELS))
    with pytest.raises(AttributeError, match="last_hidden_state"):  # their forward, as the message says
        module(torch.from_numpy(x).requires_grad_())
    with pytest.raises(ValueError, match="cross_attn_1 runs through fairscale's checkpoint_wrapper"):
        verify.record_krasserm(module, x, np.zeros((1, 2, 4)))


def test_record_checks_its_inputs():
    module = their_model("classifier")
    x = np.zeros((2, 3, CHANNELS))
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        verify.record_krasserm(module, x, np.zeros((2, 3)), mask=np.ones((2, 3), dtype=int))
    with pytest.raises(ValueError, match=r"x: expected shape \[B, N, C\] = \(\?, \?, 5\), got \(2, 3, 4\)"):
        verify.record_krasserm(module, x[..., :4], np.zeros((2, 3)))
