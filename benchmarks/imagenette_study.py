"""Which small-image setting makes FCMAE pretraining pay most? ConvNeXt V2 atto on Imagenette,
settings compared at equal pretraining wall time, in one resumable command.

An *arm* is one pretraining setting: input size, stem stride (4: the paper's stem, mask patch 32;
2: mask patch 16, about 4x the encoder compute of the same image), mask ratio and a budget of
pretraining minutes. The study runs, in order:

1. every arm of ``--arms`` (default ``128/4 96/2 128/2``: size/stem stride, i.e. 4x4, 6x6 and
   8x8 mask grids) at ``--mask-ratio``, each with ``--budget-minutes`` of pretraining;
2. the arm with the largest fine-tune gain again at ``--second-mask-ratio``;
3. every ``--finetune-seeds`` seed for the winner (largest fine-tune gain of all) and for the first
   arm (the reference; the selections use the first seed only);
4. the winner again with ``--long-budget-minutes``: its own run with its own full schedule.

Per arm: FCMAE pretraining on the train split (``--pretrain-images``, labels unused) watched by
the k-NN monitor (``fcmae.knn_monitor``, 20-NN top-1 at ``--knn-points`` epochs from 0 to the
end); fine-tuning of its encoder and of the same model from random initialisation (scratch: same
input size and stem stride) with the identical recipe (``--finetune-epochs`` over the labelled
set for every arm; data order, augmentation and head seeded by the fine-tuning seed); linear probe
and 20-NN on frozen pooled features, against a random encoder of the same geometry. Fine-tuning
and probes use a class-balanced labelled subset of the train split (``--labelled-per-class``);
top-1 is on the val split (``--val-per-class``), both at the arm's own input size. Every phase
uses the project's own pieces (``fcmae.build_fcmae``, ``engine``, ``finetune``), so it measures
the product.

**Budgets.** Before an arm pretrains, a calibration times ``--calibration-updates`` training
updates of a throwaway copy of its model (after ten warm-up updates) and sets the epoch count so
the updates take the budget: ``epochs = max(1, round(budget_s * images_per_s / images_per_epoch))``
(whole epochs: the budget give or take half an epoch); the longer budget of step 4 reuses its
setting's calibration, so it buys twice the updates (for 80 vs 40 minutes) even when the machine's
speed has drifted since (a study may span sessions). The arm then runs a complete schedule
(warmup, then half-cosine to 0) over those epochs. The budget covers training updates only: the
k-NN monitor's passes and checkpoint writes are timed apart. The actual training time, images
seen and images/s are recorded; on a loaded machine they stray from the plan, and a warning
says so.

**Resume.** Every finished step (calibration, pretraining, each fine-tuning, each probe) is one
JSON file in ``<output-dir>/steps/``, written atomically; a rerun of the same command reads it
instead of running the step again, so a study cut by the end of a session continues where it
stopped. Pretraining writes a checkpoint after every epoch and continues from the last one (the
same numbers as an uninterrupted run: every epoch is seeded from (seed, epoch)). The settings are
kept in ``<output-dir>/settings.json``; a rerun with other settings is refused, naming them.

Images are decoded once per input size (shorter side resized, center crop) and cached as uint8
tensors under ``--cache-dir``; training augments them (random resized crop + flip).

Outputs in ``--output-dir``: ``study.json`` (every number and setting), ``study.md`` (the
comparison table, the k-NN curves, the aims), ``study.png`` (k-NN curves against pretraining
minutes, gains per arm; needs matplotlib), ``reconstructions-<arm>.png``, ``study_run.log``,
``steps/``; ``runs/<arm>/`` holds the encoder export, and the pretraining checkpoints until the
pretraining is done (``runs/`` is ignored by git).

The full study, on Imagenette in ``../shared/data/imagenette2-224`` beside the repository (the
default; elsewhere add ``--data-path DIR``): 7 to 9 hours on 2 idle CPU cores, niced, nothing
else running; rerun the same command to continue it::

    nice -n 10 python benchmarks/imagenette_study.py --output-dir docs/results/imagenette_small_data \\
        > imagenette_small_data.log 2>&1

Smoke scale (a synthetic folder, tiny sizes, seconds)::

    python benchmarks/imagenette_study.py --smoke --output-dir /tmp/s --cache-dir /tmp/s
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402  (first: the torchvision guard)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import fcmae  # noqa: E402
from benchmarks import imagenette_report as report  # noqa: E402
from engine.checkpoint import (atomic_write, checkpoint_paths, latest_valid_checkpoint, save_checkpoint,  # noqa: E402
                               save_safetensors)
from engine.config import TrainingArgumentParser  # noqa: E402
from engine.data import ImageFolderSkippingUnreadable, resolve_image_root  # noqa: E402
from engine.knn import knn_accuracy  # noqa: E402
from engine.logging import format_duration, setup_logging  # noqa: E402
from engine.loop import train_one_epoch  # noqa: E402
from engine.optim import build_adamw, scaled_lr  # noqa: E402
from engine.schedule import build_lr_scheduler  # noqa: E402
from engine.seeding import derive_seed, generator, seed_everything  # noqa: E402
from engine.stepper import GradientStepper  # noqa: E402
from fcmae.knn_monitor import KNNMonitor  # noqa: E402
from fcmae.visualize import save_png, visualize_reconstructions  # noqa: E402
from finetune.evaluate import evaluate  # noqa: E402
from finetune.features import FeatureExtractor, extract_dataset  # noqa: E402
from finetune.linear_probe import probe_accuracy, train_linear_probe  # noqa: E402
from finetune.mixup import build_train_criterion  # noqa: E402
from finetune.model import build_finetune_model  # noqa: E402
from models.convnextv2 import DEFAULT_STEM_STRIDE  # noqa: E402
from models.layer_decay import param_groups_layer_decay  # noqa: E402

_logger = logging.getLogger("imagenette_study")

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-224"
DEFAULT_ARMS = ((128, 4), (96, 2), (128, 2))  # (input size, stem stride): 4x4, 6x6 and 8x8 mask grids
WARMUP_SHARE = 0.1  # of all optimizer updates, in pretraining and fine-tuning
PRETRAIN_CROP_SCALE = (0.2, 1.0)  # FCMAE recipe
FINETUNE_CROP_SCALE = (0.35, 1.0)  # light augmentation for a few epochs on little data
CALIBRATION_WARMUP_UPDATES = 10  # untimed: the first updates pay for allocations and a cold machine
PLAN_TOLERANCE = 0.25  # a pretraining that strays further from its budget is flagged
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "train_s", "wall_s", "loss_per_epoch", "knn_curve")


# ----------------------------------------------------------------------------- arms

@dataclasses.dataclass(frozen=True)
class Arm:
    """One pretraining setting: ``input_size`` px images, a stride-``stem_stride`` stem (the mask
    patch is the total stride: 32 for 4, 16 for 2), ``mask_ratio`` of the grid hidden, and
    ``budget_minutes`` of pretraining updates."""

    input_size: int
    stem_stride: int
    mask_ratio: float
    budget_minutes: float

    @property
    def mask_patch(self) -> int:
        return models.total_stride(self.stem_stride)

    @property
    def grid(self) -> int:
        """Mask cells per side."""
        return self.input_size // self.mask_patch

    @property
    def geometry(self) -> str:
        """What the fine-tuned model and its scratch baseline share: input size and stem stride."""
        return f"{self.input_size}px-stem{self.stem_stride}"

    @property
    def name(self) -> str:
        return f"{self.geometry}-mask{self.mask_ratio:g}-{self.budget_minutes:g}min"


def parse_geometry(text: str) -> tuple[int, int]:
    """``"96/2"`` -> (96, 2): input size / stem stride."""
    try:
        size, stride = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZE/STEM_STRIDE, e.g. 128/4 or 96/2") from None
    return size, stride


def knn_epochs(epochs: int, points: int) -> list[int]:
    """``points`` epochs from 0 (initialisation) to ``epochs``, evenly spread (fewer when epochs are few)."""
    return sorted({round(index * epochs / (points - 1)) for index in range(points)})


def planned_epochs(budget_s: float, images_per_s: float, images_per_epoch: int) -> int:
    """Whole epochs whose training updates take ``budget_s`` at ``images_per_s`` (at least one)."""
    return max(1, round(budget_s * images_per_s / images_per_epoch))


# ----------------------------------------------------------------------------- data

def cache_path(cache_dir: Path, data_root: Path, split: str, size: int) -> Path:
    """One file per (dataset folder, split, size): the resolved root's hash tells datasets apart."""
    root_id = hashlib.sha1(str(data_root.resolve()).encode()).hexdigest()[:8]
    return cache_dir / f"{data_root.name}-{root_id}-{split}-{size}px.pt"


