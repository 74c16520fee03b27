"""Preemption: mid-epoch checkpoints, SIGTERM/SIGUSR1 -> checkpoint -> exit 3, Ctrl-C (issue 11, points 3-4).

A run stopped or killed inside an epoch resumes from the exact micro-batch (data position,
per-micro-batch RNG, schedule, accumulation group, EMA, scaler, best-so-far) and ends bitwise
equal to a run that was never interrupted.
"""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import pretrain
from engine.checkpoint import checkpoint_paths, load_checkpoint
from engine.signals import EXIT_INTERRUPTED, EXIT_STOPPED, request_stop
from image_folders import make_image_folder
from reliability.faults import (POLL_S, SUBPROCESS_ENV, assert_states_equal, child_pids, cli_args, cli_module,
                                exit_code, finish, log_contains, pretrain_args, process_with_rank,
                                progress_by_iteration, sigkill, start_script, wait_until)

EPOCHS = 3  # 4 iterations of batch 2 each
MID_EPOCH = re.compile(r"checkpoint-\d+-\d+\.pth")
PRETRAIN_KEYS = ("model", "optimizer", "stepper")
FINETUNE_KEYS = ("model", "model_ema", "optimizer", "stepper", "best")




def assert_same_training(resumed_dir, straight_dir, keys, epochs=EPOCHS):
    resumed = load_checkpoint(resumed_dir / f"checkpoint-{epochs}.pth")
    straight = load_checkpoint(straight_dir / f"checkpoint-{epochs}.pth")
    for key in keys:
        assert_states_equal(resumed[key], straight[key], key)
    resumed_log = progress_by_iteration((resumed_dir / "train.log").read_text())
    assert resumed_log == progress_by_iteration((straight_dir / "train.log").read_text()), \
        "a resumed iteration printed another loss or lr"


def test_stop_request_checkpoints_at_the_next_update_boundary_and_resumes_bitwise(pretrain_data, tmp_path,
                                                                                   monkeypatch, caplog):
    """In process, accumulation 2: a stop asked for inside an accumulation group waits for its update."""
    argv = lambda output: pretrain_args(pretrain_data, output, "--update_freq", "2", epochs=2)  # noqa: E731
    pretrain.main(argv(tmp_path / "straight"))

    real_make_loss_fn = pretrain.make_loss_fn

    def make_loss_fn_asking_to_stop(*args, **kwargs):
        loss_fn = real_make_loss_fn(*args, **kwargs)

        def loss(model, batch, step):
            if (step.epoch, step.iteration) == (1, 0):  # the first micro-batch of update 2 of 4
                request_stop("test")
            return loss_fn(model, batch, step)

        return loss

    output = tmp_path / "out"
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        patch.setattr(pretrain, "make_loss_fn", make_loss_fn_asking_to_stop)
        pretrain.main(argv(output))
    assert exit_info.value.code == EXIT_STOPPED
    assert f"stopped on test in epoch 2 after iteration 2: wrote {output / 'checkpoint-1-1.pth'}" in caplog.text
    state = load_checkpoint(output / "checkpoint-1-1.pth")
    assert (state["epoch"], state["iteration"]) == (1, 2)  # after the update that iteration 0 belonged to

    caplog.clear()
    with caplog.at_level(logging.INFO):
        pretrain.main(argv(output))
    assert f"resumed from {output / 'checkpoint-1-1.pth'} (1 epoch and 2 iterations completed)" in caplog.text
    assert [path.name for path in checkpoint_paths(output)] == ["checkpoint-1.pth", "checkpoint-2.pth"]
    assert_same_training(output, tmp_path / "straight", PRETRAIN_KEYS, epochs=2)


def test_save_ckpt_minutes_writes_mid_epoch_checkpoints_that_later_ones_replace(pretrain_data, tmp_path, caplog):
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        pretrain.main(pretrain_args(pretrain_data, output, "--save_ckpt_minutes", "1e-6", "--save_ckpt_freq", "2",
                                    epochs=2))
    assert "saved checkpoint-0-1.pth (epoch 1, iteration 1)" in caplog.text
    assert "saved checkpoint-1-3.pth (epoch 2, iteration 3)" in caplog.text
    assert [path.name for path in checkpoint_paths(output)] == ["checkpoint-1.pth", "checkpoint-2.pth"]


