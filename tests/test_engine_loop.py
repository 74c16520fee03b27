"""engine.loop: the shared epoch loop, accumulation, AMP scaling, non-finite loss, progress lines."""
import logging

import pytest
import torch
import torch.nn as nn

import fcmae
from engine.flops import count_step_flops, model_flops_utilization, peak_tflops
from engine.logging import ProgressMeter
from engine.loop import Step, train_one_epoch
from engine.optim import build_adamw
from engine.progress import NonFiniteLossError, is_log_point
from engine.stepper import GradientStepper
from engine.schedule import build_lr_scheduler

torch.set_num_threads(1)  # shared CPU: one thread avoids oversubscription stalls


class ConstantLr:
    """Scheduler stub: keeps the optimizer's lr; records the update indices it was given."""

    def __init__(self):
        self.updates = []

    def step_update(self, update):
        self.updates.append(update)


def mean_squared_loss(model, batch, step):
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean(), {}


def test_fcmae_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = fcmae.build_fcmae("convnextv2_atto")
    images = torch.randn(2, 3, 64, 64)
    visible = fcmae.random_visible_cells(2, 4, 0.5, generator=torch.Generator().manual_seed(0))
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.05)
    stepper = GradientStepper(model, optimizer)
    scheduler = build_lr_scheduler(optimizer, epochs=1, warmup_epochs=0, updates_per_epoch=30)

    def fcmae_loss(model, batch, step):
        loss, _, _ = model(batch, visible)
        return loss, {}

    with torch.no_grad():
        first_loss = model(images, visible)[0].item()
    stats = train_one_epoch(model, [images] * 30, fcmae_loss, stepper, scheduler, epoch=0, epochs=1, print_freq=100)
    with torch.no_grad():
        final_loss = model(images, visible)[0].item()
    assert stats["loss"] < first_loss
    assert final_loss < 0.5 * first_loss, f"loss went from {first_loss:.3f} to only {final_loss:.3f} in 30 steps"


def test_accumulating_two_half_batches_equals_one_full_batch_step():
    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 5), torch.randn(8, 3)
    reference, accumulated = nn.Linear(5, 3), nn.Linear(5, 3)
    accumulated.load_state_dict(reference.state_dict())

    for model, batches, update_freq in ((reference, [(inputs, targets)], 1),
                                        (accumulated, [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])], 2)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stepper = GradientStepper(model, optimizer, update_freq=update_freq, clip_grad=0.5)
        scheduler = ConstantLr()
        train_one_epoch(model, batches, mean_squared_loss, stepper, scheduler, epoch=0, epochs=1)
        assert scheduler.updates == [0]  # one optimizer update in both cases

    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], tensor, rtol=1e-6, atol=1e-7)


def test_trailing_incomplete_accumulation_group_is_dropped():
    model = nn.Linear(2, 1)
    batches = [(torch.randn(2, 2), torch.randn(2, 1))] * 5
    stepper = GradientStepper(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=2)
    scheduler = ConstantLr()
    train_one_epoch(model, batches, mean_squared_loss, stepper, scheduler, epoch=3, epochs=4)
    assert scheduler.updates == [6, 7]  # 5 batches -> 2 updates per epoch; epoch 3 starts at update 6
    assert all(param.grad is None for param in model.parameters())  # nothing left accumulated


