"""Fine-tuning the published Perceivers (perceiver_np.train with a PretrainedPerceiver): fit's
AdamW steps equal torch.optim.AdamW on torch autograd's gradients through HF's model, the step's
gradient of each loss (text classification with a mask, masked LM with ignored positions, image
classification on batch norm's running statistics, optical flow's MSE) equals torch autograd's,
the loss falls on a tiny task, a resumed run is bit-identical to an uninterrupted one, and the
datasets are checked before any step."""

from __future__ import annotations

import numpy as np
import pytest

from perceiver_np import optim, pretrained
from perceiver_np.checkpoint import CheckpointError, load_checkpoint
from perceiver_np.model import Perceiver
from perceiver_np.tolerances import (
    FINETUNE_TORCH_RTOL,
    INTEROP_FLOAT64_RTOL,
    INTEROP_GRAD_FLOOR,
    INTEROP_GRAD_RTOL,
)
from perceiver_np.train import Loss, NonFiniteError, evaluate, fit, init_state, loss_and_grads, train_step

from .hf_helpers import random_hf_model

torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
transformers = pytest.importorskip("transformers", reason="the HF cross-checks need transformers")
F = torch.nn.functional

SMALL = dict(num_latents=6, d_latents=16, num_blocks=1, num_self_attends_per_block=2,
             num_self_attention_heads=2, num_cross_attention_heads=1, attention_probs_dropout_prob=0.0)
TEXT = dict(d_model=16, vocab_size=262, max_position_embeddings=10)
SEQ, MLM = "PerceiverForSequenceClassification", "PerceiverForMaskedLM"
CONV, FLOW = "PerceiverForImageClassificationConvProcessing", "PerceiverForOpticalFlow"


def _hf(arch, **changes):
    return random_hf_model(getattr(transformers, arch), transformers.PerceiverConfig(**{**SMALL, **changes}))


def _text_batch(rng, count=6, classes=3):
    ids = rng.integers(0, 262, size=(count, 10))
    mask = np.ones((count, 10), dtype=bool)
    mask[1, 7:] = False
    mask[count - 2, 3:] = False
    return {"x": ids, "mask": mask, "y": rng.integers(0, classes, size=count)}


def _hf_names(ours):
    return pretrained.hf_names(ours), ours.specs()


def test_fit_equals_torch_adamw_on_autograd_through_hf():
    """3 steps of fit (one full batch an epoch) against torch: our backward + optim.adamw vs
    autograd through HF's model + torch.optim.AdamW, the same hyper-parameters and decay mask."""
    hf = _hf(SEQ, **TEXT, num_labels=3)
    ours = pretrained.from_hf(hf, dtype="float64")
    data = _text_batch(np.random.default_rng(3))
    state, history = fit(ours, optim.adamw(1e-2, b1=0.8, b2=0.99, eps=1e-8, weight_decay=0.05),
                         Loss(), data, epochs=3, batch_size=6, seed=0, progress=False)
    assert state.step == 3 and len(history.rows) == 3

    names, specs = _hf_names(ours)
    hf_params = dict(hf.named_parameters())
    groups = [{"params": [hf_params[names[k]] for k in specs if optim.default_decay_mask(k) == decay],
               "weight_decay": 0.05 if decay else 0.0} for decay in (True, False)]
    assert sum(len(g["params"]) for g in groups) == len(hf_params) and groups[1]["params"]
    topt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.99), eps=1e-8)
    mask = torch.from_numpy(data["mask"].astype(np.int64))
    for _ in range(3):
        topt.zero_grad()
        logits = hf(inputs=torch.from_numpy(data["x"]), attention_mask=mask).logits
        F.cross_entropy(logits, torch.from_numpy(data["y"])).backward()
        topt.step()
    for name, spec in specs.items():
        want = hf_params[names[name]].detach().numpy()
        want = want.T if spec.transpose else want
        assert np.abs(state.params[name] - want).max() / np.abs(want).max() <= FINETUNE_TORCH_RTOL, name
        assert not np.array_equal(state.params[name], ours.params[name]) or name.endswith("k.bias"), name


