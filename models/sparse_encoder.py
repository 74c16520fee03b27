"""Sparse ConvNeXt V2 encoder for FCMAE: one set of timm parameters, several backends.

The encoder owns timm's own ``stem`` and ``stages`` modules (``create_dense_model``), so
``state_dict()`` has exactly timm's key names (minus ``head.*``) and loads into
``create_dense_model(name, stem_stride, in_chans, num_classes=0)``. How the blocks run over the
visible positions is a backend's business (``models/backends/<name>.py``, each exporting
``encode(encoder, images, visible_cells)``). The mask is the visible cells of ``models.masks``.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from .convnextv2 import DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE, MODEL_CONFIGS, create_dense_model, total_stride
from .masks import check_visible_cells

# backend name -> what it is for (README lists the same)
BACKENDS = {
    "sparse": "pure PyTorch; per-position work only on visible positions (default)",
    "masked": "dense convolutions with binary masks; reference semantics, full dense cost",
    "minkowski": "MinkowskiEngine sparse tensors (optional extra, built from source)",
}


def get_backend(name: str):
    """The ``encode(encoder, images, visible_cells)`` function of backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__package__}.backends.{name}").encode


class SparseConvNeXtV2(nn.Module):
    """ConvNeXt V2 feature extractor that computes only on visible positions.

    Args:
        model_name: ``convnextv2_<size>``.
        backend: ``"sparse"`` | ``"masked"`` | ``"minkowski"``; changeable at any time.
        drop_path_rate: stochastic depth, as in timm.
        stem_stride: the stem conv's kernel and stride: 4 (the paper) or 2 (small images, see
            ``models.convnextv2``); the final-stage grid cell, ``total_stride``, is 8 x this.
        in_chans: input image channels.
    """

    def __init__(self, model_name: str, backend: str = "sparse", drop_path_rate: float = 0.0,
                 stem_stride: int = DEFAULT_STEM_STRIDE, in_chans: int = DEFAULT_IN_CHANS):
        super().__init__()
        dense = create_dense_model(model_name, stem_stride, in_chans, num_classes=0, drop_path_rate=drop_path_rate)
        self.model_name = model_name
        self.depths, self.dims = MODEL_CONFIGS[model_name]
        self.stem_stride, self.in_chans = stem_stride, in_chans
        self.total_stride = total_stride(stem_stride)
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

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """(H / total_stride, W / total_stride): the final-stage grid of (N, C, H, W) ``images``."""
        return images.shape[2] // self.total_stride, images.shape[3] // self.total_stride

    def forward(self, images: torch.Tensor, visible_cells: torch.Tensor) -> torch.Tensor:
        """Encode the visible part of ``images``.

        Args:
            images: (N, in_chans, H, W), H and W multiples of ``total_stride`` (32, or 16 with a
                stride-2 stem).
            visible_cells: (N, K) int64, each image's visible cells ascending, L = grid cells
                (``models.masks``: from ``fcmae.random_visible_cells`` or, for a 0/1 mask,
                ``models.visible_cells_from_mask``). Only its shape is checked here: the forward
                never waits for the device.
        Returns:
            (N, dims[-1], H / total_stride, W / total_stride) features, exactly zero at hidden cells.
        """
        self.check_inputs(images, visible_cells)
        return self._encode(self, images, visible_cells)

    def check_inputs(self, images: torch.Tensor, visible_cells: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` and ``visible_cells`` have the shapes ``forward`` takes."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must be (N, {self.in_chans}, H, W) for this {self.in_chans}-channel encoder, "
                             f"got shape {tuple(images.shape)}")
        height, width = images.shape[2:]
        if height % self.total_stride or width % self.total_stride:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of {self.total_stride} (the total stride of a "
                f"stride-{self.stem_stride} stem); resize or crop to a multiple of {self.total_stride} "
                f"(e.g. {7 * self.total_stride})"
            )
        grid_h, grid_w = self.grid_size(images)
        check_visible_cells(visible_cells, images.shape[0], grid_h * grid_w)