def test_non_finite_loss_is_found_at_the_next_log_point_naming_the_first_bad_iteration():
    model = nn.Linear(2, 1)
    batches = [(torch.randn(2, 2), torch.randn(2, 1)) for _ in range(6)]
    batches[2] = (torch.full((2, 2), float("nan")), torch.zeros(2, 1))
    seen = []

    def loss_recording_iterations(model, batch, step):
        seen.append(step.iteration)
        return mean_squared_loss(model, batch, step)

    stepper = GradientStepper(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 5 iteration 2 \(the first non-finite one of "
                                                 r"iterations 0-3, .*--clip_grad") as caught:
        train_one_epoch(model, batches, loss_recording_iterations, stepper, ConstantLr(), epoch=5, epochs=6,
                        print_freq=4)
    assert "--amp bf16" in str(caught.value) and "lower --lr" in str(caught.value)
    assert seen == [0, 1, 2, 3], "the loss is read (and checked) at the log point after iteration 3, not before"


def test_fp16_overflow_skips_the_update_and_counts_it():
    model = nn.Linear(4, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stepper = GradientStepper(model, torch.optim.SGD(model.parameters(), lr=0.1), amp="fp16")

    def overflowing_loss(model, batch, step):
        return (model(batch).float() * 1e36).mean(), {}  # finite fp32 loss, inf gradients once scaled

    stats = train_one_epoch(model, [torch.ones(2, 4)], overflowing_loss, stepper, ConstantLr(), epoch=0, epochs=1)
    assert stats["skipped_updates"] == 1 and stepper.skipped_updates == 1
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert stepper.state_dict()["scaler"]["scale"] < 65536.0  # the scaler backed off


def test_progress_line_shows_loss_lr_grad_norm_throughput_mfu_and_eta(caplog):
    meter = ProgressMeter(epoch=1, epochs=4, iterations=10, world_size=2)
    for _ in range(10):
        meter.add_images(8)
    with caplog.at_level(logging.INFO):
        line = meter.log_line(10, loss=0.1, epoch_loss=0.55, lr=3e-4, images_per_s=123.45,
                              metrics={"grad_norm": 0.5312}, mfu=0.412)
    assert line in caplog.text
    assert line.startswith("epoch 2/4 [10/10]  loss 0.1000 (0.5500)  lr 3.00e-04  grad_norm 0.5312  123.5 img/s"
                           "  MFU 41.2%  eta 0:00:00 (run 0:00:")
    assert meter.images == 160  # 10 iterations x 8 images x 2 ranks


def test_log_points_fall_at_the_end_of_accumulation_groups():
    def points(iterations, print_freq, update_freq):
        return [i for i in range(iterations) if is_log_point(i, iterations, print_freq, update_freq)]

    assert points(8, 1, 1) == list(range(8))
    assert points(8, 3, 1) == [2, 5, 7]
    assert points(8, 1, 2) == [1, 3, 5, 7]  # never inside a group
    assert points(12, 3, 2) == [3, 5, 9, 11]  # the group reaching 3, 6, 9, 12 iterations
    assert points(12, 5, 4) == [7, 11]


def test_gradient_norm_is_reported_before_clipping(caplog):
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    batch = (torch.ones(4, 3), torch.zeros(4, 1))  # gradient of mean((w.x)^2) = 2 * 3 * 1 per weight
    stepper = GradientStepper(model, torch.optim.SGD(model.parameters(), lr=0.0), clip_grad=0.1)
    stats = train_one_epoch(model, [batch], mean_squared_loss, stepper, ConstantLr(), epoch=0, epochs=1)
    assert stats["grad_norm"] == pytest.approx(6 * 3 ** 0.5, rel=1e-6)  # not the clipped 0.1


def test_a_one_update_cosine_does_not_log_timms_no_effect_warning(caplog):
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING):
        scheduler = build_lr_scheduler(optimizer, epochs=2, warmup_epochs=2, updates_per_epoch=3)  # all warmup
    assert "no effect" not in caplog.text
    scheduler.step_update(3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # the warmup is still half way at update 3


def test_peak_flops_table_matches_device_names_most_specific_first():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("NVIDIA A10", "bf16") == 125.0 and peak_tflops("NVIDIA A10G", "bf16") == 70.0
    assert peak_tflops("NVIDIA L4", "fp32") == 30.3 and peak_tflops("NVIDIA L40S", "bf16") == 362.1
    assert peak_tflops("Tesla V100-SXM2-32GB", "tf32") == 15.7  # no TF32 units: fp32 peak
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") == 165.2
    assert peak_tflops("AMD Instinct MI300X", "bf16") is None


def test_step_flops_count_a_depthwise_conv_backward_once_not_per_group():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    stepper = GradientStepper(conv, torch.optim.SGD(conv.parameters(), lr=0.1))

    def loss_fn(model, batch, step):
        return model(batch).sum(), {}

    flops = count_step_flops(conv, loss_fn, torch.randn(2, 4, 8, 8), Step(0, 0, 0), stepper.autocast())
    forward = 2 * (4 * 8 * 8) * (3 * 3)  # multiply-adds of each output element of one image
    assert flops == 2 * forward  # forward + weight gradient (the input needs none)
    assert conv.weight.grad is None, "the counted step must leave no gradient behind"
    assert model_flops_utilization(1e12, 10.0, 100.0) == pytest.approx(0.1)


def test_mfu_appears_in_progress_line_and_summary_when_the_peak_is_known(caplog):
    model = nn.Linear(4, 1)
    stepper = GradientStepper(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batches = [(torch.randn(2, 4), torch.randn(2, 1))] * 2
    with caplog.at_level(logging.INFO):
        stats = train_one_epoch(model, batches, mean_squared_loss, stepper, ConstantLr(), epoch=0, epochs=1,
                                print_freq=1, peak_tflops=1e-9)
    assert stats["mfu"] > 0 and "MFU" in caplog.text
    assert stats["grad_norm"] > 0
