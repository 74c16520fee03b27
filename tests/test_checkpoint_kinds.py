"""A checkpoint of the other training script (pretraining <-> fine-tuning), given to --resume or
found by --auto_resume in a shared --output_dir: one line saying what the file is and which flag
takes it, exit code 2, nothing written."""
import pytest
import torch

import pretrain
from checkpoint_layouts import randomised_model, write_layout
from engine.checkpoint import FINE_TUNING, PRETRAINING, UNKNOWN_KIND, checkpoint_kind, load_checkpoint
from finetune_helpers import load_finetune_script, make_colour_folder

COMMON = ["--model", "convnextv2_atto", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
          "--device", "cpu", "--print_freq", "100"]
PRETRAIN = [*COMMON, "--input_size", "64", "--batch_size", "4"]
FINETUNE = [*COMMON, "--input_size", "32", "--batch_size", "4", "--layer_decay_type", "single", "--mixup", "0",
            "--cutmix", "0", "--aa", "", "--reprob", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-epoch pretraining run and one 1-epoch fine-tuning run on the same tiny folder."""
    root = tmp_path_factory.mktemp("kinds")
    make_colour_folder(root / "data" / "train", per_class=2, size=40)
    make_colour_folder(root / "data" / "val", per_class=1, size=40)
    data = ["--data_path", str(root / "data")]
    pretrain.main([*PRETRAIN, *data, "--output_dir", str(root / "pretrain")])
    load_finetune_script().main([*FINETUNE, *data, "--output_dir", str(root / "finetune")])
    return {"data": data, "pretrain": root / "pretrain", "finetune": root / "finetune"}


def folder_state(folder):
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def refused(main, argv, capsys) -> str:
    """The error ``main(argv)`` exits with (code 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "state_dict" not in error
    return error


def test_checkpoint_kind_tells_pretraining_from_fine_tuning_in_every_layout(runs, tmp_path):
    assert checkpoint_kind(load_checkpoint(runs["pretrain"] / "checkpoint-1.pth")) == PRETRAINING
    assert checkpoint_kind(load_checkpoint(runs["finetune"] / "checkpoint-1.pth")) == FINE_TUNING
    assert checkpoint_kind(load_checkpoint(runs["finetune"] / "checkpoint-best.pth")) == FINE_TUNING
    source = randomised_model("convnextv2_atto", num_classes=3)
    expected = {"fcmae_training": PRETRAINING, "official_minkowski": PRETRAINING, "official_finetuned": FINE_TUNING,
                "timm_encoder": UNKNOWN_KIND, "official_fcmae": UNKNOWN_KIND}
    for layout, kind in expected.items():
        path = write_layout(layout, source, tmp_path)
        assert checkpoint_kind(torch.load(path, weights_only=False)) == kind, layout


def test_finetune_resume_of_a_pretraining_checkpoint_points_to_finetune_flag(runs, tmp_path, capsys):
    checkpoint = runs["pretrain"] / "checkpoint-1.pth"
    error = refused(load_finetune_script().main, [*FINETUNE, *runs["data"], "--resume", str(checkpoint),
                                                  "--output_dir", str(tmp_path / "out")], capsys)
    assert (f"--resume {checkpoint} is a pretraining checkpoint (written by pretrain.py), which finetune.py cannot "
            f"resume; start fine-tuning from it with --finetune {checkpoint} instead of --resume") in error
    assert not (tmp_path / "out").exists()


def test_pretrain_resume_of_a_fine_tuning_checkpoint_is_refused_in_one_line(runs, tmp_path, capsys):
    checkpoint = runs["finetune"] / "checkpoint-1.pth"
    error = refused(pretrain.main, [*PRETRAIN, *runs["data"], "--resume", str(checkpoint),
                                    "--output_dir", str(tmp_path / "out")], capsys)
    assert (f"--resume {checkpoint} is a fine-tuning checkpoint (written by finetune.py), which pretrain.py cannot "
            "resume; pass a checkpoint of pretrain.py to --resume") in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, found", [("finetune", "pretrain"), ("pretrain", "finetune")])
def test_auto_resume_in_an_output_dir_of_the_other_script_asks_for_another_one(runs, script, found, capsys):
    main, flags = (load_finetune_script().main, FINETUNE) if script == "finetune" else (pretrain.main, PRETRAIN)
    shared = runs[found]
    before = folder_state(shared)
    error = refused(main, [*flags, *runs["data"], "--output_dir", str(shared)], capsys)
    kind = {"pretrain": "a pretraining", "finetune": "a fine-tuning"}[found]
    assert f"--output_dir holds {shared / 'checkpoint-1.pth'} (found by --auto_resume), {kind} checkpoint" in error
    assert f"{'fine-tune' if script == 'finetune' else 'pretrain'} into another --output_dir" in error
    assert folder_state(shared) == before, "nothing in the other script's --output_dir may change"
