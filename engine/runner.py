"""The training skeleton both CLIs share: a CLI declares a ``Task``, ``run_training`` does the rest.

    def main(argv=None):
        args = parse_and_validate(parser, argv, checks)
        return launch(parser, args, lambda info: run_training(args, info, build_task(args, info)))

``launch`` sets up the process (torchrun group, device, console logging) and turns the ways a
run ends into exit codes: 0 done, 2 configuration error, 1 fault of the run, ``EXIT_STOPPED`` (3)
stopped on SIGTERM/SIGUSR1 after writing a checkpoint, 130 Ctrl-C (one line naming the last
checkpoint). ``run_training`` does, once for every task:

* the loader and the check that every process gets at least one optimizer update per epoch;
* lr = ``--lr``, else (``--blr`` or the task's recipe blr) * effective batch / 256;
* seed -> model -> AdamW -> DDP -> torch.compile -> stepper (with the task's EMA);
* resume from ``--resume`` or, with ``--auto_resume``, the newest valid checkpoint in
  ``--output_dir``, at any update boundary (mid-epoch checkpoints included);
* output files (train.log, config.yaml, metrics.jsonl, TensorBoard) only once the data, the model
  and the checkpoint to resume from are set up, so a run that fails to start leaves nothing;
* the epochs: the per-update loop (``engine.loop``), the task's evaluation, one log line and one
  metrics.jsonl record per epoch, checkpoints every ``--save_ckpt_freq`` epochs and at the end,
  and inside epochs every ``--save_ckpt_steps`` updates and after ``--save_ckpt_minutes``;
* SIGTERM / SIGUSR1 (``engine.signals``): all ranks stop at the next update boundary, rank 0
  writes a complete checkpoint, every process exits with ``EXIT_STOPPED``.

Ranks agree on a stop or a time-based checkpoint through a gloo (CPU) group at update
boundaries, so the decision never waits on the GPU stream.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset

from .checkpoint import (checkpoint_name, checkpoint_paths, find_resume_checkpoint, restore_training_state,
                         save_checkpoint)
from .cli import cli_errors
from .config import ConfigError, check_output_folders, config_dict, resolve_hardware_defaults, save_config
from .data import build_loader, shutdown_workers
from .distributed import (DistributedInfo, all_reduce_mean, check_replicas_identical, get_world_size, init_distributed,
                          wrap_ddp)
from .ema import EmaGradientStepper, build_model_ema
from .flops import matmul_precision, peak_tflops
from .logging import MetricsLog, TensorBoardWriter, setup_logging, start_log_file
from .loop import EpochProgress, Step, current_lr, train_one_epoch, updates_per_epoch
from .optim import build_adamw, effective_batch_size, scaled_lr
from .schedule import build_lr_scheduler
from .seeding import configure_determinism, derive_seed, seed_everything
from .signals import (EXIT_INTERRUPTED, EXIT_STOPPED, StopRequested, handle_stop_signals, stop_reason,
                      stop_requested, workers_ignore_stop_signals)

_logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, Step], tuple[torch.Tensor, dict]]
T = TypeVar("T")


def _accept_checkpoint(path: str, state: dict, advice: str) -> None:
    pass


@dataclass
class Task:
    """What a training CLI trains; ``run_training`` does everything else.

    ``build_model()`` runs once every RNG is seeded with ``--seed`` (identical initial weights on
    every rank) and returns the unwrapped model; its ``state_dict`` is a checkpoint's "model".
    ``state`` holds extra checkpoint entries (e.g. ``classes``, ``best``): saved in every
    checkpoint, replaced in place by a resumed checkpoint's. ``check_checkpoint(path, state,
    advice)`` raises ConfigError if a checkpoint to resume does not fit this run (``advice``:
    what to do instead, e.g. "or use another --output_dir"). ``evaluate(model, ema_model,
    epochs_done)`` returns metrics after each epoch; ``epoch_summary(record)`` adds them to the
    epoch's log line. ``export(model, epochs_done, tensorboard)`` runs on rank 0 with each epoch
    checkpoint (and once at the end of a run that trained nothing).
    """

    train_set: Dataset
    build_model: Callable[[], nn.Module]
    loss_fn: LossFn
    recipe_blr: float
    adamw_betas: tuple[float, float]
    description: str  # what is trained, for the start line: "convnextv2_atto (sparse backend)"
    param_group_fn: Optional[Callable[[nn.Module], list]] = None  # e.g. layer-wise lr decay
    ema_decay: Optional[float] = None  # keep an EMA of the weights (checkpoint entry "model_ema")
    state: dict = field(default_factory=dict)
    derived: dict = field(default_factory=dict)  # e.g. num_classes, for config.yaml's header
    check_checkpoint: Callable[[str, dict, str], None] = _accept_checkpoint
    evaluate: Optional[Callable[[nn.Module, Optional[nn.Module], int], dict]] = None
    epoch_summary: Callable[[dict], str] = lambda record: ""
    export: Optional[Callable[[nn.Module, int, TensorBoardWriter], None]] = None


class TrainingStopped(Exception):
    """A stop was requested (signal); the message says where the checkpoint is."""


@dataclass
class Training:
    """The built pieces of one run: ``model`` is what checkpoints hold, ``train_model`` what is
    trained (DDP / torch.compile wrapped when asked for)."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    stepper: EmaGradientStepper
    ema: Optional[nn.Module]


