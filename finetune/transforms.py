"""Fine-tuning's training transform: timm's pipeline (RandomResizedCrop, flip, RandAugment,
random erasing), with reduced-scale JPEG decoding and a RandAugment fix. The evaluation
transform is ``engine.eval_transform``'s."""
from __future__ import annotations

import random

import models  # noqa: F401  (torchvision guard before timm/torchvision)
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import RandAugment, posterize
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from engine.data import draft_resized_crop


class DraftRandomResizedCropAndInterpolation(RandomResizedCropAndInterpolation):
    """timm's ``RandomResizedCropAndInterpolation`` (same random draws) that decodes JPEG files at a
    reduced scale when the crop allows (``engine.data.draft_resized_crop``); image folders hand it
    files opened, not decoded. PIL image -> RGB PIL image of ``size``."""

    decodes_files = True

    def __call__(self, image):
        top, left, height, width = self.get_params(image, self.scale, self.ratio)
        interpolation = random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list)) \
            else self.interpolation
        return draft_resized_crop(image, top, left, height, width, self.size, interpolation)


def posterize_keeping_zero_bits(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's ``posterize``, where 0 bits gives a black image as Pillow used to.

    RandAugment's magnitude (gauss(9, 0.5), clipped to 10) is 10 for ~2% of draws, where
    PosterizeIncreasing keeps 0 bits; current Pillow (13) raises ValueError for that, which would
    stop ImageNet fine-tuning within its first few thousand images (~0.15% of images).
    """
    if bits_to_keep < 1:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(transform: transforms.Compose) -> None:
    for stage in transform.transforms:
        if isinstance(stage, RandAugment):
            for op in stage.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = posterize_keeping_zero_bits


def build_train_transform(
    input_size: int,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | None = 0.4,
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    interpolation: str = "bicubic",
    fast_decode: bool = False,
):
    """timm's training transform: RandomResizedCrop, flip, RandAugment (timm ignores colour
    jitter when ``auto_augment`` is set), ImageNet normalisation, random erasing.
    Image (PIL) -> (3, input_size, input_size) float tensor. ``fast_decode``: the crop decodes
    JPEG files at a reduced scale when it allows (``DraftRandomResizedCropAndInterpolation``)."""
    transform = create_transform(
        input_size=input_size,
        is_training=True,
        auto_augment=auto_augment or None,
        color_jitter=color_jitter or 0.0,
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        interpolation=interpolation,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    _allow_zero_bit_posterize(transform)
    if fast_decode:
        crop = transform.transforms[0]
        transform.transforms[0] = DraftRandomResizedCropAndInterpolation(crop.size, crop.scale, crop.ratio)
        transform.transforms[0].interpolation = crop.interpolation
    return transform
