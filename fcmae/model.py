"""FCMAE: sparse ConvNeXt V2 encoder, light ConvNeXt decoder, MSE on hidden patches."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock

from models import SparseConvNeXtV2, mask_from_visible_cells
from models.convnextv2 import DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE, total_stride

from .masking import random_visible_cells

PAPER_PATCH_SIZE = total_stride(DEFAULT_STEM_STRIDE)  # 32


def patchify(images: torch.Tensor, patch_size: int = PAPER_PATCH_SIZE) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major grid order, pixels as (p, q, c)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size**2 * channels)


def unpatchify(patches: torch.Tensor, grid_size: tuple[int, int], patch_size: int = PAPER_PATCH_SIZE) -> torch.Tensor:
    """Inverse of ``patchify``: (N, L, p*p*C) -> (N, C, H, W)."""
    batch = patches.shape[0]
    grid_h, grid_w = grid_size
    images = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, -1)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, grid_h * patch_size, grid_w * patch_size)


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder.

    The model is the one owner of the mask: its ratio (``mask_ratio``) and its patch
    (``patch_size`` = the encoder's total stride: 32, or 16 with a stride-2 stem).

    forward(images, visible_cells=None) -> (loss, pred, mask):
        images: (N, C, H, W), C = ``in_chans``, H and W multiples of ``patch_size``;
        visible_cells: (N, K) int64, each image's visible cells ascending, L = (H/p)*(W/p): a mask
            of any ratio, from ``random_visible_cells`` or, for a (N, L) 0/1 mask,
            ``models.visible_cells_from_mask`` (checked there, once). K is read from the shape, so
            the forward never waits for the device and compiles to one graph. None (training):
            this model's own random mask, ``keep_count(L, mask_ratio)`` cells per image, drawn from
            the default generator of the images' device (which the training loop reseeds per
            micro-batch);
        pred: (N, L, p*p*C) predicted patches (normalised-pixel space when ``norm_pix_loss``);
        mask: (N, L) float, 1 = hidden;
        loss: mean over hidden patches of the per-patch MSE.
    """

    def __init__(
        self,
        model_name: str,
        backend: str = "sparse",
        mask_ratio: float = 0.6,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        stem_stride: int = DEFAULT_STEM_STRIDE,
        in_chans: int = DEFAULT_IN_CHANS,
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if decoder_depth < 1 or decoder_dim < 1:
            raise ValueError(f"decoder_depth and decoder_dim must be >= 1, got {decoder_depth}, {decoder_dim}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # the encoder is initialised by timm (trunc-normal 0.02, zero bias); the rest below, once
        self.encoder = SparseConvNeXtV2(model_name, backend, drop_path_rate, stem_stride, in_chans)
        self.patch_size = self.encoder.total_stride
        self.proj = nn.Conv2d(self.encoder.dims[-1], decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[
            ConvNeXtBlock(decoder_dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(decoder_depth)
        ])
        self.pred = nn.Conv2d(decoder_dim, self.patch_size**2 * in_chans, kernel_size=1)
        self._init_decoder()

    def _init_decoder(self) -> None:
        trunc_normal_(self.mask_token, std=0.02)
        for module in [self.proj, self.decoder, self.pred]:
            for layer in module.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's blocks in the backward pass (see ``SparseConvNeXtV2``); the
        one-block decoder on the final-stage grid is small and keeps its activations."""
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay beyond 1-D tensors (timm's convention)."""
        return {"mask_token"}

    def random_visible_cells(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """This model's random mask for ``images``: (N, K) visible cells on their device,
        ``K = keep_count(L, mask_ratio)``; drawn on ``generator`` (see ``random_visible_cells``)."""
        grid_h, grid_w = self.encoder.grid_size(images)
        return random_visible_cells(images.shape[0], grid_h * grid_w, self.mask_ratio, generator, images.device)

    def forward_decoder(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (N, C, h, w), zero where hidden -> predicted patches (N, L, p*p*in_chans)."""
        hidden = self.proj(features)
        batch, _, grid_h, grid_w = hidden.shape
        cell_mask = mask.reshape(batch, 1, grid_h, grid_w).to(hidden.dtype)
        hidden = hidden * (1.0 - cell_mask) + self.mask_token.to(hidden.dtype) * cell_mask
        pred = self.pred(self.decoder(hidden))  # (N, p*p*in_chans, h, w), channels ordered (p, q, c)
        return pred.flatten(2).transpose(1, 2)

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch MSE over hidden patches; target normalised per patch if ``norm_pix_loss``."""
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images: torch.Tensor, visible_cells: Optional[torch.Tensor] = None):
        if visible_cells is None:
            visible_cells = self.random_visible_cells(images)
        features = self.encoder(images, visible_cells)  # checks the shapes of both
        mask = mask_from_visible_cells(visible_cells, features.shape[2] * features.shape[3])
        pred = self.forward_decoder(features, mask)
        return self.loss(images, pred, mask), pred, mask
