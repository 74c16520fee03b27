"""k-NN monitor: how good the encoder's features are while FCMAE pretraining runs.

At chosen epochs the current encoder, run as timm's dense ConvNeXt V2 (eval mode, no mask, the
same parameter tensors: nothing is copied), embeds the images of a labelled folder's ``train/``
and ``val/`` splits with ``engine.embeddings.extract_pooled`` (the head's pre-logits; the head
LayerNorm, which the encoder does not have, is the identity, as for an encoder-only checkpoint),
and ``engine.knn`` (weighted k-NN, temperature 0.07) classifies val against train. The labels
are used by the monitor only. For a checkpoint of the same epoch, on the same images and batch
size, the top-1 equals the k-NN top-1 of ``python -m finetune.knn`` (and ``finetune.linear_probe``).

Under DDP the batches are dealt out round-robin to the ranks; a batch holds the same images
whatever the world size. Each rank keeps the train features it embedded (its shard of the bank)
and its val features, and ``engine.knn.sharded_knn_top1`` merges the shards' nearest neighbours
into those of the whole bank, so the result equals the single-process one.

Memory: the bank is float32, L2-normalised, one copy in all, split over the ranks:
(train images / ranks) x width x 4 bytes per rank. For ImageNet-1k's 1.28M train images
(width: atto 320, femto 384, pico 512, nano 640, tiny 768, base 1024, large 1536, huge 2816):

    ranks   atto       tiny       base       huge
    1       1.53 GiB   3.67 GiB   4.89 GiB   13.4 GiB
    8       0.19 GiB   0.46 GiB   0.61 GiB   1.68 GiB

plus the rank's val features (50,000 val images: 0.52 GiB for huge on 1 rank, 0.07 GiB per rank
on 8) and one block of query similarities (``engine.knn.SIMILARITY_BLOCK_ELEMENTS``, 256 MiB),
all on the training device.
``--knn_max_images N`` caps each split at N images: the bank is then at most N x width x 4
bytes in all (N = 20,000 with huge: 0.21 GiB).

Stopping: ``evaluate(encoder, should_stop)`` checks ``should_stop()`` before each batch (the same
batch index on every rank) and raises ``engine.signals.StopRequested`` once it is True, so a
scheduler's stop signal does not wait for a whole pass. The embedding loaders' workers ignore
SIGTERM/SIGUSR1, as the training loader's do.

    monitor = build_knn_monitor(args, device)        # None without --knn_data_path: nothing built
    if monitor is not None and monitor.due(epochs_done, args.epochs):
        stats.update(monitor.evaluate(model.encoder, should_stop))  # {"knn_top1": %, "knn_time_s": s}
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import models
from models.convnextv2 import DEFAULT_STEM_STRIDE
from engine.class_folders import check_same_classes
from engine.config import Check, ConfigError
from engine.data import ImageFolderSkippingUnreadable, shutdown_workers
from engine.distributed import get_rank, get_world_size
from engine.embeddings import extract_pooled
from engine.eval_transform import build_eval_transform
from engine.knn import KNN_TEMPERATURE, sharded_knn_top1
from engine.progress_bar import progress_bar
from engine.stepper import amp_autocast
from engine.signals import StopRequested, stop_signals_blocked, workers_ignore_stop_signals

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val")

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

    def __init__(self, model_name: str, device: torch.device, stem_stride: int = DEFAULT_STEM_STRIDE):
        with torch.device("meta"):
            dense = models.create_dense_model(model_name, stem_stride, num_classes=0)
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
                 device: torch.device | str = "cpu", amp: str = "none",
                 stem_stride: int = DEFAULT_STEM_STRIDE):
        self.device = torch.device(device)
        self.embed = DenseEncoderView(model_name, self.device, stem_stride)
        self.width = models.MODEL_CONFIGS[model_name][1][-1]
        self.splits = {name: (dataset, balanced_indices(dataset.targets, max_images) if max_images else
                              list(range(len(dataset)))) for name, dataset in zip(SPLITS, (train_set, val_set))}
        self.num_classes, self.k, self.freq = num_classes, k, freq
        self.batch_size, self.num_workers, self.amp = batch_size, num_workers, amp

    def due(self, epochs_done: int, epochs: int) -> bool:
        return epochs_done % self.freq == 0 or epochs_done == epochs

    @torch.no_grad()
    def evaluate(self, encoder: nn.Module, should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
        """``{"knn_top1": %, "knn_time_s": seconds}``; every rank must call it (collectives).

        ``should_stop()`` is called before each batch of the pass, at the same batch index on
        every rank (so it may be a collective); once it returns True, ``StopRequested`` is raised."""
        start = time.perf_counter()
        _logger.info("k-NN monitor: embedding %d train and %d val images", *(len(self.splits[split][1])
                                                                             for split in SPLITS))
        (bank, bank_labels), (queries, query_labels) = (self.embed_split(encoder, split, should_stop)
                                                        for split in SPLITS)
        score = sharded_knn_top1(bank, bank_labels, queries, query_labels, self.num_classes, self.k, KNN_TEMPERATURE)
        seconds = time.perf_counter() - start
        _logger.info("k-NN monitor: %d-NN top-1 %.2f%% (%d val vs %d train images), %.1f s", self.k, score.top1,
                     score.queries, score.references, seconds)
        return {"knn_top1": score.top1, "knn_time_s": seconds}

    def embed_split(self, encoder: nn.Module, split: str,
                    should_stop: Optional[Callable[[], bool]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of ``split``: L2-normalised float32 features (n, C) and labels (n,) of
        the batches it embeds (batch ``b`` of the split goes to rank ``b % world_size``), in order,
        images whose label is negative (unreadable) left out. One buffer of the share's size
        holds the features; ``should_stop`` as in ``evaluate``."""
        dataset, indices = self.splits[split]
        batches = [indices[start:start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        rank, world_size = get_rank(), get_world_size()
        mine = batches[rank::world_size]
        rows = sum(len(batch) for batch in mine)
        features = torch.empty(rows, self.width, device=self.device)
        labels = torch.empty(rows, dtype=torch.int64, device=self.device)
        filled = 0
        loader = DataLoader(dataset, batch_sampler=mine, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0, pin_memory=self.device.type == "cuda")
        workers_ignore_stop_signals(loader)  # a scheduler's SIGTERM goes to the whole process group
        try:
            with stop_signals_blocked():  # until each worker ignores the signals
                loaded = iter(loader) if mine else None
            rounds = -(-len(batches) // world_size)  # every rank: the same number of rounds
            for round_index in progress_bar(range(rounds), f"k-NN monitor: {split} split", rounds, "batch"):
                if should_stop is not None and should_stop():
                    _logger.info("k-NN monitor: pass stopped before %s batch %d of %d", split,
                                 round_index * world_size + 1, len(batches))
                    raise StopRequested(f"k-NN pass stopped in its {split} split")
                if round_index < len(mine):
                    batch_features, batch_labels = self.embed_batch(encoder, *next(loaded))
                    features[filled:filled + len(batch_labels)] = batch_features
                    labels[filled:filled + len(batch_labels)] = batch_labels
                    filled += len(batch_labels)
        finally:
            shutdown_workers(loader)  # also when stopped: the workers ignore the SIGTERM of interpreter exit
        return features[:filled], labels[:filled]

    def embed_batch(self, encoder: nn.Module, images: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch -> L2-normalised float32 features (n, C) and labels (n,) of its readable images."""
        targets = torch.as_tensor(targets)
        kept = torch.nonzero(targets >= 0).flatten()  # on the CPU: no device sync
        with amp_autocast(self.device.type, self.amp):
            embedded = self.embed(encoder, images.to(self.device, non_blocking=True))
        if len(kept) < len(targets):
            embedded = embedded.index_select(0, kept.to(self.device))
        return F.normalize(embedded.float(), dim=1), targets[kept].to(self.device)


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
                         args.knn_max_images or None, args.batch_size, args.num_workers, device, args.amp,
                         args.stem_stride)
    _logger.info("k-NN monitor: %d-NN on %d train / %d val images of %d classes under %s, every %d epochs",
                 args.knn_k, len(monitor.splits["train"][1]), len(monitor.splits["val"][1]), len(train_set.classes),
                 args.knn_data_path, args.knn_freq)
    return monitor
