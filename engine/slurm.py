"""Slurm jobs through submitit: what ``submitit_pretrain.py`` and ``submitit_finetune.py`` share.

    python submitit_pretrain.py --nodes 8 --ngpus 8 --job_dir /shared/fcmae_base <pretrain.py flags>

* ``launch(script, checks_name, argv)``: ``plan_job`` splits the launcher flags
  (``--nodes``, ``--ngpus``, ``--timeout``, ``--partition``, ...) from the training flags and
  checks both here, before the job waits in the queue; ``executor_parameters`` turns the launcher
  flags into submitit's (one task per GPU); returns the submitted job.
* ``SlurmTraining(script, argv, output_dir)``: the submitted callable. Each task
  exports the torch.distributed variables of ``engine.distributed`` (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` = the job's first node, ``MASTER_PORT``
  derived from the job id) from ``submitit.JobEnvironment`` and runs the script's ``main(argv)``.
* ``load_script(path)``: a CLI script as a module (``finetune.py`` cannot be imported by name:
  ``finetune`` is the package).
* ``--output_dir`` defaults to ``--job_dir`` (``%j`` in either is the Slurm job id, which a
  requeued job keeps), so a requeued job finds its checkpoints and resumes (``--auto_resume``).

Preemption and time limits. Slurm sends submitit's signal (``SIGUSR2``, 120 s before the time
limit: ``--signal=USR2@120``; ``SUBMITIT_PREEMPT_SIGNAL`` picks another) to every task.
submitit's own handler would call ``checkpoint()`` and requeue at once, from inside whatever
the main thread was doing: the training would be cut off mid-step, with no chance to save, since
training and handler share that thread. So each task replaces that handler before the training
starts (before its DataLoader forks workers, which inherit it: Slurm signals every process of the
job step, and a worker left with the default action would die):

1. the signal calls ``engine.signals.request_stop``, like the SIGTERM/SIGUSR1 handlers of the
   runner; the ranks agree to stop at the next update boundary, rank 0 writes a complete
   checkpoint, and ``main`` exits with ``EXIT_STOPPED`` (3);
2. only then does rank 0 call the handler submitit had installed, as if the signal had just
   arrived: it calls ``checkpoint()`` (the same command, plus ``--auto_resume``, minus a
   ``--resume FILE`` once ``--output_dir`` holds checkpoints), writes it as the job's new
   submission, requeues the job (``scontrol requeue``; at most 30 times for time limits) and
   exits. The other ranks exit with ``EXIT_STOPPED``; the requeue ends the job's remaining tasks;
3. the requeued job starts every task afresh and resumes from the newest checkpoint.

SIGTERM and SIGUSR1 (``scancel``, preemption without submitit's signal, ``--signal=USR1@90``)
stop and save the same way but do not requeue, as in submitit: a cancelled job stays
cancelled; the same command (same ``--job_dir`` or ``--output_dir``) resumes it.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shutil
import signal
import sys
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .checkpoint import checkpoint_paths
from .config import DefaultsOnceHelpFormatter, TrainingArgumentParser

MAX_TIMEOUT_REQUEUES = 30  # time-limit requeues before the job is left to end (as the official launcher)
SIGNAL_DELAY_S = 120  # submitit's signal this long before the time limit: time to finish a step and save
MEM_GB_PER_GPU = 40
DEFAULT_JOB_DIR = "output/submitit/%j"
NODE_CHECKED_FLAGS = ("--device",)  # checked on the compute nodes: the login node may have no GPU


def build_launcher_parser() -> argparse.ArgumentParser:
    """The launcher's own flags (the official submitit_*.py ones, plus --cluster, --tasks_per_node,
    --cpus_per_task, --mem_gb); everything else is a training flag."""
    parser = TrainingArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("Slurm job (submitit)")
    group.add_argument("--nodes", type=int, default=1, help="nodes to request")
    group.add_argument("--ngpus", type=int, default=8, help="GPUs per node; one task (process) per GPU")
    group.add_argument("--tasks_per_node", type=int, default=None,
                       help="processes per node (default: --ngpus, or 1 without GPUs)")
    group.add_argument("--cpus_per_task", type=int, default=10, help="CPU cores per process (data loading)")
    group.add_argument("--mem_gb", type=float, default=None, help=f"memory per node (default: {MEM_GB_PER_GPU} "
                                                                   "per GPU; none requested without GPUs)")
    group.add_argument("--timeout", type=int, default=4320,
                       help="time limit of one job in minutes; the job is requeued when it hits it")
    group.add_argument("--partition", type=str, default=None, help="Slurm partition (default: the cluster's)")
    group.add_argument("--comment", type=str, default=None, help="comment attached to the job")
    group.add_argument("--use_volta32", action="store_true", help="request 32 GB V100s (--constraint volta32gb)")
    group.add_argument("--job_dir", type=str, default=DEFAULT_JOB_DIR,
                       help="folder on a filesystem every node shares, for submitit's logs and (unless "
                            "--output_dir is given) the checkpoints; %%j = the job id")
    group.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                       help="local: run the same job as processes on this machine (to try it out)")
    return parser


def check_launcher_flags(launch: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Exit 2 naming the flag when the job cannot be what was asked for."""
    problems = [f"--{name} {getattr(launch, name)}: must be >= {low}"
                for name, low in (("nodes", 1), ("ngpus", 0), ("tasks_per_node", 1), ("cpus_per_task", 1),
                                  ("timeout", 1)) if getattr(launch, name) is not None and getattr(launch, name) < low]
    if launch.cluster == "local" and launch.nodes != 1:
        problems.append(f"--nodes {launch.nodes}: --cluster local runs on this machine only; use --nodes 1")
    if launch.cluster == "slurm" and shutil.which("srun") is None:
        problems.append("--cluster slurm: Slurm's srun is not on PATH; submit from a Slurm login node, "
                        "or pass --cluster local to run the job on this machine")
    if problems:
        parser.error("; ".join(problems))


