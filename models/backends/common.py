"""Block math shared by every backend.

Everything in a ConvNeXt V2 block after the depthwise conv acts on each position alone,
except GRN, which needs the norm over each image's (visible) positions. Here that part
runs on a token tensor (N, L, C), whatever layout timm gave the block (nn.Linear or 1x1
Conv2d MLP, LayerNorm or LayerNorm2d), using the block's own parameters.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(encoder: nn.Module, block_fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``block_fn(*args)``; when ``encoder.grad_checkpointing`` is on (and autograd records),
    only the block's inputs are kept and its inside is recomputed in the backward pass."""
    if encoder.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block_fn, *args, use_reentrant=False)
    return block_fn(*args)


def _linear(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply an nn.Linear or a 1x1 nn.Conv2d to (N, L, C_in) tokens."""
    weight = layer.weight
    return F.linear(tokens, weight.reshape(weight.shape[0], -1), layer.bias)


def layer_norm(norm: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """timm LayerNorm or LayerNorm2d applied over the channels of (N, L, C) tokens."""
    return F.layer_norm(tokens, (tokens.shape[-1],), norm.weight, norm.bias, norm.eps)


def global_response_norm(
    grn: nn.Module, tokens: torch.Tensor, visible: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """GRN over (N, L, C) tokens, the L2 norm taken per image over visible positions only.

    ``visible``: (N, L, 1) float, 1 = visible, or None when every token is visible.
    (The official sparse code took this norm over the whole batch; we keep it per image.)
    """
    counted = tokens if visible is None else tokens * visible
    norm = counted.norm(p=2, dim=1, keepdim=True)  # (N, 1, C)
    normalised = norm / (norm.mean(dim=-1, keepdim=True) + grn.eps)
    # gamma * (X * Nx) + beta + X, as X * (1 + gamma * Nx) + beta: one pass over the tokens
    return torch.addcmul(grn.bias, tokens, 1.0 + grn.weight * normalised)


def block_pointwise(block: nn.Module, tokens: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block body after the depthwise conv: LN -> fc1 -> GELU -> GRN -> fc2 (-> layer scale).

    tokens: (N, L, C) depthwise-conv outputs; returns (N, L, C) residual branch (before drop path).
    """
    mlp = block.mlp
    hidden = _linear(mlp.fc1, layer_norm(block.norm, tokens))
    hidden = mlp.drop1(mlp.act(hidden))
    hidden = global_response_norm(mlp.grn, hidden, visible)
    out = mlp.drop2(_linear(mlp.fc2, hidden))
    if block.gamma is not None:
        out = out * block.gamma
    return out


def downsample_linear(conv: nn.Conv2d) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A 2x2 stride-2 conv as a linear map on concatenated children (C_in, 2, 2) order."""
    return conv.weight.reshape(conv.weight.shape[0], -1), conv.bias


def upsample_mask(mask: torch.Tensor, grid_size: tuple[int, int], scale: int) -> torch.Tensor:
    """(N, L) cell mask on ``grid_size`` -> (N, 1, h*scale, w*scale) mask at a finer stage."""
    grid_h, grid_w = grid_size
    batch = mask.shape[0]
    fine = mask.reshape(batch, grid_h, 1, grid_w, 1).expand(batch, grid_h, scale, grid_w, scale)
    return fine.reshape(batch, 1, grid_h * scale, grid_w * scale)
