"""Activation checkpointing: the same gradients as without it, and less activation memory kept."""
import pytest
import torch

from benchmarks.memory_table import saved_activation_bytes
from fcmae import build_fcmae, random_visible_cells
from finetune.model import build_finetune_model
from models import SparseConvNeXtV2
from models.backends.minkowski import import_minkowski
from tests.conftest import randomize_grn, relative_error

try:
    import_minkowski()
    BACKENDS = ["sparse", "masked", "minkowski"]
except ImportError:
    BACKENDS = ["sparse", "masked"]


def gradients_and_saved_bytes(model, loss_fn, checkpointing: bool, seed: int = 0):
    """Parameter gradients of ``loss_fn(model)`` and the activation bytes autograd kept for them."""
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad()
    torch.manual_seed(seed)  # the same drop-path draws in both runs
    saved = saved_activation_bytes(lambda: loss_fn(model).backward(), model.parameters())
    return {name: param.grad.clone() for name, param in model.named_parameters()}, saved


def assert_same_gradients_less_memory(model, loss_fn, max_memory_share):
    plain_grads, plain_bytes = gradients_and_saved_bytes(model, loss_fn, checkpointing=False)
    checkpointed_grads, checkpointed_bytes = gradients_and_saved_bytes(model, loss_fn, checkpointing=True)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, f"{name} got no gradient; the comparison would be vacuous"
        err = relative_error(checkpointed_grads[name], grad)
        assert err < 1e-6, f"gradient of {name} changed by {err:.2e} under checkpointing"
    share = checkpointed_bytes / plain_bytes
    assert share < max_memory_share, (
        f"checkpointing kept {checkpointed_bytes} activation bytes vs {plain_bytes} without ({share:.2f})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_checkpointing_keeps_gradients_and_saves_memory(backend):
    encoder = SparseConvNeXtV2("convnextv2_atto", backend=backend, drop_path_rate=0.2)
    randomize_grn(encoder)
    images = torch.randn(2, 3, 96, 64)
    visible = random_visible_cells(2, 6, 0.5, generator=torch.Generator().manual_seed(0))
    projection = torch.randn(2, 320, 3, 2)
    assert_same_gradients_less_memory(encoder, lambda model: (model(images, visible) * projection).sum(),
                                      max_memory_share=0.5)


def test_build_fcmae_grad_checkpointing_reaches_the_encoder():
    model = build_fcmae("convnextv2_atto", decoder_dim=64, grad_checkpointing=True)
    assert model.encoder.grad_checkpointing
    images = torch.randn(2, 3, 64, 64)
    visible = model.random_visible_cells(images, torch.Generator().manual_seed(0))
    # the decoder keeps its activations: the share is higher than the encoder's alone
    assert_same_gradients_less_memory(model, lambda fcmae: fcmae(images, visible)[0],
                                      max_memory_share=0.7)


def test_finetune_model_checkpointing_keeps_gradients_and_saves_memory():
    model = build_finetune_model("convnextv2_atto", num_classes=10, drop_path=0.1, grad_checkpointing=True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    randomize_grn(model)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    assert_same_gradients_less_memory(model, lambda m: torch.nn.functional.cross_entropy(m(images), labels),
                                      max_memory_share=0.5)


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_memory_table_computes_on_fake_tensors_what_real_ones_keep(task):
    """docs/MEMORY.md computes the big sizes on fake tensors; for atto that must be the measured figure."""
    from benchmarks.memory_table import activation_bytes

    for checkpointing in (False, True):
        real = activation_bytes(task, "convnextv2_atto", 1, bf16=False, checkpointing=checkpointing, fake=False)
        fake = activation_bytes(task, "convnextv2_atto", 1, bf16=False, checkpointing=checkpointing, fake=True)
        assert real == fake, f"{task}, checkpointing={checkpointing}: measured {real} bytes, computed {fake}"
