"""Ctrl-C during a write: the write finishes, then the run stops with exit 130 (engine.interrupts).

Python raises KeyboardInterrupt wherever SIGINT finds it; inside torch.save that broke the zip
being written ("unexpected pos", exit 1, the epoch's checkpoint lost), inside a tracker call it
could leave the tracker half-way. Each test sends SIGINT from inside the work it interrupts, so
the signal lands at a known point.
"""
import logging
import os
import signal
import threading

import pytest
import torch

import pretrain
from engine.checkpoint import atomic_write, load_checkpoint
from engine.interrupts import interrupts_deferred
from engine.logging import TensorBoardWriter
from engine.signals import EXIT_INTERRUPTED
from engine.trackers import Trackers
from reliability.faults import pretrain_args


def interrupt_me() -> None:
    """SIGINT to this process; Python runs its handler at the next bytecode boundary."""
    os.kill(os.getpid(), signal.SIGINT)


def run_some_bytecode() -> int:
    return sum(range(1000))


class InterruptingFile:
    """A binary file that sends SIGINT on its ``at_write``-th ``write`` (from inside torch.save)."""

    def __init__(self, file, at_write: int):
        self.file, self.at_write, self.writes = file, at_write, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == self.at_write:
            interrupt_me()
            run_some_bytecode()  # an undeferred KeyboardInterrupt is raised here, inside torch.save
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_sigint_inside_the_block_is_raised_when_it_ends():
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            interrupt_me()
            run_some_bytecode()
            finished = True
    assert finished
    run_some_bytecode()  # the previous handler is back and nothing is pending


def test_a_second_sigint_raises_at_once_and_blocks_nest():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            with interrupts_deferred():
                interrupt_me()
                run_some_bytecode()
                reached.append("after the first")
            reached.append("inner block left")  # the outer block still holds the first Ctrl-C
            interrupt_me()
            run_some_bytecode()
            reached.append("after the second")
    assert reached == ["after the first", "inner block left"]


def test_outside_the_main_thread_it_changes_nothing():
    errors = []

    def work():
        try:
            with interrupts_deferred():
                run_some_bytecode()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_torch_save_leaves_a_whole_checkpoint(tmp_path):
    state = {"model": {f"layer{i}.weight": torch.randn(64, 64) for i in range(8)}, "epoch": 1}
    path = tmp_path / "checkpoint-1.pth"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda file: torch.save(state, InterruptingFile(file, at_write=3)))
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1
    assert all(torch.equal(loaded["model"][name], tensor) for name, tensor in state["model"].items())
    assert [entry.name for entry in tmp_path.iterdir()] == ["checkpoint-1.pth"]  # no temporary file left


class InterruptingTracker:
    def __init__(self, interrupts: bool):
        self.interrupts, self.calls = interrupts, []

    def scalars(self, values, step):
        if self.interrupts:
            interrupt_me()
            run_some_bytecode()
        self.calls.append((dict(values), step))


def test_ctrl_c_during_a_tracker_call_lets_every_tracker_get_it():
    first, second = InterruptingTracker(interrupts=True), InterruptingTracker(interrupts=False)
    trackers = Trackers(TensorBoardWriter(None), [first, second])
    with pytest.raises(KeyboardInterrupt):
        trackers.scalars({"loss": 0.5}, step=3, prefix="train/")
    assert first.calls == second.calls == [({"train/loss": 0.5}, 3)]


def test_ctrl_c_while_the_cli_saves_exits_130_naming_the_checkpoint_it_finished(pretrain_data, tmp_path,
                                                                                  monkeypatch, caplog):
    """The first epoch's checkpoint is being written when Ctrl-C comes: it is completed, the run
    stops with exit 130 and its last line names that checkpoint (it used to fail with exit 1)."""
    output = tmp_path / "out"
    real_save = torch.save

    def save_interrupted(obj, file, *args, **kwargs):
        return real_save(obj, InterruptingFile(file, at_write=3), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_interrupted)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        pretrain.main(pretrain_args(pretrain_data, output, epochs=2))
    assert exit_info.value.code == EXIT_INTERRUPTED
    checkpoint = output / "checkpoint-1.pth"
    assert load_checkpoint(checkpoint)["epoch"] == 1
    assert caplog.records[-1].getMessage() == (f"interrupted (Ctrl-C); the last checkpoint is {checkpoint}; "
                                               "rerun the same command to resume from it")
    assert "saved checkpoint-1.pth" not in caplog.text  # stopped as the save returned, before anything else
