"""SIGKILL at random moments while checkpoints are being written (issue 5, item 1).

A forked child writes checkpoints in a loop, resuming from the newest valid one as a training
run would, and is killed after a random delay, 30 times over in the same folder. After every
kill each file named ``checkpoint-<epoch>.pth`` must be complete (it loads, its contents are the
ones written for that epoch), the newest one written is found by ``latest_valid_checkpoint``,
and the temporary file of an interrupted save is never taken for a checkpoint.
"""
import logging
import multiprocessing
import os
import random
import signal
import time

import torch

from engine.checkpoint import checkpoint_paths, latest_valid_checkpoint, load_checkpoint, save_checkpoint

TRIALS = 30
PAYLOAD = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))  # 8 MB of weights


def checkpoint_state(epoch: int) -> dict:
    return {"model": {"weight": PAYLOAD, "stamp": torch.full((64,), epoch)}, "epoch": epoch}


def save_checkpoints_forever(output_dir, completed_epoch) -> None:
    """Child process: resume from the newest valid checkpoint, then save epoch after epoch."""
    found = latest_valid_checkpoint(output_dir)
    epoch = found[1]["epoch"] if found else 0
    while True:
        epoch += 1
        save_checkpoint(checkpoint_state(epoch), output_dir, epoch, keep_last=2)
        completed_epoch.value = epoch


def assert_complete(path) -> int:
    state = load_checkpoint(path)
    epoch = int(path.name[len("checkpoint-"):-len(".pth")])
    assert state["epoch"] == epoch, f"{path.name} holds epoch {state['epoch']}"
    assert torch.equal(state["model"]["stamp"], torch.full((64,), epoch)), f"{path.name}: wrong stamp"
    assert torch.equal(state["model"]["weight"], PAYLOAD), f"{path.name}: weights differ from those written"
    return epoch


def test_kill_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path, caplog):
    context = multiprocessing.get_context("fork")  # no re-import of torch per trial
    completed_epoch = context.Value("q", 0, lock=False)
    delays = random.Random(0)
    killed_mid_write = 0
    newest = 0
    for trial in range(TRIALS):
        completed_epoch.value = 0
        child = context.Process(target=save_checkpoints_forever, args=(tmp_path, completed_epoch))
        child.start()
        time.sleep(delays.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, f"trial {trial}: the writer ended by itself"

        orphans = list(tmp_path.glob(".checkpoint-*.tmp"))
        killed_mid_write += bool(orphans)
        with caplog.at_level(logging.WARNING):
            epochs = [assert_complete(path) for path in checkpoint_paths(tmp_path)]
            path, state = latest_valid_checkpoint(tmp_path)
        assert not caplog.records, f"trial {trial}: a file named like a checkpoint was unusable: {caplog.text}"
        assert state["epoch"] == max(epochs)
        # the newest completed save is found; one more if the kill fell between rename and bookkeeping
        completed = max(completed_epoch.value, newest)
        assert completed <= state["epoch"] <= completed + 1, f"trial {trial}: lost checkpoint {completed}"
        if completed_epoch.value:
            assert len(orphans) <= 1, f"trial {trial}: temporary files of earlier kills were not cleaned up"
        newest = state["epoch"]

    assert killed_mid_write >= TRIALS // 3, f"only {killed_mid_write} of {TRIALS} kills hit a write in progress"
    assert newest >= TRIALS // 2, "the writer barely got anything saved"