@dataclass(frozen=True)
class Position:
    """Where a run starts: ``epoch`` epochs completed, ``iteration`` micro-batches into the next,
    ``progress``: that epoch's ``EpochProgress`` totals so far."""

    epoch: int = 0
    iteration: int = 0
    progress: Optional[dict] = None


# ---------------------------------------------------------------- the process

def last_checkpoint_note(output_dir: str) -> str:
    found = checkpoint_paths(output_dir)
    if not found:
        return f"no checkpoint was written to {output_dir} yet"
    return f"the last checkpoint is {found[-1]}; rerun the same command to resume from it"


def launch(parser: argparse.ArgumentParser, args: argparse.Namespace, work: Callable[[DistributedInfo], T],
           intro: Optional[str] = None) -> T:
    """Run ``work(info)`` as a CLI process: distributed setup, the machine-dependent defaults
    (``resolve_hardware_defaults``), logging (rank 0 keeps its records for train.log until
    ``run_training`` opens it; the first line names a demo run) and the exit codes of the module
    docstring. ``args`` comes from ``engine.cli.parse_and_validate``."""
    info = init_distributed(args.device, args.dist_timeout, args.cpu_threads)
    with cli_errors(parser):
        setup_logging(info.rank)
        chosen = resolve_hardware_defaults(args, info.device)
        if args.demo:
            _logger.info("No --data_path and no --config: demonstration run with %s as the defaults (flags override "
                         "them), writing to %s", Path(args.config).name, args.output_dir)
        if intro:
            _logger.info(intro)
        for note in args.notes:
            _logger.info("%s", note)
        if chosen:
            _logger.info("chosen for this machine: %s", ", ".join(chosen))
        try:
            return work(info)
        except TrainingStopped as stopped:
            _logger.warning("%s", stopped)
            sys.exit(EXIT_STOPPED)
        except KeyboardInterrupt:
            _logger.warning("interrupted (Ctrl-C); %s", last_checkpoint_note(args.output_dir))
            sys.exit(EXIT_INTERRUPTED)


# ---------------------------------------------------------------- setup

def check_updates_per_epoch(num_batches: int, args: argparse.Namespace, dataset_size: int, world_size: int) -> int:
    updates = updates_per_epoch(num_batches, args.update_freq)
    if updates < 1:
        raise ConfigError(f"--batch_size {args.batch_size} / --update_freq {args.update_freq}: each process gets "
                          f"{dataset_size // world_size} images, fewer than one optimizer update "
                          f"(batch_size * update_freq = {args.batch_size * args.update_freq}); lower them")
    return updates


