"""Every command of README.md's ```bash blocks runs as written, in README order (later commands use
what earlier ones wrote), in a scratch copy of the repository.

What a command needs and this machine lacks is stood in for: ``STAND_INS`` replaces the paths of
data sets, shared folders and downloads, ``scale_down`` appends flags that make the run small
(later flags win), torchrun starts one process instead of one per GPU, and the Slurm launchers run
their job on submitit's local executor. ``SKIPPED`` lists the commands that cannot run here, each
with the reason. A README command that matches no rule fails the test: say here how to run it.

Python programs run in this process (``main(argv)``, as ``python X.py`` / ``python -m X`` would
call it) so the test pays the imports once; torchrun commands run as subprocesses. A command's
leading ``NAME=value`` assignments (``WANDB_MODE=offline python ...``) set the environment for it alone.
"""
from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from checkpoint_layouts import randomised_model, write_layout
from engine.slurm import load_script
from finetune_helpers import make_colour_folder

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 600  # also torchrun's

# (what a README command starts with, why it does not run here)
SKIPPED = (
    (["pip", "install"], "installs packages; .ci/run runs the README's test command itself"),
    (["bash", "scripts/install_minkowski.sh"], "builds MinkowskiEngine (10 minutes); .ci/run runs it"),
    (["python", "-m", "pytest"], "the test suite itself; .ci/run runs it"),
    (["bash", "scripts/gpu_check.sh"], "needs a CUDA GPU"),
    (["torchrun", "--nnodes=N"], "needs several machines (N, R and HOST:PORT stand for them)"),
)
# what the README assumes a user has -> what stands in for it here ({scratch}: the scratch folder)
STAND_INS = {
    "/data/imagenette2-224": "{scratch}/data/imagenet",  # ImageNet-style folders: 4 colours, train/ and val/
    "/data/imagenet": "{scratch}/data/imagenet",
    "/data/my_images": "{scratch}/data/imagenet",  # small images: the same folders (the commands set 128 px)
    "/data/xray": "{scratch}/data/xray",  # 16-bit grayscale PNGs
    "/data/rgbi": "{scratch}/data/rgbi",  # 4-channel .npy arrays
    "/path/to/imagenet-1k": "{scratch}/data/imagenet",
    "/shared/": "{scratch}/shared/",  # a filesystem every Slurm node shares
    "/data/shards/": "{scratch}/data/shards/",  # what the README's engine.shard_writer commands write
}
# files the README's commands read from the current folder, made in setup_scratch:
#   convnextv2_base_1k_224_fcmae.pt and convnextv2_atto_1k_224_fcmae.pt (the official downloads, here
#   atto encoders in their layout),
#   photo.jpg and more_photos/ (the user's pictures)
CPU = ["--num_workers", "0", "--device", "cpu"]
TRAIN_SMALL = ["--model", "convnextv2_atto", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4",
               "--update_freq", "1", *CPU]


def scale_down(program: str, argv: list[str]) -> list[str]:
    """Flags appended to ``program``'s README arguments to run it on a CPU in seconds."""
    demo = "--data_path" not in argv and "--config" not in argv
    if program == "pretrain.py":  # the demo keeps its epochs (its checkpoints are used below), on less data
        return ["--embedded_samples", "4", "--batch_size", "4", "--input_size", "64", *CPU] if demo else \
            [*TRAIN_SMALL, "--input_size", "64", "--knn_max_images", "4"]
    if program == "finetune.py":
        if "--eval" in argv:  # the model and input size come from the checkpoint
            return ["--batch_size", "4", *CPU]
        return [*TRAIN_SMALL, "--input_size", "32", *(["--embedded_samples", "8"] if demo else [])]
    if program in ("finetune.linear_probe", "finetune.knn", "finetune.features"):
        return ["--input_size", "64", "--batch_size", "4", *CPU] + (["--epochs", "2"] if "probe" in program else [])
    if program == "fcmae.visualize":
        return ["--device", "cpu"]
    if program == "engine.shard_writer":  # writes the stand-in folders' few images
        return []
    if program.startswith("submitit_"):  # the job runs here, as one CPU process
        launcher = ["--cluster", "local", "--nodes", "1", "--ngpus", "0", "--cpus_per_task", "1", "--timeout", "10"]
        return launcher + scale_down(program.removeprefix("submitit_"), argv)
    raise AssertionError(f"no rule for {program}: add one to scale_down in {Path(__file__).name}")


