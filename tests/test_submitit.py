"""submitit_pretrain.py: the launcher's flags and submission (fast), then real jobs on submitit's
local executor (slow): two gloo tasks on CPU, as a 2-GPU Slurm job would run; a job preempted
through submitit's signal saves, requeues and resumes to the same weights. Both jobs take the same
flags; the first runs straight through and is the reference.
"""
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import load_checkpoint
from engine.config import TRAINING_CHECKS
from engine.slurm import SlurmTraining, distributed_environment, executor_parameters, load_script, plan_job
from image_folders import make_image_folder
from reliability.faults import REPO, assert_states_equal, child_pids, log_contains, pretrain_args

submitit = pytest.importorskip("submitit")

import submitit_pretrain  # noqa: E402

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds task processes through /proc")


def plan(argv):
    cli = load_script(REPO / "pretrain.py")
    return plan_job(REPO / "pretrain.py", cli.build_parser, TRAINING_CHECKS + cli.PRETRAIN_CHECKS, argv)


def test_launcher_flags_are_split_off_and_checkpoints_go_to_the_job_dir(tmp_path):
    launch, training = plan(["--nodes", "1", "--ngpus", "0", "--model", "convnextv2_atto", "--cluster", "local",
                             "--epochs", "50", "--job_dir", str(tmp_path / "job_%j")])
    assert (launch.nodes, launch.ngpus, launch.cluster) == (1, 0, "local")
    assert training.argv == ["--model", "convnextv2_atto", "--epochs", "50"]
    assert training.output_dir == str(tmp_path / "job_%j"), "--output_dir defaults to --job_dir"
    assert training.script == str(REPO / "pretrain.py")


def test_output_dir_on_the_command_line_wins_over_the_job_dir(tmp_path):
    _, training = plan(["--cluster", "local", "--job_dir", str(tmp_path / "job"),
                        "--output_dir", str(tmp_path / "out")])
    assert training.output_dir == str(tmp_path / "out")


def test_launcher_and_training_flags_typed_with_dashes_are_read_as_the_flags(tmp_path):
    launch, training = plan(["--cluster", "local", "--job-dir", str(tmp_path / "job"), "--cpus-per-task", "3",
                             "--output-dir", str(tmp_path / "out"), "--no-norm-pix-loss"])
    assert (launch.job_dir, launch.cpus_per_task) == (str(tmp_path / "job"), 3)
    assert training.output_dir == str(tmp_path / "out"), "--output-dir is the run's --output_dir"
    assert training.argv == ["--output_dir", str(tmp_path / "out"), "--no-norm_pix_loss"]


