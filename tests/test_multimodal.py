"""HF's PerceiverForMultimodalAutoencoding (perceiver_np.multimodal) against transformers itself:
a randomly initialised HF model at a small config, loaded with pretrained.from_hf, gives HF's
logits and torch autograd's gradients in float64, with and without subsampled output points.

HF computes every Fourier position encoding in float32 (build_linear_positions has dtype
float32, and the linspace of the frequencies and the subsampled positions' division follow
torch's default dtype), also in a .double() model; ours computes them in float64
(docs/position.md). The float64 comparisons therefore run HF with those positions in float64
(the fixture ``hf_in_float64``, tests/hf_helpers.py); one test bounds the difference float32
positions make."""

from __future__ import annotations

import numpy as np
import pytest

from perceiver_np import multimodal, pretrained
from perceiver_np.tolerances import (
    INTEROP_GRAD_FLOOR,
    INTEROP_GRAD_RTOL,
    PUBLISHED_FLOAT32_RTOL,
    PUBLISHED_FLOAT64_RTOL,
)

from .hf_helpers import random_hf_model

torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
transformers = pytest.importorskip("transformers", reason="the HF cross-checks need transformers")


ARCH = "PerceiverForMultimodalAutoencoding"
#: audio: 2 frames * 16 samples = 32 samples in patches of 4 -> 8 positions of 4 + 385 channels;
#: video: 2 frames of 8x8 in 4x4 blocks -> 8 positions of 48 + 195; label: 1 of 3.
#: C = 389 + 4 = 393 = d_model. Queries: audio 385, image 195, label 10 -> Cq = 387.
SMALL = dict(num_latents=6, d_latents=16, num_blocks=1, num_self_attends_per_block=1,
             num_self_attention_heads=2, num_cross_attention_heads=1, attention_probs_dropout_prob=0.0,
             num_frames=2, image_size=8, audio_samples_per_frame=16, samples_per_patch=4, num_labels=3,
             output_shape=[1, 2, 8, 8], output_num_channels=8, _label_trainable_num_channels=10, d_model=393)
AUDIO_POINTS, IMAGE_POINTS = 32 // 4, 2 * 8 * 8
SUBSAMPLED = {"audio": np.array([0, 3, 7, 3]), "image": np.array([5, 17, 127, 64, 0, 5])}


def _hf_model(seed=0):
    return random_hf_model(transformers.PerceiverForMultimodalAutoencoding,
                           transformers.PerceiverConfig(**SMALL), seed)


def _inputs(seed=1, batch=2):
    rng = np.random.default_rng(seed)
    return {"audio": rng.standard_normal((batch, 32)), "image": rng.standard_normal((batch, 2, 3, 8, 8)),
            "label": rng.standard_normal((batch, 3))}


def _hf_logits(hf, inputs, points):
    points = {k: torch.from_numpy(np.asarray(v)) for k, v in points.items()}
    out = hf(inputs={k: torch.from_numpy(v) for k, v in inputs.items()},
             subsampled_output_points={**points, "label": None}).logits
    return out


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


ALL_POINTS = {"audio": np.arange(AUDIO_POINTS), "image": np.arange(IMAGE_POINTS)}


