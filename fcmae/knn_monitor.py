"""k-NN monitor: how good the encoder's features are while FCMAE pretraining runs.

At chosen epochs the current encoder, run as timm's dense ConvNeXt V2 (eval mode, no mask, the
same parameter tensors: nothing is copied), embeds the images of a labelled folder's ``train/``
and ``val/`` splits with ``engine.embeddings.extract_pooled`` (the head's pre-logits; the head
LayerNorm, which the encoder does not have, is the identity, as for an encoder-only checkpoint),
and ``engine.knn`` (weighted k-NN, temperature 0.07) classifies val against train. The
labels are used by the monitor only. For a checkpoint of the same epoch, on the same images and
batch size, the top-1 equals ``python -m finetune.linear_probe``'s k-NN top-1.

Under DDP the batches are dealt out round-robin to the ranks and the features all-gathered; a
batch holds the same images whatever the world size, so the result equals the single-process one.

    monitor = build_knn_monitor(args, device)        # None without --knn_data_path: nothing built
    if monitor is not None and monitor.due(epochs_done, args.epochs):
        stats.update(monitor.evaluate(model.encoder))  # {"knn_top1": %, "knn_time_s": s}
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import models
from engine.class_folders import check_same_classes
from engine.config import Check, ConfigError
from engine.data import ImageFolderSkippingUnreadable
from engine.distributed import get_rank, get_world_size
from engine.embeddings import extract_pooled
from engine.eval_transform import build_eval_transform
from engine.knn import knn_accuracy
from engine.loop import amp_autocast

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
KNN_TEMPERATURE = 0.07  # DINO's k-NN protocol, also finetune.linear_probe's default

KNN_MONITOR_CHECKS: tuple[Check, ...] = (
    Check("--knn_data_path",
          lambda a: a.knn_data_path is None or all((Path(a.knn_data_path) / split).is_dir() for split in SPLITS),
          "needs train/ and val/ class folders (<dir>/train/<class>/*.jpg, <dir>/val/<class>/*.jpg)"),
    Check("--knn_freq", lambda a: a.knn_freq >= 1, "must be >= 1 (epochs between k-NN evaluations)"),
    Check("--knn_k", lambda a: a.knn_k >= 1, "must be >= 1 (neighbours per query, e.g. 20)"),
    Check("--knn_max_images", lambda a: a.knn_max_images >= 0, "must be >= 0 (images per split; 0: all)"),
)


def balanced_indices(targets: Sequence[int], max_images: Optional[int]) -> list[int]:
    """Ascending indices of at most ``max_images`` samples (None or 0: all), shared as evenly as
    possible between the classes (a class with fewer images gives its share to the others) and
    evenly spaced within each class's samples: deterministic, no random draw."""
    targets = torch.as_tensor(targets)
    if not max_images or max_images >= len(targets):
        return list(range(len(targets)))
    members = [torch.nonzero(targets == label).flatten() for label in targets.unique()]
    quotas, left = [0] * len(members), max_images
    while left:
        unfilled = [i for i, indices in enumerate(members) if quotas[i] < len(indices)]
        share = max(left // len(unfilled), 1)
        for i in unfilled[:left]:
            taken = min(share, len(members[i]) - quotas[i], left)
            quotas[i] += taken
            left -= taken
    chosen = [indices[torch.arange(quota) * len(indices) // quota] for indices, quota in zip(members, quotas) if quota]
    return torch.cat(chosen).sort().values.tolist()


class _PooledEmbedding(nn.Module):
    """Module whose forward is ``extract_pooled``: what ``functional_call`` runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return extract_pooled(self.model, images)


class DenseEncoderView:
    """Calls an encoder's parameters (timm names: ``stem.*``, ``stages.*``) as the dense timm
    model: (N, 3, H, W) -> (N, dims[-1]) pooled embedding. The timm module lives on the meta
    device (no memory); every forward borrows the encoder's current tensors."""

    def __init__(self, model_name: str, device: torch.device):
        with torch.device("meta"):
            dense = models.create_dense_model(model_name, num_classes=0)
        self.module = _PooledEmbedding(dense).eval()
        width = models.MODEL_CONFIGS[model_name][1][-1]
        self.head_norm = {"model.head.norm.weight": torch.ones(width, device=device),
                          "model.head.norm.bias": torch.zeros(width, device=device)}

    def __call__(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        tensors = {f"model.{name}": tensor for name, tensor in encoder.state_dict().items()}
        return torch.func.functional_call(self.module, {**tensors, **self.head_norm}, (images,), strict=True)


class KNNMonitor:
    """Weighted k-NN top-1 of an encoder's pooled features: ``val_set`` classified against ``train_set``.

    Args:
        model_name: ``convnextv2_<size>`` of the encoders evaluated.
        train_set, val_set: datasets of (image tensor, label); labels < 0 (unreadable files) are left out.
        num_classes: label count (labels in [0, num_classes)).
        k: neighbours; freq: evaluate every ``freq`` epochs and after the last (``due``).
        max_images: cap per split (None: all), see ``balanced_indices``; needs ``.targets``.
        batch_size, num_workers: of the embedding loaders; device, amp: where and how to embed.
    """

    def __init__(self, model_name: str, train_set: Dataset, val_set: Dataset, num_classes: int, k: int = 20,
                 freq: int = 1, max_images: Optional[int] = None, batch_size: int = 64, num_workers: int = 0,
                 device: torch.device | str = "cpu", amp: str = "none"):
        self.device = torch.device(device)
        self.embed = DenseEncoderView(model_name, self.device)
        self.width = models.MODEL_CONFIGS[model_name][1][-1]
        self.splits = {name: (dataset, balanced_indices(dataset.targets, max_images) if max_images else
                              list(range(len(dataset)))) for name, dataset in zip(SPLITS, (train_set, val_set))}
        self.num_classes, self.k, self.freq = num_classes, k, freq
        self.batch_size, self.num_workers, self.amp = batch_size, num_workers, amp

    def due(self, epochs_done: int, epochs: int) -> bool:
        return epochs_done % self.freq == 0 or epochs_done == epochs

    @torch.no_grad()
    def evaluate(self, encoder: nn.Module) -> dict[str, float]:
        """``{"knn_top1": %, "knn_time_s": seconds}``; every rank must call it (collectives)."""
        start = time.perf_counter()
        (train, train_labels), (val, val_labels) = (self.embed_split(encoder, split) for split in SPLITS)
        top1 = knn_accuracy(train, train_labels, val, val_labels, num_classes=self.num_classes, k=self.k,
                            temperature=KNN_TEMPERATURE)
        seconds = time.perf_counter() - start
        _logger.info("k-NN monitor: %d-NN top-1 %.2f%% (%d val vs %d train images), %.1f s", self.k, top1,
                     len(val_labels), len(train_labels), seconds)
        return {"knn_top1": top1, "knn_time_s": seconds}

    def embed_split(self, encoder: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, C) and labels (N,) of ``split``'s chosen images, in order, on every rank;
        images whose label is negative (unreadable) are left out."""
        dataset, indices = self.splits[split]
        batches = [indices[start:start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        rank, world_size = get_rank(), get_world_size()
        features, labels = [torch.zeros(0, self.width, device=self.device)], [torch.zeros(0, dtype=torch.int64,
                                                                                          device=self.device)]
        mine = batches[rank::world_size]
        if mine:
            loader = DataLoader(dataset, batch_sampler=mine, num_workers=self.num_workers,
                                pin_memory=self.device.type == "cuda")
            for images, targets in loader:
                with amp_autocast(self.device.type, self.amp):
                    features.append(self.embed(encoder, images.to(self.device, non_blocking=True)).float())
                labels.append(torch.as_tensor(targets, dtype=torch.int64).to(self.device))
        features, labels = torch.cat(features), torch.cat(labels)
        if world_size > 1:
            features, labels = gather_batches(features, labels, [len(batch) for batch in batches], world_size)
        kept = labels >= 0
        return features[kept], labels[kept]


def gather_batches(features: torch.Tensor, labels: torch.Tensor, batch_sizes: list[int],
                   world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' features and labels in the original batch order, when rank r holds batches
    r, r + world_size, ... (concatenated); ``batch_sizes`` lists every batch's size."""
    starts = torch.tensor([0, *batch_sizes]).cumsum(0)
    positions = [torch.cat([torch.arange(starts[b], starts[b + 1]) for b in range(rank, len(batch_sizes), world_size)]
                           or [torch.zeros(0, dtype=torch.int64)]) for rank in range(world_size)]
    padded_count = max(len(held) for held in positions)
    values = torch.cat([features, labels.unsqueeze(1).to(features.dtype)], dim=1)  # one collective; labels exact
    values = torch.nn.functional.pad(values, (0, 0, 0, padded_count - len(values)))
    gathered = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(gathered, values)
    ordered = torch.empty(int(starts[-1]), values.shape[1], dtype=values.dtype, device=values.device)
    for held, rank_values in zip(positions, gathered):
        ordered[held.to(values.device)] = rank_values[:len(held)]
    return ordered[:, :-1], ordered[:, -1].long()


def build_knn_monitor(args: argparse.Namespace, device: torch.device) -> Optional[KNNMonitor]:
    """The monitor for pretrain.py's ``--knn_*`` flags, or None without ``--knn_data_path``
    (then nothing is built or read). Embeds at the pretraining ``--input_size`` with the
    evaluation transform, ``--batch_size`` images per batch, ``--num_workers`` and ``--amp``."""
    if args.knn_data_path is None:
        return None
    transform = build_eval_transform(args.input_size)
    datasets = []
    for split in SPLITS:
        root = Path(args.knn_data_path) / split
        try:
            datasets.append(ImageFolderSkippingUnreadable(root, transform, substitute_unreadable=False))
        except FileNotFoundError as error:
            raise ConfigError(f"--knn_data_path {args.knn_data_path}: no images in {root} ({error}); expected "
                              f"<dir>/{split}/<class>/<image>") from error
    train_set, val_set = datasets
    check_same_classes(train_set.classes, val_set.classes, where=f" under --knn_data_path {args.knn_data_path}")
    monitor = KNNMonitor(args.model, train_set, val_set, len(train_set.classes), args.knn_k, args.knn_freq,
                         args.knn_max_images or None, args.batch_size, args.num_workers, device, args.amp)
    _logger.info("k-NN monitor: %d-NN on %d train / %d val images of %d classes under %s, every %d epochs",
                 args.knn_k, len(monitor.splits["train"][1]), len(monitor.splits["val"][1]), len(train_set.classes),
                 args.knn_data_path, args.knn_freq)
    return monitor
