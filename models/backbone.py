"""ConvNeXt V2 backbones for detection and segmentation: timm ``features_only`` models.

    backbone = models.create_backbone("convnextv2_base", "encoder.safetensors", drop_path_rate=0.4)
    maps = backbone(images)                  # [(N, dims[i], H / (s * 2**i), W / (s * 2**i)) for i in out_indices]
    backbone.feature_info.channels()         # [128, 256, 512, 1024]
    backbone.feature_info.reduction()        # [4, 8, 16, 32]; [2, 4, 8, 16] with a stride-2 stem (s = 2)

The maps are the stage outputs, the same numbers as ``FeatureExtractor.stages``; the model is
the one ``timm.create_model(name, features_only=True)`` builds, so any framework that takes a
list of feature maps (mmdetection/detectron2 wrappers, segmentation heads) can use it.

* ``backbone_param_groups(backbone, ...)``: layer-wise lr decay groups (``models.layer_decay``,
  the rules of the classification recipes) for the backbone, plus, with ``model=detector``,
  groups at the full lr for every other parameter of the detector (neck, heads).
* ``FeaturePyramidBackbone(backbone, out_channels)``: the backbone followed by torchvision's
  ``FeaturePyramidNetwork``, what torchvision's ``MaskRCNN``/``FasterRCNN`` take as ``backbone``.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import timm
import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .checkpoint import load_pretrained
from .convnextv2 import (DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE, MODEL_CONFIGS, TIMM_STAGE0_DOWNSAMPLING_STEM,
                         check_model_name, remove_stage0_downsampling, stem_geometry)
from .layer_decay import param_groups_layer_decay

NUM_STAGES = 4
_FEATURES_NAME = re.compile(r"^(stem|stages)_(\d+)\.")  # features_only names: stem_0.weight, stages_2.blocks...
_TIMM_NAME = re.compile(r"^(stem|stages)\.(\d+)\.")  # the classification model's: stem.0.weight, stages.2.blocks...


def create_backbone(
    model_name: str,
    checkpoint: str | os.PathLike | None = None,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    drop_path_rate: float = 0.0,
    strict_encoder: bool = True,
    stem_stride: int | None = None,
    in_chans: int | None = None,
    **timm_kwargs,
) -> nn.Module:
    """timm ``features_only`` ConvNeXt V2 returning the outputs of stages ``out_indices``.

    Args:
        model_name: ``convnextv2_<size>``.
        checkpoint: any file ``models.load_pretrained`` reads (our checkpoints and
            ``encoder.safetensors``, official FCMAE, fine-tuned and MinkowskiEngine files);
            None: random initialisation. Its classifier and head norm are not used.
        out_indices: stages whose outputs are returned, increasing, each in 0..3 (stride
            ``stem_stride * 2**i``); stages after the last one are not built.
        drop_path_rate: stochastic depth over all blocks, as in timm.
        strict_encoder: as in ``load_pretrained`` (mismatches raise ValueError, or only warn).
        stem_stride, in_chans: stem stride (4 or 2) and input channels; None: the checkpoint's
            (4 and 3 without one). A value other than the checkpoint's adapts its stem, as
            ``load_pretrained`` does.
        **timm_kwargs: passed to ``timm.create_model``.
    Returns:
        timm's ``FeatureListNet``: ``forward(images) -> list of maps``, ``feature_info``.
    """
    check_model_name(model_name)
    out_indices = tuple(out_indices)
    if not out_indices or list(out_indices) != sorted(set(out_indices)) or \
            not all(0 <= index < NUM_STAGES for index in out_indices):
        raise ValueError(f"out_indices must be increasing stage indices in 0..{NUM_STAGES - 1}, got {out_indices}")
    dense = None
    if checkpoint is not None:
        dense = load_pretrained(model_name, checkpoint, num_classes=0, strict_encoder=strict_encoder,
                                stem_stride=stem_stride, in_chans=in_chans)
        stem_stride, in_chans = stem_geometry(dense.stem[0].weight)
    timm_kwargs.update(drop_path_rate=drop_path_rate, pretrained=False, patch_size=stem_stride or DEFAULT_STEM_STRIDE,
                       in_chans=in_chans or DEFAULT_IN_CHANS)
    backbone = timm.create_model(model_name, features_only=True, out_indices=out_indices, **timm_kwargs)
    if timm_kwargs["patch_size"] == TIMM_STAGE0_DOWNSAMPLING_STEM:
        remove_stage0_downsampling(backbone.stages_0, backbone.feature_info.info)
    if dense is not None:
        wanted = backbone.state_dict()
        state = {key: value for key, value in _features_names(dense.state_dict().items()) if key in wanted}
        backbone.load_state_dict(state, strict=strict_encoder)
    return backbone


def backbone_param_groups(
    backbone: nn.Module,
    weight_decay: float,
    layer_decay: float,
    decay_type: str = "single",
    lr: float | None = None,
    model: nn.Module | None = None,
) -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay for a ``create_backbone`` model.

    Backbone parameters get the layer ids and lr scales of the classification recipes
    (``models.layer_decay``: ``single`` for any size, ``group`` for depths 3,3,27,3), the
    stem the smallest scale. With ``model`` (e.g. the detector holding ``backbone``), its other
    trainable parameters are added at lr scale 1, like the classifier of fine-tuning. No weight
    decay on 1-D tensors, biases and GRN. Each group has ``params``, ``weight_decay``,
    ``lr_scale`` and ``param_names`` (backbone parameters under timm's classification names);
    with ``lr`` also ``lr = lr * lr_scale``, for optimizers and schedulers that ignore ``lr_scale``
    (timm's schedulers apply it themselves).
    """
    architecture = backbone.pretrained_cfg.get("architecture") if hasattr(backbone, "pretrained_cfg") else None
    if architecture not in MODEL_CONFIGS:
        raise ValueError(f"backbone must come from models.create_backbone (a ConvNeXt V2 features_only model); "
                         f"its architecture is {architecture!r}")
    depths = MODEL_CONFIGS[architecture][0]
    named = list(_timm_names(backbone.named_parameters()))
    if model is not None:
        in_backbone = {id(parameter) for parameter in backbone.parameters()}
        # "detector." keeps their names clear of the stem./stages. patterns: layer id = the head's
        named += [(f"detector.{name}", parameter) for name, parameter in model.named_parameters()
                  if id(parameter) not in in_backbone]
    groups = param_groups_layer_decay(_NamedParameters(named), depths, weight_decay, layer_decay, decay_type)
    if lr is not None:
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
    return groups


