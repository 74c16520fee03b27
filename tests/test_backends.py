"""Sparse encoder backends: parity with each other and with the dense model, true sparsity."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fcmae import random_visible_cells
from models import SparseConvNeXtV2, create_dense_model, mask_from_visible_cells, visible_cells_from_mask
from tests.conftest import output_and_gradients, randomize_grn, relative_error

PURE_TORCH_BACKENDS = ["sparse", "masked"]


def build_encoder(model_name="convnextv2_atto", backend="sparse"):
    encoder = SparseConvNeXtV2(model_name, backend=backend)
    randomize_grn(encoder)
    return encoder


@pytest.mark.parametrize("backend, model_name", [("sparse", "convnextv2_atto"), ("masked", "convnextv2_atto"),
                                                 ("sparse", "convnextv2_tiny")])
def test_zero_mask_ratio_equals_dense_feature_extractor(backend, model_name):
    encoder = build_encoder(model_name, backend).eval()
    dense = create_dense_model(model_name, num_classes=0).eval()
    dense.load_state_dict(encoder.state_dict(), strict=False)
    images = torch.randn(2, 3, 64, 96)
    every_cell = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        err = relative_error(encoder(images, every_cell), dense.forward_features(images))
    assert err < 1e-5, f"{backend} with nothing hidden differs from timm's forward_features by {err:.2e}"


@pytest.mark.parametrize(
    "model_name, size",
    # atto: 1x1-conv MLP in timm; tiny: nn.Linear MLP
    [("convnextv2_atto", (64, 64)), ("convnextv2_atto", (128, 96)), ("convnextv2_tiny", (64, 96))],
)
def test_sparse_and_masked_backends_agree_on_outputs_and_gradients(model_name, size):
    encoder = build_encoder(model_name)
    images = torch.randn(2, 3, *size)
    cells = (size[0] // 32) * (size[1] // 32)
    visible = random_visible_cells(2, cells, 0.6, generator=torch.Generator().manual_seed(3))
    masked_out, masked_grads = output_and_gradients(encoder, "masked", images, visible)
    sparse_out, sparse_grads = output_and_gradients(encoder, "sparse", images, visible)
    assert relative_error(sparse_out, masked_out) < 1e-5
    for name, grad in masked_grads.items():
        err = relative_error(sparse_grads[name], grad)
        assert err < 1e-5, f"gradient of {name} differs by {err:.2e} between sparse and masked"


@pytest.mark.parametrize("backend", PURE_TORCH_BACKENDS)
def test_hidden_cells_are_exactly_zero(backend):
    encoder = build_encoder(backend=backend)
    images = torch.randn(2, 3, 96, 96)
    visible = random_visible_cells(2, 9, 0.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = encoder(images, visible)
    hidden = mask_from_visible_cells(visible, 9).reshape(2, 1, 3, 3).bool().expand_as(out)
    assert torch.count_nonzero(out[hidden]) == 0
    assert torch.count_nonzero(out[~hidden]) == out[~hidden].numel()


@pytest.mark.parametrize("backend", PURE_TORCH_BACKENDS)
def test_masked_pixels_never_change_visible_outputs(backend):
    encoder = build_encoder(backend=backend)
    images = torch.randn(2, 3, 96, 128)
    visible = random_visible_cells(2, 12, 0.6, generator=torch.Generator().manual_seed(2))
    mask = mask_from_visible_cells(visible, 12)
    pixel_mask = mask.reshape(2, 1, 3, 1, 4, 1).expand(2, 1, 3, 32, 4, 32).reshape(2, 1, 96, 128)
    perturbed = images + 100.0 * torch.randn_like(images) * pixel_mask
    with torch.no_grad():
        before, after = encoder(images, visible), encoder(perturbed, visible)
    assert torch.equal(before, after), f"{backend}: a hidden pixel changed a visible output"


def test_visible_pixels_do_change_outputs():
    """Guards the test above from passing on an encoder that ignores its input."""
    encoder = build_encoder()
    images = torch.randn(1, 3, 64, 64)
    visible = torch.tensor([[1]])
    perturbed = images.clone()
    perturbed[:, :, :32, 32:] += 1.0  # the visible cell
    with torch.no_grad():
        assert not torch.equal(encoder(images, visible), encoder(perturbed, visible))


def encoder_flops(backend, mask_ratio, size=128, batch=2):
    encoder = build_encoder(backend=backend)
    cells = (size // 32) ** 2
    visible = random_visible_cells(batch, cells, mask_ratio, generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(torch.randn(batch, 3, size, size), visible)
    return counter.get_total_flops()


def test_sparse_backend_skips_hidden_positions():
    """The sparse encoder's counted FLOPs shrink with the visible share; masked stays dense."""
    masked = encoder_flops("masked", 0.6)
    sparse = encoder_flops("sparse", 0.6)
    visible_share = 6 / 16  # int(16 * 0.4) of 16 cells at 128 px
    assert encoder_flops("masked", 0.0) == masked, "masked backend should cost the same at any ratio"
    # everything but the dense stem and depthwise convs scales with the visible share
    assert sparse / masked < visible_share + 0.1, f"sparse/masked FLOPs {sparse / masked:.3f}"
    assert sparse / masked > visible_share


def test_unknown_backend_is_rejected_with_choices():
    with pytest.raises(ValueError, match="sparse, masked, minkowski"):
        SparseConvNeXtV2("convnextv2_atto", backend="dense")


def test_input_not_multiple_of_32_is_rejected():
    encoder = build_encoder()
    with pytest.raises(ValueError, match="multiple of 32"):
        encoder(torch.randn(1, 3, 70, 64), torch.zeros(1, 4, dtype=torch.int64))


def test_mask_with_unequal_hidden_counts_is_rejected():
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="same number"):
        visible_cells_from_mask(mask)


@pytest.mark.parametrize("backend", PURE_TORCH_BACKENDS)
def test_encoder_reads_nothing_from_the_device(backend):
    from tests.host_syncs import HostSyncCounter

    encoder = build_encoder(backend=backend)
    images = torch.randn(2, 3, 64, 96)
    visible = random_visible_cells(2, 6, 0.5, generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as counter:
        given = encoder(images, visible)
        given.square().sum().backward()
    assert counter.count == 0, counter.report()
    mask = mask_from_visible_cells(visible, 6)
    with torch.no_grad():
        assert torch.equal(given.detach(), encoder(images, visible_cells_from_mask(mask))), "the round trip differs"


def test_more_visible_cells_than_the_grid_has_are_rejected():
    with pytest.raises(ValueError, match="between 1 and the 4 cells"):
        build_encoder()(torch.randn(1, 3, 64, 64), torch.arange(5)[None])
