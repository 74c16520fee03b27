"""Images for training: datasets that tolerate bad files, embedded photos, distributed loaders.

* ``pretrain_transform(input_size, fast_decode=False, in_chans=3, mean=None, std=None)``:
  RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip, normalisation (ImageNet mean/std for
  3 channels: the FCMAE recipe); ``normalize_transform(mean, std)``: ToTensor + Normalize.
  ``fast_decode``: the crop is ``DraftRandomResizedCrop``, which decodes JPEGs at 1/2-1/8 scale
  when the crop box allows (``draft_resized_crop``); such transforms get files opened, not
  decoded (``decodes_files``).
* ``ImageFiles(index, transform, substitute_unreadable=True, in_chans=3)``: the images of an
  ``engine.image_index.ImageIndex`` (paths in numpy arrays: DataLoader workers share them at any
  size). Unreadable files (corrupt, truncated, not images, channels that do not convert) are
  skipped with a warning naming each and counting them; the next readable file takes its place,
  so batches stay full (for evaluation, ``substitute_unreadable=False``: a blank image labelled
  ``UNREADABLE_TARGET``, left out of the metrics). If every file is unreadable it raises
  ``UnreadableDatasetError``.
* ``ImageFolderSkippingUnreadable(root, transform)``: ``ImageFiles`` of the class folders
  ``<root>/<class>/<image>`` (torchvision ImageFolder's labels and order); a class folder without
  images keeps its label and is named in a warning. ``build_image_folder(data_path, split, ...)``
  (``<data_path>/<split>`` if it exists, ``resolve_image_root``) adds a clear error naming
  --data_path and the layout that gives labels.
* ``build_pretraining_images(data_path, input_size, ...)``: pretraining's unlabelled images of
  ``--data_path`` (``pretraining_source``: a file list, ``<data_path>/train``, or the folder in any
  layout; or WebDataset shards, ``engine.shards``), scanned or indexed once per run
  (``engine.index_cache``, ``engine.shards.ShardIndexCache``), with their normalisation.
  ``build_labelled_shards(data_path, transform, ...)``: fine-tuning's samples of shards (``.cls`` labels).
* ``EmbeddedPhotos(split, input_size, length, transform=None)``: real photographs bundled with
  scikit-image (public domain / CC0), no download needed; see its docstring.
* ``shutdown_workers(loader)``: stop a loader's persistent workers (end of a training run).
* ``build_loader(dataset, batch_size, num_workers, seed, rank, world_size, device, train, pin_memory)``:
  DataLoader over this rank's share. Training: a ``ResumableDistributedSampler`` (a seeded
  shuffle per epoch, also for one process; ``sampler.set_epoch(epoch, skip)`` starts mid-epoch)
  feeding ``SampleSeededDataset``, so every sample's augmentation depends only on
  ``(seed, epoch, index)``; persistent workers. Evaluation: a plain ``DistributedSampler``.
  Streamed shards: ``ShardStreamSampler`` / ``ShardStreamEvalSampler``, the same interfaces in
  ``engine.shards.stream_order`` (``reads_streamed_shards(dataset)``).
* ``to_device(tensor, device)``: a batch's copy to the device, asynchronous only from pinned memory.

Decoding (``to_rgb``, ``load_rgb_image``, ``open_image``, ``UNREADABLE_IMAGE_ERRORS``) lives in
``engine.image_decode`` and is importable from here too.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import models  # noqa: F401  (torchvision guard before torchvision)
import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .config import ConfigError
from .image_decode import (UNREADABLE_IMAGE_ERRORS, UnreadableDatasetError, UnreadableImageError,  # noqa: F401
                           image_loader, to_rgb)
from .image_files import IMAGE_EXTENSIONS, describe_skipped, scan_class_folders
from .image_index import NO_LABEL, ImageIndex
from .index_cache import IndexCache
from .normalization import NoFittingImageError, Statistics, first_fitting_image, resolve_normalization
from .seeding import derive_seed
from .shards import ShardIndex, ShardIndexCache, is_shard_source, plural, stream_order

_logger = logging.getLogger(__name__)

UNREADABLE_TARGET = -1  # evaluation's label for a file that could not be read (left out of the metrics)


def normalize_transform(mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                        std: Sequence[float] = IMAGENET_DEFAULT_STD) -> transforms.Compose:
    """PIL image -> float tensor (C, H, W) in [0, 1] -> normalised per channel."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def pretrain_transform(input_size: int, fast_decode: bool = False, in_chans: int = 3,
                       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
                       ) -> transforms.Compose:
    """FCMAE pretraining augmentation -> (in_chans, input_size, input_size) normalised tensor.

    RandomResizedCrop (scale 0.2-1, bicubic), horizontal flip, then normalisation by ``mean`` /
    ``std`` (default: ImageNet's; required for ``in_chans`` other than 3, see
    ``engine.normalization``). Input: an RGB PIL image for 3 channels, else the (in_chans, H, W)
    float tensor of ``engine.image_decode.decode_channels`` (the crop and flip then run on the
    tensor; bicubic with antialiasing, as PIL resizes). ``fast_decode`` (3 channels only): crop
    with ``DraftRandomResizedCrop``, which decodes JPEG files at a reduced scale when the crop
    allows (the same crops, a fraction of the decoding work); datasets then hand it the files
    opened but not decoded.
    """
    if mean is None and std is None and in_chans == 3:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if mean is None or std is None or len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"{in_chans}-channel images need mean and std with {in_chans} values each "
                         "(engine.normalization.resolve_normalization)")
    if fast_decode and in_chans != 3:
        raise ValueError("fast_decode decodes 3-channel JPEGs only; leave it off for other channel counts")
    crop = DraftRandomResizedCrop if fast_decode else transforms.RandomResizedCrop
    augment = [crop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
               transforms.RandomHorizontalFlip()]
    if in_chans == 3:
        return transforms.Compose([*augment, normalize_transform(mean, std)])
    return transforms.Compose([*augment, transforms.Normalize(mean, std)])


