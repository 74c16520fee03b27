"""finetune.features: the API returns the model's own outputs for images of any accepted kind;
the CLI writes loadable files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_grn

import models
from engine.image_decode import load_rgb_image
from engine.embeddings import extract_pooled, extract_stages
from engine.eval_transform import build_eval_transform
from finetune.features import FeatureExtractor, load_features, main, save_features
from finetune_helpers import make_colour_folder
from PIL import Image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A fine-tuned-style atto checkpoint (5-class head, non-zero GRN) in timm names."""
    torch.manual_seed(0)
    model = models.create_dense_model("convnextv2_atto", num_classes=5)
    randomize_grn(model)
    path = tmp_path_factory.mktemp("ckpt") / "atto.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_pooled_features_are_the_classifier_input(checkpoint):
    images = torch.randn(2, 3, 64, 64)
    extractor = FeatureExtractor("convnextv2_atto", checkpoint)
    reference = models.load_pretrained("convnextv2_atto", checkpoint).eval()
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
        logits = reference(images)
    pooled = extractor.pooled(images)
    assert pooled.shape == (2, 320)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    torch.testing.assert_close(reference.head.fc(pooled), logits, rtol=1e-5, atol=1e-5)


def test_stage_maps_equal_forward_intermediates_and_one_pass_gives_both(checkpoint):
    images = torch.randn(2, 3, 64, 64)
    extractor = FeatureExtractor("convnextv2_atto", checkpoint)
    reference = models.load_pretrained("convnextv2_atto", checkpoint).eval()
    with torch.no_grad():
        expected = reference.forward_intermediates(images, intermediates_only=True)
    stages = extractor.stages(images)
    assert [tuple(stage.shape) for stage in stages] == [(2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4), (2, 320, 2, 2)]
    for stage, reference_stage in zip(stages, expected):
        torch.testing.assert_close(stage, reference_stage, rtol=0, atol=0)
    pooled, both_stages = extractor.pooled_and_stages(images)
    torch.testing.assert_close(pooled, extractor.pooled(images), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(both_stages[3], stages[3], rtol=0, atol=0)


def test_functions_work_on_any_timm_convnext():
    model = models.create_dense_model("convnextv2_atto", num_classes=0).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert extract_pooled(model, images).shape == (1, 320)
        assert [s.shape[1] for s in extract_stages(model, images)] == [40, 80, 160, 320]


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_cli_writes_features_labels_classes_and_paths(checkpoint, tmp_path, suffix):
    make_colour_folder(tmp_path / "images", classes=("blue", "red", "yellow"), per_class=2, size=40)
    output = tmp_path / f"features{suffix}"
    main(["--model", "convnextv2_atto", "--checkpoint", str(checkpoint), "--data_path", str(tmp_path / "images"),
          "--output", str(output), "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--stages",
          "--device", "cpu"])
    features = load_features(output)
    assert features["pooled"].shape == (6, 320) and features["pooled"].dtype == torch.float32
    assert features["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert features["class_names"] == ["blue", "red", "yellow"]
    assert [path.rsplit("/", 2)[-2] for path in features["paths"]] == ["blue", "blue", "red", "red", "yellow", "yellow"]
    assert [tuple(features[f"stage{i}"].shape) for i in range(4)] == [
        (6, 40, 8, 8), (6, 80, 4, 4), (6, 160, 2, 2), (6, 320, 1, 1)]
    # the rows are the extractor's own output for those images
    image = build_eval_transform(32)(load_rgb_image(features["paths"][3]))[None]
    expected = FeatureExtractor("convnextv2_atto", checkpoint).pooled(image)
    torch.testing.assert_close(features["pooled"][3:4], expected, rtol=1e-4, atol=1e-5)


def test_cli_leaves_out_unreadable_images(checkpoint, tmp_path):
    make_colour_folder(tmp_path / "images", classes=("blue", "red"), per_class=2, size=40)
    (tmp_path / "images" / "blue" / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "features.safetensors"
    main(["--model", "convnextv2_atto", "--data_path", str(tmp_path / "images"), "--output", str(output),
          "--input_size", "32", "--batch_size", "8", "--num_workers", "0", "--device", "cpu"])
    features = load_features(output)
    assert features["pooled"].shape == (4, 320)
    assert not any(path.endswith("broken.png") for path in features["paths"])
    assert features["labels"].tolist() == [0, 0, 1, 1]


def test_output_suffix_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors or \.npz"):
        save_features(tmp_path / "features.pt", {"pooled": torch.zeros(1, 2)}, ["a"], ["x.jpg"])


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    folder = make_colour_folder(tmp_path_factory.mktemp("photos"), classes=("blue", "red"), per_class=1, size=40)
    return sorted(str(path) for path in folder.rglob("*.png"))


def test_pooled_accepts_pil_images_paths_and_tensors_alike(checkpoint, photo_files):
    extractor = FeatureExtractor("convnextv2_atto", checkpoint, input_size=32)
    pil_images = [load_rgb_image(path) for path in photo_files]
    batch = torch.stack([build_eval_transform(32)(image) for image in pil_images])
    expected = extractor.pooled(batch)
    assert expected.shape == (2, 320)
    torch.testing.assert_close(extractor.pooled(pil_images), expected, rtol=0, atol=0)
    torch.testing.assert_close(extractor.pooled(photo_files), expected, rtol=0, atol=0)
    torch.testing.assert_close(extractor.pooled([Path(photo_files[0]), batch[1]]), expected, rtol=0, atol=0)
    torch.testing.assert_close(extractor.pooled(pil_images[1]), expected[1:], rtol=1e-4, atol=1e-5)  # batch of 1
    stages = extractor.stages(pil_images)
    assert [tuple(stage.shape) for stage in stages] == [(2, 40, 8, 8), (2, 80, 4, 4), (2, 160, 2, 2), (2, 320, 1, 1)]


def test_pil_images_of_other_modes_and_sizes_are_transformed(checkpoint):
    extractor = FeatureExtractor("convnextv2_atto", checkpoint, input_size=32)
    grey = Image.new("L", (50, 70), 128)
    rgba = Image.new("RGBA", (40, 33), (10, 200, 30, 255))
    assert extractor.pooled([grey, rgba]).shape == (2, 320)


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((2, 3, 32, 32), dtype=np.float32), TypeError, "got a numpy.ndarray"),
    ([np.zeros((32, 32, 3), dtype=np.uint8)], TypeError, r"images\[0\] is a numpy.ndarray; expected a PIL image"),
    ([], TypeError, "non-empty list"),
    ([1.5], TypeError, r"images\[0\] is a float"),
    (torch.zeros(3, 32, 32), ValueError, r"for one \(3, H, W\) image pass \[image\]"),
    ([torch.zeros(3, 32, 32), torch.zeros(3, 40, 40)], ValueError, "different shapes"),
    ([torch.zeros(1, 32, 32)], ValueError, r"images\[0\] must be a \(3, H, W\) tensor"),
])
def test_unsupported_images_get_a_clear_error(checkpoint, images, error, message):
    extractor = FeatureExtractor("convnextv2_atto", checkpoint, input_size=32)
    with pytest.raises(error, match=message):
        extractor.pooled(images)


def test_cli_records_how_the_features_were_made(checkpoint, tmp_path):
    make_colour_folder(tmp_path / "images", classes=("blue", "red"), per_class=1, size=40)
    output = tmp_path / "features.safetensors"
    main(["--model", "convnextv2_atto", "--checkpoint", str(checkpoint), "--data_path", str(tmp_path / "images"),
          "--output", str(output), "--input_size", "32", "--crop_pct", "0.9", "--num_workers", "0", "--device", "cpu"])
    features = load_features(output)
    assert (features["model_name"], features["checkpoint"], features["input_size"], features["crop_pct"]) == \
        ("convnextv2_atto", str(checkpoint), "32", "0.9")
    assert [features["class_names"][label] for label in features["labels"]] == \
        [Path(path).parent.name for path in features["paths"]]
