"""FCMAE pretraining of ConvNeXt V2, on one process or many (torchrun, one or many nodes).

    python pretrain.py                     # no arguments: a few-minute CPU demo on embedded photos
    python pretrain.py --config configs/pretrain_atto.yaml --data_path /data/imagenet --update_freq 16
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain_base.yaml \\
        --data_path /data/imagenet
    # several nodes: add --nnodes=N --node_rank=R --rdzv_endpoint=HOST:PORT to torchrun

Effective batch = batch_size * update_freq * world_size (the recipe uses 4096); the lr is
blr * effective batch / 256 unless --lr is given. Rerunning the same command resumes from the
newest valid checkpoint in --output_dir (--auto_resume, on by default), mid-epoch ones included.
SIGTERM / SIGUSR1 checkpoint at the next optimizer update and exit with code 3 (engine.runner).
--init_from FILE starts a new run from earlier weights (continued pretraining, fcmae.init_from);
--stem_stride 2 (mask patch 16) suits small images; --in_chans sets the image channels.

Writes to --output_dir (output/pretrain; the demo: output/pretrain_demo; --config configs/pretrain_<size>.yaml:
output/pretrain_<size>), on rank 0: config.yaml, train.log, metrics.jsonl (one JSON object per
epoch), checkpoint-<epoch>.pth (the last --save_ckpt_num) and checkpoint-<epoch>-<updates>.pth
inside epochs (--save_ckpt_steps / --save_ckpt_minutes), encoder.safetensors (encoder weights
with timm names, for finetune.py or timm), hub/ (the encoder as a timm model folder, engine.hub)
and reconstruction.png (python -m fcmae.visualize redraws it from any checkpoint) with each epoch
checkpoint, image_index.npz (the images of --data_path, reused by the next run while the folder
is unchanged; engine.index_cache) or shard_index.npz (the same for WebDataset shards,
engine.shards), TensorBoard events (--log_dir, default <output_dir>/tensorboard; the same to W&B
with --log_wandb and MLflow with --mlflow_uri: engine.trackers) and tracking.json.

--data_path: a folder of images in any layout (<data_path>/train if there is one), a text file
naming one image per line, or WebDataset shards (a brace pattern of .tar files, a list of them,
pipe:COMMAND); labels are not used (engine.data.build_pretraining_images).
"""
from __future__ import annotations

import argparse
import functools
import json
import importlib.util
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

import fcmae
from engine.checkpoint import PRETRAINING, other_kind_problem, save_safetensors
from engine.cli import parse_and_validate
from engine.compat import require_supported_versions
from engine.config import (OFFICIAL_LAUNCHER_FLAGS, BooleanFlag, Check, ConfigError, OfficialFlag, TRAINING_CHECKS,
                           build_training_parser, optional_path)
from engine.data import (EMBEDDED_PHOTO_NAMES, EmbeddedPhotos, build_pretraining_images, reads_streamed_shards,
                         to_device)