JPEG_DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes directly (scaled inverse DCT)


def draft_scale(crop_height: int, crop_width: int, output_size: tuple[int, int]) -> int:
    """Largest JPEG draft reduction (8, 4, 2, else 1) leaving the crop box at least ``output_size`` (h, w)."""
    for scale in JPEG_DRAFT_SCALES:
        if crop_height >= scale * output_size[0] and crop_width >= scale * output_size[1]:
            return scale
    return 1


def draft_resized_crop(image: Image.Image, top: int, left: int, height: int, width: int, size: tuple[int, int],
                       interpolation: InterpolationMode) -> Image.Image:
    """``torchvision.transforms.functional.resized_crop`` of a PIL image, as RGB, decoding less.

    If ``image`` is a JPEG opened but not yet decoded (``open_image``) and the crop box still
    covers ``size`` (h, w) at 1/2, 1/4 or 1/8 scale (``draft_scale``), the file is decoded at that
    scale (PIL draft mode: libjpeg's scaled inverse DCT) and the box, scaled alike, is resized to
    ``size``. Otherwise (decoded image, other format, small crop) it is exactly ``resized_crop``.
    A failed decode raises ``UnreadableImageError``.
    """
    scale, full_width = draft_scale(height, width, size), image.width
    # draft is a no-op (returns None) once decoded and for other formats; else its box is the
    # full image in reduced coordinates, (0, 0, width / reduction, height / reduction)
    drafted = image.draft("RGB", (image.width // scale, image.height // scale)) if scale > 1 else None
    try:
        image = to_rgb(image)  # decodes
    except UNREADABLE_IMAGE_ERRORS as error:
        raise UnreadableImageError(f"cannot decode {getattr(image, 'filename', 'image')}: {error}") from error
    if drafted is None:
        return transforms.functional.resized_crop(image, top, left, height, width, list(size), interpolation)
    reduction = full_width / drafted[1][2]
    box = (left / reduction, top / reduction, (left + width) / reduction, (top + height) / reduction)
    return image.resize(size[::-1], transforms.functional.pil_modes_mapping[interpolation], box=box)


class DraftRandomResizedCrop(transforms.RandomResizedCrop):
    """``RandomResizedCrop`` that decodes JPEG files at a reduced scale when the crop allows.

    The box is drawn exactly as ``RandomResizedCrop`` draws it, from the full-size geometry (read
    from the file header), so the crops are the same for the same RNG state; then
    ``draft_resized_crop`` decodes only as much as the output size needs. Input: a PIL image,
    opened but not decoded for the fast path (image folders hand it such, ``decodes_files``).
    Output: RGB PIL image of ``size``.
    """

    decodes_files = True

    def forward(self, image: Image.Image) -> Image.Image:
        top, left, height, width = self.get_params(image, self.scale, self.ratio)
        return draft_resized_crop(image, top, left, height, width, tuple(self.size), self.interpolation)


def decodes_files(transform: Optional[Callable]) -> bool:
    """Whether ``transform`` (or its first stage) decodes files itself (``decodes_files = True``, e.g.
    ``DraftRandomResizedCrop``) and so wants them opened, not decoded."""
    first = transform.transforms[0] if isinstance(transform, transforms.Compose) and transform.transforms \
        else transform
    return bool(getattr(first, "decodes_files", False))


def resolve_image_root(data_path: str | os.PathLike, split: str = "train") -> Path:
    """``<data_path>/<split>`` if that folder exists, else ``data_path`` itself (class folders)."""
    split_root = Path(data_path) / split
    return split_root if split_root.is_dir() else Path(data_path)


class _Samples(Sequence[tuple[str, int]]):
    """(path, label) of each image of an index, made on access (torchvision ImageFolder's ``samples``)."""

    def __init__(self, index: ImageIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> tuple[str, int]:
        return self.index.path(position), self.index.label(position)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[position] for position in range(len(self)))


class ImageFiles(Dataset):
    """The images of an ``ImageIndex`` -> (image, label), skipping unreadable files. (An
    ``engine.shards.ShardIndex`` has the same interface: the samples of WebDataset shards.)

    ``image`` is ``transform`` of what ``engine.image_decode.image_loader(in_chans)`` makes of the
    file: an RGB PIL image for 3 channels (opened, not decoded, for a transform that decodes files
    itself, ``decodes_files``), else an (in_chans, H, W) float tensor. ``label`` is the index's
    (``NO_LABEL`` for an index without labels).

    An unreadable file (corrupt, truncated, not an image, channels that do not convert to
    ``in_chans``) is logged once, naming it and the running count, and replaced by the next
    readable file of the index, so training batches stay full. For evaluation
    (``substitute_unreadable=False``) it yields a blank image with label ``UNREADABLE_TARGET``
    instead, which the evaluation leaves out, so no image is counted twice. The bookkeeping lives
    in shared memory, so DataLoader workers' findings add up in ``unreadable_count``. The state is
    the index's few numpy arrays plus that flag array: forked workers share it, whatever the
    dataset's size (``engine.image_index``).
    """

    def __init__(self, index: ImageIndex | ShardIndex, transform: Optional[Callable] = None,
                 substitute_unreadable: bool = True, in_chans: int = 3):
        self.index, self.transform, self.in_chans = index, transform, in_chans
        self.substitute_unreadable = substitute_unreadable
        self._unreadable = torch.zeros(len(index), dtype=torch.bool).share_memory_()

    @property
    def root(self) -> str:
        return self.index.root

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: label for label, name in enumerate(self.index.classes)}

    @property
    def targets(self) -> np.ndarray:
        """(N,) int64 labels (all ``NO_LABEL`` without labels)."""
        return self.index.labels if self.index.labels is not None else np.full(len(self.index), NO_LABEL)

    @property
    def samples(self) -> Sequence[tuple[str, int]]:
        """(path, label) of each image, made on access (ImageFolder's attribute, without its memory)."""
        return _Samples(self.index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def unreadable_count(self) -> int:
        return int(self._unreadable.sum())

    def unreadable_paths(self) -> list[str]:
        return [self.index.path(position) for position in torch.nonzero(self._unreadable).flatten().tolist()]

    def _load(self, position: int) -> Optional[tuple[Any, int]]:
        """(transformed image, label) of image ``position``; None, recorded and logged, if unreadable."""
        if self._unreadable[position]:
            return None
        path, loader = self.index.path(position), image_loader(self.in_chans, decodes_files(self.transform))
        try:
            image = loader(self.index[position])  # the path, or a shard member's bytes (engine.shards)
        except UNREADABLE_IMAGE_ERRORS as error:
            return self._record_unreadable(position, path, error)
        try:
            return (self.transform(image) if self.transform is not None else image), self.index.label(position)
        except UnreadableImageError as error:  # from a transform that decodes the file itself
            return self._record_unreadable(position, path, error.__cause__ or error)

    def _record_unreadable(self, position: int, path: str, error: BaseException) -> None:
        self._unreadable[position] = True
        _logger.warning("skipping unreadable image %s (%s: %s); %d unreadable so far",
                        path, type(error).__name__, error, self.unreadable_count)

    def __getitem__(self, position: int):
        if not self.substitute_unreadable:
            loaded = self._load(position)
            if loaded is None:
                blank = Image.new("RGB", (1, 1)) if self.in_chans == 3 else torch.zeros(self.in_chans, 1, 1)
                return (self.transform(blank) if self.transform is not None else blank), UNREADABLE_TARGET
            return loaded
        for offset in range(len(self)):
            loaded = self._load((position + offset) % len(self))
            if loaded is not None:
                return loaded
        raise UnreadableDatasetError(f"all {len(self)} image files under {self.root} are unreadable; "
                                     "check the files (e.g. open one with PIL) or point --data_path elsewhere")


class ImageFolderSkippingUnreadable(ImageFiles):
    """Class folders ``<root>/<class>/<image>`` (searched recursively) -> (image, class index),
    skipping unreadable files as ``ImageFiles`` does; torchvision ImageFolder's layout, labels and order.

    A class folder without images keeps its label (its index among the sorted class folders) and
    is named in a warning. FileNotFoundError if ``root`` has no class folder or no image.
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None,
                 substitute_unreadable: bool = True):
        scan = scan_class_folders(root)
        if scan.skipped_count:
            _logger.info("%s under %s", describe_skipped(scan), root)
        if not len(scan.index):
            raise FileNotFoundError(f"no image files in the class folders of {scan.index.root}")
        super().__init__(scan.index, transform, substitute_unreadable)
        counts = np.bincount(scan.index.labels, minlength=len(scan.index.classes))
        empty = [name for name, count in zip(scan.index.classes, counts) if count == 0]
        if empty:
            _logger.warning("%d class folders under %s hold no images: %s", len(empty), self.root, ", ".join(empty))


def build_image_folder(data_path: str | os.PathLike, split: str, transform: Callable,
                       substitute_unreadable: bool = True) -> ImageFolderSkippingUnreadable:
    """The ``split`` class-folder images under ``data_path`` (``resolve_image_root``); ConfigError
    naming --data_path and the layout that gives labels if there are none."""
    root = resolve_image_root(data_path, split)
    try:
        return ImageFolderSkippingUnreadable(root, transform, substitute_unreadable)
    except FileNotFoundError as error:
        raise ConfigError(
            f"--data_path {data_path}: no images found in {root} ({error}); labels come from class folders: "
            f"expected <root>/{split}/<class>/<image> or <root>/<class>/<image> with extensions "
            f"{' '.join(IMAGE_EXTENSIONS)}"
        ) from error


def build_labelled_shards(data_path: str | os.PathLike, transform: Callable, substitute_unreadable: bool = True,
                          shard_cache: Optional[ShardIndexCache] = None, flag: str = "--data_path") -> ImageFiles:
    """The labelled samples of the WebDataset shards ``data_path`` names (label: a sample's ``.cls``;
    class names: ``engine.shards.read_classes``); ConfigError naming ``flag`` if there is no
    sample, or a sample without a label."""
    index = (shard_cache or ShardIndexCache()).load_or_build(os.fspath(data_path), flag)
    unlabelled = int((index.labels < 0).sum())
    if not len(index) or unlabelled:
        found = f"{unlabelled} of {len(index)} samples have no .cls label" if len(index) else "no image samples"
        raise ConfigError(f"{flag} {data_path}: {found}; labels come from a .cls member per sample (python -m "
                          "engine.shard_writer writes them from class folders)")
    return ImageFiles(index, transform, substitute_unreadable)


def pretraining_source(data_path: str | os.PathLike) -> Path:
    """What pretraining reads for ``--data_path``: the file itself (a list of images), else
    ``<data_path>/train`` if that folder exists, else the folder (searched recursively)."""
    path = Path(data_path)
    return path if path.is_file() else resolve_image_root(path, "train")


def build_pretraining_images(data_path: str | os.PathLike, input_size: int, fast_decode: bool = False,
                             in_chans: int = 3, mean: Optional[Sequence[float]] = None,
                             std: Optional[Sequence[float]] = None, index_cache: Optional[IndexCache] = None,
                             shard_cache: Optional[ShardIndexCache] = None) -> tuple[ImageFiles, Statistics]:
    """Pretraining's images of ``--data_path`` (``pretraining_source``, or WebDataset shards:
    ``engine.shards.is_shard_source``; labels ignored) with ``pretrain_transform``, and the
    (mean, std) it normalises with (``resolve_normalization``: given, ImageNet's for 3 channels,
    else measured; store them with the run).

    The folder is scanned, the list read or the shards indexed once per run: on rank 0, or reused
    from ``index_cache`` (``engine.index_cache``) or ``shard_cache``. ConfigError naming
    --data_path if there is no image, or if none of the files checked has (or converts to)
    ``in_chans`` channels.
    """
    if is_shard_source(data_path):
        index = (shard_cache or ShardIndexCache()).load_or_build(os.fspath(data_path))
        where = f"in {plural(len(index.urls), 'shard')} of {data_path}"
    else:
        source = pretraining_source(data_path)
        where = f"listed in {source}" if source.is_file() else f"under {source}"
        try:
            scan = (index_cache or IndexCache()).load_or_scan(source)
        except OSError as error:
            raise ConfigError(f"--data_path {data_path}: cannot read {source} ({error})") from error
        if scan.skipped_count:
            _logger.info("data: %s %s", describe_skipped(scan), where)
        index = scan.index
    if not len(index):
        raise ConfigError(f"--data_path {data_path}: no images {where}; expected image files "
                          f"({' '.join(IMAGE_EXTENSIONS)}) in any folder layout, a text file naming one per line, "
                          "or WebDataset shards")
    try:
        with contextlib.suppress(UnreadableDatasetError):  # training names each unreadable file, stops if all are
            first_fitting_image(index, in_chans)
        normalization = resolve_normalization(in_chans, mean, std, index)
    except NoFittingImageError as error:
        raise ConfigError(f"--data_path {data_path}: {error}; set --in_chans to the channels of the files") from error
    _logger.info("data: %d images %s (%d channels)", len(index), where, in_chans)
    transform = pretrain_transform(input_size, fast_decode, in_chans, *normalization)
    return ImageFiles(index, transform, in_chans=in_chans), normalization


# name -> loader of a natural colour photograph shipped inside scikit-image (no download)
_EMBEDDED_LOADERS: dict[str, Callable[[Any], np.ndarray]] = {  # argument: skimage.data
    "astronaut": lambda data: data.astronaut(),
    "chelsea": lambda data: data.chelsea(),
    "coffee": lambda data: data.coffee(),
    "rocket": lambda data: data.rocket(),
    "motorcycle": lambda data: data.stereo_motorcycle()[0],
    "hubble_deep_field": lambda data: data.hubble_deep_field(),
    "retina": lambda data: data.retina(),
    "immunohistochemistry": lambda data: data.immunohistochemistry(),
}
EMBEDDED_PHOTO_NAMES = tuple(_EMBEDDED_LOADERS)
_SPLIT_SEEDS = {"train": 0, "val": 1}


@functools.lru_cache(maxsize=1)
def embedded_photos() -> tuple[Image.Image, ...]:
    """scikit-image's bundled colour photographs as RGB PIL images, in ``EMBEDDED_PHOTO_NAMES`` order."""
    import skimage.data

    return tuple(to_rgb(Image.fromarray(_EMBEDDED_LOADERS[name](skimage.data))) for name in EMBEDDED_PHOTO_NAMES)


class EmbeddedPhotos(Dataset):
    """Random crops of scikit-image's bundled photographs: a labelled dataset needing only pip.

    Item ``i`` is ``(image, label)``: ``label = i % 8`` says which photo (``classes[label]``; astronaut,
    chelsea the cat, coffee, rocket, motorcycle, Hubble deep field, retina, immunohistochemistry),
    and the image is a crop of that photo covering 20-100% of its area with aspect ratio 3/4-4/3,
    flipped horizontally half the time, resized (bicubic) to ``input_size`` square. The crop is
    seeded by ``(split, i)``: item ``i`` is the same on every epoch, process and machine, and the
    ``"val"`` split draws different crops from the ``"train"`` split.

    ``transform`` maps the PIL crop to the returned image (default: ToTensor + ImageNet
    normalisation -> (3, input_size, input_size) float tensor).
    """

    scale = (0.2, 1.0)
    ratio = (3 / 4, 4 / 3)

    def __init__(self, split: str, input_size: int, length: int, transform: Optional[Callable] = None):
        if split not in _SPLIT_SEEDS:
            raise ValueError(f"split must be one of {', '.join(_SPLIT_SEEDS)}, got {split!r}")
        self.split, self.input_size, self.length = split, input_size, length
        self.transform = transform if transform is not None else normalize_transform()
        self.classes = list(EMBEDDED_PHOTO_NAMES)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.targets = [index % len(self.classes) for index in range(length)]
        self.photos = embedded_photos()

    def __len__(self) -> int:
        return self.length

    def crop(self, index: int) -> Image.Image:
        """The seeded crop of item ``index`` as an RGB PIL image of ``input_size`` x ``input_size``."""
        photo = self.photos[self.targets[index]]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(_SPLIT_SEEDS[self.split], index))  # CPU only
            top, left, height, width = transforms.RandomResizedCrop.get_params(photo, list(self.scale),
                                                                               list(self.ratio))
            flip = bool(torch.rand(()) < 0.5)
        crop = photo.resize((self.input_size, self.input_size), Image.Resampling.BICUBIC,
                            box=(left, top, left + width, top + height))
        return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.transform(self.crop(index)), self.targets[index]


