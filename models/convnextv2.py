"""ConvNeXt V2 sizes, stem geometry and the dense model (timm's own implementation).

Parameter names and shapes are timm's ``convnextv2_<size>``, so a state dict of ours loads
into ``timm.create_model`` unchanged. The stem is a ``k x k`` convolution with stride ``k``
(timm's ``patch_size``; 4 in the paper, 2 for small images) over ``in_chans`` input channels;
three 2x2 stride-2 downsamplings follow, so the final-stage grid has one cell per
``total_stride(k) = 8 k`` input pixels (32, or 16 with a stride-2 stem).

A stride-2 stem is timm's ``patch_size=2`` model less one layer: for that patch size timm adds a
2x2 stride-2 downsampling to stage 0 (stage 0 then runs at stride 4 and the total stride stays
32). The small-image design (BSP36/fcmae: STL-10 at 96 px, mask patch 16) has none: stage 0 runs
at stride 2 and the total stride is 16. ``create_dense_model`` removes that layer, so our
stride-2 weights load strictly into ``create_dense_model(name, stem_stride=2)``, not into a plain
``timm.create_model(name, patch_size=2)``, which expects ``stages.0.downsample.*`` too.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

# name -> (depths, dims); published ConvNeXt V2 configurations (paper, Table 7).
MODEL_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnextv2_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnextv2_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnextv2_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextv2_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnextv2_huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def check_model_name(model_name: str) -> str:
    """Return ``model_name`` if it is a known size; raise ValueError listing the valid ones."""
    if model_name not in MODEL_CONFIGS:
        valid = ", ".join(MODEL_CONFIGS)
        raise ValueError(f"unknown model {model_name!r}; choose one of: {valid}")
    return model_name


DEFAULT_STEM_STRIDE = 4  # the paper's 4x4 stride-4 stem
DEFAULT_IN_CHANS = 3
STAGE_DOWNSAMPLING = 8  # the three 2x2 stride-2 downsamplings between the four stages


def total_stride(stem_stride: int) -> int:
    """Input pixels per side of a final-stage grid cell (= the FCMAE mask patch): 32 for the
    stride-4 stem, 16 for the stride-2 one."""
    return stem_stride * STAGE_DOWNSAMPLING


def stem_geometry(stem_weight: torch.Tensor) -> tuple[int, int]:
    """(stem stride, input channels) of a stem conv weight (C, in_chans, k, k): kernel = stride."""
    if stem_weight.ndim != 4 or stem_weight.shape[2] != stem_weight.shape[3]:
        raise ValueError(f"not a square stem convolution weight: shape {tuple(stem_weight.shape)}")
    return stem_weight.shape[2], stem_weight.shape[1]


def create_dense_model(model_name: str, stem_stride: int = DEFAULT_STEM_STRIDE, in_chans: int = DEFAULT_IN_CHANS,
                       **timm_kwargs) -> nn.Module:
    """Dense ConvNeXt V2 from timm, randomly initialised (never downloads weights), with a
    ``stem_stride`` x ``stem_stride`` stride-``stem_stride`` stem over ``in_chans`` channels."""
    check_model_name(model_name)
    if stem_stride < 1 or in_chans < 1:
        raise ValueError(f"stem_stride and in_chans must be >= 1, got {stem_stride} and {in_chans}")
    timm_kwargs.setdefault("pretrained", False)
    model = timm.create_model(model_name, patch_size=stem_stride, in_chans=in_chans, **timm_kwargs)
    if stem_stride == TIMM_STAGE0_DOWNSAMPLING_STEM:
        remove_stage0_downsampling(model.stages[0], model.feature_info)
    return model


TIMM_STAGE0_DOWNSAMPLING_STEM = 2  # the patch size for which timm downsamples in stage 0


def remove_stage0_downsampling(stage0: nn.Module, feature_info: list[dict]) -> None:
    """Make a timm ``patch_size=2`` ConvNeXt a total-stride-16 one (module docstring): stage 0's
    downsampling becomes the identity and every stage's recorded reduction halves."""
    stage0.downsample = nn.Identity()
    for stage_info in feature_info:
        stage_info["reduction"] //= 2
