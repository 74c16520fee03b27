"""What a timm ConvNeXt V2 gives as features, for a frozen encoder's evaluation and transfer.

* ``extract_pooled``: (N, 3, H, W) -> (N, dims[-1]), ``forward_head(forward_features(x),
  pre_logits=True)``: global average pool, then the head LayerNorm (the classifier's input).
* ``extract_stages``: the four stage outputs, (N, dims[i], H / 2**(i+2), W / 2**(i+2)), what
  detection/segmentation necks consume.
* ``extract_pooled_and_stages``: both from one forward pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def extract_pooled(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, C): pooled, head-normalised embedding (the classifier's input)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def extract_stages(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """(N, 3, H, W) -> the four stage outputs, (N, dims[i], H / 2**(i+2), W / 2**(i+2))."""
    return model.forward_intermediates(images, intermediates_only=True)


def extract_pooled_and_stages(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Both in one forward pass: the pooled embedding and the four stage outputs."""
    final, stages = model.forward_intermediates(images)
    return model.forward_head(final, pre_logits=True), stages
