"""Learning rate per optimizer update: linear warmup from 0, then half-cosine down to ``min_lr``.

``build_lr_scheduler(optimizer, epochs, warmup_epochs, updates_per_epoch, min_lr)`` returns timm's
``CosineLRScheduler`` counted in optimizer updates (``t_in_epochs=False``). Call
``scheduler.step_update(update_index)`` before update ``update_index`` (0-based over the run):

    t < W:  lr = lr_max * t / W                               (W = warmup_epochs * updates_per_epoch)
    t >= W: lr = min_lr + (lr_max - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2
    t >= T: lr = min_lr                                       (T = epochs * updates_per_epoch)

``lr_max`` is each param group's lr when the scheduler is built; groups holding ``lr_scale``
(layer-wise decay) get ``lr * lr_scale`` (timm's convention). Since the lr is a function of the
update index alone, a resumed run needs no scheduler state.
"""
from __future__ import annotations

import logging

import models  # noqa: F401  (torchvision guard before timm)
import torch
from timm.scheduler import CosineLRScheduler


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    warmup_epochs: int,
    updates_per_epoch: int,
    min_lr: float = 0.0,
) -> CosineLRScheduler:
    """Per-update warmup + half-cosine schedule over ``epochs * updates_per_epoch`` updates."""
    if updates_per_epoch < 1:
        raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch}")
    warmup_updates = warmup_epochs * updates_per_epoch
    cosine_updates = max(1, (epochs - warmup_epochs) * updates_per_epoch)
    # timm warns that a 1-update cosine "will have no effect"; here that is the intended schedule
    # (e.g. warmup over every epoch), so the warning would only mislead a run's log
    timm_logger = logging.getLogger(CosineLRScheduler.__module__)
    level = timm_logger.level
    timm_logger.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(
            optimizer,
            t_initial=cosine_updates,
            lr_min=min_lr,
            warmup_t=warmup_updates,
            warmup_lr_init=0.0,
            warmup_prefix=True,  # the cosine starts after the warmup, as in MAE / ConvNeXt V2
            cycle_limit=1,
            t_in_epochs=False,
        )
    finally:
        timm_logger.setLevel(level)
