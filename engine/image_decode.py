"""Decoding an image file into the channels a model takes; a file that cannot be used raises one
of ``UNREADABLE_IMAGE_ERRORS`` (datasets skip and count it).

* 3 channels: ``load_rgb_image(path)`` decodes any image PIL opens as 8-bit RGB (``to_rgb``:
  grayscale, 16-bit, 1-bit, palette, RGBA, CMYK, float TIFF), and ``.npy`` arrays (H, W, 3),
  (H, W, 1) or (H, W); ``open_image(path)`` only opens the file, for transforms that decode it
  themselves (``--fast_decode``).
* any count: ``decode_channels(path, in_chans)`` -> (in_chans, H, W) float32 tensor, integer
  data scaled to [0, 1] (8-bit / 255, 16-bit / 65535; 32-bit integer images like ``to_rgb``),
  float data as it is:
  - 1: grayscale images as they are, colour images as their luminance (PIL's "L");
  - 3: ``load_rgb_image`` / 255 (what ``ToTensor`` gives);
  - others: ``.npy`` arrays (H, W, in_chans), multi-page TIFFs of ``in_chans`` one-channel
    pages, or images with ``in_chans`` bands (RGBA and CMYK: 4, LA: 2).
  A file whose channels cannot be brought to ``in_chans`` raises ``ChannelMismatchError``.
* ``image_loader(in_chans, opened)``: path -> what the transforms take (an RGB PIL image for 3
  channels, else the tensor of ``decode_channels``).

Every function taking a path also takes a ``NamedBytes``: a file's bytes with its name (a tar
member of a WebDataset shard, ``engine.shards``); the name's extension says how to decode it.
"""
from __future__ import annotations

import functools
import io
import os
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageSequence

ARRAY_SUFFIX = ".npy"

# what decoding raises for a file it cannot use (UnidentifiedImageError and truncation are OSErrors)
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # one channel, more than 8 bits
GRAY_MODES = ("1", "L", *WIDE_GRAY_MODES)
_ARRAY_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class UnreadableImageError(OSError):
    """A file that opened but cannot be used: a failed decode inside a transform, an unsupported array."""


class ChannelMismatchError(UnreadableImageError):
    """A file whose channels cannot be brought to the number asked for."""


class UnreadableDatasetError(RuntimeError):
    """No file of a dataset (or of the sample checked) is readable."""


class NamedBytes(io.BytesIO):
    """The bytes of an image file and its name (e.g. ``shard.tar:17.jpg``), read wherever a path is."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def is_array_file(path: str | os.PathLike | NamedBytes) -> bool:
    name = path.name if isinstance(path, NamedBytes) else os.fspath(path)
    return name.lower().endswith(ARRAY_SUFFIX)


def full_scale(image: Image.Image, values: np.ndarray) -> float:
    """The value of full intensity of a one-channel image of more than 8 bits (``WIDE_GRAY_MODES``):
    65535 for 16-bit modes and 32-bit integers above 255, 1 for floats up to 1, else 255."""
    if image.mode == "F":
        return 1.0 if values.max(initial=0) <= 1.0 else 255.0
    return 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit grayscale rescaled to 0-255, transparency composited on white."""
    if image.mode in WIDE_GRAY_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values * (255.0 / full_scale(image, values)), 0, 255).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_array(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` file as (H, W, C) float32, integer data scaled to [0, 1] (never unpickles)."""
    array = np.load(path, allow_pickle=False)
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3):
        shape = getattr(array, "shape", type(array).__name__)
        raise UnreadableImageError(f"{path}: expected an array (H, W, C) or (H, W), found {shape}")
    if array.dtype in _ARRAY_FULL_SCALE:
        array = array.astype(np.float32) / _ARRAY_FULL_SCALE[array.dtype]
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
    else:
        raise UnreadableImageError(f"{path}: arrays of {array.dtype} are not supported (uint8, uint16 or float)")
    return array if array.ndim == 3 else array[:, :, None]


def _require_channels(channels: int, in_chans: int, path, what: str) -> None:
    if channels != in_chans:
        raise ChannelMismatchError(f"{path}: {what} has {channels} channels, not {in_chans}")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully as 8-bit RGB; raises one of ``UNREADABLE_IMAGE_ERRORS`` if it cannot."""
    if is_array_file(path):
        array = load_array(path)
        if array.shape[2] not in (1, 3):
            _require_channels(array.shape[2], 3, path, "the array")
        pixels = np.clip(array * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(pixels if pixels.shape[2] == 3 else pixels[:, :, 0]).convert("RGB")
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def open_image(path: str | os.PathLike) -> Image.Image:
    """``path`` opened with its header read, not decoded (for ``DraftRandomResizedCrop``; arrays are
    decoded); raises one of ``UNREADABLE_IMAGE_ERRORS`` if it is not an image. Decoding closes the file."""
    return load_rgb_image(path) if is_array_file(path) else Image.open(path)


def _unit_bands(image: Image.Image) -> np.ndarray:
    """A decoded PIL image as (H, W, bands) float32 in [0, 1] (palette images as RGB or RGBA)."""
    if image.mode in WIDE_GRAY_MODES:
        values = np.asarray(image, dtype=np.float64)
        return (values / full_scale(image, values)).astype(np.float32)[:, :, None]
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    values = np.asarray(image, dtype=np.float32) / 255.0
    return values if values.ndim == 3 else values[:, :, None]


def _decode_image_channels(path: str | os.PathLike, in_chans: int) -> np.ndarray:
    with Image.open(path) as image:
        if in_chans == 1:
            image.load()
            return _unit_bands(image if image.mode in GRAY_MODES else to_rgb(image).convert("L"))
        if in_chans == 3:
            image.load()
            return np.asarray(to_rgb(image), dtype=np.float32) / 255.0
        pages = getattr(image, "n_frames", 1)
        if pages > 1:  # a stack of one-channel pages, e.g. a multi-page TIFF
            _require_channels(pages, in_chans, path, f"the {pages}-page file")
            planes = [_unit_bands(page) for page in ImageSequence.Iterator(image)]
            if any(plane.shape != planes[0].shape or plane.shape[2] != 1 for plane in planes):
                raise ChannelMismatchError(f"{path}: the pages must be one-channel images of one size")
            return np.concatenate(planes, axis=2)
        image.load()
        bands = _unit_bands(image)
        _require_channels(bands.shape[2], in_chans, path, f"the {image.mode} image")
        return bands


def decode_channels(path: str | os.PathLike, in_chans: int) -> torch.Tensor:
    """(in_chans, H, W) float32 tensor of ``path`` as the module docstring says."""
    if is_array_file(path):
        array = np.asarray(load_rgb_image(path), dtype=np.float32) / 255.0 if in_chans == 3 else load_array(path)
        _require_channels(array.shape[2], in_chans, path, "the array")
    else:
        array = _decode_image_channels(path, in_chans)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def image_loader(in_chans: int = 3, opened: bool = False) -> Callable[[str], Image.Image | torch.Tensor]:
    """path -> an RGB PIL image (3 channels; ``opened``: not decoded yet) or ``decode_channels``' tensor."""
    if in_chans == 3:
        return open_image if opened else load_rgb_image
    if opened:
        raise ValueError("only 3-channel images can be handed over undecoded (fast JPEG decoding)")
    return functools.partial(decode_channels, in_chans=in_chans)
