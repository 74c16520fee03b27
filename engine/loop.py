"""The training loop of one epoch, for any model; the caller supplies the loss.

    for step in train_updates(model, batches, loss_fn, stepper, lr_scheduler, progress, epoch=epoch):
        ...                                  # after each optimizer update: checkpoint, stop, ...
    stats = progress.summary()

``loss_fn(model, batch, step) -> (loss, metrics)``: ``loss`` a 0-d tensor (mean over the
micro-batch), ``metrics`` a dict of 0-d tensors (this rank's values; may be empty). It runs under
autocast; ``step`` (``Step``: epoch, iteration, update) lets it seed per-iteration randomness.
Nothing here reads the device: ``engine.progress`` reads the metrics at log points;
``engine.stepper`` does backward, accumulation and the updates.

``train_one_epoch`` runs a whole epoch and returns its summary (for scripts and tests).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from .distributed import get_rank
from .flops import batch_size_of, count_step_flops
from .logging import TensorBoardWriter
from .progress import EpochProgress
from .seeding import derive_seed, seed_everything
from .stepper import GradientStepper

_logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, "Step"], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class Step:
    """Where a micro-batch is: ``epoch`` and ``iteration`` (0-based, within the epoch) and the
    0-based index over the whole run of the optimizer ``update`` it contributes to."""

    epoch: int
    iteration: int
    update: int


def epoch_batches(data_loader: Iterable, epoch: int, skip_batches: int = 0) -> Iterator:
    """``data_loader``'s batches of ``epoch`` from batch ``skip_batches`` on. A sampler with
    ``set_epoch(epoch, skip=samples)`` starts there; with a plain ``set_epoch(epoch)`` the
    skipped batches are loaded and dropped (slower, same batches)."""
    sampler = getattr(data_loader, "sampler", None)
    batch_size = getattr(data_loader, "batch_size", None) or 1
    if skip_batches and hasattr(sampler, "set_epoch"):
        try:
            sampler.set_epoch(epoch, skip=skip_batches * batch_size)
            return iter(data_loader)
        except TypeError:  # this sampler cannot skip
            pass
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on resume
    batches = iter(data_loader)
    for _ in range(skip_batches):
        next(batches)
    return batches


def train_updates(model: nn.Module, batches: Iterator, loss_fn: LossFn, stepper: GradientStepper, lr_scheduler,
                  progress: EpochProgress, *, epoch: int, start_iteration: int = 0,
                  reseed: Optional[Callable[[Step], None]] = None) -> Iterator[Step]:
    """Train ``epoch`` from micro-batch ``start_iteration`` (an update boundary) to
    ``progress.iterations``; yields each optimizer update's ``Step`` once it is done (and logged,
    at log points). ``lr_scheduler.step_update(update)`` (timm) sets the lr before each update;
    ``reseed(step)`` runs before each micro-batch and its loading."""
    model.train()
    updates = stepper.updates_per_epoch(progress.iterations)
    for iteration in range(start_iteration, progress.iterations):
        step = Step(epoch, iteration, epoch * updates + iteration // stepper.update_freq)
        if reseed is not None:
            reseed(step)
        batch = next(batches)
        if stepper.starts_update(iteration):
            lr_scheduler.step_update(step.update)
        with stepper.micro_batch(iteration):
            with stepper.autocast():
                loss, metrics = loss_fn(model, batch, step)
            stepper.backward(loss)
        progress.add_micro_batch(iteration, loss, metrics, batch_size_of(batch))
        if stepper.ends_update(iteration):
            progress.add_update(*stepper.step())
            if progress.is_log_point(iteration):
                progress.log_point(step)
            yield step


def reseed_every_micro_batch(seed: int, rank: int) -> Callable[[Step], None]:
    """Every RNG of this process reseeded from (seed, epoch, iteration, rank): a run resumed at any
    update boundary draws what the uninterrupted run drew."""
    return lambda step: seed_everything(derive_seed(seed, step.epoch, step.iteration, rank))


def train_one_epoch(model: nn.Module, data_loader: Iterable, loss_fn: LossFn, stepper: GradientStepper,
                    lr_scheduler, epoch: int, epochs: int, print_freq: int = 20,
                    tensorboard: Optional[TensorBoardWriter] = None, *, seed: Optional[int] = None,
                    peak_tflops: Optional[float] = None) -> dict[str, float]:
    """Train all of ``epoch`` (0-based); returns the epoch means (loss, metrics, grad_norm) plus
    lr, images/s, skipped updates and (with ``peak_tflops``, the device's peak) MFU. ``seed``:
    reseed every micro-batch (``reseed_every_micro_batch``)."""
    iterations = stepper.updates_per_epoch(len(data_loader)) * stepper.update_freq
    device = stepper.skipped_in_row.device
    flops = None
    if peak_tflops is not None:
        flops = count_step_flops(model, loss_fn, next(iter(data_loader)), Step(epoch, 0, 0), stepper.autocast())
    batches = epoch_batches(data_loader, epoch)
    progress = EpochProgress(epoch, epochs, iterations, stepper, device, print_freq, tensorboard,
                             flops_per_image=flops, peak_tflops=peak_tflops)
    reseed = reseed_every_micro_batch(seed, get_rank()) if seed is not None else None
    for _ in train_updates(model, batches, loss_fn, stepper, lr_scheduler, progress, epoch=epoch, reseed=reseed):
        pass
    return log_skipped_updates(progress.summary(), stepper, iterations)


def log_skipped_updates(summary: dict[str, float], stepper: GradientStepper, iterations: int) -> dict[str, float]:
    """Log the epoch's skipped updates (if any); returns ``summary``."""
    skipped, updates = summary["skipped_updates"], stepper.updates_per_epoch(iterations)
    if skipped and stepper.amp == "fp16":
        _logger.info("fp16: the loss scaler skipped %d of %d updates this epoch (inf/NaN gradients)", skipped, updates)
    elif skipped:
        _logger.info("%d of %d optimizer updates were skipped this epoch: their gradients were inf/NaN", skipped,
                     updates)
    return summary
