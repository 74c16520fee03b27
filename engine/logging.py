"""Seeing a run: console progress lines, TensorBoard, a JSON-lines log of epoch metrics.

* ``setup_logging(rank, log_file=None)``: the root logger prints ``HH:MM:SS message`` lines; rank 0
  at INFO (also appended to ``log_file``), other ranks only warnings and errors. Without
  ``log_file``, rank 0 keeps its records until ``start_log_file(path)``, which writes them first:
  a run can log while it sets up and create ``train.log`` only once the setup succeeded.
* ``ProgressMeter(epoch, epochs, iterations, world_size, start_iteration)``: timing, images and the
  periodic progress line
  ``epoch 3/10 [ 20/100]  loss 0.8123 (0.8301)  lr 1.20e-04  grad_norm 0.53  112.3 img/s  MFU 41.2%  eta 0:02:13 (run 1:10:00)``
  (loss over the iterations since the last line and epoch mean; images/s over all ranks since
  the last line; MFU only where it is known); ``images_per_second`` / ``elapsed`` for the epoch.
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
PENDING_RECORDS_MAX = 10_000  # records kept for train.log before it is opened (setup logs a few dozen)


class _PendingRecords(logging.Handler):
    """Keeps records until ``start_log_file`` writes them to the log file."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < PENDING_RECORDS_MAX:
            self.records.append(record)


def _add_handler(handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    setattr(handler, _HANDLER_MARK, True)
    logging.getLogger().addHandler(handler)


def setup_logging(rank: int = 0, log_file: Optional[str | os.PathLike] = None) -> None:
    """Configure the root logger for this process (replacing handlers from an earlier call)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    _add_handler(logging.StreamHandler(sys.stdout))
    if rank == 0:
        _add_handler(_PendingRecords())
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if log_file is not None and rank == 0:
        start_log_file(log_file)


def start_log_file(log_file: str | os.PathLike) -> None:
    """Append this process's log to ``log_file`` from now on, starting with the records kept since
    ``setup_logging``; a no-op on processes that log no file (ranks other than 0)."""
    root = logging.getLogger()
    pending = next((h for h in root.handlers if isinstance(h, _PendingRecords)), None)
    if pending is None:
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file)
    _add_handler(file_handler)
    root.removeHandler(pending)
    for record in pending.records:
        file_handler.handle(record)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressMeter:
    """Timing, images and the progress line of one epoch (see module docstring).

    ``start_iteration``: where a resumed epoch starts; rates and the ETA count from there."""

    def __init__(self, epoch: int, epochs: int, iterations: int, world_size: int = 1, start_iteration: int = 0):
        self.epoch, self.epochs, self.iterations = epoch, epochs, iterations
        self.world_size, self.start_iteration = world_size, start_iteration
        self.images = 0
        self.start = self.last_line_time = time.perf_counter()
        self.last_line_images = 0

    def add_images(self, batch_size: int) -> None:
        """Count one micro-batch of ``batch_size`` images on this rank (all ranks: times world size)."""
        self.images += batch_size * self.world_size

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def images_per_second(self) -> float:
        """Images per second over all ranks since the epoch (or its resumed part) began."""
        return self.images / max(self.elapsed, 1e-9)

    def interval_images_per_second(self) -> float:
        """Images per second over all ranks since the last progress line; starts a new interval."""
        now = time.perf_counter()
        rate = (self.images - self.last_line_images) / max(now - self.last_line_time, 1e-9)
        self.last_line_time, self.last_line_images = now, self.images
        return rate

    def log_line(self, done: int, loss: float, epoch_loss: float, lr: float, images_per_s: float,
                 metrics: Optional[Mapping[str, float]] = None, mfu: Optional[float] = None) -> str:
        """Log and return the progress line after ``done`` iterations of the epoch."""
        per_iteration = self.elapsed / max(done - self.start_iteration, 1)
        epoch_eta = per_iteration * (self.iterations - done)
        run_eta = epoch_eta + per_iteration * self.iterations * (self.epochs - self.epoch - 1)
        width = len(str(self.iterations))
        extras = "".join(f"  {name} {value:.4g}" for name, value in (metrics or {}).items())
        line = (f"epoch {self.epoch + 1}/{self.epochs} [{done:>{width}}/{self.iterations}]"
                f"  loss {loss:.4f} ({epoch_loss:.4f})  lr {lr:.2e}{extras}  {images_per_s:.1f} img/s"
                f"{f'  MFU {100 * mfu:.1f}%' if mfu is not None else ''}"
                f"  eta {format_duration(epoch_eta)} (run {format_duration(run_eta)})")
        _logger.info(line)
        return line


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