def decode_split(data_root: Path, split: str, size: int, workers: int) -> dict:
    """All images of a split as {"images": (N, 3, size, size) uint8, "labels": (N,) int64, "classes": [...]}:
    shorter side resized to ``size`` (bicubic), then center-cropped."""
    fit = v2.Lambda(functools.partial(ImageOps.fit, size=(size, size), method=Image.BICUBIC))  # picklable
    folder = ImageFolderSkippingUnreadable(resolve_image_root(data_root, split),
                                           transform=v2.Compose([fit, v2.PILToTensor()]))
    loader = DataLoader(folder, batch_size=64, num_workers=workers)
    images, labels = zip(*loader)
    return {"images": torch.cat(images), "labels": torch.cat(labels).long(), "classes": list(folder.classes)}


def load_split(data_root: Path, split: str, size: int, cache_dir: Path, workers: int) -> dict:
    """``decode_split``, read from the cache file when there is one (written on first use)."""
    path = cache_path(cache_dir, data_root, split, size)
    if path.is_file():
        _logger.info("%s: cached images from %s", split, path)
        return torch.load(path, weights_only=True)
    start = time.perf_counter()
    decoded = decode_split(data_root, split, size, workers)
    atomic_write(path, lambda file: torch.save(decoded, file))
    _logger.info("%s: decoded %d images at %d px in %.0f s -> %s", split, len(decoded["labels"]), size,
                 time.perf_counter() - start, path)
    return decoded


