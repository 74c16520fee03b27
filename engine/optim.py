"""AdamW for ConvNeXt V2 training and the linear lr scaling rule.

* ``scaled_lr(blr, effective_batch_size) = blr * effective_batch_size / 256``.
* ``effective_batch_size(batch_size, update_freq, world_size)``: images per optimizer update.
* ``build_adamw(model, lr, weight_decay, betas, param_group_fn=None)``: timm's
  ``create_optimizer_v2``; weight decay only on >= 2-D weights, none on biases, norms and GRN
  gamma/beta (all 1-D) or on the names ``model.no_weight_decay()`` returns (the FCMAE mask token).
  Fine-tuning passes ``param_group_fn`` for its own groups (layer-wise lr decay). Fused
  kernel on CUDA.
"""
from __future__ import annotations

from typing import Callable, Optional

import models  # noqa: F401  (torchvision guard before timm)
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

LR_REFERENCE_BATCH = 256  # lr = blr * effective batch / 256 (Goyal et al. linear scaling, as in MAE)


def effective_batch_size(batch_size: int, update_freq: int, world_size: int) -> int:
    return batch_size * update_freq * world_size


def scaled_lr(blr: float, effective_batch: int) -> float:
    return blr * effective_batch / LR_REFERENCE_BATCH


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    param_group_fn: Optional[Callable[[nn.Module], list]] = None,
) -> torch.optim.Optimizer:
    """AdamW over ``model`` (unwrapped: not DDP / torch.compile) with decay-free groups as above;
    the fused CUDA kernel (one launch for all parameters) when every parameter is on CUDA."""
    on_cuda = all(param.is_cuda for param in model.parameters())
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, betas=betas,
                               param_group_fn=param_group_fn, **({"fused": True} if on_cuda else {}))
