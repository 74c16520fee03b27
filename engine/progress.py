"""The metrics of one epoch, read from the device only at log points.

Per micro-batch ``add_micro_batch`` adds the loss and the metrics to device sums; per update
``add_update`` adds the gradient norm (finite ones), the skipped flag and the run of skipped
updates in a row. ``log_point`` -- every ``print_freq`` iterations, moved to the end of their
accumulation group (so no collective runs inside one), and at the end of the epoch -- all-reduces
the sums since the last one, reads them (the one host-device sync), checks them, logs the progress
line and the ``train/`` scalars (to the run's trackers, at the number of optimizer updates done in
the run), and adds them to the epoch totals (host floats, each the mean over
ranks). The checks raise on every rank alike, before anything can checkpoint the state:

* ``NonFiniteLossError``: a NaN/inf loss, naming the first bad iteration over ranks;
* ``NonFiniteGradientsError``: ``max_skipped_in_row`` updates in a row were skipped for
  non-finite gradients (``engine.stepper``); a few at the start of fp16 training are normal while
  the loss scale settles.

``state_dict`` holds the totals for a checkpoint written right after a log point;
``EpochProgress(..., state=...)`` continues a resumed epoch's means.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from .distributed import all_gather_objects, all_reduce_mean, get_world_size
from .flops import model_flops_utilization
from .logging import ProgressMeter
from .stepper import GradientStepper

if TYPE_CHECKING:
    from .loop import Step
    from .trackers import Trackers

DEFAULT_MAX_SKIPPED_IN_ROW = 10


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised on every rank at the same iteration."""


class NonFiniteGradientsError(FloatingPointError):
    """Too many updates in a row were skipped for non-finite gradients; raised on every rank."""


def non_finite_loss_error(loss_value: float, epoch: int, iteration: int, first_read: int,
                          last_read: int) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"loss is {loss_value} at epoch {epoch} iteration {iteration} (the first non-finite one of iterations "
        f"{first_read}-{last_read}, read together); stopping, the last checkpoint is kept. Try a lower --lr/--blr, "
        "--amp bf16 instead of fp16, or --clip_grad 1.0, then resume."
    )


def is_log_point(iteration: int, iterations: int, print_freq: int, update_freq: int) -> bool:
    """Log after the update whose accumulation group reaches a multiple of ``print_freq``
    iterations, and after the epoch's last iteration."""
    done = iteration + 1
    if done == iterations:
        return True
    return done % update_freq == 0 and done // print_freq > (done - update_freq) // print_freq


class EpochProgress:
    """The means, log points and summary of one epoch (see the module docstring).

    ``iterations``: the epoch's micro-batches (whole accumulation groups); ``start_iteration`` and
    ``state`` continue a resumed epoch; ``flops_per_image`` and ``peak_tflops`` (the device's)
    give MFU when both are known.
    """

    def __init__(self, epoch: int, epochs: int, iterations: int, stepper: GradientStepper, device: torch.device,
                 print_freq: int = 20, trackers: Optional["Trackers"] = None, start_iteration: int = 0,
                 state: Optional[dict] = None, flops_per_image: Optional[float] = None,
                 peak_tflops: Optional[float] = None, max_skipped_in_row: int = DEFAULT_MAX_SKIPPED_IN_ROW):
        self.epoch, self.iterations, self.stepper, self.print_freq = epoch, iterations, stepper, print_freq
        self.device, self.trackers = device, trackers
        self.flops_per_image, self.peak_tflops = flops_per_image, peak_tflops
        self.max_skipped_in_row = max_skipped_in_row
        self.world_size = get_world_size()
        self.meter = ProgressMeter(epoch, epochs, iterations, self.world_size, start_iteration)
        self.totals: dict[str, list[float]] = {name: list(pair) for name, pair in (state or {}).items()}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.first_unread: Optional[int] = None  # first iteration since the last read
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite loss's iteration
        self.bad_loss = torch.zeros((), device=device)
        self.longest_skipped_in_row = torch.zeros((), device=device)

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
        torch.maximum(self.longest_skipped_in_row, self.stepper.skipped_in_row.float(),
                      out=self.longest_skipped_in_row)

    def is_log_point(self, iteration: int) -> bool:
        return is_log_point(iteration, self.iterations, self.print_freq, self.stepper.update_freq)

    def _raise_non_finite_loss(self, last: int) -> None:
        """Every rank raises, naming the earliest non-finite iteration over ranks."""
        found = [(iteration, value) for iteration, value in
                 all_gather_objects((int(self.first_bad), float(self.bad_loss))) if iteration >= 0]
        iteration, value = min(found) if found else (self.first_unread, float("nan"))
        raise non_finite_loss_error(value, self.epoch, iteration, self.first_unread, last)

    def log_point(self, step: Step) -> None:
        """Read, check and log everything since the last log point (``step``, the update just done);
        a no-op if nothing was added since. Every rank must call it at the same steps."""
        iteration = step.iteration
        if self.first_unread is None:
            return
        names = sorted(self.sums)
        packed = all_reduce_mean(torch.stack([*(self.sums[n] for n in names), *(self.counts[n] for n in names),
                                              self.longest_skipped_in_row]))
        values = packed.tolist()  # the host-device sync of this log point
        sums, counts = dict(zip(names, values)), dict(zip(names, values[len(names):]))
        if not math.isfinite(sums["loss"]):
            self._raise_non_finite_loss(iteration)
        if values[-1] >= self.max_skipped_in_row:
            raise NonFiniteGradientsError(
                f"{int(values[-1])} optimizer updates in a row were skipped because the gradients were inf/NaN "
                f"(epoch {self.epoch}, by iteration {iteration}); stopping, the last checkpoint is kept. Try a lower "
                "--lr/--blr, --clip_grad 1.0 or --amp bf16 instead of fp16, then resume (--max_skipped_updates sets "
                "how many in a row are tolerated)")
        self.longest_skipped_in_row.zero_()
        means = {name: sums[name] / counts[name] for name in names if counts[name] > 0}
        for name in names:
            total = self.totals.setdefault(name, [0.0, 0.0])
            total[0] += sums[name]
            total[1] += counts[name]
        self.sums, self.counts, self.first_unread = {}, {}, None
        images_per_s = self.meter.interval_images_per_second()
        mfu = self.mfu(images_per_s)
        lr = self.stepper.lr()
        shown = {name: value for name, value in means.items() if name not in ("loss", "skipped_updates")}
        epoch_loss = self.totals["loss"][0] / self.totals["loss"][1]
        self.meter.log_line(iteration + 1, means["loss"], epoch_loss, lr, images_per_s, shown, mfu)
        if self.trackers is not None:
            updates_done = step.update + 1
            self.trackers.scalars({"loss": means["loss"], "lr": lr, "images_per_s": images_per_s, **shown,
                                   **({"mfu": mfu} if mfu is not None else {})}, updates_done, "train/")

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
        summary = {**means, "lr": self.stepper.lr(), "images_per_s": self.meter.images_per_second,
                   "epoch_time_s": self.meter.elapsed,
                   "skipped_updates": round(self.totals.get("skipped_updates", [0.0])[0])}
        mfu = self.mfu(self.meter.images_per_second)
        if mfu is not None:
            summary["mfu"] = mfu
        return summary
