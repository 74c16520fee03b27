"""engine.data: folders with bad files, colour conversion, embedded photos, distributed loader."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError
from engine.data import (EMBEDDED_PHOTO_NAMES, EmbeddedPhotos, ImageFolderSkippingUnreadable, UnreadableDatasetError,
                         build_image_folder, build_loader, pretrain_transform, resolve_image_root, to_rgb)
from image_folders import make_image_folder


def test_unreadable_files_are_skipped_counted_and_batches_stay_full(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    (root / "class_0" / "empty.jpg").write_bytes(b"")
    good = (root / "class_1" / "0.jpg").read_bytes()
    (root / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "class_1" / "text.png").write_text("this is not a png")
    dataset = ImageFolderSkippingUnreadable(root, transform=pretrain_transform(64))
    assert len(dataset) == 9

    with caplog.at_level(logging.WARNING):
        images = [dataset[index][0] for index in range(len(dataset))]

    assert dataset.unreadable_count == 3
    skipped = sorted(path.rsplit("/", 1)[-1] for path in dataset.unreadable_paths())
    assert skipped == ["empty.jpg", "text.png", "truncated.jpg"]
    assert all(image.shape == (3, 64, 64) and torch.isfinite(image).all() for image in images)
    assert "3 unreadable so far" in caplog.text and "truncated.jpg" in caplog.text
    loader = build_loader(dataset, batch_size=4, num_workers=0, seed=0)
    assert [batch[0].shape[0] for batch in loader] == [4, 4]


def test_folder_where_every_file_is_unreadable_raises_a_clear_error(tmp_path):
    for index in range(3):
        (tmp_path / "class_a").mkdir(exist_ok=True)
        (tmp_path / "class_a" / f"{index}.jpg").write_bytes(b"\xff\xd8garbage")
    dataset = ImageFolderSkippingUnreadable(tmp_path)
    with pytest.raises(UnreadableDatasetError, match="all 3 image files under .* are unreadable"):
        dataset[0]


def test_folder_without_images_is_a_data_path_error(tmp_path):
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"--data_path .*no images found in .*train"):
        build_image_folder(tmp_path, "train", pretrain_transform(64))


def test_train_subfolder_is_used_when_present(tmp_path):
    assert resolve_image_root(tmp_path) == tmp_path
    (tmp_path / "train").mkdir()
    assert resolve_image_root(tmp_path) == tmp_path / "train"


@pytest.mark.parametrize("mode, pixels, expected_rgb", [
    ("L", np.full((4, 4), 100, np.uint8), (100, 100, 100)),
    ("I;16", np.full((4, 4), 65535, np.uint16), (255, 255, 255)),
    ("I;16", np.full((4, 4), 257 * 40, np.uint16), (40, 40, 40)),
    ("RGBA", np.tile(np.array([10, 20, 30, 255], np.uint8), (4, 4, 1)), (10, 20, 30)),
    ("RGBA", np.tile(np.array([10, 20, 30, 0], np.uint8), (4, 4, 1)), (255, 255, 255)),  # transparent: white
])
def test_grayscale_16bit_and_rgba_images_become_8bit_rgb(mode, pixels, expected_rgb):
    image = Image.fromarray(pixels, mode=mode) if mode != "I;16" else Image.fromarray(pixels).convert("I;16")
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert converted.getpixel((1, 1)) == expected_rgb


def test_16bit_png_file_loads_through_the_folder(tmp_path):
    (tmp_path / "c").mkdir()
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(tmp_path / "c" / "deep.png")
    image, label = ImageFolderSkippingUnreadable(tmp_path)[0]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (117, 117, 117) and label == 0


def test_embedded_photos_are_labelled_deterministic_and_split():
    train = EmbeddedPhotos("train", input_size=64, length=16)
    assert len(train) == 16 and train.classes == list(EMBEDDED_PHOTO_NAMES) and len(train.classes) == 8
    image, label = train[9]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 1
    assert torch.equal(EmbeddedPhotos("train", 64, 16)[9][0], image)  # same item, same crop
    assert not torch.equal(EmbeddedPhotos("val", 64, 16)[9][0], image)  # val draws other crops
    assert not torch.equal(train[1][0], image)  # same photo, other crop
    assert [train[i][1] for i in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]


def test_loader_shuffles_per_epoch_reproducibly_and_splits_ranks():
    dataset = EmbeddedPhotos("train", 32, 8, transform=lambda crop: 0)

    def order(epoch, rank=0, world_size=1):
        loader = build_loader(dataset, batch_size=1, num_workers=0, seed=3, rank=rank, world_size=world_size)
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(0, 0, 2) + order(0, 1, 2)) == list(range(8))
