"""``sparse`` backend: pure PyTorch, per-position work only on visible positions.

Every image keeps the same number of cells, so the visible positions of a stage form a
regular (N, L_visible, C) token tensor. The tokens are kept in *cell-major* order: visible
cell after visible cell (ascending cell index), and inside a cell its s x s positions row
by row (s = 8, 4, 2, 1 at stages 0-3, whatever the stem stride). In that order
- the stem runs on the visible cells (``total_stride`` x ``total_stride`` pixels) alone: its
  k x k stride-k conv never crosses a cell;
- downsampling is a reshape: a position's 2x2 children lie in its own cell;
- LayerNorm, both MLP linears, GELU, GRN and the residual act on the tokens only;
- the depthwise 7x7 conv, the one spatial operation, copies the tokens into a zero
  channels-last map at precomputed rows, convolves, and reads the same rows back.

``visible_indices``, ``gather_tokens`` and ``scatter_tokens`` (row-major positions on a
stage's map) serve the minkowski backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import block_pointwise, downsample_linear, layer_norm, run_block, upsample_mask


def encode(encoder, images: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(N, C, H/s, W/s) features of the (N, K) visible ``cells`` (s: ``encoder.total_stride``)."""
    grid_size = encoder.grid_size(images)
    tokens, side = sparse_stem(encoder.stem, images, cells, encoder.total_stride)
    for stage_index, stage in enumerate(encoder.stages):
        if stage_index > 0:
            tokens = sparse_downsample(stage.downsample, tokens, side)
            side //= 2
        rows = cell_major_rows(cells, grid_size, side)  # shared by the stage's blocks
        map_shape = (images.shape[0], grid_size[0] * side, grid_size[1] * side)
        for block in stage.blocks:
            tokens = run_block(encoder, sparse_block, block, tokens, rows, map_shape)
    return tokens_to_map(tokens, rows, map_shape)


def cell_major_rows(cells: torch.Tensor, grid_size: tuple[int, int], side: int) -> torch.Tensor:
    """(N * K * side**2,) rows of a stage's flattened (N * H * W, C) map, one per cell-major token,
    for a stage whose grid cells are ``side`` x ``side`` positions."""
    grid_h, grid_w = grid_size
    height, width = grid_h * side, grid_w * side
    offsets = torch.arange(side, device=cells.device)
    rows = (cells // grid_w * side)[:, :, None, None] + offsets[:, None]  # (N, K, side, 1)
    columns = (cells % grid_w * side)[:, :, None, None] + offsets  # (N, K, 1, side)
    image_starts = torch.arange(cells.shape[0], device=cells.device)[:, None, None, None] * (height * width)
    return (image_starts + rows * width + columns).flatten()


def tokens_to_map(tokens: torch.Tensor, rows: torch.Tensor, map_shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, L_visible, C) cell-major tokens -> (N, C, H, W) channels-last map, zero off ``rows``."""
    batch, height, width = map_shape
    channels = tokens.shape[-1]
    flat = tokens.new_zeros(batch * height * width, channels).index_copy_(0, rows, tokens.reshape(-1, channels))
    return flat.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def sparse_stem(stem, images: torch.Tensor, cells: torch.Tensor, cell_size: int) -> tuple[torch.Tensor, int]:
    """The stem on each image's visible ``cell_size`` x ``cell_size`` cells (N, K) only.

    Returns cell-major tokens (N, K * side**2, C) and ``side``, the stem outputs per cell side.
    """
    batch, channels, height, width = images.shape
    grid_w = width // cell_size
    patches = images.reshape(batch, channels, height // cell_size, cell_size, grid_w, cell_size)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # (N, grid_h, grid_w, C_in, s, s)
    image_ids = torch.arange(batch, device=images.device)[:, None]
    visible = patches[image_ids, cells // grid_w, cells % grid_w]  # (N, K, C_in, s, s)
    out = stem(visible.flatten(0, 1))  # (N * K, C, side, side)
    return out.permute(0, 2, 3, 1).reshape(batch, -1, out.shape[1]), out.shape[-1]


def sparse_block(block, tokens: torch.Tensor, rows: torch.Tensor, map_shape: tuple[int, int, int]) -> torch.Tensor:
    """One ConvNeXt V2 block on cell-major tokens (N, L_visible, C) placed at ``rows`` of the
    stage's map, ``map_shape`` = (N, H, W)."""
    channels = tokens.shape[-1]
    mixed = block.conv_dw(tokens_to_map(tokens, rows, map_shape))
    # channels-last in, channels-last out: the permute is a view; hidden outputs are dropped
    mixed = mixed.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, rows)
    return tokens + block.drop_path(block_pointwise(block, mixed.reshape(tokens.shape)))


def sparse_downsample(downsample, tokens: torch.Tensor, side: int) -> torch.Tensor:
    """LayerNorm + 2x2 stride-2 conv on cell-major tokens with ``side`` x ``side`` positions per
    cell -> cell-major tokens with side / 2.

    The mask is nested across stages, so each output's 2x2 children are visible and lie in
    its own cell: the conv is a linear map on their concatenation, no hidden input is read.
    """
    norm, conv = downsample[0], downsample[1]
    batch, _, channels = tokens.shape
    half = side // 2
    children = layer_norm(norm, tokens).reshape(batch, -1, half, 2, half, 2, channels)  # (N, K, y, dy, x, dx, C)
    children = children.permute(0, 1, 2, 4, 6, 3, 5).reshape(batch, -1, channels * 4)  # (C, dy, dx) per output
    weight, bias = downsample_linear(conv)
    return F.linear(children, weight, bias)


def visible_indices(mask: torch.Tensor, grid_size: tuple[int, int], scale: int, visible_cells: int) -> torch.Tensor:
    """(N, visible_cells * scale**2) flat row-major indices of the visible positions at a stage
    ``scale`` x finer than the grid, ascending within each image (stable argsort: no host sync)."""
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