@pytest.mark.parametrize("subsampled", [True, False], ids=["subsampled", "every_point"])
def test_logits_and_gradients_equal_hf_in_float64(hf_in_float64, subsampled):
    hf = _hf_model()
    ours = pretrained.from_hf(hf, dtype="float64")
    x = _inputs()
    # without subsampled_output_points ours decodes every point: HF's forward with all indices
    options = {"subsampled_output_points": SUBSAMPLED} if subsampled else {}
    y, cache = ours.forward(x, **options)
    out = _hf_logits(hf, x, SUBSAMPLED if subsampled else ALL_POINTS)
    assert list(y) == list(out) == ["audio", "image", "label"]
    n_audio, n_image = (4, 6) if subsampled else (AUDIO_POINTS, IMAGE_POINTS)
    assert y["audio"].shape == (2, n_audio * 4) and y["image"].shape == (2, n_image, 3)
    assert y["label"].shape == (2, 3)
    for k in y:
        assert y[k].shape == tuple(out[k].shape), k
        assert _rel(y[k], out[k].detach().numpy()) <= PUBLISHED_FLOAT64_RTOL, k

    rng = np.random.default_rng(7)
    dy = {k: rng.standard_normal(v.shape) for k, v in y.items()}
    grads = ours.backward(dy, cache)
    hf.zero_grad()
    sum((out[k] * torch.from_numpy(dy[k])).sum() for k in out).backward()
    names, specs = pretrained.hf_names(ours), ours.specs()
    hf_params = dict(hf.named_parameters())
    assert set(grads) == set(specs)
    assert {names[k] for k in grads} == set(hf_params)  # every HF parameter, once
    for name, g in grads.items():
        t = hf_params[names[name]].grad
        if t is None:  # no gradient in HF: exactly none here either
            assert not g.any(), name
            continue
        want = t.numpy().T if specs[name].transpose else t.numpy()
        assert g.shape == want.shape, name
        scale = max(np.abs(want).max(), INTEROP_GRAD_FLOOR)
        assert np.abs(g - want).max() / scale <= INTEROP_GRAD_RTOL, name


def test_mask_tokens_replace_the_label_and_keep_audio_and_video():
    """mask_probs = {audio: 0, image: 0, label: 1}: the label's values never matter, the audio
    and video tokens and the label's input padding get exactly zero gradient."""
    hf = _hf_model()
    ours = pretrained.from_hf(hf, dtype="float64")
    x = _inputs()
    y, cache = ours.forward(x, subsampled_output_points=SUBSAMPLED)
    other, _ = ours.forward(dict(x, label=100 * np.random.default_rng(3).standard_normal((2, 3))),
                            subsampled_output_points=SUBSAMPLED)
    for k in y:
        np.testing.assert_array_equal(other[k], y[k])
    dy = {k: np.ones_like(v) for k, v in y.items()}
    grads = ours.backward(dy, cache)
    for name in ("preprocessor.mask.audio", "preprocessor.mask.image", "preprocessor.padding.label"):
        assert not grads[name].any(), name
    for name in ("preprocessor.mask.label", "preprocessor.padding.audio", "preprocessor.padding.image"):
        assert np.abs(grads[name]).min() > 0, name


def test_preprocessor_and_queries_equal_hf_channel_for_channel(hf_in_float64):
    hf = _hf_model()
    ours = pretrained.from_hf(hf, dtype="float64")
    x = _inputs()
    p = ours.checked_params()
    xs, context, _ = ours.preprocessor.forward(ours.preprocessor.check(x, np.dtype(np.float64)), p, {})
    with torch.no_grad():
        xt = {k: torch.from_numpy(v) for k, v in x.items()}
        want, sizes, without_pos = hf.perceiver.input_preprocessor(xt)
    assert context.sizes == sizes == {"audio": 8, "image": 8, "label": 1}
    np.testing.assert_allclose(xs, want.numpy(), rtol=0, atol=1e-13)
    for k in sizes:
        np.testing.assert_array_equal(context.inputs_without_pos[k], without_pos[k].numpy())
    # the queries, including the subsampled positions -1 + 2 * idx / dims
    for m in ("audio", "image"):
        q = ours.decoder.query_positions(m, SUBSAMPLED[m], np.dtype(np.float64))
        with torch.no_grad():
            ref = hf.perceiver.decoder.modalities[m].decoder_query(
                torch.zeros(1, 1, 1, dtype=torch.float64), subsampled_points=torch.from_numpy(SUBSAMPLED[m]))
        assert q.shape == tuple(ref.shape[1:]), m
        np.testing.assert_allclose(q, ref[0].numpy(), rtol=0, atol=1e-12)


def test_hf_float32_positions_differ_by_their_rounding_only():
    hf = _hf_model()
    ours = pretrained.from_hf(hf, dtype="float64")
    x = _inputs()
    y = ours(x, subsampled_output_points=SUBSAMPLED)
    out = _hf_logits(hf, x, SUBSAMPLED)
    for k in y:
        assert _rel(y[k], out[k].detach().numpy()) <= PUBLISHED_FLOAT32_RTOL, k


