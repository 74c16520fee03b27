"""One training epoch for any model; the caller supplies the loss.

    stepper = GradientStepper(model, optimizer, amp="bf16", update_freq=4, clip_grad=1.0)
    for epoch in range(start_epoch, epochs):
        stats = train_one_epoch(model, loader, loss_fn, stepper, lr_scheduler, epoch, epochs)

``loss_fn(model, batch, step) -> (loss, metrics)``: ``loss`` a 0-d tensor (mean over the
micro-batch), ``metrics`` a dict of floats (this rank's values; may be empty). It runs under
autocast; ``step`` (``Step``: epoch, iteration, update) lets it seed per-iteration randomness.

Helpers, usable on their own:
* ``amp_autocast(device_type, amp)``: ``torch.autocast`` for ``"bf16"``/``"fp16"``, else a null context.
* ``GradientStepper``: backward with fp16 loss scaling (GradScaler; bf16 and fp32 need none),
  accumulation over ``update_freq`` micro-batches with DDP gradient sync only on the last,
  unscale + gradient-norm clipping, optimizer step, zero_grad; counts fp16 updates the scaler skipped.
* ``raise_if_not_finite(loss_value, step)``: ``NonFiniteLossError`` naming epoch and iteration.
* ``updates_per_epoch(num_batches, update_freq)``: a trailing partial accumulation group is dropped.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
import torch.nn as nn

from .distributed import all_reduce_mean, find_ddp, get_world_size
from .logging import ProgressMeter, TensorBoardWriter

_logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Step:
    """Where a micro-batch is: ``epoch`` and ``iteration`` (0-based, within the epoch) and the
    0-based index over the whole run of the optimizer ``update`` it contributes to."""

    epoch: int
    iteration: int
    update: int


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised on every rank at the same iteration."""


def raise_if_not_finite(loss_value: float, step: Step) -> float:
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"loss is {loss_value} at epoch {step.epoch} iteration {step.iteration} (update {step.update}); "
            "stopping, the last checkpoint is kept. Try a lower --lr/--blr, --amp bf16 instead of fp16, "
            "or --clip_grad 1.0, then resume."
        )
    return loss_value


def amp_autocast(device_type: str, amp: str) -> ContextManager:
    """Autocast to bf16/fp16 on ``device_type`` ("cuda", "cpu", "mps"); ``amp == "none"``: no-op."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AMP_DTYPES[amp])


def updates_per_epoch(num_batches: int, update_freq: int) -> int:
    return num_batches // update_freq


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest lr over param groups (with layer-wise decay: the head's)."""
    return max(group["lr"] for group in optimizer.param_groups)


def batch_size_of(batch: Any) -> int:
    """Images in ``batch``: a tensor, or a tuple/list/dict whose first item is one."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    return batch_size_of(batch[0])


class GradientStepper:
    """Everything between a micro-batch loss and an optimizer update (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        amp: str = "none",
        update_freq: int = 1,
        clip_grad: Optional[float] = None,
    ):
        if amp not in ("none", *AMP_DTYPES):
            raise ValueError(f"amp must be none, bf16 or fp16, got {amp!r}")
        self.model, self.optimizer = model, optimizer
        self.amp, self.update_freq, self.clip_grad = amp, update_freq, clip_grad
        self.device_type = next(model.parameters()).device.type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp == "fp16")
        self.skipped_updates = 0

    def autocast(self) -> ContextManager:
        return amp_autocast(self.device_type, self.amp)

    def is_update(self, iteration: int) -> bool:
        """Whether micro-batch ``iteration`` ends an accumulation group (and so steps)."""
        return (iteration + 1) % self.update_freq == 0

    def sync_context(self, iteration: int) -> ContextManager:
        """DDP ``no_sync()`` for micro-batches that only accumulate; wrap forward and backward."""
        ddp = find_ddp(self.model)
        if ddp is None or self.is_update(iteration):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def parameters(self) -> Iterable[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def backward(self, loss: torch.Tensor, iteration: int) -> bool:
        """Accumulate ``loss / update_freq``; at the end of a group, clip and step. Returns whether it stepped."""
        self.scaler.scale(loss / self.update_freq).backward()
        if not self.is_update(iteration):
            return False
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip_grad)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient is inf/NaN
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_updates += 1  # the scaler backs off only after an overflow
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_updates = int(state.get("skipped_updates", 0))


def train_one_epoch(
    model: nn.Module,
    data_loader: Iterable,
    loss_fn: Callable[[nn.Module, Any, Step], tuple[torch.Tensor, dict[str, float]]],
    stepper: GradientStepper,
    lr_scheduler,
    epoch: int,
    epochs: int,
    print_freq: int = 20,
    tensorboard: Optional[TensorBoardWriter] = None,
) -> dict[str, float]:
    """Train ``epoch`` (0-based); returns epoch means (loss, metrics) plus lr, images/s, skipped updates.

    ``lr_scheduler.step_update(update)`` (timm) sets the lr before every optimizer update. The
    loss is averaged over ranks every iteration, so a non-finite loss stops all ranks together.
    """
    model.train()
    if hasattr(getattr(data_loader, "sampler", None), "set_epoch"):
        data_loader.sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on resume
    updates = updates_per_epoch(len(data_loader), stepper.update_freq)
    iterations = updates * stepper.update_freq
    progress = ProgressMeter(epoch, epochs, iterations, print_freq, get_world_size())
    skipped_before = stepper.skipped_updates
    for iteration, batch in zip(range(iterations), data_loader):
        step = Step(epoch, iteration, epoch * updates + iteration // stepper.update_freq)
        if iteration % stepper.update_freq == 0:
            lr_scheduler.step_update(step.update)
        with stepper.sync_context(iteration):
            with stepper.autocast():
                loss, metrics = loss_fn(model, batch, step)
            loss_value = raise_if_not_finite(all_reduce_mean(loss.detach().float()).item(), step)
            stepper.backward(loss, iteration)
        metrics = {name: float(value) for name, value in metrics.items()}
        line = progress.update(iteration, loss_value, current_lr(stepper.optimizer), batch_size_of(batch), **metrics)
        if line is not None and tensorboard is not None:
            tensorboard.scalars({"loss": loss_value, "lr": current_lr(stepper.optimizer),
                                 "images_per_s": progress.images_per_second, **metrics}, step.update, "train/")
    summary = progress.summary()
    summary["skipped_updates"] = stepper.skipped_updates - skipped_before
    if summary["skipped_updates"]:
        _logger.info("fp16: the loss scaler skipped %d of %d updates this epoch (inf/NaN gradients)",
                     summary["skipped_updates"], updates)
    return summary
