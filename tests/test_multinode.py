"""A simulated two-node job: two torchrun agents on 127.0.0.1, one gloo process each, meeting
through torchrun's c10d rendezvous, as two machines would.

* The two-node job ends with the weights of one agent running two processes, bitwise.
* With ``--max_restarts 1``, a worker SIGKILLed on one node mid-run makes both agents restart
  their workers (one counts a restart, the other sees a membership change: their restart counts
  differ); the new group agrees on a fresh key prefix in the agents' shared store, resumes from
  the newest checkpoint and ends with the uninterrupted weights.
* A stop on purpose under ``--max_restarts`` (the workers get SIGTERM, save and exit 3) is not
  undone by torchrun's restart: the restarted workers see the stop marker and exit at once; a
  new torchrun resumes.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from engine.checkpoint import checkpoint_paths, load_checkpoint
from engine.signals import STOP_MARKER
from image_folders import make_image_folder
from reliability.faults import (REPO, assert_states_equal, child_pids, finish, log_contains, pretrain_args,
                                process_with_rank, start_command, start_script, wait_until)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker processes through /proc")]

EPOCHS = 3  # 8 images / 2 ranks / batch 2: 2 iterations per epoch and rank


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=2, per_class=4)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """One agent, two processes: the reference weights."""
    folder = tmp_path_factory.mktemp("straight")
    process = start_script("pretrain.py", pretrain_args(data, folder / "out", epochs=EPOCHS), folder / "out.log",
                           torchrun=2)
    finish(process, folder / "out.log")
    return load_checkpoint(folder / "out" / f"checkpoint-{EPOCHS}.pth")


def start_agent(argv: list[str], log: Path, port: int, *launcher: str) -> subprocess.Popen:
    """One of two torchrun agents ("nodes") meeting at 127.0.0.1:``port``."""
    return start_command([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                          "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes",
                          *launcher, str(REPO / "pretrain.py"), *argv], log)


def assert_no_ddp_layout_warning(*logs: Path) -> None:
    for log in logs:
        assert "Grad strides do not match bucket view strides" not in log.read_text(), log


def test_two_nodes_end_with_the_weights_of_one_node_with_two_processes(data, straight, tmp_path):
    port, output = free_port(), tmp_path / "out"
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    agents = [start_agent(pretrain_args(data, output, epochs=EPOCHS), log, port) for log in logs]
    for agent, log in zip(agents, logs):
        finish(agent, log)
    assert "weights identical on all 2 ranks" in (output / "train.log").read_text()
    assert_states_equal(load_checkpoint(output / f"checkpoint-{EPOCHS}.pth")["model"], straight["model"], "model")
    assert_no_ddp_layout_warning(*logs)


def test_a_worker_killed_on_one_node_is_restarted_and_the_job_ends_with_the_same_weights(data, straight, tmp_path):
    port, output = free_port(), tmp_path / "out"
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    agents = [start_agent(pretrain_args(data, output, epochs=EPOCHS), log, port, "--max_restarts=1") for log in logs]
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [1/2]"), agents[0], logs[0], "progress in epoch 2")
    worker = child_pids(agents[1].pid)
    assert worker, f"no worker under the second agent:\n{logs[1].read_text()[-2000:]}"
    os.kill(worker[0], signal.SIGKILL)  # that node's training process dies
    for agent, log in zip(agents, logs):
        finish(agent, log)
    train_log = (output / "train.log").read_text()
    assert f"resumed from {output / 'checkpoint-1.pth'}" in train_log, "the restarted group did not resume"
    resumed = load_checkpoint(output / f"checkpoint-{EPOCHS}.pth")
    assert_states_equal(resumed["model"], straight["model"], "model")
    assert_states_equal(resumed["optimizer"], straight["optimizer"], "optimizer")


def test_a_stop_under_max_restarts_is_not_resumed_by_the_same_torchrun_but_by_a_new_one(data, straight, tmp_path):
    output, log = tmp_path / "out", tmp_path / "job.log"
    argv = pretrain_args(data, output, epochs=EPOCHS)
    job = start_script("pretrain.py", argv, log, 2, "--max_restarts=1")
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [1/2]"), job, log, "progress in epoch 2")
    for rank in (0, 1):  # the stop signal reaches the workers only (a preemption notice, a hook...)
        os.kill(process_with_rank(job.pid, rank), signal.SIGTERM)
    job.wait(240)
    assert job.returncode != 0, "torchrun reported success for a stopped run"
    text = log.read_text()
    assert text.count("this torchrun already stopped the run") >= 2, text[-4000:]  # both restarted workers
    stopped_at = checkpoint_paths(output)[-1]
    assert (output / STOP_MARKER).is_file()
    assert "resumed from" not in (output / "train.log").read_text(), "a restarted worker resumed the stopped run"

    rerun = start_script("pretrain.py", argv, tmp_path / "rerun.log", torchrun=2)  # a new torchrun: resumes
    finish(rerun, tmp_path / "rerun.log")
    assert f"resumed from {stopped_at}" in (output / "train.log").read_text()
    assert not (output / STOP_MARKER).exists()
    assert_states_equal(load_checkpoint(output / f"checkpoint-{EPOCHS}.pth")["model"], straight["model"], "model")