from engine.distributed import DistributedInfo
from engine.eval_transform import timm_eval_config
from engine.hub import HUB_FOLDER, save_model_folder
from engine.index_cache import INDEX_CACHE_NAME, IndexCache
from engine.normalization import resolve_normalization
from engine.loop import Step
from engine.runner import Task, launch, run_training
from engine.shards import SHARD_INDEX_NAME, ShardIndexCache, check_stream_workers
from engine.trackers import Trackers
from fcmae.knn_monitor import KNN_MONITOR_CHECKS, build_knn_monitor
from fcmae.visualize import fixed_visual_batch, save_png, visualize_reconstructions
from models import BACKENDS, create_dense_model, encoder_export_state
from models.convnextv2 import DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE

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
    group.add_argument("--mask_ratio", type=float, default=0.6,
                       help="fraction of the mask patches (32x32 pixels, 16x16 with --stem_stride 2) hidden")
    group.add_argument("--norm_pix_loss", action=BooleanFlag, default=True,
                       help="normalise each target patch by its mean/std")
    group.add_argument("--decoder_depth", type=int, default=1, help="ConvNeXt V2 blocks in the decoder")
    group.add_argument("--decoder_embed_dim", type=int, default=512, help="decoder width")
    group.add_argument("--stem_stride", type=int, metavar="{4,2}", default=DEFAULT_STEM_STRIDE,
                       help="stem conv kernel and stride (timm's patch_size): 4 as in the paper (mask patch 32), "
                            "2 for small images (mask patch 16)")
    group.add_argument("--in_chans", type=int, default=DEFAULT_IN_CHANS,
                       help="image channels: 3 (RGB), 1 (grayscale, 8 or 16 bits), N (.npy arrays, multi-page TIFFs)")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                       help="per-channel mean of the normalisation, one value per --in_chans channel (default: "
                            "ImageNet's for 3 channels, else measured on 256 images of the data; stored with the run)")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                       help="per-channel std of the normalisation (default: as --mean)")
    group.add_argument("--init_from", type=optional_path, default=None, metavar="FILE",
                       help="start a new run from these weights (continued pretraining): any file "
                            "models.load_pretrained reads; its decoder too where it fits; a stem of another stride or "
                            "channel count is adapted. Ignored when --output_dir already holds a checkpoint "
                            "(auto-resume continues that run) (default: random initialisation)")
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
    Check("--input_size", lambda a: a.stem_stride != 4 or a.input_size % 32 == 0,
          "must be a multiple of 32 (the FCMAE patch size), e.g. 224; or use --stem_stride 2 (patch 16)"),
    Check("--input_size", lambda a: a.stem_stride != 2 or a.input_size % 16 == 0,
          "must be a multiple of 16 (the FCMAE patch size with --stem_stride 2), e.g. 96"),
    Check("--stem_stride", lambda a: a.stem_stride in (4, 2), "must be 4 (the paper's stem) or 2 (small images)"),
    Check("--in_chans", lambda a: a.in_chans >= 1, "must be >= 1 (3 for RGB, 1 for grayscale)"),
    Check("--in_chans", lambda a: a.in_chans == 3 or a.data_path is not None,
          "needs --data_path: the embedded demo photos are RGB"),
    Check("--in_chans", lambda a: a.in_chans == 3 or a.knn_data_path is None,
          "the k-NN monitor reads RGB class folders; leave --knn_data_path out for other channel counts"),
    Check("--fast_decode", lambda a: not a.fast_decode or a.in_chans == 3,
          "decodes 3-channel JPEGs only; leave it out with --in_chans other than 3"),
    Check("--mean", lambda a: (a.mean is None) == (a.std is None), "give --mean and --std together, or neither"),
    Check("--mean", lambda a: a.mean is None or len(a.mean) == a.in_chans, "needs one value per --in_chans channel"),
    Check("--std", lambda a: a.std is None or (len(a.std) == a.in_chans and min(a.std) > 0),
          "needs one value > 0 per --in_chans channel"),
    Check("--init_from", lambda a: a.init_from is None or Path(a.init_from).is_file(), "no such file"),
    Check("--init_from", lambda a: a.init_from is None or a.resume is None,
          "cannot be combined with --resume: --resume continues a run (weights, optimizer, epoch), --init_from starts "
          "a new one from weights alone; drop one of them"),
    Check("--mask_ratio", lambda a: 0.0 <= a.mask_ratio < 1.0,
          "must be in [0, 1): the fraction of patches hidden (the paper uses 0.6)"),
    Check("--decoder_depth", lambda a: a.decoder_depth >= 1, "must be >= 1 (the paper uses 1)"),
    Check("--decoder_embed_dim", lambda a: a.decoder_embed_dim >= 1, "must be >= 1 (the paper uses 512)"),
    Check("--backend", lambda a: a.backend != "minkowski" or importlib.util.find_spec("MinkowskiEngine") is not None,
          "MinkowskiEngine is not installed; build it with scripts/install_minkowski.sh or use --backend sparse"),
)


def build_dataset(args: argparse.Namespace, index_cache: Optional[IndexCache] = None,
                  shard_cache: Optional[ShardIndexCache] = None):
    """The images of --data_path (a folder in any layout, ``<data_path>/train``, a file list, or
    WebDataset shards; scanned or indexed once per run, reused through ``index_cache`` /
    ``shard_cache``), or the embedded photos (announced in the log)."""
    if args.data_path is not None:
        dataset, (mean, std) = build_pretraining_images(args.data_path, args.input_size, args.fast_decode,
                                                        args.in_chans, args.mean, args.std, index_cache, shard_cache)
        args.mean, args.std = list(mean), list(std)  # stored with the run (config.yaml, checkpoints, export)
        return dataset
    args.mean, args.std = (list(values) for values in resolve_normalization(3))  # the photos: ImageNet's
    _logger.info("No --data_path given: demo run on %d embedded scikit-image photos (%s), %d random %d-px crops "
                 "per epoch. For real pretraining pass --data_path /path/to/imagenet.",
                 len(EMBEDDED_PHOTO_NAMES), ", ".join(EMBEDDED_PHOTO_NAMES), args.embedded_samples, args.input_size)
    return EmbeddedPhotos("train", args.input_size, args.embedded_samples)


