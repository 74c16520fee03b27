"""engine.checkpoint + engine.seeding: atomic files, epoch and mid-epoch checkpoints, keep-last-N, corrupt files."""
import argparse
import logging

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint as ckpt
from engine.errors import ConfigError
from engine.seeding import derive_seed


def small_state(epoch: int) -> dict:
    return {"model": {"weight": torch.full((3, 2), float(epoch))}, "optimizer": {}, "epoch": epoch}


def test_failed_write_leaves_previous_checkpoint_intact_and_no_temporary_file(tmp_path, monkeypatch):
    ckpt.save_checkpoint(small_state(1), tmp_path, epoch=1, keep_last=3)
    target = tmp_path / "checkpoint-1.pth"
    before = target.read_bytes()

    real_save = torch.save

    def save_half_then_crash(obj, file):
        real_save(obj, file)
        file.truncate(10)  # half-written file...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(small_state(2), tmp_path, epoch=1, keep_last=3)  # overwrite attempt
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(small_state(2), tmp_path, epoch=2, keep_last=3)

    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-1.pth"]
    assert ckpt.load_checkpoint(target)["epoch"] == 1


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for epoch in (1, 2, 5, 10, 20):
        ckpt.save_checkpoint(small_state(epoch), tmp_path, epoch=epoch, keep_last=2)
    assert [path.name for path in ckpt.checkpoint_paths(tmp_path)] == ["checkpoint-10.pth", "checkpoint-20.pth"]


def test_latest_valid_checkpoint_skips_truncated_newest_file_with_warning(tmp_path, caplog):
    for epoch in (1, 2, 3):
        ckpt.save_checkpoint(small_state(epoch), tmp_path, epoch=epoch, keep_last=5)
    newest = tmp_path / "checkpoint-3.pth"
    newest.write_bytes(newest.read_bytes()[:200])  # e.g. copied from a node that died mid-transfer
    (tmp_path / "checkpoint-4.pth").write_bytes(b"not a checkpoint at all")

    with caplog.at_level(logging.WARNING):
        path, state = ckpt.latest_valid_checkpoint(tmp_path)

    assert path.name == "checkpoint-2.pth" and state["epoch"] == 2
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert "checkpoint-4.pth" in warned and "checkpoint-3.pth" in warned


def test_checkpoint_without_required_keys_is_rejected(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "checkpoint-1.pth")
    with pytest.raises(ckpt.CheckpointError, match="lacks model, epoch"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-1.pth")
    assert ckpt.latest_valid_checkpoint(tmp_path) is None


def test_mid_epoch_checkpoints_sort_between_epochs_and_are_pruned_once_superseded(tmp_path):
    def save(epoch, updates=0):
        ckpt.save_checkpoint({"model": {}, "epoch": epoch}, tmp_path, epoch, keep_last=2, updates=updates)
        return [path.name for path in ckpt.checkpoint_paths(tmp_path)]

    assert save(1) == ["checkpoint-1.pth"]
    assert save(1, 5) == ["checkpoint-1.pth", "checkpoint-1-5.pth"]
    assert save(1, 10) == ["checkpoint-1.pth", "checkpoint-1-10.pth"]  # the older mid-epoch one is gone
    assert save(2) == ["checkpoint-1.pth", "checkpoint-2.pth"]
    assert save(2, 5) == ["checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-2-5.pth"]  # 2 epoch ones kept
    assert save(3) == ["checkpoint-2.pth", "checkpoint-3.pth"]
    assert ckpt.latest_valid_checkpoint(tmp_path)[0].name == "checkpoint-3.pth"


def test_progress_is_described_in_words():
    assert ckpt.describe_progress(1) == "1 epoch completed"
    assert ckpt.describe_progress(2) == "2 epochs completed"
    assert ckpt.describe_progress(0, 1) == "0 epochs and 1 iteration completed"
    assert ckpt.describe_progress(1, 40) == "1 epoch and 40 iterations completed"

def test_safetensors_export_is_readable_and_atomic(tmp_path):
    weights = {"stem.0.weight": torch.randn(4, 3, 4, 4), "head.norm.bias": torch.zeros(4)}
    path = ckpt.save_safetensors(weights, tmp_path / "encoder.safetensors", {"model_name": "convnextv2_atto"})
    loaded = load_file(path)
    assert loaded.keys() == weights.keys() and torch.equal(loaded["stem.0.weight"], weights["stem.0.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.safetensors"]


def test_derived_seeds_depend_on_every_index():
    seeds = {derive_seed(0, epoch, iteration, rank)
             for epoch in range(3) for iteration in range(3) for rank in range(2)}
    assert len(seeds) == 18
    assert derive_seed(5, 1, 2) == derive_seed(5, 1, 2) != derive_seed(5, 2, 1)
    assert all(0 <= seed < 2**63 for seed in seeds)


def layout(batch_size=4, update_freq=2, allow=False):
    return argparse.Namespace(batch_size=batch_size, update_freq=update_freq, allow_layout_change=allow)


def test_resume_with_another_run_layout_is_refused_naming_what_to_restore(caplog):
    state = {"config": {"num_workers": 4, "batch_size": 4, "update_freq": 2}, "world_size": 8, "iteration": 6}
    assert ckpt.check_run_layout("ck.pth", state, layout(), 8) == 6
    with pytest.raises(ConfigError, match=r"world_size 8 -> 1\): .*restore 8 processes .*--allow_layout_change"):
        ckpt.check_run_layout("ck.pth", state, layout(), 1)
    with pytest.raises(ConfigError, match=r"batch_size 4 -> 8, update_freq 2 -> 1\).*restore --batch_size 4 and "
                                          r"--update_freq 2"):
        ckpt.check_run_layout("ck.pth", state, layout(8, 1), 8)
    assert ckpt.check_run_layout("old.pth", {"config": {}, "iteration": 6}, layout(), 1) == 6  # older: not compared


def test_an_allowed_layout_change_resumes_after_the_same_number_of_images(caplog):
    state = {"config": {"batch_size": 4, "update_freq": 2}, "world_size": 8, "iteration": 6}  # 6 * 4 * 8 images
    with caplog.at_level(logging.WARNING):
        assert ckpt.check_run_layout("ck.pth", state, layout(8, 1, allow=True), 2) == 12  # 192 images / 16
        assert ckpt.check_run_layout("ck.pth", state, layout(4, 4, allow=True), 5) == 8  # 192 // 80 = 2 updates of 4
    assert "not as the uninterrupted run" not in caplog.text and "differ from the uninterrupted run" in caplog.text


@pytest.mark.parametrize("content, named", [(b"version https://git-lfs\n", "(text)"), (b"", "is empty (0 bytes)")])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, content, named):
    path = tmp_path / "checkpoint-3.pth"
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint") as error:
        ckpt.load_checkpoint(path)
    assert named in str(error.value) and "run code" not in str(error.value)
