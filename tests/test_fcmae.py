"""FCMAE model: masking, patch order, loss semantics, initialisation, backends."""
import pytest
import torch

from fcmae import (build_fcmae, keep_count, mask_from_visible_cells, patchify, random_visible_cells, unpatchify,
                   visible_cells_from_mask)
from tests.conftest import randomize_grn, relative_error


@pytest.mark.parametrize("num_cells, ratio", [(49, 0.6), (49, 0.75), (16, 0.6), (4, 0.6), (6, 0.0)])
def test_random_masking_hides_same_count_in_every_image(num_cells, ratio):
    visible = random_visible_cells(8, num_cells, ratio, generator=torch.Generator().manual_seed(0))
    expected_hidden = num_cells - int(num_cells * (1 - ratio))
    assert visible.shape == (8, num_cells - expected_hidden) and visible.dtype == torch.int64
    assert torch.all(visible[:, 1:] > visible[:, :-1]), "visible cells must be distinct and ascending"
    assert 0 <= visible.min() and visible.max() < num_cells
    mask = mask_from_visible_cells(visible, num_cells)
    assert mask.shape == (8, num_cells)
    assert torch.all(mask.sum(dim=1) == expected_hidden)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(visible_cells_from_mask(mask), visible), "mask -> visible cells is not the inverse"


def test_random_masking_differs_between_images_and_is_seeded():
    first = random_visible_cells(16, 49, 0.6, generator=torch.Generator().manual_seed(5))
    again = random_visible_cells(16, 49, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert len({tuple(row.tolist()) for row in first}) > 1


def test_keep_count_follows_official_formula():
    assert keep_count(49, 0.6) == 19  # 7x7 grid at 224 px
    assert keep_count(144, 0.6) == 57  # 12x12 grid at 384 px


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_mask_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_visible_cells(1, 49, ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        build_fcmae("convnextv2_atto", mask_ratio=ratio)


def test_patchify_orders_pixels_row_col_channel():
    images = torch.randn(2, 3, 64, 96)
    patches = patchify(images)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    # patch 4 = grid row 1, col 1; pixel (p, q) channel c sits at (p * 32 + q) * 3 + c
    patch = images[1, :, 32:64, 32:64].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 4], patch)
    assert torch.equal(unpatchify(patches, (2, 3)), images)


@pytest.fixture(scope="module")
def tiny_fcmae():
    torch.manual_seed(0)
    model = build_fcmae("convnextv2_atto", decoder_dim=64)
    randomize_grn(model)
    return model


def manual_loss(images, pred, mask, norm_pix):
    target = patchify(images)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_mean_patch_mse_over_hidden_patches(tiny_fcmae, norm_pix):
    tiny_fcmae.norm_pix_loss = norm_pix
    images = torch.randn(2, 3, 96, 96)
    loss, pred, mask = tiny_fcmae(images)
    assert loss.item() == pytest.approx(manual_loss(images, pred, mask, norm_pix).item(), rel=1e-5)
    tiny_fcmae.norm_pix_loss = True


