"""submitit_pretrain.py on submitit's local executor: two gloo tasks on CPU, as a 2-GPU Slurm job
would run; a job preempted through submitit's signal saves, requeues and resumes to the same weights.

Both jobs take the same flags; the first runs straight through and is the reference.
"""
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import load_checkpoint
from image_folders import make_image_folder
from reliability.faults import REPO, assert_states_equal, child_pids, log_contains, pretrain_args

submitit = pytest.importorskip("submitit")
pytest.importorskip("engine.signals", reason="the stop-and-save API of the runner (engine/signals.py)")

import submitit_pretrain  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds task processes through /proc")]

EPOCHS = 4  # 8 images / 2 tasks / batch 2: 2 iterations per epoch and task
JOB_TIMEOUT_S = 600


def submit(data: Path, folder: Path):
    """The 2-task job; training writes to ``folder`` (its default --output_dir, the --job_dir)."""
    argv = ["--cluster", "local", "--ngpus", "0", "--tasks_per_node", "2", "--timeout", "20", "--job_dir", str(folder),
            *pretrain_args(data, folder, epochs=EPOCHS)]
    return submitit_pretrain.main(without_output_dir(argv))


def without_output_dir(argv: list[str]) -> list[str]:
    index = argv.index("--output_dir")
    return argv[:index] + argv[index + 2:]


def wait_for(job, what: str, condition=None):
    """Poll until ``condition()`` (default: the job ended); fail with the tasks' logs otherwise."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (condition() if condition else job.done()):
        if condition and job.done():
            pytest.fail(f"the job ended before {what}:\n{job_logs(job)[-6000:]}")
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"no {what} within {JOB_TIMEOUT_S} s:\n{job_logs(job)[-6000:]}")
        time.sleep(0.002)


def job_logs(job) -> str:
    """Each task's stdout (submitit's own log lines) and stderr."""
    return "\n".join(f"--- task {index}\n{job.task(index).stdout() or ''}{job.task(index).stderr() or ''}"
                     for index in range(2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=2, per_class=4)


@pytest.fixture(scope="module")
def environment():
    """The tasks import this checkout and run one thread each (bitwise-equal numbers)."""
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def straight_job(data, environment, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    job = submit(data, folder)
    wait_for(job, "end of the job")
    assert job.state == "FINISHED", job_logs(job)[-6000:]
    return job, folder


def test_two_tasks_train_as_one_distributed_job_with_identical_weights(straight_job):
    job, folder = straight_job
    assert len(job.results()) == 2, "one result per task"
    log = (folder / "train.log").read_text()
    assert "effective batch 4 (2 x 1 accumulation x 2)" in log, "the tasks did not form one 2-process group"
    assert "weights identical on all 2 ranks" in log
    assert load_checkpoint(folder / f"checkpoint-{EPOCHS}.pth")["epoch"] == EPOCHS


def test_preempted_job_saves_requeues_and_ends_with_the_uninterrupted_weights(data, straight_job, tmp_path):
    folder = tmp_path / "preempted"
    job = submit(data, folder)
    wait_for(job, "progress in epoch 2", log_contains(folder / "train.log", f"epoch 2/{EPOCHS} [1/"))
    tasks = child_pids(int(job.job_id))
    assert len(tasks) == 2, f"expected 2 task processes under the controller, found {tasks}"
    for task in tasks:  # what Slurm does --signal=USR2@120 before the time limit: every task gets it
        os.kill(task, signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG])

    wait_for(job, "end of the requeued job")
    assert job.state == "FINISHED", job_logs(job)[-6000:]
    assert "Requeued job" in job_logs(job), f"submitit did not requeue the job:\n{job_logs(job)[-6000:]}"
    assert "resumed from" in (folder / "train.log").read_text(), "the requeued job did not resume"
    expected = load_checkpoint(straight_job[1] / f"checkpoint-{EPOCHS}.pth")
    resumed = load_checkpoint(folder / f"checkpoint-{EPOCHS}.pth")
    assert_states_equal(resumed["model"], expected["model"], "model")
    assert_states_equal(resumed["optimizer"], expected["optimizer"], "optimizer")
