"""Supervised fine-tuning of ConvNeXt V2 from FCMAE (or any) weights, on one process or many.

    python finetune.py                     # no arguments: a short CPU demo on embedded photos
    python finetune.py --config configs/finetune_atto.yaml --finetune output/pretrain_atto/encoder.safetensors \\
        --data_path /data/imagenet --update_freq 32
    torchrun --nproc_per_node=8 finetune.py --config configs/finetune_base.yaml --update_freq 4 \\
        --finetune convnextv2_base_1k_224_fcmae.pt --data_path /data/imagenet --dist_eval
    python finetune.py --eval --resume output/finetune_atto/checkpoint-best-ema.pth \\
        --data_path /data/imagenet

Recipes (configs/finetune_<size>.yaml): AdamW, lr = blr * effective batch / 256 with per-update
warmup + cosine, layer-wise lr decay, drop path, RandAugment, random erasing, Mixup/CutMix,
label smoothing, EMA of the weights evaluated each epoch, AMP. ``--finetune`` takes any layout
``models.load_pretrained`` reads; the classifier is always new (``--nb_classes``, default: the
number of class folders). Rerunning a command resumes from the newest valid checkpoint in
``--output_dir`` (``--auto_resume``, on by default), mid-epoch ones included; SIGTERM / SIGUSR1
checkpoint at the next optimizer update and exit with code 3 (engine.runner).

Writes to --output_dir (output/finetune; the demo: output/finetune_demo; --config configs/finetune_<size>.yaml:
output/finetune_<size>), on rank 0: config.yaml, train.log, metrics.jsonl (one JSON object per
epoch), checkpoint-<epoch>.pth (the last --save_ckpt_num), checkpoint-<epoch>-<updates>.pth
inside epochs (--save_ckpt_steps / --save_ckpt_minutes), checkpoint-best.pth and
checkpoint-best-ema.pth (weights of the best top-1 epoch, loadable with --finetune / --resume /
models.load_pretrained), hub/ (the best of those weights as a timm model folder: class names and the
evaluation preprocessing included, engine.hub), shard_index.npz / shard_index_val.npz (the index of
WebDataset shards given as --data_path / --eval_data_path, reused by the next run; engine.shards)
and TensorBoard events (--log_dir, default <output_dir>/tensorboard).
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from engine.checkpoint import FINE_TUNING, atomic_write, latest_valid_checkpoint, other_kind_problem
from engine.class_folders import check_same_classes
from engine.cli import parse_and_validate
from engine.compat import require_supported_versions
from engine.config import (OFFICIAL_LAUNCHER_FLAGS, BooleanFlag, Check, ConfigError, OfficialFlag, TRAINING_CHECKS,
                           build_training_parser, config_dict, optional_path, parse_bool)
from engine.data import build_loader, reads_streamed_shards, to_device
from engine.distributed import DistributedInfo
from engine.eval_transform import build_eval_transform, timm_eval_config
from engine.hub import HUB_FOLDER, save_model_folder
from engine.loop import Step
from engine.runner import Task, launch, run_training
from engine.shards import SHARD_INDEX_NAME, ShardIndexCache, check_stream_workers, is_shard_source
from engine.signals import workers_ignore_stop_signals
from finetune.data import build_datasets
from finetune.evaluate import evaluate
from finetune.mixup import MIXUP_MODES, build_mixup, build_train_criterion
from finetune.model import build_finetune_model
from finetune.transforms import build_train_transform
from models import MODEL_CONFIGS, convert_to_timm, load_pretrained, stem_geometry, total_stride
from models.checkpoint import read_checkpoint
from models.layer_decay import DECAY_TYPES, param_groups_layer_decay

_logger = logging.getLogger("finetune")

CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = CONFIGS / "finetune_demo.yaml"
DEMO_PRETRAINED = Path("output/pretrain_demo/encoder.safetensors")  # what `python pretrain.py` writes
VAL_SHARD_INDEX_NAME = "shard_index_val.npz"
RECIPE_BLR = 6.25e-4  # ConvNeXt V2-Base fine-tuning recipe (the parser's defaults are that recipe)
ADAMW_BETAS = (0.9, 0.999)
BEST_CHECKPOINTS = {"model": "checkpoint-best.pth", "ema": "checkpoint-best-ema.pth"}


def build_parser() -> argparse.ArgumentParser:
    parser = build_training_parser("Fine-tune ConvNeXt V2 on an image folder.", DEMO_CONFIG,
                                   "the convnextv2_base recipe, as are the other defaults", RECIPE_BLR,
                                   "configs/finetune_<size>.yaml")
    model = parser.add_argument_group("fine-tuning")
    model.add_argument("--finetune", type=optional_path, default=None,
                       help="initial weights: any checkpoint models.load_pretrained reads (ours, encoder.safetensors, "
                            "official FCMAE / fine-tuned / MinkowskiEngine) (default: random initialisation)")
    model.add_argument("--stem_stride", type=int, metavar="{4,2}", default=None,
                       help="stem conv kernel and stride (timm's patch_size): 4 as in the paper, 2 for small images; "
                            "another than the --finetune checkpoint's adapts its stem (default: the checkpoint's, "
                            "else 4)")
    model.add_argument("--in_chans", type=int, default=None,
                       help="image channels; another than the checkpoint's adapts its stem (default: the "
                            "checkpoint's, else 3)")
    model.add_argument("--nb_classes", type=int, default=None,
                       help="classifier outputs (default: the number of class folders)")
    model.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    model.add_argument("--layer_decay", type=float, default=0.6, help="layer-wise lr decay factor (1 = none)")
    model.add_argument("--layer_decay_type", choices=DECAY_TYPES, default="group",
                       help="single: one layer per block; group: stage 3 blocks in threes (depths 3,3,27,3)")
    model.add_argument("--model_ema", action=BooleanFlag, default=True,
                       help="keep an exponential moving average of the weights")
    model.add_argument("--model_ema_decay", type=float, default=0.9999, help="EMA decay per optimizer update")
    model.add_argument("--model_ema_eval", action=BooleanFlag, default=True,
                       help="evaluate the EMA weights every epoch and keep checkpoint-best-ema.pth")
    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    aug.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    aug.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    aug.add_argument("--cutmix_minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                     help="CutMix box ratio min and max, overriding --cutmix alpha (default: off)")
    aug.add_argument("--mixup_prob", type=float, default=1.0, help="probability of Mixup or CutMix per batch")
    aug.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of CutMix instead of Mixup")
    aug.add_argument("--mixup_mode", choices=MIXUP_MODES, default="batch", help="mix per batch, pair or element")
    aug.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('' for none)")
    aug.add_argument("--color_jitter", type=float, default=0.4, help="colour jitter (timm ignores it with --aa)")
    aug.add_argument("--train_interpolation", choices=("bicubic", "bilinear", "random"), default="bicubic",
                     help="resize interpolation of the training crops")
    aug.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    aug.add_argument("--remode", choices=("pixel", "rand", "const"), default="pixel", help="random erasing fill")
    aug.add_argument("--recount", type=int, default=1, help="random erasing boxes")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_data_path", type=str, default=None,
                            help="validation folder (default: <data_path>/val)")
    evaluation.add_argument("--crop_pct", type=float, default=None,
                            help="eval: resize to input_size / crop_pct, center-crop (default: 0.875; "
                                 "from 384 px a plain resize; with --eval, the checkpoint's)")
    evaluation.add_argument("--eval", action=BooleanFlag, default=False,
                            help="only evaluate: --resume, else --finetune, else the newest checkpoint in "
                                 "--output_dir; --model, --input_size and --crop_pct default to the checkpoint's")
    evaluation.add_argument("--dist_eval", action=BooleanFlag, default=True,
                            help="split evaluation across processes (exact counts); off: each evaluates all")
    parser.set_defaults(batch_size=32, epochs=100, warmup_epochs=20, weight_decay=0.05, save_ckpt_freq=1,
                        output_dir="./output/finetune")
    parser.add_official_flags(OFFICIAL_FINETUNE_FLAGS)
    return parser


OFFICIAL_FINETUNE_FLAGS = OFFICIAL_LAUNCHER_FLAGS + (
    OfficialFlag(("--model_ema_force_cpu",), parse_bool, (False,), "the EMA weights stay on the training device"),
    OfficialFlag(("--warmup_steps",), int, (-1,), "unused by the official fine-tuning script too; use --warmup_epochs"),
    OfficialFlag(("--weight_decay_end",), float, (None,), "unused by the official fine-tuning script too"),
    OfficialFlag(("--resplit",), parse_bool, (False,), "unused by the official fine-tuning script too"),
    OfficialFlag(("--momentum",), float, (0.9,), "SGD momentum; unused with AdamW, as in the official script"),
    OfficialFlag(("--opt",), str, ("adamw",), "AdamW is the optimizer (the recipe's)", changes_recipe=True),
    OfficialFlag(("--opt_eps",), float, (1e-8,), "AdamW eps is 1e-8", changes_recipe=True),
    OfficialFlag(("--opt_betas",), float, (None, [0.9, 0.999]), "AdamW betas are 0.9 0.999", changes_recipe=True,
                 nargs="+"),
    OfficialFlag(("--head_init_scale",), float, (0.001,),
                 "the new head is initialised with std 2e-5 (0.02 x 0.001, the official default)", changes_recipe=True),
    OfficialFlag(("--model_key",), str, ("model|module",),
                 "--finetune finds the weights in the checkpoint by itself (model, state_dict, module)",
                 changes_recipe=True),
    OfficialFlag(("--model_prefix",), str, ("",), "--finetune strips known prefixes by itself", changes_recipe=True),
    OfficialFlag(("--imagenet_default_mean_and_std",), parse_bool, (True,), "the ImageNet mean and std are used",
                 changes_recipe=True),
    OfficialFlag(("--data_set",), str, ("IMNET", "image_folder"),
                 "--data_path is an image folder (<root>/train/<class>/*.jpg); convert other datasets to one",
                 changes_recipe=True),
    OfficialFlag(("--disable_eval",), parse_bool, (False,),
                 "fine-tuning evaluates every epoch, to keep checkpoint-best.pth", changes_recipe=True),
)


def _mixup_on(a: argparse.Namespace) -> bool:
    return a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None


def _is_file_or_none(path: Optional[str]) -> bool:
    return path is None or Path(path).is_file()


FINETUNE_CHECKS = (
    Check("--finetune", lambda a: _is_file_or_none(a.finetune), "no such checkpoint file"),
    Check("--data_path",
          lambda a: a.data_path is None or is_shard_source(a.data_path) or not Path(a.data_path).is_file(),
          "fine-tuning needs labels, which a file list does not give; pass a folder of class folders "
          "(<root>/train/<class>/<image>, <root>/val/<class>/<image>) or shards with .cls labels"),
    Check("--input_size", lambda a: a.stem_stride != 2 or a.input_size % 16 == 0,
          "must be a multiple of 16 (the total stride with --stem_stride 2), e.g. 96"),
    Check("--input_size", lambda a: a.stem_stride != 4 or a.input_size % 32 == 0,
          "must be a multiple of 32 (the total stride with --stem_stride 4), e.g. 224"),
    Check("--stem_stride", lambda a: a.stem_stride in (None, 4, 2),
          "must be 4 (the paper's stem) or 2 (small images), or left out to take the checkpoint's"),
    Check("--in_chans", lambda a: a.in_chans is None or a.in_chans >= 1, "must be >= 1 (3 for RGB, 1 for grayscale)"),
    Check("--eval_data_path",
          lambda a: a.eval_data_path is None or is_shard_source(a.eval_data_path) or Path(a.eval_data_path).is_dir(),
          "no such folder; give the validation folder (<path>/<class>/<image> or <path>/val/<class>/<image>) or "
          "shards with .cls labels"),
    Check("--nb_classes", lambda a: a.nb_classes is None or a.nb_classes >= 1,
          "must be >= 1, or leave it out to use the number of class folders"),
    Check("--drop_path", lambda a: 0 <= a.drop_path < 1, "must be in [0, 1), e.g. 0.1"),
    Check("--layer_decay", lambda a: 0 < a.layer_decay <= 1, "must be in (0, 1]; 1 turns layer-wise decay off"),
    Check("--model_ema_decay", lambda a: 0 < a.model_ema_decay < 1, "must be in (0, 1), e.g. 0.9999"),
    Check("--model_ema_eval", lambda a: a.model_ema or not a.model_ema_eval,
          "needs --model_ema; add it, or pass --no-model_ema_eval"),
    Check("--smoothing", lambda a: 0 <= a.smoothing < 1, "must be in [0, 1), e.g. 0.1"),
    Check("--mixup", lambda a: a.mixup >= 0, "must be >= 0 (0 turns Mixup off)"),
    Check("--cutmix", lambda a: a.cutmix >= 0, "must be >= 0 (0 turns CutMix off)"),
    Check("--mixup_prob", lambda a: 0 <= a.mixup_prob <= 1, "must be in [0, 1]"),
    Check("--mixup_switch_prob", lambda a: 0 <= a.mixup_switch_prob <= 1, "must be in [0, 1]"),
    Check("--cutmix_minmax", lambda a: a.cutmix_minmax is None or 0 <= a.cutmix_minmax[0] < a.cutmix_minmax[1] <= 1,
          "must be MIN MAX with 0 <= MIN < MAX <= 1 (box size as a fraction of the image), e.g. 0.2 0.8"),
    Check("--color_jitter", lambda a: a.color_jitter >= 0, "must be >= 0 (0 turns colour jitter off)"),
    Check("--batch_size", lambda a: not _mixup_on(a) or a.batch_size % 2 == 0,
          "must be even with Mixup/CutMix (images are mixed in pairs); or set --mixup 0 --cutmix 0"),
    Check("--reprob", lambda a: 0 <= a.reprob <= 1, "must be in [0, 1]"),
    Check("--recount", lambda a: a.recount >= 1, "must be >= 1"),
    Check("--crop_pct", lambda a: a.crop_pct is None or 0 < a.crop_pct <= 1, "must be in (0, 1], e.g. 0.875"),
)


def as_config_error(source, function, *args, **kwargs):
    """``function(*args, **kwargs)``, its ValueError (e.g. a checkpoint of another model size,
    which names the size it looks like) re-raised as ConfigError naming ``source``."""
    try:
        return function(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from error


def resolve_num_classes(args: argparse.Namespace, classes: list[str]) -> int:
    """--nb_classes, else the number of class folders; ConfigError if --nb_classes is too small."""
    if args.nb_classes is None:
        return len(classes)
    if args.nb_classes < len(classes):
        raise ConfigError(f"--nb_classes {args.nb_classes}: the data has {len(classes)} classes; "
                          f"use at least {len(classes)} or leave --nb_classes out")
    return args.nb_classes


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The model to fine-tune (``build_finetune_model``); ConfigError for a checkpoint that does not
    fit, or an --input_size that is no multiple of the total stride of the stem it ends up with."""
    model = as_config_error("--finetune", build_finetune_model, args.model, num_classes, args.finetune, args.drop_path,
                            grad_checkpointing=args.grad_checkpointing, stem_stride=args.stem_stride,
                            in_chans=args.in_chans)
    stem_stride, in_chans = stem_geometry(model.stem[0].weight)
    if args.input_size % total_stride(stem_stride):
        raise ConfigError(f"--input_size {args.input_size}: must be a multiple of {total_stride(stem_stride)}, the "
                          f"total stride of the model's stride-{stem_stride} stem (--stem_stride chooses another)")
    if in_chans != 3:
        raise ConfigError(f"--finetune {args.finetune}: a {in_chans}-channel encoder; fine-tuning reads RGB class "
                          "folders through timm's augmentations, which take 3 channels. Pass --in_chans 3 to adapt "
                          "its stem to RGB, or use its features (finetune.features.FeatureExtractor takes tensors "
                          "of any channel count)")
    return model


