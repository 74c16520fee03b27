"""Checkpoints in every layout ``models.load_pretrained`` reads, fabricated for tests (no tests here).

Files are written from a dense timm model whose every tensor (GRN, norms and biases included)
is random, so a tensor mapped to the wrong place, transposed or left at its initialisation
changes the output. The official layouts are built here independently of ``models.checkpoint``
from the published key names and shapes.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

import models  # noqa: F401  (torchvision guard before timm)
from models.convnextv2 import create_dense_model

FCMAE_DECODER_KEYS = ("proj.weight", "mask_token", "decoder.0.conv_dw.weight", "pred.weight")
LAYOUTS = ("timm_encoder", "encoder_safetensors", "fcmae_training", "official_fcmae", "official_finetuned",
           "official_minkowski")


def randomised_model(model_name: str, num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_dense_model(model_name, num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    return model.eval()


def encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``FCMAE.encoder.state_dict()`` holds: timm names minus ``head.*``."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def fcmae_training_checkpoint(encoder: dict[str, torch.Tensor], **extra) -> dict:
    """A pretraining checkpoint: whole FCMAE model under "model" (encoder + decoder)."""
    state = {f"encoder.{k}": v for k, v in encoder.items()}
    state.update({k: torch.randn(4, 4) for k in FCMAE_DECODER_KEYS})
    return {"model": state, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}, **extra}


def to_official_dense(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names -> released ConvNeXt V2 file names; pwconv as Linear, GRN (1, 1, 1, 4C)."""
    official = {}
    for key, value in timm_state.items():
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        if ".pwconv" in key and key.endswith(".weight"):
            value = value.flatten(1)
        if ".grn." in key:
            value = value.reshape(1, 1, 1, -1)
        official[key] = value
    return official


def minkowski_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d weight (out, in, k, k) -> ME kernel (k*k, in, out), offset t = w * k + h (the
    order documented in models.checkpoint); depthwise (C, 1, k, k) -> (k*k, C)."""
    out_channels, in_channels, size, _ = weight.shape
    kernel = torch.empty(size * size, in_channels, out_channels)
    for h in range(size):
        for w in range(size):
            kernel[w * size + h] = weight[:, :, h, w].T
    return kernel[:, 0, :] if in_channels == 1 else kernel


def to_official_minkowski(official_dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released dense encoder names -> the official sparse FCMAE encoder's tensors."""
    sparse = {}
    for key, value in official_dense.items():
        if key.startswith("downsample_layers.0."):  # the stem runs dense
            sparse[key] = value
            continue
        downsample = re.match(r"downsample_layers\.\d\.(\d)\.(weight|bias)$", key)
        if downsample and downsample.group(1) == "0":
            key = key.replace(".0.", ".0.ln.")
        elif downsample or ".dwconv." in key:
            if key.endswith(".weight"):
                key, value = key[: -len("weight")] + "kernel", minkowski_kernel(value)
            else:
                value = value.reshape(1, -1)
        elif ".norm." in key:
            key = key.replace(".norm.", ".norm.ln.")
        elif ".pwconv" in key:
            key = re.sub(r"\.(weight|bias)$", r".linear.\1", key)
        elif ".grn." in key:
            value = value.reshape(1, -1)
        sparse[key] = value
    return sparse



def write_layout(layout: str, source: torch.nn.Module, folder: Path) -> Path:
    """Write ``source`` (a dense timm model) to ``folder`` in ``layout`` (one of ``LAYOUTS``);
    the classifier is written only for ``official_finetuned``."""
    encoder = encoder_state(source)
    if layout == "timm_encoder":
        path = folder / "encoder.pt"
        torch.save(encoder, path)
    elif layout == "encoder_safetensors":
        from safetensors.torch import save_file

        path = folder / "encoder.safetensors"
        save_file(encoder, path)
    elif layout == "fcmae_training":
        path = folder / "checkpoint-3.pth"
        torch.save(fcmae_training_checkpoint(encoder), path)
    elif layout == "official_fcmae":
        path = folder / "convnextv2_fcmae.pt"
        torch.save({"model": to_official_dense(encoder)}, path)
    elif layout == "official_finetuned":
        path = folder / "convnextv2_ema.pt"
        torch.save({"model": to_official_dense(source.state_dict())}, path)
    elif layout == "official_minkowski":
        path = folder / "checkpoint-799.pth"
        sparse = to_official_minkowski(to_official_dense(encoder))
        torch.save(fcmae_training_checkpoint(sparse, args=argparse.Namespace(blr=1.5e-4)), path)
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return path