def balanced_subset(labels: torch.Tensor, per_class: Optional[int], seed: int) -> torch.Tensor:
    """Indices of up to ``per_class`` random images of every class (None: all), sorted."""
    if per_class is None:
        return torch.arange(len(labels))
    order = torch.randperm(len(labels), generator=generator(seed))
    chosen = [order[labels[order] == label][:per_class] for label in labels.unique()]
    return torch.cat(chosen).sort().values


class CachedImages(Dataset):
    """(image, label) pairs from uint8 tensors; ``transform`` maps (3, H, W) uint8 to the model input."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def to_model_input() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def train_augmentation(size: int, crop_scale: tuple[float, float]) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip(),
                       to_model_input()])


@dataclasses.dataclass
class StudySplits:
    """The study's images at one input size: ``unlabelled`` (N, 3, S, S) uint8 for pretraining, the
    labelled train subset and the val subset (uint8 images, int64 labels); the same images at every size."""

    size: int
    classes: int
    unlabelled: torch.Tensor
    labelled: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]

    def finetune_set(self) -> CachedImages:
        return CachedImages(*self.labelled, train_augmentation(self.size, FINETUNE_CROP_SCALE))

    def probe_train_set(self) -> CachedImages:
        return CachedImages(*self.labelled, to_model_input())

    def val_set(self) -> CachedImages:
        return CachedImages(*self.val, to_model_input())


class SplitsBySize:
    """``StudySplits`` for an input size, decoded (or read from the cache) on first use; the last
    size stays in memory, since consecutive steps usually share it."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.kept = args, None

    def __call__(self, size: int) -> StudySplits:
        if self.kept is None or self.kept.size != size:
            self.kept = None  # free the previous size first
            self.kept = self.load(size)
        return self.kept

    def load(self, size: int) -> StudySplits:
        args = self.args
        train, val = (load_split(args.data_root, split, size, args.cache_dir, args.threads)
                      for split in ("train", "val"))
        if train["classes"] != val["classes"]:
            raise ValueError(f"--data-path {args.data_root}: train and val have different class folders")
        unlabelled = torch.randperm(len(train["labels"]), generator=generator(args.seed))[:args.pretrain_images or None]
        labelled = balanced_subset(train["labels"], args.labelled_per_class or None, args.seed)
        shown = balanced_subset(val["labels"], args.val_per_class or None, args.seed)
        return StudySplits(size, len(train["classes"]), train["images"][unlabelled],
                           (train["images"][labelled], train["labels"][labelled]),
                           (val["images"][shown], val["labels"][shown]))


def write_fake_imagenette(root: Path, classes: int = 2, train_per_class: int = 6, val_per_class: int = 3,
                          size: int = 80, seed: int = 0) -> Path:
    """An Imagenette-like folder of small synthetic JPEGs (a colour per class plus noise), for --smoke."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 256, size=3)
            for index in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{index}.JPEG", quality=90)
    return root


# ----------------------------------------------------------------------------- training pieces

def seeded_epochs(epochs: int, seed: int, start: int = 0):
    """Epoch indices from ``start``; before each, every RNG is seeded from (seed, epoch): data order
    and augmentation depend only on the seed and epoch, so the fine-tuning and scratch runs of one
    seed see the same batches, and a pretraining resumed at an epoch continues as it would have."""
    for epoch in range(start, epochs):
        seed_everything(derive_seed(seed, epoch))
        yield epoch


def per_update_schedule(optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int):
    """Warmup over ``WARMUP_SHARE`` of the updates then half-cosine to 0, counted in updates
    (so the warmup may be a fraction of an epoch); ``train_one_epoch`` passes the update index."""
    total = epochs * updates_per_epoch
    return build_lr_scheduler(optimizer, total, round(WARMUP_SHARE * total), 1)


def train_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    if len(dataset) < batch_size:
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(dataset)} training images; lower it")
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)


@dataclasses.dataclass
class Pretraining:
    """What one FCMAE pretraining run trains with; ``loss_fn`` as ``engine.loop`` takes it (the
    mask of iteration i of epoch e drawn from (seed, e, i))."""

    model: fcmae.FCMAE
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    stepper: GradientStepper
    loss_fn: Callable


def build_pretraining(args: argparse.Namespace, arm: Arm, images: torch.Tensor, epochs: int) -> Pretraining:
    """A fresh FCMAE for ``arm`` (seeded with ``--seed``), trained on ``images`` (N, 3, S, S) uint8
    with the schedule of ``epochs`` epochs."""
    seed_everything(args.seed)
    model = fcmae.build_fcmae(args.model, mask_ratio=arm.mask_ratio, norm_pix_loss=True, stem_stride=arm.stem_stride)
    dataset = CachedImages(images, torch.zeros(len(images), dtype=torch.int64),
                           train_augmentation(arm.input_size, PRETRAIN_CROP_SCALE))
    loader = train_loader(dataset, args.batch_size)
    optimizer = build_adamw(model, scaled_lr(args.pretrain_blr, args.batch_size), weight_decay=0.05,
                            betas=(0.9, 0.95))
    scheduler = per_update_schedule(optimizer, epochs, len(loader))
    stepper = GradientStepper(model, optimizer, clip_grad=args.clip_grad)

    def loss_fn(model, batch, step):
        batch_images = batch[0]
        mask_generator = generator(derive_seed(args.seed, step.epoch, step.iteration))
        visible = model.random_visible_cells(batch_images, mask_generator)
        loss, _, _ = model(batch_images, visible)
        return loss, {}

    return Pretraining(model, loader, optimizer, scheduler, stepper, loss_fn)


# ----------------------------------------------------------------------------- steps

def calibrate(args: argparse.Namespace, arm: Arm, splits: StudySplits) -> dict:
    """The arm's pretraining images/s on this machine, from ``--calibration-updates`` timed updates
    of a throwaway model after ``CALIBRATION_WARMUP_UPDATES`` untimed ones, and the epoch count
    that fills ``arm.budget_minutes`` with updates (``planned_epochs``)."""
    start = time.perf_counter()
    warmup_images = CALIBRATION_WARMUP_UPDATES * args.batch_size
    timed_images = args.calibration_updates * args.batch_size
    order = torch.randperm(len(splits.unlabelled), generator=generator(args.seed))
    sample = splits.unlabelled[order[torch.arange(warmup_images + timed_images) % len(order)]]
    run = build_pretraining(args, arm, sample, epochs=1)
    warmup, timed = (DataLoader(Subset(run.loader.dataset, indices), batch_size=args.batch_size)
                     for indices in (range(warmup_images), range(warmup_images, len(sample))))
    train_one_epoch(run.model, warmup, run.loss_fn, run.stepper, run.scheduler, 0, 1, args.print_freq)
    timed_start = time.perf_counter()
    train_one_epoch(run.model, timed, run.loss_fn, run.stepper, run.scheduler, 0, 1, args.print_freq)
    images_per_s = timed_images / (time.perf_counter() - timed_start)
    images_per_epoch = len(splits.unlabelled) // args.batch_size * args.batch_size
    epochs = planned_epochs(arm.budget_minutes * 60, images_per_s, images_per_epoch)
    _logger.info("%s: calibrated %.1f img/s -> %d epochs of %d images for %s of pretraining", arm.name, images_per_s,
                 epochs, images_per_epoch, format_duration(arm.budget_minutes * 60))
    return {"images_per_s": images_per_s, "epochs": epochs, "images_per_epoch": images_per_epoch,
            "wall_s": time.perf_counter() - start}


def arm_plan(arm: Arm, calibration: dict) -> dict:
    """The calibration of ``arm``'s setting with the epochs that fill ``arm.budget_minutes``: one
    measured speed per setting, so a longer budget buys its ratio of the shorter one's updates
    however the machine's speed drifts between sessions."""
    epochs = planned_epochs(arm.budget_minutes * 60, calibration["images_per_s"], calibration["images_per_epoch"])
    _logger.info("%s: %.1f img/s -> %d epochs of %d images", arm.name, calibration["images_per_s"], epochs,
                 calibration["images_per_epoch"])
    return {**calibration, "epochs": epochs}


