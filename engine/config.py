"""Command-line configuration shared by ``pretrain.py`` and ``finetune.py``.

* ``add_training_arguments(parser)``: the flags both scripts share (official names where the
  official code has them); each script then ``parser.set_defaults(...)`` with its own recipe.
* ``parse_args(parser, argv, exclusive=...)``: argparse plus ``--config file.yaml``, whose values
  become the parser's defaults, so flags on the command line override them. YAML keys are the
  flags' names without dashes (``mask_ratio: 0.6``); unknown keys and badly typed values are
  errors naming the file and key. For each pair in ``exclusive`` (e.g. ``("lr", "blr")``) a flag
  given on the command line clears the other's YAML value.
* ``Check`` + ``validate(args, checks)``: table-driven validation run before any work; every
  failure names the flag, the value and the fix, and all failures are reported together.
  ``TRAINING_CHECKS`` covers the shared flags; every float flag must also be finite (no nan/inf).
* ``check_output_folders(args)``: creates ``--output_dir`` (and ``--log_dir``) and probes that a
  file can be written there, so an unusable folder fails at start, not at the first checkpoint.
* ``save_config(args, path, derived)``: the resolved configuration as YAML (reloadable with
  ``--config``), derived quantities (world size, effective batch, lr) as header comments.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import yaml

from models import check_model_name

from .checkpoint import atomic_write
from .distributed import device_problem


class ConfigError(ValueError):
    """Invalid configuration; the message names the flag (or YAML key) and the fix."""


AMP_MODES = ("none", "bf16", "fp16")


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags pretraining and fine-tuning share; returns ``parser``."""
    parser.add_argument("--config", type=str, default=None, metavar="FILE.yaml",
                        help="YAML file of defaults (keys = flag names without dashes); flags override it")

    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, default="convnextv2_base", help="convnextv2_<atto|...|huge>")
    model.add_argument("--input_size", type=int, default=224, help="training image size in pixels")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=64,
                       help="images per process and micro-batch; effective batch = "
                            "batch_size * update_freq * world_size")
    optim.add_argument("--epochs", type=int, default=800, help="training epochs")
    optim.add_argument("--warmup_epochs", type=int, default=40, help="linear lr warmup epochs")
    optim.add_argument("--update_freq", type=int, default=1,
                       help="gradient accumulation: micro-batches per optimizer update")
    optim.add_argument("--lr", type=float, default=None,
                       help="absolute learning rate (give --lr or --blr, not both)")
    optim.add_argument("--blr", type=float, default=None,
                       help="base learning rate: lr = blr * effective batch / 256 "
                            "(the script's recipe value when neither --lr nor --blr is given)")
    optim.add_argument("--min_lr", type=float, default=0.0, help="lr at the end of the cosine schedule")
    optim.add_argument("--weight_decay", type=float, default=0.05,
                       help="AdamW weight decay (never on norms, biases, GRN, mask token)")
    optim.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this value")
    optim.add_argument("--amp", choices=AMP_MODES, default="none",
                       help="autocast precision; fp16 adds a GradScaler")
    optim.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="wrap the model in torch.compile")

    data = parser.add_argument_group("data")
    data.add_argument("--data_path", type=str, default=None,
                      help="ImageNet-style root (<root>/train/<class>/*.jpg, or <root>/<class>/*.jpg); "
                           "omitted: embedded scikit-image photos")
    data.add_argument("--embedded_samples", type=int, default=256,
                      help="random crops per epoch from the embedded photos (only without --data_path)")
    data.add_argument("--num_workers", type=int, default=8, help="DataLoader worker processes per process")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=str, default="./output", help="checkpoints, logs, exports")
    run.add_argument("--log_dir", type=str, default=None,
                     help="TensorBoard folder; None means <output_dir>/tensorboard")
    run.add_argument("--resume", type=str, default=None, help="checkpoint file to resume from")
    run.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=True,
                     help="resume from the latest valid checkpoint in --output_dir")
    run.add_argument("--save_ckpt_freq", type=int, default=20, help="save a checkpoint every N epochs")
    run.add_argument("--save_ckpt_steps", type=int, default=None,
                     help="also checkpoint every N optimizer updates inside epochs (for resuming only)")
    run.add_argument("--save_ckpt_minutes", type=float, default=None,
                     help="also checkpoint when M minutes passed since the last checkpoint (at an update)")
    run.add_argument("--save_ckpt_num", type=int, default=3,
                     help="keep the last N epoch checkpoints (a mid-epoch one is removed once a newer one exists)")
    run.add_argument("--print_freq", type=int, default=20, help="progress line every N iterations")
    run.add_argument("--seed", type=int, default=0, help="seeds weights, data order, augmentation, masks")
    run.add_argument("--device", type=str, default=None,
                     help="cpu | cuda | cuda:<i> | mps; None picks CUDA, then MPS, then CPU")
    run.add_argument("--dist_timeout", type=int, default=1800,
                     help="seconds a process waits for the others (e.g. while rank 0 saves a checkpoint) "
                          "before a hung rank fails the job")
    run.add_argument("--cpu_threads", type=int, default=None,
                     help="torch threads per process on CPU (default: PyTorch's choice); 1 avoids "
                          "stalls on a busy or small machine")
    return parser


