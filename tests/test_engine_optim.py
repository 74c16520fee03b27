"""engine.optim and engine.schedule: lr scaling, warmup + cosine values, decay-free groups."""
import math

import pytest
import torch

import fcmae
from engine.optim import build_adamw, effective_batch_size, scaled_lr
from engine.schedule import build_lr_scheduler


def test_lr_is_blr_times_effective_batch_over_256():
    effective = effective_batch_size(batch_size=64, update_freq=8, world_size=8)
    assert effective == 4096
    assert scaled_lr(1.5e-4, effective) == pytest.approx(2.4e-3)  # the FCMAE recipe's lr
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)


def lrs_over_run(base_lr, epochs, warmup_epochs, updates_per_epoch, min_lr):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_lr_scheduler(optimizer, epochs, warmup_epochs, updates_per_epoch, min_lr)
    values = []
    for update in range(epochs * updates_per_epoch + 1):
        scheduler.step_update(update)
        values.append(optimizer.param_groups[0]["lr"])
    return values


def test_schedule_warms_up_linearly_then_follows_half_cosine_to_min_lr():
    # 10 epochs x 10 updates, 2 warmup epochs: W = 20, T = 100
    lrs = lrs_over_run(base_lr=1e-3, epochs=10, warmup_epochs=2, updates_per_epoch=10, min_lr=1e-5)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(2.5e-4)
    assert lrs[10] == pytest.approx(5e-4)  # half-way through warmup
    assert lrs[20] == pytest.approx(1e-3)  # peak right after warmup
    assert lrs[60] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way through the cosine
    assert lrs[80] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lrs[99] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 79 / 80)))
    assert lrs[100] == pytest.approx(1e-5)  # end of run
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:])), "lr must not increase after warmup"


def test_schedule_without_warmup_starts_at_peak():
    lrs = lrs_over_run(base_lr=2e-4, epochs=3, warmup_epochs=0, updates_per_epoch=4, min_lr=0.0)
    assert lrs[0] == pytest.approx(2e-4)
    assert lrs[6] == pytest.approx(1e-4)


def test_schedule_scales_groups_with_lr_scale():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5},
              {"params": [torch.nn.Parameter(torch.zeros(1))]}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, epochs=4, warmup_epochs=1, updates_per_epoch=2)
    scheduler.step_update(2)  # end of warmup: peak
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4, 1e-3])


def test_no_weight_decay_on_norms_biases_grn_and_mask_token():
    model = fcmae.build_fcmae("convnextv2_atto", decoder_dim=64)
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.05)
    names = {id(param): name for name, param in model.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}

    # the oracle: parameters of norm and GRN modules, every bias, and the mask token
    norm_like = {f"{module_name}.{param_name}" for module_name, module in model.named_modules()
                 if "Norm" in type(module).__name__ for param_name, _ in module.named_parameters(recurse=False)}
    expected_no_decay = norm_like | {n for n in names.values() if n.endswith(".bias")} | {"mask_token"}

    assert no_decay | decay == set(names.values()) and not no_decay & decay
    assert no_decay == expected_no_decay
    assert {"encoder.stages.0.blocks.0.mlp.grn.weight", "encoder.stages.1.downsample.0.weight",
            "encoder.stem.1.weight", "decoder.0.mlp.grn.bias"} <= no_decay
    assert "encoder.stages.0.blocks.0.mlp.fc1.weight" in decay
    assert optimizer.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_adamw_is_fused_exactly_when_the_parameters_are_on_cuda(device):
    model = torch.nn.Linear(4, 2).to(device)
    assert bool(build_adamw(model, lr=1e-3, weight_decay=0.05).defaults["fused"]) is (device == "cuda")
