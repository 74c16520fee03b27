"""Sparse ConvNeXt V2 encoder for FCMAE: one set of timm parameters, several backends.

The encoder owns timm's own ``stem`` and ``stages`` modules, so ``state_dict()`` has exactly
timm's key names (minus ``head.*``) and loads into ``timm.create_model(name, num_classes=0)``.
How the blocks run over the visible positions is a backend's business
(``models/backends/<name>.py``, each exporting ``encode(encoder, images, mask, keep_count)``).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn as nn

from .convnextv2 import MODEL_CONFIGS, create_dense_model

# backend name -> what it is for (README lists the same)
BACKENDS = {
    "sparse": "pure PyTorch; per-position work only on visible positions (default)",
    "masked": "dense convolutions with binary masks; reference semantics, full dense cost",
    "minkowski": "MinkowskiEngine sparse tensors (optional extra, built from source)",
}

TOTAL_STRIDE = 32  # input pixels per cell of the final-stage grid (= FCMAE patch size)


def get_backend(name: str):
    """The ``encode(encoder, images, mask, keep_count)`` function of backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__package__}.backends.{name}").encode


class SparseConvNeXtV2(nn.Module):
    """ConvNeXt V2 feature extractor that computes only on visible positions.

    Args:
        model_name: ``convnextv2_<size>``.
        backend: ``"sparse"`` | ``"masked"`` | ``"minkowski"``; changeable at any time.
        drop_path_rate: stochastic depth, as in timm.
    """

    def __init__(self, model_name: str, backend: str = "sparse", drop_path_rate: float = 0.0):
        super().__init__()
        dense = create_dense_model(model_name, num_classes=0, drop_path_rate=drop_path_rate)
        self.model_name = model_name
        self.depths, self.dims = MODEL_CONFIGS[model_name]
        self.stem = dense.stem
        self.stages = dense.stages
        self.backend = backend
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (timm's name):
        activation memory drops to about the blocks' inputs, at the cost of a second forward of the blocks."""
        self.grad_checkpointing = enable

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        # resolved here, not per forward: torch.compile cannot trace an import
        self._encode = get_backend(name)
        self._backend = name

    def forward(self, images: torch.Tensor, mask: torch.Tensor, keep_count: Optional[int] = None) -> torch.Tensor:
        """Encode the visible part of ``images``.

        Args:
            images: (N, 3, H, W), H and W multiples of 32.
            mask: (N, L) float, 1 = hidden, L = (H/32) * (W/32); every image hides the same count.
            keep_count: visible cells per image, when the caller knows it from how the mask was
                made (``fcmae.keep_count(L, ratio)`` for ``fcmae.random_masking(N, L, ratio)``);
                the mask's values are then not read, so the forward never waits for the device.
                None: the mask is checked and its count read here (one host-device sync).
        Returns:
            (N, dims[-1], H/32, W/32) features, exactly zero at hidden cells.
        """
        num_cells = check_mask_shape(images, mask)
        if keep_count is None:
            keep_count = read_keep_count(mask)
        elif not 1 <= keep_count <= num_cells:
            raise ValueError(f"keep_count must be in [1, {num_cells}] for {num_cells} cells, got {keep_count}")
        return self._encode(self, images, mask, keep_count)


def check_mask_shape(images: torch.Tensor, mask: torch.Tensor) -> int:
    """Raise ValueError unless ``images`` and ``mask`` have the shapes of ``SparseConvNeXtV2.forward``;
    returns L. Reads shapes only, never the device."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if height % TOTAL_STRIDE or width % TOTAL_STRIDE:
        raise ValueError(
            f"input size {height}x{width} is not a multiple of {TOTAL_STRIDE}; "
            f"resize or crop to a multiple of {TOTAL_STRIDE} (e.g. 224)"
        )
    grid_cells = (height // TOTAL_STRIDE) * (width // TOTAL_STRIDE)
    if mask.shape != (batch, grid_cells):
        raise ValueError(f"mask must be (N, L) = ({batch}, {grid_cells}) for {height}x{width} input, "
                         f"got {tuple(mask.shape)}")
    return grid_cells


def read_keep_count(mask: torch.Tensor) -> int:
    """Visible cells per image of a (N, L) mask (1 = hidden), checked: values 0 or 1, the same
    count in every image, at least one. One host-device sync; raises ValueError."""
    hidden_counts = mask.sum(dim=1)
    well_formed = ((mask == 0) | (mask == 1)).all() & (hidden_counts == hidden_counts[0]).all()
    kept = int(torch.where(well_formed, mask.shape[1] - hidden_counts[0], -1).item())  # the one read
    if kept < 0:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask values must be 0 (visible) or 1 (hidden)")
        raise ValueError("every image must hide the same number of cells (use fcmae.random_masking)")
    if kept < 1:
        raise ValueError("mask hides every cell; keep at least one visible (mask_ratio < 1)")
    return kept
