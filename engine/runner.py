"""The training skeleton both CLIs share: a CLI declares a ``Task``, ``run_training`` does the rest.

    def main(argv=None):
        args = parse_and_validate(parser, argv, checks)
        return launch(parser, args, lambda info: run_training(args, info, build_task(args, info)))

``launch`` sets up the process (torchrun group, device, console logging, stop signals) and turns
the ways a run ends into exit codes: 0 done, 2 configuration error, 1 fault of the run,
``EXIT_STOPPED`` (3) stopped on SIGTERM/SIGUSR1 after writing a checkpoint, 130 Ctrl-C (one line
naming the last checkpoint). ``run_training`` builds the run -- the loader, lr = ``--lr`` or
(``--blr`` or the task's recipe blr) * effective batch / 256, seed -> model -> AdamW -> DDP ->
torch.compile -> ``GradientStepper`` (with the task's EMA), the checkpoint to resume from
(``--resume``, or the newest valid one in ``--output_dir``), the output files (only once all of
that worked, so a run that fails to start leaves nothing) -- and hands it to ``Trainer.fit``:

    for epoch in range(start.epoch, args.epochs):
        stats = self.train_epoch(epoch, start)  # None: the ranks agreed to stop, checkpoint written
        self.end_epoch(epoch + 1, stats)        # evaluate, log, checkpoint (+ export) when due

One optimizer update's path: ``engine.loop.train_updates`` (forward, backward, ``stepper.step()``,
a log point when due) yields to ``Trainer.train_epoch``, which asks ``agreement.check()``
(``engine.agreement``: a stop signal on any rank, ``--save_ckpt_minutes`` on rank 0) and
``--save_ckpt_steps``, saves, and returns when stopping.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset, default_collate

from .agreement import Agreement
from .checkpoint import (check_run_layout, checkpoint_name, checkpoint_paths, find_resume_checkpoint,
                         restore_training_state, save_checkpoint)
from .cli import cli_errors
from .config import ConfigError, check_output_folders, config_dict, resolve_hardware_defaults, save_config
from .data import build_loader, shutdown_workers
from .distributed import (DistributedInfo, all_gather_objects, all_reduce_mean, announce_failure,
                          check_replicas_identical, get_world_size, init_distributed, job_store, wrap_ddp)
from .flops import count_step_flops, matmul_precision, peak_tflops
from .logging import MetricsLog, setup_logging, start_log_file
from .loop import LossFn, Step, epoch_batches, log_skipped_updates, reseed_every_micro_batch, train_updates
from .optim import build_adamw, effective_batch_size, scaled_lr
from .progress import EpochProgress
from .progress_bar import busy_until_first
from .schedule import build_lr_scheduler
from .seeding import configure_determinism, derive_seed, seed_everything
from .signals import (EXIT_INTERRUPTED, EXIT_STOPPED, StopRequested, handle_stop_signals, remove_stop_marker,
                      stop_reason, stop_signals_blocked, stopped_under_this_torchrun, torchrun_agent,
                      workers_ignore_stop_signals, write_stop_marker)
from .stepper import GradientStepper, build_model_ema
from .trackers import Trackers, open_trackers

_logger = logging.getLogger(__name__)

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
    epochs_done, should_stop)`` returns metrics after each epoch; long evaluations call
    ``should_stop()`` at the same points on every rank (the ranks' agreed stop) and raise
    ``engine.signals.StopRequested`` when it says so;
    ``epoch_summary(record)`` adds them to the epoch's log line. ``export(model, record,
    trackers)`` runs on rank 0 with each epoch checkpoint (and once at the end of a run that
    trained nothing): ``record`` is the epoch's metrics record ("epoch": epochs done, "updates":
    optimizer updates done, the trackers' step), ``trackers`` the run's ``engine.trackers.Trackers``.
    ``outputs_opened()`` runs once the run has started and ``--output_dir`` exists (e.g. to save
    the scan of the data for the next run). ``prepare_weights(model,
    resumed_from)`` runs on every rank once the checkpoint to resume (its path, or None for a
    fresh start) is loaded: e.g. initialise a fresh start from earlier weights.
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
    evaluate: Optional[Callable[[nn.Module, Optional[nn.Module], int, Callable[[], bool]], dict]] = None
    epoch_summary: Callable[[dict], str] = lambda record: ""
    export: Optional[Callable[[nn.Module, dict, Trackers], None]] = None
    outputs_opened: Optional[Callable[[], None]] = None
    prepare_weights: Optional[Callable[[nn.Module, Optional[str]], None]] = None


@dataclass(frozen=True)
class ResumePoint:
    """Where training starts: ``epoch`` epochs completed, ``iteration`` micro-batches into the
    next, ``progress``: that epoch's ``EpochProgress`` totals so far, ``tracking``: the tracker
    runs to continue (``Trackers.state_dict``)."""

    epoch: int = 0
    iteration: int = 0
    progress: Optional[dict] = None
    tracking: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the process

def last_checkpoint_note(output_dir: str) -> str:
    found = checkpoint_paths(output_dir)
    if not found:
        return f"no checkpoint was written to {output_dir} yet"
    return f"the last checkpoint is {found[-1]}; rerun the same command to resume from it"


def launch(parser: argparse.ArgumentParser, args: argparse.Namespace, work: Callable[[DistributedInfo], T],
           intro: Optional[str] = None) -> T:
    """Run ``work(info)`` as a CLI process: stop signals handled from the start (a request during
    the dataset scan is kept), distributed setup, the machine-dependent defaults
    (``resolve_hardware_defaults``), logging (rank 0 keeps its records for train.log until
    ``run_training`` opens it; the first line names a demo run) and the exit codes of the module
    docstring. A rank that fails tells the others (``announce_failure``), which then stop at
    their next update instead of waiting for ``--dist_timeout``. ``args`` comes from
    ``engine.cli.parse_and_validate``."""
    with handle_stop_signals(), cli_errors(parser):
        info = init_distributed(args.device, args.dist_timeout, args.cpu_threads)
        setup_logging(info.rank)
        exit_if_stopped_under_this_torchrun(args.output_dir, info)
        chosen = resolve_hardware_defaults(args, info.device)
        if args.demo:
            _logger.info("No --data_path and no --config: demonstration run with %s as the defaults (flags override "
                         "them), writing to %s", Path(args.config).name, args.output_dir)
        for line in ([intro] if intro else []) + list(args.notes):
            _logger.info("%s", line)
        if chosen:
            _logger.info("chosen for this machine: %s", ", ".join(chosen))
        try:
            return work(info)
        except KeyboardInterrupt:
            _logger.warning("interrupted (Ctrl-C); %s", last_checkpoint_note(args.output_dir))
            sys.exit(EXIT_INTERRUPTED)
        except BaseException as error:
            if not isinstance(error, SystemExit):
                announce_failure(f"{type(error).__name__}: {error}")
            raise


def exit_if_stopped_under_this_torchrun(output_dir: str, info: DistributedInfo) -> None:
    """Workers that torchrun restarted after a deliberate stop exit at once (``engine.signals``)."""
    stopped = torch.tensor(float(stopped_under_this_torchrun(output_dir)), device=info.device)
    if info.world_size > 1:
        stopped = all_reduce_mean(stopped)
    if stopped.item() > 0:
        _logger.warning("this torchrun already stopped the run in %s; exiting with code %d instead of resuming "
                        "(start a new torchrun, e.g. rerun the command, to resume)", output_dir, EXIT_STOPPED)
        sys.exit(EXIT_STOPPED)


# ---------------------------------------------------------------- setup

def check_updates_per_epoch(updates: int, args: argparse.Namespace, dataset_size: int, world_size: int) -> None:
    if updates < 1:
        raise ConfigError(f"--batch_size {args.batch_size} / --update_freq {args.update_freq}: each process gets "
                          f"{dataset_size // world_size} images, fewer than one optimizer update "
                          f"(batch_size * update_freq = {args.batch_size * args.update_freq}); lower them")


def build_model_and_stepper(args: argparse.Namespace, info: DistributedInfo, task: Task,
                            lr: float) -> tuple[nn.Module, nn.Module, GradientStepper]:
    """(model as checkpoints hold it, the model trained: DDP / torch.compile wrapped, its stepper)."""
    seed_everything(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = task.build_model().to(info.device)
    optimizer = build_adamw(model, lr, args.weight_decay, task.adamw_betas, param_group_fn=task.param_group_fn)
    train_model = wrap_ddp(model, info.device)
    if args.compile:
        train_model = torch.compile(train_model)
    ema = build_model_ema(model, task.ema_decay) if task.ema_decay is not None else None
    stepper = GradientStepper(train_model, optimizer, amp=args.amp, update_freq=args.update_freq,
                              clip_grad=args.clip_grad, ema=ema, ema_source=model)
    return model, train_model, stepper


def resume(args: argparse.Namespace, info: DistributedInfo, task: Task, model: nn.Module,
           stepper: GradientStepper) -> ResumePoint:
    """Load --resume, or the newest valid checkpoint with --auto_resume, after the checks; then
    the task's ``prepare_weights``."""
    found = find_resume_checkpoint(args, info)
    if task.prepare_weights is not None:
        task.prepare_weights(model, found[0] if found else None)
        if found is None and stepper.ema is not None:
            stepper.ema.set(model)
    if found is None:
        return ResumePoint()
    path, state = found
    advice = "or pass another --resume checkpoint" if args.resume else "or use another --output_dir"
    task.check_checkpoint(path, state, advice)  # first: the other script's checkpoint is named as such
    saved_model = state.get("config", {}).get("model")
    if saved_model is not None and saved_model != args.model:
        raise ConfigError(f"--model {args.model}: checkpoint {path} holds a {saved_model}; "
                          f"use --model {saved_model} {advice}")
    iteration = check_run_layout(path, state, args, info.world_size)
    restore_training_state(path, state, model, stepper.optimizer, stepper)
    if stepper.ema is not None:
        if "model_ema" in state:
            stepper.ema.module.load_state_dict(state["model_ema"])
        else:
            stepper.ema.set(model)
    task.state.update({key: state[key] for key in task.state if key in state})
    return ResumePoint(int(state["epoch"]), iteration, state.get("progress") if iteration else None,
                       state.get("tracking", {}))


