"""One training epoch for any model; the caller supplies the loss.

    stepper = GradientStepper(model, optimizer, amp="bf16", update_freq=4, clip_grad=1.0)
    for epoch in range(start_epoch, epochs):
        stats = train_one_epoch(model, loader, loss_fn, stepper, lr_scheduler, epoch, epochs)

``loss_fn(model, batch, step) -> (loss, metrics)``: ``loss`` a 0-d tensor (mean over the
micro-batch), ``metrics`` a dict of 0-d tensors (this rank's values; may be empty). It runs under
autocast; ``step`` (``Step``: epoch, iteration, update) lets it seed per-iteration randomness.

No host-device synchronisation between log points: the loss, the metrics, the gradient norm and
the fp16 skipped-update count are summed on the device and read -- one all-reduce, one copy to
the host -- only at log points: every ``print_freq`` iterations, moved to the end of their
accumulation group (so no collective runs inside one), and at the end of the epoch. Each read
checks the loss: a NaN/inf raises ``NonFiniteLossError`` on every rank, naming the first bad
iteration, before anything can checkpoint the state it produced.

Helpers, usable on their own:
* ``amp_autocast(device_type, amp)``: ``torch.autocast`` for ``"bf16"``/``"fp16"``, else a null context.
* ``GradientStepper``: backward with fp16 loss scaling (GradScaler; bf16 and fp32 need none),
  accumulation over ``update_freq`` micro-batches with DDP gradient sync only on the last,
  gradient norm (before clipping) + optional clipping, optimizer step, zero_grad; counts the fp16
  updates the scaler skipped, on the device.
* ``EpochProgress``: the device sums, the log points and the epoch summary of one epoch.
* ``updates_per_epoch(num_batches, update_freq)``: a trailing partial accumulation group is dropped.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from .compat import total_norm
from .distributed import all_gather_objects, all_reduce_mean, find_ddp, get_rank, get_world_size, unwrap_model
from .flops import flop_counter, model_flops_utilization
from .logging import ProgressMeter, TensorBoardWriter
from .seeding import derive_seed, seed_everything

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


def non_finite_loss_error(loss_value: float, epoch: int, iteration: int, first_read: int,
                          last_read: int) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"loss is {loss_value} at epoch {epoch} iteration {iteration} (the first non-finite one of iterations "
        f"{first_read}-{last_read}, read together); stopping, the last checkpoint is kept. Try a lower --lr/--blr, "
        "--amp bf16 instead of fp16, or --clip_grad 1.0, then resume."
    )


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
        device = next(model.parameters()).device
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp == "fp16")
        self._skipped_updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def skipped_updates(self) -> int:
        """fp16 updates the scaler skipped so far (reads the device: call it at log points only)."""
        return int(self._skipped_updates)

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

    def gradient_norm(self) -> torch.Tensor:
        """Total L2 norm of the (unscaled) gradients, clipped to ``clip_grad`` when set; returns
        the norm before clipping as a 0-d device tensor."""
        if self.clip_grad is not None:
            return torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip_grad)
        return total_norm([param.grad for param in self.parameters() if param.grad is not None])

    def backward(self, loss: torch.Tensor, iteration: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Accumulate ``loss / update_freq``; at the end of a group, clip and step.

        Returns None while accumulating; after an update, ``(gradient norm before clipping,
        skipped)`` as 0-d device tensors (``skipped`` 1 when fp16 overflowed and the step was
        skipped). Nothing here reads the device, except GradScaler.step under fp16 with an
        optimizer that cannot take the scaler's inf check itself (fused AdamW can)."""
        self.scaler.scale(loss / self.update_freq).backward()
        if not self.is_update(iteration):
            return None
        self.scaler.unscale_(self.optimizer)  # no-op without fp16; the norm is of the true gradients
        grad_norm = self.gradient_norm()
        skipped = torch.zeros((), dtype=torch.int64, device=self._skipped_updates.device)
        if self.scaler.is_enabled():
            scale_before = self.scaler._scale.clone()  # the tensor behind get_scale(), which would sync
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN
            self.scaler.update()
            skipped = (self.scaler._scale < scale_before).long()  # it backs off only after an overflow
            self._skipped_updates += skipped
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach(), skipped

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._skipped_updates.fill_(int(state.get("skipped_updates", 0)))


