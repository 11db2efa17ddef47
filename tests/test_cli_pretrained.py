"""``perceiver-np fill-mask``, ``classify-image`` and ``flow`` against Hugging Face itself: tiny
random HF models written with ``save_pretrained``, run here through the command and by HF (its
tokenizer, image processor and model, float32 as shipped), and every user error one line naming
the path or flag, without a traceback."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

from perceiver_np.images import flow_to_color
from perceiver_np.tolerances import PUBLISHED_FLOAT32_RTOL

from .hf_helpers import random_hf_model
from .test_cli import run

torch = pytest.importorskip("torch", reason="the HF cross-checks need torch (make test installs it)")
transformers = pytest.importorskip("transformers", reason="the HF cross-checks need transformers")
PIL_Image = pytest.importorskip("PIL.Image", reason="the image commands need pillow")

SMALL = dict(num_latents=4, d_latents=16, num_blocks=1, num_self_attends_per_block=1,
             num_self_attention_heads=2, num_cross_attention_heads=1, attention_probs_dropout_prob=0.0)
LABELS = {0: "cat", 1: "dog", 2: "tabby, tabby cat"}
IMAGE_ARCHS = ("PerceiverForImageClassificationLearned", "PerceiverForImageClassificationFourier",
               "PerceiverForImageClassificationConvProcessing")


def _config(**extra):
    return transformers.PerceiverConfig(**{**SMALL, **extra})


def _save(cls_name, config, path, seed):
    """A random HF model (every parameter random: tests/hf_helpers.py), saved in float32."""
    model = random_hf_model(getattr(transformers, cls_name), config, seed).float().eval()
    model.save_pretrained(path)
    return model


def _png(path, rng, height, width, mode="RGB"):
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    PIL_Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    """The model directories, their HF models and the image files, shared by every test."""
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("pretrained_cli")
    rng = np.random.default_rng(0)
    ns = SimpleNamespace(root=root, hf={})
    labels = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    specs = {
        "mlm": ("PerceiverForMaskedLM", _config(d_model=16, vocab_size=262, max_position_embeddings=32)),
        "learned": ("PerceiverForImageClassificationLearned", _config(d_model=512, image_size=6, **labels)),
        "fourier": ("PerceiverForImageClassificationFourier", _config(d_model=261, **labels)),
        "conv": ("PerceiverForImageClassificationConvProcessing", _config(d_model=322, **labels)),
        "flow": ("PerceiverForOpticalFlow", _config(d_model=322, train_size=[8, 10])),
    }
    for seed, (name, (arch, config)) in enumerate(specs.items()):
        setattr(ns, name, root / name)
        ns.hf[name] = _save(arch, config, root / name, seed)
    # the Fourier model's directory holds an image processor config, as the hub's do (here 32 x 32)
    transformers.PerceiverImageProcessorPil(size={"height": 32, "width": 32},
                                            crop_size={"height": 40, "width": 40}).save_pretrained(ns.fourier)
    ns.images = [_png(root / "wide.png", rng, 60, 80), _png(root / "tall.png", rng, 90, 50),
                 _png(root / "grey.png", rng, 70, 70, mode="L")]
    ns.frame1, ns.frame2 = _png(root / "f1.png", rng, 8, 10), _png(root / "f2.png", rng, 8, 10)
    ns.big_frame = _png(root / "big.png", rng, 9, 10)
    ns.tiny = _png(root / "tiny.png", rng, 1, 1)
    ns.missing = root / "missing.png"
    ns.folder = root / "a_folder"
    ns.folder.mkdir()
    ns.empty_dir = root / "empty_dir"
    ns.empty_dir.mkdir()
    ns.text = root / "notes.png"
    ns.text.write_text("not an image\n")
    ns.nowhere = root / "nowhere"
    ns.bad_processor = root / "bad_processor"
    ns.bad_processor.mkdir()
    for item in ns.learned.iterdir():
        (ns.bad_processor / item.name).write_bytes(item.read_bytes())
    (ns.bad_processor / "preprocessor_config.json").write_text(json.dumps({"do_center_crop": False}))
    return ns


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ---- fill-mask ----------------------------------------------------------------------------------


def _hf_fill(m, expanded):
    """HF's tokenizer and model on the text with every mask written as [MASK] ids: (the filled
    text's spans decoded by HF's tokenizer, logits [N, V], the masked positions)."""
    tok = transformers.PerceiverTokenizer()
    enc = tok(expanded, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = m.hf["mlm"](inputs=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0].numpy()
    where = np.flatnonzero(enc["input_ids"][0].numpy() == tok.mask_token_id)
    return tok, logits, where


@pytest.mark.parametrize("text, pieces", [
    ("This is an [MASK:9] sentence", ["This is an ", 9, " sentence"]),
    ("[MASK]bc", [1, "bc"]),
    ("a[MASK][MASK:2]d e[MASK]", ["a", 3, "d e", 1]),  # adjacent masks: one span
    ("wörld [MASK:4]!", ["wörld ", 4, "!"]),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fill_mask_equals_hf(text, pieces, dtype, m, capsys):
    expanded = "".join(p if isinstance(p, str) else "[MASK]" * p for p in pieces)
    tok, logits, where = _hf_fill(m, expanded)
    want, start = [], 0
    for p in pieces:
        if isinstance(p, str):
            want.append(p)
        else:
            want.append(tok.decode(logits[where[start:start + p]].argmax(-1)))  # as HF's example
            start += p
    code, out, err = run(["fill-mask", m.mlm, text, "--dtype", dtype], capsys)
    assert code == 0, err
    assert err == ""
    assert out == "".join(want) + "\n"


def test_fill_mask_top_k_are_hfs_bytes_and_probabilities(m, capsys):
    text = "Hi [MASK:3]!"
    _, logits, where = _hf_fill(m, "Hi " + "[MASK]" * 3 + "!")
    code, out, err = run(["fill-mask", m.mlm, text, "--top", "4"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 1 + 3
    probs = torch.from_numpy(logits[where]).softmax(-1).numpy()  # [3, V]
    for b, (line, position, p) in enumerate(zip(lines[1:], where, probs, strict=True), 1):
        head, _, rest = line.partition(": ")
        assert head == f"span 1, byte {b} (input position {position})"
        shown = re.findall(r"(b'(?:[^'\\]|\\.)*'|b\"[^\"]*\"|\[[A-Z]+\]) ([0-9.]+)", rest)
        assert len(shown) == 4
        order = np.argsort(-p, kind="stable")[:4]
        tok = transformers.PerceiverTokenizer()
        for (label, value), i in zip(shown, order, strict=True):
            assert label == (repr(bytes([i - 6])) if i >= 6 else tok.decode([i]))  # a byte, or [PAD] ...
            assert abs(float(value) - p[i]) <= 1e-5


def test_fill_mask_top_k_beyond_the_vocabulary_lists_every_id(m, capsys):
    code, out, _ = run(["fill-mask", m.mlm, "[MASK]", "--top", "1000"], capsys)
    assert code == 0
    assert len(out.splitlines()[1].split("  ")) == 262


# ---- classify-image -----------------------------------------------------------------------------


def _hf_probs(m, name, paths):
    """HF's image processor (its pillow backend: what PerceiverImageProcessor is without
    torchvision) and model -> probabilities [B, labels]."""
    if name == "fourier":
        proc = transformers.PerceiverImageProcessorPil.from_pretrained(m.fourier)
    elif name == "learned":
        proc = transformers.PerceiverImageProcessorPil(size={"height": 6, "width": 6})
    else:
        proc = transformers.PerceiverImageProcessorPil()
    images = [transformers.image_utils.load_image(str(p)) for p in paths]
    pixel_values = proc(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return m.hf[name](inputs=pixel_values).logits.softmax(-1).numpy()


def _parse_classes(out):
    """stdout -> {path: [(label, probability), ...]}."""
    result, current = {}, None
    for line in out.splitlines():
        if not line.startswith("  "):
            current = result.setdefault(line, [])
        else:
            value, label = line.strip().split("  ", 1)
            current.append((label, float(value)))
    return result


@pytest.mark.parametrize("name", ["learned", "fourier", "conv"])
def test_classify_image_equals_hf(name, m, capsys):
    paths = m.images if name != "conv" else m.images[:1]  # conv: 224 x 224, the default
    want = _hf_probs(m, name, paths)
    code, out, err = run(["classify-image", getattr(m, name), *paths, "--top", "2"], capsys)
    assert code == 0, err
    assert err == ""
    got = _parse_classes(out)
    assert list(got) == [str(p) for p in paths]
    for p, probs in zip(paths, want, strict=True):
        order = np.argsort(-probs, kind="stable")[:2]
        assert [label for label, _ in got[str(p)]] == [LABELS[int(i)] for i in order]
        for (_, value), i in zip(got[str(p)], order, strict=True):
            assert abs(value - probs[i]) <= 1e-5


def test_classify_image_top_defaults_to_5_and_stops_at_the_labels(m, capsys):
    code, out, _ = run(["classify-image", m.learned, m.images[0]], capsys)
    assert code == 0
    got = _parse_classes(out)[str(m.images[0])]
    assert sorted(label for label, _ in got) == sorted(LABELS.values())
    assert abs(sum(v for _, v in got) - 1) <= 1e-5


# ---- flow ---------------------------------------------------------------------------------------


def _hf_patches(frames):
    """The optical-flow colab's input: [2, H, W, 3] uint8 -> [1, 2, 27, H, W], x / 255 * 2 - 1 and
    TF 'SAME' 3x3 patches (torch unfold), channel (i*3 + j)*3 + c."""
    x = torch.from_numpy((frames.astype(np.float64) / 255 * 2 - 1).astype(np.float32)).permute(0, 3, 1, 2)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))  # [2, 3, H+2, W+2]
    patches = xp.unfold(2, 3, 1).unfold(3, 3, 1)  # [2, 3, H, W, 3, 3]
    t, c, h, w = x.shape
    return patches.permute(0, 4, 5, 1, 2, 3).reshape(t, 9 * c, h, w)[None]  # -> [1, 2, 27, H, W]


def test_flow_equals_hf(m, tmp_path, capsys):
    out_npy, out_png = tmp_path / "flow.npy", tmp_path / "flow.png"
    code, out, err = run(["flow", m.flow, m.frame1, m.frame2, "--out", out_npy, "--png", out_png], capsys)
    assert code == 0, err
    assert out == "" and err == ""
    frames = np.stack([np.asarray(PIL_Image.open(p).convert("RGB")) for p in (m.frame1, m.frame2)])
    with torch.no_grad():
        want = m.hf["flow"](inputs=_hf_patches(frames)).logits[0].numpy()  # [H, W, 2]
    flow = np.load(out_npy, allow_pickle=False)
    assert flow.dtype == np.float32 and flow.shape == (8, 10, 2)
    assert _rel(flow, want) <= PUBLISHED_FLOAT32_RTOL
    with PIL_Image.open(out_png) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (10, 8)
        assert np.array_equal(np.asarray(image), flow_to_color(flow))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_flow_without_png_writes_only_the_array(m, tmp_path, capsys):
    code, _, err = run(["flow", m.flow, m.frame1, m.frame2, "--out", tmp_path / "f"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # exactly the path given: no .npy added


# ---- errors -------------------------------------------------------------------------------------

IMAGE_CLASSIFIER_NEEDED = "classify-image needs a PerceiverForImageClassificationLearned, " \
    "PerceiverForImageClassificationFourier or PerceiverForImageClassificationConvProcessing"


def _flow(m, *more, out=None):
    return ["flow", m.flow, m.frame1, m.frame2, "--out", out or m.root / "flow_out.npy", *more]


# (argv builder, exit code, what stderr must name)
CASES = {
    "fill-mask DIR missing": (lambda m: ["fill-mask", m.root / "no_dir", "a[MASK]"], 2,
                              lambda m: f"{m.root / 'no_dir'}: no such directory"),
    "fill-mask DIR a file": (lambda m: ["fill-mask", m.frame1, "a[MASK]"], 2,
                             lambda m: f"{m.frame1}: not a directory"),
    "fill-mask DIR without config.json": (lambda m: ["fill-mask", m.empty_dir, "a[MASK]"], 2,
                                          lambda m: f"{m.empty_dir / 'config.json'}: no such file"),
    "fill-mask DIR of an image model": (
        lambda m: ["fill-mask", m.fourier, "a[MASK]"], 2,
        lambda m: f"fill-mask needs a PerceiverForMaskedLM, {m.fourier} holds "
                  "PerceiverForImageClassificationFourier"),
    "fill-mask TEXT without a mask": (lambda m: ["fill-mask", m.mlm, "no mask here"], 2,
                                      lambda m: "TEXT: 'no mask here' has no [MASK]"),
    "fill-mask TEXT too long": (
        lambda m: ["fill-mask", m.mlm, "x" * 25 + "[MASK:6]"], 2,
        lambda m: "TEXT: 33 ids ([CLS], 25 of text, 6 masked, [SEP]), more than the model's "
                  "max_position_embeddings = 32"),
    "fill-mask TEXT with a huge mask": (lambda m: ["fill-mask", m.mlm, "[MASK:99999999999999999999999]"], 2,
                                        lambda m: "max_position_embeddings = 32"),
    "fill-mask TEXT [MASK:0]": (lambda m: ["fill-mask", m.mlm, "a[MASK:0]"], 2,
                                lambda m: "TEXT: '[MASK:0]' at character 1"),
    "fill-mask TEXT [MASK:x]": (lambda m: ["fill-mask", m.mlm, "a[MASK:x]"], 2, lambda m: "'[MASK:x]'"),
    "fill-mask TEXT [MASK: unclosed": (lambda m: ["fill-mask", m.mlm, "ab [MASK:3"], 2,
                                       lambda m: "TEXT: '[MASK:' at character 3 is not closed"),
    "fill-mask --top 0": (lambda m: ["fill-mask", m.mlm, "a[MASK]", "--top", "0"], 2, lambda m: "--top"),
    "fill-mask --dtype float16": (lambda m: ["fill-mask", m.mlm, "a[MASK]", "--dtype", "float16"], 2,
                                  lambda m: "--dtype"),
    "classify-image IMAGE missing": (lambda m: ["classify-image", m.learned, m.images[0], m.missing], 2,
                                     lambda m: f"{m.missing}: no such file"),
    "classify-image IMAGE not an image": (lambda m: ["classify-image", m.learned, m.text], 2,
                                          lambda m: f"{m.text}: not an image pillow can read"),
    "classify-image IMAGE a directory": (lambda m: ["classify-image", m.learned, m.folder], 2,
                                         lambda m: f"{m.folder}: is a directory"),
    "classify-image IMAGE too small": (lambda m: ["classify-image", m.learned, m.tiny], 2,
                                       lambda m: f"{m.tiny}: 1x1 pixels is too small"),
    "classify-image DIR of a language model": (
        lambda m: ["classify-image", m.mlm, m.images[0]], 2,
        lambda m: f"{IMAGE_CLASSIFIER_NEEDED}, {m.mlm} holds PerceiverForMaskedLM"),
    "classify-image DIR of the flow model": (lambda m: ["classify-image", m.flow, m.images[0]], 2,
                                             lambda m: f"{m.flow} holds PerceiverForOpticalFlow"),
    "classify-image DIR missing": (lambda m: ["classify-image", m.root / "no_dir", m.images[0]], 2,
                                   lambda m: m.root / "no_dir"),
    "classify-image unsupported preprocessor_config.json": (
        lambda m: ["classify-image", m.bad_processor, m.images[0]], 2,
        lambda m: f"{m.bad_processor / 'preprocessor_config.json'}: do_center_crop = False is not supported"),
    "classify-image no IMAGE": (lambda m: ["classify-image", m.learned], 2, lambda m: "IMAGE"),
    "classify-image --top 0": (lambda m: ["classify-image", m.learned, m.images[0], "--top", "0"], 2,
                               lambda m: "--top"),
    "flow FRAME2 of another size": (
        lambda m: ["flow", m.flow, m.frame1, m.big_frame, "--out", m.root / "o.npy"], 2,
        lambda m: f"{m.big_frame}: 9x10 pixels (height x width), but the model takes frames of its "
                  "train_size, 8x10"),
    "flow FRAME1 missing": (lambda m: ["flow", m.flow, m.missing, m.frame2, "--out", m.root / "o.npy"], 2,
                            lambda m: f"{m.missing}: no such file"),
    "flow FRAME1 not an image": (lambda m: ["flow", m.flow, m.text, m.frame2, "--out", m.root / "o.npy"], 2,
                                 lambda m: f"{m.text}: not an image"),
    "flow DIR of an image model": (lambda m: ["flow", m.conv, m.frame1, m.frame2, "--out", m.root / "o.npy"],
                                   2, lambda m: f"flow needs a PerceiverForOpticalFlow, {m.conv} holds "
                                                "PerceiverForImageClassificationConvProcessing"),
    "flow --out in a missing folder": (lambda m: _flow(m, out=m.nowhere / "f.npy"), 2,
                                       lambda m: f"--out {m.nowhere / 'f.npy'}: the folder"),
    "flow --out is a directory": (lambda m: _flow(m, out=m.folder), 2, lambda m: f"--out {m.folder}"),
    "flow --png in a missing folder": (lambda m: _flow(m, "--png", m.nowhere / "f.png"), 2,
                                       lambda m: f"--png {m.nowhere / 'f.png'}: the folder"),
    "flow --png is --out": (lambda m: _flow(m, "--png", m.root / "flow_out.npy"), 2,
                            lambda m: "the same file as --out"),
    "flow without --out": (lambda m: ["flow", m.flow, m.frame1, m.frame2], 2, lambda m: "--out"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_without_traceback(case, m, capsys):
    argv, want_code, named = CASES[case]
    t0 = time.perf_counter()
    code, out, err = run(argv(m), capsys)
    command = case.split()[0]
    assert code == want_code, err
    assert "Traceback" not in err
    assert f"perceiver-np {command}: error: " in err
    assert str(named(m)) in err, err
    assert out == ""
    assert ".tmp" not in err
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("command", ["fill-mask", "classify-image", "flow"])
def test_inputs_and_outputs_are_checked_before_the_model_is_loaded(command, m, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("perceiver_np.pretrained.from_pretrained", no_work)
    argv = {"fill-mask": ["fill-mask", m.mlm, "x" * 40 + "[MASK]"],
            "classify-image": ["classify-image", m.learned, *m.images, m.missing],
            "flow": _flow(m, "--png", m.nowhere / "f.png")}[command]
    code, _, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err and "the model was loaded" not in err


def test_an_interrupt_exits_130(m, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("perceiver_np.pretrained.from_pretrained", interrupted)
    code, out, err = run(["classify-image", m.learned, m.images[0]], capsys)
    assert code == 130 and out == "" and "perceiver-np classify-image: interrupted" in err


def test_help_lists_the_commands_and_the_mask_syntax(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("fill-mask", "classify-image", "flow"):
        assert f"perceiver-np {command}" in out
    code, out, _ = run(["fill-mask", "--help"], capsys)
    assert code == 0 and "[MASK:N] masks N bytes" in " ".join(out.split())


def test_eval_and_predict_refuse_a_published_models_checkpoint(tmp_path, capsys):
    from perceiver_np import pretrained
    from perceiver_np.checkpoint import save_checkpoint

    model = pretrained.PretrainedPerceiver("PerceiverForSequenceClassification", _config(
        d_model=16, vocab_size=262, max_position_embeddings=8, num_labels=2).to_dict())
    ck = tmp_path / "ck.npz"
    save_checkpoint(ck, model=model, params=model.params)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((2, 8, 16), np.float32), y=np.zeros(2, np.int64))
    code, _, err = run(["eval", "--checkpoint", str(ck), "--data", str(data)], capsys)
    assert code == 2 and "holds a published model (PerceiverForSequenceClassification)" in err, err
