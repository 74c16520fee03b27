"""FCMAE model: masking, patch order, loss semantics, initialisation, backends."""
import pytest
import torch

from fcmae import build_fcmae, keep_count, patchify, random_masking, unpatchify
from tests.conftest import randomize_grn


@pytest.mark.parametrize("num_cells, ratio", [(49, 0.6), (49, 0.75), (16, 0.6), (4, 0.6), (6, 0.0)])
def test_random_masking_hides_same_count_in_every_image(num_cells, ratio):
    mask = random_masking(8, num_cells, ratio, generator=torch.Generator().manual_seed(0))
    expected_hidden = num_cells - int(num_cells * (1 - ratio))
    assert mask.shape == (8, num_cells)
    assert torch.all(mask.sum(dim=1) == expected_hidden)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_random_masking_differs_between_images_and_is_seeded():
    first = random_masking(16, 49, 0.6, generator=torch.Generator().manual_seed(5))
    again = random_masking(16, 49, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert len({tuple(row.tolist()) for row in first}) > 1


def test_keep_count_follows_official_formula():
    assert keep_count(49, 0.6) == 19  # 7x7 grid at 224 px
    assert keep_count(144, 0.6) == 57  # 12x12 grid at 384 px


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_mask_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 49, ratio)
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
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        _, pred, _ = model(images, mask)
        expected = ((pred[:, :3] - 5.0) ** 2).mean()
        assert model(images, mask)[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_visible_patch_predictions_do_not_enter_the_loss(tiny_fcmae):
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        _, pred, _ = tiny_fcmae(images, mask)
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
    mask = random_masking(2, 6, 0.6, generator=torch.Generator().manual_seed(4))
    results = {}
    for backend in ["masked", "sparse"]:
        model.encoder.backend = backend
        model.zero_grad()
        loss, _, _ = model(images, mask)
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
    mask = random_masking(4, 4, 0.6, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _, _ = model(images, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("backend", ["sparse", "masked"])
def test_training_forward_and_backward_make_no_host_sync(backend):
    """A mask fresh from random_masking, passed with check_mask=False: nothing waits for the device."""
    from tests.host_syncs import HostSyncCounter

    model = build_fcmae("convnextv2_atto", backend=backend, decoder_dim=64)
    images = torch.randn(2, 3, 64, 96)
    with HostSyncCounter() as counter:
        mask = random_masking(2, 6, model.mask_ratio, generator=torch.Generator().manual_seed(0), device="cpu")
        loss, _, _ = model(images, mask, check_mask=False)
        loss.backward()
        model(images)[0].backward()  # mask drawn inside: no check needed either
    assert counter.count == 0, f"{backend}: {counter.report()}"
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0


def test_given_mask_is_checked_with_one_sync(tiny_fcmae):
    from tests.host_syncs import HostSyncCounter

    mask = random_masking(2, 4, tiny_fcmae.mask_ratio, generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as counter, torch.no_grad():
        tiny_fcmae(torch.randn(2, 3, 64, 64), mask)
    assert counter.count == 1, counter.report()


def test_given_mask_of_another_ratio_is_used_as_given(tiny_fcmae):
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])  # keeps 2 of 4; the model's ratio keeps 1
    loss, _, returned = tiny_fcmae(images, mask)
    assert torch.equal(returned, mask)
    tiny_fcmae.encoder.backend = "masked"  # the reference semantics, which never uses a kept count
    reference, _, _ = tiny_fcmae(images, mask)
    assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())


@pytest.mark.parametrize("mask, message", [
    ([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], "same number"),
    ([[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.0]], "0 \\(visible\\) or 1 \\(hidden\\)"),
])
def test_bad_mask_is_rejected_at_the_fcmae_boundary(tiny_fcmae, mask, message):
    with pytest.raises(ValueError, match=message):
        tiny_fcmae(torch.randn(2, 3, 64, 64), torch.tensor(mask))


def test_mask_of_wrong_shape_is_rejected_even_unchecked(tiny_fcmae):
    with pytest.raises(ValueError, match=r"mask must be \(N, L\) = \(2, 4\)"):
        tiny_fcmae(torch.randn(2, 3, 64, 64), torch.zeros(2, 6), check_mask=False)
