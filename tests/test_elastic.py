"""Elastic restarts: ``torchrun --max_restarts 2 --nproc_per_node 2 pretrain.py ...`` on gloo/CPU.

A worker SIGKILLed mid-run (its node died) makes torchrun stop and restart the whole worker
group; the restarted group resumes from the newest checkpoint by itself (``--auto_resume``) and
ends with the weights of an uninterrupted run.
"""
import os
import signal
import sys

import pytest

from engine.checkpoint import load_checkpoint
from image_folders import make_image_folder
from reliability.faults import (assert_states_equal, finish, log_contains, pretrain_args, process_with_rank,
                                start_script, wait_until)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank processes through /proc")]

EPOCHS = 3  # 8 images / 2 ranks / batch 2: 2 iterations per epoch and rank


def test_killed_worker_is_restarted_and_the_run_ends_with_the_uninterrupted_weights(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    straight = start_script("pretrain.py", pretrain_args(data, tmp_path / "straight", epochs=EPOCHS),
                            tmp_path / "straight.out", torchrun=2)
    finish(straight, tmp_path / "straight.out")

    output, log = tmp_path / "elastic", tmp_path / "elastic.out"
    job = start_script("pretrain.py", pretrain_args(data, output, epochs=EPOCHS), log, 2, "--max_restarts=2")
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [1/2]"), job, log, "progress in epoch 2")
    rank_0 = process_with_rank(job.pid, 0)
    assert rank_0 is not None, f"rank 0 not found among torchrun's workers:\n{log.read_text()[-2000:]}"
    os.kill(rank_0, signal.SIGKILL)  # the worker that writes the checkpoints

    finish(job, log)  # exit 0: the same torchrun command finished the run after restarting its workers
    train_log = (output / "train.log").read_text()
    assert f"resumed from {output / 'checkpoint-1.pth'}" in train_log, "the restarted group did not resume"
    assert "weights identical on all 2 ranks" in train_log
    expected = load_checkpoint(tmp_path / "straight" / f"checkpoint-{EPOCHS}.pth")
    resumed = load_checkpoint(output / f"checkpoint-{EPOCHS}.pth")
    assert_states_equal(resumed["model"], expected["model"], "model")
    assert_states_equal(resumed["optimizer"], expected["optimizer"], "optimizer")
