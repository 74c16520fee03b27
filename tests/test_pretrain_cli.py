"""pretrain.py end to end on tiny settings: outputs, exports, TensorBoard, validation, configs."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pretrain
from engine.checkpoint import load_checkpoint
from engine.config import TRAINING_CHECKS, parse_args, validate
from image_folders import make_image_folder

torch.set_num_threads(1)  # shared CPU: one thread avoids oversubscription stalls

REPO = Path(pretrain.__file__).resolve().parent
SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


def tiny_args(data_path, output_dir, *extra):
    return ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--epochs", "2",
            "--warmup_epochs", "1", "--blr", "1.5e-2", "--data_path", str(data_path), "--output_dir", str(output_dir),
            "--num_workers", "0", "--print_freq", "1", "--save_ckpt_freq", "1", "--save_ckpt_num", "1", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 2-epoch run (2 iterations per epoch) shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("tiny_run")
    data = make_image_folder(root / "data", classes=2, per_class=2)
    output = root / "out"
    stats = pretrain.main(tiny_args(data, output))
    return output, stats


def test_help_exits_zero():
    result = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "-h"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--norm_pix_loss [BOOL], --no-norm_pix_loss" in result.stdout and "--mask_ratio" in result.stdout


def test_run_writes_checkpoint_export_logs_config_and_picture(tiny_run):
    output, stats = tiny_run
    assert sorted(p.name for p in output.glob("checkpoint-*.pth")) == ["checkpoint-2.pth"]  # keeps 1
    state = load_checkpoint(output / "checkpoint-2.pth")
    assert state["epoch"] == 2 and state["config"]["model"] == "convnextv2_atto"
    assert {"model", "optimizer", "stepper", "iteration"} <= state.keys() and state["iteration"] == 0
    epochs = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in epochs] == [1, 2]
    assert all(0 < record["loss"] < 10 and record["images_per_s"] > 0 and record["grad_norm"] > 0 for record in epochs)
    assert yaml.safe_load((output / "config.yaml").read_text())["input_size"] == 64
    assert "epoch 2/2 [2/2]  loss" in (output / "train.log").read_text() and "  grad_norm " in (output / "train.log").read_text()
    assert (output / "reconstruction.png").stat().st_size > 0
    assert stats["loss"] == epochs[-1]["loss"]
    assert not list(output.glob(".*.tmp")), "temporary files left behind"


def test_encoder_export_loads_strictly_into_timm(tiny_run):
    import timm
    from safetensors.torch import load_file

    output, _ = tiny_run
    exported = load_file(output / "encoder.safetensors")
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)
    model.load_state_dict(exported)  # strict: head.norm is exported at timm's init (1, 0)
    assert torch.equal(model.head.norm.weight, torch.ones(320)) and torch.equal(model.head.norm.bias, torch.zeros(320))
    trained = load_checkpoint(output / "checkpoint-2.pth")["model"]
    assert torch.equal(model.stages[2].blocks[3].mlp.grn.weight, trained["encoder.stages.2.blocks.3.mlp.grn.weight"])


def test_tensorboard_has_loss_lr_throughput_scalars_and_reconstruction_image(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = tiny_run
    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/images_per_s", "train/grad_norm", "epoch/loss", "epoch/lr",
            "epoch/grad_norm"} <= set(tags["scalars"])
    assert "reconstruction" in tags["images"]
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]  # optimizer updates done
    assert [event.step for event in events.Scalars("epoch/loss")] == [2, 4]  # 2 epochs x 2 updates
    assert [event.step for event in events.Images("reconstruction")] == [2, 4]


def test_rerun_of_a_finished_run_resumes_and_trains_nothing(tiny_run, caplog):
    output, _ = tiny_run
    data = output.parent / "data"
    with caplog.at_level(logging.INFO):
        assert pretrain.main(tiny_args(data, output)) == {}
    assert "resumed from" in caplog.text and "checkpoint-2.pth" in caplog.text
    assert "nothing left to train: 2 of 2 epochs done" in caplog.text


@pytest.mark.parametrize("flag_args, message", [
    (["--input_size", "100"], "--input_size 100: must be a multiple of 32"),
    (["--mask_ratio", "1.0"], "--mask_ratio 1.0: must be in [0, 1)"),
    (["--model", "convnextv2_mega"], "--model 'convnextv2_mega': unknown model"),
    (["--backend", "dense"], "argument --backend: invalid choice: 'dense'"),
    (["--epochs", "-2", "--warmup_epochs", "0"], "--epochs -2: must be >= 0"),
    (["--data_path", "/no/such/imagenet"], "--data_path '/no/such/imagenet': no such folder"),
    (["--lr", "1e-3", "--blr", "1e-4"], "--lr and --blr were both given"),
    (["--decoder_depth", "0"], "--decoder_depth 0: must be >= 1"),
])
def test_invalid_values_exit_before_any_work_naming_the_flag(tmp_path, capsys, flag_args, message):
    with pytest.raises(SystemExit) as caught:
        pretrain.main(["--output_dir", str(tmp_path / "out"), *flag_args])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing may be written for an invalid configuration"


def test_empty_data_folder_is_reported_as_a_data_path_error(tmp_path, capsys):
    (tmp_path / "data" / "train" / "cats").mkdir(parents=True)
    with pytest.raises(SystemExit) as caught:
        pretrain.main(tiny_args(tmp_path / "data", tmp_path / "out"))
    assert caught.value.code == 2
    assert "--data_path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "a run that fails to start may leave nothing (not even train.log)"


def test_dataset_of_only_unreadable_files_stops_with_clear_error(tmp_path, caplog):
    (tmp_path / "data" / "a").mkdir(parents=True)
    for index in range(4):
        (tmp_path / "data" / "a" / f"{index}.jpg").write_bytes(b"corrupt")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as caught:
        pretrain.main(tiny_args(tmp_path / "data", tmp_path / "out"))
    assert caught.value.code == 1
    assert "all 4 image files under" in caplog.text and "are unreadable" in caplog.text


def test_without_data_path_the_embedded_photos_are_announced(caplog):
    args = parse_args(pretrain.build_parser(), ["--input_size", "64", "--embedded_samples", "10"])
    with caplog.at_level(logging.INFO):
        dataset = pretrain.build_dataset(args)
    assert len(dataset) == 10 and dataset[0][0].shape == (3, 64, 64)
    assert "No --data_path given: demo run on 8 embedded scikit-image photos" in caplog.text


@pytest.mark.parametrize("name", ["demo", *SIZES])
def test_shipped_configs_are_valid(name):
    args = parse_args(pretrain.build_parser(), ["--config", str(REPO / "configs" / f"pretrain_{name}.yaml")])
    validate(args, TRAINING_CHECKS + pretrain.PRETRAIN_CHECKS)
    if name != "demo":
        assert args.model == f"convnextv2_{name}" and args.blr == 1.5e-4 and args.warmup_epochs == 40
        assert args.batch_size * args.update_freq * 8 == 4096, "recipes assume 8 GPUs and effective batch 4096"
        assert args.epochs == (800 if name in ("large", "huge") else 1600)
        assert (args.save_ckpt_freq, args.save_ckpt_minutes) == (1, 30), "a preempted run must not lose hours"


def test_explicit_resume_file_is_used_instead_of_output_dir(tiny_run, tmp_path, caplog):
    output, _ = tiny_run
    with caplog.at_level(logging.INFO):
        pretrain.main(tiny_args(output.parent / "data", tmp_path / "elsewhere", "--resume",
                                str(output / "checkpoint-2.pth")))
    assert f"resumed from {output / 'checkpoint-2.pth'} (2 epochs completed)" in caplog.text
    assert not list((tmp_path / "elsewhere").glob("checkpoint-*.pth"))  # nothing trained, nothing saved


def test_non_finite_loss_exits_with_advice_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, caplog):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    real_loss_fn = pretrain.make_loss_fn

    def loss_fn_exploding_in_epoch_1(device):
        fcmae_loss = real_loss_fn(device)

        def loss(model, batch, step):
            value, metrics = fcmae_loss(model, batch, step)
            return (value * float("inf") if step.epoch == 1 else value), metrics

        return loss

    monkeypatch.setattr(pretrain, "make_loss_fn", loss_fn_exploding_in_epoch_1)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as caught:
        pretrain.main(tiny_args(data, tmp_path / "out"))
    assert caught.value.code == 1
    assert "loss is inf at epoch 1 iteration 0" in caplog.text and "--clip_grad" in caplog.text
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*.pth")] == ["checkpoint-1.pth"]
    assert load_checkpoint(tmp_path / "out" / "checkpoint-1.pth")["epoch"] == 1


def test_resume_with_other_num_workers_continues_exactly(tiny_run, tmp_path, caplog):
    """Augmentations are seeded per sample, so the DataLoader's worker count does not change the run."""
    data = tiny_run[0].parent / "data"
    pretrain.main(tiny_args(data, tmp_path / "uninterrupted", "--save_ckpt_num", "2"))
    with caplog.at_level(logging.INFO):
        pretrain.main(tiny_args(data, tmp_path / "resumed", "--num_workers", "1",
                                "--resume", str(tmp_path / "uninterrupted" / "checkpoint-1.pth")))
    assert "resumed from" in caplog.text and "training continues, but not as" not in caplog.text
    expected = load_checkpoint(tmp_path / "uninterrupted" / "checkpoint-2.pth")["model"]
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint-2.pth")["model"]
    assert all(torch.equal(resumed[name], tensor) for name, tensor in expected.items())


