"""Images in and out for the vision and optical-flow Perceivers: loading, HF's preprocessing,
the flow model's input scaling, and the Middlebury colour coding of a flow field.

::

    rgb = load_image("cat.jpg")                       # [H, W, 3] uint8, as HF's load_image
    pixel_values = ImageProcessor()([rgb])            # [B, 3, 224, 224] float32
    frames = frames_for_flow(rgb1, rgb2)              # [1, 2, 3, H, W] float32 in [-1, 1]
    save_png("flow.png", flow_to_color(flow))         # flow [H, W, 2] -> [H, W, 3] uint8

Pillow is needed only by :func:`load_image`, :class:`ImageProcessor` (its resize) and
:func:`save_png`, and is imported when they run (``pip install perceiver_np[images]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._files import atomic_write

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageProcessor",
    "flow_to_color",
    "frames_for_flow",
    "load_image",
    "save_png",
]

PathLike = str | os.PathLike[str]

#: transformers' IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD, what PerceiverImageProcessor uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pillow() -> Any:
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as exc:
        raise ImportError("perceiver_np.images needs pillow to read, resize and write images: "
                          "pip install perceiver_np[images]") from exc
    return PIL


def load_image(path: PathLike) -> np.ndarray:
    """The image at ``path`` as ``[H, W, 3]`` uint8 RGB, as ``transformers.image_utils.load_image``
    makes it: turned upright by its EXIF orientation, then converted to RGB by pillow (grey and
    palette images expanded, an alpha channel dropped, not blended).

    A missing path is a FileNotFoundError, a file pillow cannot read as an image a ValueError;
    both name the path.
    """
    pil = _pillow()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    try:
        with pil.Image.open(p) as image:
            upright = pil.ImageOps.exif_transpose(image)
            return np.array(upright.convert("RGB"), dtype=np.uint8)
    except (pil.UnidentifiedImageError, pil.Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as exc:
        raise ValueError(f"{p}: not an image pillow can read ({type(exc).__name__}: {exc})") from exc


class ImageProcessor:
    """``transformers.PerceiverImageProcessor``'s preprocessing with its defaults: for each
    ``[H, W, 3]`` uint8 image, a centred square crop of side ``int(size / crop_size * min(H, W))``
    (7/8 of the shorter side), a bicubic resize to ``size x size`` by pillow, ``x / 255``, then
    ``(x - IMAGENET_MEAN) / IMAGENET_STD`` per channel.

    The result equals HF's pillow backend (``PerceiverImageProcessorPil``, which
    ``PerceiverImageProcessor`` is when torchvision is not installed) bit for bit: the same crop,
    pillow's own resize on the same uint8 pixels, and the same float operations (the rescale in
    float64 rounded once to float32, the normalisation in float32). HF's default backend when
    torchvision is installed resizes with torchvision and fuses rescale and normalisation, so its
    values can differ from these (and from its pillow backend) by float32 rounding, and by the
    odd uint8 level where the two bicubic resizes round differently.
    """

    def __init__(self, size: int = 224, crop_size: int = 256,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        for name, value in (("size", size), ("crop_size", crop_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.size, self.crop_size = size, crop_size
        self.mean = np.array(mean, dtype=np.float32)  # [3]
        self.std = np.array(std, dtype=np.float32)  # [3]
        if self.mean.shape != (3,) or self.std.shape != (3,) or not np.all(self.std > 0):
            raise ValueError(f"mean, std: expected three numbers each, std positive; got {mean!r}, {std!r}")

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """``images``: one ``[H, W, 3]`` uint8 array, a ``[B, H, W, 3]`` one, or a list of
        ``[H, W, 3]`` arrays of any sizes. Returns pixel_values ``[B, 3, size, size]`` float32."""
        batch: list[Any]
        if isinstance(images, np.ndarray) and images.ndim == 3:
            batch, names = [images], ["images"]
        elif isinstance(images, np.ndarray) and images.ndim != 4:
            raise ValueError(f"images: expected shape [H, W, 3] or [B, H, W, 3], got {images.shape}")
        elif isinstance(images, (np.ndarray, list, tuple)) and len(images) > 0:
            batch, names = list(images), [f"images[{i}]" for i in range(len(images))]
        else:
            raise TypeError(f"images: expected an [H, W, 3] or [B, H, W, 3] uint8 array or a non-empty list "
                            f"of [H, W, 3] arrays, got {type(images).__name__}")
        return np.stack([self._one(name, image) for name, image in zip(names, batch, strict=True)])

    def _one(self, name: str, image: object) -> np.ndarray:
        rgb = _rgb(name, image)
        h, w, _ = rgb.shape
        side = int(self.size / self.crop_size * min(h, w))
        if side < 1:
            raise ValueError(f"{name}: {h}x{w} pixels is too small: the centre crop "
                             f"({self.size}/{self.crop_size} of the shorter side) would be empty")
        top, left = (h - side) // 2, (w - side) // 2
        crop = np.ascontiguousarray(rgb[top:top + side, left:left + side])  # [H, W, 3] -> [side, side, 3]
        pil = _pillow()
        resized = pil.Image.fromarray(crop).resize((self.size, self.size), pil.Image.Resampling.BICUBIC)
        x = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)  # [size, size, 3]
        x = (x - self.mean) / self.std
        return x.transpose(2, 0, 1)  # [size, size, 3] -> [3, size, size]


def frames_for_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """Two ``[H, W, 3]`` uint8 frames as the optical-flow Perceiver's input, before its 3x3
    patch extraction: ``x / 255 * 2 - 1`` (DeepMind's colab ``normalize``; computed in float64,
    rounded once to float32), stacked to ``[1, 2, 3, H, W]`` float32 in [-1, 1]."""
    a, b = _rgb("img1", img1), _rgb("img2", img2)
    if a.shape != b.shape:
        raise ValueError(f"img2: expected the shape of img1 {a.shape}, got {b.shape}")
    frames = np.stack([a, b]).astype(np.float64) / 255 * 2 - 1  # [2, H, W, 3]
    return frames.astype(np.float32).transpose(0, 3, 1, 2)[None].copy()  # -> [1, 2, 3, H, W]


def _colour_wheel() -> np.ndarray:
    """The Middlebury colour wheel (Baker et al., ICCV 2007): 55 hues [55, 3], red -> yellow ->
    green -> cyan -> blue -> magenta -> red, each segment a ramp of ``floor(255 * i / n)``."""
    # (hues in the segment, the channel at 255, the channel ramped, ramped up or down)
    segments = [(15, 0, 1, True), (6, 1, 0, False), (4, 1, 2, True), (11, 2, 1, False),
                (13, 2, 0, True), (6, 0, 2, False)]
    blocks = []
    for n, full, ramped, up in segments:
        block = np.zeros((n, 3))
        ramp = np.floor(255 * np.arange(n) / n)
        block[:, full] = 255
        block[:, ramped] = ramp if up else 255 - ramp
        blocks.append(block)
    return np.concatenate(blocks)


def flow_to_color(flow: np.ndarray) -> np.ndarray:
    """The standard Middlebury colour coding of a flow field ``[H, W, 2]`` (``flow[..., 0]``
    horizontal, positive to the right; ``flow[..., 1]`` vertical, positive down) as an
    ``[H, W, 3]`` uint8 RGB image: the hue is the direction (right red, down yellow-orange, left
    cyan, up blue-violet), the saturation the length relative to the longest vector of the field
    (zero flow is white). The algorithm of the C++ / Matlab originals and of the ``flow_vis``
    package (``flow_to_color(flow)``), computed in float64 (flow_vis computes in the flow's
    dtype: for float32 flow its colours can differ from these by one level, rarely)."""
    arr = np.asarray(flow)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"flow: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 2 or 0 in arr.shape:
        raise ValueError(f"flow: expected shape [H, W, 2] with H, W > 0, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"flow: {int(np.sum(~np.isfinite(arr)))} values are NaN or infinite")
    u, v = arr[..., 0].astype(np.float64), arr[..., 1].astype(np.float64)  # [H, W] each
    rad_max = np.sqrt(u**2 + v**2).max()
    u, v = u / (rad_max + 1e-5), v / (rad_max + 1e-5)
    rad = np.sqrt(u**2 + v**2)  # < 1 everywhere: every colour is inside the wheel
    wheel = _colour_wheel()
    n = len(wheel)
    fk = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (n - 1)  # the angle as a position on the wheel
    k0 = np.floor(fk).astype(np.int64)
    k1 = (k0 + 1) % n
    f = (fk - k0)[..., None]  # [H, W, 1]
    col = (1 - f) * (wheel[k0] / 255) + f * (wheel[k1] / 255)  # [H, W, 3]
    col = 1 - rad[..., None] * (1 - col)  # towards white as the flow gets shorter
    return np.floor(255 * col).astype(np.uint8)


def save_png(path: PathLike, rgb: np.ndarray) -> Path:
    """Write ``rgb`` ``[H, W, 3]`` uint8 to ``path`` as a PNG, atomically (a temporary file next
    to it, fsynced, then renamed); return ``path`` as a Path."""
    arr = _rgb("rgb", rgb)
    pil = _pillow()
    image = pil.Image.fromarray(np.ascontiguousarray(arr))

    def write(f: IO[bytes]) -> None:
        image.save(f, format="PNG")

    target = Path(path)
    atomic_write(target, write)
    return target


def _rgb(name: str, image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray [H, W, 3] uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name}: expected dtype uint8 (RGB values 0-255, as load_image returns), "
                        f"got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{name}: expected shape [H, W, 3] (RGB) with H, W > 0, got {image.shape}")
    return image