class EpochProgress:
    """The means, log points and summary of one epoch, without reading the device in between.

    Per micro-batch ``add_micro_batch`` adds the loss and metrics to device sums; per update
    ``add_update`` adds the gradient norm (finite ones) and the skipped flag. ``log_point``
    all-reduces the sums since the last one, reads them (the one sync), checks the loss, logs the
    progress line and TensorBoard scalars and adds them to the epoch totals (host floats, each the
    mean over ranks). ``state_dict`` holds those totals for a checkpoint written right after a log
    point; ``EpochProgress(..., state=...)`` continues a resumed epoch's means.
    """

    def __init__(self, epoch: int, epochs: int, iterations: int, stepper: GradientStepper, device: torch.device,
                 tensorboard: Optional[TensorBoardWriter] = None, start_iteration: int = 0,
                 state: Optional[dict] = None, peak_tflops: Optional[float] = None):
        self.epoch, self.iterations, self.stepper = epoch, iterations, stepper
        self.device, self.tensorboard, self.peak_tflops = device, tensorboard, peak_tflops
        self.world_size = get_world_size()
        self.meter = ProgressMeter(epoch, epochs, iterations, self.world_size, start_iteration)
        self.totals: dict[str, list[float]] = {name: list(pair) for name, pair in (state or {}).items()}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.first_unread: Optional[int] = None  # first iteration since the last read
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite loss's iteration
        self.bad_loss = torch.zeros((), device=device)
        self.flops_per_image: Optional[float] = None
        self.last_log_images_per_s = float("nan")

    def _add(self, name: str, value: torch.Tensor, count: torch.Tensor | float = 1.0) -> None:
        value = value.detach().float()
        if name not in self.sums:
            self.sums[name] = torch.zeros((), device=self.device)
            self.counts[name] = torch.zeros((), device=self.device)
        self.sums[name] += value
        self.counts[name] += count

    def add_micro_batch(self, iteration: int, loss: torch.Tensor, metrics: dict[str, torch.Tensor],
                        batch_size: int) -> None:
        if self.first_unread is None:
            self.first_unread = iteration
        loss = loss.detach().float()
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(newly_bad, iteration, self.first_bad)
        self.bad_loss = torch.where(newly_bad, loss, self.bad_loss)
        self._add("loss", loss)
        for name, value in metrics.items():
            self._add(name, torch.as_tensor(value, device=self.device))
        self.meter.add_images(batch_size)

    def add_update(self, grad_norm: torch.Tensor, skipped: torch.Tensor) -> None:
        finite = torch.isfinite(grad_norm)
        self._add("grad_norm", torch.where(finite, grad_norm, 0.0), finite.float())
        self._add("skipped_updates", skipped.float())

    def _raise_non_finite(self, last: int) -> None:
        """Every rank raises, naming the earliest non-finite iteration over ranks."""
        found = [(iteration, value) for iteration, value in
                 all_gather_objects((int(self.first_bad), float(self.bad_loss))) if iteration >= 0]
        iteration, value = min(found) if found else (self.first_unread, float("nan"))
        raise non_finite_loss_error(value, self.epoch, iteration, self.first_unread, last)

    def log_point(self, iteration: int, lr: float) -> None:
        """Read, check and log everything since the last log point (iteration ``iteration`` done);
        a no-op if nothing was added since. Every rank must call it at the same iterations."""
        if self.first_unread is None:
            return
        names = sorted(self.sums)
        packed = all_reduce_mean(torch.stack([*(self.sums[n] for n in names), *(self.counts[n] for n in names)]))
        values = packed.tolist()  # the host-device sync of this log point
        sums, counts = dict(zip(names, values)), dict(zip(names, values[len(names):]))
        if not math.isfinite(sums["loss"]):
            self._raise_non_finite(iteration)
        means = {name: sums[name] / counts[name] for name in names if counts[name] > 0}
        for name in names:
            total = self.totals.setdefault(name, [0.0, 0.0])
            total[0] += sums[name]
            total[1] += counts[name]
        self.sums, self.counts, self.first_unread = {}, {}, None
        images_per_s = self.meter.interval_images_per_second()
        self.last_log_images_per_s = images_per_s
        mfu = self.mfu(images_per_s)
        shown = {name: value for name, value in means.items() if name not in ("loss", "skipped_updates")}
        epoch_loss = self.totals["loss"][0] / self.totals["loss"][1]
        self.meter.log_line(iteration + 1, means["loss"], epoch_loss, lr, images_per_s, shown, mfu)
        if self.tensorboard is not None:
            update = self.epoch * (self.iterations // self.stepper.update_freq) + iteration // self.stepper.update_freq
            self.tensorboard.scalars({"loss": means["loss"], "lr": lr, "images_per_s": images_per_s, **shown,
                                      **({"mfu": mfu} if mfu is not None else {})}, update, "train/")

    def mfu(self, images_per_s: float) -> Optional[float]:
        """Model FLOP utilisation of one device, when the FLOPs and the device's peak are known."""
        if self.flops_per_image is None or self.peak_tflops is None:
            return None
        return model_flops_utilization(self.flops_per_image, images_per_s / self.world_size, self.peak_tflops)

    def state_dict(self) -> dict[str, list[float]]:
        """The epoch totals so far; call right after ``log_point``."""
        return {name: list(pair) for name, pair in self.totals.items()}

    def summary(self) -> dict[str, float]:
        """Epoch means (loss, metrics, grad_norm), skipped updates, lr, images/s, duration, MFU."""
        means = {name: total / count for name, (total, count) in self.totals.items()
                 if count > 0 and name != "skipped_updates"}
        summary = {**means, "lr": current_lr(self.stepper.optimizer),
                   "images_per_s": self.meter.images_per_second, "epoch_time_s": self.meter.elapsed,
                   "skipped_updates": round(self.totals.get("skipped_updates", [0.0])[0])}
        mfu = self.mfu(self.meter.images_per_second)
        if mfu is not None:
            summary["mfu"] = mfu
        return summary


def count_step_flops(model: nn.Module, loss_fn: Callable, batch: Any, step: Step, stepper: GradientStepper) -> float:
    """FLOPs per image of one forward + backward of ``loss_fn`` on ``batch``, counted on the
    unwrapped model (outside DDP / torch.compile) at an update boundary; the gradients it makes
    are dropped."""
    with flop_counter() as counter, stepper.autocast():
        loss, _ = loss_fn(unwrap_model(model), batch, step)
    with flop_counter() as backward_counter:
        loss.backward()
    stepper.optimizer.zero_grad(set_to_none=True)
    return (counter.get_total_flops() + backward_counter.get_total_flops()) / batch_size_of(batch)


def epoch_batches(data_loader: Iterable, epoch: int, skip_batches: int, batch_size: int) -> Iterator:
    """``data_loader``'s batches of ``epoch`` from batch ``skip_batches`` on. A sampler with
    ``set_epoch(epoch, skip=samples)`` starts there; with a plain ``set_epoch(epoch)`` the
    skipped batches are loaded and dropped (slower, same batches)."""
    sampler = getattr(data_loader, "sampler", None)
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


def is_log_point(iteration: int, iterations: int, print_freq: int, update_freq: int) -> bool:
    """Log after the update whose accumulation group reaches a multiple of ``print_freq``
    iterations, and after the epoch's last iteration."""
    done = iteration + 1
    if done == iterations:
        return True
    return done % update_freq == 0 and done // print_freq > (done - update_freq) // print_freq


def train_one_epoch(
    model: nn.Module,
    data_loader: Iterable,
    loss_fn: Callable[[nn.Module, Any, Step], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    stepper: GradientStepper,
    lr_scheduler,
    epoch: int,
    epochs: int,
    print_freq: int = 20,
    tensorboard: Optional[TensorBoardWriter] = None,
    *,
    seed: Optional[int] = None,
    start_iteration: int = 0,
    progress_state: Optional[dict] = None,
    after_update: Optional[Callable[[Step, EpochProgress], None]] = None,
    peak_tflops: Optional[float] = None,
) -> dict[str, float]:
    """Train ``epoch`` (0-based); returns epoch means (loss, metrics, grad_norm) plus lr, images/s,
    skipped updates and (where known) MFU.

    ``lr_scheduler.step_update(update)`` (timm) sets the lr before every optimizer update.
    ``seed``: every RNG of this process is reseeded from (seed, epoch, iteration, rank) before each
    micro-batch and its loading, so a run resumed at any update boundary draws what the
    uninterrupted run drew. ``start_iteration`` (an update boundary) and ``progress_state``
    (``EpochProgress.state_dict()``) continue a resumed epoch. ``after_update(step, progress)``
    runs after every optimizer update (e.g. checkpoints); it may call ``progress.log_point``.
    ``peak_tflops``: the device's peak, for MFU (FLOPs are counted on the first micro-batch).
    """
    model.train()
    updates = updates_per_epoch(len(data_loader), stepper.update_freq)
    iterations = updates * stepper.update_freq
    device = stepper._skipped_updates.device
    progress = EpochProgress(epoch, epochs, iterations, stepper, device, tensorboard, start_iteration,
                             progress_state, peak_tflops)
    batch_size = getattr(data_loader, "batch_size", None) or 1
    batches = epoch_batches(data_loader, epoch, start_iteration, batch_size) if start_iteration < iterations else None
    rank = get_rank()

    def reseed(iteration: int) -> None:
        if seed is not None:
            seed_everything(derive_seed(seed, epoch, iteration, rank))

    for iteration in range(start_iteration, iterations):
        step = Step(epoch, iteration, epoch * updates + iteration // stepper.update_freq)
        reseed(iteration)
        batch = next(batches)
        if iteration % stepper.update_freq == 0:
            lr_scheduler.step_update(step.update)
        if peak_tflops is not None and iteration == start_iteration:
            progress.flops_per_image = count_step_flops(model, loss_fn, batch, step, stepper)
            reseed(iteration)  # the training micro-batch draws what it would have drawn without the count
        with stepper.sync_context(iteration):
            with stepper.autocast():
                loss, metrics = loss_fn(model, batch, step)
            progress.add_micro_batch(iteration, loss, metrics, batch_size_of(batch))
            updated = stepper.backward(loss, iteration)
        if updated is not None:
            progress.add_update(*updated)
        if is_log_point(iteration, iterations, print_freq, stepper.update_freq):
            progress.log_point(iteration, current_lr(stepper.optimizer))
        if updated is not None and after_update is not None:
            after_update(step, progress)
    summary = progress.summary()  # the last iteration is a log point: everything has been read
    if summary["skipped_updates"]:
        _logger.info("fp16: the loss scaler skipped %d of %d updates this epoch (inf/NaN gradients)",
                     summary["skipped_updates"], updates)
    return summary
