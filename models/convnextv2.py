"""ConvNeXt V2 sizes and the dense model (timm's own implementation).

Parameter names and shapes are timm's ``convnextv2_<size>``, so a state dict of ours loads
into ``timm.create_model`` unchanged.
"""
from __future__ import annotations

import timm
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


def create_dense_model(model_name: str, **timm_kwargs) -> nn.Module:
    """Dense ConvNeXt V2 from timm, randomly initialised (never downloads weights)."""
    check_model_name(model_name)
    timm_kwargs.setdefault("pretrained", False)
    return timm.create_model(model_name, **timm_kwargs)