def _grads_equal_torch(hf, ours, batch, loss, torch_loss):
    value, _, grads = loss_and_grads(ours, ours.params, batch, loss, np.random.default_rng(0))
    hf.zero_grad()
    kwargs = {}
    if "mask" in batch:
        kwargs["attention_mask"] = torch.from_numpy(batch["mask"].astype(np.int64))
    want = torch_loss(hf(inputs=torch.from_numpy(batch["x"]), **kwargs).logits)
    want.backward()
    assert abs(value - want.item()) <= INTEROP_FLOAT64_RTOL * abs(want.item())
    names, specs = _hf_names(ours)
    hf_params = dict(hf.named_parameters())
    scale = max(float(np.abs(g).max()) for g in grads.values())
    assert set(grads) == set(specs)
    for name, g in grads.items():
        w = hf_params[names[name]].grad.numpy()
        w = w.T if specs[name].transpose else w
        err = np.abs(g - w).max() / max(np.abs(w).max(), INTEROP_GRAD_FLOOR * scale)
        assert err <= INTEROP_GRAD_RTOL, name
    return value


def test_masked_language_model_step_ignores_the_unmasked_positions():
    hf = _hf(MLM, **TEXT)
    ours = pretrained.from_hf(hf, dtype="float64")
    rng = np.random.default_rng(4)
    batch = _text_batch(rng, count=3)
    labels = np.full((3, 10), -100)
    labels[0, [1, 4]] = [17, 200]
    labels[2, 0] = 5  # sample 1 has no masked position
    batch["y"] = labels
    loss = Loss(ignore_index=-100)
    target = torch.from_numpy(labels.ravel())
    _grads_equal_torch(hf, ours, batch, loss,
                       lambda logits: F.cross_entropy(logits.reshape(-1, 262), target, ignore_index=-100))
    metrics = evaluate(ours, ours.params, batch, loss)
    logits = ours(batch["x"], batch["mask"])
    kept = labels != -100
    assert metrics["accuracy"] == np.mean(logits.argmax(-1)[kept] == labels[kept])


@pytest.mark.usefixtures("hf_in_float64")
@pytest.mark.parametrize("arch", [CONV, FLOW])
def test_image_and_flow_steps_equal_torch_autograd(arch):
    """Batch norm stays on its running statistics, as HF's model in eval mode; flow's MSE."""
    rng = np.random.default_rng(5)
    if arch == CONV:
        hf = _hf(CONV, d_model=322, num_labels=4)
        batch = {"x": rng.standard_normal((3, 3, 16, 20)), "y": rng.integers(0, 4, size=3)}
        loss, torch_loss = Loss(), lambda logits: F.cross_entropy(logits, torch.from_numpy(batch["y"]))
    else:
        hf = _hf(FLOW, d_model=322, train_size=[6, 5])
        batch = {"x": rng.standard_normal((2, 2, 27, 6, 5)), "y": rng.standard_normal((2, 6, 5, 2))}
        loss, torch_loss = Loss("mse"), lambda logits: F.mse_loss(logits, torch.from_numpy(batch["y"]))
    ours = pretrained.from_hf(hf, dtype="float64")
    _grads_equal_torch(hf, ours, batch, loss, torch_loss)
    opt = optim.adamw(1e-3)
    value, metrics, state = train_step(ours, batch, loss, opt, init_state(ours, opt),
                                       np.random.default_rng(0))
    assert state.step == 1 and np.isfinite(value) and metrics["grad_norm"] > 0
    assert ("accuracy" in metrics) == (arch == CONV)


def test_the_loss_falls_on_a_tiny_text_task():
    """The class is whether the first token is in the upper half of the vocabulary."""
    model = pretrained.PretrainedPerceiver(SEQ, {**SMALL, **TEXT, "num_labels": 2}, dtype="float32")
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=32)
    ids = rng.integers(0, 262, size=(32, 10))
    ids[:, 0] = np.where(y == 1, rng.integers(131, 262, size=32), rng.integers(0, 131, size=32))
    state, history = fit(model, optim.adamw(1e-2), Loss(), {"x": ids, "y": y}, epochs=8, batch_size=8,
                         clip_norm=1.0, seed=0, progress=False)
    losses = [row["train_loss"] for row in history.rows]
    assert losses[-1] < 0.1 * losses[0] and history.rows[-1]["train_accuracy"] == 1.0
    assert state.params["preprocessor.embeddings.weight"].dtype == np.float32


