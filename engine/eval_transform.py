"""The evaluation transform (official behaviour): a fixed resize and center crop, ImageNet statistics.

Below 384 px, resize the short side to ``input_size / crop_pct`` (crop_pct 0.875 by default)
then center-crop ``input_size``; from 384 px up, resize straight to ``input_size x input_size``
(aspect not kept, nothing cropped) unless a ``crop_pct`` is given explicitly. Used by
fine-tuning's evaluation, the feature extractor, the linear probe and the k-NN monitor.
``timm_eval_config`` says the same in timm's terms (a model folder's ``pretrained_cfg``).
"""
from __future__ import annotations

from typing import Sequence

import models  # noqa: F401  (torchvision guard before timm/torchvision)
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

DEFAULT_CROP_PCT = 0.875
PLAIN_RESIZE_FROM = 384  # input size from which evaluation resizes without cropping


def build_eval_transform(input_size: int, crop_pct: float | None = None, interpolation: str = "bicubic"):
    """Deterministic evaluation transform, see the module docstring.
    Image (PIL) -> (3, input_size, input_size) float tensor."""
    mode = transforms.InterpolationMode(interpolation)
    if crop_pct is None and input_size >= PLAIN_RESIZE_FROM:
        resize = [transforms.Resize((input_size, input_size), interpolation=mode)]
    else:
        crop_pct = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
        if not 0 < crop_pct <= 1:
            raise ValueError(f"--crop_pct must be in (0, 1], got {crop_pct}")
        resize = [transforms.Resize(int(input_size / crop_pct), interpolation=mode),
                  transforms.CenterCrop(input_size)]
    return transforms.Compose([
        *resize,
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def timm_eval_config(input_size: int, crop_pct: float | None = None, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = IMAGENET_DEFAULT_STD) -> dict:
    """``build_eval_transform`` in timm's terms (a model folder's ``pretrained_cfg``): bicubic,
    ``crop_mode`` "center" (short side to input_size / crop_pct, center crop), or from
    ``PLAIN_RESIZE_FROM`` px without a ``crop_pct`` "squash" with crop_pct 1 (both sides to
    input_size); ``mean``/``std`` one value per channel (ImageNet's by default)."""
    if crop_pct is None and input_size >= PLAIN_RESIZE_FROM:
        crop = {"crop_pct": 1.0, "crop_mode": "squash"}
    else:
        crop = {"crop_pct": DEFAULT_CROP_PCT if crop_pct is None else crop_pct, "crop_mode": "center"}
    return {"interpolation": "bicubic", **crop, "mean": tuple(mean), "std": tuple(std)}
