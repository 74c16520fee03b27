"""Layer-wise learning-rate decay for ConvNeXt V2, on timm parameter names: layer ids and param groups.

Every parameter gets a layer id; its learning rate is scaled by
``layer_decay ** (num_layers + 1 - layer_id)``, so the head trains at the full rate and the
stem at the smallest. Two assignments, those of the official recipes (docs/RECIPES.md):

* ``single`` (``num_layers = sum(depths)``): one id per block. The stem and the downsample
  before stage ``i`` share the id ``sum(depths[:i]) + 1`` with the first block of stage ``i``;
  block ``j`` of stage ``i`` gets ``sum(depths[:i]) + j + 1``; the head ``sum(depths) + 1``.
* ``group`` (``num_layers = 12``, meant for depths 3,3,27,3): stage 2's 27 blocks in groups of
  three, ids 3..11. Stem 0; downsample before stage 1 or 2: ``i + 1``, before stage 3: 12;
  stage 0 and 1 blocks: ``i + 1``; stage 2 block ``j``: ``3 + j // 3``; stage 3 blocks: 12;
  the head 13.

timm names: ``stem.*`` (the downsample before stage 0), ``stages.<i>.downsample.*``,
``stages.<i>.blocks.<j>.*``, ``head.*``.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

DECAY_TYPES = ("single", "group")
GROUP_NUM_LAYERS = 12
GROUP_DEPTHS = (3, 3, 27, 3)

_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def num_layers(depths: Sequence[int], decay_type: str) -> int:
    """The ``num_layers`` of the scale formula: ``sum(depths)`` (single) or 12 (group)."""
    _check_decay_type(decay_type)
    return sum(depths) if decay_type == "single" else GROUP_NUM_LAYERS


def layer_id(name: str, depths: Sequence[int], decay_type: str) -> int:
    """Layer id of the parameter ``name`` (timm ConvNeXt naming), 0..num_layers + 1."""
    _check_decay_type(decay_type)
    stage, block = _stage_and_block(name)
    if decay_type == "single":
        if stage is None:
            return sum(depths) + 1
        return sum(depths[:stage]) + (block if block is not None else 0) + 1
    if stage is None:
        return GROUP_NUM_LAYERS + 1
    if block is None:  # stem (stage 0) or a downsample
        return {0: 0, 1: 2, 2: 3}.get(stage, GROUP_NUM_LAYERS)
    if stage in (0, 1):
        return stage + 1
    if stage == 2:
        return 3 + block // 3
    return GROUP_NUM_LAYERS


def lr_scale(name: str, depths: Sequence[int], decay_type: str, layer_decay: float) -> float:
    """``layer_decay ** (num_layers + 1 - layer_id(name))``."""
    return layer_decay ** (num_layers(depths, decay_type) + 1 - layer_id(name, depths, decay_type))


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    """No weight decay on 1-D tensors (norms), biases and GRN gamma/beta (any shape)."""
    return param.ndim <= 1 or name.endswith(".bias") or ".grn." in name


def param_groups_layer_decay(
    model: nn.Module,
    depths: Sequence[int],
    weight_decay: float,
    layer_decay: float,
    decay_type: str,
    skip_weight_decay: Callable[[str, torch.Tensor], bool] = skips_weight_decay,
) -> list[dict]:
    """Optimizer parameter groups, one per (layer id, decayed or not).

    Each group has ``params``, ``weight_decay`` (0 where ``skip_weight_decay(name, param)``),
    ``lr_scale`` (the per-iteration schedule multiplies its lr by it), ``layer_id`` and
    ``param_names``. Frozen parameters (``requires_grad=False``) are left out.
    """
    _check_decay_type(decay_type)
    if decay_type == "group" and tuple(depths) != GROUP_DEPTHS:
        warnings.warn(
            f"--layer_decay_type group is meant for depths {GROUP_DEPTHS} (base/large/huge); "
            f"this model has depths {tuple(depths)}, use 'single'", stacklevel=2)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depths, decay_type)
        decayed = not skip_weight_decay(name, param)
        group = groups.setdefault((layer, decayed), {
            "params": [],
            "param_names": [],
            "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": lr_scale(name, depths, decay_type, layer_decay),
            "layer_id": layer,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def _stage_and_block(name: str) -> tuple[int | None, int | None]:
    """(stage, block) of a parameter: (0, None) for the stem, (i, None) for a downsample,
    (i, j) for a block, (None, None) for anything after the stages."""
    if name.startswith("stem."):
        return 0, None
    if match := _DOWNSAMPLE.match(name):
        return int(match.group(1)), None
    if match := _BLOCK.match(name):
        return int(match.group(1)), int(match.group(2))
    return None, None


def _check_decay_type(decay_type: str) -> None:
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"--layer_decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
