"""Where a run's numbers go: TensorBoard, plus Weights & Biases and MLflow when asked (rank 0 only).

    trackers = open_trackers(args, output_dir, resumed=state.get("tracking"), config=config_dict(args))
    trackers.scalars({"loss": 0.81, "lr": 1e-4}, step=updates_done, prefix="train/")
    trackers.image("reconstruction", grid, step)   # grid: (3, H, W) float in [0, 1]
    trackers.artifact(path)                        # a file of the run (MLflow only)
    checkpoint["tracking"] = trackers.state_dict()  # the run ids and the last step logged
    trackers.close(finished=True)

Every tracker gets the same calls with the same keys and steps. A step is a number of optimizer
updates done, so it only grows while the run trains. A resumed run continues the same W&B run
(its id is the ``run_id`` kept in the checkpoint) and the same MLflow run (``mlflow_run_id``);
the configuration is logged once, when the tracker run starts.

A resumed run redoes the updates since its checkpoint, which were logged before the
interruption (a mid-epoch checkpoint at update 100, updates up to 130 logged, then a kill).
``<output_dir>/tracking.json`` holds the last step logged as it happens; a run that resumes
the same tracker run logs nothing at or below that step, so no step is logged twice and none
goes backwards (W&B drops such steps with a warning; MLflow and TensorBoard would keep both).

``open_trackers`` raises ConfigError, one line naming the flag and the fix, when W&B or MLflow
cannot start (not logged in, no server at the URI): at start-up, before any training. The
``--log_wandb`` and ``--mlflow_uri`` checks in ``engine.config`` already refuse a missing package.
Once started, a W&B or MLflow call that fails (a server gone, W&B's service killed with the job)
is a warning: training and its checkpoints go on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import string
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .errors import ConfigError
from .interrupts import interrupts_deferred
from .logging import TensorBoardWriter

_logger = logging.getLogger(__name__)

LOGGED_STEP_FILE = "tracking.json"
RUN_ID_LENGTH = 8  # W&B's own run ids: 8 characters of [a-z0-9]
MLFLOW_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MLFLOW_PARAM_LENGTH = 6000  # MLflow's longest parameter value


def new_run_id() -> str:
    """A fresh tracker run id: 8 characters of [a-z0-9] (valid as a W&B run id)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(random.SystemRandom().choice(alphabet) for _ in range(RUN_ID_LENGTH))


def image_as_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, what W&B and MLflow take."""
    return image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for a one-line start-up error."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")


class WandbRun:
    """One Weights & Biases run; ``run_id`` continues it when it exists (``resume="allow"``)."""

    def __init__(self, run_id: str, project: Optional[str], name: str, tags: list[str], folder: Path,
                 config: Optional[dict]):
        import wandb

        self.wandb = wandb
        try:
            self.run = wandb.init(id=run_id, resume="allow", project=project, name=name, tags=tags or None,
                                  dir=str(folder), config=config)
        except Exception as error:  # noqa: BLE001  (not logged in, no network, bad project: all one line)
            raise ConfigError(f"--log_wandb: Weights & Biases could not start ({one_line(error)}); log in with "
                              "`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to write the run "
                              f"under {folder}/wandb and `wandb sync` it later") from error
        _logger.info("W&B run %s (project %s)%s", self.run.id, self.run.project,
                     f": {self.run.url}" if getattr(self.run, "url", None) else "")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image_as_uint8(image))}, step=step)

    def artifact(self, path: Path) -> None:
        pass  # W&B gets scalars and pictures; files go to MLflow

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowRun:
    """One MLflow run in ``experiment`` at ``uri``; ``run_id`` continues an existing one."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: Optional[str], config: dict):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.metric = Metric
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is not None and not self.exists(run_id):
                _logger.warning("MLflow run %s of the checkpoint is not at %s; starting a new run", run_id, uri)
                run_id = None
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
            else:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
                run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                params = [Param(key, str(value)[:MLFLOW_PARAM_LENGTH]) for key, value in config.items()]
                for start in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
                    self.client.log_batch(run_id, params=params[start:start + MLFLOW_PARAMS_PER_CALL])
        except Exception as error:  # noqa: BLE001  (no server, unreadable store, deleted run: all one line)
            raise ConfigError(f"--mlflow_uri {uri}: MLflow could not start ({one_line(error)}); check the URI (a "
                              "server's http://host:port, or sqlite:///path/mlflow.db for a local store)") from error
        self.run_id = run_id
        _logger.info("MLflow run %s (experiment %s) at %s", run_id, experiment, uri)

    def exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(key, float(value), timestamp, step)
                                                    for key, value in values.items()])

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.client.log_image(self.run_id, image_as_uint8(image), key=tag, step=step)

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class Trackers:
    """TensorBoard and the optional trackers behind one set of calls (see the module docstring).
    A Ctrl-C during a call takes effect when the call returns (``engine.interrupts``): it never
    cuts a tracker's write half-way (TensorBoard's close could then wait up to 120 s).

    ``logged_through``: steps up to it were logged before this process (a resumed run) and are
    not logged again. ``step_file``: where each new highest step is recorded (None: nowhere)."""

    def __init__(self, tensorboard: TensorBoardWriter, others: list, runs: Optional[dict] = None,
                 logged_through: int = -1, step_file: Optional[Path] = None):
        self.tensorboard, self.others = tensorboard, others
        self.runs = runs or {}  # run_id, mlflow_run_id, wandb (whether a W&B run was started)
        self.logged_through = self.last_step = logged_through
        self.step_file = step_file

    def _new(self, step: int) -> bool:
        """Whether ``step`` is to be logged; records a new highest step."""
        if step <= self.logged_through:
            return False
        if step > self.last_step:
            self.last_step = step
            if self.step_file is not None:
                write_logged_step(self.step_file, self.runs["run_id"], step)
        return True

    @interrupts_deferred()
    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if not values or not self._new(step):
            return
        named = {f"{prefix}{name}": float(value) for name, value in values.items()}
        self.tensorboard.scalars(named, step)
        self._each("scalars", named, step)

    @interrupts_deferred()
    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: (3, H, W) float in [0, 1]."""
        if not self._new(step):
            return
        self.tensorboard.image(tag, image, step)
        self._each("image", tag, image, step)

    @interrupts_deferred()
    def artifact(self, path: str | os.PathLike) -> None:
        """Attach the file ``path`` to the run (MLflow: copied into its artifacts)."""
        self._each("artifact", Path(path))

    @interrupts_deferred()
    def flush(self) -> None:
        self.tensorboard.flush()

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint: the tracker runs to continue and the last step logged ({} off rank 0)."""
        return {**self.runs, "last_step": self.last_step} if self.runs else {}

    @interrupts_deferred()
    def close(self, finished: bool = True) -> None:
        """``finished``: the run trained to its end (else it stopped to be resumed, or failed)."""
        self.tensorboard.close()
        self._each("close", finished)

    def _each(self, method: str, *args) -> None:
        """Call ``method`` of every W&B/MLflow run. A failure (a server gone, W&B's service killed
        with the job) is a warning: it never stops training or the checkpoint being written."""
        for tracker in self.others:
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001
                _logger.warning("%s: %s failed (%s); training goes on", type(tracker).__name__, method,
                                one_line(error))