def distributed_environment(job_id: str, rank: int, local_rank: int, world_size: int, num_nodes: int,
                            first_host: str) -> dict[str, str]:
    """The variables ``engine.distributed.init_distributed`` reads, as torchrun would set them.
    The port is derived from the job id: the same after a requeue, rarely the same for two jobs."""
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size // num_nodes), "MASTER_ADDR": first_host,
            "MASTER_PORT": str(10000 + zlib.crc32(job_id.encode()) % 20000)}


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` with every ``flag VALUE`` and ``flag=VALUE`` removed."""
    kept: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token == flag:
            skip_value = True
        elif not token.startswith(flag + "="):
            kept.append(token)
    return kept


def load_script(path: str | os.PathLike):
    """The module of the script at ``path``, registered as ``<stem>_cli``; its folder goes on
    ``sys.path`` first, so it imports the packages beside it."""
    path = Path(path).resolve()
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name = f"{path.stem}_cli"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def given_on_command_line(argv: Sequence[str], flag: str) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


class SlurmTraining:
    """One task of the job: ``main(argv + ["--output_dir", output_dir])`` of the CLI ``script``
    under torch.distributed, stopping, saving and requeueing on submitit's signal (module
    docstring). ``output_dir`` may hold ``%j`` (the job id)."""

    def __init__(self, script: str, argv: Sequence[str], output_dir: str):
        self.script = script
        self.argv = list(argv)
        self.output_dir = output_dir

    def __call__(self):
        import submitit
        from engine.signals import EXIT_STOPPED, request_stop

        job = submitit.JobEnvironment()
        os.environ.update(distributed_environment(job.job_id, job.global_rank, job.local_rank, job.num_tasks,
                                                  job.num_nodes, job.hostnames[0]))
        main = load_script(self.script).main

        preemption = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
        requeue = signal.getsignal(preemption)  # submitit's checkpoint-and-requeue handler
        received = []

        def stop_and_save(signum, frame):
            received.append(signum)
            request_stop(f"{signal.Signals(signum).name} from Slurm (time limit or preemption)")

        signal.signal(preemption, stop_and_save)
        try:
            return main([*self.argv, "--output_dir", self.output_dir.replace("%j", job.job_id)])
        except SystemExit as stop:
            if stop.code == EXIT_STOPPED and received and job.global_rank == 0 and callable(requeue):
                requeue(preemption, None)  # checkpoint() and requeue; exits
            raise

    def checkpoint(self):
        """What submitit submits again on requeue: the same run, resuming from its newest checkpoint."""
        from submitit import JobEnvironment
        from submitit.helpers import DelayedSubmission

        resumed = copy.copy(self)
        if checkpoint_paths(self.output_dir.replace("%j", JobEnvironment().job_id)):
            resumed.argv = without_flag(self.argv, "--resume")  # the run's own checkpoints are newer
        resumed.argv = [*resumed.argv, "--auto_resume"]
        return DelayedSubmission(resumed)


def plan_job(script: str | os.PathLike, build_parser: Callable[[], argparse.ArgumentParser], checks: Iterable,
             argv: Sequence[str]) -> tuple[argparse.Namespace, SlurmTraining]:
    """(launcher flags, the callable to submit) for ``argv``; exits 2 naming the problem when a
    launcher or training flag is wrong (``checks`` run on the training flags, but for those of the
    compute nodes' hardware), 0 after ``-h``."""
    from engine.cli import parse_and_validate

    launcher = build_launcher_parser()
    if "-h" in argv or "--help" in argv:
        argparse.ArgumentParser(prog=Path(sys.argv[0]).name, parents=[launcher, build_parser()], add_help=False,
                                description=f"Submit {Path(script).name} as a Slurm job through submitit.",
                                formatter_class=DefaultsOnceHelpFormatter).print_help()
        sys.exit(0)
    launch_args, training_argv = launcher.parse_known_args(argv)
    check_launcher_flags(launch_args, launcher)
    training_parser = build_parser()
    training_argv = training_parser.canonical_flags(training_argv)  # --output-dir is --output_dir below
    training = parse_and_validate(training_parser, training_argv,
                                  [check for check in checks if check.flag not in NODE_CHECKED_FLAGS])
    output_dir = training.output_dir if given_on_command_line(training_argv, "--output_dir") else launch_args.job_dir
    return launch_args, SlurmTraining(str(Path(script).resolve()), training_argv, str(Path(output_dir).absolute()))


def executor_parameters(launch: argparse.Namespace, name: str) -> dict:
    """submitit's ``update_parameters`` for the launcher flags: one task per GPU (or
    ``--tasks_per_node``), memory per GPU, submitit's signal ``SIGNAL_DELAY_S`` before the limit."""
    mem_gb = launch.mem_gb if launch.mem_gb is not None else MEM_GB_PER_GPU * launch.ngpus or None
    return dict(name=name, nodes=launch.nodes, gpus_per_node=launch.ngpus or None,
                tasks_per_node=launch.tasks_per_node or max(launch.ngpus, 1), cpus_per_task=launch.cpus_per_task,
                mem_gb=mem_gb, timeout_min=launch.timeout, slurm_partition=launch.partition,
                slurm_comment=launch.comment, slurm_constraint="volta32gb" if launch.use_volta32 else None,
                slurm_signal_delay_s=SIGNAL_DELAY_S)


def launch(script: str | os.PathLike, checks_name: str, argv: Optional[Sequence[str]] = None):
    """Submit the CLI ``script`` (its ``main``) as a Slurm job, or as processes here with
    ``--cluster local``, once ``plan_job`` passed its flags (``build_parser()`` and
    ``TRAINING_CHECKS`` + the script's ``checks_name`` table); returns the submitit job."""
    import submitit

    from engine.config import TRAINING_CHECKS

    cli = load_script(script)
    launch_args, training = plan_job(script, cli.build_parser, TRAINING_CHECKS + getattr(cli, checks_name),
                                     list(sys.argv[1:] if argv is None else argv))
    executor = submitit.AutoExecutor(folder=Path(launch_args.job_dir).absolute(), cluster=launch_args.cluster,
                                     slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES,
                                     local_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    parameters = executor_parameters(launch_args, Path(script).stem)
    executor.update_parameters(**parameters)
    job = executor.submit(training)
    print(f"submitted job {job.job_id}: {launch_args.nodes} node(s) x {parameters['tasks_per_node']} task(s), "
          f"checkpoints in {training.output_dir.replace('%j', job.job_id)}, logs in {job.paths.folder}")
    return job
