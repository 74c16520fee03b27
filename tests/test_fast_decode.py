"""engine.data's fast decode path: JPEG draft decoding keeps pretraining's crops and their statistics."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

from engine.data import (DraftRandomResizedCrop, ImageFolderSkippingUnreadable, build_loader, decodes_files,
                         draft_scale, embedded_photos, pretrain_transform)
from engine.image_decode import load_rgb_image, open_image
from finetune.transforms import build_train_transform
from image_folders import make_image_folder

OUTPUT = 64
CROP = dict(size=OUTPUT, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)


@pytest.fixture(scope="module")
def photo_jpeg(tmp_path_factory):
    """A 640 x 480 photograph with camera-like noise, saved at JPEG quality 90."""
    noise = np.random.default_rng(0).normal(0.0, 3.0, (480, 640, 3))
    pixels = np.asarray(embedded_photos()[1].resize((640, 480)), dtype=np.float64) + noise
    path = tmp_path_factory.mktemp("jpeg") / "cat.jpg"
    Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(path, quality=90)
    return path


CROPS = {  # name: (full-decoding crop, fast crop), as pretraining and fine-tuning build them
    "pretrain": (transforms.RandomResizedCrop(**CROP), DraftRandomResizedCrop(**CROP)),
    "finetune": (build_train_transform(OUTPUT).transforms[0],
                 build_train_transform(OUTPUT, fast_decode=True).transforms[0]),
}


def seed_all(seed):
    torch.manual_seed(seed)  # torchvision's draws
    random.seed(seed)  # timm's


def crops(path, seeds, fast, name="pretrain"):
    """The crop stage's uint8 outputs, one per seed (the RNGs seeded as the loader does per sample)."""
    crop = CROPS[name][fast]
    outputs = []
    for seed in seeds:
        seed_all(seed)
        outputs.append(np.asarray(crop(open_image(path) if fast else load_rgb_image(path)), dtype=np.float64))
    return outputs


def psnr(a, b):
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_draft_scale_is_the_largest_reduction_that_keeps_the_output_size():
    assert draft_scale(1000, 600, (224, 224)) == 2
    assert draft_scale(900, 1000, (224, 224)) == 4
    assert draft_scale(1800, 1792, (224, 224)) == 8
    assert draft_scale(447, 1000, (224, 224)) == 1
    assert draft_scale(480, 640, (64, 64)) == 4
    assert draft_scale(128, 199, (64, 100)) == 1  # width 199 < 2 * 100


@pytest.mark.parametrize("name", sorted(CROPS))
def test_fast_decode_takes_the_same_crops_as_full_decoding(photo_jpeg, name):
    seeds = range(24)
    scales = []
    for seed in seeds:
        seed_all(seed)
        top, left, height, width = CROPS[name][0].get_params(open_image(photo_jpeg), CROPS[name][0].scale,
                                                             CROPS[name][0].ratio)
        scales.append(draft_scale(height, width, (OUTPUT, OUTPUT)))
    assert sum(scale > 1 for scale in scales) >= len(scales) // 2, "the reduced path is hardly exercised"
    slow_crops, fast_crops = crops(photo_jpeg, seeds, False, name), crops(photo_jpeg, seeds, True, name)
    for seed, scale, slow, fast in zip(seeds, scales, slow_crops, fast_crops):
        if scale == 1:
            assert np.array_equal(slow, fast), f"{name} seed {seed}: no reduction possible, yet the crop differs"
        else:
            assert psnr(slow, fast) > 38, (f"{name} seed {seed}: 1/{scale} decode gives another crop "
                                           f"(PSNR {psnr(slow, fast):.1f} dB)")


def test_fast_decode_keeps_the_distribution_of_crop_statistics(photo_jpeg):
    slow, fast = crops(photo_jpeg, range(0, 120), False), crops(photo_jpeg, range(1000, 1120), True)
    for name, statistic in [("mean", np.mean), ("std", np.std)]:
        slow_values, fast_values = [statistic(crop) for crop in slow], [statistic(crop) for crop in fast]
        assert ks_2samp(slow_values, fast_values).pvalue > 0.05, f"per-crop {name} distributions differ"
        assert abs(np.mean(slow_values) - np.mean(fast_values)) < 0.05 * np.mean(slow_values)


def test_fast_decode_decodes_fewer_pixels(photo_jpeg):
    sizes = []
    for seed in range(8):
        opened = open_image(photo_jpeg)
        torch.manual_seed(seed)
        DraftRandomResizedCrop(**CROP)(opened)
        sizes.append(opened.size)  # draft shrinks the image it decodes
    assert min(sizes) <= (320, 240) and all(size[0] * 3 == size[1] * 4 for size in sizes), sizes


def test_decoded_images_go_through_the_plain_crop():
    image = embedded_photos()[0]
    torch.manual_seed(3)
    slow = pretrain_transform(OUTPUT)(image)
    torch.manual_seed(3)
    assert torch.equal(pretrain_transform(OUTPUT, fast_decode=True)(image), slow)


def test_truncated_jpeg_is_skipped_with_fast_decode(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=1, per_class=3, size=160)
    good = (root / "class_0" / "0.jpg").read_bytes()
    (root / "class_0" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    dataset = ImageFolderSkippingUnreadable(root, transform=pretrain_transform(OUTPUT, fast_decode=True))
    batches = list(build_loader(dataset, batch_size=2, num_workers=0, seed=0))
    assert [images.shape for images, _ in batches] == [(2, 3, OUTPUT, OUTPUT)] * 2
    assert [path.rsplit("/", 1)[-1] for path in dataset.unreadable_paths()] == ["truncated.jpg"]


def test_image_folders_hand_undecoded_files_only_to_transforms_that_decode_them():
    assert decodes_files(pretrain_transform(OUTPUT, fast_decode=True))
    assert decodes_files(build_train_transform(OUTPUT, fast_decode=True))
    assert not decodes_files(pretrain_transform(OUTPUT)) and not decodes_files(build_train_transform(OUTPUT))