def _conv_model(num_labels=4, dropout=0.1):
    """A random conv-processing image classifier (attention dropout on, so the generator's state
    matters) with random batch norm statistics, float64."""
    config = {**SMALL, "d_model": 322, "num_labels": num_labels, "attention_probs_dropout_prob": dropout}
    rng = np.random.default_rng(11)
    buffers = {"preprocessor.batchnorm.running_mean": 0.1 * rng.standard_normal(64),
               "preprocessor.batchnorm.running_var": 0.5 + rng.random(64)}
    return pretrained.PretrainedPerceiver(CONV, config, None, buffers, dtype="float64")


def _images(count=6):
    rng = np.random.default_rng(12)
    return {"x": rng.standard_normal((count, 3, 16, 20)), "y": rng.integers(0, 4, size=count)}


def _same_run(a, b):
    (sa, ha), (sb, hb) = a, b
    assert sa.step == sb.step and list(sa.params) == list(sb.params)
    assert all(sa.params[k].tobytes() == sb.params[k].tobytes() for k in sa.params)
    assert all(sa.opt_state[k].tobytes() == sb.opt_state[k].tobytes() for k in sa.opt_state)
    timing = ("seconds", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in ha.rows] == \
           [{k: v for k, v in r.items() if k not in timing} for r in hb.rows]


def test_resume_continues_a_fine_tuning_run_bit_identically(tmp_path):
    data, opt, loss = _images(), optim.adamw(1e-3), Loss()
    args = dict(batch_size=4, seed=3, clip_norm=1.0, progress=False)
    straight = fit(_conv_model(), opt, loss, data, epochs=3, **args)
    path = tmp_path / "run.npz"
    fit(_conv_model(), opt, loss, data, epochs=2, checkpoint_path=path, **args)
    ck = load_checkpoint(path)
    assert ck.architecture == CONV and ck.step == 4 and set(ck.buffers) == set(_conv_model().buffers)
    resumed = fit(_conv_model(), opt, loss, data, epochs=3, checkpoint_path=path, resume=True, **args)
    _same_run(resumed, straight)
    # the checkpoint's model is the trained one, its buffers untouched
    model = load_checkpoint(path).model()
    assert all(model.params[k].tobytes() == straight[0].params[k].tobytes() for k in model.params)
    assert all(model.buffers[k].tobytes() == _conv_model().buffers[k].tobytes() for k in model.buffers)


def test_resume_is_refused_with_other_buffers_or_another_model(tmp_path):
    data, opt, loss = _images(), optim.adamw(1e-3), Loss()
    args = dict(batch_size=4, seed=3, progress=False, checkpoint_path=tmp_path / "run.npz")
    fit(_conv_model(), opt, loss, data, epochs=1, **args)
    other = _conv_model()
    var = "preprocessor.batchnorm.running_var"
    other.buffers[var] = 1 + other.buffers[var]
    with pytest.raises(ValueError, match=r"resume: the checkpoint .* holds other buffers than the model's "
                                         r"\(\['preprocessor.batchnorm.running_var'\]"):
        fit(other, opt, loss, data, epochs=2, resume=True, **args)
    with pytest.raises(CheckpointError, match=r"hf_config differs from expect_model's in \d+ field\(s\): .*"
                                              r"num_labels: checkpoint 4, expected 5"):
        fit(_conv_model(num_labels=5), opt, loss, data, epochs=2, resume=True, **args)
    plain = Perceiver(_conv_model().config)
    with pytest.raises(CheckpointError, match=f"the checkpoint holds a published {CONV}, expect_model is a "
                                              "Perceiver"):
        fit(plain, opt, Loss("mse"), {"x": np.zeros((6, 5, 322)), "y": np.zeros((6, 6, 16))}, epochs=2,
            resume=True, **args)


def _seq_model():
    return pretrained.PretrainedPerceiver(SEQ, {**SMALL, **TEXT, "num_labels": 3}, dtype="float64")


