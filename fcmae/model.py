"""FCMAE: sparse ConvNeXt V2 encoder, light ConvNeXt decoder, MSE on hidden patches."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock

from models import SparseConvNeXtV2
from models.sparse_encoder import TOTAL_STRIDE, check_mask_shape, read_keep_count

from .masking import keep_count, random_masking


def patchify(images: torch.Tensor, patch_size: int = TOTAL_STRIDE) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3), patches in row-major grid order, pixels as (p, q, c)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size**2 * channels)


def unpatchify(patches: torch.Tensor, grid_size: tuple[int, int], patch_size: int = TOTAL_STRIDE) -> torch.Tensor:
    """Inverse of ``patchify``: (N, L, p*p*3) -> (N, 3, H, W)."""
    batch = patches.shape[0]
    grid_h, grid_w = grid_size
    images = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, -1)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, grid_h * patch_size, grid_w * patch_size)


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder.

    forward(images, mask=None, check_mask=True) -> (loss, pred, mask):
        images: (N, 3, H, W), H and W multiples of 32;
        mask: (N, L) float, 1 = hidden, L = (H/32)*(W/32), every image keeping the same number
            of cells; drawn with ``random_masking(N, L, mask_ratio)`` on the images' device if None;
        check_mask: read a given mask once (a host-device sync) to check it and take its kept
            count, so a mask of any ratio works. False: the mask is trusted to keep
            ``keep_count(L, mask_ratio)`` cells, as ``random_masking`` with this model's
            ``mask_ratio`` draws it; a training loop passes False, so nothing in the forward
            waits for the device and it compiles to one graph;
        pred: (N, L, 32*32*3) predicted patches (normalised-pixel space when ``norm_pix_loss``);
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
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if decoder_depth < 1 or decoder_dim < 1:
            raise ValueError(f"decoder_depth and decoder_dim must be >= 1, got {decoder_depth}, {decoder_dim}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = TOTAL_STRIDE
        # the encoder is initialised by timm (trunc-normal 0.02, zero bias); the rest below, once
        self.encoder = SparseConvNeXtV2(model_name, backend=backend, drop_path_rate=drop_path_rate)
        self.proj = nn.Conv2d(self.encoder.dims[-1], decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[
            ConvNeXtBlock(decoder_dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(decoder_depth)
        ])
        self.pred = nn.Conv2d(decoder_dim, self.patch_size**2 * 3, kernel_size=1)
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

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[2] // self.patch_size, images.shape[3] // self.patch_size

    def forward_decoder(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (N, C, h, w), zero where hidden -> predicted patches (N, L, p*p*3)."""
        hidden = self.proj(features)
        batch, _, grid_h, grid_w = hidden.shape
        cell_mask = mask.reshape(batch, 1, grid_h, grid_w).to(hidden.dtype)
        hidden = hidden * (1.0 - cell_mask) + self.mask_token.to(hidden.dtype) * cell_mask
        pred = self.pred(self.decoder(hidden))  # (N, p*p*3, h, w), channels ordered (p, q, c)
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

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None, check_mask: bool = True):
        mask_given = mask is not None
        if not mask_given:
            grid_h, grid_w = self.grid_size(images)
            mask = random_masking(images.shape[0], grid_h * grid_w, self.mask_ratio, device=images.device)
        num_cells = check_mask_shape(images, mask)
        kept = read_keep_count(mask) if mask_given and check_mask else keep_count(num_cells, self.mask_ratio)
        features = self.encoder(images, mask, keep_count=kept)
        pred = self.forward_decoder(features, mask)
        return self.loss(images, pred, mask), pred, mask
