"""A non-finite loss stops the run cleanly; an update with non-finite gradients is skipped and
counted, and too many in a row stop the run cleanly; fp16 overflows are counted, not fatal.

NaN is injected into the input images of one iteration (as a corrupt sample would be) through the
CLIs' own loss functions. The run must exit with code 1 and an error naming the epoch and
iteration, the last checkpoint must be byte-identical with an unchanged modification time, and
the same command without the fault must resume from it and finish.
"""
import functools
import json
import logging

import pytest
import torch

import pretrain
from engine.checkpoint import load_checkpoint
from reliability.faults import cli_args, cli_module, pretrain_args

NAN_AT = (1, 2)  # (epoch, iteration), 0-based: after checkpoint-1, in the middle of the second epoch


def file_snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def with_fault(make_loss_fn, fault):
    """A CLI's ``make_loss_fn`` whose loss functions run ``fault(loss_fn, model, batch, step)``."""

    def make(*args, **kwargs):
        return functools.partial(fault, make_loss_fn(*args, **kwargs))

    return make


def nan_injecting(make_loss_fn, output, snapshots):
    """Wrap a CLI's ``make_loss_fn`` so that the images of iteration ``NAN_AT`` hold a NaN; just
    before, record every checkpoint file of ``output`` (bytes and mtime) in ``snapshots``."""

    def loss_with_nan_input(loss_fn, model, batch, step):
        if (step.epoch, step.iteration) == NAN_AT:
            snapshots.update({path.name: file_snapshot(path) for path in output.glob("checkpoint-*.pth")})
            images = batch[0].clone()
            images[0, 0, 0, 0] = float("nan")
            batch = (images, *batch[1:])
        return loss_fn(model, batch, step)

    return with_fault(make_loss_fn, loss_with_nan_input)


@pytest.mark.parametrize("cli", ["pretrain", "finetune"])
def test_nan_loss_stops_and_leaves_the_last_checkpoints_untouched_and_resumable(cli, pretrain_data, finetune_data,
                                                                                tmp_path, monkeypatch, caplog):
    module, output = cli_module(cli), tmp_path / "out"
    argv = cli_args(cli, pretrain_data, finetune_data, output, epochs=2)
    snapshots = {}
    with monkeypatch.context() as patch:
        patch.setattr(module, "make_loss_fn", nan_injecting(module.make_loss_fn, output, snapshots))
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
            module.main(argv)
    assert exit_info.value.code == 1
    assert "loss is nan at epoch 1 iteration 2" in caplog.text and "the last checkpoint is kept" in caplog.text

    best = {"checkpoint-best.pth", "checkpoint-best-ema.pth"} if cli == "finetune" else set()
    assert set(snapshots) == {"checkpoint-1.pth", *best}
    for name, snapshot in snapshots.items():
        assert file_snapshot(output / name) == snapshot, f"{name} changed after the NaN"
    assert not (output / "checkpoint-2.pth").exists() and not list(output.glob(".*.tmp"))

    caplog.clear()
    with caplog.at_level(logging.INFO):
        module.main(argv)  # the fault is gone: the same command resumes
    assert f"resumed from {output / 'checkpoint-1.pth'} (1 epoch completed)" in caplog.text
    final = load_checkpoint(output / "checkpoint-2.pth")["model"]
    assert all(torch.isfinite(tensor).all() for tensor in final.values())


def test_fp16_overflow_is_counted_and_logged_not_fatal(pretrain_data, tmp_path, monkeypatch, caplog):
    """On CPU too: autocast float16 with a GradScaler; one iteration's gradients overflow float16."""
    real_make_loss_fn = pretrain.make_loss_fn

    def make_overflowing_loss_fn(*args, **kwargs):
        loss_fn = real_make_loss_fn(*args, **kwargs)

        def loss(model, batch, step):
            value, metrics = loss_fn(model, batch, step)
            return (value * 1e30 if (step.epoch, step.iteration) == (0, 1) else value), metrics  # finite in fp32

        return loss

    monkeypatch.setattr(pretrain, "make_loss_fn", make_overflowing_loss_fn)
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        pretrain.main(pretrain_args(pretrain_data, output, "--amp", "fp16", epochs=2))

    assert "fp16: the loss scaler skipped 1 of 4 updates this epoch" in caplog.text
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["skipped_updates"] for record in records] == [1, 0]
    state = load_checkpoint(output / "checkpoint-2.pth")
    assert state["stepper"]["skipped_updates"] == 1
    assert state["stepper"]["scaler"]["scale"] < 65536.0, "the scaler did not back off"
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())


