"""Seeing a run: console progress lines, TensorBoard, a JSON-lines log of epoch metrics.

* ``setup_logging(rank, log_file=None)``: the root logger prints ``HH:MM:SS message`` lines; rank 0
  at INFO (also appended to ``log_file``), other ranks only warnings and errors.
* ``ProgressMeter(epoch, epochs, iterations, print_freq, world_size)``: ``update(...)`` after each
  iteration; every ``print_freq`` iterations (and the last) logs
  ``epoch 3/10 [ 20/100]  loss 0.8123 (0.8301)  lr 1.20e-04  112.3 img/s  eta 0:02:13 (run 1:10:00)``
  (loss now and epoch mean, images/s over all ranks); ``summary()`` gives the epoch's means.
* ``TensorBoardWriter(log_dir)``: scalars and images; a no-op when ``log_dir`` is None (other ranks).
* ``MetricsLog(path)``: appends one JSON object per line (one per epoch); None path = no-op;
  a failed write raises ``engine.checkpoint.OutputWriteError``.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .checkpoint import OutputWriteError

_logger = logging.getLogger(__name__)
_HANDLER_MARK = "_engine_handler"


def setup_logging(rank: int = 0, log_file: Optional[str | os.PathLike] = None) -> None:
    """Configure the root logger for this process (replacing handlers from an earlier call)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressMeter:
    """Running means over one epoch and the periodic progress line (see module docstring)."""

    def __init__(self, epoch: int, epochs: int, iterations: int, print_freq: int, world_size: int = 1):
        self.epoch, self.epochs, self.iterations = epoch, epochs, iterations
        self.print_freq, self.world_size = print_freq, world_size
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self.lr = float("nan")
        self.start = time.perf_counter()

    def update(self, iteration: int, loss: float, lr: float, batch_size: int, **metrics: float) -> Optional[str]:
        """Record iteration ``iteration`` (0-based); returns the progress line when one is logged."""
        for name, value in {"loss": loss, **metrics}.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1
        self.images += batch_size * self.world_size
        self.lr = lr
        done = iteration + 1
        if done % self.print_freq and done != self.iterations:
            return None
        elapsed = time.perf_counter() - self.start
        per_iteration = elapsed / done
        epoch_eta = per_iteration * (self.iterations - done)
        run_eta = epoch_eta + per_iteration * self.iterations * (self.epochs - self.epoch - 1)
        width = len(str(self.iterations))
        extras = "".join(f"  {name} {value:.4g}" for name, value in metrics.items())
        line = (f"epoch {self.epoch + 1}/{self.epochs} [{done:>{width}}/{self.iterations}]"
                f"  loss {loss:.4f} ({self.sums['loss'] / self.count:.4f})  lr {lr:.2e}{extras}"
                f"  {self.images / max(elapsed, 1e-9):.1f} img/s"
                f"  eta {format_duration(epoch_eta)} (run {format_duration(run_eta)})")
        _logger.info(line)
        return line

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def summary(self) -> dict[str, float]:
        """Epoch means of the loss and metrics, the last lr, throughput and duration."""
        means = {name: total / max(self.count, 1) for name, total in self.sums.items()}
        return {**means, "lr": self.lr, "images_per_s": self.images_per_second,
                "epoch_time_s": time.perf_counter() - self.start}


class TensorBoardWriter:
    """TensorBoard event files under ``log_dir``; every method is a no-op when ``log_dir`` is None."""

    def __init__(self, log_dir: Optional[str | os.PathLike]):
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only where used

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}{name}", value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: (3, H, W) float in [0, 1]."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MetricsLog:
    """Appends JSON objects, one per line, to ``path``; a no-op when ``path`` is None."""

    def __init__(self, path: Optional[str | os.PathLike]):
        self.path = Path(path) if path is not None else None

    def append(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line; OutputWriteError (e.g. disk full) names the file."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as file:
                file.write(json.dumps(dict(record)) + "\n")
        except OSError as error:
            raise OutputWriteError(f"cannot append to {self.path} ({error}); free space in {self.path.parent} "
                                   "or choose another --output_dir, then rerun to resume") from error
