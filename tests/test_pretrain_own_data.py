"""pretrain.py on people's own data: folders in any layout, file lists, the saved index; and the
tasks that need labels (k-NN monitor, fine-tuning) refusing data without class folders."""
import json
import logging

import numpy as np
import pytest

import pretrain
from engine.checkpoint import load_checkpoint
from engine.data import build_pretraining_images
from engine.index_cache import INDEX_CACHE_NAME
from finetune_helpers import load_finetune_script
from image_folders import make_image_folder
from own_data import NESTED_IMAGES, make_nested_folder, settle, write_photo


def run_args(data, output, *extra, epochs=1, workers=0):
    return ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--epochs", str(epochs),
            "--warmup_epochs", "0", "--blr", "1e-3", "--num_workers", str(workers), "--print_freq", "1",
            "--save_ckpt_freq", "1", "--seed", "0", "--device", "cpu", "--cpu_threads", "1",
            "--data_path", str(data), "--output_dir", str(output), *extra]


def configuration_error(main, output, *argv, capsys) -> str:
    """What ``main`` prints to stderr when it stops with exit code 2 before writing anything."""
    with pytest.raises(SystemExit) as caught:
        main(["--output_dir", str(output), *argv])
    assert caught.value.code == 2
    assert not output.exists(), "a run that fails to start leaves nothing behind"
    return capsys.readouterr().err


def test_pretraining_on_a_nested_folder_without_classes_uses_every_image(tmp_path, caplog):
    data = make_nested_folder(tmp_path / "photos")
    with caplog.at_level(logging.INFO):
        stats = pretrain.main(run_args(data, tmp_path / "out"))
    assert f"data: {len(NESTED_IMAGES)} images under {data} (3 channels)" in caplog.text
    assert "3 non-image files skipped (notes.txt, a/b/labels.csv, z/.DS_Store)" in caplog.text
    assert f"{len(NESTED_IMAGES)} images/epoch" in caplog.text
    assert stats["unreadable_images"] == 0
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text())["epoch"] == 1
    assert load_checkpoint(tmp_path / "out" / "checkpoint-1.pth")["epoch"] == 1


def test_pretraining_on_a_file_list_with_two_workers(tmp_path, caplog):
    images = [write_photo(tmp_path / "store" / f"{index}.jpg", seed=index) for index in range(4)]
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# four photos\n../store/0.jpg\n\n../store/1.jpg\n{images[2]}\n{images[3]}\n")
    with caplog.at_level(logging.INFO):
        stats = pretrain.main(run_args(listing, tmp_path / "out", workers=2))
    assert f"data: 4 images listed in {listing}" in caplog.text and "4 images/epoch" in caplog.text
    assert stats["unreadable_images"] == 0
    assert load_checkpoint(tmp_path / "out" / "checkpoint-1.pth")["epoch"] == 1


def test_a_resumed_run_reuses_the_index_the_first_run_saved(tmp_path, caplog):
    data = make_nested_folder(tmp_path / "photos")
    settle(data)
    pretrain.main(run_args(data, tmp_path / "out"))
    assert (tmp_path / "out" / INDEX_CACHE_NAME).is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        pretrain.main(run_args(data, tmp_path / "out", epochs=2))
    assert f"reusing the index of {data} saved in {tmp_path / 'out' / INDEX_CACHE_NAME}" in caplog.text
    assert "looking for images" not in caplog.text
    assert load_checkpoint(tmp_path / "out" / "checkpoint-2.pth")["epoch"] == 2


@pytest.mark.parametrize("kind", ["folder", "list"])
def test_data_without_images_is_one_error_line_and_nothing_is_written(tmp_path, capsys, kind):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("no images here")
    if kind == "list":
        data = tmp_path / "list.txt"
        data.write_text("# nothing listed\n\nnotes.txt\n")
    error = configuration_error(pretrain.main, tmp_path / "out", *run_args(data, tmp_path / "out"), capsys=capsys)
    errors = [line for line in error.splitlines() if "--data_path" in line]
    where = f"listed in {data}" if kind == "list" else f"under {data}"
    assert len(errors) == 1 and f"--data_path {data}: no images {where}" in errors[0]


def test_no_file_with_the_models_channels_stops_before_anything_is_written(tmp_path, capsys):
    for index in range(3):
        np.save(tmp_path / f"{index}.npy", np.zeros((64, 64, 5), np.float32))
    error = configuration_error(pretrain.main, tmp_path / "out", *run_args(tmp_path, tmp_path / "out"), capsys=capsys)
    assert f"--data_path {tmp_path}: none of the 3 files checked" in error and "has 5 channels, not 3" in error


def test_a_train_folder_keeps_its_meaning(tmp_path):
    make_image_folder(tmp_path / "data" / "train", classes=2, per_class=2)
    make_image_folder(tmp_path / "data" / "val", classes=2, per_class=1)
    write_photo(tmp_path / "data" / "stray.jpg")
    dataset, _ = build_pretraining_images(tmp_path / "data", 64)
    assert dataset.root == str(tmp_path / "data" / "train")
    assert list(dataset.index.entries) == [f"class_{c}/{i}.jpg" for c in range(2) for i in range(2)]


def loose_images(root, count=2):
    for split in ("train", "val"):
        for index in range(count):
            write_photo(root / split / f"{index}.jpg", seed=index)
    return root


def test_knn_monitor_needs_class_folders(tmp_path, capsys):
    knn = loose_images(tmp_path / "knn")
    error = configuration_error(pretrain.main, tmp_path / "out", "--knn_data_path", str(knn), capsys=capsys)
    assert f"--knn_data_path {knn}: no images in {knn / 'train'} (no class folders in" in error
    assert "expected <dir>/train/<class>/<image>" in error


def test_finetuning_needs_class_folders_not_a_file_list_or_loose_images(tmp_path, capsys):
    finetune = load_finetune_script()
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n")
    error = configuration_error(finetune.main, tmp_path / "out", "--data_path", str(listing), capsys=capsys)
    assert "fine-tuning needs labels, which a file list does not give" in error
    loose = loose_images(tmp_path / "loose")
    error = configuration_error(finetune.main, tmp_path / "out", "--data_path", str(loose), capsys=capsys)
    assert f"--data_path {loose / 'val'}: no images found in {loose / 'val'} (no class folders in" in error
    assert "labels come from class folders: expected <root>/val/<class>/<image>" in error
