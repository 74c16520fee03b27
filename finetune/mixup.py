"""Mixup/CutMix and the matching training loss.

With Mixup or CutMix active, timm's ``Mixup`` turns integer labels into soft targets (label
smoothing folded in) and the loss is ``SoftTargetCrossEntropy``; otherwise the loss is
``LabelSmoothingCrossEntropy`` (smoothing > 0) or plain cross-entropy.
"""
from __future__ import annotations

import models  # noqa: F401  (torchvision guard before timm)
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

MIXUP_MODES = ("batch", "pair", "elem")


def build_mixup(
    num_classes: int,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    cutmix_minmax: tuple[float, float] | None = None,
    mixup_prob: float = 1.0,
    mixup_switch_prob: float = 0.5,
    mixup_mode: str = "batch",
    smoothing: float = 0.0,
) -> Mixup | None:
    """timm ``Mixup`` (call it on ``(images, labels)`` -> ``(mixed images, (N, classes) soft
    targets)``), or None when neither Mixup nor CutMix is on. Needs an even batch size."""
    if mixup <= 0 and cutmix <= 0 and cutmix_minmax is None:
        return None
    if mixup_mode not in MIXUP_MODES:
        raise ValueError(f"--mixup_mode must be one of {MIXUP_MODES}, got {mixup_mode!r}")
    return Mixup(
        mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax,
        prob=mixup_prob, switch_prob=mixup_switch_prob, mode=mixup_mode,
        label_smoothing=smoothing, num_classes=num_classes,
    )


def build_train_criterion(mixup_fn: Mixup | None, smoothing: float = 0.0) -> nn.Module:
    """Loss on (logits, targets) matching what ``mixup_fn`` makes of the labels."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()
