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
with timm names, for finetune.py or timm) and reconstruction.png with each epoch checkpoint, and
TensorBoard events (--log_dir, default <output_dir>/tensorboard).
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
from engine.checkpoint import save_safetensors
from engine.cli import parse_and_validate
from engine.config import Check, TRAINING_CHECKS, add_training_arguments
from engine.data import EMBEDDED_PHOTO_NAMES, EmbeddedPhotos, build_image_folder, pretrain_transform
from engine.distributed import DistributedInfo
from engine.logging import TensorBoardWriter
from engine.loop import Step
from engine.runner import Task, launch, run_training
from engine.seeding import derive_seed, generator
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
    """FCMAE loss on a micro-batch; the mask is drawn on ``device``, seeded by (seed, epoch, iteration, rank)."""

    def fcmae_loss(model, batch, step: Step):
        images = batch[0].to(device, non_blocking=True)
        num_cells = (images.shape[2] // 32) * (images.shape[3] // 32)
        mask_rng = generator(derive_seed(args.seed, step.epoch, step.iteration, rank), device)
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


def make_export(args: argparse.Namespace, visuals: tuple[torch.Tensor, torch.Tensor]):
    """With each epoch checkpoint: the encoder (timm names) and the reconstruction grid."""

    def export(model, epochs_done: int, tensorboard: TensorBoardWriter) -> None:
        output_dir = Path(args.output_dir)
        save_safetensors(model.encoder.state_dict(), output_dir / ENCODER_EXPORT,
                         {"model_name": args.model, "format": "timm", "epochs": str(epochs_done)})
        grid = visualize_reconstructions(model, *visuals)
        save_png(grid, output_dir / "reconstruction.png")
        tensorboard.image("reconstruction", grid, epochs_done)
        tensorboard.flush()
        _logger.info("saved %s and reconstruction.png", ENCODER_EXPORT)

    return export


def build_task(args: argparse.Namespace, info: DistributedInfo) -> Task:
    dataset = build_dataset(args)
    return Task(
        train_set=dataset,
        build_model=lambda: fcmae.build_fcmae(args.model, args.backend, args.mask_ratio, args.decoder_embed_dim,
                                              args.decoder_depth, args.norm_pix_loss),
        loss_fn=make_loss_fn(args, info.rank, info.device),
        recipe_blr=RECIPE_BLR,
        adamw_betas=ADAMW_BETAS,
        description=f"{args.model} ({args.backend} backend)",
        export=make_export(args, visual_batch(dataset, args, info.device)) if info.is_main else None,
    )


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = not argv
    if demo:
        argv = ["--config", str(DEMO_CONFIG)]
    parser = build_parser()
    args = parse_and_validate(parser, argv, TRAINING_CHECKS + PRETRAIN_CHECKS)
    intro = f"No arguments: demonstration run with {DEMO_CONFIG.name}, writing to {args.output_dir}" if demo else None
    return launch(parser, args, lambda info: run_training(args, info, build_task(args, info)), intro)


if __name__ == "__main__":
    main()