def readme_commands() -> list[list[str]]:
    """The commands of README.md's ```bash blocks in order, each as its arguments (comments dropped,
    continuation lines joined, ``&&`` chains split)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            command: list[str] = []
            for token in shlex.split(line, comments=True) + ["&&"]:
                if token != "&&":
                    command.append(token)
                elif command:
                    commands.append(command)
                    command = []
    return commands


def skip_reason(command: list[str]) -> str | None:
    return next((reason for prefix, reason in SKIPPED if command[:len(prefix)] == prefix), None)


def setup_scratch(scratch: Path) -> None:
    """A copy of the repository's files (tracked and new), the stand-in data and downloads."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if (REPO / name).is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, scratch / name)
    make_colour_folder(scratch / "data" / "imagenet" / "train", per_class=2, size=40)
    make_colour_folder(scratch / "data" / "imagenet" / "val", per_class=1, size=40, seed=1)
    for name in ("convnextv2_base_1k_224_fcmae.pt", "convnextv2_atto_1k_224_fcmae.pt"):
        write_layout("official_fcmae", randomised_model("convnextv2_atto"), scratch).rename(scratch / name)
    rng = np.random.default_rng(0)
    for index in range(4):
        (scratch / "data" / "xray").mkdir(parents=True, exist_ok=True)
        gray = (rng.random((48, 48)) * 65535).astype(np.uint16)
        Image.fromarray(gray).save(scratch / "data" / "xray" / f"{index}.png")
        (scratch / "data" / "rgbi").mkdir(parents=True, exist_ok=True)
        np.save(scratch / "data" / "rgbi" / f"{index}.npy", rng.random((48, 48, 4)).astype(np.float32))
    make_colour_folder(scratch / "more_photos", classes=("red", "blue"), per_class=1, size=80)
    shutil.copy(scratch / "more_photos" / "red" / "0.png", scratch / "photo.jpg")


def run_in_process(program: str, argv: list[str]) -> None:
    """``python <program> argv`` (a script) or ``python -m <program> argv`` (a module) in this process."""
    module = load_script(REPO / program) if program.endswith(".py") else importlib.import_module(program)
    result = module.main(argv)
    if program.startswith("submitit_"):  # the local job: wait for it, then its outcome (raises if it failed)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not result.done():
            if time.monotonic() > deadline:
                result.cancel()
                raise AssertionError(f"the job did not finish in {JOB_TIMEOUT_S} s")
            time.sleep(0.5)
        result.result()


def run_torchrun(command: list[str], scratch: Path) -> None:
    """The README's torchrun command with one process (``--nproc_per_node`` 1) on a free port
    (``--standalone``), as a subprocess in ``scratch``."""
    script_at = next(index for index, token in enumerate(command) if token.endswith(".py"))
    launcher = []
    for token in command[1:script_at]:
        one_process = launcher[-1:] == ["--nproc_per_node"] or token.startswith("--nproc_per_node=")
        launcher.append(re.sub(r"\d+$", "1", token) if one_process else token)
    script, argv = command[script_at], command[script_at + 1:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher, script, *argv,
                             *scale_down(script, argv)], cwd=scratch, capture_output=True, text=True,
                            timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def with_stand_ins(token: str, scratch: Path) -> str:
    """``token`` with the first ``STAND_INS`` placeholder it holds replaced."""
    for placeholder, stand_in in STAND_INS.items():
        if placeholder in token:
            return token.replace(placeholder, stand_in.format(scratch=scratch))
    return token


def run_command(command: list[str], scratch: Path) -> None:
    """One README command (placeholders replaced), by the rules of the module docstring."""
    if command[0] == "torchrun":
        run_torchrun(command, scratch)
    elif command[:2] == ["python", "-m"]:
        run_in_process(command[2], command[3:] + scale_down(command[2], command[3:]))
    elif command[0] == "python" and command[1].endswith(".py"):
        run_in_process(command[1], command[2:] + scale_down(command[1], command[2:]))
    else:
        raise AssertionError("no rule to run it here: add one to this test")


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    scratch = tmp_path / "repo"
    setup_scratch(scratch)
    monkeypatch.chdir(scratch)
    repository_outputs = sorted(REPO.glob("output/**/*"))
    ran, skipped = [], []
    for command in readme_commands():
        written = shlex.join(command)
        reason = skip_reason(command)
        if reason is not None:
            skipped.append(f"{written}: {reason}")
            continue
        command = [with_stand_ins(token, scratch) for token in command]
        environment = {}  # a command's leading NAME=value assignments, for it alone
        while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", command[0]):
            name, _, value = command.pop(0).partition("=")
            environment[name] = value
        start = time.perf_counter()
        try:
            with monkeypatch.context() as scoped:
                for name, value in environment.items():
                    scoped.setenv(name, value)
                run_command(command, scratch)
        except SystemExit as stop:
            if stop.code:
                pytest.fail(f"README command failed (exit code {stop.code}): {written}")
        except Exception as error:
            raise AssertionError(f"README command failed: {written}") from error
        ran.append(f"{time.perf_counter() - start:5.1f} s  {written}")
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    unused = [" ".join(prefix) for prefix, _ in SKIPPED if not any(line.startswith(" ".join(prefix))
                                                                  for line in skipped)]
    assert not unused, f"SKIPPED rules no README command needs any more: {unused}"
    assert len(ran) >= 15
    assert sorted(REPO.glob("output/**/*")) == repository_outputs, "a README command wrote into the repository"