@pytest.fixture(scope="module")
def straight_runs(pretrain_data, finetune_data, tmp_path_factory):
    """Uninterrupted reference runs of both CLIs (2 workers), in the background."""
    runs = {}
    for cli in ("pretrain", "finetune"):
        output = tmp_path_factory.mktemp(f"straight_{cli}")
        log = output.parent / f"{output.name}.out"
        process = start_script(f"{cli}.py", cli_args(cli, pretrain_data, finetune_data, output, workers=2), log)
        runs[cli] = (process, log, output)

    def wait(cli):
        process, log, output = runs[cli]
        finish(process, log)
        return output

    return wait


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["pretrain", "finetune"])
def test_killed_mid_epoch_with_workers_resumes_from_the_mid_epoch_checkpoint_bitwise(cli, pretrain_data,
                                                                                     finetune_data, straight_runs,
                                                                                     tmp_path):
    output = tmp_path / "out"
    argv = cli_args(cli, pretrain_data, finetune_data, output, "--save_ckpt_steps", "1", workers=2)
    process = start_script(f"{cli}.py", argv, tmp_path / "run.out")
    wait_until(lambda: (output / "checkpoint-1-2.pth").exists(), process, tmp_path / "run.out",
               "the checkpoint after 2 updates of epoch 2")
    sigkill(process)
    resumed_from = checkpoint_paths(output)[-1]
    assert MID_EPOCH.fullmatch(resumed_from.name), resumed_from

    cli_module(cli).main(argv)

    assert f"resumed from {resumed_from} (1 epoch and" in (output / "train.log").read_text()
    assert_same_training(output, straight_runs(cli), PRETRAIN_KEYS if cli == "pretrain" else FINETUNE_KEYS)


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["pretrain", "finetune"])
def test_sigterm_then_sigusr1_during_the_save_exit_3_with_a_complete_checkpoint_that_resumes_bitwise(
        cli, pretrain_data, finetune_data, straight_runs, tmp_path):
    """As Slurm does: the signal goes to the whole process group (DataLoader workers included)."""
    output, log = tmp_path / "out", tmp_path / "run.out"
    argv = cli_args(cli, pretrain_data, finetune_data, output, workers=2)
    process = start_script(f"{cli}.py", argv, log)
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [1/4]"), process, log, "iteration 1 of epoch 2")
    os.killpg(process.pid, signal.SIGTERM)
    while process.poll() is None and not any(output.glob(".checkpoint-*.tmp")):
        time.sleep(POLL_S)  # until the stop checkpoint is being written (or the process is done)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGUSR1)
    assert exit_code(process, log, 120) == EXIT_STOPPED, log.read_text()[-3000:]

    text = log.read_text()
    stopped = re.search(r"stopped on SIGTERM in epoch 2 after iteration (\d): wrote (\S+); rerun", text)
    assert stopped, text[-3000:]
    path = output / f"checkpoint-1-{stopped.group(1)}.pth"
    assert stopped.group(2) == str(path) and load_checkpoint(path)["iteration"] == int(stopped.group(1))
    assert not list(output.glob(".*.tmp")), "a partial file was left"
    assert "Traceback" not in text

    cli_module(cli).main(argv)

    assert f"resumed from {path} (1 epoch and" in (output / "train.log").read_text()
    assert_same_training(output, straight_runs(cli), PRETRAIN_KEYS if cli == "pretrain" else FINETUNE_KEYS)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the loader workers through /proc")
