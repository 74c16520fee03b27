"""Experiment tracking: W&B (offline, read back from its run files) and MLflow (a local sqlite
store, read back through its client) get TensorBoard's scalars at the same steps, the config once,
the reconstruction pictures; a resumed run continues the same tracker runs and logs no step twice."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from engine.checkpoint import load_checkpoint
from engine.trackers import LOGGED_STEP_FILE, Trackers
from image_folders import make_image_folder

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

torch.set_num_threads(1)

# 4 images, batch 2: 2 optimizer updates per epoch; print_freq 1: train/ scalars after every update
UPDATES_PER_EPOCH = 2


def run_args(root: Path, epochs: int, *extra: str) -> list[str]:
    return ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--epochs", str(epochs),
            "--warmup_epochs", "1", "--blr", "1.5e-2", "--data_path", str(root / "data"),
            "--output_dir", str(root / "out"), "--num_workers", "0", "--print_freq", "1", "--save_ckpt_freq", "1",
            "--save_ckpt_num", "5", "--knn_data_path", str(root / "knn"), "--knn_k", "3",
            "--log_wandb", "--wandb_project", "fcmae-tests", "--wandb_tags", "tiny", "ci",
            "--mlflow_uri", f"sqlite:///{root / 'mlflow.db'}", "--mlflow_experiment", "fcmae-tests", *extra]


def wandb_records(run_file: Path) -> list[dict]:
    """The records of a W&B run file, as W&B's own reader prints them."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                            capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def wandb_runs(output: Path) -> list[list[dict]]:
    """Every offline run file under ``output/wandb``, oldest first, as records."""
    return [wandb_records(path) for path in sorted((output / "wandb").glob("offline-run-*/run-*.wandb"))]


def wandb_history(records: list[dict]) -> dict[tuple[str, int], object]:
    """(key, step) -> value of every history row (W&B's own keys, starting with "_", left out)."""
    rows = [record["history"] for record in records if record["type"] == "history"]
    return {(key, int(row["step"]["num"])): value for row in rows for key, value in row["item"].items()
            if not key.startswith("_")}


