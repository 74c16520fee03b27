"""pretrain.py across processes: kill + resume equals an uninterrupted run; two gloo ranks agree."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain
from engine.checkpoint import load_checkpoint
from image_folders import make_image_folder

torch.set_num_threads(1)  # the same thread count as the subprocesses below, for bitwise-equal numbers

REPO = Path(pretrain.__file__).resolve().parent
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_args(data, output, epochs=4):
    # 8 images, batch 2, update_freq 2: 4 iterations and 2 optimizer updates per epoch
    return ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--update_freq", "2",
            "--epochs", str(epochs), "--warmup_epochs", "1", "--blr", "1e-2", "--data_path", str(data),
            "--output_dir", str(output), "--num_workers", "0", "--print_freq", "2", "--save_ckpt_freq", "1",
            "--save_ckpt_num", "2", "--seed", "7"]


def assert_states_equal(actual, expected, what):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=f"{what}: {name} differs")


@pytest.mark.slow
def test_killed_and_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    pretrain.main(run_args(data, tmp_path / "straight"))

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *run_args(data, interrupted)],
                               env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (interrupted / "checkpoint-1.pth").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint-1.pth within 4 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # as if the node died
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"run ended before it could be killed: {process.stderr.read()}"
    assert not (interrupted / "checkpoint-4.pth").exists()

    pretrain.main(run_args(data, interrupted))  # same command again: --auto_resume is on by default

    straight = load_checkpoint(tmp_path / "straight" / "checkpoint-4.pth")
    resumed = load_checkpoint(interrupted / "checkpoint-4.pth")
    assert_states_equal(resumed["model"], straight["model"], "model")
    for index, state in straight["optimizer"]["state"].items():
        assert_states_equal(resumed["optimizer"]["state"][index], state, f"AdamW state of parameter {index}")
    assert "resumed from" in (interrupted / "train.log").read_text()


@pytest.mark.slow
def test_two_gloo_processes_train_identical_weights(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "pretrain.py"), *run_args(data, output, epochs=2), "--update_freq", "1"]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    log = (output / "train.log").read_text()
    assert "weights identical on all 2 ranks" in log
    assert "effective batch 4 (2 x 1 accumulation x 2)" in log
    assert "epoch 2/2 [2/2]" in log  # 8 images / 2 ranks / batch 2 = 2 iterations per rank
    assert load_checkpoint(output / "checkpoint-2.pth")["epoch"] == 2
    assert len(list((output / "tensorboard").glob("events.out.tfevents.*"))) == 1, "only rank 0 writes"
