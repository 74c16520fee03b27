"""Exponential moving average of the weights, updated after every optimizer update.

timm's ``ModelEmaV3`` keeps the copy: after each update, ``ema = decay * ema + (1 - decay) * w``
for every parameter and buffer (constant decay: no warmup, as in the official recipe with decay
0.9999). ``EmaGradientStepper`` is engine's ``GradientStepper`` that also updates the EMA
whenever it steps the optimizer, so the shared training loop needs no EMA hook.
"""
from __future__ import annotations

from typing import Optional

import models  # noqa: F401  (torchvision guard before timm)
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from .loop import GradientStepper


def build_model_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """EMA copy of ``model`` (unwrapped: not DDP / torch.compile), on the same device and dtype."""
    return ModelEmaV3(model, decay=decay)


class EmaGradientStepper(GradientStepper):
    """``GradientStepper`` that calls ``ema.update(ema_source)`` after each optimizer step.

    ``ema_source`` is the unwrapped model whose weights the EMA follows; ``ema`` None makes this
    a plain ``GradientStepper``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[ModelEmaV3],
                 ema_source: nn.Module, **stepper_kwargs):
        super().__init__(model, optimizer, **stepper_kwargs)
        self.ema, self.ema_source = ema, ema_source

    def backward(self, loss: torch.Tensor, iteration: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        updated = super().backward(loss, iteration)
        if updated is not None and self.ema is not None:
            self.ema.update(self.ema_source)
        return updated
