"""Training checkpoints that survive crashes: atomic files, keep-last-N, latest valid one.

* ``atomic_write(path, write_fn)``: ``write_fn(file)`` writes a temporary file in the same folder,
  which is flushed, fsynced and renamed over ``path`` (then the folder is fsynced): a reader sees
  the old file or the new one, never half of one. A failed write (disk full, read-only folder)
  removes the temporary file and raises ``OutputWriteError`` naming the file. A Ctrl-C during
  the write waits for it to finish (``engine.interrupts``), so it never breaks a save.
* ``save_checkpoint(state, output_dir, epoch, keep_last, updates=0)`` ->
  ``<output_dir>/checkpoint-<epoch>.pth`` (``epoch`` = epochs completed) or, inside an epoch,
  ``checkpoint-<epoch>-<updates>.pth`` (``updates`` optimizer updates into the next epoch). It then
  keeps the newest ``keep_last`` epoch checkpoints up to this one, removes every earlier mid-epoch
  one (they only serve resuming; a newer checkpoint supersedes them), never touches later files
  (e.g. from another run), and removes temporary files a process killed while saving left behind.
* ``checkpoint_paths(output_dir)``: checkpoint files, oldest first (by epoch, then updates).
* ``describe_progress(epochs, iterations)``: "2 epochs completed", "1 epoch and 40 iterations completed".
* ``load_checkpoint(path)``: ``torch.load(weights_only=True)`` on CPU; ``CheckpointError`` if the
  file is unreadable or lacks ``required_keys``.
* ``latest_valid_checkpoint(output_dir)`` -> (path, state) | None: the newest loadable one; each
  truncated or corrupt newer file is reported in a warning naming it.
* ``save_safetensors(state_dict, path, metadata)``: atomic safetensors export (e.g. the encoder).
* ``find_resume_checkpoint(args, info)`` -> (path, state) | None: ``--resume``, else with
  ``--auto_resume`` the newest valid checkpoint in ``--output_dir`` (the same file on every rank).
* ``checkpoint_kind(state)``: "pretraining", "fine-tuning" or "unknown", from the model's tensor
  names; ``other_kind_problem(...)`` says in one line that a checkpoint of the other kind cannot
  resume this script's run (the CLIs' ``check_checkpoint`` hooks add the remedy).
* ``check_run_layout(path, state, args, world_size)``: a checkpoint resumes exactly only with the
  batch size, accumulation and world size it was written with; another layout is refused with the
  fix, or (``--allow_layout_change``) continued at the matching number of images.
* ``restore_training_state(path, state, model, optimizer, stepper)``: weights, optimizer and
  stepper back in place (no RNG state: the training loop reseeds every RNG per micro-batch, and
  augmentations are seeded per sample, whatever ``--num_workers``).

State is plain data (tensors, numbers, strings, lists, dicts) so nothing in a file can run code.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Optional

import torch
from safetensors.torch import save as safetensors_bytes

from engine.distributed import broadcast_object
from engine.errors import ConfigError
from engine.interrupts import interrupts_deferred
from models.checkpoint import file_format

_logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)(?:-(\d+))?\.pth$")
REQUIRED_KEYS = ("model", "epoch")
TRAINING_KEYS = (*REQUIRED_KEYS, "optimizer")  # what resuming a training run reads
PRETRAINING, FINE_TUNING, UNKNOWN_KIND = "pretraining", "fine-tuning", "unknown"
WRITTEN_BY = {PRETRAINING: "pretrain.py", FINE_TUNING: "finetune.py"}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the cause."""


