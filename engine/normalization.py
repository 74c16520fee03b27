"""Per-channel normalisation statistics: ImageNet's for 3 channels, else given or measured on the data.

* ``resolve_normalization(in_chans, mean, std, paths)`` -> (mean, std): the given values
  (checked: one per channel, std > 0); else ImageNet's for 3 channels; else
  ``channel_statistics(paths, in_chans)``. A run stores the result (e.g. in its checkpoint) so
  that resuming does not measure again.
* ``channel_statistics(paths, in_chans, max_images=STATISTICS_IMAGES)``: mean and std of every
  pixel of up to 256 images at evenly spaced positions of ``paths`` (always the same ones), each
  decoded by ``decode_channels`` (values in [0, 1] for integer data). Unreadable files are left
  out; ``NoFittingImageError`` if files were found but none has (or converts to) ``in_chans``
  channels, ``UnreadableDatasetError`` if none could be read at all.
* ``first_fitting_image(paths, in_chans)``: position of the first file, of up to 64 evenly
  spaced ones, that decodes to ``in_chans`` channels (a cheap check before training: usually one
  decode), with the same errors.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Sequence

import models  # noqa: F401  (torchvision guard before timm)
import numpy as np
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .image_decode import UNREADABLE_IMAGE_ERRORS, ChannelMismatchError, UnreadableDatasetError, decode_channels

_logger = logging.getLogger(__name__)

STATISTICS_IMAGES = 256
PROBED_IMAGES = 64
MIN_STD = 1e-6  # a constant channel is divided by this, not by 0

Statistics = tuple[tuple[float, ...], tuple[float, ...]]


class NoFittingImageError(ValueError):
    """None of the files checked has (or converts to) the number of channels asked for."""


def spread_positions(count: int, total: int) -> list[int]:
    """``min(count, total)`` positions spread evenly over ``range(total)``, first and last included."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64)).tolist() if total else []


def _decoded(paths: Sequence[str | os.PathLike], in_chans: int, max_images: int) -> Iterator[tuple[int, np.ndarray]]:
    """(position, (C, H, W) array) of the readable files of ``max_images`` evenly spaced ones;
    afterwards, the errors described in the module docstring if there was none. Unreadable files
    are not logged here: training names each one when it meets it."""
    positions = spread_positions(max_images, len(paths))
    found, mismatch = False, None
    for position in positions:
        try:
            yield position, decode_channels(paths[position], in_chans).numpy()
            found = True
        except ChannelMismatchError as error:
            mismatch = mismatch or error
        except UNREADABLE_IMAGE_ERRORS:
            pass
    if found:
        return
    if mismatch is not None:
        raise NoFittingImageError(f"none of the {len(positions)} files checked (spread evenly over all {len(paths)}) "
                                  f"has {in_chans} channels, e.g. {mismatch}")
    raise UnreadableDatasetError(f"none of the {len(positions)} files checked (spread evenly over all {len(paths)}) "
                                 "is readable; check the files (e.g. open one with PIL or numpy)")


def first_fitting_image(paths: Sequence[str | os.PathLike], in_chans: int, max_images: int = PROBED_IMAGES) -> int:
    """Position of the first readable file with ``in_chans`` channels among ``max_images`` evenly spaced ones."""
    return next(_decoded(paths, in_chans, max_images))[0]  # _decoded raises if there is none


def channel_statistics(paths: Sequence[str | os.PathLike], in_chans: int,
                       max_images: int = STATISTICS_IMAGES) -> Statistics:
    """(mean, std) per channel over every pixel of up to ``max_images`` evenly spaced images."""
    sums, squares, pixels = np.zeros(in_chans), np.zeros(in_chans), 0
    for _, image in _decoded(paths, in_chans, max_images):
        values = image.reshape(in_chans, -1).astype(np.float64)
        sums += values.sum(axis=1)
        squares += np.square(values).sum(axis=1)
        pixels += values.shape[1]
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    if (std < MIN_STD).any():
        _logger.warning("channels %s are constant in the images sampled; their std is taken as %g",
                        np.flatnonzero(std < MIN_STD).tolist(), MIN_STD)
    return tuple(mean.tolist()), tuple(np.maximum(std, MIN_STD).tolist())


def resolve_normalization(in_chans: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                          paths: Optional[Sequence[str | os.PathLike]] = None) -> Statistics:
    """The (mean, std) to normalise ``in_chans`` channels with; see the module docstring.
    ValueError if only one of mean/std is given, or they are not one positive std per channel."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (one value per channel), or neither")
    if mean is not None:
        if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
            raise ValueError(f"mean and std need {in_chans} values each (one per channel), std > 0; "
                             f"got mean {list(mean)}, std {list(std)}")
        return tuple(map(float, mean)), tuple(map(float, std))
    if in_chans == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if paths is None:
        raise ValueError(f"{in_chans} channels need mean and std, or the images to measure them on")
    mean, std = channel_statistics(paths, in_chans)
    _logger.info("normalisation of the %d channels measured on up to %d images: mean %s, std %s", in_chans,
                 STATISTICS_IMAGES, [round(value, 4) for value in mean], [round(value, 4) for value in std])
    return mean, std