def make_loss_fn(mixup_fn, criterion, device: torch.device):
    """Classification loss on a micro-batch (Mixup/CutMix applied first when on)."""

    def classification_loss(model, batch, step: Step):
        images, targets = to_device(batch[0], device), to_device(batch[1], device)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        return criterion(model(images), targets), {}

    return classification_loss


def make_checkpoint_check(args: argparse.Namespace, num_classes: int, classes: list[str], streamed: bool = False):
    """ConfigError if a checkpoint to resume is pretrain.py's (it starts fine-tuning through
    --finetune instead), was made for another class list or head size (or, ``streamed`` shards,
    another number of loader workers)."""

    def check_checkpoint_fits(path, state: dict, advice: str) -> None:
        problem = other_kind_problem(path, state, FINE_TUNING, resumed=args.resume is not None)
        if problem:
            remedy = (f"start fine-tuning from it with --finetune {path} instead of --resume" if args.resume else
                      f"fine-tune into another --output_dir, with --finetune {path} to start from it")
            raise ConfigError(f"{problem}; {remedy}")
        if "classes" in state:
            check_same_classes(state["classes"], classes, "the checkpoint", "the data", f" (checkpoint {path})")
        if streamed:
            check_stream_workers(path, state.get("config", {}), args.num_workers, advice)
        head = state["model"].get("head.fc.weight")
        if head is not None and head.shape[0] != num_classes:
            raise ConfigError(f"checkpoint {path} has a {head.shape[0]}-class head but the model needs {num_classes} "
                              f"classes; pass --nb_classes {head.shape[0]} if that is right, {advice}")

    return check_checkpoint_fits


