"""engine.config: YAML defaults under command-line flags, boolean flags written every way,
validation that names the flag, the demo as defaults, defaults resolved per machine."""
import argparse

import pytest
import yaml

import pretrain
from engine.compat import TF32, get_tf32
from engine.config import (TRAINING_CHECKS, BooleanFlag, Check, ConfigError, DefaultsOnceHelpFormatter,
                           add_training_arguments, config_dict, default_amp, default_num_workers,
                           load_yaml_defaults, parse_args, resolve_hardware_defaults, save_config,
                           slurm_tasks_on_this_node, validate)
from finetune_helpers import load_finetune_script

finetune_cli = load_finetune_script()
CLIS = {"pretrain": pretrain, "finetune": finetune_cli}


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


def non_default_argv(parser: argparse.ArgumentParser) -> list[str]:
    """A command line giving every flag of ``parser`` a value other than its default."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config") or action.default is argparse.SUPPRESS:
            continue  # -h, --config, and the official flags that are only accepted (absent from the namespace)
        flag, default = action.option_strings[0], action.default
        if isinstance(action, BooleanFlag):
            argv += [flag, "False"] if default in (True, None) else [flag]
        elif action.choices is not None:
            argv += [flag, next(str(choice) for choice in action.choices if choice != default)]
        elif action.nargs == 2:
            argv += [flag, "0.25", "0.75"]
        elif action.type is int:
            argv += [flag, str(7 if default is None else default + 3)]
        elif action.type is float:
            argv += [flag, str(0.375 if default is None else default / 2 + 0.0625)]
        else:
            argv += [flag, "convnextv2_femto" if action.dest == "model" else f"some/{action.dest}"]
    return argv


@pytest.mark.parametrize("cli", list(CLIS))
@pytest.mark.parametrize("values", ["every flag changed", "defaults (None, lists absent)"])
def test_each_cli_saved_config_reloads_to_the_same_flags(cli, values, tmp_path):
    parser = CLIS[cli].build_parser()
    argv = non_default_argv(parser) if values == "every flag changed" else []
    args = parse_args(parser, argv)
    if values == "every flag changed":
        defaults = vars(CLIS[cli].build_parser().parse_args([]))
        unchanged = [dest for dest, value in config_dict(args).items() if value == defaults[dest]]
        assert not unchanged, f"the test left flags at their defaults: {unchanged}"
    path = save_config(args, tmp_path / "config.yaml", {"effective_batch_size": 24})
    assert "# effective_batch_size: 24" in path.read_text()
    reloaded = parse_args(CLIS[cli].build_parser(), ["--config", str(path)])
    assert config_dict(reloaded) == config_dict(args)


def test_list_flag_from_yaml_takes_each_value_with_the_flag_type(tmp_path):
    config = write_yaml(tmp_path, {"cutmix_minmax": ["0.2", 0.8]})
    assert parse_args(finetune_cli.build_parser(), ["--config", config]).cutmix_minmax == [0.2, 0.8]
    with pytest.raises(ConfigError, match="key 'cutmix_minmax': expected 2 values, got 3"):
        load_yaml_defaults(finetune_cli.build_parser(), write_yaml(tmp_path, {"cutmix_minmax": [0.1, 0.2, 0.3]}))
    with pytest.raises(ConfigError, match="key 'cutmix_minmax': expected a list such as"):
        load_yaml_defaults(finetune_cli.build_parser(), write_yaml(tmp_path, {"cutmix_minmax": 0.5}))


def test_yaml_null_is_an_error_for_a_flag_that_needs_a_value(tmp_path):
    with pytest.raises(ConfigError, match="key 'epochs': expected a value, got null"):
        load_yaml_defaults(make_parser(), write_yaml(tmp_path, {"epochs": None}))
    assert parse_args(make_parser(), ["--config", write_yaml(tmp_path, {"lr": None})]).lr is None


@pytest.mark.parametrize("words, expected", [
    ([], True), (["True"], True), (["true"], True), (["1"], True), (["yes"], True),
    (["False"], False), (["false"], False), (["0"], False), (["no"], False),
])
def test_boolean_flag_takes_a_value_or_none(words, expected):
    assert parse_args(make_parser(), ["--no-norm_pix_loss", "--norm_pix_loss", *words]).norm_pix_loss is expected
    assert parse_args(make_parser(), ["--compile", *words, "--epochs", "3"]).compile is expected


def test_boolean_flag_rejects_other_words_and_a_value_after_no(capsys):
    for argv, message in ((["--compile", "maybe"], "expected True or False"),
                          (["--no-compile", "True"], "--no-compile takes no value")):
        with pytest.raises(SystemExit):
            parse_args(make_parser(), argv)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("cli", list(CLIS))
def test_help_states_each_default_at_most_once(cli):
    parser = CLIS[cli].build_parser()
    formatter = DefaultsOnceHelpFormatter(parser.prog)
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("(default") <= 1, f"{action.option_strings}: {text}"
    assert "(default: None)" not in parser.format_help()


@pytest.mark.parametrize("cli", list(CLIS))
def test_without_data_path_and_config_the_demo_settings_are_the_defaults(cli, tmp_path):
    parser, demo_argv = CLIS[cli].build_parser, ["--config", str(CLIS[cli].DEMO_CONFIG)]
    demo = yaml.safe_load(CLIS[cli].DEMO_CONFIG.read_text())
    args = parse_args(parser(), ["--epochs", "1"], demo_argv=demo_argv)
    assert args.demo and args.epochs == 1 and args.set_by_user == {"epochs"}
    assert (args.model, args.input_size, args.warmup_epochs) == (demo["model"], demo["input_size"],
                                                                  demo["warmup_epochs"])
    validate(args, TRAINING_CHECKS)  # warmup 1 <= epochs 1: `--epochs 1` alone is a valid demo
    args = parse_args(parser(), ["--data_path", str(tmp_path)], demo_argv=demo_argv)
    assert not args.demo and args.model == "convnextv2_base"
    config = write_yaml(tmp_path, {"epochs": 2})
    args = parse_args(parser(), ["--config", config], demo_argv=demo_argv)
    assert not args.demo and args.model == "convnextv2_base" and args.set_by_user == {"epochs"}


def test_any_pretraining_flag_keeps_the_demo(tmp_path):
    args = parse_args(pretrain.build_parser(), ["--backend", "minkowski"],
                      demo_argv=["--config", str(pretrain.DEMO_CONFIG)])
    assert args.demo and args.backend == "minkowski" and args.model == "convnextv2_atto" and args.epochs == 8


@pytest.mark.parametrize("cpus, processes, workers", [(1, 1, 0), (2, 1, 1), (4, 1, 3), (64, 1, 10), (16, 8, 1),
                                                      (96, 8, 10), (8, 8, 0)])
def test_default_workers_leave_a_cpu_to_each_training_process(cpus, processes, workers):
    assert default_num_workers(cpus, processes) == workers


@pytest.mark.parametrize("device, bf16, amp", [("cuda", True, "bf16"), ("cuda:3", True, "bf16"),
                                               ("cuda", False, "fp16"), ("cpu", True, "none"), ("mps", True, "none")])
def test_auto_amp_is_bf16_on_cuda_where_supported_and_fp32_elsewhere(device, bf16, amp):
    assert default_amp(device, bf16_supported=bf16) == amp


@pytest.fixture
def outside_slurm(monkeypatch):
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)


def test_resolution_fills_only_what_was_left_to_the_machine(restore_tf32, monkeypatch, outside_slurm):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    args = parse_args(make_parser(), [])
    lines = resolve_hardware_defaults(args, "cuda:1", cpus=96, bf16_supported=True)
    assert (args.amp, args.num_workers, args.pin_mem) == ("bf16", 10, True)
    assert get_tf32() == TF32(matmul=True, conv=True)
    assert len(lines) == 4 and "--num_workers 10 (96 CPUs, 8 training processes on this node)" in lines
    args = parse_args(make_parser(), ["--amp", "none", "--num_workers", "0", "--pin_mem", "False"])
    assert resolve_hardware_defaults(args, "cuda", 1, cpus=96, bf16_supported=True) == [
        "TF32 on for FP32 matmuls and convolutions"]
    assert (args.amp, args.num_workers, args.pin_mem) == ("none", 0, False)
    args = parse_args(make_parser(), [])
    resolve_hardware_defaults(args, "cpu", 1, cpus=2)
    assert (args.amp, args.num_workers, args.pin_mem) == ("none", 1, False)


@pytest.mark.parametrize("device", ["cuda:0", "cuda:3"])
def test_a_fixed_gpu_under_torchrun_with_several_local_processes_is_refused(device, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    args = parse_args(make_parser(), ["--device", device])
    with pytest.raises(ConfigError, match=rf"--device '{device}': names one device, but torchrun runs several "
                                          r"processes on this node .* pass --device cuda"):
        validate(args, TRAINING_CHECKS)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: the index is its own choice
    try:
        validate(args, TRAINING_CHECKS)
    except ConfigError as error:  # without that GPU here: only that is reported
        assert "torchrun runs several processes" not in str(error)


@pytest.mark.parametrize("cli", list(CLIS))
def test_every_flag_typed_with_dashes_is_read_as_the_flag(cli):
    parser = CLIS[cli].build_parser()
    flags = [flag for flag in parser._option_string_actions if flag.startswith("--") and "_" in flag]
    assert len(flags) > 40
    for flag in flags:
        dashed = "--" + flag[2:].replace("_", "-")
        canonical, value = parser.canonical_flags([dashed, "a_b-c"])
        assert parser._option_string_actions[canonical] is parser._option_string_actions[flag], dashed
        assert value == "a_b-c"
        assert parser.canonical_flags([f"{dashed}=1"]) == [f"{canonical}=1"], dashed


def test_dashed_flags_parse_like_the_official_spelling_and_stay_literal_after_double_dash(tmp_path):
    config = write_yaml(tmp_path, {"epochs": 3})
    args = parse_args(pretrain.build_parser(), [
        "--config", config, "--data-path", str(tmp_path), "--input-size=96", "--no-norm-pix-loss", "--use-checkpoint",
        "--local-rank", "2", "--mask-ratio", "0.5"])
    assert (args.data_path, args.input_size, args.norm_pix_loss, args.grad_checkpointing, args.mask_ratio,
            args.epochs) == (str(tmp_path), 96, False, True, 0.5, 3)
    assert args.set_by_user >= {"data_path", "input_size", "norm_pix_loss", "grad_checkpointing", "mask_ratio"}
    assert pretrain.build_parser().canonical_flags(["--", "--data-path"]) == ["--", "--data-path"]


def test_an_unknown_flag_names_the_closest_known_one(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(finetune_cli.build_parser(), ["--layer_decay_tipe", "single", "--model-emma"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "unrecognized arguments: --layer_decay_tipe (did you mean --layer_decay_type?) single --model-emma " \
           "(did you mean --model_ema?)" in error
    assert "usage:" not in error


@pytest.mark.parametrize("environment, local_world_size, affinity, workers, line", [
    # submitit: one task per GPU, 10 CPUs each, Slurm binds each task to its own 10
    ({"SLURM_CPUS_PER_TASK": "10", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}, 8, 10, 9,
     "--num_workers 9 (10 CPUs, 1 training process of this Slurm task)"),
    # the same job without CPU binding: every task sees the whole node, still uses its 10
    ({"SLURM_CPUS_PER_TASK": "10", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "0"}, 8, 96, 9,
     "--num_workers 9 (10 CPUs, 1 training process of this Slurm task)"),
    # one task per node running torchrun --nproc_per_node 8 over the task's 64 CPUs
    ({"SLURM_CPUS_PER_TASK": "64", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "8"}, 8, 64, 7,
     "--num_workers 7 (64 CPUs, 8 training processes of this Slurm task)"),
    ({"SLURM_CPUS_PER_TASK": "2", "SLURM_TASKS_PER_NODE": "1"}, 1, 2, 1,
     "--num_workers 1 (2 CPUs, 1 training process of this Slurm task)"),
    ({}, 8, 96, 10, "--num_workers 10 (96 CPUs, 8 training processes on this node)"),
], ids=["submitit-bound", "submitit-unbound", "torchrun-in-a-task", "small-task", "torchrun-without-slurm"])
def test_slurm_tasks_get_workers_from_their_own_cpus(monkeypatch, outside_slurm, environment, local_world_size,
                                                      affinity, workers, line):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    args = parse_args(make_parser(), [])
    assert line in resolve_hardware_defaults(args, "cpu", cpus=affinity)
    assert args.num_workers == workers


@pytest.mark.parametrize("layout, node, tasks", [("8(x2)", "1", 8), ("4(x2),2", "2", 2), ("4(x2),2", "0", 4),
                                                 ("3", "0", 3), ("3", "1", None), ("", "0", None)])
def test_slurm_tasks_on_this_node_reads_slurms_layout(monkeypatch, outside_slurm, layout, node, tasks):
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", layout)
    monkeypatch.setenv("SLURM_NODEID", node)
    assert slurm_tasks_on_this_node() == tasks