def test_norm_pix_loss_can_be_switched_off():
    model = build_fcmae("convnextv2_atto", decoder_dim=64, norm_pix_loss=False)
    assert model.norm_pix_loss is False
    images = torch.full((1, 3, 64, 64), 5.0)  # constant patches: norm-pix target would be 0
    visible = torch.tensor([[3]])  # cells 0-2 hidden
    with torch.no_grad():
        _, pred, _ = model(images, visible)
        expected = ((pred[:, :3] - 5.0) ** 2).mean()
        assert model(images, visible)[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_visible_patch_predictions_do_not_enter_the_loss(tiny_fcmae):
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        _, pred, _ = tiny_fcmae(images, visible_cells_from_mask(mask))
        base = tiny_fcmae.loss(images, pred, mask)
        changed = pred.clone()
        changed[mask == 0] += 10.0
        assert tiny_fcmae.loss(images, changed, mask).item() == pytest.approx(base.item(), rel=1e-6)
        changed[mask == 1] += 10.0
        assert tiny_fcmae.loss(images, changed, mask).item() > base.item() + 1.0


@pytest.mark.parametrize("size", [(64, 64), (64, 128), (96, 64)])
def test_any_multiple_of_32_input_size(tiny_fcmae, size):
    images = torch.randn(2, 3, *size)
    cells = (size[0] // 32) * (size[1] // 32)
    loss, pred, mask = tiny_fcmae(images)
    assert pred.shape == (2, cells, 32 * 32 * 3)
    assert mask.shape == (2, cells)
    assert torch.isfinite(loss)


def test_input_size_not_multiple_of_32_names_the_fix(tiny_fcmae):
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_fcmae(torch.randn(1, 3, 100, 64))


def test_weights_are_initialised_once_with_std_002():
    torch.manual_seed(1)
    model = build_fcmae("convnextv2_tiny")
    for name, param in model.named_parameters():
        if name.endswith("bias") and "norm" not in name and "grn" not in name and "downsample.0" not in name \
                and "stem.1" not in name:
            assert torch.count_nonzero(param) == 0, f"{name} bias should start at zero"
        if ".grn." in name:
            assert torch.count_nonzero(param) == 0, f"{name}: GRN gamma/beta start at zero"
        if param.ndim >= 2 and param.numel() >= 4096:
            std = param.std().item()
            assert 0.015 < std < 0.025, f"{name} std {std:.4f}; expected trunc-normal 0.02 (official code re-init: 1.0)"


def test_sparse_and_masked_fcmae_agree_on_loss_and_gradients():
    model = build_fcmae("convnextv2_atto", decoder_dim=64)
    randomize_grn(model)
    images = torch.randn(2, 3, 96, 64)
    visible = random_visible_cells(2, 6, 0.6, generator=torch.Generator().manual_seed(4))
    results = {}
    for backend in ["masked", "sparse"]:
        model.encoder.backend = backend
        model.zero_grad()
        loss, _, _ = model(images, visible)
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert results["sparse"][0] == pytest.approx(results["masked"][0], rel=1e-5)
    for name, grad in results["masked"][1].items():
        err = (results["sparse"][1][name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)
        assert err < 1e-5, f"{name}: {err:.2e}"


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = build_fcmae("convnextv2_atto", decoder_dim=64)
    images = torch.randn(4, 3, 64, 64)
    visible = random_visible_cells(4, 4, 0.6, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _, _ = model(images, visible)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("backend", ["sparse", "masked"])
def test_training_forward_and_backward_make_no_host_sync(backend):
    """Drawn by the model, or given as visible cells of any ratio: nothing waits for the device."""
    from tests.host_syncs import HostSyncCounter

    model = build_fcmae("convnextv2_atto", backend=backend, decoder_dim=64)
    images = torch.randn(2, 3, 64, 96)
    with HostSyncCounter() as counter:
        model(images)[0].backward()  # the model's own mask
        visible = random_visible_cells(2, 6, 0.5, generator=torch.Generator().manual_seed(0))  # another ratio
        model(images, visible)[0].backward()
    assert counter.count == 0, f"{backend}: {counter.report()}"
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0


def test_a_given_mask_of_another_ratio_runs_sync_free_with_its_own_kept_count():
    """The kept count comes from the visible cells' shape, not from the model's ratio: the sparse
    backend gives the masked reference's loss for that mask, and nothing waits for the device."""
    from tests.host_syncs import HostSyncCounter

    model = build_fcmae("convnextv2_atto", decoder_dim=64)  # sparse; ratio 0.6 keeps 2 of 6 cells
    randomize_grn(model)
    images = torch.randn(2, 3, 64, 96)
    visible = random_visible_cells(2, 6, 0.4, generator=torch.Generator().manual_seed(1))  # keeps 3 of 6
    with HostSyncCounter() as counter, torch.no_grad():
        _, pred, mask = model(images, visible)
    assert counter.count == 0, counter.report()
    assert torch.all(mask.sum(dim=1) == 3)
    model.encoder.backend = "masked"  # dense with binary masks: no kept count at all
    with torch.no_grad():
        _, reference, _ = model(images, visible)
    assert relative_error(pred, reference) < 1e-5


def test_a_given_mask_is_checked_once_where_it_becomes_visible_cells(tiny_fcmae):
    from tests.host_syncs import HostSyncCounter

    mask = mask_from_visible_cells(random_visible_cells(2, 4, 0.6, generator=torch.Generator().manual_seed(0)), 4)
    with HostSyncCounter() as checking:
        visible = visible_cells_from_mask(mask)
    with HostSyncCounter() as running, torch.no_grad():
        tiny_fcmae(torch.randn(2, 3, 64, 64), visible)
    assert checking.count == 1, checking.report()
    assert running.count == 0, running.report()


def test_the_model_draws_its_own_ratio_from_the_devices_generator(tiny_fcmae):
    """One owner of the mask ratio: the model. Reseeding the default generator (as the training
    loop does per micro-batch) reproduces the mask; it is the one random_visible_cells draws."""
    images = torch.randn(2, 3, 96, 96)
    torch.manual_seed(11)
    with torch.no_grad():
        _, _, mask = tiny_fcmae(images)
    assert torch.all(mask.sum(dim=1) == 9 - keep_count(9, tiny_fcmae.mask_ratio))
    expected = random_visible_cells(2, 9, tiny_fcmae.mask_ratio, generator=torch.Generator().manual_seed(11))
    assert torch.equal(mask, mask_from_visible_cells(expected, 9))


def test_given_mask_of_another_ratio_is_used_as_given(tiny_fcmae):
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])  # keeps 2 of 4; the model's ratio keeps 1
    loss, _, returned = tiny_fcmae(images, visible_cells_from_mask(mask))
    assert torch.equal(returned, mask)
    tiny_fcmae.encoder.backend = "masked"  # the reference semantics, which never uses a kept count
    reference, _, _ = tiny_fcmae(images, visible_cells_from_mask(mask))
    tiny_fcmae.encoder.backend = "sparse"
    assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())


@pytest.mark.parametrize("mask, message", [
    ([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], "same number"),
    ([[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.0]], "0 \\(visible\\) or 1 \\(hidden\\)"),
    ([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], "hides every cell"),
])
def test_bad_mask_is_rejected_where_it_becomes_visible_cells(mask, message):
    with pytest.raises(ValueError, match=message):
        visible_cells_from_mask(torch.tensor(mask))


@pytest.mark.parametrize("visible, message", [
    (torch.zeros(2, 6, dtype=torch.int64), "between 1 and the 4 cells"),  # more cells than the grid has
    (torch.zeros(3, 1, dtype=torch.int64), r"N = 2"),  # another batch size
    (torch.zeros(2, 1), "integer"),  # a float mask passed where visible cells belong
])
def test_visible_cells_of_wrong_shape_or_type_are_rejected(tiny_fcmae, visible, message):
    with pytest.raises(ValueError, match=message):
        tiny_fcmae(torch.randn(2, 3, 64, 64), visible)