class OutputWriteError(OSError):
    """An output file could not be written; its previous version, if any, is untouched."""


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@interrupts_deferred()
def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write_fn(binary_file)`` so it is replaced all at once or not at all;
    a Ctrl-C meanwhile takes effect once the file is complete (``engine.interrupts``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as file:
            write_fn(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
            raise OutputWriteError(
                f"cannot write {path} ({error}); no partial file was left and the previous {path.name}, if any, "
                f"is untouched. Free space in {path.parent} or choose another --output_dir, then rerun the same "
                "command to resume from the last checkpoint."
            ) from error
        raise
    _fsync_directory(path.parent)
    return path


def checkpoint_name(epoch: int, updates: int = 0) -> str:
    return f"checkpoint-{epoch}-{updates}.pth" if updates else f"checkpoint-{epoch}.pth"


def _position(path: Path) -> tuple[int, int]:
    """(epochs completed, updates into the next epoch) of a checkpoint file name."""
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)), int(match.group(2) or 0)


def checkpoint_paths(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``output_dir``, oldest (fewest epochs, then updates) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted((path for path in output_dir.iterdir() if CHECKPOINT_PATTERN.match(path.name)), key=_position)


def save_checkpoint(state: Mapping[str, Any], output_dir: str | os.PathLike, epoch: int, keep_last: int,
                    updates: int = 0) -> Path:
    """Atomically write the checkpoint of (``epoch``, ``updates``); prune as the module docstring says."""
    path = atomic_write(Path(output_dir) / checkpoint_name(epoch, updates), lambda file: torch.save(dict(state), file))
    earlier = [old for old in checkpoint_paths(output_dir) if _position(old) < (epoch, updates)]
    earlier_epochs = [old for old in earlier if _position(old)[1] == 0]
    kept_epochs = earlier_epochs[max(len(earlier_epochs) - (keep_last - 1 if updates == 0 else keep_last), 0):]
    for old in earlier:
        if old not in kept_epochs:
            old.unlink(missing_ok=True)
    for orphan in Path(output_dir).glob(".checkpoint-*.pth.*.tmp"):  # from a process killed mid-save
        orphan.unlink(missing_ok=True)
    return path


def describe_progress(epochs: int, iterations: int = 0) -> str:
    """``2 epochs completed`` / ``1 epoch and 40 iterations completed``."""
    text = f"{epochs} epoch{'' if epochs == 1 else 's'}"
    if iterations:
        text += f" and {iterations} iteration{'' if iterations == 1 else 's'}"
    return f"{text} completed"


def load_checkpoint(path: str | os.PathLike, required_keys: Iterable[str] = REQUIRED_KEYS) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``; raise CheckpointError if unusable
    (naming what the file is when it is not a PyTorch checkpoint at all: text, empty, a folder...)."""
    try:
        kind = file_format(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(str(error)) from error
    if kind == "safetensors":
        raise CheckpointError(f"{path} is a safetensors file (weights only), not a training checkpoint: it cannot "
                              "resume a run; start from it with finetune.py --finetune, or pick a checkpoint-*.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, disallowed type, I/O error...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def latest_valid_checkpoint(
    output_dir: str | os.PathLike, required_keys: Iterable[str] = REQUIRED_KEYS
) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint in ``output_dir`` that loads, with its state; None if there is none."""
    required_keys = tuple(required_keys)
    for path in reversed(checkpoint_paths(output_dir)):
        try:
            return path, load_checkpoint(path, required_keys)
        except CheckpointError as error:
            _logger.warning("skipping unusable checkpoint %s (%s); trying the previous one", path, error)
    return None


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[Mapping[str, str]] = None
) -> Path:
    """Atomically write ``state_dict`` (CPU, contiguous copies) as a safetensors file."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    payload = safetensors_bytes(tensors, metadata=dict(metadata) if metadata else None)
    return atomic_write(path, lambda file: file.write(payload))


def check_run_layout(path: str | os.PathLike, state: Mapping[str, Any], args, world_size: int) -> int:
    """The micro-batch of the next epoch to resume at. A checkpoint continues exactly only with the
    batch size, accumulation and world size it was written with: a difference raises ConfigError
    naming what to restore, unless ``args.allow_layout_change``: then (with a warning) training
    continues at the first update boundary after as many images as the checkpoint had seen in
    that epoch, with the new effective batch (the lr, schedule and data order then differ from the
    uninterrupted run). Values an older checkpoint lacks are not compared."""
    config = state.get("config", {})
    saved = {"batch_size": config.get("batch_size"), "update_freq": config.get("update_freq"),
             "world_size": state.get("world_size")}
    current = {"batch_size": args.batch_size, "update_freq": args.update_freq, "world_size": world_size}
    differing = [name for name, value in saved.items() if value is not None and value != current[name]]
    iteration = int(state.get("iteration", 0))
    if not differing:
        return iteration
    change = ", ".join(f"{name} {saved[name]} -> {current[name]}" for name in differing)
    if not args.allow_layout_change:
        restore = [f"{saved[name]} processes (torchrun --nnodes x --nproc_per_node)" if name == "world_size"
                   else f"--{name} {saved[name]}" for name in differing]
        raise ConfigError(f"checkpoint {path} was written with another run layout ({change}): a run resumes exactly "
                          f"only as it was written; restore {' and '.join(restore)}, or pass --allow_layout_change to "
                          "continue with the new effective batch (the lr, schedule and data order then differ from "
                          "the uninterrupted run)")
    images = iteration * (saved["batch_size"] or args.batch_size) * (saved["world_size"] or world_size)
    images_per_update = args.batch_size * args.update_freq * world_size
    resumed_at = images // images_per_update * args.update_freq
    _logger.warning("resuming %s with another run layout (%s, --allow_layout_change): continuing at iteration %d of "
                    "the epoch; the effective batch, lr, updates per epoch and data order differ from the "
                    "uninterrupted run", path, change, resumed_at)
    return resumed_at


def find_resume_checkpoint(args, info) -> Optional[tuple[str, dict[str, Any]]]:
    """(path, state) to resume from: ``args.resume``, else with ``args.auto_resume`` the newest valid
    checkpoint in ``args.output_dir``, chosen on rank 0 so every rank reads the same file; None if none."""
    path = args.resume
    if path is None and args.auto_resume:
        found = latest_valid_checkpoint(args.output_dir) if info.is_main else None
        path = broadcast_object(str(found[0]) if found else None)
    if path is None:
        return None
    return str(path), load_checkpoint(path, TRAINING_KEYS)


def checkpoint_kind(state: Mapping[str, Any]) -> str:
    """What trained the checkpoint ``state``, from the tensor names of its "model" (or of ``state``
    itself): "pretraining" for an FCMAE (``mask_token``, ``encoder.*``: pretrain.py's checkpoints and
    the official pretraining code's), "fine-tuning" for a classifier (``head.fc.weight``:
    finetune.py's; ``head.weight``: the official fine-tuned layout), else "unknown" (e.g. an
    encoder alone)."""
    weights = state.get("model", state)
    names = set(weights) if isinstance(weights, Mapping) else set()
    if "mask_token" in names or any(name.startswith("encoder.") for name in names):
        return PRETRAINING
    if names & {"head.fc.weight", "head.weight"}:
        return FINE_TUNING
    return UNKNOWN_KIND


def other_kind_problem(path: str | os.PathLike, state: Mapping[str, Any], expected: str,
                       resumed: bool) -> Optional[str]:
    """None if the checkpoint at ``path`` is an ``expected`` one (or of unknown kind); else the start
    of a one-line error: what the file is, and that the ``expected`` script cannot resume it.
    ``resumed``: the user named the file with --resume (else --auto_resume found it in --output_dir)."""
    kind = checkpoint_kind(state)
    if kind in (expected, UNKNOWN_KIND):
        return None
    where = f"--resume {path} is" if resumed else f"--output_dir holds {path} (found by --auto_resume),"
    return f"{where} a {kind} checkpoint (written by {WRITTEN_BY[kind]}), which {WRITTEN_BY[expected]} cannot resume"


def restore_training_state(path: str, state: Mapping[str, Any], model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, stepper) -> None:
    """Put a checkpoint's model, optimizer and stepper (``load_state_dict``) back."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    stepper.load_state_dict(state.get("stepper", {}))
    _logger.info("resumed from %s (%s)", path, describe_progress(state["epoch"], state.get("iteration", 0)))