def evaluate_and_keep_best(evaluated: dict, val_loader, epochs_done: int, best: dict, args, classes: list[str],
                           info: DistributedInfo) -> dict:
    """Evaluate each of ``evaluated`` ({"model": ..., "ema": ...}); a new best top-1 replaces
    ``best[kind]`` and its weights are written (atomically) to checkpoint-best[-ema].pth, and to
    hub/ when no other kind is better. Returns the metrics as ``{"<kind>_acc1": ..., ...}``."""
    record = {}
    for kind, model in evaluated.items():
        results = {"epoch": epochs_done, **evaluate(model, val_loader, info.device, args.amp)}
        record.update({f"{kind}_{name}": value for name, value in results.items() if name != "epoch"})
        if results["acc1"] <= best.get(kind, {}).get("acc1", -1.0):
            continue
        best[kind] = results
        if info.is_main:
            name = BEST_CHECKPOINTS[kind]
            state = {"model": model.state_dict(), "epoch": epochs_done, "acc1": results["acc1"],
                     "acc5": results["acc5"], "classes": classes, "config": config_dict(args)}
            atomic_write(Path(args.output_dir) / name, lambda file: torch.save(state, file))
            _logger.info("new best %s top-1 %.2f%% at epoch %d -> %s", kind, results["acc1"], epochs_done, name)
            if results["acc1"] >= max(result["acc1"] for result in best.values()):
                save_classifier_folder(args, model, kind, results, classes)
    return record