def make_loss_fn(device: torch.device):
    """FCMAE loss on a micro-batch. The model draws its own mask on ``device`` from the default
    generator, which the training loop reseeds from (seed, epoch, iteration, rank) per micro-batch."""

    def fcmae_loss(model, batch, step: Step):
        loss, _, _ = model(to_device(batch[0], device))
        return loss, {}

    return fcmae_loss


def make_export(args: argparse.Namespace, images: torch.Tensor):
    """With each epoch checkpoint: the encoder (timm names; its stem stride and channel count as
    metadata), the same encoder as a timm model folder (``<output_dir>/hub``, ``engine.hub``) and the
    reconstruction grid of ``images`` (masks drawn from --seed), which also goes to the trackers;
    after the last epoch the encoder file goes to the trackers too (MLflow's artifacts)."""
    latest_knn: dict = {}  # the last k-NN evaluation, for the model card

    def export(model, record: dict, trackers: Trackers) -> None:
        output_dir, epochs_done = Path(args.output_dir), record["epoch"]
        encoder_state = encoder_export_state(model.encoder)
        save_safetensors(encoder_state, output_dir / ENCODER_EXPORT,
                         {"model_name": args.model, "format": "timm", "epochs": str(epochs_done),
                          "stem_stride": str(args.stem_stride), "in_chans": str(args.in_chans),
                          "mean": json.dumps(args.mean), "std": json.dumps(args.std)})
        if "knn_top1" in record:
            latest_knn.update(top1=record["knn_top1"], epoch=epochs_done)
        save_encoder_folder(args, encoder_state, record, latest_knn)
        grid = visualize_reconstructions(model, images, args.seed, mean=args.mean, std=args.std)
        save_png(grid, output_dir / "reconstruction.png")
        trackers.image("reconstruction", grid, record["updates"])
        trackers.flush()
        if epochs_done == args.epochs:
            trackers.artifact(output_dir / ENCODER_EXPORT)
        _logger.info("saved %s, %s/ and reconstruction.png", ENCODER_EXPORT, HUB_FOLDER)

    return export


def save_encoder_folder(args: argparse.Namespace, encoder_state: dict, record: dict, latest_knn: dict) -> None:
    """``<output_dir>/hub``: the encoder as timm's ``num_classes=0`` model, with the run's input
    size and normalisation as its preprocessing and a model card of the run."""
    encoder = create_dense_model(args.model, args.stem_stride, args.in_chans, num_classes=0)
    encoder.load_state_dict(encoder_state)
    facts = {"Model": f"{args.model} encoder, stem stride {args.stem_stride}, {args.in_chans} input channels; "
                      "num_classes=0: the model returns pooled, head-normalised features",
             "Pretraining": f"FCMAE, mask ratio {args.mask_ratio}, {record['epoch']} of {args.epochs} epochs "
                            f"({record['updates']} optimizer updates)",
             "Data": args.data_path or "the scikit-image sample photographs (demo)",
             "Input": f"{args.input_size} px, mean {format_values(args.mean)}, std {format_values(args.std)}"}
    if "loss" in record:
        facts["Final loss"] = f"{record['loss']:.4f} (epoch {record['epoch']}, masked-pixel MSE)"
    if latest_knn:
        facts["k-NN top-1"] = (f"{latest_knn['top1']:.2f}% on {args.knn_data_path} (epoch {latest_knn['epoch']}, "
                               f"k={args.knn_k})")
    save_model_folder(encoder, Path(args.output_dir) / HUB_FOLDER, args.model, args.input_size,
                      timm_eval_config(args.input_size, mean=args.mean, std=args.std), "fcmae",
                      f"{args.model} FCMAE encoder", facts)


def build_model(args: argparse.Namespace) -> fcmae.FCMAE:
    """The FCMAE of the flags, freshly initialised."""
    return fcmae.build_fcmae(args.model, args.backend, args.mask_ratio, args.decoder_embed_dim, args.decoder_depth,
                             args.norm_pix_loss, grad_checkpointing=args.grad_checkpointing,
                             stem_stride=args.stem_stride, in_chans=args.in_chans)