# ---------------------------------------------------------------- parsing with YAML defaults

_NOT_GIVEN = object()  # marks flags absent from the command line


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]] = None,
    exclusive: Iterable[tuple[str, str]] = (),
) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` YAML values as defaults; exits with a message on errors."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    config_path = pre_parser.parse_known_args(argv)[0].config
    yaml_values: dict[str, Any] = {}
    if config_path is not None:
        try:
            yaml_values = load_yaml_defaults(parser, config_path)
        except ConfigError as error:
            parser.error(str(error))
    cli_dests = _dests_given_on_command_line(parser, argv)
    for first, second in exclusive:
        for given, other in ((first, second), (second, first)):
            if given in cli_dests and other in yaml_values and other not in cli_dests:
                del yaml_values[other]  # the command line decides between the pair
    parser.set_defaults(**yaml_values)
    return parser.parse_args(argv)


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str | os.PathLike) -> dict[str, Any]:
    """Read ``path`` and convert each value with its flag's type; raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; give the path of a YAML file (see configs/)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    converted = {}
    for key, value in values.items():
        if key not in actions:
            close = difflib.get_close_matches(str(key), actions, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
        converted[key] = _convert_yaml_value(actions[key], value, f"--config {path}: key {key!r}")
    return converted


def _convert_yaml_value(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    takes_bool = isinstance(action, argparse.BooleanOptionalAction) or isinstance(action.const, bool)
    if takes_bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a value for --{action.dest}, got the boolean {value}")
    if action.type is not None:
        try:
            value = action.type(str(value))  # str() first: int("1.5") fails instead of truncating
        except (TypeError, ValueError) as error:
            type_name = getattr(action.type, "__name__", str(action.type))
            raise ConfigError(f"{where}: expected {type_name}, got {value!r}") from error
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _dests_given_on_command_line(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set[str]:
    # argparse fills in a default only where the namespace lacks the attribute, so
    # attributes still holding the sentinel afterwards were not on the command line
    probe = argparse.Namespace(**{
        action.dest: _NOT_GIVEN for action in parser._actions if action.dest != argparse.SUPPRESS
    })
    parser.parse_args(argv, namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not _NOT_GIVEN}


# ---------------------------------------------------------------- validation

@dataclass(frozen=True)
class Check:
    """One validation rule: ``is_valid(args)`` must hold, else report ``flag`` and ``fix``."""

    flag: str
    is_valid: Callable[[argparse.Namespace], bool]
    fix: str


def validate(args: argparse.Namespace, checks: Iterable[Check]) -> None:
    """Raise ConfigError listing every failed check as ``--flag value: fix``."""
    failures = [f"--{dest} {value!r}: must be a finite number" for dest, value in vars(args).items()
                if _has_non_finite_float(value)]
    for check in checks:
        if not check.is_valid(args):
            dest = check.flag.lstrip("-")
            shown = f" {getattr(args, dest)!r}" if hasattr(args, dest) else ""
            failures.append(f"{check.flag}{shown}: {check.fix}")
    if failures:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(failures))


def _has_non_finite_float(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(item, float) and not math.isfinite(item) for item in values)


def check_output_folders(args: argparse.Namespace) -> None:
    """Create --output_dir (and --log_dir when given) and probe that files can be written there;
    ConfigError naming the flag otherwise. Call it on the process that writes (rank 0)."""
    for flag in ("--output_dir", "--log_dir"):
        folder = getattr(args, flag.lstrip("-"), None)
        if folder is None:
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ConfigError(f"{flag} {folder}: cannot write there ({error}); choose another {flag} "
                              "or fix the folder (permissions, free space)") from error


def _is_model_name(name: str) -> bool:
    try:
        check_model_name(name)
    except ValueError:
        return False
    return True


def _valid_device(args: argparse.Namespace) -> bool:
    return args.device is None or device_problem(args.device) is None


_DEVICE_FIX = ("must be cpu, cuda, cuda:<index> or mps and available on this machine; "
               "leave it out to pick CUDA, then MPS, then CPU automatically")


TRAINING_CHECKS: tuple[Check, ...] = (
    Check("--model", lambda a: _is_model_name(a.model),
          "unknown model; choose convnextv2_ + one of atto, femto, pico, nano, tiny, base, large, huge"),
    Check("--input_size", lambda a: a.input_size >= 32, "must be at least 32 pixels, e.g. 224"),
    Check("--batch_size", lambda a: a.batch_size >= 1, "must be >= 1 (images per process)"),
    Check("--epochs", lambda a: a.epochs >= 0, "must be >= 0"),
    Check("--warmup_epochs", lambda a: 0 <= a.warmup_epochs <= max(a.epochs, 0),
          "must be between 0 and --epochs; lower it or raise --epochs"),
    Check("--update_freq", lambda a: a.update_freq >= 1, "must be >= 1 (micro-batches per optimizer update)"),
    Check("--lr", lambda a: a.lr is None or a.blr is None,
          "--lr and --blr were both given; give one (lr = blr * effective batch / 256)"),
    Check("--lr", lambda a: a.lr is None or a.lr > 0, "must be > 0"),
    Check("--blr", lambda a: a.blr is None or a.blr > 0, "must be > 0, e.g. 1.5e-4"),
    Check("--min_lr", lambda a: a.min_lr >= 0, "must be >= 0"),
    Check("--weight_decay", lambda a: a.weight_decay >= 0, "must be >= 0, e.g. 0.05"),
    Check("--clip_grad", lambda a: a.clip_grad is None or a.clip_grad > 0,
          "must be > 0 (leave it out for no clipping)"),
    Check("--data_path", lambda a: a.data_path is None or Path(a.data_path).is_dir(),
          "no such folder; give an ImageNet-style root (<root>/train/<class>/*.jpg) or leave it out "
          "for the embedded photos"),
    Check("--embedded_samples", lambda a: a.embedded_samples >= 1, "must be >= 1"),
    Check("--num_workers", lambda a: a.num_workers >= 0, "must be >= 0 (0 loads data in the main process)"),
    Check("--resume", lambda a: a.resume is None or Path(a.resume).is_file(),
          "no such checkpoint file; give a checkpoint-<epoch>.pth path or use --auto_resume"),
    Check("--save_ckpt_freq", lambda a: a.save_ckpt_freq >= 1, "must be >= 1 (epochs between checkpoints)"),
    Check("--save_ckpt_num", lambda a: a.save_ckpt_num >= 1, "must be >= 1 (checkpoints kept)"),
    Check("--save_ckpt_steps", lambda a: a.save_ckpt_steps is None or a.save_ckpt_steps >= 1,
          "must be >= 1 (optimizer updates between mid-epoch checkpoints), or leave it out"),
    Check("--save_ckpt_minutes", lambda a: a.save_ckpt_minutes is None or a.save_ckpt_minutes > 0,
          "must be > 0 (minutes between checkpoints, e.g. 30), or leave it out"),
    Check("--print_freq", lambda a: a.print_freq >= 1, "must be >= 1 (iterations between progress lines)"),
    Check("--seed", lambda a: a.seed >= 0, "must be >= 0"),
    Check("--device", _valid_device, _DEVICE_FIX),
    Check("--dist_timeout", lambda a: a.dist_timeout >= 1,
          "must be >= 1 second, and longer than a checkpoint save takes (default 1800)"),
    Check("--cpu_threads", lambda a: a.cpu_threads is None or a.cpu_threads >= 1,
          "must be >= 1 (leave it out for PyTorch's default)"),
)


# ---------------------------------------------------------------- resolved configuration

def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` without ``config``, paths as strings: plain YAML/JSON/weights_only types."""
    return {
        key: (os.fspath(value) if isinstance(value, os.PathLike) else value)
        for key, value in vars(args).items() if key != "config"
    }


def save_config(args: argparse.Namespace, path: str | os.PathLike, derived: Optional[dict] = None) -> Path:
    """Write the resolved configuration to ``path`` (atomically); reloadable with ``--config``."""
    header = ["# resolved configuration; rerun with: --config <this file>"]
    header += [f"# {key}: {value}" for key, value in (derived or {}).items()]
    text = "\n".join(header) + "\n" + yaml.safe_dump(config_dict(args), sort_keys=False)
    return atomic_write(path, lambda file: file.write(text.encode()))
