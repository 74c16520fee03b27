"""Command-line configuration shared by ``pretrain.py`` and ``finetune.py``.

* ``TrainingArgumentParser``: argparse whose errors are the error lines alone (program, errors,
  a pointer to ``-h``; exit code 2) and whose help states each default once. Flags may be typed
  with dashes (``--data-path``, ``--no-norm-pix-loss``: ``canonical_flags``); an unknown flag gets
  the closest known one as a hint.
* ``add_training_arguments(parser)``: the flags both scripts share (official names where the
  official code has them); each script then ``parser.set_defaults(...)`` with its own recipe.
  Every boolean flag uses ``BooleanFlag``: ``--flag``, ``--no-flag`` and ``--flag True/False``
  (also ``true/false``, ``1/0``, ``yes/no``, as the official scripts' ``str2bool``).
* ``parser.add_official_flags(flags)``: flags of the official ConvNeXt-V2 scripts that have no
  counterpart here (``OfficialFlag`` tables: launcher flags, recipe knobs fixed here), accepted so
  that their commands run unchanged; ``official_flag_notes`` lists the values ignored, for the
  log. ``--use_amp`` maps onto ``--amp``, ``--use_checkpoint`` onto ``--grad_checkpointing``.
* ``parse_args(parser, argv, exclusive=..., demo_argv=...)``: argparse plus ``--config file.yaml``,
  whose values become the parser's defaults, so flags on the command line override them. YAML
  keys are the flags' names without dashes (``mask_ratio: 0.6``, ``cutmix_minmax: [0.2, 0.8]``);
  unknown keys and badly typed values are errors naming the file and key. For each pair in
  ``exclusive`` (e.g. ``("lr", "blr")``) a flag given on the command line clears the other's YAML
  value. Without ``--data_path`` and ``--config``, ``demo_argv`` (the demo's ``--config``) goes
  first, so the demo settings are the defaults and flags override them (``args.demo``).
* ``Check`` + ``validate(args, checks)``: table-driven validation run before any work; every
  failure names the flag, the value and the fix, and all failures are reported together, each
  flag once. ``TRAINING_CHECKS`` covers the shared flags; every float flag must also be finite.
* ``resolve_hardware_defaults(args, device, local_world_size)``: the ``auto`` defaults (``--amp``,
  ``--num_workers``, ``--pin_mem``) for this machine, and TF32 for FP32 math on CUDA; the workers
  come from this process's share of the CPUs (``cpu_share``: a Slurm task's own CPUs under Slurm).
* ``check_output_folders(args)``: creates ``--output_dir`` (and ``--log_dir``) and probes that a
  file can be written there, so an unusable folder fails at start, not at the first checkpoint.
* ``save_config(args, path, derived)``: the resolved configuration as YAML (reloadable with
  ``--config``), derived quantities (world size, effective batch, lr) as header comments.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import yaml

from models import check_model_name

from .checkpoint import atomic_write
from .compat import set_tf32
from .distributed import device_problem
from .errors import ConfigError
from .progress import DEFAULT_MAX_SKIPPED_IN_ROW
from .shards import is_shard_source


AMP_MODES = ("auto", "none", "bf16", "fp16")
MAX_DEFAULT_WORKERS = 10  # DataLoader workers per process when --num_workers is not given


# ---------------------------------------------------------------- the parser and its flags

class TrainingArgumentParser(argparse.ArgumentParser):
    """ArgumentParser for the training CLIs: a mistake prints the error lines alone (no usage
    block above them) and a pointer to ``-h``, exit code 2; help shows each default once."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsOnceHelpFormatter)
        super().__init__(*args, **kwargs)
        self.official_flags: tuple[OfficialFlag, ...] = ()

    def add_official_flags(self, flags: Iterable["OfficialFlag"]) -> None:
        """Accept ``flags`` (absent from the namespace unless given) and ``--use_amp``, in one help group."""
        group = self.add_argument_group(
            "accepted for the official ConvNeXt-V2 commands",
            "flags with no counterpart here: values that match what this code does are accepted silently, "
            "others are noted in the log as ignored, or rejected where they would change the recipe")
        group.add_argument("--use_amp", dest="amp", action=UseAmpFlag, default=argparse.SUPPRESS,
                           help="True: --amp auto; False: --amp none")
        for flag in flags:
            if flag.type is parse_bool:
                group.add_argument(*flag.names, dest=flag.dest, action=BooleanFlag, default=argparse.SUPPRESS,
                                   help=flag.reason)
            else:
                group.add_argument(*flag.names, dest=flag.dest, type=flag.type, nargs=flag.nargs,
                                   default=argparse.SUPPRESS, help=flag.reason)
        self.official_flags += tuple(flags)

    def canonical_flags(self, argv: Sequence[str]) -> list[str]:
        """``argv`` with each flag typed with dashes where this parser's spelling has underscores
        written this parser's way: ``--data-path`` -> ``--data_path``, ``--no-norm-pix-loss`` ->
        ``--no-norm_pix_loss`` (also in ``--flag=value``). Flags this parser knows as typed (e.g.
        ``--local-rank``), values, and everything after ``--`` stay as they are."""
        canonical = []
        for index, token in enumerate(argv):
            if token == "--":
                return canonical + list(argv[index:])
            flag, equals, value = token.partition("=")
            if flag.startswith("--") and flag not in self._option_string_actions:
                spellings = ["--" + flag[2:].replace("-", "_")]
                if flag.startswith("--no-"):
                    spellings.append("--no-" + flag[5:].replace("-", "_"))
                flag = next((spelling for spelling in spellings if spelling in self._option_string_actions), flag)
            canonical.append(flag + equals + value)
        return canonical

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        return super().parse_known_args(self.canonical_flags(sys.argv[1:] if args is None else args), namespace)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error("unrecognized arguments: " + " ".join(map(self._with_hint, unknown)))
        return parsed

    def _with_hint(self, token: str) -> str:
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        close = difflib.get_close_matches(token.partition("=")[0], flags, n=1) if token.startswith("--") else []
        return f"{token} (did you mean {close[0]}?)" if close else token

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: run `{self.prog} -h` for the flags and defaults\n")


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already states its default or X is None (a flag
    whose absence means something says what in its help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BooleanFlag):  # --flag [BOOL], --no-flag
            return ", ".join(option if option in action.negatives else f"{option} [BOOL]"
                             for option in action.option_strings)
        return super()._format_action_invocation(action)