class FeaturePyramidBackbone(nn.Module):
    """``backbone`` (``create_backbone``) followed by torchvision's ``FeaturePyramidNetwork``.

    forward(images (N, C, H, W)) -> OrderedDict of (N, out_channels, h, w) maps: ``"0"``, ``"1"``, ...
    one per out index (strides 4, 8, 16, 32 for all four stages; half that with a stride-2 stem),
    then ``"pool"`` (twice the last stride, from ``LastLevelMaxPool``). Has ``out_channels``, so it
    is what torchvision's ``MaskRCNN``, ``FasterRCNN`` and ``RetinaNet`` take as ``backbone``; their
    default anchor generator and ``MultiScaleRoIAlign(["0", "1", "2", "3"])`` expect these five maps.
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 256, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(images)
        return self.fpn(OrderedDict((str(index), feature_map) for index, feature_map in enumerate(maps)))


class _NamedParameters:
    """(name, parameter) pairs behind the ``named_parameters()`` that ``param_groups_layer_decay`` reads."""

    def __init__(self, pairs: list[tuple[str, nn.Parameter]]):
        self.pairs = pairs

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        return iter(self.pairs)


def _features_names(items):
    """Classification-model names -> ``features_only`` names (``stem.0.`` -> ``stem_0.``)."""
    return ((_TIMM_NAME.sub(r"\1_\2.", key), value) for key, value in items)


def _timm_names(items):
    """``features_only`` names -> classification-model names (``stages_2.`` -> ``stages.2.``)."""
    return ((_FEATURES_NAME.sub(r"\1.\2.", key), value) for key, value in items)
