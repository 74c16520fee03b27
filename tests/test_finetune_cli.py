"""finetune.py end to end on a tiny colour-coded dataset: learning, checkpoints, --eval, resume, errors."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import models
from engine.checkpoint import load_checkpoint
from finetune_helpers import REPO_ROOT, load_finetune_script, make_colour_folder

EPOCHS = 2
COMMON = ["--model", "convnextv2_atto", "--input_size", "32", "--batch_size", "8", "--num_workers", "0",
          "--device", "cpu", "--print_freq", "100"]
RECIPE = ["--warmup_epochs", "0", "--lr", "2e-3", "--layer_decay", "0.9", "--layer_decay_type", "single",
          "--drop_path", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0.1", "--aa", "", "--reprob", "0",
          "--model_ema", "--model_ema_decay", "0.5", "--save_ckpt_freq", "2"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One short fine-tuning run (4 colours, 6 training images each, 32 px, 2 epochs of 3 updates)."""
    root = tmp_path_factory.mktemp("colours")
    make_colour_folder(root / "data" / "train", per_class=6, seed=0)
    make_colour_folder(root / "data" / "val", per_class=4, seed=1)
    output = root / "out"
    argv = COMMON + RECIPE + ["--data_path", str(root / "data"), "--epochs", str(EPOCHS), "--output_dir", str(output)]
    best = load_finetune_script().main(argv)
    return {"root": root, "output": output, "argv": argv, "best": best}


def test_finetuning_colour_classes_rises_far_above_chance(finetuned):
    assert finetuned["best"]["model"]["acc1"] >= 75.0  # chance: 25%
    assert finetuned["best"]["ema"]["acc1"] >= 75.0


def test_each_epoch_logs_training_and_validation_metrics(finetuned):
    records = [json.loads(line) for line in (finetuned["output"] / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == list(range(1, EPOCHS + 1))
    for record in records:
        assert record["model_count"] == 16 and record["ema_count"] == 16
        assert 0 <= record["model_acc1"] <= record["model_acc5"] <= 100
    assert records[-1]["loss"] < records[0]["loss"]


def test_training_checkpoint_holds_everything_to_resume(finetuned):
    state = load_checkpoint(finetuned["output"] / f"checkpoint-{EPOCHS}.pth")
    assert {"model", "model_ema", "optimizer", "stepper", "classes", "best", "config", "world_size"} <= set(state)
    assert state["world_size"] == 1  # compared on resume with the resuming run's (a warning names a difference)
    assert state["classes"] == ["blue", "green", "red", "yellow"]
    assert state["model"]["head.fc.weight"].shape == (4, 320)
    assert state["best"]["model"]["acc1"] == finetuned["best"]["model"]["acc1"]


def test_best_checkpoints_record_their_accuracy_and_eval_reproduces_it(finetuned):
    for name, kind in (("checkpoint-best.pth", "model"), ("checkpoint-best-ema.pth", "ema")):
        saved = load_checkpoint(finetuned["output"] / name)
        assert saved["acc1"] == finetuned["best"][kind]["acc1"] and saved["classes"][0] == "blue"
        assert models.load_pretrained("convnextv2_atto", finetuned["output"] / name).head.fc.out_features == 4
    path = finetuned["output"] / "checkpoint-best-ema.pth"
    results = load_finetune_script().main(COMMON + ["--eval", "--resume", str(path),
                                                    "--data_path", str(finetuned["root"] / "data")])
    assert results["model"]["acc1"] == pytest.approx(load_checkpoint(path)["acc1"])
    assert results["model"]["count"] == 16


def test_eval_of_a_training_checkpoint_also_evaluates_its_ema(finetuned):
    path = finetuned["output"] / f"checkpoint-{EPOCHS}.pth"
    results = load_finetune_script().main(COMMON + ["--eval", "--resume", str(path),
                                                    "--data_path", str(finetuned["root"] / "data")])
    records = [json.loads(line) for line in (finetuned["output"] / "metrics.jsonl").read_text().splitlines()]
    last = next(record for record in records if record["epoch"] == EPOCHS)
    assert results["model"]["acc1"] == pytest.approx(last["model_acc1"])
    assert results["ema"]["acc1"] == pytest.approx(last["ema_acc1"])


def test_eval_on_data_with_other_classes_lists_them(finetuned, tmp_path, capsys):
    make_colour_folder(tmp_path / "val", classes=("red", "green", "blue"), per_class=1, size=16)
    with pytest.raises(SystemExit) as exit_info:
        load_finetune_script().main(COMMON + ["--eval", "--resume", str(finetuned["output"] / "checkpoint-best.pth"),
                                              "--eval_data_path", str(tmp_path / "val")])
    assert exit_info.value.code == 2
    assert "only in the checkpoint: [yellow]; only in the data: [none]" in capsys.readouterr().err


def test_eval_of_a_head_of_another_size_asks_for_nb_classes(tmp_path, capsys):
    make_colour_folder(tmp_path / "val", per_class=1, size=16)
    torch.save({"model": models.create_dense_model("convnextv2_atto", num_classes=10).state_dict()},
               tmp_path / "ten_classes.pth")
    with pytest.raises(SystemExit):
        load_finetune_script().main(COMMON + ["--eval", "--finetune", str(tmp_path / "ten_classes.pth"),
                                              "--eval_data_path", str(tmp_path / "val")])
    assert "10-class head but the data has 4 classes; pass --nb_classes 10" in capsys.readouterr().err


def test_finetune_from_checkpoint_of_another_size_is_a_clear_error(finetuned, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_finetune_script().main(COMMON + RECIPE + [
            "--model", "convnextv2_femto", "--finetune", str(finetuned["output"] / "checkpoint-best.pth"),
            "--data_path", str(finetuned["root"] / "data"), "--output_dir", str(tmp_path / "out")])
    assert "looks like convnextv2_atto" in capsys.readouterr().err


@pytest.mark.slow
def test_rerun_with_more_epochs_resumes_and_trains_only_the_rest(finetuned, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(finetuned["output"], output)
    load_finetune_script().main(COMMON + RECIPE + ["--data_path", str(finetuned["root"] / "data"),
                                                   "--epochs", str(EPOCHS + 1), "--output_dir", str(output)])
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == list(range(1, EPOCHS + 2))
    assert f"resumed from {output / f'checkpoint-{EPOCHS}.pth'} ({EPOCHS} epochs completed)" in \
        (output / "train.log").read_text()


@pytest.mark.slow
def test_help_exits_zero_and_lists_the_official_flags():
    result = subprocess.run([sys.executable, "finetune.py", "-h"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--finetune", "--layer_decay_type", "--model_ema_eval", "--mixup_switch_prob", "--dist_eval",
                 "--nb_classes", "--crop_pct", "--update_freq", "--clip_grad", "--amp", "--compile", "--config"):
        assert flag in result.stdout, flag