_TRUE_WORDS = ("true", "1", "yes", "y", "t")
_FALSE_WORDS = ("false", "0", "no", "n", "f")


def parse_bool(text: str) -> bool:
    """``True/False``, ``true/false``, ``1/0``, ``yes/no`` (the official scripts' ``str2bool``)."""
    word = str(text).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False (or true/false, 1/0, yes/no), got {text!r}")


class BooleanFlag(argparse.Action):
    """A boolean flag every way it is written: ``--flag`` (True), ``--no-flag`` (False) and
    ``--flag VALUE`` with VALUE as ``parse_bool`` reads it, as the official commands do
    (``--model_ema True``). Every alias gets its ``--no-`` form."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, help: Optional[str] = None,
                 **kwargs):
        negatives = [f"--no-{option[2:]}" for option in option_strings if option.startswith("--")]
        super().__init__([*option_strings, *negatives], dest, nargs="?", default=default, metavar="BOOL",
                         help=help, **kwargs)
        self.negatives = frozenset(negatives)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.negatives:
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value (got {values!r})")
            self.store(namespace, False)
            return
        try:
            self.store(namespace, True if values is None else parse_bool(values))
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentError(self, str(error)) from None

    def store(self, namespace: argparse.Namespace, value: bool) -> None:
        setattr(namespace, self.dest, value)


class UseAmpFlag(BooleanFlag):
    """The official ``--use_amp BOOL`` written onto ``--amp``: True -> ``auto`` (bf16 on CUDA GPUs
    that have it, fp16 on older ones; the official script's CUDA autocast does nothing on CPU,
    and neither does ``auto``), False -> ``none``."""

    def store(self, namespace: argparse.Namespace, value: bool) -> None:
        setattr(namespace, self.dest, "auto" if value else "none")


def optional_path(text: str) -> Optional[str]:
    """A path, or None for "" (the official scripts' "none" for --resume / --finetune)."""
    return text or None


def build_training_parser(description: str, demo_config: os.PathLike, recipe: str, recipe_blr: float,
                          recipe_configs: str) -> TrainingArgumentParser:
    """The parser of a training CLI with the flags both share. The help says what the script does
    (``description``), how its demo works (``demo_config`` gives the defaults without
    --data_path/--config), the blr used without --lr/--blr (``recipe_blr``, from ``recipe``) and
    where the per-size recipes are (``recipe_configs``)."""
    parser = TrainingArgumentParser(
        description=f"{description} Without --data_path (and --config) it runs a short CPU demo on embedded photos: "
                    f"{Path(demo_config).name} gives the defaults, flags override them.",
        epilog=f"With neither --lr nor --blr, blr is {recipe_blr} ({recipe}). "
               f"Per-size recipes: --config {recipe_configs}.",
    )
    return add_training_arguments(parser)


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags pretraining and fine-tuning share; returns ``parser``."""
    parser.add_argument("--config", type=str, default=None, metavar="FILE.yaml",
                        help="YAML file of defaults (keys = flag names without dashes); flags override it. "
                             "Without --config and --data_path the script's demo settings are the defaults")

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
                            "(default: the script's recipe value, when neither --lr nor --blr is given)")
    optim.add_argument("--min_lr", type=float, default=0.0, help="lr at the end of the cosine schedule")
    optim.add_argument("--weight_decay", type=float, default=0.05,
                       help="AdamW weight decay (never on norms, biases, GRN, mask token)")
    optim.add_argument("--clip_grad", type=float, default=None,
                       help="clip the gradient norm to this value (default: no clipping)")
    optim.add_argument("--amp", choices=AMP_MODES, default="auto",
                       help="autocast precision; fp16 adds a GradScaler. auto: bf16 on CUDA GPUs with bf16, "
                            "fp16 on older CUDA GPUs, none (fp32) on CPU and MPS")
    optim.add_argument("--compile", action=BooleanFlag, default=False, help="wrap the model in torch.compile")
    optim.add_argument("--max_skipped_updates", type=int, default=DEFAULT_MAX_SKIPPED_IN_ROW,
                       help="optimizer updates in a row skipped for inf/NaN gradients before the run stops "
                            "(a skipped update leaves the weights and optimizer state untouched)")

    data = parser.add_argument_group("data")
    data.add_argument("--data_path", type=str, default=None,
                      help="pretraining: a folder of images in any layout (<root>/train if present), or a text "
                           "file listing image paths; fine-tuning: class folders (<root>/train/<class>/*.jpg); "
                           "both: WebDataset shards ('train-{000000..000099}.tar', a list of shards, "
                           "'pipe:COMMAND') (default: the demo on embedded scikit-image photos)")
    data.add_argument("--embedded_samples", type=int, default=256,
                      help="random crops per epoch from the embedded photos (only without --data_path)")
    data.add_argument("--num_workers", type=int, default=None,
                      help="DataLoader worker processes per process (default: the CPUs available to each "
                           "process on this node, or in its Slurm task with --cpus-per-task, minus one, at most "
                           f"{MAX_DEFAULT_WORKERS})")
    data.add_argument("--pin_mem", action=BooleanFlag, default=None,
                      help="pinned host memory for batches (default: on with CUDA, else off)")
    data.add_argument("--fast_decode", action=BooleanFlag, default=False,
                      help="decode training JPEGs at 1/2-1/8 scale when the random crop still covers --input_size "
                           "there (PIL draft mode): the same crops, less decoding and resizing work")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=str, default="./output",
                     help="checkpoints, logs, exports; the demo and the configs/ files set their own")
    run.add_argument("--log_dir", type=str, default=None,
                     help="TensorBoard folder (default: <output_dir>/tensorboard)")
    run.add_argument("--resume", type=optional_path, default=None,
                     help="checkpoint file to resume from (default: the newest in --output_dir with --auto_resume)")
    run.add_argument("--auto_resume", action=BooleanFlag, default=True,
                     help="resume from the latest valid checkpoint in --output_dir")
    run.add_argument("--allow_layout_change", action=BooleanFlag, default=False,
                     help="resume a checkpoint written with another --batch_size, --update_freq or number of "
                          "processes (continues at the matching number of images; not as the original run would)")
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
                     help="cpu | cuda | cuda:<i> | mps (default: CUDA, then MPS, then CPU)")
    run.add_argument("--dist_timeout", type=int, default=1800,
                     help="seconds a process waits for the others (e.g. while rank 0 saves a checkpoint) "
                          "before a hung rank fails the job")
    run.add_argument("--cpu_threads", type=int, default=None,
                     help="torch threads per process on CPU (default: PyTorch's choice); 1 avoids "
                          "stalls on a busy or small machine")
    run.add_argument("--grad_checkpointing", "--use_checkpoint", action=BooleanFlag, default=False,
                     help="activation checkpointing: less memory, ~30%% more compute")

    tracking = parser.add_argument_group("experiment tracking", "besides TensorBoard (rank 0; a resumed run "
                                         "continues the same tracker runs)")
    tracking.add_argument("--log_wandb", action=BooleanFlag, default=False,
                          help="log to Weights & Biases (pip install wandb; WANDB_MODE=offline needs no login)")
    tracking.add_argument("--wandb_project", type=str, default=None,
                          help="W&B project (default: W&B's, or WANDB_PROJECT)")
    tracking.add_argument("--wandb_name", type=str, default=None, help="W&B run name (default: the --output_dir name)")
    tracking.add_argument("--wandb_tags", type=str, nargs="*", default=None, metavar="TAG", help="W&B run tags")
    tracking.add_argument("--mlflow_uri", type=str, default=None, metavar="URI",
                          help="log to MLflow at this tracking URI: a server (http://host:5000) or a local store "
                               "(sqlite:///path/mlflow.db) (pip install mlflow) (default: no MLflow)")
    tracking.add_argument("--mlflow_experiment", type=str, default="Default",
                          help="MLflow experiment (created if missing)")
    tracking.add_argument("--mlflow_run_name", type=str, default=None,
                          help="MLflow run name (default: the --output_dir name)")
    return parser


# ---------------------------------------------------------------- flags of the official scripts

@dataclass(frozen=True)
class OfficialFlag:
    """A flag of the official ConvNeXt-V2 scripts with no counterpart here, accepted so that their
    commands run unchanged. ``ours``: values that describe what this code does anyway (nothing to
    say). Other values are noted in the log as ignored, with ``reason``; or, for ``changes_recipe``
    flags (where ignoring the value would silently train something else), rejected."""

    names: tuple[str, ...]
    type: Callable[[str], Any]
    ours: tuple
    reason: str
    changes_recipe: bool = False
    nargs: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-")

    def check(self) -> "Check":
        return Check(self.names[0], lambda args: getattr(args, self.dest, self.ours[0]) in self.ours,
                     f"not supported: {self.reason}")


_ANY_VALUE_IS_IGNORED = ()  # ``ours`` of flags whose every value is noted

OFFICIAL_LAUNCHER_FLAGS: tuple[OfficialFlag, ...] = (
    OfficialFlag(("--local_rank", "--local-rank"), int, _ANY_VALUE_IS_IGNORED,
                 "the launcher's LOCAL_RANK environment variable gives the local rank"),
    OfficialFlag(("--world_size",), int, _ANY_VALUE_IS_IGNORED,
                 "the launcher's WORLD_SIZE environment variable gives the number of processes"),
    OfficialFlag(("--dist_url",), str, ("env://",),
                 "processes meet through the launcher's environment (env://: MASTER_ADDR, MASTER_PORT)"),
    OfficialFlag(("--dist_on_itp",), parse_bool, (False,),
                 "OpenMPI/ITP environments are not read; launch with torchrun (or submitit_*.py on Slurm)",
                 changes_recipe=True),
    OfficialFlag(("--start_epoch",), int, (0,),
                 "the start epoch comes from the checkpoint resumed (--resume or --auto_resume)"),
    OfficialFlag(("--save_ckpt",), parse_bool, (True,),
                 "checkpoints are always written (resuming needs them); --save_ckpt_freq sets how often"),
)


def official_flag_notes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Remove the official-only flags from ``args``; one line per value given that is not ours."""
    notes = []
    for flag in getattr(parser, "official_flags", ()):
        if hasattr(args, flag.dest):
            value = vars(args).pop(flag.dest)
            if value not in flag.ours:
                notes.append(f"{flag.names[0]} {value}: ignored; {flag.reason}")
    return notes


# ---------------------------------------------------------------- parsing with YAML defaults

_NOT_GIVEN = object()  # marks flags absent from the command line
NOT_FLAGS = ("config", "demo", "set_by_user", "notes")  # what parsing adds to the namespace besides the flags


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]] = None,
    exclusive: Iterable[tuple[str, str]] = (),
    demo_argv: Optional[Sequence[str]] = None,
) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` YAML values as defaults; exits with a message on errors.

    With ``demo_argv`` and neither ``--data_path`` nor ``--config`` in ``argv``, ``demo_argv`` goes
    first (so ``argv`` overrides it). Besides the flags, the namespace has ``demo`` (bool) and
    ``set_by_user`` (the flags the user set: on the command line or in their ``--config`` file)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    user_dests = _dests_given_on_command_line(parser, argv)
    demo = demo_argv is not None and not {"data_path", "config"} & user_dests
    if demo:
        argv = [*demo_argv, *argv]
    pre_parser = TrainingArgumentParser(prog=parser.prog, add_help=False)
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
    args = parser.parse_args(argv)
    args.demo = demo
    args.set_by_user = frozenset(user_dests | (set() if demo else set(yaml_values))) - {"config"}
    return args


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
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)  # --amp before --use_amp, which writes the same key
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
        if action.default is not None and action.default is not argparse.SUPPRESS:
            raise ConfigError(f"{where}: expected a value, got null (leave the key out for the default)")
        return None
    if isinstance(action, (BooleanFlag, argparse.BooleanOptionalAction)) or isinstance(action.const, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if takes_list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list such as [0.2, 0.8], got {value!r}")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ConfigError(f"{where}: expected {action.nargs} values, got {len(value)}")
        return [_convert_yaml_scalar(action, item, where) for item in value]
    return _convert_yaml_scalar(action, value, where)


def _convert_yaml_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (bool, list, dict)):
        raise ConfigError(f"{where}: expected one value for --{action.dest}, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))  # str() first: int("1.5") fails instead of truncating
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            type_name = getattr(action.type, "__name__", str(action.type))
            raise ConfigError(f"{where}: expected {type_name}, got {value!r}") from error
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _dests_given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
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
    """Raise ConfigError listing every failed check as ``--flag value: fix``, each flag once (its
    first failure: a non-finite float as such, since nan fails every other check too)."""
    reported = [dest for dest, value in vars(args).items() if _has_non_finite_float(value)]
    failures = [f"--{dest} {getattr(args, dest)!r}: must be a finite number" for dest in reported]
    for check in checks:
        dest = check.flag.lstrip("-")
        if dest not in reported and not check.is_valid(args):
            reported.append(dest)
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


def _one_device_per_local_process(args: argparse.Namespace) -> bool:
    """Under torchrun with several processes per node, each takes cuda:<LOCAL_RANK>: a fixed index
    would put every process on the same GPU."""
    return not (args.device and ":" in args.device and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1)


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
    Check("--max_skipped_updates", lambda a: a.max_skipped_updates >= 1,
          "must be >= 1 (updates in a row skipped for inf/NaN gradients before the run stops)"),
    Check("--clip_grad", lambda a: a.clip_grad is None or a.clip_grad > 0,
          "must be > 0 (leave it out for no clipping)"),
    Check("--data_path", lambda a: a.data_path is None or is_shard_source(a.data_path) or Path(a.data_path).exists(),
          "no such folder or file; give a folder of images, an ImageNet-style root (<root>/train/<class>/*.jpg), "
          "a text file listing images, or WebDataset shards (train-{000000..000099}.tar, pipe:COMMAND), or leave it "
          "out for the embedded photos"),
    Check("--embedded_samples", lambda a: a.embedded_samples >= 1, "must be >= 1"),
    Check("--num_workers", lambda a: a.num_workers is None or a.num_workers >= 0,
          "must be >= 0 (0 loads data in the main process; leave it out for a value fitting this machine)"),
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
    Check("--device", _one_device_per_local_process,
          "names one device, but torchrun runs several processes on this node and each uses the GPU of its "
          "LOCAL_RANK; pass --device cuda (or leave --device out)"),
    Check("--device", _valid_device, _DEVICE_FIX),
    Check("--dist_timeout", lambda a: a.dist_timeout >= 1,
          "must be >= 1 second, and longer than a checkpoint save takes (default 1800)"),
    Check("--cpu_threads", lambda a: a.cpu_threads is None or a.cpu_threads >= 1,
          "must be >= 1 (leave it out for PyTorch's default)"),
    Check("--log_wandb", lambda a: not a.log_wandb or importlib.util.find_spec("wandb") is not None,
          "the wandb package is not installed; pip install 'wandb>=0.19,<1' (or this package's [wandb] extra), "
          "or leave --log_wandb out"),
    Check("--mlflow_uri", lambda a: a.mlflow_uri is None or importlib.util.find_spec("mlflow") is not None,
          "the mlflow package is not installed; pip install 'mlflow>=3,<4' (or this package's [mlflow] extra), "
          "or leave --mlflow_uri out"),
)


# ---------------------------------------------------------------- defaults that depend on the hardware

def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_workers(cpus: int, local_world_size: int = 1) -> int:
    """DataLoader workers per process: this process's share of the ``cpus`` that ``local_world_size``
    training processes share, minus one (the process itself runs the training step and feeds the
    device), at most MAX_DEFAULT_WORKERS. 2 CPUs and one process: 1 worker; 8 GPUs on 96 CPUs: 10 each."""
    share = cpus // max(local_world_size, 1)
    return max(0, min(share - 1, MAX_DEFAULT_WORKERS))


def slurm_tasks_on_this_node() -> Optional[int]:
    """Tasks of this Slurm job step on this node: ``SLURM_STEP_TASKS_PER_NODE`` (else
    ``SLURM_TASKS_PER_NODE``), e.g. "4(x2),2" (4 on each of nodes 0 and 1, 2 on node 2), at
    ``SLURM_NODEID``; None outside Slurm or if unreadable."""
    layout = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    per_node: list[int] = []
    for part in filter(None, layout.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        per_node += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    return per_node[node] if node < len(per_node) else None


def cpu_share(affinity_cpus: int, local_world_size: int) -> tuple[int, int, str]:
    """(CPUs, training processes sharing them, what the CPUs are) for ``default_num_workers``.

    In a Slurm task with ``--cpus-per-task`` (``SLURM_CPUS_PER_TASK``; submitit's
    ``--cpus_per_task``): the task's CPUs (at most ``affinity_cpus``), shared by the training
    processes the task runs: one when each task is a process (submitit, ``srun``), all of them when
    one task runs torchrun (``local_world_size`` over the node's tasks). Slurm usually binds a task
    to its CPUs, so dividing the affinity mask by the node's processes would count them twice.
    Elsewhere: the affinity mask, shared by the node's ``local_world_size`` processes."""
    task_cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not task_cpus.isdigit():
        return affinity_cpus, local_world_size, "on this node"
    tasks = slurm_tasks_on_this_node() or 1
    processes = max(1, -(-local_world_size // tasks))  # ceil: torchrun in a task runs several
    return min(int(task_cpus), affinity_cpus), processes, "of this Slurm task"


def default_amp(device: torch.device | str, bf16_supported: Optional[bool] = None) -> str:
    """``--amp auto`` on ``device``: bf16 on CUDA GPUs with native bf16 (Ampere and later), fp16 on
    older CUDA GPUs, none (fp32) on CPU and MPS. ``bf16_supported`` None: ask the device."""
    device = torch.device(device)
    if device.type != "cuda":
        return "none"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if bf16_supported else "fp16"


def resolve_hardware_defaults(
    args: argparse.Namespace,
    device: torch.device | str,
    local_world_size: Optional[int] = None,
    cpus: Optional[int] = None,
    bf16_supported: Optional[bool] = None,
) -> list[str]:
    """Replace the machine-dependent defaults in ``args`` once the device is known: ``--amp auto``
    (``default_amp``), ``--num_workers`` not given (``default_num_workers`` over ``cpu_share`` of
    ``cpus``, this process's affinity mask, default ``available_cpus()``, and ``local_world_size``,
    default torchrun's LOCAL_WORLD_SIZE or 1), ``--pin_mem`` not given (on with CUDA). On CUDA also allow
    TF32 for FP32 matmuls and convolutions (what ``--amp none`` then computes in). Returns one
    line per value chosen here, for the log."""
    device = torch.device(device)
    chosen = []
    if args.amp == "auto":
        args.amp = default_amp(device, bf16_supported)
        chosen.append(f"--amp {args.amp} (auto on {device.type})")
    if args.num_workers is None:
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cpus, processes, where = cpu_share(available_cpus() if cpus is None else cpus, local_world_size)
        args.num_workers = default_num_workers(cpus, processes)
        chosen.append(f"--num_workers {args.num_workers} ({cpus} CPUs, {processes} training "
                      f"process{'' if processes == 1 else 'es'} {where})")
    if args.pin_mem is None:
        args.pin_mem = device.type == "cuda"
        chosen.append(f"--pin_mem {args.pin_mem}")
    if device.type == "cuda":
        set_tf32(matmul=True, conv=True)
        chosen.append("TF32 on for FP32 matmuls and convolutions")
    return chosen


# ---------------------------------------------------------------- resolved configuration

def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The flags' values (``vars(args)`` without ``NOT_FLAGS``), paths as strings: plain
    YAML/JSON/weights_only types."""
    return {
        key: (os.fspath(value) if isinstance(value, os.PathLike) else value)
        for key, value in vars(args).items() if key not in NOT_FLAGS
    }


def save_config(args: argparse.Namespace, path: str | os.PathLike, derived: Optional[dict] = None) -> Path:
    """Write the resolved configuration to ``path`` (atomically); reloadable with ``--config``."""
    header = ["# resolved configuration; rerun with: --config <this file>"]
    header += [f"# {key}: {value}" for key, value in (derived or {}).items()]
    text = "\n".join(header) + "\n" + yaml.safe_dump(config_dict(args), sort_keys=False)
    return atomic_write(path, lambda file: file.write(text.encode()))
