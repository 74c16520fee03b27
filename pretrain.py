"""FCMAE pretraining of ConvNeXt V2, on one process or many (torchrun, one or many nodes).

    python pretrain.py                     # no arguments: a few-minute CPU demo on embedded photos
    python pretrain.py --config configs/pretrain_atto.yaml --data_path /data/imagenet --update_freq 16
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain_base.yaml \\
        --data_path /data/imagenet --output_dir out/pretrain_base
    # several nodes: add --nnodes=N --node_rank=R --rdzv_endpoint=HOST:PORT to torchrun

Effective batch = batch_size * update_freq * world_size (the recipe uses 4096); the lr is
blr * effective batch / 256 unless --lr is given. Rerunning the same command resumes from the
newest valid checkpoint in --output_dir (--auto_resume, on by default), mid-epoch ones included.
SIGTERM / SIGUSR1 checkpoint at the next optimizer update and exit with code 3 (engine.runner).

Writes to --output_dir (rank 0 only): config.yaml, train.log, metrics.jsonl (one JSON object per
epoch), checkpoint-<epoch>.pth (the last --save_ckpt_num) and checkpoint-<epoch>-<updates>.pth
inside epochs (--save_ckpt_steps / --save_ckpt_minutes), encoder.safetensors (encoder weights
with timm names, for finetune.py or timm) and reconstruction.png (python -m fcmae.visualize redraws it
from any checkpoint) with each epoch checkpoint, and
TensorBoard events (--log_dir, default <output_dir>/tensorboard).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

import fcmae
from engine.checkpoint import save_safetensors
from engine.cli import parse_and_validate
from engine.compat import require_supported_versions
from engine.config import (OFFICIAL_LAUNCHER_FLAGS, BooleanFlag, Check, OfficialFlag, TRAINING_CHECKS,
                           build_training_parser, optional_path)
from engine.data import EMBEDDED_PHOTO_NAMES, EmbeddedPhotos, build_image_folder, pretrain_transform
from engine.distributed import DistributedInfo
from engine.logging import TensorBoardWriter
from engine.loop import Step
from engine.runner import Task, launch, run_training
from engine.seeding import derive_seed, generator
from fcmae.knn_monitor import KNN_MONITOR_CHECKS, build_knn_monitor
from fcmae.visualize import fixed_visual_batch, save_png, visualize_reconstructions
from models import BACKENDS, encoder_export_state

_logger = logging.getLogger("pretrain")

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "pretrain_demo.yaml"
RECIPE_BLR = 1.5e-4  # ConvNeXt V2 FCMAE base learning rate
ADAMW_BETAS = (0.9, 0.95)
ENCODER_EXPORT = "encoder.safetensors"


def build_parser() -> argparse.ArgumentParser:
    parser = build_training_parser("FCMAE pretraining of ConvNeXt V2.", DEMO_CONFIG, "the ConvNeXt V2 FCMAE recipe",
                                   RECIPE_BLR, "configs/pretrain_<size>.yaml")
    group = parser.add_argument_group("FCMAE")
    group.add_argument("--backend", choices=list(BACKENDS), default="sparse",
                       help="how the encoder skips hidden patches (same weights for every backend)")
    group.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of 32x32 patches hidden")
    group.add_argument("--norm_pix_loss", action=BooleanFlag, default=True,
                       help="normalise each target patch by its mean/std")
    group.add_argument("--decoder_depth", type=int, default=1, help="ConvNeXt V2 blocks in the decoder")
    group.add_argument("--decoder_embed_dim", type=int, default=512, help="decoder width")
    knn = parser.add_argument_group("k-NN monitor", "representation quality during pretraining: the encoder embeds "
                                    "a labelled folder and a weighted k-NN classifies its val/ against its train/")
    knn.add_argument("--knn_data_path", type=optional_path, default=None, metavar="DIR",
                     help="ImageNet-style folder with train/ and val/ (labels used by the monitor only) "
                          "(default: no monitor)")
    knn.add_argument("--knn_freq", type=int, default=1, help="epochs between evaluations (also after the last)")
    knn.add_argument("--knn_k", type=int, default=20, help="neighbours")
    knn.add_argument("--knn_max_images", type=int, default=0,
                     help="images per split, spread evenly over the classes (0: all)")
    parser.set_defaults(output_dir="./output/pretrain")
    parser.add_official_flags(OFFICIAL_PRETRAIN_FLAGS)
    return parser


OFFICIAL_PRETRAIN_FLAGS = OFFICIAL_LAUNCHER_FLAGS + (
    OfficialFlag(("--crop_pct",), float, (None,), "pretraining does no evaluation (the official script ignores "
                                                   "it too)"),
)


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
        dataset = build_image_folder(args.data_path, "train", pretrain_transform(args.input_size, args.fast_decode))
        _logger.info("data: %d images in %d classes under %s", len(dataset), len(dataset.classes), dataset.root)
        return dataset
    _logger.info("No --data_path given: demo run on %d embedded scikit-image photos (%s), %d random %d-px crops "
                 "per epoch. For real pretraining pass --data_path /path/to/imagenet.",
                 len(EMBEDDED_PHOTO_NAMES), ", ".join(EMBEDDED_PHOTO_NAMES), args.embedded_samples, args.input_size)
    return EmbeddedPhotos("train", args.input_size, args.embedded_samples)


def make_loss_fn(args: argparse.Namespace, rank: int, device: torch.device):
    """FCMAE loss on a micro-batch; the mask is drawn on ``device``, seeded by (seed, epoch, iteration, rank)."""

    def fcmae_loss(model, batch, step: Step):
        images = batch[0].to(device, non_blocking=True)
        num_cells = (images.shape[2] // 32) * (images.shape[3] // 32)
        mask_rng = generator(derive_seed(args.seed, step.epoch, step.iteration, rank), device)
        mask = fcmae.random_masking(images.shape[0], num_cells, args.mask_ratio, generator=mask_rng, device=device)
        loss, _, _ = model(images, mask, check_mask=False)  # drawn as the model draws it: not read
        return loss, {}

    return fcmae_loss


def make_export(args: argparse.Namespace, visuals: tuple[torch.Tensor, torch.Tensor]):
    """With each epoch checkpoint: the encoder (timm names) and the reconstruction grid."""

    def export(model, epochs_done: int, tensorboard: TensorBoardWriter) -> None:
        output_dir = Path(args.output_dir)
        save_safetensors(encoder_export_state(model.encoder), output_dir / ENCODER_EXPORT,
                         {"model_name": args.model, "format": "timm", "epochs": str(epochs_done)})
        grid = visualize_reconstructions(model, *visuals)
        save_png(grid, output_dir / "reconstruction.png")
        tensorboard.image("reconstruction", grid, epochs_done)
        tensorboard.flush()
        _logger.info("saved %s and reconstruction.png", ENCODER_EXPORT)

    return export


def make_knn_evaluation(args: argparse.Namespace, info: DistributedInfo):
    """Task.evaluate for --knn_data_path: k-NN top-1 at the --knn_freq epochs (and the last), else nothing."""
    monitor = build_knn_monitor(args, info.device)
    if monitor is None:
        return None

    def evaluate(model, ema_model, epochs_done: int) -> dict:
        return monitor.evaluate(model.encoder) if monitor.due(epochs_done, args.epochs) else {}

    return evaluate


def build_task(args: argparse.Namespace, info: DistributedInfo) -> Task:
    dataset = build_dataset(args)
    return Task(
        train_set=dataset,
        build_model=lambda: fcmae.build_fcmae(args.model, args.backend, args.mask_ratio, args.decoder_embed_dim,
                                              args.decoder_depth, args.norm_pix_loss,
                                              grad_checkpointing=args.grad_checkpointing),
        loss_fn=make_loss_fn(args, info.rank, info.device),
        recipe_blr=RECIPE_BLR,
        adamw_betas=ADAMW_BETAS,
        description=f"{args.model} ({args.backend} backend)",
        export=make_export(args, fixed_visual_batch(dataset, args.input_size, args.mask_ratio, args.seed, info.device))
        if info.is_main else None,  # python -m fcmae.visualize redraws the same picture from a checkpoint
        evaluate=make_knn_evaluation(args, info),
        epoch_summary=lambda record: f"knn_top1 {record['knn_top1']:.2f}%" if "knn_top1" in record else "",
    )


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    require_supported_versions(parser.prog)
    args = parse_and_validate(parser, argv, TRAINING_CHECKS + PRETRAIN_CHECKS + KNN_MONITOR_CHECKS,
                              demo_argv=["--config", str(DEMO_CONFIG)])
    return launch(parser, args, lambda info: run_training(args, info, build_task(args, info)))


if __name__ == "__main__":
    main()
