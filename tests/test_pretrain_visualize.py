"""fcmae.visualize: reconstruction grids un-normalise norm-pix predictions patch by patch."""
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import fcmae
from fcmae.visualize import HIDDEN_GREY, predicted_images, reconstruction_grid, visualize_reconstructions

torch.set_num_threads(1)


def normalised_patches(images):
    target = fcmae.patchify(images)
    return (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5


def display(images):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).reshape(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def test_perfect_norm_pix_prediction_maps_back_to_the_image():
    images = torch.randn(2, 3, 64, 96)
    restored = predicted_images(images, normalised_patches(images), norm_pix_loss=True)
    torch.testing.assert_close(restored, images, atol=1e-4, rtol=1e-4)
    raw = predicted_images(images, fcmae.patchify(images), norm_pix_loss=False)
    torch.testing.assert_close(raw, images)


def test_grid_columns_are_original_masked_prediction_and_pasted():
    images = torch.randn(3, 3, 64, 64).clamp(-2, 2)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    wrong_prediction = torch.zeros(3, 4, 32 * 32 * 3)  # = each patch's own mean colour
    grid = reconstruction_grid(images, wrong_prediction, mask, norm_pix_loss=True)

    tile, pad = 64, 2
    assert grid.shape == (3, 3 * (tile + pad) + pad, 4 * (tile + pad) + pad)

    def cell(row, column):
        top, left = pad + row * (tile + pad), pad + column * (tile + pad)
        return grid[:, top:top + tile, left:left + tile]

    shown = display(images)
    torch.testing.assert_close(cell(1, 0), shown[1], atol=1e-6, rtol=0)
    assert torch.all(cell(1, 1)[:, :32, 32:] == HIDDEN_GREY)  # cell 1 of image 1 is hidden
    torch.testing.assert_close(cell(1, 1)[:, :32, :32], shown[1][:, :32, :32], atol=1e-6, rtol=0)
    # a zero norm-pix prediction un-normalises to the patch's mean value (over pixels and channels)
    patch_mean = images[1, :, :32, 32:].mean()
    flat = cell(1, 2)[:, :32, 32:]
    torch.testing.assert_close(flat, display(patch_mean.expand(1, 3, 32, 32))[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cell(1, 3)[:, :32, :32], shown[1][:, :32, :32], atol=1e-6, rtol=0)  # visible kept
    torch.testing.assert_close(cell(1, 3)[:, :32, 32:], flat, atol=1e-6, rtol=0)  # hidden replaced


def test_visualize_reconstructions_runs_the_model_without_changing_mode():
    model = fcmae.build_fcmae("convnextv2_atto", decoder_dim=64).train()
    images = torch.randn(2, 3, 64, 64)
    mask = fcmae.random_masking(2, 4, 0.6, generator=torch.Generator().manual_seed(0))
    grid = visualize_reconstructions(model, images, mask)
    assert grid.shape == (3, 2 * 66 + 2, 4 * 66 + 2) and 0 <= grid.min() and grid.max() <= 1
    assert model.training
