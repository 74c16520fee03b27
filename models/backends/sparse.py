"""``sparse`` backend: pure PyTorch, per-position work only on visible positions.

Every image keeps the same number of cells, so the visible positions of a stage form a
regular (N, L_visible, C) token tensor. LayerNorm, both MLP linears, GELU, GRN, the
residual and the downsampling convs run on those tokens only; the depthwise 7x7 conv,
the one spatial operation, scatters tokens into a zero map, convolves, and gathers back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import block_pointwise, downsample_linear, layer_norm, upsample_mask


def visible_indices(mask: torch.Tensor, grid_size: tuple[int, int], scale: int, visible_cells: int) -> torch.Tensor:
    """(N, visible_cells * scale**2) flat indices of the visible positions at a stage ``scale`` x
    finer than the grid, ascending within each image (stable argsort: no host synchronisation)."""
    fine = upsample_mask(mask, grid_size, scale).flatten(1)  # (N, h*w)
    return torch.argsort(fine, dim=1, stable=True)[:, : visible_cells * scale * scale]


def gather_tokens(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(N, P, C) positions -> (N, L_visible, C) at ``indices`` (N, L_visible)."""
    return torch.gather(dense, 1, indices.unsqueeze(-1).expand(-1, -1, dense.shape[-1]))


def scatter_tokens(tokens: torch.Tensor, indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    """(N, L_visible, C) tokens -> (N, num_positions, C), zeros elsewhere."""
    batch, _, channels = tokens.shape
    dense = tokens.new_zeros(batch, num_positions, channels)
    return dense.scatter(1, indices.unsqueeze(-1).expand(-1, -1, channels), tokens)


def encode(encoder, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    grid_size = (images.shape[2] // 32, images.shape[3] // 32)
    stem_out = encoder.stem(images)  # dense: the stem never mixes 32x32 cells
    batch, _, height, width = stem_out.shape
    visible_cells = mask.shape[1] - int(mask[0].sum().item())  # same for every image
    indices = visible_indices(mask, grid_size, 8, visible_cells)
    tokens = gather_tokens(stem_out.flatten(2).transpose(1, 2), indices)
    for stage_index, stage in enumerate(encoder.stages):
        if stage_index > 0:
            child_indices, child_size = indices, (height, width)
            height, width = height // 2, width // 2
            indices = visible_indices(mask, grid_size, 2 ** (3 - stage_index), visible_cells)
            tokens = sparse_downsample(stage.downsample, tokens, child_indices, child_size, indices)
        for block in stage.blocks:
            tokens = sparse_block(block, tokens, indices, (height, width))
    out = scatter_tokens(tokens, indices, height * width)
    return out.transpose(1, 2).reshape(batch, -1, height, width)


def sparse_block(block, tokens: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One ConvNeXt V2 block on (N, L_visible, C) tokens at stage resolution ``size``."""
    height, width = size
    batch, _, channels = tokens.shape
    spatial = scatter_tokens(tokens, indices, height * width)
    spatial = spatial.transpose(1, 2).reshape(batch, channels, height, width)
    mixed = block.conv_dw(spatial).flatten(2).transpose(1, 2)
    mixed = gather_tokens(mixed, indices)  # hidden outputs are never computed further
    return tokens + block.drop_path(block_pointwise(block, mixed))


def sparse_downsample(
    downsample, tokens: torch.Tensor, child_indices: torch.Tensor, child_size: tuple[int, int], indices: torch.Tensor
) -> torch.Tensor:
    """LayerNorm + 2x2 stride-2 conv: tokens at ``child_indices`` on a ``child_size`` map ->
    tokens at ``indices`` on the half-size map.

    The mask is nested across stages, so each visible output has exactly four visible
    children and the conv is a linear map on their concatenation; no hidden input is read.
    """
    norm, conv = downsample[0], downsample[1]
    height, width = child_size
    batch, _, channels = tokens.shape
    spatial = scatter_tokens(layer_norm(norm, tokens), child_indices, height * width)  # memory only
    children = spatial.reshape(batch, height // 2, 2, width // 2, 2, channels)
    children = children.permute(0, 1, 3, 5, 2, 4).reshape(batch, (height // 2) * (width // 2), channels * 4)
    weight, bias = downsample_linear(conv)
    return F.linear(gather_tokens(children, indices), weight, bias)