@pytest.mark.parametrize(("model", "data", "error", "message"), [
    (_seq_model, {"x": np.zeros((4, 10)), "y": np.zeros(4, int)}, TypeError,
     r"train_data\['x'\]: inputs: expected integer token ids \[B, N\], got dtype float64"),
    (_seq_model, {"x": np.zeros((4, 11), int), "y": np.zeros(4, int)}, ValueError,
     r"train_data\['x'\]: inputs: expected token ids \[B, N\] with B >= 1 and 1 <= N <= "
     r"max_position_embeddings = 10, got shape \(1, 11\)"),
    (_seq_model, {"x": np.zeros((4, 10), int), "y": np.full(4, 3)}, ValueError,
     r"train_data\['y'\]: labels: expected values in \[0, 3\)"),
    (_seq_model, {"x": np.zeros((4, 10), int), "y": np.zeros(4, int), "queries": np.zeros((4, 2, 3))},
     ValueError, rf"train_data\['queries'\]: {SEQ} takes no queries"),
    (_conv_model, {"x": np.zeros((4, 3, 8, 8)), "y": np.zeros(4, int), "mask": np.ones((4, 16), bool)},
     ValueError, rf"train_data\['mask'\]: {CONV} takes no attention mask"),
    (_conv_model, {"x": np.zeros((4, 8, 8)), "y": np.zeros(4, int)}, ValueError,
     r"train_data\['x'\]: inputs: expected pixel values \[B, 3, H, W\], got shape \(1, 8, 8\)"),
    (lambda: pretrained.PretrainedPerceiver(MLM, {**SMALL, **TEXT}), {"x": np.zeros((4, 10), int),
                                                                     "y": np.zeros((4, 9), int)}, ValueError,
     r"train_data\['y'\]: labels: expected shape .* = \(4, 10\), got \(4, 9\)"),
])
def test_datasets_are_checked_before_any_step(tmp_path, model, data, error, message):
    with pytest.raises(error, match=message):
        fit(model(), optim.adamw(1e-3), Loss(), data, epochs=1, batch_size=2, progress=False,
            checkpoint_path=tmp_path / "c.npz", log_path=tmp_path / "log.jsonl")
    assert not list(tmp_path.iterdir())


def test_large_targets_are_checked_in_chunks_naming_the_samples(monkeypatch):
    from perceiver_np import train

    monkeypatch.setattr(train, "_CHECK_ENTRIES", 2 * 10 * 262)  # two samples of MLM logits at a time
    model = pretrained.PretrainedPerceiver(MLM, {**SMALL, **TEXT})
    labels = np.full((5, 10), -100)
    labels[3, 2] = 262
    with pytest.raises(ValueError, match=r"train_data\['y'\]: samples 2 to 3: labels: expected values in "
                                         r"\[0, 262\) or ignore_index=-100, got 262 at index \(1, 2\)"):
        fit(model, optim.adamw(1e-3), Loss(ignore_index=-100), {"x": np.zeros((5, 10), int), "y": labels},
            epochs=1, batch_size=2, progress=False)


def test_the_multimodal_model_is_refused_with_a_reason():
    model = pretrained.PretrainedPerceiver("PerceiverForMultimodalAutoencoding", {
        **SMALL, "num_self_attends_per_block": 1, "num_frames": 2, "image_size": 8,
        "audio_samples_per_frame": 16, "samples_per_patch": 4, "num_labels": 3, "output_shape": [1, 2, 8, 8],
        "output_num_channels": 8, "_label_trainable_num_channels": 10, "d_model": 393})
    for call in (lambda: fit(model, optim.adamw(1e-3), Loss(), {"x": np.zeros((2, 1)), "y": np.zeros(2, int)},
                             epochs=1, batch_size=2, progress=False),
                 lambda: loss_and_grads(model, model.params, {"x": np.zeros((2, 1)), "y": np.zeros(2, int)},
                                        Loss(), np.random.default_rng(0))):
        with pytest.raises(ValueError, match="model: PerceiverForMultimodalAutoencoding takes a dict of"):
            call()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns of the overflow the test causes
def test_a_diverging_fine_tune_stops_at_its_step(tmp_path):
    model = pretrained.PretrainedPerceiver(SEQ, {**SMALL, **TEXT, "num_labels": 3}, dtype="float32")
    rng = np.random.default_rng(0)
    data = {"x": rng.integers(0, 262, size=(16, 10)), "y": rng.integers(0, 3, size=16)}
    with pytest.raises(NonFiniteError) as err:
        fit(model, optim.sgd(1e3), Loss(), data, epochs=2, batch_size=4, progress=False,
            checkpoint_path=tmp_path / "run.npz")
    assert err.value.epoch == 1 and err.value.step <= 4 and not (tmp_path / "run.npz").exists()