def tensorboard_scalars(folder: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {(tag, event.step): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}


def mlflow_metrics(root: Path) -> dict[tuple[str, int], list[float]]:
    """(key, step) -> every value logged, from the only run of the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fcmae-tests").experiment_id])
    logged: dict[tuple[str, int], list[float]] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            logged.setdefault((key, metric.step), []).append(metric.value)
    return logged


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A 2-epoch run with W&B (offline), MLflow and the k-NN monitor; what it logged, read back."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    make_image_folder(root / "data", classes=2, per_class=2)
    make_image_folder(root / "knn" / "train", classes=2, per_class=3, seed=1)
    make_image_folder(root / "knn" / "val", classes=2, per_class=2, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.chdir(root)  # MLflow's default artifact folder, ./mlruns
        pretrain.main(run_args(root, 2))
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fcmae-tests").experiment_id])
    return {"root": root, "wandb": wandb_runs(root / "out"),
            "tensorboard": tensorboard_scalars(root / "out" / "tensorboard"), "mlflow": mlflow_metrics(root),
            "mlflow_run": run,
            "mlflow_artifacts": [item.path for item in client.list_artifacts(run.info.run_id)],
            "mlflow_images": [item.path for item in client.list_artifacts(run.info.run_id, "images")]}


def test_wandb_gets_every_tensorboard_scalar_at_the_same_steps_and_the_config_once(first_run):
    (records,) = first_run["wandb"]
    logged, tensorboard = wandb_history(records), first_run["tensorboard"]
    scalars = {key: value for key, value in logged.items() if not key[0].startswith("reconstruction")}
    assert scalars.keys() == tensorboard.keys()
    for key, value in tensorboard.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key  # TensorBoard keeps float32
    steps = sorted({step for _, step in tensorboard})
    assert steps == [1, 2, 3, 4]  # optimizer updates done, 2 per epoch
    assert {step for (key, step) in tensorboard if key == "val/knn_top1"} == {2, 4}  # the k-NN curve
    assert {step for (key, step) in logged if key == "reconstruction._type"} == {2, 4}  # each picture drawn
    configs = [record["run"]["config"]["update"] for record in records if record["type"] == "run"]
    assert len(configs) == 1 and configs[0]["model"] == "convnextv2_atto" and configs[0]["epochs"] == 2
    (run,) = [record["run"] for record in records if record["type"] == "run"]
    assert run["project"] == "fcmae-tests" and run["tags"] == ["tiny", "ci"] and run["display_name"] == "out"


def test_mlflow_gets_every_tensorboard_scalar_at_the_same_steps_the_config_and_the_files(first_run):
    logged, tensorboard = first_run["mlflow"], first_run["tensorboard"]
    assert logged.keys() == tensorboard.keys()
    for key, value in tensorboard.items():
        assert logged[key] == [pytest.approx(value, rel=1e-6)], key
    run = first_run["mlflow_run"]
    assert run.data.params["model"] == "convnextv2_atto" and run.data.params["input_size"] == "64"
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert "encoder.safetensors" in first_run["mlflow_artifacts"]
    assert sorted(path.split("+")[2] for path in first_run["mlflow_images"] if path.endswith(".png")) == ["2", "4"]


def test_checkpoints_keep_the_tracker_runs(first_run):
    state = load_checkpoint(first_run["root"] / "out" / "checkpoint-2.pth")["tracking"]
    (records,) = first_run["wandb"]
    (run,) = [record["run"] for record in records if record["type"] == "run"]
    assert state == {"run_id": run["run_id"], "mlflow_run_id": first_run["mlflow_run"].info.run_id, "wandb": True,
                     "last_step": 4}


def keep_mid_epoch_checkpoints(monkeypatch, folder: Path) -> None:
    """Copy every mid-epoch checkpoint into ``folder`` when it is written (the run removes them)."""
    import engine.runner

    save = engine.runner.save_checkpoint

    def save_and_keep(state, output_dir, epoch, keep_last, updates=0):
        path = save(state, output_dir, epoch, keep_last, updates)
        if updates:
            shutil.copy(path, folder / path.name)
        return path

    folder.mkdir()
    monkeypatch.setattr(engine.runner, "save_checkpoint", save_and_keep)


def test_a_run_resumed_from_before_its_last_logged_step_logs_no_step_twice(tmp_path, monkeypatch):
    """Killed at update 4 after a checkpoint at update 3: the resumed run continues the same W&B
    and MLflow runs and redoes update 4 without logging it (or the epoch it ends) again."""
    make_image_folder(tmp_path / "data", classes=2, per_class=2)
    make_image_folder(tmp_path / "knn" / "train", classes=2, per_class=2, seed=1)
    make_image_folder(tmp_path / "knn" / "val", classes=2, per_class=1, seed=2)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    keep_mid_epoch_checkpoints(monkeypatch, tmp_path / "kept")
    output = tmp_path / "out"
    pretrain.main(run_args(tmp_path, 2, "--save_ckpt_steps", "1"))
    assert json.loads((output / LOGGED_STEP_FILE).read_text())["last_step"] == 4
    for checkpoint in output.glob("checkpoint-*.pth"):
        checkpoint.unlink()
    shutil.copy(tmp_path / "kept" / "checkpoint-1-1.pth", output)  # epoch 2, update 1: update 3 of the run
    assert load_checkpoint(output / "checkpoint-1-1.pth")["tracking"]["last_step"] == 3

    pretrain.main(run_args(tmp_path, 3, "--save_ckpt_steps", "1"))

    first, resumed = wandb_runs(output)
    run_ids = {record["run"]["run_id"] for records in (first, resumed) for record in records if record["type"] == "run"}
    assert len(run_ids) == 1, "the resumed run started another W&B run"
    assert not any("model" in record["run"]["config"].get("update", {}) for record in resumed
                   if record["type"] == "run"), "the config was logged again"
    first_steps = sorted({step for _, step in wandb_history(first)})
    resumed_steps = sorted({step for _, step in wandb_history(resumed)})
    assert first_steps == [1, 2, 3, 4] and resumed_steps == [5, 6], "a step was logged twice or backwards"
    assert all(len(values) == 1 for values in mlflow_metrics(tmp_path).values()), "MLflow got a step twice"
    assert max(step for _, step in mlflow_metrics(tmp_path)) == 6
    tensorboard_steps = [step for tag, step in tensorboard_scalars(output / "tensorboard") if tag == "train/loss"]
    assert sorted(tensorboard_steps) == [1, 2, 3, 4, 5, 6]


class Recorder:
    """A tracker that remembers its calls."""

    def __init__(self):
        self.calls = []

    def scalars(self, values, step):
        self.calls.append((dict(values), step))

    def image(self, tag, image, step):
        self.calls.append((tag, step))

    def close(self, finished):
        self.calls.append(("closed", finished))


def test_steps_logged_before_a_resume_are_not_logged_again(tmp_path):
    from engine.logging import TensorBoardWriter

    recorder = Recorder()
    trackers = Trackers(TensorBoardWriter(None), [recorder], {"run_id": "abc"}, logged_through=4,
                        step_file=tmp_path / LOGGED_STEP_FILE)
    trackers.scalars({"loss": 1.0}, 4, "train/")
    trackers.scalars({"loss": 0.5}, 5, "train/")
    trackers.scalars({"loss": 0.4}, 5, "epoch/")  # another call at the same new step is logged
    trackers.image("reconstruction", torch.zeros(3, 4, 4), 3)
    trackers.close(finished=False)
    assert recorder.calls == [({"train/loss": 0.5}, 5), ({"epoch/loss": 0.4}, 5), ("closed", False)]
    assert json.loads((tmp_path / LOGGED_STEP_FILE).read_text()) == {"run_id": "abc", "last_step": 5}
    assert trackers.state_dict() == {"run_id": "abc", "last_step": 5}


class Broken(Recorder):
    def scalars(self, values, step):
        raise ConnectionError("the tracking server went away\nmore detail")


def test_a_tracker_that_fails_mid_run_is_a_warning_and_the_others_still_log(caplog):
    from engine.logging import TensorBoardWriter

    recorder = Recorder()
    trackers = Trackers(TensorBoardWriter(None), [Broken(), recorder], {"run_id": "abc"})
    with caplog.at_level(logging.WARNING):
        trackers.scalars({"loss": 1.0}, 1, "train/")
    assert recorder.calls == [({"train/loss": 1.0}, 1)]
    assert "Broken: scalars failed (ConnectionError: the tracking server went away); training goes on" in caplog.text


@pytest.mark.slow
def test_a_wandb_login_that_fails_stops_the_run_at_start_up_in_one_line(tmp_path):
    """Online W&B without an API key: exit 2 before training, one line naming the flag and the
    fixes, and the new --output_dir removed again."""
    make_image_folder(tmp_path / "data", classes=2, per_class=2)
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_MODE="online", HOME=str(tmp_path), OMP_NUM_THREADS="1")  # no ~/.netrc: not logged in
    result = subprocess.run([sys.executable, str(Path(pretrain.__file__)), "--model", "convnextv2_atto",
                             "--input_size", "64", "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0",
                             "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                             "--num_workers", "0", "--log_wandb"], capture_output=True, text=True, timeout=300,
                            env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--log_wandb: Weights & Biases could not start" in errors[0], result.stderr
    assert "wandb login" in errors[0] and "WANDB_MODE=offline" in errors[0]
    assert "epoch 1/1" not in result.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_without_wandb_and_mlflow_installed_the_flags_stop_at_start_up_and_runs_without_them_work(tmp_path):
    """wandb and mlflow made unimportable: a run without the flags trains; each flag stops the
    run before any work with one line naming the package, and writes nothing."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text('import sys\nsys.modules["wandb"] = None\nsys.modules["mlflow"] = None\n')
    make_image_folder(tmp_path / "data", classes=2, per_class=2)
    env = {**os.environ, "PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1"}
    base = ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--epochs", "1",
            "--warmup_epochs", "0", "--data_path", str(tmp_path / "data"), "--num_workers", "0"]
    script = str(Path(pretrain.__file__))

    def run(output: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *base, "--output_dir", str(tmp_path / output), *flags],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    plain = run("plain")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert (tmp_path / "plain" / "checkpoint-1.pth").is_file()
    assert (tmp_path / "plain" / "hub" / "config.json").is_file()
    for flags, package in ((["--log_wandb"], "wandb"), (["--mlflow_uri", "sqlite:///x.db"], "mlflow")):
        refused = run("refused", *flags)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        problems = [line for line in refused.stderr.splitlines() if line.startswith("  --")]
        assert len(problems) == 1 and f"the {package} package is not installed; pip install" in problems[0]
        assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
