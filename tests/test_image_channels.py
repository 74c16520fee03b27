"""The data side of ``in_chans``: decoding 1, 3 and N channels, N-channel pretraining transforms,
normalisation statistics, and files whose channels do not fit."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from engine.config import ConfigError
from engine.data import ImageFiles, build_loader, build_pretraining_images, pretrain_transform
from engine.image_decode import ChannelMismatchError, decode_channels, load_rgb_image
from engine.image_files import scan_folder
from engine.normalization import channel_statistics, resolve_normalization, spread_positions
from own_data import write_photo


def save_array(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


@pytest.mark.parametrize("name, pixels, expected", [
    ("gray.png", np.full((6, 5), 100, np.uint8), 100 / 255),
    ("deep.png", np.full((6, 5), 30000, np.uint16), 30000 / 65535),
    ("deep.tif", np.full((6, 5), 65535, np.uint16), 1.0),
])
def test_grayscale_8_and_16_bit_files_load_as_one_channel_in_unit_range(tmp_path, name, pixels, expected):
    Image.fromarray(pixels).save(tmp_path / name)
    image = decode_channels(tmp_path / name, in_chans=1)
    assert image.shape == (1, 6, 5) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, expected), atol=1e-7)


def test_colour_image_loads_as_its_luminance_for_one_channel(tmp_path):
    Image.new("RGB", (4, 3), (200, 100, 50)).save(tmp_path / "colour.png")
    luminance = Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0))
    assert torch.all(decode_channels(tmp_path / "colour.png", 1) == luminance / 255)


def test_four_channels_from_npy_rgba_and_a_multipage_tiff(tmp_path):
    deep = np.arange(5 * 4 * 4, dtype=np.uint16).reshape(5, 4, 4) * 700
    assert torch.equal(decode_channels(save_array(tmp_path / "deep.npy", deep), 4),
                       torch.from_numpy(deep.transpose(2, 0, 1) / 65535).float())
    floats = np.random.default_rng(0).normal(size=(3, 2, 4)).astype(np.float32)
    assert torch.equal(decode_channels(save_array(tmp_path / "floats.npy", floats), 4),
                       torch.from_numpy(floats.transpose(2, 0, 1)))
    Image.new("RGBA", (3, 2), (10, 20, 30, 40)).save(tmp_path / "rgba.png")
    assert decode_channels(tmp_path / "rgba.png", 4)[:, 0, 0].mul(255).round().tolist() == [10, 20, 30, 40]
    pages = [Image.fromarray(np.full((3, 2), 50 * page, np.uint8)) for page in range(4)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert decode_channels(tmp_path / "stack.tif", 4)[:, 1, 1].mul(255).round().tolist() == [0, 50, 100, 150]


def test_three_channel_arrays_load_as_rgb_like_images(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_rgb_image(save_array(tmp_path / "rgb.npy", pixels))), pixels)
    gray = np.asarray(load_rgb_image(save_array(tmp_path / "gray.npy", pixels[:, :, 0])))
    assert gray.shape == (5, 6, 3) and np.array_equal(gray[:, :, 2], pixels[:, :, 0])


@pytest.mark.parametrize("in_chans, name, content", [
    (3, "five.npy", np.zeros((4, 4, 5), np.float32)),
    (4, "rgb.png", None),
    (5, "four_pages.tif", None),
    (1, "rgb.npy", np.zeros((4, 4, 3), np.uint8)),
])
def test_files_whose_channels_do_not_fit_raise_channel_mismatch(tmp_path, in_chans, name, content):
    path = tmp_path / name
    if content is not None:
        np.save(path, content)
    elif name == "rgb.png":
        write_photo(path)
    else:
        pages = [Image.new("L", (3, 3), page) for page in range(4)]
        pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(ChannelMismatchError, match=f"not {in_chans}"):
        decode_channels(path, in_chans)


def test_a_file_of_other_channels_is_skipped_and_counted_and_the_batch_stays_full(tmp_path, caplog):
    for index in range(4):
        save_array(tmp_path / f"{index}.npy", np.full((40, 48, 4), index / 4, np.float32))
    save_array(tmp_path / "2_odd.npy", np.zeros((40, 48, 5), np.float32))
    transform = pretrain_transform(32, in_chans=4, mean=[0.5] * 4, std=[0.25] * 4)
    dataset = ImageFiles(scan_folder(tmp_path).index, transform, in_chans=4)
    with caplog.at_level(logging.WARNING):
        batches = list(build_loader(dataset, batch_size=5, num_workers=0, seed=0))
    assert [tuple(images.shape) for images, _ in batches] == [(5, 4, 32, 32)]
    assert dataset.unreadable_count == 1 and dataset.unreadable_paths() == [str(tmp_path / "2_odd.npy")]
    assert "has 5 channels, not 4" in caplog.text


def test_no_file_that_fits_is_one_config_error_naming_data_path(tmp_path):
    for index in range(3):
        save_array(tmp_path / f"{index}.npy", np.zeros((8, 8, 5), np.float32))
    with pytest.raises(ConfigError, match=r"^--data_path .*: none of the 3 files checked .* has 3 channels, e.g. "
                                          r".*has 5 channels, not 3; set --in_chans"):
        build_pretraining_images(tmp_path, 64)


def test_n_channel_transform_crops_flips_and_normalises_every_channel():
    mean, std = (0.1, 0.2, 0.3, 0.4, 0.5), (0.5, 0.4, 0.3, 0.2, 0.1)
    ramp = torch.linspace(0, 1, 96).expand(40, 96)  # left to right
    image = torch.stack([ramp * (channel + 1) / 5 for channel in range(5)])
    transform = pretrain_transform(32, in_chans=5, mean=mean, std=std)
    torch.manual_seed(3)
    output = transform(image)
    torch.manual_seed(3)
    top, left, height, width = transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
    crop = transforms.functional.resized_crop(image, top, left, height, width, [32, 32],
                                              InterpolationMode.BICUBIC, antialias=True)
    if torch.rand(1) < 0.5:
        crop = crop.flip(-1)
    expected = (crop - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert output.shape == (5, 32, 32) and torch.allclose(output, expected, atol=1e-6)


def test_three_channel_transform_is_todays_pil_pipeline_bit_for_bit():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    todays = transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]),
    ])
    for seed in range(4):
        torch.manual_seed(seed)
        expected = todays(image)
        torch.manual_seed(seed)
        assert torch.equal(pretrain_transform(32)(image), expected)


def test_channel_statistics_are_over_every_pixel_of_evenly_spread_images(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.random((6 + index, 5, 2)).astype(np.float32) for index in range(5)]
    paths = [save_array(tmp_path / f"{index}.npy", array) for index, array in enumerate(arrays)]
    sampled = np.concatenate([arrays[position].reshape(-1, 2) for position in (0, 2, 4)]).astype(np.float64)
    mean, std = channel_statistics(paths, in_chans=2, max_images=3)
    assert spread_positions(3, 5) == [0, 2, 4]
    assert np.allclose(mean, sampled.mean(axis=0), atol=1e-9) and np.allclose(std, sampled.std(axis=0), atol=1e-9)
    assert resolve_normalization(2, paths=paths) == channel_statistics(paths, 2)


def test_given_or_default_normalisation_is_checked():
    assert resolve_normalization(3) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert resolve_normalization(1, [0.5], [0.2]) == ((0.5,), (0.2,))
    with pytest.raises(ValueError, match="need 4 values each"):
        resolve_normalization(4, [0.5] * 3, [0.2] * 3)
    with pytest.raises(ValueError, match="need mean and std, or the images"):
        resolve_normalization(4)


def test_normalisation_of_a_one_channel_folder_is_measured_and_returned(tmp_path):
    for index, value in enumerate((0, 65535, 0, 65535)):
        Image.fromarray(np.full((40, 40), value, np.uint16)).save(tmp_path / f"{index}.png")
    dataset, (mean, std) = build_pretraining_images(tmp_path, 32, in_chans=1)
    assert np.allclose(mean, [0.5]) and np.allclose(std, [0.5])
    image, _ = dataset[1]
    assert image.shape == (1, 32, 32) and torch.allclose(image, torch.ones(1, 32, 32), atol=1e-5)