def test_a_bad_training_flag_stops_the_launcher_before_anything_is_submitted(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        plan(["--cluster", "local", "--job_dir", str(tmp_path), "--model", "convnextv2_giant"])
    assert stop.value.code == 2
    assert "--model 'convnextv2_giant'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may be written before the flags are checked"


def test_a_gpu_job_can_be_submitted_from_a_login_node_without_gpus(tmp_path):
    _, training = plan(["--cluster", "local", "--job_dir", str(tmp_path), "--device", "cuda"])
    assert training.argv == ["--device", "cuda"], "--device is checked where the job runs"


def test_without_slurm_the_launcher_points_to_cluster_local(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    with pytest.raises(SystemExit) as stop:
        plan(["--job_dir", str(tmp_path)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "srun is not on PATH" in error and "--cluster local" in error


def test_help_lists_the_launcher_and_the_training_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        plan(["-h"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--ngpus" in text and "--job_dir" in text and "--mask_ratio" in text


def test_one_task_per_gpu_with_memory_per_gpu_and_cpu_jobs_ask_for_neither():
    launch, _ = plan(["--cluster", "local", "--ngpus", "8", "--nodes", "1", "--partition", "learnlab"])
    gpu_job = executor_parameters(launch, "pretrain")
    assert (gpu_job["gpus_per_node"], gpu_job["tasks_per_node"], gpu_job["mem_gb"]) == (8, 8, 320)
    assert gpu_job["slurm_partition"] == "learnlab" and gpu_job["slurm_signal_delay_s"] == 120
    launch, _ = plan(["--cluster", "local", "--ngpus", "0", "--tasks_per_node", "2"])
    cpu_job = executor_parameters(launch, "pretrain")
    assert (cpu_job["gpus_per_node"], cpu_job["tasks_per_node"], cpu_job["mem_gb"]) == (None, 2, None)


def test_tasks_get_torchrun_style_variables_and_a_port_that_survives_requeues():
    first = distributed_environment("4242", rank=5, local_rank=1, world_size=8, num_nodes=2, first_host="node-a")
    assert {name: first[name] for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} \
        == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node-a"}
    again = distributed_environment("4242", rank=0, local_rank=0, world_size=8, num_nodes=2, first_host="node-a")
    assert first["MASTER_PORT"] == again["MASTER_PORT"], "every task (and the requeued job) must agree on the port"
    assert 10000 <= int(first["MASTER_PORT"]) < 30000


def test_the_requeued_submission_resumes_from_the_runs_own_newest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "77")
    training = SlurmTraining(str(REPO / "pretrain.py"), ["--epochs", "9", "--resume", "/old/checkpoint-3.pth"],
                             str(tmp_path / "run_%j"))
    before_any_checkpoint = training.checkpoint().function
    assert before_any_checkpoint.argv == ["--epochs", "9", "--resume", "/old/checkpoint-3.pth", "--auto_resume"]

    (tmp_path / "run_77").mkdir()
    (tmp_path / "run_77" / "checkpoint-5.pth").touch()
    requeued = training.checkpoint().function
    assert requeued.argv == ["--epochs", "9", "--auto_resume"], "--resume would restart from the old file"
    assert training.argv == ["--epochs", "9", "--resume", "/old/checkpoint-3.pth"], "the running job's copy is kept"


EPOCHS = 4  # 8 images / 2 tasks / batch 2: 2 iterations per epoch and task
JOB_TIMEOUT_S = 600


def submit(data: Path, folder: Path):
    """The 2-task job; training writes to ``folder`` (its default --output_dir, the --job_dir)."""
    argv = ["--cluster", "local", "--ngpus", "0", "--tasks_per_node", "2", "--timeout", "20", "--job_dir", str(folder),
            *pretrain_args(data, folder, epochs=EPOCHS)]
    return submitit_pretrain.main(without_output_dir(argv))


def without_output_dir(argv: list[str]) -> list[str]:
    index = argv.index("--output_dir")
    return argv[:index] + argv[index + 2:]


def wait_for(job, what: str, condition=None):
    """Poll until ``condition()`` (default: the job ended); fail with the tasks' logs otherwise."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (condition() if condition else job.done()):
        if condition and job.done():
            pytest.fail(f"the job ended before {what}:\n{job_logs(job)[-6000:]}")
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"no {what} within {JOB_TIMEOUT_S} s:\n{job_logs(job)[-6000:]}")
        time.sleep(0.002)


def job_logs(job) -> str:
    """Each task's stdout (submitit's own log lines) and stderr."""
    return "\n".join(f"--- task {index}\n{job.task(index).stdout() or ''}{job.task(index).stderr() or ''}"
                     for index in range(2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=2, per_class=4)


@pytest.fixture(scope="module")
def environment():
    """The tasks import this checkout and run one thread each (bitwise-equal numbers)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(REPO))
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def straight_job(data, environment, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    job = submit(data, folder)
    wait_for(job, "end of the job")
    assert job.state == "FINISHED", job_logs(job)[-6000:]
    return job, folder


@pytest.mark.slow
@linux_only
def test_two_tasks_train_as_one_distributed_job_with_identical_weights(straight_job):
    job, folder = straight_job
    assert len(job.results()) == 2, "one result per task"
    log = (folder / "train.log").read_text()
    assert "effective batch 4 (2 x 1 accumulation x 2)" in log, "the tasks did not form one 2-process group"
    assert "weights identical on all 2 ranks" in log
    assert load_checkpoint(folder / f"checkpoint-{EPOCHS}.pth")["epoch"] == EPOCHS


@pytest.mark.slow
@linux_only
def test_preempted_job_saves_requeues_and_ends_with_the_uninterrupted_weights(data, straight_job, tmp_path):
    folder = tmp_path / "preempted"
    job = submit(data, folder)
    wait_for(job, "progress in epoch 2", log_contains(folder / "train.log", f"epoch 2/{EPOCHS} [1/"))
    tasks = child_pids(int(job.job_id))
    assert len(tasks) == 2, f"expected 2 task processes under the controller, found {tasks}"
    for task in tasks:  # what Slurm does --signal=USR2@120 before the time limit: every task gets it
        os.kill(task, signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG])

    wait_for(job, "end of the requeued job")
    assert job.state == "FINISHED", job_logs(job)[-6000:]
    assert "Requeued job" in job_logs(job), f"submitit did not requeue the job:\n{job_logs(job)[-6000:]}"
    assert "resumed from" in (folder / "train.log").read_text(), "the requeued job did not resume"
    expected = load_checkpoint(straight_job[1] / f"checkpoint-{EPOCHS}.pth")
    resumed = load_checkpoint(folder / f"checkpoint-{EPOCHS}.pth")
    assert_states_equal(resumed["model"], expected["model"], "model")
    assert_states_equal(resumed["optimizer"], expected["optimizer"], "optimizer")