@contextlib.contextmanager
def seeded_cpu_rngs(seed: int, restore: bool = True) -> Iterator[None]:
    """Seed python ``random``, numpy and torch's CPU generator for the block; ``restore``: put the
    caller's states back after it.

    The transforms draw from these global generators (torchvision: torch; timm's RandAugment:
    python ``random`` and numpy; RandomErasing: torch). Seeding costs ~30 us; restoring ~0.5 ms
    (numpy's state), needed only in the training process (``num_workers=0``), whose streams
    must stay untouched. CUDA generators are never touched.
    """
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled, ``drop_last``) that yields ``(epoch, index)`` pairs and can start mid-epoch.

    ``set_epoch(epoch, skip)``: the next iteration yields this rank's order for ``epoch`` (the same
    order as ``DistributedSampler`` with the same seed) from its ``skip``-th sample on, so a run
    resumed after ``iteration`` batches passes ``skip = iteration * batch_size`` and gets exactly the
    batches it had not trained on. ``len()`` stays the whole epoch's share. The epoch travels with
    each index because persistent workers never see ``set_epoch``: ``SampleSeededDataset`` seeds the
    augmentation from it. The order is held as one int64 array and handed out lazily: no Python
    list of the epoch's indices, whatever the dataset's size.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must lie in [0, {self.num_samples}] (this rank's samples per epoch), got {skip}")
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shuffle = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's order
        order = torch.randperm(len(self.dataset), generator=shuffle)[:self.total_size]
        mine = order[self.rank:self.total_size:self.num_replicas][self.skip:].numpy()
        epoch = self.epoch
        return ((epoch, int(index)) for index in mine)


class ShardStreamSampler(ResumableDistributedSampler):
    """``ResumableDistributedSampler`` for streamed shards (``ShardIndex.streamed``): the same
    counts, ``(epoch, index)`` pairs and ``set_epoch(epoch, skip)``, in ``engine.shards.stream_order``:
    the shards shuffled by (seed, epoch), this rank's contiguous share cut into ``streams`` parts,
    one per loader worker."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int, streams: int):
        super().__init__(dataset, num_replicas, rank, seed)
        self.batch_size, self.streams = batch_size, streams

    def __iter__(self) -> Iterator[tuple[int, int]]:
        counts = self.dataset.index.counts
        shards = torch.randperm(len(counts), generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()
        order = stream_order(counts, shards, self.rank, self.num_replicas, self.batch_size, self.streams, True)
        epoch = self.epoch
        return ((epoch, int(index)) for index in order[self.skip:])


class ShardStreamEvalSampler(DistributedSampler):
    """``DistributedSampler(shuffle=False)`` for streamed shards: each rank's ``len(range(rank, N,
    world_size))`` samples as one contiguous run of the shards in order, one part per loader worker
    (``engine.shards.stream_order``), then the padding. The same counts as ``DistributedSampler``,
    so the evaluation still counts each sample once."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, batch_size: int, streams: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size, self.streams = batch_size, streams

    def __iter__(self) -> Iterator[int]:
        counts = self.dataset.index.counts
        order = stream_order(counts, np.arange(len(counts)), self.rank, self.num_replicas, self.batch_size,
                             self.streams, False)
        padding = np.resize(order if len(order) else np.zeros(1, dtype=np.int64), self.num_samples - len(order))
        return iter(np.concatenate([order, padding]).tolist())


