"""Linear probe: a linear classifier trained on frozen, pre-extracted features.

The features are standardised with the training set's per-channel mean and std (what MAE's
probe does with a BatchNorm without affine), then a single ``nn.Linear`` is trained with AdamW
and a cosine schedule. Features are extracted once (``finetune.features``), so an epoch of the
probe costs a matrix multiply, not a pass through the encoder.

CLI (linear probe and k-NN top-1 of a frozen encoder; no --data_path: the embedded photos)::

    python -m finetune.linear_probe --model convnextv2_atto --checkpoint encoder.safetensors \
        --data_path /data/imagenette2-224 --input_size 128 --train_subset 2000

``python -m finetune.knn`` takes the same flags minus the probe's and reports the k-NN top-1 alone
(``main(argv, with_probe=False)``); the k-NN classifier is ``engine.knn``'s.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import models
from engine.compat import require_supported_versions
from engine.config import TrainingArgumentParser
from engine.distributed import choose_device
from engine.eval_transform import build_eval_transform
from engine.knn import KNN_TEMPERATURE, knn_accuracy
from engine.logging import setup_logging
from engine.schedule import build_lr_scheduler

from .data import build_datasets
from .features import FeatureExtractor, extract_dataset

_logger = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """``fc((x - mean) / std)``: (N, C) features -> (N, classes) logits."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.fc = nn.Linear(mean.numel(), num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc((features - self.mean) / self.std)


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LinearProbe:
    """Train a ``LinearProbe`` on (N, C) ``features`` and (N,) int64 ``labels``.

    Per-iteration cosine decay of ``lr`` to 0 over ``epochs``; mini-batches drawn by a
    generator seeded with ``seed``, so the result is deterministic.
    """
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} features but {len(labels)} labels")
    features = features.float()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbe(features.mean(0), features.std(0).clamp_min(1e-6), num_classes)
    nn.init.normal_(probe.fc.weight, std=0.01, generator=generator)
    nn.init.zeros_(probe.fc.bias)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    scheduler = build_lr_scheduler(optimizer, epochs, warmup_epochs=0, updates_per_epoch=steps_per_epoch)
    for step in range(epochs * steps_per_epoch):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(features), generator=generator)
        batch = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        scheduler.step_update(step)
        loss = F.cross_entropy(probe(features[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of ``probe`` on (N, C) features."""
    return 100.0 * (probe(features.float()).argmax(1) == labels).float().mean().item()


def build_parser(with_probe: bool = True) -> TrainingArgumentParser:
    """``python -m finetune.linear_probe``'s flags; without the probe's, ``python -m finetune.knn``'s."""
    parser = TrainingArgumentParser(
        prog="python -m finetune.linear_probe" if with_probe else "python -m finetune.knn",
        description=("Representation quality of a frozen encoder: linear probe and k-NN top-1 on pooled features"
                     if with_probe else "k-NN top-1 of a frozen encoder: val images classified by a weighted k-NN "
                     "(cosine similarity, DINO's protocol) of their pooled features against the train images'")
        + " (no --data_path: the embedded photos).",
    )
    parser.add_argument("--model", default="convnextv2_atto", help="convnextv2_<atto|...|huge>")
    parser.add_argument("--checkpoint", default=None,
                        help="any checkpoint models.load_pretrained reads; omitted: random initialisation")
    parser.add_argument("--data_path", default=None, help="ImageNet-style root with train/ and val/")
    parser.add_argument("--eval_data_path", default=None, help="validation folder (default: <data_path>/val)")
    parser.add_argument("--embedded_samples", type=int, default=256, help="training crops without --data_path")
    parser.add_argument("--train_subset", type=int, default=None, help="use this many random training images")
    parser.add_argument("--val_subset", type=int, default=None, help="use this many random validation images")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--crop_pct", type=float, default=None, help="evaluation resize / center crop, see finetune.py")
    parser.add_argument("--batch_size", type=int, default=64, help="images per feature-extraction batch")
    parser.add_argument("--num_workers", type=int, default=4)
    if with_probe:
        parser.add_argument("--epochs", type=int, default=100, help="linear probe epochs over the features")
        parser.add_argument("--lr", type=float, default=1e-3, help="linear probe AdamW lr (cosine to 0)")
        parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--knn_k", type=int, default=20,
                        help="k-NN neighbours" + (" (0: skip k-NN)" if with_probe else ""))
    parser.add_argument("--knn_temperature", type=float, default=KNN_TEMPERATURE,
                        help="vote weight exp(similarity / T)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: CUDA, then MPS, then CPU)")
    return parser


def _subset(dataset, size: int | None, seed: int):
    if size is None or size >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, sorted(indices.tolist()))


def main(argv: Optional[Sequence[str]] = None, with_probe: bool = True) -> dict[str, float]:
    """Extract train/val features once, then report linear-probe (unless ``with_probe`` is False)
    and k-NN top-1 (%)."""
    parser = build_parser(with_probe)
    require_supported_versions(parser.prog)
    args = parser.parse_args(argv)
    if not with_probe and args.knn_k < 1:
        parser.error(f"--knn_k {args.knn_k}: must be >= 1 (neighbours per query)")
    setup_logging()
    try:
        models.check_model_name(args.model)
        device = choose_device(args.device)
        transform = build_eval_transform(args.input_size, args.crop_pct)
        train_set, val_set, classes = build_datasets(args, transform, transform)
        extractor = FeatureExtractor(args.model, args.checkpoint, device, args.amp, args.input_size, args.crop_pct)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    start = time.perf_counter()
    features = {}
    for split, dataset, size in (("train", train_set, args.train_subset), ("val", val_set, args.val_subset)):
        loader = DataLoader(_subset(dataset, size, args.seed), batch_size=args.batch_size,
                            num_workers=args.num_workers)
        _logger.info("%s features: %d images", split, len(loader.dataset))
        features[split] = extract_dataset(extractor, loader)
    train, val = features["train"], features["val"]
    results = {"train_images": len(train["labels"]), "val_images": len(val["labels"]),
               "extract_time_s": time.perf_counter() - start}
    scores = []
    if with_probe:
        probe = train_linear_probe(train["pooled"], train["labels"], len(classes), args.epochs, lr=args.lr,
                                   weight_decay=args.weight_decay, seed=args.seed)
        results["linear_probe_acc1"] = probe_accuracy(probe, val["pooled"], val["labels"])
        scores.append(f"linear probe top-1 {results['linear_probe_acc1']:.2f}%")
    if args.knn_k > 0:
        results["knn_acc1"] = knn_accuracy(train["pooled"], train["labels"], val["pooled"], val["labels"],
                                           num_classes=len(classes), k=args.knn_k,
                                           temperature=args.knn_temperature)
        scores.append(f"{args.knn_k}-NN top-1 {results['knn_acc1']:.2f}%")
    results["total_time_s"] = time.perf_counter() - start
    _logger.info("%s from %s, %d px, %d classes (chance %.1f%%): %s (%d train / %d val images, %.0f s)", args.model,
                 args.checkpoint or "random initialisation", args.input_size, len(classes), 100.0 / len(classes),
                 ", ".join(scores), results["train_images"], results["val_images"], results["total_time_s"])
    return results


if __name__ == "__main__":
    main()
