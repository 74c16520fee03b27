"""Broken and unusual image files through both CLIs with DataLoader worker processes (issue 5, item 3).

Folders mix good images with unusual ones (grayscale, RGBA, 16-bit, 1-bit, palette, CMYK, float
TIFF, 5x5 and 1x1 pixels: converted and used), broken ones (truncated JPEG, empty file, text
named .png, a PNG claiming 10^10 pixels: skipped, named and counted) and an empty class folder
(kept as a label, named in a warning). A folder of nothing but broken files stops with a clear
error instead of a crash inside a worker.
"""
import json
import logging

import pytest
import torch

import pretrain
from engine.checkpoint import load_checkpoint
from finetune_helpers import load_finetune_script
from image_folders import make_image_folder
from reliability.faults import finetune_args, pretrain_args, write_broken_images, write_unusual_images

WORKERS = 2


def make_messy_folder(root, good: int, seed: int = 0) -> list[str]:
    """class_0: ``good`` plain JPEGs; class_1: unusual and broken files; class_2: empty. Returns the broken names."""
    make_image_folder(root, classes=1, per_class=good, seed=seed)
    write_unusual_images(root / "class_1", seed)
    broken = write_broken_images(root / "class_1", seed)
    (root / "class_2").mkdir()
    return broken


def assert_broken_files_named(log: str, folder, broken: list[str], labelled: bool = True) -> None:
    """Each broken file named; the README counted as a non-image file; with labels, the empty class named."""
    for name in broken:
        assert f"skipping unreadable image {folder / 'class_1' / name}" in log, f"{name} was not reported"
    assert "1 non-image file skipped (class_1/README.txt)" in log
    if labelled:  # pretraining ignores labels: an empty folder is nothing to report there
        assert f"1 class folders under {folder} hold no images: class_2" in log


def test_pretraining_converts_unusual_images_and_skips_broken_ones_in_workers(tmp_path, caplog):
    data = tmp_path / "data"
    broken = make_messy_folder(data, good=6)  # 6 + 10 unusual + 4 broken = 20 files: 10 full batches
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        stats = pretrain.main(pretrain_args(data, output, workers=WORKERS, epochs=1))

    assert stats["unreadable_images"] == len(broken) == 4  # the unusual images were all readable
    assert json.loads((output / "metrics.jsonl").read_text())["unreadable_images"] == 4
    assert_broken_files_named((output / "train.log").read_text(), data, broken, labelled=False)
    assert "4 unreadable images skipped" in caplog.text
    weights = load_checkpoint(output / "checkpoint-1.pth")["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_finetuning_keeps_the_empty_class_label_and_skips_broken_files_in_workers(tmp_path):
    data = tmp_path / "data"
    broken = make_messy_folder(data / "train", good=6)
    make_messy_folder(data / "val", good=2, seed=1)  # 2 + 10 unusual readable images, 4 broken
    output = tmp_path / "out"
    best = load_finetune_script().main(finetune_args(data, output, workers=WORKERS, epochs=1))

    state = load_checkpoint(output / "checkpoint-1.pth")
    assert state["classes"] == ["class_0", "class_1", "class_2"]
    assert state["model"]["head.fc.weight"].shape[0] == 3, "the empty class folder must keep its label"
    log = (output / "train.log").read_text()
    assert_broken_files_named(log, data / "train", broken)
    assert_broken_files_named(log, data / "val", broken)
    assert best["model"]["count"] == best["ema"]["count"] == 12, "broken files must be left out, not replaced"
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())


@pytest.mark.parametrize("cli", ["pretrain", "finetune"])
def test_folder_of_only_broken_files_stops_with_a_clear_error(cli, tmp_path, caplog):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for class_name in ("a", "b"):
            write_broken_images(data / split / class_name)
    argv = (pretrain_args if cli == "pretrain" else finetune_args)(data, tmp_path / "out", workers=WORKERS, epochs=1)
    main = pretrain.main if cli == "pretrain" else load_finetune_script().main
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    assert f"all 8 image files under {data / 'train'} are unreadable" in caplog.text
    assert not list((tmp_path / "out").glob("checkpoint-*.pth"))
