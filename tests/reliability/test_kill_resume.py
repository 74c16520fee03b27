"""Killed and resumed equals uninterrupted (issue 5, items 1 and 2).

A run is SIGKILLed mid-epoch (or while writing a checkpoint), the same command is run again
(``--auto_resume`` is on by default), and the final checkpoint must be bitwise equal to that of
a run that was never interrupted: same data order and augmentations (DataLoader workers), same
FCMAE masks, Mixup/CutMix, drop path, lr schedule, AdamW and EMA state. Every redone
iteration must also print the loss and lr the uninterrupted run printed.
"""
import pytest

import pretrain
from engine.checkpoint import latest_valid_checkpoint, load_checkpoint
from finetune_helpers import load_finetune_script
from reliability.faults import (assert_states_equal, finish, finetune_args, log_contains, pretrain_args,
                                progress_by_iteration, sigkill, start_script, wait_until)

EPOCHS = 3  # 4 iterations each; killed in epoch 2, resumed from checkpoint-1


def assert_same_training(resumed_dir, straight_dir, keys):
    resumed = load_checkpoint(resumed_dir / f"checkpoint-{EPOCHS}.pth")
    straight = load_checkpoint(straight_dir / f"checkpoint-{EPOCHS}.pth")
    for key in keys:
        assert_states_equal(resumed[key], straight[key], key)
    resumed_log = progress_by_iteration((resumed_dir / "train.log").read_text())
    straight_log = progress_by_iteration((straight_dir / "train.log").read_text())
    assert len(straight_log) == 4 * EPOCHS
    assert resumed_log == straight_log, "a resumed iteration printed another loss or lr"


@pytest.fixture(scope="module")
def straight_pretraining(pretrain_data, tmp_path_factory):
    """The uninterrupted reference run, in the background while the tests interrupt their own."""
    output = tmp_path_factory.mktemp("straight_pretraining")
    log = output.parent / f"{output.name}.out"
    process = start_script("pretrain.py", pretrain_args(pretrain_data, output, workers=2), log)
    return lambda: finish(process, log) or output


@pytest.mark.slow
def test_pretraining_killed_mid_epoch_resumes_to_the_uninterrupted_weights(pretrain_data, straight_pretraining,
                                                                           tmp_path):
    output = tmp_path / "out"
    process = start_script("pretrain.py", pretrain_args(pretrain_data, output, workers=2), tmp_path / "run.out")
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [2/4]"), process, tmp_path / "run.out",
               "iteration 2 of epoch 2")
    sigkill(process)

    pretrain.main(pretrain_args(pretrain_data, output, workers=2))

    assert f"resumed from {output / 'checkpoint-1.pth'} (1 epoch completed)" in (output / "train.log").read_text()
    assert_same_training(output, straight_pretraining(), ("model", "optimizer", "stepper"))


@pytest.mark.slow
def test_pretraining_killed_while_saving_resumes_from_the_previous_checkpoint(pretrain_data, straight_pretraining,
                                                                              tmp_path):
    for attempt in range(3):  # on a very busy machine the kill may land after the write; try again
        output = tmp_path / f"out{attempt}"
        process = start_script("pretrain.py", pretrain_args(pretrain_data, output, workers=2), tmp_path / "run.out")
        wait_until(lambda: any(output.glob(".checkpoint-2.pth.*.tmp")), process, tmp_path / "run.out",
                   "checkpoint-2 being written")
        sigkill(process)
        if not (output / "checkpoint-2.pth").exists():
            break
    assert not (output / "checkpoint-2.pth").exists(), "three kills came too late to interrupt the write"
    assert list(output.glob(".checkpoint-2.pth.*.tmp")), "the interrupted write left no temporary file"
    assert latest_valid_checkpoint(output)[0].name == "checkpoint-1.pth"

    pretrain.main(pretrain_args(pretrain_data, output, workers=2))

    assert f"resumed from {output / 'checkpoint-1.pth'} (1 epoch completed)" in (output / "train.log").read_text()
    assert not list(output.glob(".checkpoint-*.tmp")), "the interrupted write's temporary file was left behind"
    assert_same_training(output, straight_pretraining(), ("model", "optimizer", "stepper"))


@pytest.mark.slow
def test_finetuning_killed_mid_epoch_resumes_to_the_uninterrupted_weights(finetune_data, tmp_path):
    straight_dir, output = tmp_path / "straight", tmp_path / "out"
    straight = start_script("finetune.py", finetune_args(finetune_data, straight_dir, workers=2),
                            tmp_path / "straight.out")
    process = start_script("finetune.py", finetune_args(finetune_data, output, workers=2), tmp_path / "run.out")
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [2/4]"), process, tmp_path / "run.out",
               "iteration 2 of epoch 2")
    sigkill(process)

    load_finetune_script().main(finetune_args(finetune_data, output, workers=2))
    finish(straight, tmp_path / "straight.out")

    assert f"resumed from {output / 'checkpoint-1.pth'} (1 epoch completed)" in (output / "train.log").read_text()
    assert_same_training(output, straight_dir, ("model", "model_ema", "optimizer", "stepper", "best"))
