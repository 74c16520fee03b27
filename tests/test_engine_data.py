"""engine.data: folders with bad files, colour conversion, embedded photos, reproducible resumable loaders,
copies to the device."""
import argparse
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from engine.config import ConfigError
from engine.data import (EMBEDDED_PHOTO_NAMES, EmbeddedPhotos, ImageFolderSkippingUnreadable, UnreadableDatasetError,
                         build_image_folder, build_loader, pretrain_transform, resolve_image_root, to_device, to_rgb)
import fcmae
import pretrain
from finetune.evaluate import evaluate
from finetune.transforms import build_train_transform
from finetune_helpers import load_finetune_script
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

    def order(epoch, rank=0, world_size=1, skip=0):
        loader = build_loader(dataset, batch_size=1, num_workers=0, seed=3, rank=rank, world_size=world_size)
        loader.sampler.set_epoch(epoch, skip)
        pairs = list(loader.sampler)
        assert {pair_epoch for pair_epoch, _ in pairs} <= {epoch}
        return [index for _, index in pairs]

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(0, 0, 2) + order(0, 1, 2)) == list(range(8))
    reference = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    reference.set_epoch(5)
    assert order(5, 1, 2) == list(reference), "the shuffle differs from DistributedSampler's"
    assert order(5, 1, 2, skip=3) == list(reference)[3:]


class IndexedImages(Dataset):
    """(transform(image), index) over small random colour images: the target names the sample."""

    def __init__(self, transform, length=12, size=48):
        generator = np.random.default_rng(0)
        self.images = [Image.fromarray(generator.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))
                       for _ in range(length)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), index


def epoch_batches(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch, skip)
    return [(images.clone(), indices.clone()) for images, indices in loader]


def by_index(batches):
    return {int(index): image for images, indices in batches for image, index in zip(images, indices)}


TRAIN_TRANSFORMS = {"pretrain": lambda: pretrain_transform(32),
                    "finetune_randaugment_erasing": lambda: build_train_transform(32)}


@pytest.mark.parametrize("transform_name", sorted(TRAIN_TRANSFORMS))
def test_train_batches_are_pixel_equal_with_0_and_2_workers(transform_name):
    dataset = IndexedImages(TRAIN_TRANSFORMS[transform_name]())
    single = epoch_batches(build_loader(dataset, batch_size=4, num_workers=0, seed=7), epoch=3)
    workers = epoch_batches(build_loader(dataset, batch_size=4, num_workers=2, seed=7), epoch=3)
    assert len(single) == len(workers) == 3
    for (images_0, indices_0), (images_2, indices_2) in zip(single, workers):
        assert torch.equal(indices_0, indices_2)
        assert torch.equal(images_0, images_2), f"{transform_name}: augmentations depend on the number of workers"


def test_skip_yields_the_tail_of_the_epoch_with_persistent_workers():
    loader = build_loader(IndexedImages(pretrain_transform(32)), batch_size=2, num_workers=2, seed=1)
    assert loader.persistent_workers
    full = {epoch: epoch_batches(loader, epoch) for epoch in (0, 1)}
    loader.sampler.set_epoch(0)
    next(iter(loader))  # an epoch left unfinished (the loop stops at whole updates) leaves nothing behind
    for epoch, skipped_batches in [(1, 2), (0, 5), (1, 0)]:
        tail = epoch_batches(loader, epoch, skip=skipped_batches * 2)
        assert len(loader) == len(loader.sampler) // 2 == 6, "len() must stay the whole epoch's"
        assert len(tail) == 6 - skipped_batches
        for (images, indices), (expected_images, expected_indices) in zip(tail, full[epoch][skipped_batches:]):
            assert torch.equal(indices, expected_indices) and torch.equal(images, expected_images), (
                f"epoch {epoch} skipping {skipped_batches} batches is not the tail of the full epoch")


def test_augmentations_differ_between_epochs_and_repeat_per_epoch():
    dataset = IndexedImages(pretrain_transform(32))
    loader = build_loader(dataset, batch_size=4, num_workers=0, seed=1)
    epoch_0, epoch_1 = by_index(epoch_batches(loader, 0)), by_index(epoch_batches(loader, 1))
    again = by_index(epoch_batches(build_loader(dataset, batch_size=4, num_workers=0, seed=1), 0))
    assert set(epoch_0) == set(epoch_1) == set(range(12))
    assert all(torch.equal(epoch_0[index], again[index]) for index in epoch_0)
    assert not any(torch.equal(epoch_0[index], epoch_1[index]) for index in epoch_0), "epoch 1 repeats epoch 0"
    other_seed = by_index(epoch_batches(build_loader(dataset, batch_size=4, num_workers=0, seed=2), 0))
    assert not any(torch.equal(epoch_0[index], other_seed[index]) for index in epoch_0)


def test_loading_in_the_main_process_leaves_its_rngs_untouched():
    dataset = IndexedImages(build_train_transform(32))  # torch (crop, flip, erasing) and python random (RandAugment)

    def rng_states():
        return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

    before = rng_states()
    dataset[0]
    assert rng_states()[0] != before[0] and not torch.equal(rng_states()[2], before[2]), "the transform draws nothing"
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = rng_states()
    epoch_batches(build_loader(dataset, batch_size=4, num_workers=0, seed=1), epoch=0)
    after = rng_states()
    assert after[0] == before[0], "python random stream changed by loading"
    assert np.array_equal(after[1], before[1]), "numpy stream changed by loading"
    assert torch.equal(after[2], before[2]), "torch CPU stream changed by loading"


def test_skip_beyond_the_epoch_is_an_error():
    loader = build_loader(IndexedImages(lambda image: 0), batch_size=2, num_workers=0, seed=0)
    with pytest.raises(ValueError, match=r"skip must lie in \[0, 12\]"):
        loader.sampler.set_epoch(0, skip=13)


class HostBatch:
    """Stands in for a host tensor: ``is_pinned()`` as given; records each ``.to`` call."""

    def __init__(self, pinned: bool):
        self.pinned, self.copies = pinned, []

    def is_pinned(self) -> bool:
        return self.pinned

    def to(self, device, non_blocking=False):
        self.copies.append((str(device), non_blocking))
        return self


@pytest.mark.parametrize("pinned, device, non_blocking", [(True, "cuda", True), (False, "cuda", False),
                                                          (True, "cuda:1", True), (True, "cpu", False)])
def test_batches_are_copied_without_blocking_only_from_pinned_memory(pinned, device, non_blocking):
    batch = HostBatch(pinned)
    assert to_device(batch, device) is batch
    assert batch.copies == [(device, non_blocking)]


class NonBlockingCopies(TorchFunctionMode):
    """Counts ``tensor.to(..., non_blocking=True)`` calls on tensors that are not pinned."""

    def __init__(self):
        super().__init__()
        self.unpinned = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and kwargs.get("non_blocking") and not args[0].is_pinned():
            self.unpinned += 1
        return func(*args, **kwargs)


def test_evaluation_and_both_training_losses_never_copy_unpinned_batches_non_blocking():
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 2))
    pretrain_loss = pretrain.make_loss_fn(torch.device("cpu"))
    finetune_loss = load_finetune_script().make_loss_fn(None, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    step = argparse.Namespace(epoch=0, iteration=0, update=0)
    with NonBlockingCopies() as copies:
        evaluate(model, DataLoader(TensorDataset(images, labels), batch_size=2))
        finetune_loss(model, (images, labels), step)
        pretrain_loss(fcmae.build_fcmae("convnextv2_atto", decoder_dim=32), (images, labels), step)
    assert copies.unpinned == 0