def device_peak_tflops(device: torch.device, amp: str) -> Optional[float]:
    """The device's dense peak for MFU (CUDA devices of ``engine.flops``' table only)."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device), matmul_precision(amp))


def count_unreadable(dataset, device: torch.device) -> int:
    """Unreadable files found so far, summed over ranks."""
    local = torch.tensor(float(getattr(dataset, "unreadable_count", 0)), device=device)
    return round(all_reduce_mean(local).item() * get_world_size())


def open_outputs(args: argparse.Namespace, info: DistributedInfo, derived: dict,
                 resumed_tracking: dict) -> tuple[Trackers, MetricsLog]:
    """Create --output_dir's files (rank 0): first the trackers (one that cannot start stops the
    run before train.log exists, and removes an --output_dir this run created), then train.log
    (with what was logged so far) and config.yaml."""
    output_dir = Path(args.output_dir)
    created = not output_dir.exists()
    if info.is_main:
        check_output_folders(args)
    try:
        trackers = open_trackers(args, info.is_main, resumed_tracking, config_dict(args))
    except ConfigError:
        if created and info.is_main:
            shutil.rmtree(output_dir, ignore_errors=True)  # a run that fails to start leaves nothing
        raise
    if info.is_main:
        start_log_file(output_dir / "train.log")
        save_config(args, output_dir / "config.yaml", derived)
        remove_stop_marker(output_dir)  # a new launch resumes a stopped run
    return trackers, MetricsLog(output_dir / "metrics.jsonl" if info.is_main else None)


# ---------------------------------------------------------------- the epochs

class Trainer:
    """The epochs of one run, and its checkpoints (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, info: DistributedInfo, task: Task, model: nn.Module,
                 train_model: nn.Module, stepper: GradientStepper, loader, scheduler, trackers: Trackers,
                 metrics_log: MetricsLog):
        self.args, self.info, self.task = args, info, task
        self.model, self.train_model, self.stepper = model, train_model, stepper
        self.loader, self.scheduler, self.trackers, self.metrics_log = loader, scheduler, trackers, metrics_log
        self.updates_per_epoch = stepper.updates_per_epoch(len(loader))
        self.iterations = self.updates_per_epoch * stepper.update_freq
        self.agreement = Agreement(job_store(), info.rank, info.world_size, args.save_ckpt_minutes, args.dist_timeout)
        self.agents = all_gather_objects(torchrun_agent())  # for the stop marker
        self.reseed = reseed_every_micro_batch(args.seed, info.rank)
        self.peak = device_peak_tflops(info.device, args.amp)
        self.compiled = False  # --compile: whether the first update (which compiles) ran in this process
        self.flops_per_image = self.count_flops() if self.peak is not None else None

    def fit(self, start: ResumePoint) -> Optional[dict]:
        """The epochs from ``start`` to --epochs: the last epoch's record ({} if none was left to
        train), None when the ranks agreed to stop (a checkpoint was written)."""
        record: dict = {}
        for epoch in range(start.epoch, self.args.epochs):
            stats = self.train_epoch(epoch, start if epoch == start.epoch else ResumePoint(epoch))
            if stats is None:
                return None
            record = self.end_epoch(epoch + 1, stats)
            if record is None:
                return None
        if start.epoch >= self.args.epochs:
            _logger.info("nothing left to train: %d of %d epochs done", start.epoch, self.args.epochs)
            if self.info.is_main and self.task.export is not None:
                self.task.export(self.model, {"epoch": start.epoch, "updates": start.epoch * self.updates_per_epoch},
                                 self.trackers)
        if self.info.world_size > 1:
            report_replicas(self.model, self.info)
        return record

    def train_epoch(self, epoch: int, start: ResumePoint) -> Optional[dict]:
        """One epoch from ``start``: its stats, or None when the ranks agreed to stop inside it."""
        args, stepper = self.args, self.stepper
        progress = EpochProgress(epoch, args.epochs, self.iterations, stepper, self.info.device, args.print_freq,
                                 self.trackers, start.iteration, start.progress, self.flops_per_image, self.peak,
                                 args.max_skipped_updates)
        seed_everything(derive_seed(args.seed, epoch, self.info.rank))  # the loader workers' seeds: this epoch's
        with stop_signals_blocked():  # workers started now ignore the stop signals from their first instruction
            batches = epoch_batches(self.loader, epoch, start.iteration)
        steps = train_updates(self.train_model, batches, self.task.loss_fn, stepper, self.scheduler, progress,
                              epoch=epoch, start_iteration=start.iteration, reseed=self.reseed)
        if args.compile and not self.compiled:
            steps, self.compiled = busy_until_first(steps, "torch.compile: compiling the model (first update)"), True
        for step in steps:
            done = step.iteration + 1
            if done == self.iterations:
                break  # the end of the epoch evaluates and checkpoints
            decision = self.agreement.check()
            if decision.save or decision.stop or self.steps_due(step):
                progress.log_point(step)  # read and check before saving
                path = self.save(epoch, done, progress.state_dict())
                if decision.stop:
                    self.stop(path, f"in epoch {epoch + 1} after iteration {done}")
                    return None
        return log_skipped_updates(progress.summary(), stepper, self.iterations)

    def end_epoch(self, epochs_done: int, stats: dict) -> Optional[dict]:
        """Evaluate, log, checkpoint (+ export) when due; the epoch's record, None when stopping."""
        args, task = self.args, self.task
        updates = epochs_done * self.updates_per_epoch  # the trackers' step
        record = {"epoch": epochs_done, "updates": updates, **stats,
                  "unreadable_images": count_unreadable(task.train_set, self.info.device)}
        stop = False
        if task.evaluate is not None:
            try:
                evaluation = task.evaluate(self.model, self.stepper.ema.module if self.stepper.ema else None,
                                           epochs_done, lambda: self.agreement.check().stop)
            except StopRequested:
                evaluation, stop = {}, True
            self.trackers.scalars(evaluation, updates, "val/")
            record.update(evaluation)
        log_epoch(args, task, record)
        self.metrics_log.append(record)
        self.trackers.scalars({name: value for name, value in stats.items() if name != "epoch_time_s"},
                              updates, "epoch/")
        decision = self.agreement.check()
        stop = stop or decision.stop
        if epochs_done % args.save_ckpt_freq == 0 or epochs_done == args.epochs or decision.save or stop:
            path = self.save(epochs_done)
            if stop:
                self.stop(path, f"after epoch {epochs_done}")
                return None
            if self.info.is_main and task.export is not None:
                task.export(self.model, record, self.trackers)
        return record

    def steps_due(self, step: Step) -> bool:
        return self.args.save_ckpt_steps is not None and (step.update + 1) % self.args.save_ckpt_steps == 0

    def checkpoint_state(self, epochs_done: int, iteration: int, progress: Optional[dict]) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.stepper.optimizer.state_dict(),
                 "stepper": self.stepper.state_dict(), "epoch": epochs_done, "iteration": iteration,
                 "config": config_dict(self.args), "world_size": self.info.world_size,
                 "tracking": self.trackers.state_dict(), **self.task.state}
        if progress is not None:
            state["progress"] = progress
        if self.stepper.ema is not None:
            state["model_ema"] = self.stepper.ema.module.state_dict()
        return state

    def save(self, epochs_done: int, iteration: int = 0, progress: Optional[dict] = None) -> Path:
        """Rank 0 writes the checkpoint of this position; returns its path (on every rank)."""
        updates = iteration // self.args.update_freq
        path = Path(self.args.output_dir) / checkpoint_name(epochs_done, updates)
        if self.info.is_main:
            save_checkpoint(self.checkpoint_state(epochs_done, iteration, progress), self.args.output_dir,
                            epochs_done, self.args.save_ckpt_num, updates)
            where = f" (epoch {epochs_done + 1}, iteration {iteration})" if iteration else ""
            _logger.info("saved %s%s", path.name, where)
        self.agreement.saved()
        return path

    def stop(self, path: Path, where: str) -> None:
        """After the stop's checkpoint: the stop marker (restarted torchrun workers exit at once),
        then every rank waits until rank 0 is done, so nobody exits (and makes torchrun stop the
        others) before the files are complete."""
        if self.info.is_main:
            write_stop_marker(self.args.output_dir, self.agents, str(path))
        self.agreement.barrier("stop")
        _logger.warning("stopped on %s %s: wrote %s; rerun the same command to resume from it (exit code %d)",
                        stop_reason() or "another process's stop request", where, path, EXIT_STOPPED)

    def count_flops(self) -> Optional[float]:
        """FLOPs per image of a training micro-batch, counted once on fake tensors (for MFU)."""
        try:
            batch = default_collate([self.task.train_set[0]] * 2)
        except Exception:  # noqa: BLE001  (an unreadable first sample: no MFU)
            return None
        return count_step_flops(self.model, self.task.loss_fn, batch, Step(0, 0, 0), self.stepper.autocast())


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


