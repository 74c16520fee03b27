"""Labelled data for fine-tuning: train/val image folders or WebDataset shards, or the embedded photos.

Folders: training images under ``<data_path>/train`` (or ``<data_path>`` itself when it holds
the class folders), validation images under ``<eval_data_path>/val`` or ``<eval_data_path>``,
else ``<data_path>/val``. Both splits must have the same class folders: a label is the index
of its folder name in sorted order, so a class missing from one split would silently shift
every later label. Images outside class folders, or a file list, give no labels: such a
``--data_path`` is a configuration error naming the layout expected.

Shards (``engine.shards``: a brace pattern of ``.tar`` files, a list of them, ``pipe:COMMAND``),
for ``--data_path`` and/or ``--eval_data_path``: labels from each sample's ``.cls``, class names
from ``classes.txt`` beside the shards (else the label numbers); the two splits' class names
must match as for folders.

Without ``--data_path``: engine's ``EmbeddedPhotos`` (8 scikit-image photographs, label = which
photo), training and validation crops drawn with different seeds.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from engine.class_folders import check_same_classes
from engine.config import ConfigError
from engine.data import (EMBEDDED_PHOTO_NAMES, EmbeddedPhotos, build_image_folder, build_labelled_shards,
                         resolve_image_root)
from engine.shards import ShardIndexCache, is_shard_source

_logger = logging.getLogger(__name__)


def validation_root(data_path: Optional[str], eval_data_path: Optional[str]) -> Path:
    """Folder of the validation class folders; ConfigError naming the flags if there is none."""
    if eval_data_path is not None:
        return resolve_image_root(eval_data_path, "val")
    if data_path is not None and (Path(data_path) / "val").is_dir():
        return Path(data_path) / "val"
    raise ConfigError(f"--data_path {data_path}: no val/ folder for evaluation; add <data_path>/val/<class>/... "
                      "or pass --eval_data_path /path/to/val")


def build_datasets(args: argparse.Namespace, train_transform: Optional[Callable], eval_transform: Callable,
                   train_cache: Optional[ShardIndexCache] = None, val_cache: Optional[ShardIndexCache] = None
                   ) -> tuple[Optional[Dataset], Dataset, list[str]]:
    """(train dataset or None when ``train_transform`` is None, val dataset, class names); shard
    indexes are reused through ``train_cache`` / ``val_cache``."""
    if args.data_path is None and args.eval_data_path is None:
        _logger.info("No --data_path given: demo run on the %d embedded scikit-image photos (%s); label = which "
                     "photo, %d training and %d validation crops of %d px. For real fine-tuning pass "
                     "--data_path /path/to/imagenet.", len(EMBEDDED_PHOTO_NAMES), ", ".join(EMBEDDED_PHOTO_NAMES),
                     args.embedded_samples, embedded_val_samples(args), args.input_size)
        train = EmbeddedPhotos("train", args.input_size, args.embedded_samples, train_transform) \
            if train_transform is not None else None
        val = EmbeddedPhotos("val", args.input_size, embedded_val_samples(args), eval_transform)
        return train, val, list(val.classes)

    if is_shard_source(args.eval_data_path):
        val = build_labelled_shards(args.eval_data_path, eval_transform, False, val_cache, "--eval_data_path")
    else:  # substitute_unreadable=False: no image counted twice
        val = build_image_folder(validation_root(args.data_path, args.eval_data_path), "val", eval_transform,
                                 substitute_unreadable=False)
    if train_transform is None:
        _logger.info("validation: %d images in %d classes under %s", len(val), len(val.classes), val.root)
        return None, val, list(val.classes)
    if args.data_path is None:
        raise ConfigError("--data_path is required for training (--eval_data_path alone is enough only with --eval)")
    train = build_labelled_shards(args.data_path, train_transform, shard_cache=train_cache) \
        if is_shard_source(args.data_path) else build_image_folder(args.data_path, "train", train_transform)
    check_same_classes(train.classes, val.classes, "train", "val", f" ({len(train.classes)} classes in "
                       f"{train.root}, {len(val.classes)} in {val.root})")
    _logger.info("data: %d training images under %s, %d validation images under %s, %d classes",
                 len(train), train.root, len(val), val.root, len(train.classes))
    return train, val, list(train.classes)


def embedded_val_samples(args: argparse.Namespace) -> int:
    """Validation crops of the embedded photos: half as many as training crops, at least 8 per photo."""
    return max(args.embedded_samples // 2, 8 * len(EMBEDDED_PHOTO_NAMES))
