"""Does FCMAE pretraining help? ConvNeXt V2 atto on Imagenette, at CPU scale, in one command.

The study pretrains an encoder with FCMAE on train-split images (``--pretrain-images`` of them,
labels unused), watching it with the k-NN monitor (``fcmae.knn_monitor``: 20-NN top-1 of its
frozen features at epoch 0, every ``--knn-every`` epochs, at every budget and at the end), keeps
its encoder after each of the ``--budgets`` epochs, then compares

* fine-tuning: the encoder of every budget vs the same model from random initialisation (one
  scratch baseline), with the identical recipe (epochs, schedule, optimizer, layer decay,
  augmentation, data order, seed): does longer pretraining help?
* linear probe (and 20-NN) on frozen pooled features: final FCMAE encoder vs a random encoder,

on a class-balanced labelled subset of the train split (``--labelled-per-class``), reporting
top-1 on a class-balanced subset of the val split (``--val-per-class``). Every phase uses the
project's own pieces: ``fcmae.build_fcmae``, ``engine`` (AdamW groups, per-update schedule,
``train_one_epoch``), ``finetune`` (model from the exported encoder, layer decay, evaluation,
features, linear probe, k-NN), so it measures the product.

Images are decoded once, resized (shorter side) and center-cropped to ``--input-size``, and
cached as one uint8 tensor file per split under ``--cache-dir``; training augments those
tensors (random resized crop + flip), evaluation uses them as they are.

The budgets are checkpoints of one run, so a short budget's encoder stopped mid-schedule (its
learning rate not yet annealed), which is what watching a long run gives, not what a separate
short run with its own schedule would give.

Outputs in ``--output-dir``: ``study.json`` (numbers and settings), ``study.md`` (tables),
``pretrain_loss.png`` and ``learning_curve.png`` (k-NN top-1 against pretraining epochs, fine-tune
top-1 against budget; need matplotlib), ``reconstructions.png``; ``study_run.log`` repeats the
progress lines. The budgets' encoder exports stay in ``--cache-dir``.

    python benchmarks/imagenette_study.py                      # about 1 h 40 min on 2 idle CPU cores
    nohup python benchmarks/imagenette_study.py > study.log 2>&1 &
    python benchmarks/imagenette_study.py --smoke --output-dir /tmp/s --cache-dir /tmp/s   # seconds
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402  (first: the torchvision guard)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import fcmae  # noqa: E402
from engine.checkpoint import atomic_write, save_safetensors  # noqa: E402
from engine.config import DefaultsOnceHelpFormatter  # noqa: E402
from engine.data import ImageFolderSkippingUnreadable, resolve_image_root  # noqa: E402
from engine.knn import knn_accuracy  # noqa: E402
from engine.logging import format_duration, setup_logging  # noqa: E402
from engine.loop import train_one_epoch  # noqa: E402
from engine.stepper import GradientStepper  # noqa: E402
from engine.optim import build_adamw, scaled_lr  # noqa: E402
from engine.schedule import build_lr_scheduler  # noqa: E402
from engine.seeding import derive_seed, generator, seed_everything  # noqa: E402
from fcmae.knn_monitor import KNNMonitor  # noqa: E402
from fcmae.visualize import save_png, visualize_reconstructions  # noqa: E402
from finetune.evaluate import evaluate  # noqa: E402
from finetune.features import FeatureExtractor, extract_dataset  # noqa: E402
from finetune.linear_probe import probe_accuracy, train_linear_probe  # noqa: E402
from finetune.mixup import build_train_criterion  # noqa: E402
from finetune.model import build_finetune_model  # noqa: E402
from models.layer_decay import param_groups_layer_decay  # noqa: E402

_logger = logging.getLogger("imagenette_study")

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-224"
WARMUP_SHARE = 0.1  # of all optimizer updates, in pretraining and fine-tuning
PRETRAIN_CROP_SCALE = (0.2, 1.0)  # FCMAE recipe
FINETUNE_CROP_SCALE = (0.35, 1.0)  # light augmentation for a few epochs on little data
KNN_K = 20
PLAN_COST = {"pretrain": 1.0, "finetune": 1.4, "features": 0.35}  # rough seconds per image, relative
AIMED_GAIN = 10.0  # points over random initialisation: fine-tune at the largest budget, linear probe, k-NN


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
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def train_augmentation(size: int, crop_scale: tuple[float, float]) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip(),
                       to_model_input()])


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


# ----------------------------------------------------------------------------- phases

def seeded_epochs(epochs: int, seed: int):
    """Epoch indices; before each, every RNG is seeded from (seed, epoch): data order and
    augmentation depend only on the seed and epoch, so the two fine-tuning arms see the same batches."""
    for epoch in range(epochs):
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


def budget_encoder_path(args, epochs: int) -> Path:
    return args.cache_dir / f"fcmae-study-encoder-{args.model}-{args.input_size}px-{epochs}ep.safetensors"


def knn_epochs(args) -> list[int]:
    """Epochs after which the k-NN monitor runs: 0 (initialisation), every ``--knn-every``, every budget, the last."""
    return sorted({*range(0, args.pretrain_epochs + 1, args.knn_every), *args.budgets, args.pretrain_epochs})


def pretrain(args, images: torch.Tensor, val_images: torch.Tensor, monitor: KNNMonitor) -> tuple[list[float], list]:
    """FCMAE pretraining on ``images`` (labels unused); writes the encoder export of every budget
    and of the last epoch, and the reconstruction picture. Returns the loss of every iteration and
    the k-NN curve, ``[{"epoch", "knn_top1", "knn_time_s"}, ...]`` at ``knn_epochs``."""
    seed_everything(args.seed)
    model = fcmae.build_fcmae(args.model, mask_ratio=args.mask_ratio, norm_pix_loss=True)
    dataset = CachedImages(images, torch.zeros(len(images), dtype=torch.int64),
                           train_augmentation(args.input_size, PRETRAIN_CROP_SCALE))
    loader = train_loader(dataset, args.batch_size)
    optimizer = build_adamw(model, scaled_lr(args.pretrain_blr, args.batch_size), weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = per_update_schedule(optimizer, args.pretrain_epochs, len(loader))
    stepper = GradientStepper(model, optimizer, clip_grad=args.clip_grad)
    losses: list[float] = []
    curve_epochs = knn_epochs(args)
    curve = [{"epoch": 0, **monitor.evaluate(model.encoder)}]

    def loss_fn(model, batch, step):
        batch_images = batch[0]
        mask_rng = generator(derive_seed(args.seed, step.epoch, step.iteration))
        visible = model.random_visible_cells(batch_images, mask_rng)
        loss, _, _ = model(batch_images, visible)
        losses.append(loss.item())
        return loss, {}

    for epoch in seeded_epochs(args.pretrain_epochs, args.seed):  # reseeded per epoch: the monitor changes nothing
        stats = train_one_epoch(model, loader, loss_fn, stepper, scheduler, epoch, args.pretrain_epochs, args.print_freq)
        epochs_done = epoch + 1
        _logger.info("pretrain epoch %d/%d: loss %.4f, %.1f img/s", epochs_done, args.pretrain_epochs, stats["loss"],
                     stats["images_per_s"])
        if epochs_done in curve_epochs:
            curve.append({"epoch": epochs_done, **monitor.evaluate(model.encoder)})
        if epochs_done in args.budgets or epochs_done == args.pretrain_epochs:
            save_safetensors(model.encoder.state_dict(), budget_encoder_path(args, epochs_done),
                             {"model": args.model, "input_size": str(args.input_size), "epochs": str(epochs_done)})
    shown = to_model_input()(val_images[:8])
    save_png(visualize_reconstructions(model, shown, args.seed), args.output_dir / "reconstructions.png")
    return losses, curve


def finetune_arm(args, checkpoint: Optional[Path], train_set: Dataset, val_loader: DataLoader,
                 num_classes: int) -> dict:
    """Fine-tune a dense model initialised from ``checkpoint`` (None: random); val top-1/top-5."""
    seed_everything(args.seed)
    model = build_finetune_model(args.model, num_classes, checkpoint)
    depths = models.MODEL_CONFIGS[args.model][0]
    groups = param_groups_layer_decay(model, depths, args.weight_decay, args.layer_decay, "single")
    optimizer = build_adamw(model, scaled_lr(args.finetune_blr, args.batch_size), args.weight_decay,
                            betas=(0.9, 0.999), param_group_fn=lambda _: groups)
    loader = train_loader(train_set, args.batch_size)
    scheduler = per_update_schedule(optimizer, args.finetune_epochs, len(loader))
    stepper = GradientStepper(model, optimizer, clip_grad=args.clip_grad)
    criterion = build_train_criterion(None, args.smoothing)

    def loss_fn(model, batch, step):
        batch_images, targets = batch
        return criterion(model(batch_images), targets), {}

    train_losses = []
    for epoch in seeded_epochs(args.finetune_epochs, args.seed):
        stats = train_one_epoch(model, loader, loss_fn, stepper, scheduler, epoch, args.finetune_epochs, args.print_freq)
        train_losses.append(stats["loss"])
    metrics = evaluate(model, val_loader)
    return {"acc1": metrics["acc1"], "acc5": metrics["acc5"], "val_loss": metrics["loss"],
            "train_loss_per_epoch": train_losses}


def probe_arm(args, checkpoint: Optional[Path], train_set: Dataset, val_set: Dataset, num_classes: int) -> dict:
    """Linear probe and k-NN top-1 on frozen pooled features of ``checkpoint`` (None: random encoder)."""
    seed_everything(args.seed)
    extractor = FeatureExtractor(args.model, checkpoint)
    train = extract_dataset(extractor, DataLoader(train_set, batch_size=args.batch_size * 2))
    val = extract_dataset(extractor, DataLoader(val_set, batch_size=args.batch_size * 2))
    probe = train_linear_probe(train["pooled"], train["labels"], num_classes, args.probe_epochs,
                               lr=args.probe_lr, seed=args.seed)
    return {"acc1": probe_accuracy(probe, val["pooled"], val["labels"]),
            "knn_acc1": knn_accuracy(train["pooled"], train["labels"], val["pooled"], val["labels"],
                                     num_classes=num_classes, k=KNN_K)}


# ----------------------------------------------------------------------------- reporting

class StudyClock:
    """Elapsed time and a rough estimate of what is left, from the planned images per phase and
    kind of work (``{phase: {kind: images}}``, weighted by ``PLAN_COST``) and the seconds per
    weighted image measured so far."""

    def __init__(self, plan: dict[str, dict[str, int]]):
        self.plan, self.start, self.done = plan, time.perf_counter(), set()

    def weighted(self, phases) -> float:
        return sum(PLAN_COST[kind] * images for phase in phases for kind, images in self.plan[phase].items())

    def finished(self, phase: str) -> None:
        self.done.add(phase)
        elapsed = time.perf_counter() - self.start
        remaining = self.weighted(set(self.plan) - self.done) * elapsed / max(self.weighted(self.done), 1e-9)
        _logger.info("study: %s done (%d/%d phases), elapsed %s, about %s left", phase, len(self.done),
                     len(self.plan), format_duration(elapsed), format_duration(remaining))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def markdown_table(results: dict) -> str:
    finetune, probe, gains, met = results["finetune"], results["linear_probe"], results["gains"], results["targets_met"]
    setup = results["setup"]
    verdict = {True: "met", False: "not met"}
    largest = str(max(setup["budgets"]))
    lines = [
        f"# FCMAE vs random initialisation: {setup['model']} on Imagenette at {setup['input_size']} px",
        "",
        f"FCMAE pretraining: {setup['pretrain_epochs']} epochs over {setup['pretrain_images']} train images "
        f"(labels unused); fine-tuned from the checkpoints after {', '.join(map(str, setup['budgets']))} epochs of "
        f"that run. Fine-tuning ({setup['finetune_epochs']} epochs) and probes use {setup['labelled_images']} "
        f"labelled train images; top-1 on {setup['val_images']} val images (chance {100 / setup['classes']:.0f}%). "
        f"Wall time {format_duration(results['wall_time_s'])}.",
        "",
        f"Pretraining loss (masked-patch MSE on normalised pixels): first-epoch mean "
        f"{results['pretrain_loss']['first_epoch_mean']:.4f}, last-epoch mean {results['pretrain_loss']['last_epoch_mean']:.4f}.",
        "",
        "| pretraining epochs | fine-tune top-1 (%) | gain over scratch |",
        "|---|---|---|",
        f"| 0 (scratch) | {finetune['scratch']['acc1']:.2f} | |",
        *(f"| {budget} | {arm['acc1']:.2f} | {gains['finetune'][budget]:+.2f} |"
          for budget, arm in finetune["fcmae"].items()),
        "",
        f"k-NN monitor during pretraining ({KNN_K}-NN top-1 (%) of the frozen encoder; epoch 0 = initialisation):",
        "",
        "| epoch | " + " | ".join(str(point["epoch"]) for point in results["knn_curve"]) + " |",
        "|---" * (len(results["knn_curve"]) + 1) + "|",
        f"| {KNN_K}-NN top-1 | " + " | ".join(f"{point['knn_top1']:.2f}" for point in results["knn_curve"]) + " |",
        "",
        f"| evaluation after {setup['pretrain_epochs']} epochs | FCMAE encoder | random init | gain | aim |",
        "|---|---|---|---|---|",
        f"| linear probe top-1 (%) | {probe['fcmae']['acc1']:.2f} | {probe['random']['acc1']:.2f} "
        f"| {gains['linear_probe']:+.2f} | >= +{AIMED_GAIN:.0f} ({verdict[met['linear_probe']]}) |",
        f"| {KNN_K}-NN top-1 (%) | {probe['fcmae']['knn_acc1']:.2f} | {probe['random']['knn_acc1']:.2f} "
        f"| {gains['knn']:+.2f} | >= +{AIMED_GAIN:.0f} ({verdict[met['knn']]}) |",
        "",
        f"Aims for fine-tuning: the gain grows with the budget ({verdict[met['finetune_grows_with_budget']]}); "
        f">= +{AIMED_GAIN:.0f} at the largest budget, {largest} epochs ({verdict[met['finetune_largest_budget']]}).",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (logged) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def plot_learning_curve(results: dict, path: Path) -> Optional[Path]:
    """Left: k-NN top-1 against pretraining epochs, beside the random encoder's. Right: fine-tune
    top-1 against the pretraining budget, beside scratch. PNG; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    curve, finetune, probe = results["knn_curve"], results["finetune"], results["linear_probe"]
    figure, (knn_axis, finetune_axis) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    knn_axis.plot([point["epoch"] for point in curve], [point["knn_top1"] for point in curve], "o-",
                  label="FCMAE encoder")
    knn_axis.axhline(probe["random"]["knn_acc1"], color="grey", linestyle="--", label="random-init encoder (probe arm)")
    knn_axis.set_xlabel("pretraining epochs")
    knn_axis.set_ylabel(f"{KNN_K}-NN top-1 (%)")
    knn_axis.set_title("k-NN monitor during pretraining")
    budgets = [int(budget) for budget in finetune["fcmae"]]
    finetune_axis.plot(budgets, [arm["acc1"] for arm in finetune["fcmae"].values()], "o-", label="from FCMAE")
    finetune_axis.axhline(finetune["scratch"]["acc1"], color="grey", linestyle="--", label="from scratch")
    finetune_axis.set_xticks(budgets)
    finetune_axis.set_xlabel("pretraining epochs (budget)")
    finetune_axis.set_ylabel("fine-tune top-1 (%)")
    finetune_axis.set_title("fine-tuning from each budget")
    for axis in (knn_axis, finetune_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_losses(losses: Sequence[float], updates_per_epoch: int, path: Path) -> Optional[Path]:
    """Pretraining loss per iteration and its moving average, as PNG; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    values = np.asarray(losses)
    window = max(1, min(25, len(values) // 10))
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(np.arange(len(values)) / updates_per_epoch, values, alpha=0.3, label="iteration")
    axis.plot((np.arange(len(smooth)) + window - 1) / updates_per_epoch, smooth, label=f"mean of {window}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("masked-patch MSE (normalised pixels)")
    axis.set_title("FCMAE pretraining loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsOnceHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None,
                        help=f"folder with train/ and val/ class folders (default: {DEFAULT_DATA_ROOT}; "
                             "with --smoke: a synthetic folder)")
    parser.add_argument("--output-dir", type=Path, default=Path("docs/results/imagenette_atto_128px_budgets"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fcmae-study",
                        help="decoded image tensors and the FCMAE encoder export")
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--input-size", type=int, default=128, help="pixels, a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=25)
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 12, 25],
                        help="pretraining epochs after which the encoder is kept and fine-tuned (<= --pretrain-epochs)")
    parser.add_argument("--knn-every", type=int, default=5,
                        help="k-NN monitor every this many pretraining epochs (also at 0, every budget and the end)")
    parser.add_argument("--pretrain-images", type=int, default=0,
                        help="random train images pretrained on, labels unused (0: the whole train split)")
    parser.add_argument("--finetune-epochs", type=int, default=20, help="over the labelled subset, both arms")
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs over cached features")
    parser.add_argument("--labelled-per-class", type=int, default=100,
                        help="train images per class for fine-tuning and probes (0: all)")
    parser.add_argument("--val-per-class", type=int, default=0, help="val images per class evaluated (0: all)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--pretrain-blr", type=float, default=1.2e-2, help="lr = blr * batch / 256")
    parser.add_argument("--finetune-blr", type=float, default=8e-3, help="lr = blr * batch / 256, both arms")
    parser.add_argument("--layer-decay", type=float, default=0.9, help="single layer decay, both arms")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--clip-grad", type=float, default=3.0)
    parser.add_argument("--probe-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (and decoding workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-freq", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run (64 px, batch 4, one epoch per phase, a few images per class; explicit "
                             "flags override); without --data-root on a synthetic folder")
    return parser


SMOKE_DEFAULTS = {"input_size": 64, "batch_size": 4, "print_freq": 1, "pretrain_epochs": 2, "budgets": [1, 2],
                  "knn_every": 1, "finetune_epochs": 1, "probe_epochs": 1, "labelled_per_class": 4,
                  "val_per_class": 2, "pretrain_images": 0}


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.input_size % 32:
        parser.error(f"--input-size {args.input_size} must be a multiple of 32 (the FCMAE patch size); try 96 or 128")
    for flag in ("batch_size", "pretrain_epochs", "knn_every", "finetune_epochs", "probe_epochs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not all(1 <= budget <= args.pretrain_epochs for budget in args.budgets):
        parser.error(f"--budgets {' '.join(map(str, args.budgets))}: every budget must be between 1 and "
                     f"--pretrain-epochs {args.pretrain_epochs}")
    args.budgets = sorted(set(args.budgets))
    for flag in ("pretrain_images", "labelled_per_class", "val_per_class"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0 (0: all images)")
    if not all((args.data_root / split).is_dir() for split in ("train", "val")):
        parser.error(f"--data-root {args.data_root}: expected train/ and val/ class folders there")
    try:
        models.check_model_name(args.model)
    except ValueError as error:
        parser.error(str(error))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:  # smoke-scale defaults; flags given explicitly still win
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fcmae-study-") as workdir:
        if args.smoke and args.data_root is None:
            args.data_root = write_fake_imagenette(Path(workdir) / "fake-imagenette")
        args.data_root = args.data_root or DEFAULT_DATA_ROOT
        validate(args, parser)
        return run_study(args, argv)


def run_study(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> dict:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(log_file=args.output_dir / "study_run.log")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/imagenette_study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    _logger.info("study: %s", command)

    train = load_split(args.data_root, "train", args.input_size, args.cache_dir, args.threads)
    val = load_split(args.data_root, "val", args.input_size, args.cache_dir, args.threads)
    if train["classes"] != val["classes"]:
        raise ValueError(f"--data-root {args.data_root}: train and val have different class folders")
    classes = len(train["classes"])
    unlabelled = torch.randperm(len(train["labels"]), generator=generator(args.seed))[:args.pretrain_images or None]
    labelled = balanced_subset(train["labels"], args.labelled_per_class or None, args.seed)
    shown = balanced_subset(val["labels"], args.val_per_class or None, args.seed)
    evaluation = to_model_input()
    finetune_set = CachedImages(train["images"][labelled], train["labels"][labelled],
                                train_augmentation(args.input_size, FINETUNE_CROP_SCALE))
    probe_train_set = CachedImages(train["images"][labelled], train["labels"][labelled], evaluation)
    val_set = CachedImages(val["images"][shown], val["labels"][shown], evaluation)
    val_loader = DataLoader(val_set, batch_size=args.batch_size * 2)
    # the probes' images and batches: the last curve point is the final encoder's probe 20-NN
    monitor = KNNMonitor(args.model, probe_train_set, val_set, classes, KNN_K, batch_size=args.batch_size * 2)

    probe_images = len(labelled) + len(shown)
    finetune_images = args.finetune_epochs * len(labelled) + len(shown)
    clock = StudyClock({
        "pretrain": {"pretrain": args.pretrain_epochs * len(unlabelled),
                     "features": len(knn_epochs(args)) * probe_images},
        **{f"fine-tune {budget} ep": {"finetune": finetune_images} for budget in args.budgets},
        "fine-tune scratch": {"finetune": finetune_images},
        "probe FCMAE": {"features": probe_images},
        "probe random": {"features": probe_images}})
    _logger.info("study: %d classes, %d train images for pretraining, %d labelled, %d val, %d px; fine-tuning "
                 "from %s pretraining epochs", classes, len(unlabelled), len(labelled), len(shown), args.input_size,
                 ", ".join(map(str, args.budgets)))

    losses, knn_curve = pretrain(args, train["images"][unlabelled], val["images"][shown], monitor)
    clock.finished("pretrain")
    finetune = {"fcmae": {}}
    for budget in args.budgets:
        arm = finetune_arm(args, budget_encoder_path(args, budget), finetune_set, val_loader, classes)
        finetune["fcmae"][str(budget)] = arm
        _logger.info("fine-tune from %d pretraining epochs: top-1 %.2f%%", budget, arm["acc1"])
        clock.finished(f"fine-tune {budget} ep")
    finetune["scratch"] = finetune_arm(args, None, finetune_set, val_loader, classes)
    _logger.info("fine-tune from scratch: top-1 %.2f%%", finetune["scratch"]["acc1"])
    clock.finished("fine-tune scratch")
    final_encoder = budget_encoder_path(args, args.pretrain_epochs)
    probe = {}
    for arm, checkpoint in (("fcmae", final_encoder), ("random", None)):
        probe[arm] = probe_arm(args, checkpoint, probe_train_set, val_set, classes)
        _logger.info("linear probe %s: top-1 %.2f%%, %d-NN %.2f%%", arm, probe[arm]["acc1"], KNN_K,
                     probe[arm]["knn_acc1"])
        clock.finished(f"probe {'FCMAE' if arm == 'fcmae' else arm}")

    finetune_gains = {budget: arm["acc1"] - finetune["scratch"]["acc1"] for budget, arm in finetune["fcmae"].items()}
    gains = {"finetune": finetune_gains,
             "linear_probe": probe["fcmae"]["acc1"] - probe["random"]["acc1"],
             "knn": probe["fcmae"]["knn_acc1"] - probe["random"]["knn_acc1"]}
    ordered_gains = list(finetune_gains.values())
    updates_per_epoch = len(unlabelled) // args.batch_size
    results = {
        "command": command,
        "wall_time_s": clock.elapsed,
        "setup": {"model": args.model, "input_size": args.input_size, "classes": classes,
                  "pretrain_images": len(unlabelled), "labelled_images": len(labelled),
                  "val_images": len(shown), "threads": args.threads,
                  **{name: value for name, value in vars(args).items()
                     if name not in ("data_root", "output_dir", "cache_dir", "smoke", "threads", "pretrain_images")},
                  "data_root": str(args.data_root),
                  "encoders": {budget: str(budget_encoder_path(args, int(budget))) for budget in finetune["fcmae"]}},
        "pretrain_loss": {"first_epoch_mean": float(np.mean(losses[:updates_per_epoch])),
                          "last_epoch_mean": float(np.mean(losses[-updates_per_epoch:])),
                          "per_iteration": losses},
        "knn_curve": knn_curve,
        "finetune": finetune,
        "linear_probe": probe,
        "gains": gains,
        "targets_met": {
            "finetune_grows_with_budget": all(a < b for a, b in zip(ordered_gains, ordered_gains[1:])),
            "finetune_largest_budget": ordered_gains[-1] >= AIMED_GAIN,
            "linear_probe": gains["linear_probe"] >= AIMED_GAIN,
            "knn": gains["knn"] >= AIMED_GAIN,
        },
    }
    (args.output_dir / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output_dir / "study.md").write_text(markdown_table(results))
    plot_losses(losses, updates_per_epoch, args.output_dir / "pretrain_loss.png")
    plot_learning_curve(results, args.output_dir / "learning_curve.png")
    _logger.info("study done in %s:\n%s", format_duration(clock.elapsed), markdown_table(results))
    return results


if __name__ == "__main__":
    main()