def knn_point(monitor: KNNMonitor, encoder: torch.nn.Module, epoch: int, train_s: float, images_seen: int) -> dict:
    """One point of the k-NN curve: where the pretraining is and the monitor's 20-NN top-1 (%)."""
    return {"epoch": epoch, "train_minutes": train_s / 60, "images_seen": images_seen, **monitor.evaluate(encoder)}


def pretrain_arm(args: argparse.Namespace, arm: Arm, epochs: int, run_dir: Path, splits: StudySplits) -> dict:
    """FCMAE pretraining of ``arm`` for ``epochs`` epochs over ``splits.unlabelled``, with the k-NN
    monitor at ``knn_epochs``; a checkpoint in ``run_dir`` after every epoch, continued from the
    last one. Writes ``run_dir/encoder.safetensors`` and the reconstruction picture. Returns the
    epochs, images seen, training seconds (updates only) and images/s, the k-NN curve
    (``knn_point`` per entry), the mean loss of every epoch and the wall time with the monitor."""
    start = time.perf_counter()
    run = build_pretraining(args, arm, splits.unlabelled, epochs)
    monitor = KNNMonitor(args.model, splits.probe_train_set(), splits.val_set(), splits.classes, report.KNN_K,
                         batch_size=args.batch_size * 2, stem_stride=arm.stem_stride)
    images_per_epoch = len(run.loader) * args.batch_size
    resumed = latest_valid_checkpoint(run_dir, CHECKPOINT_KEYS)
    if resumed is None:
        history = {"epoch": 0, "train_s": 0.0, "wall_s": 0.0, "loss_per_epoch": [],
                   "knn_curve": [knn_point(monitor, run.model.encoder, 0, 0.0, 0)]}
    else:
        path, state = resumed
        run.model.load_state_dict(state.pop("model"))
        run.optimizer.load_state_dict(state.pop("optimizer"))
        history = state
        _logger.info("%s: continuing after epoch %d of %d from %s", arm.name, history["epoch"], epochs, path)
    wall_before = history["wall_s"]
    curve_epochs = knn_epochs(epochs, args.knn_points)
    for epoch in seeded_epochs(epochs, args.seed, start=history["epoch"]):
        epoch_start = time.perf_counter()
        stats = train_one_epoch(run.model, run.loader, run.loss_fn, run.stepper, run.scheduler, epoch, epochs,
                                args.print_freq)
        history["train_s"] += time.perf_counter() - epoch_start
        history["loss_per_epoch"].append(stats["loss"])
        history["epoch"] = epoch + 1
        _logger.info("%s: pretraining epoch %d/%d, loss %.4f, %.1f img/s", arm.name, epoch + 1, epochs, stats["loss"],
                     stats["images_per_s"])
        if epoch + 1 in curve_epochs:
            history["knn_curve"].append(knn_point(monitor, run.model.encoder, epoch + 1, history["train_s"],
                                                  (epoch + 1) * images_per_epoch))
        history["wall_s"] = wall_before + time.perf_counter() - start
        save_checkpoint({**history, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()},
                        run_dir, epoch + 1, keep_last=1)
    encoder = save_safetensors(models.encoder_export_state(run.model.encoder), run_dir / "encoder.safetensors",
                               {"model_name": args.model, "format": "timm", "epochs": str(epochs),
                                "stem_stride": str(arm.stem_stride), "in_chans": "3",
                                "input_size": str(arm.input_size), "mask_ratio": str(arm.mask_ratio)})
    shown = to_model_input()(splits.val[0][:8])
    save_png(visualize_reconstructions(run.model, shown, args.seed),
             args.output_dir / f"reconstructions-{arm.name}.png")
    budget_s, train_s = arm.budget_minutes * 60, history["train_s"]
    if abs(train_s - budget_s) > PLAN_TOLERANCE * budget_s:
        _logger.warning("%s: pretraining updates took %s against a budget of %s: the machine's load changed since "
                        "the calibration (or whole epochs round a short budget far); compare arms by images seen too",
                        arm.name, format_duration(train_s), format_duration(budget_s))
    images_seen = epochs * images_per_epoch
    return {"unlabelled_images": len(splits.unlabelled), "epochs": epochs, "images_per_epoch": images_per_epoch,
            "images_seen": images_seen, "train_s": train_s, "images_per_s": images_seen / train_s,
            "knn_s": sum(point["knn_time_s"] for point in history["knn_curve"]),
            "wall_s": wall_before + time.perf_counter() - start, "loss_per_epoch": history["loss_per_epoch"],
            "knn_curve": history["knn_curve"], "encoder": str(encoder)}


