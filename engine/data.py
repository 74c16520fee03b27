"""Images for training: folders that tolerate bad files, embedded photos, distributed loaders.

* ``pretrain_transform(input_size, fast_decode=False)``: RandomResizedCrop(scale 0.2-1, bicubic),
  horizontal flip, ToTensor, ImageNet mean/std (the FCMAE recipe); ``normalize_transform()``: the
  last two. ``fast_decode``: the crop is ``DraftRandomResizedCrop``, which decodes JPEGs at 1/2-1/8
  scale when the crop box allows (``draft_resized_crop``); such transforms get files opened, not
  decoded (``open_image``, ``decodes_files``).
* ``to_rgb(image)``: any PIL image (grayscale, 16-bit, palette, RGBA, CMYK) as 8-bit RGB.
* ``resolve_image_root(data_path, split)``: ``<data_path>/<split>`` if it exists, else ``data_path``.
* ``ImageFolderSkippingUnreadable(root, transform)``: torchvision ImageFolder whose unreadable files
  (corrupt, truncated, not images) are skipped with a warning naming each and counting them; the
  next readable file in the list takes its place, so batches stay full (for evaluation,
  ``substitute_unreadable=False``: a blank image labelled ``UNREADABLE_TARGET``, left out of the
  metrics). If every file is unreadable it raises ``UnreadableDatasetError``. A class folder
  without images keeps its label (its index among the sorted class folders) and is named in a
  warning; ``build_image_folder`` adds a clear error for a folder without any images.
* ``EmbeddedPhotos(split, input_size, length, transform=None)``: real photographs bundled with
  scikit-image (public domain / CC0), no download needed; see its docstring.
* ``shutdown_workers(loader)``: stop a loader's persistent workers (end of a training run).
* ``build_loader(dataset, batch_size, num_workers, seed, rank, world_size, device, train, pin_memory)``:
  DataLoader over this rank's share. Training: a ``ResumableDistributedSampler`` (a seeded
  shuffle per epoch, also for one process; ``sampler.set_epoch(epoch, skip)`` starts mid-epoch)
  feeding ``SampleSeededDataset``, so every sample's augmentation depends only on
  ``(seed, epoch, index)``; persistent workers. Evaluation: a plain ``DistributedSampler``.
* ``to_device(tensor, device)``: a batch's copy to the device, asynchronous only from pinned memory.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import models  # noqa: F401  (torchvision guard before torchvision)
import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode

from .config import ConfigError
from .seeding import derive_seed

_logger = logging.getLogger(__name__)

# what PIL raises for files it cannot decode (UnidentifiedImageError and truncation are OSErrors)
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


UNREADABLE_TARGET = -1  # evaluation's label for a file that could not be read (left out of the metrics)


class UnreadableDatasetError(RuntimeError):
    """Every file of an image folder is unreadable."""


def normalize_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def pretrain_transform(input_size: int, fast_decode: bool = False) -> transforms.Compose:
    """FCMAE pretraining augmentation: PIL RGB image -> (3, input_size, input_size) normalised tensor.

    ``fast_decode``: crop with ``DraftRandomResizedCrop``, which decodes JPEG files at a reduced
    scale when the crop allows (the same crops, a fraction of the decoding work);
    ``ImageFolderSkippingUnreadable`` then hands it the files opened but not decoded.
    """
    crop = DraftRandomResizedCrop if fast_decode else transforms.RandomResizedCrop
    return transforms.Compose([
        crop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        normalize_transform(),
    ])


JPEG_DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes directly (scaled inverse DCT)


class UnreadableImageError(OSError):
    """A transform that decodes the file itself (``DraftRandomResizedCrop``) could not decode it."""


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


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit grayscale rescaled to 0-255, transparency composited on white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values * 255.0 if values.max(initial=0) <= 1.0 else values,
                                        0, 255).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully as RGB; raises one of ``UNREADABLE_IMAGE_ERRORS`` if it cannot."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def open_image(path: str | os.PathLike) -> Image.Image:
    """``path`` opened with its header read, not decoded (for ``DraftRandomResizedCrop``); raises one
    of ``UNREADABLE_IMAGE_ERRORS`` if it is not an image. Decoding closes the file."""
    return Image.open(path)


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


class ImageFolderSkippingUnreadable(ImageFolder):
    """``ImageFolder`` (``<root>/<class>/<image>``) -> (image, class index), skipping unreadable files.

    An unreadable file is logged once (naming it and the running count) and replaced by the next
    readable file in the sample list, so training batches stay full. For evaluation
    (``substitute_unreadable=False``) it yields a blank image with target ``UNREADABLE_TARGET``
    instead, which the evaluation leaves out, so no image is counted twice. The bookkeeping lives
    in shared memory, so DataLoader workers' findings add up in ``unreadable_count``. A transform
    that decodes files itself (``pretrain_transform(fast_decode=True)``, see ``decodes_files``) gets
    them opened, not decoded, and its decoding failures count as unreadable files too.
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None,
                 substitute_unreadable: bool = True):
        # allow_empty: an empty class folder must not shift the labels of the others (nor stop pretraining)
        super().__init__(os.fspath(root), transform=transform, allow_empty=True,
                         loader=open_image if decodes_files(transform) else load_rgb_image)
        if not self.samples:
            raise FileNotFoundError(f"no image files in the class folders of {self.root}")
        empty = sorted(set(self.classes) - {self.classes[target] for target in self.targets})
        if empty:
            _logger.warning("%d class folders under %s hold no images: %s", len(empty), self.root, ", ".join(empty))
        self.substitute_unreadable = substitute_unreadable
        self._unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    @property
    def unreadable_count(self) -> int:
        return int(self._unreadable.sum())

    def unreadable_paths(self) -> list[str]:
        return [self.samples[index][0] for index in torch.nonzero(self._unreadable).flatten().tolist()]

    def _load(self, index: int) -> Optional[tuple[Any, int]]:
        """(transformed image, target) of sample ``index``; None, recorded and logged, if unreadable."""
        if self._unreadable[index]:
            return None
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except UNREADABLE_IMAGE_ERRORS as error:
            return self._record_unreadable(index, path, error)
        try:
            return (self.transform(image) if self.transform is not None else image), target
        except UnreadableImageError as error:  # from a transform that decodes the file itself
            return self._record_unreadable(index, path, error.__cause__ or error)

    def _record_unreadable(self, index: int, path: str, error: BaseException) -> None:
        self._unreadable[index] = True
        _logger.warning("skipping unreadable image %s (%s: %s); %d unreadable so far",
                        path, type(error).__name__, error, self.unreadable_count)

    def __getitem__(self, index: int):
        if not self.substitute_unreadable:
            loaded = self._load(index)
            if loaded is None:
                blank = Image.new("RGB", (1, 1))
                return (self.transform(blank) if self.transform is not None else blank), UNREADABLE_TARGET
            return loaded
        for offset in range(len(self.samples)):
            loaded = self._load((index + offset) % len(self.samples))
            if loaded is not None:
                return loaded
        raise UnreadableDatasetError(f"all {len(self.samples)} image files under {self.root} are unreadable; "
                           "check the files (e.g. open one with PIL) or point --data_path elsewhere")


def build_image_folder(data_path: str | os.PathLike, split: str, transform: Callable,
                       substitute_unreadable: bool = True) -> ImageFolderSkippingUnreadable:
    """The ``split`` images under ``data_path``; ConfigError naming --data_path if there are none."""
    root = resolve_image_root(data_path, split)
    try:
        dataset = ImageFolderSkippingUnreadable(root, transform, substitute_unreadable)
    except FileNotFoundError as error:
        raise ConfigError(
            f"--data_path {data_path}: no images found in {root} ({error}); expected "
            f"<root>/{split}/<class>/<image> or <root>/<class>/<image> with extensions .jpg .png ..."
        ) from error
    return dataset


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
    augmentation from it.
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
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, index) for index in indices])


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
    length by repeating items), workers started per pass. ``pin_memory`` None: pinned on CUDA only.
    """
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    if not train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          pin_memory=pin_memory)
    workers_kwargs = dict(persistent_workers=True, prefetch_factor=TRAIN_PREFETCH_FACTOR) if num_workers > 0 else {}
    return DataLoader(SampleSeededDataset(dataset, seed), batch_size=batch_size,
                      sampler=ResumableDistributedSampler(dataset, world_size, rank, seed), num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True,
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