def save_classifier_folder(args: argparse.Namespace, model: torch.nn.Module, kind: str, results: dict,
                           classes: list[str]) -> None:
    """``<output_dir>/hub``: the classifier with the best top-1 so far as a timm model folder: the
    class names when there is one per output, the evaluation transform as its preprocessing."""
    num_classes = model.num_classes
    facts = {"Model": f"{args.model} classifier, {num_classes} classes",
             "Fine-tuned from": args.finetune or "random initialisation",
             "Data": args.data_path or "the scikit-image sample photographs (demo)",
             "Weights": f"{'the EMA of the weights' if kind == 'ema' else 'the trained weights'} after epoch "
                        f"{results['epoch']} of {args.epochs}, the best validation top-1 so far",
             "Validation": f"top-1 {results['acc1']:.2f}%, top-5 {results['acc5']:.2f}% on {results['count']} images "
                           f"at {args.input_size} px"}
    save_model_folder(model, Path(args.output_dir) / HUB_FOLDER, args.model, args.input_size,
                      timm_eval_config(args.input_size, args.crop_pct), "fcmae_ft",
                      f"{args.model} classifier", facts,
                      label_names=classes if len(classes) == num_classes else None)


def build_val_loader(val_set, args, info: DistributedInfo):
    """In order, nothing dropped; split across ranks with --dist_eval, else whole on every rank."""
    rank, world_size = (info.rank, info.world_size) if args.dist_eval else (0, 1)
    loader = build_loader(val_set, args.batch_size, args.num_workers, args.seed, rank, world_size, info.device,
                          train=False, pin_memory=args.pin_mem)
    workers_ignore_stop_signals(loader)  # a stop signal during evaluation waits for the epoch's checkpoint
    return loader