def build_training(args: argparse.Namespace, info: DistributedInfo, task: Task, lr: float) -> Training:
    seed_everything(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = task.build_model().to(info.device)
    optimizer = build_adamw(model, lr, args.weight_decay, task.adamw_betas, param_group_fn=task.param_group_fn)
    train_model = wrap_ddp(model, info.device)
    if args.compile:
        train_model = torch.compile(train_model)
    ema = build_model_ema(model, task.ema_decay) if task.ema_decay is not None else None
    stepper = EmaGradientStepper(train_model, optimizer, ema, model, amp=args.amp, update_freq=args.update_freq,
                                 clip_grad=args.clip_grad)
    return Training(model, train_model, optimizer, stepper, ema)


def resume(args: argparse.Namespace, info: DistributedInfo, task: Task, training: Training) -> Position:
    """Load --resume, or the newest valid checkpoint with --auto_resume, after the task's checks."""
    found = find_resume_checkpoint(args, info)
    if found is None:
        return Position()
    path, state = found
    advice = "or pass another --resume checkpoint" if args.resume else "or use another --output_dir"
    saved_model = state.get("config", {}).get("model")
    if saved_model is not None and saved_model != args.model:
        raise ConfigError(f"--model {args.model}: checkpoint {path} holds a {saved_model}; "
                          f"use --model {saved_model} {advice}")
    task.check_checkpoint(path, state, advice)
    restore_training_state(path, state, training.model, training.optimizer, training.stepper, info.world_size)
    if training.ema is not None:
        if "model_ema" in state:
            training.ema.module.load_state_dict(state["model_ema"])
        else:
            training.ema.set(training.model)
    task.state.update({key: state[key] for key in task.state if key in state})
    return Position(int(state["epoch"]), int(state.get("iteration", 0)), state.get("progress"))


def device_peak_tflops(device: torch.device, amp: str) -> Optional[float]:
    """The device's dense peak for MFU (CUDA devices of ``engine.flops``' table only)."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device), matmul_precision(amp))


def count_unreadable(dataset, device: torch.device) -> int:
    """Unreadable files found so far, summed over ranks."""
    local = torch.tensor(float(getattr(dataset, "unreadable_count", 0)), device=device)
    return round(all_reduce_mean(local).item() * get_world_size())


# ---------------------------------------------------------------- checkpoints inside and between epochs

class CheckpointCadence:
    """When to checkpoint and whether to stop, agreed by every rank at update boundaries.

    ``--save_ckpt_steps`` counts updates (the same on every rank); ``--save_ckpt_minutes`` is
    rank 0's clock; a stop request may come to any rank. With several processes the two flags
    are all-reduced (max) over a gloo group, on the CPU: the GPU stream is never waited on."""

    def __init__(self, args: argparse.Namespace, info: DistributedInfo):
        self.steps, self.minutes, self.is_main = args.save_ckpt_steps, args.save_ckpt_minutes, info.is_main
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if info.world_size > 1 else None
        self.last_save = time.monotonic()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def agree(self) -> tuple[bool, bool]:
        """(minutes since the last checkpoint passed on rank 0, a stop requested on any rank)."""
        time_due = self.minutes is not None and self.is_main and time.monotonic() - self.last_save >= 60 * self.minutes
        stop = stop_requested()
        if self.group is not None:
            flags = torch.tensor([int(time_due), int(stop)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            time_due, stop = (bool(flag) for flag in flags.tolist())
        return time_due, stop

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written the checkpoint before all exit)."""
        if self.group is not None:
            dist.barrier(group=self.group)


class Run:
    """One call of ``run_training`` once everything is set up: the epochs, and checkpoints at the
    right moments."""

    def __init__(self, args: argparse.Namespace, info: DistributedInfo, task: Task, training: Training, loader,
                 scheduler, tensorboard: TensorBoardWriter, metrics_log: MetricsLog):
        self.args, self.info, self.task, self.training = args, info, task, training
        self.loader, self.scheduler, self.tensorboard, self.metrics_log = loader, scheduler, tensorboard, metrics_log
        self.iterations = updates_per_epoch(len(loader), args.update_freq) * args.update_freq
        self.cadence = CheckpointCadence(args, info)

    def checkpoint_state(self, epochs_done: int, iteration: int, progress: Optional[dict]) -> dict:
        training = self.training
        state = {"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
                 "stepper": training.stepper.state_dict(), "epoch": epochs_done, "iteration": iteration,
                 "config": config_dict(self.args), "world_size": self.info.world_size, **self.task.state}
        if progress is not None:
            state["progress"] = progress
        if training.ema is not None:
            state["model_ema"] = training.ema.module.state_dict()
        return state

    def save(self, epochs_done: int, iteration: int = 0, progress: Optional[dict] = None) -> Path:
        """Rank 0 writes the checkpoint of this position; returns its path (on every rank)."""
        updates = iteration // self.args.update_freq
        path = Path(self.args.output_dir) / checkpoint_name(epochs_done, updates)
        if self.info.is_main:
            save_checkpoint(self.checkpoint_state(epochs_done, iteration, progress), self.args.output_dir,
                            epochs_done, self.args.save_ckpt_num, updates)
        self.cadence.saved()
        return path

    def stop(self, path: Path, where: str) -> None:
        self.cadence.barrier()  # nobody exits (and makes torchrun stop the others) before the file is complete
        reason = stop_reason() or "another process's stop request"
        raise TrainingStopped(f"stopped on {reason} {where}: wrote {path}; rerun the same command to "
                              f"resume from it (exit code {EXIT_STOPPED})")

    def after_update(self, step: Step, progress: EpochProgress) -> None:
        """Inside an epoch: checkpoint when due, and stop if asked (the epoch's last update is left
        to the end of the epoch, which evaluates and checkpoints anyway)."""
        done = step.iteration + 1
        if done == self.iterations:
            return
        time_due, stop = self.cadence.agree()
        steps_due = self.args.save_ckpt_steps is not None and (step.update + 1) % self.args.save_ckpt_steps == 0
        if not (time_due or stop or steps_due):
            return
        progress.log_point(step.iteration, current_lr(self.training.optimizer))  # read + check before saving
        path = self.save(step.epoch, done, progress.state_dict())
        _logger.info("saved %s (epoch %d, iteration %d)", path.name, step.epoch + 1, done)
        if stop:
            self.stop(path, f"in epoch {step.epoch + 1} after iteration {done}")

    def end_epoch(self, epochs_done: int, stop_agreed: bool = False) -> None:
        """Checkpoint (+ the task's export) when the cadence says so; stop if asked (``stop_agreed``:
        the ranks already agreed to stop)."""
        time_due, stop = self.cadence.agree()
        stop = stop or stop_agreed
        if not (epochs_done % self.args.save_ckpt_freq == 0 or epochs_done == self.args.epochs or time_due or stop):
            return
        path = self.save(epochs_done)
        _logger.info("saved %s", path.name)
        if self.info.is_main and self.task.export is not None and not stop:
            self.task.export(self.training.model, epochs_done, self.tensorboard)
        if stop:
            self.stop(path, f"after epoch {epochs_done}")

    def train(self, position: Position) -> dict:
        """The epochs from ``position`` to --epochs; returns the last epoch's record ({} if none)."""
        args, info, task, training = self.args, self.info, self.task, self.training
        peak = device_peak_tflops(info.device, args.amp)
        evaluated_ema = training.ema.module if training.ema is not None else None
        record: dict = {}
        for epoch in range(position.epoch, args.epochs):
            resumed_here = epoch == position.epoch
            seed_everything(derive_seed(args.seed, epoch, info.rank))  # the loader's worker seeds: the epoch's
            stats = train_one_epoch(training.train_model, self.loader, task.loss_fn, training.stepper, self.scheduler,
                                    epoch, args.epochs, args.print_freq, self.tensorboard, seed=args.seed,
                                    start_iteration=position.iteration if resumed_here else 0,
                                    progress_state=position.progress if resumed_here else None,
                                    after_update=self.after_update, peak_tflops=peak)
            stats["unreadable_images"] = count_unreadable(task.train_set, info.device)
            epochs_done = epoch + 1
            record = {"epoch": epochs_done, **stats}
            evaluation_stopped = False
            if task.evaluate is not None:
                try:
                    evaluation = task.evaluate(training.model, evaluated_ema, epochs_done)
                except StopRequested:  # agreed by every rank inside the evaluation: checkpoint without it
                    evaluation, evaluation_stopped = {}, True
                self.tensorboard.scalars(evaluation, epochs_done, "val/")
                record.update(evaluation)
            log_epoch(args, task, record)
            self.metrics_log.append(record)
            self.tensorboard.scalars({name: value for name, value in stats.items() if name != "epoch_time_s"},
                                     epochs_done, "epoch/")
            self.end_epoch(epochs_done, evaluation_stopped)
        if position.epoch >= args.epochs:
            _logger.info("nothing left to train: %d of %d epochs done", position.epoch, args.epochs)
            if info.is_main and task.export is not None:
                task.export(training.model, position.epoch, self.tensorboard)
        if info.world_size > 1:
            report_replicas(training.model, info)
        return record


# ---------------------------------------------------------------- the run

def open_outputs(args: argparse.Namespace, info: DistributedInfo, derived: dict) -> tuple[TensorBoardWriter, MetricsLog]:
    """Create --output_dir's files (rank 0): train.log (with what was logged so far), config.yaml."""
    output_dir = Path(args.output_dir)
    if info.is_main:
        check_output_folders(args)
        start_log_file(output_dir / "train.log")
        save_config(args, output_dir / "config.yaml", derived)
    tensorboard = TensorBoardWriter((args.log_dir or output_dir / "tensorboard") if info.is_main else None)
    return tensorboard, MetricsLog(output_dir / "metrics.jsonl" if info.is_main else None)


def log_epoch(args: argparse.Namespace, task: Task, record: dict) -> None:
    extra = task.epoch_summary(record)
    unreadable = record.get("unreadable_images", 0)
    _logger.info("epoch %d/%d done: loss %.4f, lr %.3g, grad_norm %.3g, %.1f img/s, %.0f s%s%s%s", record["epoch"],
                 args.epochs, record.get("loss", float("nan")), record["lr"], record.get("grad_norm", float("nan")),
                 record["images_per_s"], record["epoch_time_s"],
                 f", MFU {100 * record['mfu']:.1f}%" if "mfu" in record else "",
                 f", {unreadable} unreadable images skipped" if unreadable else "", f"; {extra}" if extra else "")


def report_replicas(model: nn.Module, info: DistributedInfo) -> None:
    """Log whether every rank ended with the same weights (they must, under DDP)."""
    identical, checksums = check_replicas_identical(model.state_dict())
    if identical:
        _logger.info("weights identical on all %d ranks (sha256 %s)", info.world_size, checksums[0][:16])
    else:
        _logger.error("weights DIFFER across ranks: %s", checksums)


def run_training(args: argparse.Namespace, info: DistributedInfo, task: Task) -> dict:
    """Train ``task`` until --epochs; returns the last epoch's metrics record ({} if nothing was
    left to train). Raises ConfigError / run faults for ``launch``; ``TrainingStopped`` on a signal."""
    with handle_stop_signals():
        configure_determinism(info.device)
        loader = build_loader(task.train_set, args.batch_size, args.num_workers, args.seed, info.rank,
                              info.world_size, info.device, pin_memory=args.pin_mem)
        workers_ignore_stop_signals(loader)
        updates = check_updates_per_epoch(len(loader), args, len(task.train_set), info.world_size)
        effective_batch = effective_batch_size(args.batch_size, args.update_freq, info.world_size)
        blr = args.blr if args.blr is not None else task.recipe_blr
        lr = args.lr if args.lr is not None else scaled_lr(blr, effective_batch)
        training = build_training(args, info, task, lr)
        position = resume(args, info, task, training)
        scheduler = build_lr_scheduler(training.optimizer, args.epochs, args.warmup_epochs, updates, args.min_lr)
        tensorboard, metrics_log = open_outputs(args, info, {
            "world_size": info.world_size, "device": str(info.device), "effective_batch_size": effective_batch,
            "lr": lr, "updates_per_epoch": updates, **task.derived})
        _logger.info("%s on %s x %d: %d images/epoch, effective batch %d (%d x %d accumulation x %d), lr %.3g, "
                     "%d epoch%s from epoch %d", task.description, info.device, info.world_size, len(task.train_set),
                     effective_batch, args.batch_size, args.update_freq, info.world_size, lr, args.epochs,
                     "" if args.epochs == 1 else "s", position.epoch)
        try:
            return Run(args, info, task, training, loader, scheduler, tensorboard, metrics_log).train(position)
        finally:
            tensorboard.close()
            shutdown_workers(loader)
