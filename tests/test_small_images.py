"""--stem_stride 2 end to end (atto, 64 px): pretraining, its export, its picture, fine-tuning and
--eval from the files alone, and the flag's validation."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import pretrain
from engine.checkpoint import load_checkpoint
from engine.config import TRAINING_CHECKS, parse_args, validate
from fcmae.visualize import main as visualize_main
from finetune_helpers import load_finetune_script, make_colour_folder
from image_folders import make_image_folder
from models import create_dense_model

torch.set_num_threads(1)
REPO = Path(pretrain.__file__).resolve().parent
FINETUNE = ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "8", "--num_workers", "0",
            "--device", "cpu", "--print_freq", "100", "--warmup_epochs", "0", "--epochs", "1", "--mixup", "0",
            "--cutmix", "0", "--aa", "", "--reprob", "0", "--no-model_ema", "--no-model_ema_eval", "--layer_decay_type",
            "single"]


@pytest.fixture(scope="module")
def stride_two_run(tmp_path_factory):
    """One epoch of stride-2 pretraining at 64 px (4x4 grid of 16-px patches), then one of fine-tuning
    from its encoder.safetensors with no stem flag."""
    root = tmp_path_factory.mktemp("small_images")
    make_colour_folder(root / "data" / "train", per_class=2, size=64, seed=0)
    make_colour_folder(root / "data" / "val", per_class=2, size=64, seed=1)
    pretrain.main(["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "4", "--epochs", "1",
                   "--warmup_epochs", "0", "--stem_stride", "2", "--decoder_embed_dim", "64",
                   "--data_path", str(root / "data"), "--output_dir", str(root / "pretrain"), "--num_workers", "0",
                   "--device", "cpu"])
    load_finetune_script().main(FINETUNE + ["--finetune", str(root / "pretrain" / "encoder.safetensors"),
                                            "--data_path", str(root / "data"), "--output_dir", str(root / "finetune")])
    return root


def test_pretraining_records_the_stem_in_its_checkpoint_and_export(stride_two_run):
    output = stride_two_run / "pretrain"
    state = load_checkpoint(output / "checkpoint-1.pth")
    assert state["config"]["stem_stride"] == 2 and state["model"]["pred.weight"].shape == (16 * 16 * 3, 64, 1, 1)
    with safe_open(output / "encoder.safetensors", framework="pt") as file:
        assert {"stem_stride": "2", "in_chans": "3"}.items() <= file.metadata().items()
    dense = create_dense_model("convnextv2_atto", stem_stride=2, num_classes=0)
    dense.load_state_dict(load_file(output / "encoder.safetensors"))  # strict
    assert dense.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 320, 4, 4)


def test_visualize_redraws_the_stride_two_picture_without_flags(stride_two_run, tmp_path):
    output = stride_two_run / "pretrain"
    visualize_main(["--checkpoint", str(output / "checkpoint-1.pth"), "--output", str(tmp_path / "again.png"),
                    "--device", "cpu"])
    expected = np.asarray(Image.open(output / "reconstruction.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png").convert("RGB")), expected)


def test_finetuning_and_eval_take_the_stem_from_the_files(stride_two_run, caplog):
    finetuned = load_checkpoint(stride_two_run / "finetune" / "checkpoint-1.pth")
    assert finetuned["model"]["stem.0.weight"].shape == (40, 3, 2, 2)
    assert "stages.0.downsample.1.weight" not in finetuned["model"]
    with caplog.at_level(logging.INFO):
        results = load_finetune_script().main(
            ["--eval", "--resume", str(stride_two_run / "finetune" / "checkpoint-best.pth"), "--data_path",
             str(stride_two_run / "data"), "--num_workers", "0", "--device", "cpu", "--batch_size", "8"])
    assert results["model"]["count"] == 8 and 0 <= results["model"]["acc1"] <= 100


def test_resuming_with_another_stem_stride_names_both(stride_two_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        pretrain.main(["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "4", "--epochs", "2",
                       "--warmup_epochs", "0", "--decoder_embed_dim", "64", "--data_path",
                       str(stride_two_run / "data"), "--output_dir", str(tmp_path / "out"), "--num_workers", "0",
                       "--device", "cpu", "--resume", str(stride_two_run / "pretrain" / "checkpoint-1.pth")])
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "--stem_stride 4: checkpoint" in error and "was trained with --stem_stride 2" in error


@pytest.mark.parametrize("cli, flags, message", [
    ("pretrain", ["--stem_stride", "2", "--input_size", "40"], "--input_size 40: must be a multiple of 16"),
    ("pretrain", ["--input_size", "48"], "--input_size 48: must be a multiple of 32"),
    ("pretrain", ["--stem_stride", "3"], "--stem_stride 3: must be 4 (the paper's stem) or 2 (small images)"),
    ("pretrain", ["--in_chans", "0"], "--in_chans 0: must be >= 1"),
    ("pretrain", ["--init_from", "/no/such/encoder.safetensors"], "--init_from '/no/such/encoder.safetensors': no such"),
    ("finetune", ["--stem_stride", "2", "--input_size", "40"], "--input_size 40: must be a multiple of 16"),
])
def test_stem_flags_are_validated_before_any_work(cli, flags, message, tmp_path, capsys):
    main = pretrain.main if cli == "pretrain" else load_finetune_script().main
    with pytest.raises(SystemExit) as caught:
        main(["--output_dir", str(tmp_path / "out"), *flags])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_small_image_configs_are_valid_and_use_the_stride_two_stem():
    args = parse_args(pretrain.build_parser(), ["--config", str(REPO / "configs" / "pretrain_atto_small_images.yaml")])
    validate(args, TRAINING_CHECKS + pretrain.PRETRAIN_CHECKS)
    assert (args.stem_stride, args.input_size, args.mask_ratio) == (2, 128, 0.6)
    finetune = load_finetune_script()
    args = parse_args(finetune.build_parser(), ["--config", str(REPO / "configs" / "finetune_atto_small_images.yaml")])
    validate(args, TRAINING_CHECKS + finetune.FINETUNE_CHECKS)
    assert (args.stem_stride, args.input_size) == (2, 128)


def test_the_knn_monitor_embeds_with_a_stride_two_stem(tmp_path, caplog):
    knn = tmp_path / "knn"
    make_colour_folder(knn / "train", per_class=2, size=48, seed=0)
    make_colour_folder(knn / "val", per_class=1, size=48, seed=1)
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    with caplog.at_level(logging.INFO):
        stats = pretrain.main(["--model", "convnextv2_atto", "--stem_stride", "2", "--input_size", "48",
                               "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
                               "--data_path", str(data), "--knn_data_path", str(knn), "--knn_k", "2",
                               "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert 0 <= stats["knn_top1"] <= 100 and "knn_top1" in caplog.text