def test_sigterm_during_a_knn_pass_stops_it_at_its_next_batch_with_the_epoch_checkpoint_and_resumes(pretrain_data,
                                                                                                   tmp_path):
    """The k-NN monitor's 2 workers ignore the signal (sent to the whole process group, as Slurm
    does), and the pass (60 batches) stops at its next batch instead of running to its end."""
    knn_data = tmp_path / "knn"
    make_image_folder(knn_data / "train", classes=2, per_class=60)
    make_image_folder(knn_data / "val", classes=2, per_class=4)
    output, log = tmp_path / "out", tmp_path / "run.out"
    argv = pretrain_args(pretrain_data, output, "--knn_data_path", str(knn_data), "--knn_k", "5", epochs=2, workers=2)
    process = start_script("pretrain.py", argv, log)
    wait_until(log_contains(output / "train.log", "k-NN monitor: embedding 120 train and 8 val images"), process, log,
               "the start of the first k-NN pass")
    wait_until(lambda: len(child_pids(process.pid)) == 4, process, log, "the k-NN loader's 2 workers (beside the "
               "training loader's 2)")
    os.killpg(process.pid, signal.SIGTERM)
    assert exit_code(process, log, 120) == EXIT_STOPPED, log.read_text()[-3000:]

    text = log.read_text()
    assert f"stopped on SIGTERM after epoch 1: wrote {output / 'checkpoint-1.pth'}; rerun" in text, text[-3000:]
    assert re.search(r"k-NN monitor: pass stopped before train batch \d+ of 60", text), text[-3000:]
    assert "-NN top-1" not in text, "the k-NN pass ran to its end before the stop"
    assert "Traceback" not in text
    assert load_checkpoint(output / "checkpoint-1.pth")["epoch"] == 1
    assert [path.name for path in checkpoint_paths(output)] == ["checkpoint-1.pth"]

    pretrain.main(argv)

    assert f"resumed from {output / 'checkpoint-1.pth'}" in (output / "train.log").read_text()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [(record["epoch"], "knn_top1" in record) for record in records] == [(1, False), (2, True)]


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_naming_the_last_checkpoint(pretrain_data, tmp_path):
    output, log = tmp_path / "out", tmp_path / "run.out"
    process = start_script("pretrain.py", pretrain_args(pretrain_data, output), log)
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [2/4]"), process, log, "iteration 2 of epoch 2")
    process.send_signal(signal.SIGINT)
    assert exit_code(process, log, 120) == EXIT_INTERRUPTED
    lines = log.read_text().splitlines()
    assert "Traceback" not in log.read_text()
    assert lines[-1].endswith(f"interrupted (Ctrl-C); the last checkpoint is {output / 'checkpoint-1.pth'}; "
                              "rerun the same command to resume from it"), lines[-3:]
    assert re.match(r"\d\d:\d\d:\d\d epoch 2/3 \[", lines[-2]), "more than one line after the progress lines"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank processes through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_update_and_the_job_resumes(pretrain_data, tmp_path):
    output, log = tmp_path / "out", tmp_path / "job.out"
    argv = pretrain_args(pretrain_data, output, "--batch_size", "1")  # 2 ranks x 4 iterations of 1 image
    job = start_script("pretrain.py", argv, log, torchrun=2)
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [1/4]"), job, log, "iteration 1 of epoch 2")
    os.kill(process_with_rank(job.pid, 1), signal.SIGTERM)
    job.wait(120)

    text = log.read_text()
    stops = re.findall(r"stopped on (SIGTERM|another process's stop request) in epoch 2 after iteration (\d): "
                       r"wrote (\S+);", text)
    assert sorted(reason for reason, _, _ in stops) == ["SIGTERM", "another process's stop request"], text[-3000:]
    assert len({(iteration, path) for _, iteration, path in stops}) == 1, "the ranks stopped at different updates"
    assert re.search(r"exitcode\s*:\s*3", text), "the workers' exit code is not EXIT_STOPPED"
    path = stops[0][2]
    assert load_checkpoint(path)["iteration"] == int(stops[0][1])

    rerun = start_script("pretrain.py", argv, tmp_path / "rerun.out", torchrun=2)
    finish(rerun, tmp_path / "rerun.out")
    train_log = (output / "train.log").read_text()
    assert f"resumed from {path} (1 epoch and" in train_log and "weights identical on all 2 ranks" in train_log


STOP_DURING_SCAN = """
import os, signal, sys
import pretrain

scan = pretrain.build_dataset


def scan_interrupted_by_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice arrives while the folder is scanned
    return scan(*args, **kwargs)


pretrain.build_dataset = scan_interrupted_by_sigterm
pretrain.main(sys.argv[1:])
"""


def test_a_stop_signal_during_the_dataset_scan_is_kept(pretrain_data, tmp_path):
    output = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", STOP_DURING_SCAN, *pretrain_args(pretrain_data, output, epochs=2)],
                            env=SUBPROCESS_ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_STOPPED, result.stderr[-3000:]
    assert "stopped on SIGTERM in epoch 1 after iteration 1" in (output / "train.log").read_text()
    assert [path.name for path in checkpoint_paths(output)] == ["checkpoint-0-1.pth"]