def describe_validation(record: dict, best: dict) -> str:
    ema = f", EMA top-1 {record['ema_acc1']:.2f}%" if "ema_acc1" in record else ""
    return (f"val top-1 {record['model_acc1']:.2f}% top-5 {record['model_acc5']:.2f}%{ema} "
            f"(best {max(result['acc1'] for result in best.values()):.2f}%)")


def build_task(args: argparse.Namespace, info: DistributedInfo) -> Task:
    train_transform = build_train_transform(args.input_size, args.aa, args.color_jitter, args.reprob, args.remode,
                                            args.recount, args.train_interpolation, fast_decode=args.fast_decode)
    shard_caches = (ShardIndexCache(Path(args.output_dir) / SHARD_INDEX_NAME),
                    ShardIndexCache(Path(args.output_dir) / VAL_SHARD_INDEX_NAME))
    train_set, val_set, classes = build_datasets(args, train_transform, build_eval_transform(args.input_size,
                                                                                             args.crop_pct),
                                                 *shard_caches)
    num_classes = resolve_num_classes(args, classes)
    val_loader = build_val_loader(val_set, args, info)
    mixup_fn = build_mixup(num_classes, args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_prob,
                           args.mixup_switch_prob, args.mixup_mode, args.smoothing)
    depths = MODEL_CONFIGS[args.model][0]
    state = {"classes": classes, "best": {}}  # best results so far: {"model": {...}, "ema": {...}}

    def evaluate_epoch(model, ema_model, epochs_done: int, should_stop) -> dict:  # runs to its end
        evaluated = {"model": model, **({"ema": ema_model} if ema_model is not None and args.model_ema_eval else {})}
        return evaluate_and_keep_best(evaluated, val_loader, epochs_done, state["best"], args, classes, info)

    return Task(
        train_set=train_set,
        build_model=lambda: build_model(args, num_classes),
        loss_fn=make_loss_fn(mixup_fn, build_train_criterion(mixup_fn, args.smoothing), info.device),
        recipe_blr=RECIPE_BLR,
        adamw_betas=ADAMW_BETAS,
        description=(f"{args.model}: {num_classes} classes, layer decay {args.layer_decay_type} {args.layer_decay:.2f}, "
                     f"EMA {args.model_ema_decay if args.model_ema else 'off'}"),
        param_group_fn=lambda model: param_groups_layer_decay(model, depths, args.weight_decay, args.layer_decay,
                                                              args.layer_decay_type),
        ema_decay=args.model_ema_decay if args.model_ema else None,
        state=state,
        derived={"num_classes": num_classes},
        check_checkpoint=make_checkpoint_check(args, num_classes, classes, reads_streamed_shards(train_set)),
        # the shard indexes, for the next run
        outputs_opened=(lambda: [cache.save_pending() for cache in shard_caches]) if info.is_main else None,
        evaluate=evaluate_epoch,
        epoch_summary=lambda record: describe_validation(record, state["best"]),
    )