# ---------------------------------------------------------------- the run

def run_training(args: argparse.Namespace, info: DistributedInfo, task: Task) -> dict:
    """Train ``task`` until --epochs; returns the last epoch's metrics record ({} if nothing was
    left to train). Raises ConfigError / run faults for ``launch``; exits with ``EXIT_STOPPED``
    when the ranks agreed to stop (a checkpoint was written)."""
    configure_determinism(info.device)
    loader = build_loader(task.train_set, args.batch_size, args.num_workers, args.seed, info.rank,
                          info.world_size, info.device, pin_memory=args.pin_mem)
    workers_ignore_stop_signals(loader)
    effective_batch = effective_batch_size(args.batch_size, args.update_freq, info.world_size)
    lr = args.lr if args.lr is not None else scaled_lr(args.blr if args.blr is not None else task.recipe_blr,
                                                       effective_batch)
    model, train_model, stepper = build_model_and_stepper(args, info, task, lr)
    updates = stepper.updates_per_epoch(len(loader))
    check_updates_per_epoch(updates, args, len(task.train_set), info.world_size)
    start = resume(args, info, task, model, stepper)
    scheduler = build_lr_scheduler(stepper.optimizer, args.epochs, args.warmup_epochs, updates, args.min_lr)
    trackers, metrics_log = open_outputs(args, info, {
        "world_size": info.world_size, "device": str(info.device), "effective_batch_size": effective_batch,
        "lr": lr, "updates_per_epoch": updates, **task.derived}, start.tracking)
    if task.outputs_opened is not None:
        task.outputs_opened()
    _logger.info("%s on %s x %d: %d images/epoch, effective batch %d (%d x %d accumulation x %d), lr %.3g, "
                 "%d epoch%s from epoch %d", task.description, info.device, info.world_size, len(task.train_set),
                 effective_batch, args.batch_size, args.update_freq, info.world_size, lr, args.epochs,
                 "" if args.epochs == 1 else "s", start.epoch)
    record = None
    try:
        record = Trainer(args, info, task, model, train_model, stepper, loader, scheduler, trackers,
                         metrics_log).fit(start)
    finally:
        trackers.close(finished=record is not None)
        shutdown_workers(loader)
    if record is None:
        sys.exit(EXIT_STOPPED)
    return record