def finetune_arm(args: argparse.Namespace, arm: Arm, checkpoint: Optional[Path], seed: int,
                 splits: StudySplits) -> dict:
    """Fine-tune the dense model of ``arm``'s geometry initialised from ``checkpoint`` (None:
    random) with fine-tuning ``seed``; val top-1/top-5, training images/s and wall time."""
    start = time.perf_counter()
    seed_everything(seed)
    model = build_finetune_model(args.model, splits.classes, checkpoint, stem_stride=arm.stem_stride)
    depths = models.MODEL_CONFIGS[args.model][0]
    groups = param_groups_layer_decay(model, depths, args.weight_decay, args.layer_decay, "single")
    optimizer = build_adamw(model, scaled_lr(args.finetune_blr, args.batch_size), args.weight_decay,
                            betas=(0.9, 0.999), param_group_fn=lambda _: groups)
    loader = train_loader(splits.finetune_set(), args.batch_size)
    scheduler = per_update_schedule(optimizer, args.finetune_epochs, len(loader))
    stepper = GradientStepper(model, optimizer, clip_grad=args.clip_grad)
    criterion = build_train_criterion(None, args.smoothing)

    def loss_fn(model, batch, step):
        batch_images, targets = batch
        return criterion(model(batch_images), targets), {}

    train_losses, train_start = [], time.perf_counter()
    for epoch in seeded_epochs(args.finetune_epochs, seed):
        stats = train_one_epoch(model, loader, loss_fn, stepper, scheduler, epoch, args.finetune_epochs,
                                args.print_freq)
        train_losses.append(stats["loss"])
    images_per_s = args.finetune_epochs * len(loader) * args.batch_size / (time.perf_counter() - train_start)
    metrics = evaluate(model, DataLoader(splits.val_set(), batch_size=args.batch_size * 2))
    return {"acc1": metrics["acc1"], "acc5": metrics["acc5"], "val_loss": metrics["loss"], "seed": seed,
            "train_loss_per_epoch": train_losses, "images_per_s": images_per_s, "wall_s": time.perf_counter() - start}