def read_logged_step(path: Path, run_id: str) -> int:
    """The last step ``tracking.json`` records for ``run_id`` (-1: none, another run's, unreadable)."""
    try:
        record = json.loads(path.read_text())
        return int(record["last_step"]) if record.get("run_id") == run_id else -1
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return -1


def write_logged_step(path: Path, run_id: Optional[str], step: int) -> None:
    """Replace ``tracking.json`` (a rename: readers see the old or the new record). Not fsynced:
    it is written at every log point, and a lost record only lets a resumed run log a redone
    step again."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"run_id": run_id, "last_step": step}))
    os.replace(temporary, path)


def open_trackers(args: argparse.Namespace, is_main: bool, resumed: Optional[Mapping[str, Any]],
                  config: dict) -> Trackers:
    """The trackers of a run (rank 0; other ranks get one that does nothing). ``resumed``: the
    checkpoint's ``tracking`` entry (None or {} for a new run); ``config``: logged once, when a
    tracker run starts. Call once ``--output_dir`` exists."""
    if not is_main:
        return Trackers(TensorBoardWriter(None), [])
    resumed = dict(resumed or {})
    run_id = resumed.get("run_id") or new_run_id()
    output_dir = Path(args.output_dir)
    step_file = output_dir / LOGGED_STEP_FILE
    logged_through = max(int(resumed.get("last_step", -1)), read_logged_step(step_file, run_id))
    runs = {"run_id": run_id, "mlflow_run_id": resumed.get("mlflow_run_id"), "wandb": bool(resumed.get("wandb"))}
    others: list = []
    if args.mlflow_uri is not None:
        mlflow = MlflowRun(args.mlflow_uri, args.mlflow_experiment, args.mlflow_run_name or output_dir.name,
                           runs["mlflow_run_id"], config)
        runs["mlflow_run_id"] = mlflow.run_id
        others.append(mlflow)
    if args.log_wandb:
        others.append(WandbRun(run_id, args.wandb_project, args.wandb_name or output_dir.name, args.wandb_tags,
                               output_dir, None if runs["wandb"] else config))
        runs["wandb"] = True
    if logged_through >= 0:
        _logger.info("trackers: run %s continues; steps up to %d were logged before and are not logged again",
                     run_id, logged_through)
    tensorboard = TensorBoardWriter(args.log_dir or output_dir / "tensorboard")
    return Trackers(tensorboard, others, runs, logged_through, step_file)
