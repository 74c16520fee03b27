"""engine.config: YAML defaults under command-line flags, validation that names the flag."""
import argparse

import pytest
import yaml

from engine.config import (TRAINING_CHECKS, BooleanFlag, Check, ConfigError, add_training_arguments,
                           load_yaml_defaults, parse_args, save_config, validate)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    parser.add_argument("--mask_ratio", type=float, default=0.6)
    parser.add_argument("--norm_pix_loss", action=BooleanFlag, default=True)
    return parser


def write_yaml(tmp_path, values, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_values_override_parser_defaults_and_flags_override_yaml(tmp_path):
    config = write_yaml(tmp_path, {"batch_size": 7, "epochs": 3, "mask_ratio": 0.5})
    args = parse_args(make_parser(), ["--config", config, "--epochs", "5"])
    assert args.batch_size == 7  # from YAML (parser default is 64)
    assert args.epochs == 5  # flag beats YAML
    assert args.mask_ratio == 0.5
    assert args.warmup_epochs == 40  # untouched parser default


def test_yaml_values_are_converted_with_the_flag_type(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; the flag's type makes it a float
    config = write_yaml(tmp_path, {"blr": "1e-4", "input_size": 96})
    args = parse_args(make_parser(), ["--config", config])
    assert args.blr == pytest.approx(1e-4) and isinstance(args.blr, float)
    assert args.input_size == 96


@pytest.mark.parametrize("values, expected", [
    ({"batch_sise": 4}, "unknown key 'batch_sise'; did you mean 'batch_size'"),
    ({"batch_size": 1.5}, "key 'batch_size': expected int"),
    ({"norm_pix_loss": "yes"}, "key 'norm_pix_loss': expected true or false"),
    ({"amp": "fp8"}, "key 'amp': 'fp8' is not one of auto, none, bf16, fp16"),
])
def test_bad_yaml_key_or_value_is_reported_with_file_and_key(tmp_path, values, expected):
    config = write_yaml(tmp_path, values)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_yaml_defaults(make_parser(), config)


def test_boolean_flags_switch_both_ways_over_yaml(tmp_path):
    config = write_yaml(tmp_path, {"norm_pix_loss": False, "auto_resume": False})
    assert parse_args(make_parser(), ["--config", config]).norm_pix_loss is False
    args = parse_args(make_parser(), ["--config", config, "--norm_pix_loss", "--auto_resume"])
    assert args.norm_pix_loss is True and args.auto_resume is True
    assert parse_args(make_parser(), ["--no-norm_pix_loss"]).norm_pix_loss is False


def test_lr_on_command_line_replaces_blr_from_yaml(tmp_path):
    config = write_yaml(tmp_path, {"blr": 1.5e-4})
    args = parse_args(make_parser(), ["--config", config, "--lr", "0.01"], exclusive=[("lr", "blr")])
    assert args.lr == 0.01 and args.blr is None
    validate(args, TRAINING_CHECKS)  # no "both given" error


def test_lr_and_blr_both_on_command_line_is_an_error():
    args = parse_args(make_parser(), ["--lr", "0.01", "--blr", "1e-4"], exclusive=[("lr", "blr")])
    with pytest.raises(ConfigError, match="--lr .*--lr and --blr were both given"):
        validate(args, TRAINING_CHECKS)


@pytest.mark.parametrize("flag_args, flag", [
    (["--model", "convnextv2_gigantic"], "--model"),
    (["--batch_size", "0"], "--batch_size"),
    (["--epochs", "-1", "--warmup_epochs", "0"], "--epochs"),
    (["--epochs", "5", "--warmup_epochs", "6"], "--warmup_epochs"),
    (["--update_freq", "0"], "--update_freq"),
    (["--blr", "-1"], "--blr"),
    (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--clip_grad", "0"], "--clip_grad"),
    (["--data_path", "/no/such/folder"], "--data_path"),
    (["--num_workers", "-2"], "--num_workers"),
    (["--resume", "/no/such/checkpoint.pth"], "--resume"),
    (["--save_ckpt_freq", "0"], "--save_ckpt_freq"),
    (["--save_ckpt_num", "0"], "--save_ckpt_num"),
    (["--device", "tpu"], "--device"),
])
def test_each_invalid_value_fails_naming_its_flag(flag_args, flag):
    args = parse_args(make_parser(), flag_args)
    with pytest.raises(ConfigError) as caught:
        validate(args, TRAINING_CHECKS)
    failures = str(caught.value).splitlines()[1:]
    assert len(failures) == 1, f"expected one failure for {flag_args}, got {failures}"
    assert failures[0].strip().startswith(flag + " ")


def test_validate_reports_all_failures_at_once():
    args = parse_args(make_parser(), ["--batch_size", "0", "--epochs", "-3"])
    with pytest.raises(ConfigError) as caught:
        validate(args, TRAINING_CHECKS + (Check("--mask_ratio", lambda a: a.mask_ratio < 1, "must be < 1"),))
    message = str(caught.value)
    assert "--batch_size 0: must be >= 1" in message and "--epochs -3: must be >= 0" in message


def test_default_configuration_is_valid():
    validate(parse_args(make_parser(), []), TRAINING_CHECKS)


def test_saved_config_reloads_to_the_same_arguments(tmp_path):
    parser = make_parser()
    args = parse_args(parser, ["--batch_size", "3", "--blr", "2e-4", "--no-norm_pix_loss",
                               "--data_path", str(tmp_path)])
    path = save_config(args, tmp_path / "out" / "config.yaml", {"effective_batch_size": 24})
    assert "# effective_batch_size: 24" in path.read_text()
    reloaded = parse_args(make_parser(), ["--config", str(path)])
    assert {k: v for k, v in vars(reloaded).items() if k != "config"} == \
           {k: v for k, v in vars(args).items() if k != "config"}