def test_hf_itself_needs_subsampled_output_points():
    """HF builds its non-subsampled queries on the grid of the input's channel axis and fails;
    ours decodes every point then. If HF fixes this, the default here must be checked again."""
    hf = _hf_model()
    x = {k: torch.from_numpy(v) for k, v in _inputs().items()}
    with pytest.raises(RuntimeError):
        hf(inputs=x)
    with pytest.raises(IndexError):  # label indices fail in HF too: refused here
        hf(inputs=x, subsampled_output_points={"audio": torch.arange(2), "image": torch.arange(2),
                                               "label": torch.tensor([0])})


def test_names_shapes_and_float32():
    hf = _hf_model()
    ours = pretrained.from_hf(hf, dtype="float64")
    state = hf.state_dict()
    names = pretrained.hf_names(ours)
    assert set(names.values()) == set(state)
    specs = ours.specs()
    for k in ("preprocessor.padding.audio", "preprocessor.mask.label", "decoder.padding.label",
              "decoder.queries.label", "decoder.q_norm.gamma", "decoder.output.weight",
              "postprocessor.audio.weight"):
        assert k in specs
    assert specs["decoder.queries.label"].hf == \
        "perceiver.decoder.modalities.label.decoder.output_position_encodings.position_embeddings"
    assert specs["postprocessor.image.weight"] == pretrained.ParamSpec(
        (8, 3), "perceiver.output_postprocessor.modalities.image.classifier.weight", True)
    assert ours.preprocessor.num_channels == 393 and ours.decoder.num_query_channels == 387
    x = _inputs()
    want = ours(x, subsampled_output_points=SUBSAMPLED)
    got = pretrained.from_hf(hf, dtype="float32")(x, subsampled_output_points=SUBSAMPLED)
    for k in want:
        assert got[k].dtype == np.float32 and _rel(got[k], want[k]) <= 1e-4, k


