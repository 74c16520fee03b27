"""Helpers for the fault-injection tests (no tests here): tiny command lines, subprocesses,
killing a process at a chosen moment, broken image files, and a pickle that runs code."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# one thread everywhere: bitwise-equal numbers between processes, no stalls on a busy machine;
# faulthandler on, so a process that hangs can be made to print where (``exit_code``)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                  "PYTHONPATH": str(REPO)}
POLL_S = 0.002

# 8 images, batch 2: 4 iterations per epoch, a progress line after each
COMMON = ["--model", "convnextv2_atto", "--batch_size", "2", "--warmup_epochs", "1", "--print_freq", "1",
          "--save_ckpt_freq", "1", "--seed", "7", "--device", "cpu"]


def pretrain_args(data: Path, output: Path, *extra: str, epochs: int = 3, workers: int = 0) -> list[str]:
    return [*COMMON, "--input_size", "64", "--blr", "1e-2", "--epochs", str(epochs), "--num_workers", str(workers),
            "--data_path", str(data), "--output_dir", str(output), "--save_ckpt_num", "2", "--cpu_threads", "1",
            *extra]


def finetune_args(data: Path, output: Path, *extra: str, epochs: int = 3, workers: int = 0) -> list[str]:
    """The full stochastic recipe (RandAugment, random erasing, Mixup/CutMix, drop path, EMA) at 32 px."""
    return [*COMMON, "--input_size", "32", "--lr", "2e-3", "--epochs", str(epochs), "--num_workers", str(workers),
            "--data_path", str(data), "--output_dir", str(output), "--save_ckpt_num", "2",
            "--layer_decay", "0.9", "--layer_decay_type", "single", "--drop_path", "0.1", "--model_ema_decay", "0.9",
            *extra]


def cli_module(cli: str):
    """The module of ``pretrain.py`` or ``finetune.py`` (its ``main`` and ``make_loss_fn``)."""
    import pretrain
    from finetune_helpers import load_finetune_script

    return pretrain if cli == "pretrain" else load_finetune_script()


def cli_args(cli: str, pretrain_data: Path, finetune_data: Path, output: Path, *extra: str, **kwargs) -> list[str]:
    """``pretrain_args`` or ``finetune_args`` on that CLI's data."""
    make = pretrain_args if cli == "pretrain" else finetune_args
    return make(pretrain_data if cli == "pretrain" else finetune_data, output, *extra, **kwargs)


STARTED: list[subprocess.Popen] = []  # stopped by ``stop_started_processes`` if a test leaves them running


