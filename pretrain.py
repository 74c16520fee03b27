"""FCMAE pretraining of ConvNeXt V2, on one process or many (torchrun, one or many nodes).

    python pretrain.py                     # no arguments: a few-minute CPU demo on embedded photos
    python pretrain.py --config configs/pretrain_atto.yaml --data_path /data/imagenet --update_freq 16
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain_base.yaml \\
        --data_path /data/imagenet --output_dir out/pretrain_base
    # several nodes: add --nnodes=N --node_rank=R --rdzv_endpoint=HOST:PORT to torchrun

Effective batch = batch_size * update_freq * world_size (the recipe uses 4096); the lr is
blr * effective batch / 256 unless --lr is given. Rerunning the same command resumes from the
newest valid checkpoint in --output_dir (--auto_resume, on by default).

Writes to --output_dir (rank 0 only): config.yaml, train.log, metrics.jsonl (one JSON object per
epoch), checkpoint-<epoch>.pth (the last --save_ckpt_num), encoder.safetensors (encoder weights
with timm names, for finetune.py or timm), reconstruction.png, and TensorBoard events
(--log_dir, default <output_dir>/tensorboard).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import fcmae
from engine.checkpoint import find_resume_checkpoint, restore_training_state, save_checkpoint, save_safetensors
from engine.cli import cli_errors, parse_and_validate
from engine.config import (ConfigError, Check, TRAINING_CHECKS, add_training_arguments, check_output_folders,
                           config_dict, save_config)
from engine.data import EMBEDDED_PHOTO_NAMES, EmbeddedPhotos, build_image_folder, build_loader, pretrain_transform
from engine.distributed import (DistributedInfo, all_reduce_mean, check_replicas_identical,
                                get_world_size, init_distributed, wrap_ddp)
from engine.logging import MetricsLog, TensorBoardWriter, setup_logging
from engine.loop import GradientStepper, Step, train_one_epoch, updates_per_epoch
from engine.optim import build_adamw, effective_batch_size, scaled_lr
from engine.schedule import build_lr_scheduler
from engine.seeding import capture_rng_state, configure_determinism, derive_seed, generator, seed_everything
from fcmae.knn_monitor import KNN_MONITOR_CHECKS, build_knn_monitor
from fcmae.visualize import save_png, visualize_reconstructions
from models import BACKENDS

_logger = logging.getLogger("pretrain")

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "pretrain_demo.yaml"
RECIPE_BLR = 1.5e-4  # ConvNeXt V2 FCMAE base learning rate
ADAMW_BETAS = (0.9, 0.95)
VISUAL_IMAGES = 8  # rows in the reconstruction grid
ENCODER_EXPORT = "encoder.safetensors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="FCMAE pretraining of ConvNeXt V2 (run with no arguments for a short CPU demo).",
        epilog=f"With neither --lr nor --blr, blr is {RECIPE_BLR} (the ConvNeXt V2 recipe). "
               "Per-size recipes: configs/pretrain_<size>.yaml.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_arguments(parser)
    group = parser.add_argument_group("FCMAE")
    group.add_argument("--backend", choices=list(BACKENDS), default="sparse",
                       help="how the encoder skips hidden patches (same weights for every backend)")
    group.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of 32x32 patches hidden")
    group.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                       help="normalise each target patch by its mean/std")
    group.add_argument("--decoder_depth", type=int, default=1, help="ConvNeXt V2 blocks in the decoder")
    group.add_argument("--decoder_embed_dim", type=int, default=512, help="decoder width")
    knn = parser.add_argument_group("k-NN monitor", "representation quality during pretraining: the encoder embeds "
                                    "a labelled folder and a weighted k-NN classifies its val/ against its train/")
    knn.add_argument("--knn_data_path", default=None, metavar="DIR",
                     help="ImageNet-style folder with train/ and val/ (labels used by the monitor only); "
                          "omitted: no monitor")
    knn.add_argument("--knn_freq", type=int, default=1, help="epochs between evaluations (also after the last)")
    knn.add_argument("--knn_k", type=int, default=20, help="neighbours")
    knn.add_argument("--knn_max_images", type=int, default=0,
                     help="images per split, spread evenly over the classes (0: all)")
    parser.set_defaults(output_dir="./output/pretrain")
    return parser


PRETRAIN_CHECKS = (
    Check("--input_size", lambda a: a.input_size % 32 == 0,
          "must be a multiple of 32 (the FCMAE patch size), e.g. 224"),
    Check("--mask_ratio", lambda a: 0.0 <= a.mask_ratio < 1.0,
          "must be in [0, 1): the fraction of patches hidden (the paper uses 0.6)"),
    Check("--decoder_depth", lambda a: a.decoder_depth >= 1, "must be >= 1 (the paper uses 1)"),
    Check("--decoder_embed_dim", lambda a: a.decoder_embed_dim >= 1, "must be >= 1 (the paper uses 512)"),
    Check("--backend", lambda a: a.backend != "minkowski" or importlib.util.find_spec("MinkowskiEngine") is not None,
          "MinkowskiEngine is not installed; build it with scripts/install_minkowski.sh or use --backend sparse"),
)


def build_dataset(args: argparse.Namespace):
    """ImageNet-style folder under --data_path, or the embedded photos (announced in the log)."""
    if args.data_path is not None:
        dataset = build_image_folder(args.data_path, "train", pretrain_transform(args.input_size))
        _logger.info("data: %d images in %d classes under %s", len(dataset), len(dataset.classes), dataset.root)
        return dataset
    _logger.info("No --data_path given: demo run on %d embedded scikit-image photos (%s), %d random %d-px crops "
                 "per epoch. For real pretraining pass --data_path /path/to/imagenet.",
                 len(EMBEDDED_PHOTO_NAMES), ", ".join(EMBEDDED_PHOTO_NAMES), args.embedded_samples, args.input_size)
    return EmbeddedPhotos("train", args.input_size, args.embedded_samples)


def make_loss_fn(args: argparse.Namespace, rank: int, device: torch.device):
    """FCMAE loss on a micro-batch; the mask is seeded by (seed, epoch, iteration, rank)."""

    def fcmae_loss(model, batch, step: Step):
        images = batch[0].to(device, non_blocking=True)
        num_cells = (images.shape[2] // 32) * (images.shape[3] // 32)
        mask_rng = generator(derive_seed(args.seed, step.epoch, step.iteration, rank))
        mask = fcmae.random_masking(images.shape[0], num_cells, args.mask_ratio, generator=mask_rng, device=device)
        loss, _, _ = model(images, mask)
        return loss, {}

    return fcmae_loss


def visual_batch(dataset, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same images and masks at every visualisation (one per embedded photo, or spread over
    the folder's classes), drawn with a fixed seed."""
    count = min(VISUAL_IMAGES, len(dataset))
    if isinstance(dataset, EmbeddedPhotos):
        indices = list(range(count))
    else:
        indices = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        images = torch.stack([dataset[index][0] for index in indices]).to(device)
    num_cells = (args.input_size // 32) ** 2
    mask = fcmae.random_masking(count, num_cells, args.mask_ratio, generator=generator(args.seed), device=device)
    return images, mask


def resume(args, model, optimizer, stepper, info: DistributedInfo) -> int:
    """Load --resume, or the newest valid checkpoint with --auto_resume; returns epochs completed."""
    found = find_resume_checkpoint(args, info)
    if found is None:
        return 0
    path, state = found
    saved_model = state.get("config", {}).get("model")
    if saved_model is not None and saved_model != args.model:
        raise ConfigError(f"--model {args.model}: checkpoint {path} holds a {saved_model}; "
                          f"use --model {saved_model} or another --output_dir")
    restore_training_state(path, state, model, optimizer, stepper, args.num_workers, info.world_size)
    return int(state["epoch"])


def save_outputs(args, model, optimizer, stepper, epochs_done: int, visuals, tensorboard) -> None:
    """Checkpoint, encoder export and reconstruction grid (rank 0 only)."""
    output_dir = Path(args.output_dir)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stepper": stepper.state_dict(),
             "epoch": epochs_done, "config": config_dict(args), "rng": capture_rng_state(),
             "world_size": get_world_size()}
    path = save_checkpoint(state, output_dir, epochs_done, args.save_ckpt_num)
    save_safetensors(model.encoder.state_dict(), output_dir / ENCODER_EXPORT,
                     {"model_name": args.model, "format": "timm", "epochs": str(epochs_done)})
    grid = visualize_reconstructions(model, *visuals)
    save_png(grid, output_dir / "reconstruction.png")
    tensorboard.image("reconstruction", grid, epochs_done)
    tensorboard.flush()
    _logger.info("saved %s, %s and reconstruction.png", path.name, ENCODER_EXPORT)


