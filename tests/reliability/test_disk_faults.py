"""Unwritable output folders and full disks (issue 5, item 8).

An --output_dir (or --log_dir) that cannot be written fails at start with an error naming the
flag. A disk that fills up while a checkpoint or the metrics log is written stops the run with
an error naming the file, the previous checkpoint stays byte-identical (same modification time),
no partial file is left, and the same command resumes once there is space again. The full disk
is simulated in-process: ``torch.save`` / ``open`` raise ENOSPC after writing part of the file.
"""
import builtins
import errno
import logging
import os

import pytest
import torch

import engine.logging
import engine.runner
import pretrain
from engine.checkpoint import load_checkpoint
from reliability.faults import cli_args, cli_module, pretrain_args

DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))




def file_snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("cli, flag", [("pretrain", "--output_dir"), ("finetune", "--output_dir"),
                                       ("pretrain", "--log_dir"), ("finetune", "--log_dir")])
def test_unwritable_folder_fails_at_start_naming_the_flag(cli, flag, pretrain_data, finetune_data, tmp_path,
                                                          monkeypatch, capsys):
    module = cli_module(cli)
    monkeypatch.setattr(engine.runner, "train_updates", lambda *args, **kwargs: pytest.fail("training started"))
    (tmp_path / "a_file").write_text("a file where a folder should be")
    unwritable = tmp_path / "a_file" / "out"
    output = unwritable if flag == "--output_dir" else tmp_path / "out"
    extra = [flag, str(unwritable)] if flag == "--log_dir" else []
    argv = cli_args(cli, pretrain_data, finetune_data, output, *extra)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert f"{flag} {unwritable}: cannot write there ([Errno 20] Not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("cli", ["pretrain", "finetune"])
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_resumes(cli, pretrain_data, finetune_data,
                                                                               tmp_path, monkeypatch, caplog):
    module = cli_module(cli)
    output = tmp_path / "out"
    real_save = torch.save
    snapshots = {}

    def save_until_the_disk_is_full(obj, file, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:  # checkpoint-2
            snapshots.update({path.name: file_snapshot(path) for path in output.glob("checkpoint-*.pth")})
            file.write(b"\0" * 65536)  # part of it reached the disk
            raise DISK_FULL
        return real_save(obj, file, *args, **kwargs)

    argv = cli_args(cli, pretrain_data, finetune_data, output)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_until_the_disk_is_full)
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
            module.main(argv)
    assert exit_info.value.code == 1
    assert f"cannot write {output / 'checkpoint-2.pth'} ([Errno 28] No space left on device)" in caplog.text
    assert "Free space in" in caplog.text and "rerun the same command to resume" in caplog.text
    assert "checkpoint-1.pth" in snapshots
    for name, snapshot in snapshots.items():
        assert file_snapshot(output / name) == snapshot, f"{name} changed"
    assert not (output / "checkpoint-2.pth").exists() and not list(output.glob(".*.tmp")), "partial file left"

    caplog.clear()
    with caplog.at_level(logging.INFO):
        module.main(argv)  # space again
    assert f"resumed from {output / 'checkpoint-1.pth'} (1 epoch completed)" in caplog.text
    assert load_checkpoint(output / "checkpoint-3.pth")["epoch"] == 3


def test_disk_full_while_appending_metrics_stops_with_the_file_named(pretrain_data, tmp_path, monkeypatch, caplog):
    output = tmp_path / "out"
    metrics = output / "metrics.jsonl"
    appends = []

    def open_until_the_disk_is_full(file, mode="r", *args, **kwargs):
        if str(file) == str(metrics) and "a" in mode:
            appends.append(mode)
            if len(appends) == 2:
                raise DISK_FULL
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(engine.logging, "open", open_until_the_disk_is_full, raising=False)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        pretrain.main(pretrain_args(pretrain_data, output))
    assert exit_info.value.code == 1
    assert f"cannot append to {metrics} ([Errno 28] No space left on device)" in caplog.text
    assert len(metrics.read_text().splitlines()) == 1
    assert load_checkpoint(output / "checkpoint-1.pth")["epoch"] == 1