def probe_arm(args: argparse.Namespace, arm: Arm, checkpoint: Optional[Path], splits: StudySplits) -> dict:
    """Linear probe and 20-NN top-1 on frozen pooled features of ``checkpoint`` (None: a random
    encoder of ``arm``'s geometry), and the wall time."""
    start = time.perf_counter()
    seed_everything(args.seed)
    extractor = FeatureExtractor(args.model, checkpoint, stem_stride=arm.stem_stride)
    train, val = (extract_dataset(extractor, DataLoader(dataset, batch_size=args.batch_size * 2))
                  for dataset in (splits.probe_train_set(), splits.val_set()))
    probe = train_linear_probe(train["pooled"], train["labels"], splits.classes, args.probe_epochs,
                               lr=args.probe_lr, seed=args.seed)
    return {"acc1": probe_accuracy(probe, val["pooled"], val["labels"]),
            "knn_acc1": knn_accuracy(train["pooled"], train["labels"], val["pooled"], val["labels"],
                                     num_classes=splits.classes, k=report.KNN_K),
            "labelled_images": len(train["labels"]), "val_images": len(val["labels"]), "classes": splits.classes,
            "wall_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- the study

def write_json(path: Path, value) -> None:
    """``value`` as indented JSON, written atomically."""
    atomic_write(path, lambda file: file.write((json.dumps(value, indent=2) + "\n").encode()))


class StoredSteps:
    """Results of finished steps, one JSON file each in ``folder``, written atomically once the
    step is done: what a rerun reads instead of running the step again."""

    def __init__(self, folder: Path):
        self.folder, self.ran, self.read = folder, 0, 0
        self.wall_s: dict[str, float] = {}  # of every step returned, run now or before

    def result(self, name: str, run: Callable[[], dict], needs: Iterable[Path] = ()) -> dict:
        """The stored result of step ``name``, or ``run()``'s, stored. ``needs``: files the result
        refers to; a result whose files are gone is run again."""
        path = self.folder / f"{name}.json"
        missing = [str(file) for file in needs if not Path(file).is_file()]
        if path.is_file() and not missing:
            self.read += 1
            result = json.loads(path.read_text())
            self.wall_s[name] = result["wall_s"]
            return result
        if path.is_file():
            _logger.warning("%s: %s is gone; running the step again", name, ", ".join(missing))
        _logger.info("step %s: started", name)
        start = time.perf_counter()
        result = run()
        write_json(path, result)
        self.ran += 1
        self.wall_s[name] = result["wall_s"]
        _logger.info("step %s: done in %s -> %s", name, format_duration(time.perf_counter() - start), path)
        return result


def evaluate_arm(args: argparse.Namespace, arm: Arm, seeds: Sequence[int], steps: StoredSteps,
                 splits_at: Callable[[int], StudySplits]) -> dict:
    """Every step of ``arm`` for fine-tuning ``seeds`` (run, or read when stored): calibration,
    pretraining, fine-tuning and scratch per seed, probes of its encoder and of a random one.
    Returns them with the gains over scratch / the random encoder (fine-tuning: per seed, as
    fine-tune minus scratch of the same seed, their mean and spread = max - min)."""
    run_dir = args.output_dir / "runs" / arm.name
    encoder = run_dir / "encoder.safetensors"

    def step(name: str, function: Callable, *function_args, needs: Iterable[Path] = ()) -> dict:
        return steps.result(name, lambda: function(args, arm, *function_args, splits_at(arm.input_size)), needs)

    base = dataclasses.replace(arm, budget_minutes=args.budget_minutes)  # the setting at the study's budget
    calibration = steps.result(f"calibrate-{base.name}", lambda: calibrate(args, base, splits_at(arm.input_size)))
    plan = arm_plan(arm, calibration)
    pretraining = step(f"pretrain-{arm.name}", pretrain_arm, plan["epochs"], run_dir, needs=[encoder])
    for checkpoint in checkpoint_paths(run_dir):  # done: later steps read the encoder export only
        checkpoint.unlink()
    finetune = {str(seed): step(f"finetune-{arm.name}-seed{seed}", finetune_arm, encoder, seed) for seed in seeds}
    scratch = {str(seed): step(f"finetune-scratch-{arm.geometry}-seed{seed}", finetune_arm, None, seed)
               for seed in seeds}
    probe = step(f"probe-{arm.name}", probe_arm, encoder)
    random_probe = step(f"probe-random-{arm.geometry}", probe_arm, None)
    finetune_gains = {seed: finetune[seed]["acc1"] - scratch[seed]["acc1"] for seed in finetune}
    return {"arm": {"name": arm.name, **dataclasses.asdict(arm), "mask_patch": arm.mask_patch, "grid": arm.grid},
            "calibration": plan, "pretraining": pretraining, "finetune": finetune, "scratch": scratch,
            "linear_probe": {"fcmae": probe, "random": random_probe},
            "gains": {"finetune": finetune_gains,
                      "finetune_mean": float(np.mean(list(finetune_gains.values()))),
                      "finetune_spread": max(finetune_gains.values()) - min(finetune_gains.values()),
                      "linear_probe": probe["acc1"] - random_probe["acc1"],
                      "knn": probe["knn_acc1"] - random_probe["knn_acc1"]}}


def run_study(args: argparse.Namespace, command: str) -> dict:
    """The four steps of the module docstring; writes study.json, study.md and study.png."""
    steps = StoredSteps(args.output_dir / "steps")
    splits_at = SplitsBySize(args)
    seeds = args.finetune_seeds
    evaluated: dict[Arm, dict] = {}

    def run_arm(arm: Arm, arm_seeds: Sequence[int]) -> None:
        evaluated[arm] = evaluate_arm(args, arm, arm_seeds, steps, splits_at)

    def first_seed_gain(arm: Arm) -> float:  # every arm has it: selections stay the same on resume
        return evaluated[arm]["gains"]["finetune"][str(seeds[0])]

    first = [Arm(size, stride, args.mask_ratio, args.budget_minutes) for size, stride in args.arms]
    for arm in first:
        run_arm(arm, seeds[:1])
    if args.second_mask_ratio:
        run_arm(dataclasses.replace(max(first, key=first_seed_gain), mask_ratio=args.second_mask_ratio), seeds[:1])
    winner = max(evaluated, key=first_seed_gain)
    for arm in dict.fromkeys((first[0], winner)):
        run_arm(arm, seeds)
    long_arm = None
    if args.long_budget_minutes:
        long_arm = dataclasses.replace(winner, budget_minutes=args.long_budget_minutes)
        run_arm(long_arm, seeds)

    summary = {arm.name: results for arm, results in evaluated.items()}
    winner_gains = summary[winner.name]["gains"]
    aims = {"finetune_gain": winner_gains["finetune_mean"] >= report.AIMED_GAIN,
            "knn_gain": winner_gains["knn"] >= report.AIMED_GAIN}
    if long_arm is not None:
        longer_gain = summary[long_arm.name]["gains"]["finetune_mean"]
        aims["gain_grows_with_budget"] = longer_gain > winner_gains["finetune_mean"]
    results = {
        "command": command,
        "settings": study_settings(args),
        "reference": first[0].name, "winner": winner.name, "long": None if long_arm is None else long_arm.name,
        "arms": summary,
        "aims": aims,
        "compute_s": sum(steps.wall_s.values()),
    }
    write_json(args.output_dir / "study.json", results)
    table = report.markdown_report(results)
    atomic_write(args.output_dir / "study.md", lambda file: file.write(table.encode()))
    report.plot_study(results, args.output_dir / "study.png")
    _logger.info("study: %d steps ran now, %d read from %s; compute time of all steps %s:\n%s", steps.ran, steps.read,
                 steps.folder, format_duration(results["compute_s"]), table)
    return results


# ----------------------------------------------------------------------------- command line

SMOKE_ARMS = ((64, 4), (32, 2), (64, 2))
SMOKE_DEFAULTS = {"output_dir": Path("output/imagenette_study_smoke"), "batch_size": 4, "print_freq": 1,
                  "budget_minutes": 0.002, "long_budget_minutes": 0.004, "calibration_updates": 2, "knn_points": 2,
                  "finetune_epochs": 1, "probe_epochs": 1, "labelled_per_class": 4, "val_per_class": 2,
                  "pretrain_images": 0}
# flags that leave the results alone (--input-size / --stem-stride are in --arms)
OUTSIDE_SETTINGS = ("output_dir", "cache_dir", "print_freq", "smoke", "input_size", "stem_stride")


def build_parser() -> TrainingArgumentParser:
    parser = TrainingArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", "--data-root", dest="data_root", type=Path, default=None, metavar="DIR",
                        help=f"folder with train/ and val/ class folders (default: {DEFAULT_DATA_ROOT}; with "
                             "--smoke: a synthetic folder in --cache-dir)")
    parser.add_argument("--output-dir", type=Path, default=Path("docs/results/imagenette_small_data"),
                        help="results, the steps done (a rerun continues from them) and runs/ (encoders, checkpoints); "
                             "--smoke: output/imagenette_study_smoke")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fcmae-study",
                        help="decoded image tensors, one file per split and input size")
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--arms", type=parse_geometry, nargs="+", default=None, metavar="SIZE/STRIDE",
                        help="settings compared, input size / stem stride, the first one the reference (default: "
                             "128/4 96/2 128/2; --smoke: 64/4 32/2 64/2)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="study one setting instead of --arms: this input size (default: the first arm's)")
    parser.add_argument("--stem-stride", type=int, default=None,
                        help="study one setting instead of --arms: this stem stride, 4 or 2 (default: 4)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--second-mask-ratio", type=float, default=0.75,
                        help="mask ratio tried on the arm with the largest fine-tune gain (0: none)")
    parser.add_argument("--budget-minutes", type=float, default=40.0,
                        help="pretraining updates per arm, in minutes of this machine (calibrated)")
    parser.add_argument("--long-budget-minutes", type=float, default=80.0,
                        help="the winner again with this budget, its own run (0: none)")
    parser.add_argument("--calibration-updates", type=int, default=60, help="timed updates that set an arm's epochs")
    parser.add_argument("--knn-points", type=int, default=6,
                        help="k-NN monitor evaluations per pretraining, epoch 0 to the end")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-images", type=int, default=0,
                        help="random train images pretrained on, labels unused (0: the whole train split)")
    parser.add_argument("--finetune-epochs", type=int, default=20,
                        help="over the labelled subset, every arm and scratch")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1],
                        help="fine-tuning (and scratch) seeds of the winner and the reference; the others use the "
                             "first")
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs over cached features")
    parser.add_argument("--labelled-per-class", type=int, default=100,
                        help="train images per class for fine-tuning and probes (0: all)")
    parser.add_argument("--val-per-class", type=int, default=0, help="val images per class evaluated (0: all)")
    parser.add_argument("--pretrain-blr", type=float, default=1.2e-2, help="lr = blr * batch / 256")
    parser.add_argument("--finetune-blr", type=float, default=8e-3,
                        help="lr = blr * batch / 256, every arm and scratch")
    parser.add_argument("--layer-decay", type=float, default=0.9, help="single layer decay")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--clip-grad", type=float, default=3.0)
    parser.add_argument("--probe-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (and decoding workers)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining, subsets, probes")
    parser.add_argument("--print-freq", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run (tiny sizes and budgets, one epoch of fine-tuning, a few images per "
                             "class; explicit flags override); without --data-path on a synthetic folder")
    return parser


def parse_args(parser: TrainingArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Flags with the smoke defaults under ``--smoke``; ``--input-size`` / ``--stem-stride`` make
    ``--arms`` that one setting; the synthetic folder of ``--smoke`` is written (once)."""
    args = parser.parse_args(argv)
    if args.smoke:  # smoke-scale defaults; flags given explicitly still win
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    default_arms = SMOKE_ARMS if args.smoke else DEFAULT_ARMS
    if args.input_size is not None or args.stem_stride is not None:
        if args.arms is not None:
            parser.error("--arms lists the settings; --input-size / --stem-stride study one: give one or the other")
        args.arms = [(args.input_size or default_arms[0][0], args.stem_stride or DEFAULT_STEM_STRIDE)]
    args.arms = [tuple(arm) for arm in (args.arms or default_arms)]
    if args.smoke and args.data_root is None:
        args.data_root = args.cache_dir / "fake-imagenette"
        if not args.data_root.is_dir():  # written aside, then renamed: never half there
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            write_fake_imagenette(Path(tempfile.mkdtemp(dir=args.cache_dir))).rename(args.data_root)
    args.data_root = (args.data_root or DEFAULT_DATA_ROOT).resolve()
    return args


def problems(args: argparse.Namespace) -> list[str]:
    """One line per bad flag value, naming it and what is allowed."""
    found = []
    arms_flag = "--arms" if args.input_size is None and args.stem_stride is None else "--input-size/--stem-stride"
    for size, stride in args.arms:
        if stride not in (4, 2):
            found.append(f"{arms_flag} {size}/{stride}: the stem stride must be 4 or 2")
        elif size < models.total_stride(stride) or size % models.total_stride(stride):
            patch = models.total_stride(stride)
            found.append(f"{arms_flag} {size}/{stride}: the input size must be a multiple of the mask patch {patch} "
                         f"(stem stride {stride}), e.g. {4 * patch}")
    if len(set(args.arms)) < len(args.arms):
        found.append(f"--arms {' '.join(f'{size}/{stride}' for size, stride in args.arms)}: a setting appears twice")
    if not 0 < args.mask_ratio < 1:
        found.append(f"--mask-ratio {args.mask_ratio}: must be in (0, 1), e.g. 0.6")
    if args.second_mask_ratio and not (0 < args.second_mask_ratio < 1 and args.second_mask_ratio != args.mask_ratio):
        found.append(f"--second-mask-ratio {args.second_mask_ratio}: must be in (0, 1) and differ from --mask-ratio "
                     f"{args.mask_ratio} (0: none)")
    if not args.budget_minutes > 0:
        found.append(f"--budget-minutes {args.budget_minutes}: must be > 0")
    if args.long_budget_minutes and not args.long_budget_minutes > args.budget_minutes:
        found.append(f"--long-budget-minutes {args.long_budget_minutes}: must exceed --budget-minutes "
                     f"{args.budget_minutes} (0: none)")
    for flag in ("batch_size", "calibration_updates", "finetune_epochs", "probe_epochs", "threads"):
        if getattr(args, flag) < 1:
            found.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.knn_points < 2:
        found.append(f"--knn-points {args.knn_points}: must be >= 2 (initialisation and the end)")
    for flag in ("pretrain_images", "labelled_per_class", "val_per_class"):
        if getattr(args, flag) < 0:
            found.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0 (0: all images)")
    if len(set(args.finetune_seeds)) < len(args.finetune_seeds):
        found.append(f"--finetune-seeds {' '.join(map(str, args.finetune_seeds))}: a seed appears twice")
    if not all((args.data_root / split).is_dir() for split in ("train", "val")):
        found.append(f"--data-path {args.data_root}: expected train/ and val/ class folders there")
    try:
        models.check_model_name(args.model)
    except ValueError as error:
        found.append(f"--model {args.model}: {error}")
    return found


def study_settings(args: argparse.Namespace) -> dict:
    """The flags that decide the results, as JSON values."""
    return json.loads(json.dumps({name: str(value) if isinstance(value, Path) else value
                                  for name, value in vars(args).items() if name not in OUTSIDE_SETTINGS}))


def changed_settings(args: argparse.Namespace) -> list[str]:
    """``--flag stored -> given`` for every setting that differs from those the output folder's
    study started with (none for a new folder)."""
    path = args.output_dir / "settings.json"
    if not path.is_file():
        return []
    stored, given = json.loads(path.read_text()), study_settings(args)
    return [f"--{name.replace('_', '-')} {stored.get(name)} -> {given.get(name)}"
            for name in sorted(stored.keys() | given.keys()) if stored.get(name) != given.get(name)]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = parse_args(parser, argv)
    found = problems(args)
    if found:
        parser.error("invalid settings:\n  " + "\n  ".join(found))
    changed = changed_settings(args)
    if changed:
        parser.error(f"--output-dir {args.output_dir} holds a study with other settings ({'; '.join(changed)}): "
                     "rerun with its settings to continue it, or choose another --output-dir (or empty this one)")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "settings.json", study_settings(args))
    setup_logging(log_file=args.output_dir / "study_run.log")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/imagenette_study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    _logger.info("study: %s", command)
    return run_study(args, command)


if __name__ == "__main__":
    main()