def build_training(args: argparse.Namespace, info: DistributedInfo, lr: float):
    """(model, train_model, optimizer, stepper): ``model`` is the plain FCMAE whose state is saved,
    ``train_model`` the one trained (DDP / torch.compile wrapped when asked for)."""
    seed_everything(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = fcmae.build_fcmae(args.model, args.backend, args.mask_ratio, args.decoder_embed_dim, args.decoder_depth,
                              args.norm_pix_loss).to(info.device)
    optimizer = build_adamw(model, lr, args.weight_decay, ADAMW_BETAS)
    train_model = wrap_ddp(model, info.device)
    if args.compile:
        train_model = torch.compile(train_model)
    stepper = GradientStepper(train_model, optimizer, args.amp, args.update_freq, args.clip_grad)
    return model, train_model, optimizer, stepper


def count_unreadable(dataset, device: torch.device) -> int:
    """Unreadable files found so far, summed over ranks."""
    local = torch.tensor(float(getattr(dataset, "unreadable_count", 0)), device=device)
    return round(all_reduce_mean(local).item() * get_world_size())


def report_replicas(model, info: DistributedInfo) -> None:
    """Log whether every rank ended with the same weights (they must, under DDP)."""
    identical, checksums = check_replicas_identical(model.state_dict())
    if identical:
        _logger.info("weights identical on all %d ranks (sha256 %s)", info.world_size, checksums[0][:16])
    else:
        _logger.error("weights DIFFER across ranks: %s", checksums)


def pretrain(args: argparse.Namespace, info: DistributedInfo) -> dict:
    """Train until --epochs; returns the last epoch's metrics (empty if nothing was left to train)."""
    output_dir = Path(args.output_dir)
    configure_determinism(info.device)
    dataset = build_dataset(args)
    loader = build_loader(dataset, args.batch_size, args.num_workers, args.seed, info.rank, info.world_size,
                          info.device)
    knn_monitor = build_knn_monitor(args, info.device)
    updates = updates_per_epoch(len(loader), args.update_freq)
    if updates < 1:
        raise ConfigError(f"--batch_size {args.batch_size} / --update_freq {args.update_freq}: each process gets "
                          f"{len(dataset) // info.world_size} images, fewer than one optimizer update "
                          f"(batch_size * update_freq = {args.batch_size * args.update_freq}); lower them")
    effective_batch = effective_batch_size(args.batch_size, args.update_freq, info.world_size)
    blr = args.blr if args.blr is not None else RECIPE_BLR
    lr = args.lr if args.lr is not None else scaled_lr(blr, effective_batch)
    model, train_model, optimizer, stepper = build_training(args, info, lr)
    start_epoch = resume(args, model, optimizer, stepper, info)
    scheduler = build_lr_scheduler(optimizer, args.epochs, args.warmup_epochs, updates, args.min_lr)

    _logger.info("%s (%s backend) on %s x %d: %d images/epoch, effective batch %d (%d x %d accumulation x %d), "
                 "lr %.3g, %d epochs from epoch %d", args.model, args.backend, info.device, info.world_size,
                 len(dataset), effective_batch, args.batch_size, args.update_freq, info.world_size, lr, args.epochs,
                 start_epoch)
    tensorboard = TensorBoardWriter((args.log_dir or output_dir / "tensorboard") if info.is_main else None)
    metrics_log = MetricsLog(output_dir / "metrics.jsonl" if info.is_main else None)
    visuals = visual_batch(dataset, args, info.device) if info.is_main else None
    if info.is_main:
        save_config(args, output_dir / "config.yaml", {
            "world_size": info.world_size, "device": str(info.device), "effective_batch_size": effective_batch,
            "lr": lr, "updates_per_epoch": updates})

    loss_fn = make_loss_fn(args, info.rank, info.device)
    stats: dict = {}
    for epoch in range(start_epoch, args.epochs):
        seed_everything(derive_seed(args.seed, epoch, info.rank))  # augmentations depend on the epoch only
        stats = train_one_epoch(train_model, loader, loss_fn, stepper, scheduler, epoch, args.epochs,
                                args.print_freq, tensorboard)
        stats["unreadable_images"] = count_unreadable(dataset, info.device)
        epochs_done = epoch + 1
        if knn_monitor is not None and knn_monitor.due(epochs_done, args.epochs):
            stats.update(knn_monitor.evaluate(model.encoder))
        _logger.info("epoch %d/%d done: loss %.4f, lr %.3g, %.1f img/s, %.0f s%s%s", epochs_done, args.epochs,
                     stats["loss"], stats["lr"], stats["images_per_s"], stats["epoch_time_s"],
                     f", knn_top1 {stats['knn_top1']:.2f}%" if "knn_top1" in stats else "",
                     f", {stats['unreadable_images']} unreadable images skipped" if stats["unreadable_images"] else "")
        metrics_log.append({"epoch": epochs_done, **stats})
        tensorboard.scalars({name: stats[name] for name in ("loss", "lr", "images_per_s", "knn_top1", "knn_time_s")
                             if name in stats}, epochs_done, "epoch/")
        if info.is_main and (epochs_done % args.save_ckpt_freq == 0 or epochs_done == args.epochs):
            save_outputs(args, model, optimizer, stepper, epochs_done, visuals, tensorboard)
    if start_epoch >= args.epochs:
        _logger.info("nothing left to train: %d of %d epochs done", start_epoch, args.epochs)
    if info.is_main and not (output_dir / ENCODER_EXPORT).exists():
        save_safetensors(model.encoder.state_dict(), output_dir / ENCODER_EXPORT,
                         {"model_name": args.model, "format": "timm", "epochs": str(start_epoch)})
    if info.world_size > 1:
        report_replicas(model, info)
    tensorboard.close()
    return stats


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = not argv
    if demo:
        argv = ["--config", str(DEMO_CONFIG)]
    parser = build_parser()
    args = parse_and_validate(parser, argv, TRAINING_CHECKS + PRETRAIN_CHECKS + KNN_MONITOR_CHECKS)
    info = init_distributed(args.device, args.dist_timeout, args.cpu_threads)
    with cli_errors(parser):
        if info.is_main:
            check_output_folders(args)
        setup_logging(info.rank, Path(args.output_dir) / "train.log")
        if demo:
            _logger.info("No arguments: demonstration run with %s, writing to %s", DEMO_CONFIG.name, args.output_dir)
        return pretrain(args, info)


if __name__ == "__main__":
    main()