class SampleSeededDataset(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: item ``index`` loaded with the CPU RNGs seeded from
    ``derive_seed(seed, epoch, index)``.

    So an augmentation depends only on (seed, epoch, sample): the same with any number of
    workers or ranks and after a resume, different from one epoch to the next. The caller's RNG
    streams are left as they were (``seeded_cpu_rngs``; in a worker nothing needs restoring).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        in_worker = get_worker_info() is not None  # a worker's generators are its own
        with seeded_cpu_rngs(derive_seed(self.seed, epoch, index), restore=not in_worker):
            return self.dataset[index]


def reads_streamed_shards(dataset: Dataset) -> bool:
    """Whether ``dataset`` reads remote shards in order (``engine.shards.ShardIndex.streamed``)."""
    return bool(getattr(getattr(dataset, "index", None), "streamed", False))


TRAIN_PREFETCH_FACTOR = 2  # batches queued per worker: num_workers * 2 in flight; more only costs shared memory


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device = torch.device("cpu"),
    train: bool = True,
    pin_memory: Optional[bool] = None,
) -> DataLoader:
    """DataLoader over this rank's share of ``dataset``; batches of (images, targets).

    ``train``: a ``ResumableDistributedSampler`` (shuffled by ``seed`` + epoch; the training loop calls
    ``sampler.set_epoch(epoch, skip)``) over ``SampleSeededDataset(dataset, seed)``, incomplete batches
    dropped, persistent workers (started once, not every epoch: the per-sample seeding makes their
    own RNG state irrelevant). Otherwise in order, nothing dropped (the sampler pads ranks to equal
    length by repeating items), workers started per pass. Streamed shards (``engine.shards``) take
    ``ShardStreamSampler`` / ``ShardStreamEvalSampler`` instead, with one stream per worker.
    ``pin_memory`` None: pinned on CUDA only.
    """
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    streamed, streams = reads_streamed_shards(dataset), max(num_workers, 1)
    if not train:
        sampler = ShardStreamEvalSampler(dataset, world_size, rank, batch_size, streams) if streamed else \
            DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          pin_memory=pin_memory)
    sampler = ShardStreamSampler(dataset, world_size, rank, seed, batch_size, streams) if streamed else \
        ResumableDistributedSampler(dataset, world_size, rank, seed)
    workers_kwargs = dict(persistent_workers=True, prefetch_factor=TRAIN_PREFETCH_FACTOR) if num_workers > 0 else {}
    return DataLoader(SampleSeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                      generator=torch.Generator().manual_seed(seed),  # worker base seeds: not from the global RNG
                      **workers_kwargs)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``, copied without blocking the host only from pinned memory (a loader
    with ``pin_memory``): from pageable memory a non-blocking copy gains nothing and, on some
    backends, races with the host reusing the buffer. Never asks a CPU run's tensor whether it is
    pinned (which can start a CUDA context)."""
    non_blocking = torch.device(device).type != "cpu" and tensor.is_pinned()
    return tensor.to(device, non_blocking=non_blocking)


def shutdown_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent worker processes now (they otherwise live as long as the loader).

    A training process must not leave them to interpreter exit: multiprocessing's exit handler
    stops daemon processes with SIGTERM, which training workers ignore (``engine.signals``), and
    then waits for them forever.
    """
    iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps persistent workers
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
