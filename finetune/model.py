"""The model to fine-tune: a dense timm ConvNeXt V2 with a new classifier.

``--finetune`` accepts every layout ``models.load_pretrained`` reads (our training checkpoints,
our ``encoder.safetensors``, official FCMAE / fine-tuned / MinkowskiEngine files); a FCMAE
decoder is dropped there. The classifier is always new, initialised as in the official recipe
(trunc-normal std 2e-5 weights, zero bias), even when the checkpoint has one of the same size.
"""
from __future__ import annotations

import logging
import os

import torch.nn as nn
from timm.layers import trunc_normal_

import models
from models.convnextv2 import DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE

_logger = logging.getLogger(__name__)

HEAD_INIT_STD = 2e-5


def init_head(classifier: nn.Linear) -> None:
    """Official fine-tuning head init: weights trunc-normal(std=2e-5), bias 0."""
    trunc_normal_(classifier.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(classifier.bias)


def build_finetune_model(
    model_name: str,
    num_classes: int,
    checkpoint: str | os.PathLike | None = None,
    drop_path: float = 0.0,
    grad_checkpointing: bool = False,
    stem_stride: int | None = None,
    in_chans: int | None = None,
) -> nn.Module:
    """Dense ``model_name`` with a freshly initialised ``num_classes``-way head, its other weights
    from ``checkpoint`` (None: random initialisation). A checkpoint of another model size raises
    ``load_pretrained``'s ValueError, which names the size the checkpoint looks like.
    ``grad_checkpointing``: timm's activation checkpointing of the stages (less memory, more compute).
    ``stem_stride`` (4 or 2) and ``in_chans``: None takes the checkpoint's (4 and 3 without one);
    another value adapts the checkpoint's stem (``models.fit_stem``)."""
    if checkpoint is None:
        model = models.create_dense_model(model_name, stem_stride or DEFAULT_STEM_STRIDE, in_chans or DEFAULT_IN_CHANS,
                                          num_classes=num_classes, drop_path_rate=drop_path)
    else:
        model = models.load_pretrained(model_name, checkpoint, num_classes=num_classes, stem_stride=stem_stride,
                                       in_chans=in_chans, drop_path_rate=drop_path)
    init_head(model.head.fc)
    model.set_grad_checkpointing(grad_checkpointing)
    stem_stride, in_chans = models.stem_geometry(model.stem[0].weight)
    _logger.info("%s: weights from %s, new %d-class head, drop path %.2f, stem stride %d, %d input channels",
                 model_name, checkpoint or "random initialisation", num_classes, drop_path, stem_stride, in_chans)
    return model