def test_a_run_with_workers_leaves_no_worker_process_behind_even_when_it_fails(tiny_run, tmp_path, monkeypatch):
    """Persistent workers ignore SIGTERM; left to interpreter exit (kept alive here by the
    traceback's reference to the loader) they would hang the process at exit."""
    import multiprocessing

    def failing_loss_fn(device):
        def loss_fn(model, batch, step):
            raise RuntimeError("a failure inside the epoch")
        return loss_fn

    monkeypatch.setattr(pretrain, "make_loss_fn", failing_loss_fn)
    with pytest.raises(RuntimeError, match="inside the epoch") as failure:
        pretrain.main(tiny_args(tiny_run[0].parent / "data", tmp_path / "out", "--epochs", "1", "--num_workers", "2"))
    assert failure.traceback, "the traceback (and with it the loader) is still referenced"
    assert multiprocessing.active_children() == []


def test_resuming_with_another_batch_size_is_refused_unless_allowed(tmp_path, capsys, caplog):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    output = tmp_path / "out"
    pretrain.main(tiny_args(data, output, "--epochs", "1"))
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(tiny_args(data, output, "--epochs", "2", "--batch_size", "4"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "was written with another run layout (batch_size 2 -> 4)" in error and "restore --batch_size 2" in error
    assert sorted(path.name for path in output.glob("checkpoint-*.pth")) == ["checkpoint-1.pth"]
    with caplog.at_level(logging.INFO):
        pretrain.main(tiny_args(data, output, "--epochs", "2", "--batch_size", "4", "--allow_layout_change"))
    assert f"resumed from {output / 'checkpoint-1.pth'}" in caplog.text
    assert load_checkpoint(output / "checkpoint-2.pth")["config"]["batch_size"] == 4
