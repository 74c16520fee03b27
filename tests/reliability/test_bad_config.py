"""Bad configuration fails before any work, naming the flag (issue 5, item 4).

Every numeric flag of ``pretrain.py`` and ``finetune.py`` is tried out of range (and with nan /
inf where it is a float); unknown names and conflicting flags too. Each must exit with code 2
and an error naming the flag, and must not create --output_dir. A table-completeness test fails
when a numeric flag is added without being listed here.
"""
import argparse
import math

import pytest
import torch

import fcmae
import models
import pretrain
from finetune_helpers import load_finetune_script

finetune_cli = load_finetune_script()
CLIS = {"pretrain": pretrain, "finetune": finetune_cli}

SHARED = {
    "--input_size": ["16", "-32"],
    "--batch_size": ["0"],
    "--epochs": ["-1"],
    "--warmup_epochs": ["-1", "1000"],  # more than --epochs
    "--update_freq": ["0"],
    "--lr": ["0", "-0.001", "nan", "inf"],
    "--blr": ["0", "inf"],
    "--min_lr": ["-0.000001", "inf"],
    "--weight_decay": ["-0.05", "nan"],
    "--clip_grad": ["0", "-1", "inf"],
    "--max_skipped_updates": ["0"],
    "--embedded_samples": ["0"],
    "--num_workers": ["-1"],
    "--save_ckpt_freq": ["0"],
    "--save_ckpt_num": ["0"],
    "--save_ckpt_steps": ["0"],
    "--save_ckpt_minutes": ["0", "-5", "nan"],
    "--print_freq": ["0"],
    "--seed": ["-1"],
    "--dist_timeout": ["0"],
    "--cpu_threads": ["0"],
}
INVALID = {
    "pretrain": {
        **SHARED,
        "--input_size": ["16", "-32", "100"],  # 100: not a multiple of the 32-px patch
        "--stem_stride": ["3", "0"],
        "--in_chans": ["0"],
        "--mean": ["0.5 0.5"],  # two values for three channels
        "--std": ["0.2 0.2 0"],
        "--mask_ratio": ["1.0", "-0.1", "nan"],
        "--decoder_depth": ["0"],
        "--decoder_embed_dim": ["0"],
        "--knn_freq": ["0"],
        "--knn_k": ["0"],
        "--knn_max_images": ["-1"],
    },
    "finetune": {
        **SHARED,
        "--stem_stride": ["3", "0"],
        "--in_chans": ["0"],
        "--nb_classes": ["0"],
        "--drop_path": ["1.0", "-0.1"],
        "--layer_decay": ["0", "1.5", "nan"],
        "--model_ema_decay": ["1.0", "0"],
        "--smoothing": ["1.0", "-0.1"],
        "--mixup": ["-1", "inf"],
        "--cutmix": ["-1"],
        "--cutmix_minmax": ["0.9 0.1", "0.2 1.5", "-0.1 0.5"],
        "--mixup_prob": ["1.5", "-0.1"],
        "--mixup_switch_prob": ["1.5", "-0.1"],
        "--color_jitter": ["-0.4", "nan"],
        "--reprob": ["1.5", "-0.1"],
        "--recount": ["0"],
        "--crop_pct": ["0", "1.5"],
    },
}
OTHER_MISTAKES = [  # (cli, arguments, text the error must contain)
    ("pretrain", ["--model", "convnextv2_mega"], "--model 'convnextv2_mega': unknown model"),
    ("finetune", ["--model", "resnet50"], "--model 'resnet50': unknown model"),
    ("pretrain", ["--backend", "dense"], "argument --backend: invalid choice: 'dense'"),
    ("pretrain", ["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    ("finetune", ["--layer_decay_type", "stage"], "argument --layer_decay_type: invalid choice"),
    ("pretrain", ["--device", "tpu"], "--device 'tpu': must be cpu, cuda"),
    ("pretrain", ["--lr", "1e-3", "--blr", "1e-4"], "--lr and --blr were both given"),
    ("finetune", ["--lr", "1e-3", "--blr", "1e-4"], "--lr and --blr were both given"),
    ("finetune", ["--no-model_ema", "--model_ema_eval"], "--model_ema_eval True: needs --model_ema"),
    ("finetune", ["--batch_size", "3", "--mixup", "0.8"], "--batch_size 3: must be even with Mixup/CutMix"),
    ("finetune", ["--opt", "sgd"], "--opt 'sgd': not supported: AdamW is the optimizer"),
    ("finetune", ["--data_set", "CIFAR"], "--data_set 'CIFAR': not supported: --data_path is an image folder"),
    ("pretrain", ["--dist_on_itp", "True"], "--dist_on_itp True: not supported: OpenMPI/ITP environments"),
    ("pretrain", ["--auto_resume", "maybe"], "argument --auto_resume/--no-auto_resume: expected True or False"),
    ("pretrain", ["--no-auto_resume", "True"], "--no-auto_resume takes no value"),
    ("pretrain", ["--resume", "/no/such/checkpoint.pth"], "--resume '/no/such/checkpoint.pth': no such checkpoint"),
    ("finetune", ["--finetune", "/no/such/encoder.pt"], "--finetune '/no/such/encoder.pt': no such checkpoint"),
    ("pretrain", ["--init_from", "/no/such/encoder.pt"], "--init_from '/no/such/encoder.pt': no such file"),
    ("pretrain", ["--stem_stride", "2", "--input_size", "40"], "--input_size 40: must be a multiple of 16"),
    ("pretrain", ["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
]


def numeric_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The CLI's own numeric flags (not the official scripts' flags it merely accepts)."""
    return {action.option_strings[0] for action in parser._actions
            if action.type in (int, float) and action.default is not argparse.SUPPRESS}


def run_cli(cli: str, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        CLIS[cli].main(argv)
    return exit_info.value.code


@pytest.fixture
def no_work(monkeypatch):
    """Training or evaluation starting means validation let the mistake through: fail at once."""
    def started(*args, **kwargs):
        raise AssertionError("the configuration was accepted and work started")

    for module in (pretrain, finetune_cli):
        monkeypatch.setattr(module, "launch", started)


@pytest.mark.parametrize("cli", list(CLIS))
def test_every_numeric_flag_has_out_of_range_cases(cli):
    assert set(INVALID[cli]) == numeric_flags(CLIS[cli].build_parser())


@pytest.mark.parametrize("cli, flag, value", [(cli, flag, value) for cli, table in INVALID.items()
                                               for flag, values in table.items() for value in values])
def test_out_of_range_value_stops_before_any_work_naming_the_flag(cli, flag, value, tmp_path, capsys, no_work):
    output = tmp_path / "out"
    assert run_cli(cli, ["--output_dir", str(output), flag, *value.split()]) == 2
    error = capsys.readouterr().err
    assert f"\n  {flag} " in error, f"{flag} {value} was not reported as invalid:\n{error[-600:]}"
    assert error.count(f"\n  {flag} ") == 1, f"{flag} {value} reported more than once:\n{error}"
    if any(not math.isfinite(float(number)) for number in value.split()):
        assert f"{flag} {float(value)!r}: must be a finite number" in error
    assert not output.exists(), "nothing may be written for an invalid configuration"


@pytest.mark.parametrize("cli, arguments, message", OTHER_MISTAKES)
def test_unknown_names_and_conflicting_flags_stop_before_any_work(cli, arguments, message, tmp_path, capsys,
                                                                   no_work):
    output = tmp_path / "out"
    assert run_cli(cli, ["--output_dir", str(output), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def checkpoint_of_another_size(path, cli: str):
    """What each CLI saves, for convnextv2_femto."""
    model = (fcmae.build_fcmae("convnextv2_femto") if cli == "pretrain"
             else models.create_dense_model("convnextv2_femto", num_classes=4))
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1,
                "config": {"model": "convnextv2_femto"}}, path)
    return path


@pytest.mark.parametrize("cli", list(CLIS))
def test_resume_of_a_checkpoint_of_another_model_size_names_both_sizes(cli, pretrain_data, finetune_data, tmp_path,
                                                                       capsys):
    resume = checkpoint_of_another_size(tmp_path / "femto.pth", cli)
    data = pretrain_data if cli == "pretrain" else finetune_data
    output = tmp_path / "out"
    argv = ["--model", "convnextv2_atto", "--input_size", "32", "--batch_size", "2", "--num_workers", "0",
            "--data_path", str(data), "--output_dir", str(output), "--resume", str(resume)]
    if cli == "finetune":
        argv += ["--layer_decay_type", "single"]
    assert run_cli(cli, argv) == 2
    error = capsys.readouterr().err
    assert f"--model convnextv2_atto: checkpoint {resume} holds a convnextv2_femto" in error
    assert "or pass another --resume checkpoint" in error
    assert "another --output_dir" not in error, "another --output_dir cannot help with an explicit --resume"
    assert not output.exists(), "a run that fails to start may write nothing"



@pytest.mark.parametrize("cli", list(CLIS))
def test_a_mistake_prints_the_error_lines_alone_with_a_pointer_to_help(cli, tmp_path, capsys, no_work):
    assert run_cli(cli, ["--output_dir", str(tmp_path / "out"), "--epochs", "-1", "--batch_size", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    prog = CLIS[cli].build_parser().prog
    assert lines == [f"{prog}: error: invalid configuration:", "  --batch_size 0: must be >= 1 (images per process)",
                     "  --epochs -1: must be >= 0",
                     "  --warmup_epochs 1: must be between 0 and --epochs; lower it or raise --epochs",
                     f"{prog}: run `{prog} -h` for the flags and defaults"], "no usage block around the errors"
