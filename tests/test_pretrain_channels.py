"""pretrain.py with --in_chans 1 (16-bit grayscale PNGs) and 4 (.npy arrays): the data's normalisation
is measured, stored with the run and checked on resume; the export loads strictly into timm /
models with that channel count; the picture is redrawn without flags; mistakes stop at start."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import models
import pretrain
from engine.checkpoint import load_checkpoint
from fcmae.visualize import main as visualize
from finetune_helpers import load_finetune_script, make_colour_folder


def run_args(data, output, *extra):
    return ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--epochs", "1",
            "--warmup_epochs", "0", "--blr", "1e-3", "--num_workers", "0", "--seed", "0", "--device", "cpu",
            "--data_path", str(data), "--output_dir", str(output), *extra]


@pytest.fixture(scope="module")
def gray16(tmp_path_factory):
    root = tmp_path_factory.mktemp("gray16")
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray((rng.random((72, 72)) * 40000 + 5000).astype(np.uint16)).save(root / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def arrays4(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrays4")
    rng = np.random.default_rng(1)
    for index in range(4):
        np.save(root / f"{index}.npy", (rng.random((72, 72, 4)) * [1.0, 0.5, 0.25, 2.0]).astype(np.float32))
    return root


def test_grayscale_16_bit_pretraining_measures_stores_and_exports_its_normalisation(gray16, tmp_path):
    output = tmp_path / "out"
    pretrain.main(run_args(gray16, output, "--in_chans", "1"))
    pixels = np.stack([np.asarray(Image.open(path)) / 65535.0 for path in sorted(gray16.glob("*.png"))])
    config = load_checkpoint(output / "checkpoint-1.pth")["config"]
    assert config["in_chans"] == 1 and config["mean"] == pytest.approx([pixels.mean()], rel=1e-4)
    assert config["std"] == pytest.approx([pixels.std()], rel=1e-3)
    with safe_open(output / "encoder.safetensors", "pt") as export:
        assert json.loads(export.metadata()["mean"]) == config["mean"]
    model = models.create_dense_model("convnextv2_atto", num_classes=0, in_chans=1)
    model.load_state_dict(load_file(output / "encoder.safetensors"), strict=True)
    visualize(["--checkpoint", str(output / "checkpoint-1.pth"), "--output", str(tmp_path / "redrawn.png"),
               "--device", "cpu"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "redrawn.png")),
                          np.asarray(Image.open(output / "reconstruction.png")))


def test_four_channel_arrays_with_a_stride_two_stem_and_given_statistics(arrays4, tmp_path):
    output = tmp_path / "out"
    pretrain.main(run_args(arrays4, output, "--in_chans", "4", "--stem_stride", "2",
                           "--mean", "0.5", "0.25", "0.125", "1.0", "--std", "0.3", "0.15", "0.07", "0.6"))
    config = load_checkpoint(output / "checkpoint-1.pth")["config"]
    assert config["mean"] == [0.5, 0.25, 0.125, 1.0] and config["std"] == [0.3, 0.15, 0.07, 0.6]
    model = models.create_dense_model("convnextv2_atto", num_classes=0, in_chans=4, stem_stride=2)
    model.load_state_dict(load_file(output / "encoder.safetensors"), strict=True)
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, 320)


def test_resuming_with_other_normalisation_is_refused_naming_the_checkpoints(arrays4, tmp_path, capsys):
    output = tmp_path / "out"
    argv = run_args(arrays4, output, "--in_chans", "4")
    pretrain.main(argv)
    with pytest.raises(SystemExit) as caught:
        pretrain.main([*argv, "--epochs", "2", "--mean", "0", "0", "0", "0", "--std", "1", "1", "1", "1"])
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "was trained with --mean 0.49" in error and "this run normalises with --mean 0 0 0 0 --std 1 1 1 1" in error


def test_a_rerun_measures_the_same_statistics_and_resumes(arrays4, tmp_path, caplog):
    output = tmp_path / "out"
    argv = run_args(arrays4, output, "--in_chans", "4")
    pretrain.main(argv)
    with caplog.at_level(logging.INFO):
        pretrain.main([*argv, "--epochs", "2"])
    assert f"resumed from {output / 'checkpoint-1.pth'}" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--in_chans", "4", "--data_path", ""], None),
    (["--in_chans", "1", "--fast_decode"], "--fast_decode True: decodes 3-channel JPEGs only"),
    (["--in_chans", "2", "--mean", "0.5", "--std", "0.2"], "--mean [0.5]: needs one value per --in_chans channel"),
    (["--mean", "0.5", "0.5", "0.5"], "--mean [0.5, 0.5, 0.5]: give --mean and --std together, or neither"),
    (["--in_chans", "1", "--knn_data_path", "."], "the k-NN monitor reads RGB class folders"),
])
def test_channel_mistakes_stop_before_any_work(gray16, tmp_path, capsys, extra, message):
    argv = run_args(gray16, tmp_path / "out", *extra)
    if message is None:  # no --data_path: the RGB demo photos
        argv = [arg for arg in argv if arg not in ("--data_path", str(gray16), "")]
        message = "--in_chans 4: needs --data_path: the embedded demo photos are RGB"
    with pytest.raises(SystemExit) as caught:
        pretrain.main(argv)
    assert caught.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fine_tuning_a_grayscale_encoder_needs_in_chans_3_and_then_adapts_its_stem(gray16, tmp_path, capsys):
    pretrain.main(run_args(gray16, tmp_path / "pre", "--in_chans", "1"))
    data = tmp_path / "labelled"
    make_colour_folder(data / "train", per_class=2, size=40, seed=0)
    make_colour_folder(data / "val", per_class=1, size=40, seed=1)
    finetune = load_finetune_script()
    argv = ["--model", "convnextv2_atto", "--finetune", str(tmp_path / "pre" / "encoder.safetensors"),
            "--data_path", str(data), "--input_size", "32", "--batch_size", "2", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path / "ft")]
    with pytest.raises(SystemExit) as caught:
        finetune.main(argv)
    assert caught.value.code == 2 and "a 1-channel encoder; fine-tuning reads RGB" in capsys.readouterr().err
    assert finetune.main([*argv, "--in_chans", "3"])["model"]["acc1"] >= 0
    assert load_checkpoint(tmp_path / "ft" / "checkpoint-1.pth")["model"]["stem.0.weight"].shape[1] == 3
