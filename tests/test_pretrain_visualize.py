"""fcmae.visualize: labelled reconstruction pictures, honest about norm-pix statistics, and a CLI
that redraws pretraining's own picture from its checkpoint."""
import numpy as np
import pytest
import timm
import torch
from image_folders import make_image_folder
from PIL import Image
from safetensors.torch import load_file
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid

import fcmae
import pretrain
from fcmae.visualize import (HIDDEN_GREY, PADDING, main, predicted_images, predicted_images_visible_stats,
                             reconstruction_columns, reconstruction_grid, visualize_reconstructions)

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


def test_columns_are_original_masked_reconstruction_pasted_and_visible_stats():
    images = torch.randn(3, 3, 64, 64).clamp(-2, 2)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    wrong_prediction = torch.zeros(3, 4, 32 * 32 * 3)  # = each patch's own mean colour
    original, masked, reconstruction, pasted, visible_stats = reconstruction_columns(
        images, wrong_prediction, mask, norm_pix_loss=True)
    shown = display(images)
    torch.testing.assert_close(original, shown, atol=1e-6, rtol=0)
    assert torch.all(masked[1, :, :32, 32:] == HIDDEN_GREY)  # cell 1 of image 1 is hidden
    torch.testing.assert_close(masked[1, :, :32, :32], shown[1, :, :32, :32], atol=1e-6, rtol=0)
    # a zero norm-pix prediction un-normalises to the true patch's mean value (over pixels and channels)
    patch_mean = images[1, :, :32, 32:].mean()
    flat = reconstruction[1, :, :32, 32:]
    torch.testing.assert_close(flat, display(patch_mean.expand(1, 3, 32, 32))[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pasted[1, :, :32, :32], shown[1, :, :32, :32], atol=1e-6, rtol=0)  # visible kept
    torch.testing.assert_close(pasted[1, :, :32, 32:], flat, atol=1e-6, rtol=0)  # hidden replaced
    # the honest column: the mean of the visible pixels of image 1 (cells 0 and 3), not the true patch's
    visible_mean = torch.cat([images[1, :, :32, :32].flatten(), images[1, :, 32:, 32:].flatten()]).mean()
    torch.testing.assert_close(visible_stats[1, :, :32, 32:], display(visible_mean.expand(1, 3, 32, 32))[0],
                               atol=1e-5, rtol=0)
    assert len(reconstruction_columns(images, wrong_prediction, mask, norm_pix_loss=False)) == 4


def test_visible_stats_view_ignores_the_hidden_pixels_the_true_stats_view_uses():
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    pred = torch.randn(2, 4, 32 * 32 * 3)
    brighter = images.clone()
    brighter[0, :, :32, :32] += 3.0  # a hidden cell of image 0
    torch.testing.assert_close(predicted_images_visible_stats(brighter, pred, mask),
                               predicted_images_visible_stats(images, pred, mask), rtol=0, atol=0)
    assert not torch.allclose(predicted_images(brighter, pred, True), predicted_images(images, pred, True))


def test_picture_is_the_tile_grid_with_labels_above_and_a_legend_below():
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    pred = torch.randn(2, 4, 32 * 32 * 3)
    picture = reconstruction_grid(images, pred, mask, norm_pix_loss=True)
    columns = reconstruction_columns(images, pred, mask, norm_pix_loss=True)
    tiles = make_grid(torch.stack(columns, 1).flatten(0, 1), nrow=5, padding=PADDING, pad_value=1.0)
    tiles = tiles.mul(255).add(0.5).clamp(0, 255).floor() / 255  # 8-bit, as the PNG stores it
    assert picture.shape[2] == tiles.shape[2] and picture.shape[1] > tiles.shape[1]
    header = next(top for top in range(picture.shape[1] - tiles.shape[1] + 1)
                  if torch.allclose(picture[:, top:top + tiles.shape[1]], tiles, atol=1e-6))
    assert header > 0, "no room for the column labels"
    tile_width = 64 + PADDING
    for column in range(5):  # dark text above every column
        label_area = picture[:, :header, PADDING + column * tile_width:(column + 1) * tile_width]
        assert label_area.min() < 0.5, f"column {column} has no label"
    assert picture[:, header + tiles.shape[1]:].min() < 0.5, "no legend under the grid"


def test_visualize_reconstructions_runs_the_model_without_changing_mode():
    model = fcmae.build_fcmae("convnextv2_atto", decoder_dim=64).train()
    images = torch.randn(2, 3, 64, 64)
    picture = visualize_reconstructions(model, images, seed=0)
    assert picture.shape[0] == 3 and picture.shape[2] == 5 * 66 + 2 and 0 <= picture.min() and picture.max() <= 1
    assert model.training


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """One 1-epoch pretraining run on a tiny image folder."""
    root = tmp_path_factory.mktemp("recon_run")
    data = make_image_folder(root / "data", classes=3, per_class=4)
    output = root / "out"
    pretrain.main(["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "4", "--epochs", "1",
                   "--warmup_epochs", "0", "--data_path", str(data), "--output_dir", str(output),
                   "--num_workers", "0", "--seed", "3", "--mask_ratio", "0.5", "--device", "cpu"])
    return data, output


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_redraws_pretrainings_picture_pixel_for_pixel(pretrained_run, tmp_path):
    data, output = pretrained_run
    checkpoint = output / "checkpoint-1.pth"
    main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "default.png"), "--device", "cpu"])
    main(["--checkpoint", str(checkpoint), "--images", str(data), "--seed", "3", "--mask_ratio", "0.5",
          "--input_size", "64", "--output", str(tmp_path / "explicit.png"), "--device", "cpu"])
    expected = pixels(output / "reconstruction.png")
    assert expected.shape[1] == 5 * 66 + 2  # five labelled columns at 64 px
    np.testing.assert_array_equal(pixels(tmp_path / "default.png"), expected)
    np.testing.assert_array_equal(pixels(tmp_path / "explicit.png"), expected)
    main(["--checkpoint", str(checkpoint), "--seed", "4", "--output", str(tmp_path / "other_seed.png"),
          "--device", "cpu"])
    assert not np.array_equal(pixels(tmp_path / "other_seed.png"), expected)


