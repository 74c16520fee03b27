"""On a CUDA device: backend parity in fp32 and bf16, training steps that never wait for the GPU
between log points, a compiled FCMAE step, a fine-tuning step.

Marked ``cuda`` (``pytest -m cuda``; ``bash scripts/gpu_check.sh`` runs them) and skipped
without CUDA. They use the CLIs' own loss functions and ``engine.stepper.GradientStepper``.
"""
import contextlib
import math

import pytest
import torch

from engine.compat import TF32, get_tf32, set_tf32
from engine.flops import peak_tflops
from engine.loop import Step
from engine.optim import build_adamw
from engine.stepper import GradientStepper, build_model_ema
from fcmae import build_fcmae, keep_count, mask_from_visible_cells, random_visible_cells
from finetune.mixup import build_mixup, build_train_criterion
from finetune.model import build_finetune_model
from finetune_helpers import load_finetune_script
from models import SparseConvNeXtV2
from tests.conftest import randomize_grn, relative_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32(restore_tf32):
    """fp32 means fp32 here: no TF32 in matmuls and convolutions (engine.compat, as the CLIs set it)."""
    set_tf32(matmul=False, conv=False)


@contextlib.contextmanager
def no_host_sync():
    """Any operation that makes the host wait for the GPU raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_masks_are_drawn_on_the_generators_device():
    cuda_cells = random_visible_cells(4, 49, 0.6, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE)
    assert cuda_cells.is_cuda
    assert torch.all(mask_from_visible_cells(cuda_cells, 49).sum(dim=1) == 49 - keep_count(49, 0.6))
    with no_host_sync():  # CPU noise, pinned, copied without blocking
        copied = random_visible_cells(4, 49, 0.6, generator=torch.Generator().manual_seed(0), device=DEVICE)
    assert torch.equal(copied.cpu(), random_visible_cells(4, 49, 0.6, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_sparse_and_masked_backends_agree_on_cuda(dtype, tolerance):
    encoder = SparseConvNeXtV2("convnextv2_atto").to(DEVICE)
    randomize_grn(encoder)
    images = torch.randn(4, 3, 96, 128, device=DEVICE)
    visible = random_visible_cells(4, 12, 0.6, generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE)
    projection = torch.randn(4, 320, 3, 4, device=DEVICE)
    results = {}
    for backend in ["masked", "sparse"]:
        encoder.backend = backend
        encoder.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = encoder(images, visible)
        (out.float() * projection).sum().backward()
        results[backend] = out.float(), {name: param.grad.clone() for name, param in encoder.named_parameters()}
    assert relative_error(results["sparse"][0], results["masked"][0]) < tolerance
    for name, grad in results["masked"][1].items():
        err = relative_error(results["sparse"][1][name], grad)
        assert err < tolerance, f"{dtype}: gradient of {name} differs by {err:.2e} between sparse and masked"


def pretrain_pieces():
    import pretrain

    args = pretrain.build_parser().parse_args(["--model", "convnextv2_atto", "--input_size", "64"])
    model = build_fcmae(args.model, mask_ratio=args.mask_ratio, decoder_dim=64).to(DEVICE)
    stepper = GradientStepper(model, build_adamw(model, 1e-4, 0.05, (0.9, 0.95)), "bf16", update_freq=2, clip_grad=1.0)
    return model, stepper, pretrain.make_loss_fn(DEVICE)


def run_micro_batches(model, stepper, loss_fn, batches, first_iteration=0):
    losses = []
    for offset, batch in enumerate(batches):
        iteration = first_iteration + offset
        with stepper.micro_batch(iteration):
            with stepper.autocast():
                loss, _ = loss_fn(model, batch, Step(0, iteration, iteration // stepper.update_freq))
            stepper.backward(loss)
        if stepper.ends_update(iteration):
            stepper.step()
        losses.append(loss.detach())
    return losses


def image_batches(count, num_classes=10, size=64, batch=8):
    """``count`` (images, labels) batches in pinned memory, as the DataLoader hands them over."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=generator).pin_memory(),
             torch.randint(num_classes, (batch,), generator=generator).pin_memory()) for _ in range(count)]


def test_pretraining_micro_batches_never_wait_for_the_gpu():
    model, stepper, loss_fn = pretrain_pieces()
    run_micro_batches(model, stepper, loss_fn, image_batches(2))  # first update: CUDA/cuBLAS set-up
    before = [param.detach().clone() for param in model.parameters()]
    with no_host_sync():
        losses = run_micro_batches(model, stepper, loss_fn, image_batches(4), first_iteration=2)
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters())), "no update happened"


def test_pretraining_cli_runs_in_fp32_with_tf32_and_reports_mfu(tmp_path):
    """``pretrain.py --amp none --device cuda``: the CLI turns TF32 on and the MFU reads it back."""
    import pretrain

    output = tmp_path / "out"
    stats = pretrain.main(["--device", "cuda", "--amp", "none", "--input_size", "64", "--batch_size", "4",
                           "--embedded_samples", "8", "--epochs", "1", "--warmup_epochs", "0", "--print_freq", "1",
                           "--num_workers", "0", "--output_dir", str(output)])
    assert get_tf32() == TF32(matmul=True, conv=True)
    assert math.isfinite(stats["loss"]) and (output / "checkpoint-1.pth").exists()
    if peak_tflops(torch.cuda.get_device_name(), "tf32") is not None:
        assert 0 < stats["mfu"] < 1, stats


def test_compiled_fcmae_step_matches_eager():
    model = build_fcmae("convnextv2_atto", decoder_dim=64).to(DEVICE)
    randomize_grn(model)
    images = torch.randn(8, 3, 64, 64, device=DEVICE)
    visible = model.random_visible_cells(images, torch.Generator(DEVICE).manual_seed(0))
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for run in (model, compiled):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(images, visible)[0]
        loss.backward()
        results.append((loss.detach(), model.encoder.stem[0].weight.grad.clone()))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    assert relative_error(compiled_loss, eager_loss) < 2e-2
    assert relative_error(compiled_grad, eager_grad) < 5e-2
    with no_host_sync():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            compiled(images, visible)[0].backward()


def test_finetuning_micro_batches_never_wait_for_the_gpu():
    """Mixup/CutMix, soft-target loss, EMA update after each optimizer step, as finetune.py runs them."""
    cli = load_finetune_script()
    model = build_finetune_model("convnextv2_atto", num_classes=10, drop_path=0.1).to(DEVICE)
    mixup_fn = build_mixup(10, mixup=0.8, cutmix=1.0, smoothing=0.1)
    optimizer = build_adamw(model, 1e-4, 0.05, (0.9, 0.999))
    stepper = GradientStepper(model, optimizer, amp="bf16", update_freq=2, clip_grad=1.0,
                              ema=build_model_ema(model, 0.9999))
    loss_fn = cli.make_loss_fn(mixup_fn, build_train_criterion(mixup_fn, 0.1), DEVICE)
    run_micro_batches(model, stepper, loss_fn, image_batches(2))
    before = [param.detach().clone() for param in model.parameters()]
    with no_host_sync():
        losses = run_micro_batches(model, stepper, loss_fn, image_batches(4), first_iteration=2)
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters())), "no update happened"
