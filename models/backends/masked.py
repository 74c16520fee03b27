"""``masked`` backend: dense convolutions with binary masks (the reference semantics).

Every depthwise conv sees zeros at hidden positions and its output is zeroed there; GRN
takes its norm over visible positions only; each block's output is zeroed at hidden
positions. A hidden position never reaches a visible one, but the work is fully dense.
"""
from __future__ import annotations

import torch

from ..masks import mask_from_visible_cells
from .common import block_pointwise, run_block, upsample_mask


def encode(encoder, images: torch.Tensor, visible_cells: torch.Tensor) -> torch.Tensor:
    """(N, C, H/s, W/s) features (s: ``encoder.total_stride``); the work is dense whatever is hidden."""
    grid_size = encoder.grid_size(images)
    mask = mask_from_visible_cells(visible_cells, grid_size[0] * grid_size[1])
    features = encoder.stem(images)
    for stage_index, stage in enumerate(encoder.stages):
        visible = 1.0 - upsample_mask(mask, grid_size, 2 ** (3 - stage_index)).to(features.dtype)
        if stage_index > 0:
            features = stage.downsample(features)
        features = features * visible
        for block in stage.blocks:
            features = run_block(encoder, masked_block, block, features, visible)
    return features


def masked_block(block, features: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One ConvNeXt V2 block on (N, C, H, W) features; ``visible`` (N, 1, H, W) float."""
    batch, channels, height, width = features.shape
    mixed = block.conv_dw(features * visible) * visible
    tokens = mixed.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    visible_tokens = visible.reshape(batch, height * width, 1)
    residual = block_pointwise(block, tokens, visible_tokens)
    residual = residual.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return (features + block.drop_path(residual)) * visible
