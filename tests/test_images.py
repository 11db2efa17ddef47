"""perceiver_np.images: ImageProcessor bit-identical to transformers' PerceiverImageProcessor
(pillow backend) on images of many sizes, load_image equal to transformers' load_image (EXIF
orientation, grey, palette, alpha), the flow model's input scaling, the Middlebury colour wheel
at known directions, atomic PNG writes, and errors that name the argument or the path."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from perceiver_np.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageProcessor,
    flow_to_color,
    frames_for_flow,
    load_image,
    save_png,
)

# Sizes (H, W): larger than the 256 crop and smaller, square and not, odd, tall and wide, tiny.
HF_REASON = "transformers' image processor and load_image are the reference"
SIZES = [(300, 400), (100, 150), (256, 256), (224, 224), (513, 97), (257, 255), (1000, 20), (3, 3), (2, 5)]


@pytest.fixture(scope="module")
def hf_processor():
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    pytest.importorskip("PIL", reason="the processor resizes with pillow")
    return transformers.PerceiverImageProcessorPil()


def random_image(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def assert_bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


# --- ImageProcessor -----------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_processor_equals_hf_bit_for_bit(hf_processor, rng, h, w):
    image = random_image(rng, h, w)
    theirs = hf_processor(image, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    ours = ImageProcessor()(image)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == np.float32
    assert_bitwise_equal(ours, theirs)


def test_processor_batches_equal_hf(hf_processor, rng):
    images = [random_image(rng, h, w) for h, w in SIZES[:4]]
    theirs = hf_processor(images, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    assert_bitwise_equal(ImageProcessor()(images), theirs)
    same = np.stack([random_image(rng, 64, 80) for _ in range(3)])  # [B, H, W, 3]
    theirs = hf_processor(list(same), return_tensors="np", input_data_format="channels_last")["pixel_values"]
    assert_bitwise_equal(ImageProcessor()(same), theirs)
    assert_bitwise_equal(ImageProcessor()(tuple(same)), theirs)


def test_processor_with_other_sizes_equals_hf(rng):
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    pytest.importorskip("PIL", reason="the processor resizes with pillow")
    hf = transformers.PerceiverImageProcessorPil(size={"height": 64, "width": 64},
                                                 crop_size={"height": 80, "width": 80})
    for h, w in [(120, 90), (50, 51)]:
        image = random_image(rng, h, w)
        theirs = hf(image, return_tensors="np", input_data_format="channels_last")["pixel_values"]
        assert_bitwise_equal(ImageProcessor(size=64, crop_size=80)(image), theirs)


def test_processor_defaults_are_hf_s(hf_processor):
    assert hf_processor.size == {"height": 224, "width": 224}
    assert hf_processor.crop_size == {"height": 256, "width": 256}
    assert tuple(hf_processor.image_mean) == IMAGENET_MEAN and tuple(hf_processor.image_std) == IMAGENET_STD
    assert hf_processor.resample == 3  # PIL.Image.Resampling.BICUBIC
    assert hf_processor.rescale_factor == 1 / 255


def test_processor_crops_the_centre_then_resizes():
    """A 256x320 image: the crop is its centred 224x224 square, so the border never shows."""
    pytest.importorskip("PIL", reason="the processor resizes with pillow")
    image = np.zeros((256, 320, 3), dtype=np.uint8)
    image[16:240, 48:272] = 200  # exactly the crop: (256 - 224) // 2 = 16, (320 - 224) // 2 = 48
    out = ImageProcessor()(image)
    want = (np.float32(np.float64(200) * (1 / 255)) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    assert np.array_equal(out[0], np.broadcast_to(want[:, None, None], (3, 224, 224)))


@pytest.mark.parametrize(("images", "error", "match"), [
    (np.zeros((4, 4, 3), np.float32), TypeError, r"^images: expected dtype uint8"),
    (np.zeros((4, 4), np.uint8), ValueError,
     r"^images: expected shape \[H, W, 3\] or \[B, H, W, 3\], got \(4, 4\)"),
    (np.zeros((4, 4, 4), np.uint8), ValueError, r"^images: expected shape \[H, W, 3\] \(RGB\)"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 1), np.uint8)], ValueError,
     r"^images\[1\]: expected shape"),
    ([np.zeros((4, 4, 3), np.uint8), [[0]]], TypeError, r"^images\[1\]: expected a numpy.ndarray"),
    ([], TypeError, r"^images: expected an \[H, W, 3\] or \[B, H, W, 3\] uint8 array or a non-empty list"),
    ("cat.png", TypeError, r"^images: expected"),
    (np.zeros((1, 9, 3), np.uint8), ValueError, r"^images: 1x9 pixels is too small: the centre crop"),
    (np.zeros((0, 9, 3), np.uint8), ValueError, r"^images: expected shape \[H, W, 3\] \(RGB\) with H, W > 0"),
])
def test_processor_refuses_bad_images_naming_them(images, error, match):
    with pytest.raises(error, match=match):
        ImageProcessor()(images)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(size=0), r"^size: expected a positive int"),
    (dict(crop_size=2.5), r"^crop_size: expected a positive int"),
    (dict(mean=(0.5, 0.5)), r"^mean, std: expected three numbers each"),
    (dict(std=(1.0, 0.0, 1.0)), r"^mean, std: expected three numbers each, std positive"),
])
def test_processor_refuses_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessor(**kw)


# --- load_image, save_png -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pil():
    return pytest.importorskip("PIL.Image", reason="load_image and save_png use pillow")


def _hf_load_image():
    image_utils = pytest.importorskip("transformers.image_utils", reason=HF_REASON)
    return image_utils.load_image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "exif"])
def test_load_image_equals_hf(tmp_path, rng, pil, mode):
    hf_load = _hf_load_image()
    rgb = random_image(rng, 20, 30)
    path = tmp_path / "im.png"
    if mode == "exif":  # orientation 6: the stored pixels are to be turned 90 degrees clockwise
        path = tmp_path / "im.jpg"
        exif = pil.Exif()
        exif[0x0112] = 6
        pil.fromarray(rgb).save(path, exif=exif)
    elif mode == "RGBA":
        pil.fromarray(np.concatenate([rgb, rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)], -1)).save(path)
    elif mode == "I;16":
        pil.fromarray(rng.integers(0, 65536, (20, 30)).astype(np.uint16)).save(path)
    else:
        pil.fromarray(rgb).convert(mode).save(path)
    ours = load_image(path)
    theirs = np.array(hf_load(str(path)))
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3
    assert_bitwise_equal(ours, theirs)
    if mode == "exif":
        assert ours.shape == (30, 20, 3)
    if mode == "RGB":
        assert_bitwise_equal(ours, rgb)


def test_save_png_round_trips_and_is_atomic(tmp_path, rng, pil):
    rgb = random_image(rng, 17, 9)
    path = save_png(tmp_path / "out.png", rgb)
    assert path == tmp_path / "out.png"
    assert_bitwise_equal(load_image(path), rgb)
    assert os.listdir(tmp_path) == ["out.png"]
    save_png(path, rgb[::-1])  # over an existing file
    assert_bitwise_equal(load_image(path), np.ascontiguousarray(rgb[::-1]))
    assert os.listdir(tmp_path) == ["out.png"]


def test_load_image_names_the_path(tmp_path, pil):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'nope.png'}: no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}: not a file"):
        load_image(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'notes.txt'}: not an image pillow can read"):
        load_image(tmp_path / "notes.txt")
    save_png(tmp_path / "cut.png", np.zeros((64, 64, 3), np.uint8) + 7)
    blob = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=f"^{tmp_path / 'cut.png'}: not an image pillow can read"):
        load_image(tmp_path / "cut.png")


def test_save_png_refuses_what_is_not_rgb(tmp_path):
    with pytest.raises(TypeError, match=r"^rgb: expected dtype uint8"):
        save_png(tmp_path / "a.png", np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"^rgb: expected shape \[H, W, 3\]"):
        save_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
    assert os.listdir(tmp_path) == []


def test_without_pillow_the_error_says_what_to_install(tmp_path, monkeypatch):
    for name in ("PIL", "PIL.Image", "PIL.ImageOps"):
        monkeypatch.setitem(sys.modules, name, None)
    (tmp_path / "a.png").write_bytes(b"")
    calls = (lambda: load_image(tmp_path / "a.png"),
             lambda: ImageProcessor()(np.zeros((8, 8, 3), np.uint8)),
             lambda: save_png(tmp_path / "b.png", np.zeros((2, 2, 3), np.uint8)))
    for call in calls:
        with pytest.raises(ImportError, match=r"needs pillow .*pip install perceiver_np\[images\]"):
            call()


# --- optical flow -------------------------------------------------------------------------------


def test_frames_for_flow_scales_to_minus_one_one(rng):
    a, b = random_image(rng, 5, 7), random_image(rng, 5, 7)
    a[0, 0], b[0, 0] = 0, 255
    out = frames_for_flow(a, b)
    assert out.shape == (1, 2, 3, 5, 7) and out.dtype == np.float32 and out.flags.c_contiguous
    assert out[0, 0, :, 0, 0].tolist() == [-1.0] * 3 and out[0, 1, :, 0, 0].tolist() == [1.0] * 3
    want = (np.stack([a, b]).transpose(0, 3, 1, 2) / 255.0 * 2 - 1).astype(np.float32)
    assert_bitwise_equal(out[0], want)


@pytest.mark.parametrize(("args", "error", "match"), [
    ((np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)), ValueError,
     r"^img2: expected the shape of img1 \(4, 4, 3\), got \(4, 5, 3\)"),
    ((np.zeros((4, 4, 3)), np.zeros((4, 4, 3), np.uint8)), TypeError, r"^img1: expected dtype uint8"),
    ((np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8)), ValueError, r"^img2: expected shape"),
])
def test_frames_for_flow_refuses_bad_frames(args, error, match):
    with pytest.raises(error, match=match):
        frames_for_flow(*args)


def test_flow_to_color_is_the_middlebury_wheel():
    """Zero flow is white; the longest vectors get the wheel's full colours: right red, down
    yellow-orange (between wheel entries 13 and 14), left cyan (entry 27), up violet (between
    entries 40 and 41). Half the longest length is half-way to white."""
    flow = np.array([[[0, 0], [2, 0], [0, 2], [-2, 0], [0, -2], [1, 0]]], dtype=np.float32)  # [1, 6, 2]
    rgb = flow_to_color(flow)
    assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0].tolist() == [[255, 255, 255], [255, 0, 0], [255, 229, 0], [0, 209, 255], [88, 0, 255],
                               [255, 127, 127]]


def test_flow_to_color_depends_on_direction_not_scale(rng):
    flow = rng.normal(size=(6, 8, 2))
    assert_bitwise_equal(flow_to_color(flow), flow_to_color(flow * 1024))  # powers of 2 scale exactly
    assert (flow_to_color(np.zeros((3, 4, 2))) == 255).all()


@pytest.mark.parametrize(("flow", "error", "match"), [
    (np.zeros((4, 4, 3)), ValueError, r"^flow: expected shape \[H, W, 2\] with H, W > 0, got \(4, 4, 3\)"),
    (np.zeros((0, 4, 2)), ValueError, r"^flow: expected shape \[H, W, 2\]"),
    (np.full((2, 2, 2), np.nan), ValueError, r"^flow: 8 values are NaN or infinite"),
    (np.zeros((2, 2, 2), complex), TypeError, r"^flow: expected real numbers"),
])
def test_flow_to_color_refuses_bad_flow(flow, error, match):
    with pytest.raises(error, match=match):
        flow_to_color(flow)
