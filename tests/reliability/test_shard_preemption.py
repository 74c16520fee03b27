"""Preemption on WebDataset shards: SIGTERM inside an epoch, with 2 loader workers, on local shards
(read at random) and on streamed ``pipe:`` shards (read in order; also without workers), resumes bitwise."""
import os
import re
import signal

import pytest

import pretrain
from engine.signals import EXIT_STOPPED
from reliability.faults import exit_code, finish, log_contains, pretrain_args, start_script, wait_until
from reliability.test_preemption import EPOCHS, PRETRAIN_KEYS, assert_same_training
from shard_files import convert, piped


@pytest.fixture(scope="module")
def shard_sources(pretrain_data, tmp_path_factory):
    """``pretrain_data``'s 8 images in uneven shards (3, 3, 2), named locally and as a pipe: command."""
    pattern = convert(pretrain_data, tmp_path_factory.mktemp("shards"), "--shard_size", "3")
    return {"local": pattern, "pipe": piped(pattern)}


RUNS = [("local", 2), ("pipe", 2), ("pipe", 0)]  # (shards, --num_workers)


@pytest.fixture(scope="module")
def straight_shard_runs(shard_sources, tmp_path_factory):
    """Uninterrupted reference runs of ``RUNS``, in the background."""
    runs = {}
    for kind, workers in RUNS:
        output = tmp_path_factory.mktemp(f"straight_{kind}_{workers}")
        log = output.parent / f"{output.name}.out"
        process = start_script("pretrain.py", pretrain_args(shard_sources[kind], output, workers=workers), log)
        runs[kind, workers] = (process, log, output)

    def wait(kind, workers):
        process, log, output = runs[kind, workers]
        finish(process, log)
        return output

    return wait


@pytest.mark.slow
@pytest.mark.parametrize("kind, workers", RUNS)
def test_sigterm_inside_an_epoch_on_shards_resumes_bitwise(kind, workers, shard_sources, straight_shard_runs, tmp_path):
    """As Slurm does, the signal goes to the whole process group; the pipe: commands, in sessions of
    their own, keep feeding the loader until the stop's checkpoint is written (also when the training
    process reads them itself, --num_workers 0). --num_workers changes neither the data nor the order
    of local shards, but streamed shards are read in one stream per worker."""
    output, log = tmp_path / "out", tmp_path / "run.out"
    argv = pretrain_args(shard_sources[kind], output, workers=workers)
    process = start_script("pretrain.py", argv, log)
    wait_until(log_contains(output / "train.log", f"epoch 2/{EPOCHS} [1/4]"), process, log, "iteration 1 of epoch 2")
    os.killpg(process.pid, signal.SIGTERM)
    assert exit_code(process, log, 120) == EXIT_STOPPED, log.read_text()[-3000:]
    text = log.read_text()
    stopped = re.search(r"stopped on SIGTERM in epoch 2 after iteration (\d): wrote (\S+); rerun", text)
    assert stopped and "Traceback" not in text and "unreadable" not in text, text[-3000:]

    pretrain.main(argv)

    assert f"resumed from {stopped.group(2)} (1 epoch and" in (output / "train.log").read_text()
    assert_same_training(output, straight_shard_runs(kind, workers), PRETRAIN_KEYS)