def test_published_structure_widths():
    arch, config = pretrained.published_config("deepmind/multimodal-perceiver")
    assert arch == ARCH
    pre, dec, post = multimodal.structure(pretrained._hf_config(config), num_labels=700)
    # audio 16 + 385, video 48 + 195, label 700: C = 704 = the published d_model
    assert pre.widths == {"audio": 401, "image": 243, "label": 700} and pre.num_channels == 704
    assert dec.num_query_channels == 1026  # label queries 1024 + 2
    assert dec.index_dims == {"audio": (16 * 1920 // 16,), "image": (16, 224, 224)}
    assert post.outputs == {"audio": 16, "image": 3, "label": 700}


@pytest.fixture(scope="module")
def model():
    return pretrained.from_hf(_hf_model(), dtype="float64")


@pytest.mark.parametrize("change, key, words", [
    (lambda x: {k: v for k, v in x.items() if k != "image"}, "inputs", ["missing ['image']"]),
    (lambda x: dict(x, video=x["image"]), "inputs", ["unexpected ['video']"]),
    (lambda x: dict(x, audio=x["audio"][:, :30]), "inputs['audio']",
     ["[B, L]", "samples_per_patch = 4", "(2, 30)"]),
    (lambda x: dict(x, image=x["image"][:, :, :2]), "inputs['image']",
     ["[B, T, 3, H, W]", "(2, 2, 2, 8, 8)"]),
    (lambda x: dict(x, image=x["image"][:, :1]), "inputs['image']", ["T >= 2", "(2, 1, 3, 8, 8)"]),
    (lambda x: dict(x, image=x["image"][..., :6]), "inputs['image']", ["multiples of 4", "(2, 2, 3, 8, 6)"]),
    (lambda x: dict(x, label=x["label"][:, :2]), "inputs['label']", ["[B, 3]", "(2, 2)"]),
    (lambda x: dict(x, label=x["label"][:1]), "inputs", ["same batch size", "'label': 1"]),
])
def test_bad_inputs_name_the_key(model, change, key, words):
    with pytest.raises(ValueError) as err:
        model(change(_inputs()), subsampled_output_points=SUBSAMPLED)
    msg = str(err.value)
    assert msg.startswith(key + ":"), msg
    for w in words:
        assert w in msg, msg


def test_audio_of_shape_b_l_1_and_not_a_dict(model):
    x = _inputs()
    want = model(x, subsampled_output_points=SUBSAMPLED)
    got = model(dict(x, audio=x["audio"][..., None]), subsampled_output_points=SUBSAMPLED)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(TypeError, match="inputs: expected a dict"):
        model(x["image"])
    with pytest.raises(ValueError, match=r"inputs\['audio'\]: 64 non-finite"):
        model(dict(x, audio=np.full((2, 32), np.nan)))


@pytest.mark.parametrize("points, words", [
    ({"audio": np.arange(3)}, ["subsampled_output_points['image']: missing", "np.arange(128)"]),
    ({"audio": np.arange(3), "image": np.array([0, 128])}, ["['image']", "[0, 128)", "[0, 128]"]),
    ({"audio": np.array([-1]), "image": np.arange(3)}, ["['audio']", "[0, 8)"]),
    ({"audio": np.array([0.0]), "image": np.arange(3)}, ["['audio']", "integer indices", "float64"]),
    ({"audio": np.zeros((1, 2), int), "image": np.arange(3)}, ["['audio']", "1-D", "(1, 2)"]),
    ({"audio": np.arange(3), "image": np.arange(3), "label": np.arange(1)}, ["['label']: expected None"]),
    ({"audio": np.arange(3), "image": np.arange(3), "text": np.arange(1)}, ["unexpected keys ['text']"]),
])
def test_bad_subsampled_output_points_name_the_key(model, points, words):
    with pytest.raises(ValueError) as err:
        model(_inputs(), subsampled_output_points=points)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_other_options_and_a_mask_are_refused(model):
    with pytest.raises(ValueError, match="only the option subsampled_output_points"):
        model(_inputs(), output_points={})
    with pytest.raises(ValueError, match="mask"):
        model(_inputs(), np.ones((2, 17), bool))


def test_label_none_is_accepted_and_backward_checks_dy(model):
    x = _inputs()
    want, _ = model.forward(x, subsampled_output_points=SUBSAMPLED)
    y, cache = model.forward(x, subsampled_output_points={**SUBSAMPLED, "label": None})
    for k in want:
        np.testing.assert_array_equal(y[k], want[k])
    dy = {k: np.ones_like(v) for k, v in y.items()}
    with pytest.raises(ValueError, match="dy: expected a dict"):
        model.backward({k: v for k, v in dy.items() if k != "label"}, cache)
    with pytest.raises(ValueError, match="dy\\['image'\\]"):
        model.backward(dict(dy, image=dy["image"][:, :2]), cache)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_mask_token_layer_gradients(prob):
    rng = np.random.default_rng(0)
    x, token, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal((1, 5)), rng.standard_normal((2, 3, 5))
    y, cache = multimodal.mask_token_forward(x, {"token": token}, mask_prob=prob)
    np.testing.assert_array_equal(y, np.broadcast_to(token, y.shape) if prob else x)
    dx, g = multimodal.mask_token_backward(dy, cache)
    np.testing.assert_array_equal(dx, 0 * dy if prob else dy)
    np.testing.assert_array_equal(g["token"], dy.sum(axis=(0, 1))[None] if prob else np.zeros((1, 5)))
    with pytest.raises(ValueError, match="mask_prob"):
        multimodal.mask_token_forward(x, {"token": token}, mask_prob=0.5)


def test_subsampled_positions_are_hf_grid_not_linspace():
    """-1 + 2 * idx / dims: the last point of an axis of 4 sits at 0.5, not at 1 (linspace)."""
    pos = multimodal.subsampled_positions(np.array([0, 1, 7]), (2, 4))
    np.testing.assert_array_equal(pos, [[-1, -1], [-1, -0.5], [0, 0.5]])