def test_pretraining_export_loads_strictly_into_timm(pretrained_run):
    _, output = pretrained_run
    model = timm.create_model("convnextv2_atto", num_classes=0, pretrained=False)
    model.load_state_dict(load_file(output / "encoder.safetensors"))  # strict
    checkpoint = torch.load(output / "checkpoint-1.pth", weights_only=True)
    assert torch.equal(model.stem[0].weight, checkpoint["model"]["encoder.stem.0.weight"])


def test_cli_refuses_an_encoder_only_file_saying_the_decoder_is_needed(pretrained_run, tmp_path, capsys):
    _, output = pretrained_run
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(output / "encoder.safetensors"), "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "encoder.safetensors has no FCMAE decoder" in error and "checkpoint-<epoch>.pth" in error
    assert not (tmp_path / "x.png").exists()


def test_cli_takes_single_image_files(pretrained_run, tmp_path):
    data, output = pretrained_run
    files = sorted(str(path) for path in data.rglob("*.jpg"))[:2]
    main(["--checkpoint", str(output / "checkpoint-1.pth"), "--images", *files, "--output", str(tmp_path / "two.png"),
          "--device", "cpu"])
    picture = pixels(tmp_path / "two.png")
    assert picture.shape[0] > 2 * 66 and picture.shape[0] < 4 * 66  # two rows plus labels and legend


def test_cli_redraws_the_embedded_photo_picture_of_a_run_without_data_path(tmp_path):
    output = tmp_path / "out"
    pretrain.main(["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "4", "--epochs", "1",
                   "--warmup_epochs", "0", "--embedded_samples", "8", "--output_dir", str(output),
                   "--num_workers", "0", "--device", "cpu"])
    main(["--checkpoint", str(output / "checkpoint-1.pth"), "--output", str(tmp_path / "redrawn.png"),
          "--device", "cpu"])
    np.testing.assert_array_equal(pixels(tmp_path / "redrawn.png"), pixels(output / "reconstruction.png"))


def test_cli_reports_each_bad_value_on_its_own_line_without_a_usage_block(pretrained_run, tmp_path, capsys):
    _, output = pretrained_run
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(output / "checkpoint-1.pth"), "--output", str(tmp_path / "x.jpg"),
              "--input_size", "100", "--mask_ratio", "1.5", "--max_images", "0", "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    lines = error.splitlines()
    for line in ("  --output '" + str(tmp_path / "x.jpg") + "': the file name must end in .png",
                 "  --input_size 100: must be a multiple of the checkpoint's mask patch (32; 16 with a stride-2 stem), "
                 "e.g. 224",
                 "  --mask_ratio 1.5: must be in [0, 1): the fraction of patches hidden",
                 "  --max_images 0: must be >= 1 (rows of the picture)"):
        assert line in lines, error
    assert "usage:" not in error
    assert not list(tmp_path.iterdir())


def test_cli_runs_the_model_without_building_an_autograd_graph(pretrained_run, tmp_path, monkeypatch):
    _, output = pretrained_run
    predictions = []
    forward = fcmae.FCMAE.forward

    def recording_forward(self, *args, **kwargs):
        loss, pred, mask = forward(self, *args, **kwargs)
        predictions.append(pred)
        return loss, pred, mask

    monkeypatch.setattr(fcmae.FCMAE, "forward", recording_forward)
    main(["--checkpoint", str(output / "checkpoint-1.pth"), "--output", str(tmp_path / "x.png"), "--device", "cpu"])
    assert len(predictions) == 1
    assert predictions[0].grad_fn is None and not predictions[0].requires_grad, "the forward kept an autograd graph"
