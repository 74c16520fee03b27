"""Pictures of what FCMAE reconstructs: one row per image, four columns

    original | masked input (hidden patches grey) | prediction | prediction with the visible patches pasted in

* ``predicted_images(images, pred, norm_pix_loss)``: (N, L, 32*32*3) predictions -> (N, 3, H, W) in the
  input's space; with ``norm_pix_loss`` each patch is un-normalised with the mean/std of the
  matching target patch (the statistics the loss normalised it with).
* ``reconstruction_grid(images, pred, mask, norm_pix_loss)``: the (3, H', W') grid in [0, 1].
* ``visualize_reconstructions(model, images, mask)``: runs ``model`` (no grad) and returns the grid.
* ``save_png(grid, path)``.

``images`` are normalised with ImageNet mean/std (``engine.data`` transforms) unless other
``mean``/``std`` are passed.
"""
from __future__ import annotations

import os
from typing import Sequence

import models  # noqa: F401  (torchvision guard before torchvision)
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid, save_image

from .model import FCMAE, patchify, unpatchify

HIDDEN_GREY = 0.5  # display value of hidden patches in the "masked input" column


def predicted_images(
    images: torch.Tensor, pred: torch.Tensor, norm_pix_loss: bool, patch_size: int = 32
) -> torch.Tensor:
    """(N, L, p*p*3) predicted patches -> (N, 3, H, W) in the space of ``images``."""
    pred = pred.float()
    if norm_pix_loss:
        target = patchify(images.float(), patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    grid_size = (images.shape[2] // patch_size, images.shape[3] // patch_size)
    return unpatchify(pred, grid_size, patch_size)


def _pixel_mask(mask: torch.Tensor, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, L) cell mask -> (N, 1, H, W), 1 = hidden pixel."""
    grid_h, grid_w = images.shape[2] // patch_size, images.shape[3] // patch_size
    cells = mask.float().reshape(-1, 1, grid_h, grid_w)
    return cells.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def reconstruction_grid(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    norm_pix_loss: bool,
    max_images: int = 8,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    patch_size: int = 32,
) -> torch.Tensor:
    """Grid (3, H', W') in [0, 1] of up to ``max_images`` rows (columns: see module docstring).

    images: (N, 3, H, W) normalised with ``mean``/``std``; pred: (N, L, p*p*3) model output;
    mask: (N, L), 1 = hidden.
    """
    images, pred, mask = images[:max_images].detach().cpu(), pred[:max_images].detach().cpu(), mask[:max_images].cpu()
    mean_t = torch.tensor(mean).reshape(1, 3, 1, 1)
    std_t = torch.tensor(std).reshape(1, 3, 1, 1)

    def to_display(normalised: torch.Tensor) -> torch.Tensor:
        return (normalised.float() * std_t + mean_t).clamp(0.0, 1.0)

    hidden = _pixel_mask(mask, images, patch_size)
    original = to_display(images)
    prediction = to_display(predicted_images(images, pred, norm_pix_loss, patch_size))
    masked_input = original * (1 - hidden) + HIDDEN_GREY * hidden
    pasted = original * (1 - hidden) + prediction * hidden
    rows = torch.stack([original, masked_input, prediction, pasted], dim=1).flatten(0, 1)  # (N*4, 3, H, W)
    return make_grid(rows, nrow=4, padding=2, pad_value=1.0)


@torch.no_grad()
def visualize_reconstructions(
    model: FCMAE, images: torch.Tensor, mask: torch.Tensor, max_images: int = 8
) -> torch.Tensor:
    """Run ``model`` (an unwrapped FCMAE) on ``images`` with ``mask`` and return the grid."""
    was_training = model.training
    model.eval()
    _, pred, mask = model(images, mask)
    model.train(was_training)
    return reconstruction_grid(images, pred, mask, model.norm_pix_loss, max_images)


def save_png(grid: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a (3, H, W) [0, 1] grid as PNG."""
    save_image(grid, os.fspath(path))