def test_a_nan_between_log_points_is_caught_before_a_mid_epoch_checkpoint(pretrain_data, tmp_path, monkeypatch,
                                                                          caplog):
    """The loss is read only at log points; a checkpoint due earlier reads and checks it first."""
    output = tmp_path / "out"
    argv = pretrain_args(pretrain_data, output, "--print_freq", "100", "--save_ckpt_steps", "1", epochs=2)
    snapshots = {}
    monkeypatch.setattr(pretrain, "make_loss_fn", nan_injecting(pretrain.make_loss_fn, output, snapshots))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    assert exit_info.value.code == 1
    assert "loss is nan at epoch 1 iteration 2 (the first non-finite one of iterations 2-2" in caplog.text
    assert "saved checkpoint-1-2.pth" in caplog.text  # the update before the NaN was checkpointed
    assert sorted(path.name for path in output.glob("checkpoint-*.pth")) == ["checkpoint-1-2.pth", "checkpoint-1.pth"]
    assert "epoch 2/2 [3/4]" not in caplog.text, "the NaN iteration was logged as if it were fine"


def nan_gradient_injecting(make_loss_fn, bad_steps):
    """Wrap a CLI's ``make_loss_fn``: at the (epoch, iteration)s in ``bad_steps`` the loss stays
    finite but one weight's gradient is NaN (d/dw sqrt(0 * w) = 0 * inf)."""

    def loss_with_nan_gradient(loss_fn, model, batch, step):
        loss, metrics = loss_fn(model, batch, step)
        if (step.epoch, step.iteration) in bad_steps:
            loss = loss + (next(model.parameters()).flatten()[0] * 0.0).sqrt()
        return loss, metrics

    return with_fault(make_loss_fn, loss_with_nan_gradient)


@pytest.mark.parametrize("cli", ["pretrain", "finetune"])
def test_an_update_with_nan_gradients_and_a_finite_loss_is_skipped_and_counted(cli, pretrain_data, finetune_data,
                                                                               tmp_path, monkeypatch, caplog):
    module, output = cli_module(cli), tmp_path / "out"
    argv = cli_args(cli, pretrain_data, finetune_data, output, epochs=2)
    monkeypatch.setattr(module, "make_loss_fn", nan_gradient_injecting(module.make_loss_fn, {(0, 1)}))
    with caplog.at_level(logging.INFO):
        module.main(argv)
    assert "1 of 4 optimizer updates were skipped this epoch: their gradients were inf/NaN" in caplog.text
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["skipped_updates"] for record in records] == [1, 0]
    state = load_checkpoint(output / "checkpoint-2.pth")
    assert state["stepper"]["skipped_updates"] == 1 and state["stepper"]["skipped_in_row"] == 0
    for entry in ("model", "model_ema") if cli == "finetune" else ("model",):
        assert all(torch.isfinite(tensor).all() for tensor in state[entry].values()), entry
    moments = [value for per_param in state["optimizer"]["state"].values() for value in per_param.values()]
    assert all(torch.isfinite(tensor).all() for tensor in moments), "the skipped update reached AdamW's moments"


def test_updates_skipped_in_a_row_stop_the_run_and_keep_the_last_checkpoint(pretrain_data, tmp_path, monkeypatch,
                                                                            caplog):
    output = tmp_path / "out"
    argv = pretrain_args(pretrain_data, output, "--max_skipped_updates", "2", epochs=2)
    monkeypatch.setattr(pretrain, "make_loss_fn", nan_gradient_injecting(pretrain.make_loss_fn, {(1, 1), (1, 2)}))
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    assert exit_info.value.code == 1
    assert "2 optimizer updates in a row were skipped because the gradients were inf/NaN (epoch 1" in caplog.text
    assert "--max_skipped_updates" in caplog.text
    assert sorted(path.name for path in output.glob("checkpoint-*.pth")) == ["checkpoint-1.pth"]
    kept = load_checkpoint(output / "checkpoint-1.pth")["model"]
    assert all(torch.isfinite(tensor).all() for tensor in kept.values())