def start_command(command: list[str], log: Path) -> subprocess.Popen:
    """``command`` with its output to ``log``, in ``log``'s folder and a process group of its own;
    stopped by ``stop_started_processes`` if a test leaves it running."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=output, stderr=subprocess.STDOUT,
                                   cwd=log.parent, start_new_session=True)
    STARTED.append(process)
    return process


def start_script(script: str, args: list[str], log: Path, torchrun: int = 0,
                 *launcher_flags: str) -> subprocess.Popen:
    """``python <script> args`` (under ``torch.distributed.run --standalone`` with ``torchrun``
    processes and ``launcher_flags``), output to ``log``."""
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *launcher_flags]
                if torchrun else [])
    return start_command([sys.executable, *launcher, str(REPO / script), *args], log)


def stop_started_processes() -> None:
    """SIGKILL every started process still running (not yet reaped, so its id is ours), its process
    group and its children (torchrun starts each worker in a session of its own)."""
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            for child in child_pids(process.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def exit_code(process: subprocess.Popen, log: Path, timeout: float) -> int:
    """``process``'s exit code once it ends; if it runs past ``timeout``, fail with every thread's
    stack (SIGABRT: faulthandler prints them to ``log``) and the end of ``log``."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        process.wait()
        raise AssertionError(f"still running {timeout} s later; its stacks and output:\n{log.read_text()[-8000:]}")


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait for ``process``; fail with the end of its output unless it exited 0."""
    code = exit_code(process, log, timeout)
    assert code == 0, f"exit code {code}:\n{log.read_text()[-4000:]}"


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, log: Path, what: str,
               timeout: float = 240) -> None:
    """Poll ``condition()`` until it holds; fail if ``process`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process ended (exit {process.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(POLL_S)


def sigkill(process: subprocess.Popen) -> None:
    """SIGKILL, as when a node dies: no handler, no cleanup, no flushing."""
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"process ended by itself (exit {process.returncode})"


def log_contains(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.is_file() and text in path.read_text()


_PROGRESS = re.compile(r"epoch (\d+)/\d+ \[\s*(\d+)/\d+\]  loss (\S+) \(\S+\)  lr (\S+)")


def progress_by_iteration(log_text: str) -> dict[tuple[int, int], tuple[str, str]]:
    """(epoch, iteration) -> (loss, lr) as printed; the last line wins (a resumed run redoes iterations)."""
    return {(int(epoch), int(it)): (loss, lr) for epoch, it, loss, lr in _PROGRESS.findall(log_text)}


def assert_states_equal(actual: dict, expected: dict, what: str) -> None:
    """Every tensor bitwise equal (same deterministic CPU kernels, same order of operations)."""
    assert actual.keys() == expected.keys(), f"{what}: different entries"
    for name, tensor in expected.items():
        if isinstance(tensor, dict):
            assert_states_equal(actual[name], tensor, f"{what}.{name}")
        elif isinstance(tensor, torch.Tensor):
            assert torch.equal(actual[name], tensor), \
                f"{what}: {name} differs by up to {(actual[name].double() - tensor.double()).abs().max():.3g}"
        else:
            assert actual[name] == tensor, f"{what}: {name} is {actual[name]!r}, expected {tensor!r}"


def child_pids(parent_pid: int) -> list[int]:
    """Processes whose parent is ``parent_pid`` (Linux /proc; empty elsewhere)."""
    children = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            parent = re.search(r"^PPid:\s+(\d+)", (entry / "status").read_text(), re.MULTILINE)
        except OSError:  # the process ended meanwhile
            continue
        if parent and int(parent.group(1)) == parent_pid:
            children.append(int(entry.name))
    return children


def process_with_rank(parent_pid: int, rank: int) -> Optional[int]:
    """PID of the child of ``parent_pid`` (torchrun's agent) whose environment has ``RANK=<rank>``."""
    for pid in child_pids(parent_pid):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment:
            return pid
    return None


# ---------------------------------------------------------------- broken and unusual image files

def png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, with no pixel data (a decompression bomb's shape)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def write_unusual_images(folder: Path, seed: int = 0) -> list[str]:
    """Readable images in every awkward format (grayscale, RGBA, 16-bit, 1-bit, palette with and
    without transparency, CMYK, float TIFF, 5x5 and 1x1 pixels); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    transparent_palette = Image.fromarray(rgb).convert("P")
    transparent_palette.info["transparency"] = 0
    images = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., 1]])),
        "deep16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "bilevel.png": Image.fromarray(rgb[..., 0] > 128),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "palette_transparent.png": transparent_palette,
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "float32.tif": Image.fromarray(rgb[..., 0].astype(np.float32) / 255),
        "tiny5x5.jpg": Image.fromarray(rgb[:5, :5]),
        "one_pixel.png": Image.fromarray(rgb[:1, :1]),
    }
    for name, image in images.items():
        image.save(folder / name)
    return sorted(images)


def write_broken_images(folder: Path, seed: int = 0) -> list[str]:
    """Files with image names that cannot be decoded (truncated JPEG, empty, text, a PNG claiming
    10^10 pixels); plus a README.txt that is no image at all. Returns the broken names."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / f".source-{seed}.jpg"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(good)
    jpeg = good.read_bytes()
    good.unlink()
    broken = {"truncated.jpg": jpeg[: len(jpeg) // 2], "empty.jpg": b"", "text.png": b"just some text",
              "bomb.png": png_claiming_size(100_000, 100_000)}
    for name, payload in broken.items():
        (folder / name).write_bytes(payload)
    (folder / "README.txt").write_text("not an image extension: ignored by ImageFolder")
    return sorted(broken)


# ---------------------------------------------------------------- a file that runs code when unpickled

class CreatesMarkerWhenUnpickled:
    """Unpickling this calls ``Path(marker).touch()``: any loader that lets it through runs code."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)