def finetune(args: argparse.Namespace, info: DistributedInfo) -> dict:
    """Train until --epochs, evaluating every epoch; returns the best results."""
    task = build_task(args, info)
    run_training(args, info, task)
    for kind, results in task.state["best"].items():
        _logger.info("best %s top-1 %.2f%% (top-5 %.2f%%) at epoch %d", kind, results["acc1"], results["acc5"],
                     results["epoch"])
    return task.state["best"]


EVAL_SETTINGS_FROM_CHECKPOINT = ("model", "input_size", "crop_pct")


def adopt_checkpoint_settings(args: argparse.Namespace, checkpoint) -> str:
    """--eval: the model, input size and crop the checkpoint was trained with (its saved
    configuration), unless the user set them; returns "--model X (source), ..." for the log."""
    saved = checkpoint.get("config", {}) if isinstance(checkpoint, dict) else {}
    used = []
    for dest in EVAL_SETTINGS_FROM_CHECKPOINT:
        if dest in args.set_by_user:
            source = "given"
        elif dest in saved:
            setattr(args, dest, saved[dest])
            source = "from the checkpoint"
        else:
            source = "default"
        used.append(f"--{dest} {getattr(args, dest)} ({source})")
    return ", ".join(used)


def evaluate_checkpoint(args: argparse.Namespace, info: DistributedInfo) -> dict:
    """--eval: top-1/top-5 of a fine-tuned checkpoint (and of its EMA weights when it has them)."""
    path = args.resume or args.finetune
    if path is None:
        found = latest_valid_checkpoint(args.output_dir) if args.auto_resume else None
        if found is None:
            raise ConfigError("--eval needs weights: pass --resume (a checkpoint of finetune.py) or --finetune "
                              f"(any fine-tuned checkpoint); there is none in --output_dir {args.output_dir}")
        path = found[0]
    raw = as_config_error(path, read_checkpoint, path)
    _logger.info("evaluating %s with %s", path, adopt_checkpoint_settings(args, raw))
    _, val_set, classes = build_datasets(args, None, build_eval_transform(args.input_size, args.crop_pct))
    if isinstance(raw, dict) and "classes" in raw:
        check_same_classes(raw["classes"], classes, "the checkpoint", "the data", f" (checkpoint {path})")
    head = as_config_error(path, convert_to_timm, raw, args.model).get("head.fc.weight")
    if head is None:
        raise ConfigError(f"checkpoint {path} has no classifier (an encoder only?); --eval needs fine-tuned weights. "
                          f"Fine-tune it first: --finetune {path} without --eval")
    num_classes = resolve_num_classes(args, classes)
    if head.shape[0] != num_classes:
        raise ConfigError(f"checkpoint {path} has a {head.shape[0]}-class head but the data has {len(classes)} "
                          f"classes{f' and --nb_classes is {args.nb_classes}' if args.nb_classes else ''}; "
                          f"pass --nb_classes {head.shape[0]} if the class folders are the first {len(classes)} "
                          "of the checkpoint's classes in sorted order, or evaluate on matching data")
    candidates = {"model": as_config_error(path, load_pretrained, args.model, path, num_classes=num_classes,
                                           stem_stride=args.stem_stride, in_chans=args.in_chans)}
    if isinstance(raw, dict) and "model_ema" in raw:
        candidates["ema"] = copy.deepcopy(candidates["model"])
        candidates["ema"].load_state_dict(raw["model_ema"])
    val_loader = build_val_loader(val_set, args, info)
    results = {}
    for kind, model in candidates.items():
        results[kind] = evaluate(model.to(info.device), val_loader, info.device, args.amp)
        _logger.info("%s weights of %s on %d images: top-1 %.2f%%, top-5 %.2f%%, loss %.4f", kind, path,
                     results[kind]["count"], results[kind]["acc1"], results[kind]["acc5"], results[kind]["loss"])
    return results


def demo_arguments() -> list[str]:
    """The demo's defaults: its config, and the pretraining demo's encoder if there is one."""
    argv = ["--config", str(DEMO_CONFIG)]
    if DEMO_PRETRAINED.is_file():
        argv += ["--finetune", str(DEMO_PRETRAINED)]
    return argv


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    require_supported_versions(parser.prog)
    args = parse_and_validate(parser, argv, TRAINING_CHECKS + FINETUNE_CHECKS, demo_argv=demo_arguments())
    intro = None
    if args.demo:
        intro = (f"starting from {args.finetune}" if args.finetune else
                 f"starting from random initialisation (run `python pretrain.py` first to start from its "
                 f"{DEMO_PRETRAINED})")
    return launch(parser, args, lambda info: (evaluate_checkpoint if args.eval else finetune)(args, info), intro)


if __name__ == "__main__":
    main()