def apply_init_from(args: argparse.Namespace, model: fcmae.FCMAE, resumed_from: Optional[str] = None) -> None:
    """--init_from: a fresh run starts from that file's weights (the encoder; the decoder parts
    whose shapes fit); a run that resumes a checkpoint (auto-resume wins) leaves them alone."""
    if resumed_from is not None:
        _logger.info("--init_from %s not applied: the run resumes from %s (start in an empty --output_dir to "
                     "initialise from the file)", args.init_from, resumed_from)
        return
    try:
        report = fcmae.init_from(model, args.init_from)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"--init_from {args.init_from}: {error}") from error
    for line in report.lines():
        _logger.info("%s", line)


def make_knn_evaluation(args: argparse.Namespace, info: DistributedInfo):
    """Task.evaluate for --knn_data_path: k-NN top-1 at the --knn_freq epochs (and the last), else nothing."""
    monitor = build_knn_monitor(args, info.device)
    if monitor is None:
        return None

    def evaluate(model, ema_model, epochs_done: int, should_stop) -> dict:
        return monitor.evaluate(model.encoder, should_stop) if monitor.due(epochs_done, args.epochs) else {}

    return evaluate


def format_values(values) -> str:
    return " ".join(f"{value:.6g}" for value in values)


def make_checkpoint_check(args: argparse.Namespace, streamed: bool = False):
    """ConfigError if a checkpoint to resume is finetune.py's (a classifier, not an FCMAE), or was
    trained with another stem stride or channel count (or, ``streamed`` shards, another number of
    loader workers)."""

    def check_checkpoint_fits(path, state: dict, advice: str) -> None:
        problem = other_kind_problem(path, state, PRETRAINING, resumed=args.resume is not None)
        if problem:
            remedy = (f"pass a checkpoint of pretrain.py to --resume (finetune.py --eval --resume {path} evaluates "
                      "this one)" if args.resume else "pretrain into another --output_dir")
            raise ConfigError(f"{problem}; {remedy}")
        saved = state.get("config", {})
        if streamed:
            check_stream_workers(path, saved, args.num_workers, advice)
        for flag, default in (("stem_stride", DEFAULT_STEM_STRIDE), ("in_chans", DEFAULT_IN_CHANS)):
            value = saved.get(flag, default)
            if value != getattr(args, flag):
                raise ConfigError(f"--{flag} {getattr(args, flag)}: checkpoint {path} was trained with --{flag} "
                                  f"{value}; use --{flag} {value} {advice}")
        if saved.get("mean") is not None and not torch.allclose(torch.tensor(saved["mean"] + saved["std"]),
                                                                torch.tensor(args.mean + args.std)):
            raise ConfigError(f"checkpoint {path} was trained with --mean {format_values(saved['mean'])} --std "
                              f"{format_values(saved['std'])}, but this run normalises with --mean "
                              f"{format_values(args.mean)} --std {format_values(args.std)} (the data changed?); "
                              f"pass the checkpoint's values to continue it, {advice}")

    return check_checkpoint_fits


def build_task(args: argparse.Namespace, info: DistributedInfo) -> Task:
    index_cache = IndexCache(Path(args.output_dir) / INDEX_CACHE_NAME)
    shard_cache = ShardIndexCache(Path(args.output_dir) / SHARD_INDEX_NAME)
    dataset = build_dataset(args, index_cache, shard_cache)
    return Task(
        train_set=dataset,
        build_model=lambda: build_model(args),
        prepare_weights=functools.partial(apply_init_from, args) if args.init_from is not None else None,
        loss_fn=make_loss_fn(info.device),
        recipe_blr=RECIPE_BLR,
        adamw_betas=ADAMW_BETAS,
        description=f"{args.model} ({args.backend} backend, stem stride {args.stem_stride}, {args.in_chans} channels)",
        check_checkpoint=make_checkpoint_check(args, reads_streamed_shards(dataset)),
        # python -m fcmae.visualize redraws the same picture from a checkpoint
        export=make_export(args, fixed_visual_batch(dataset, args.input_size, info.device, in_chans=args.in_chans,
                                                    mean=args.mean, std=args.std)) if info.is_main else None,
        # the scan or the shard index, for the next run
        outputs_opened=(lambda: (index_cache.save_pending(), shard_cache.save_pending())) if info.is_main else None,
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
