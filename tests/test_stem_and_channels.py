"""A stride-2 stem (mask patch 16) and any channel count, through every model-level path: the
backends, FCMAE and its loss, the strict timm export, checkpoint loading, features, backbones,
and stem adaptation between geometries."""
import pytest
import timm
import torch
import torch.nn.functional as F

import models
from fcmae import build_fcmae, mask_from_visible_cells, patchify, random_visible_cells
from finetune.features import FeatureExtractor
from models import SparseConvNeXtV2, create_dense_model, fit_stem, load_pretrained
from models.checkpoint import resample_stem_kernel
from tests.conftest import output_and_gradients, randomize_grn, relative_error
from tests.test_minkowski_backend import MINKOWSKI_MISSING

GEOMETRIES = [(2, 3), (2, 1), (4, 1), (4, 4), (2, 4)]  # (stem stride, input channels)
BACKENDS = ["sparse"] + ([] if MINKOWSKI_MISSING else ["minkowski"])


def encoder_and_inputs(stem_stride, in_chans, size=(64, 96), mask_ratio=0.6, seed=3):
    encoder = SparseConvNeXtV2("convnextv2_atto", stem_stride=stem_stride, in_chans=in_chans)
    randomize_grn(encoder)
    images = torch.randn(2, in_chans, *size)
    cells = (size[0] // encoder.total_stride) * (size[1] // encoder.total_stride)
    visible = random_visible_cells(2, cells, mask_ratio, generator=torch.Generator().manual_seed(seed))
    return encoder, images, visible


@pytest.mark.parametrize("stem_stride, in_chans", GEOMETRIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_the_masked_reference_for_any_stem_and_channels(backend, stem_stride, in_chans):
    encoder, images, visible = encoder_and_inputs(stem_stride, in_chans)
    reference_out, reference_grads = output_and_gradients(encoder, "masked", images, visible)
    out, grads = output_and_gradients(encoder, backend, images, visible)
    assert out.shape == (2, 320, 64 // encoder.total_stride, 96 // encoder.total_stride)
    assert relative_error(out, reference_out) < 1e-5, f"{backend} output differs from masked"
    for name, grad in reference_grads.items():
        assert grad.abs().max() > 0, f"{name} got no gradient; the comparison would be vacuous"
        err = relative_error(grads[name], grad)
        assert err < 1e-5, f"gradient of {name} differs by {err:.2e} between {backend} and masked"


@pytest.mark.parametrize("stem_stride, in_chans", GEOMETRIES)
def test_nothing_hidden_equals_the_dense_model_the_export_loads_into(stem_stride, in_chans):
    encoder, images, _ = encoder_and_inputs(stem_stride, in_chans)
    if stem_stride == 4:  # timm's own model
        dense = timm.create_model("convnextv2_atto", num_classes=0, in_chans=in_chans)
    else:  # timm's patch_size=2 model without its stage-0 downsampling (models.convnextv2)
        dense = create_dense_model("convnextv2_atto", stem_stride, in_chans, num_classes=0)
    dense.eval().load_state_dict(models.encoder_export_state(encoder))  # strict: every key, every shape
    every_cell = torch.arange(images.shape[2] * images.shape[3] // encoder.total_stride**2).expand(2, -1)
    with torch.no_grad():
        err = relative_error(encoder.eval()(images, every_cell), dense.forward_features(images))
    assert err < 1e-5, f"stride {stem_stride}, {in_chans} channels: {err:.2e} from timm's forward_features"


def test_timms_patch_size_two_keeps_stride_32_so_the_stride_two_stem_drops_its_stage0_downsampling():
    plain = timm.create_model("convnextv2_atto", num_classes=0, patch_size=2)
    ours = create_dense_model("convnextv2_atto", stem_stride=2, num_classes=0)
    images = torch.randn(1, 3, 64, 64)
    assert plain.forward_features(images).shape[2:] == (2, 2), "timm's patch_size=2: total stride 32"
    assert ours.forward_features(images).shape[2:] == (4, 4), "the stride-2 stem: total stride 16"
    assert set(plain.state_dict()) - set(ours.state_dict()) == {
        "stages.0.downsample.0.weight", "stages.0.downsample.0.bias", "stages.0.downsample.1.weight",
        "stages.0.downsample.1.bias"}
    assert [info["reduction"] for info in ours.feature_info] == [2, 4, 8, 16]


def test_stride_two_stem_makes_a_sixteen_pixel_mask_patch():
    encoder, images, visible = encoder_and_inputs(2, 3, size=(96, 96))
    assert encoder.total_stride == 16 and visible.shape == (2, int(36 * 0.4))
    with torch.no_grad():
        out = encoder(images, visible)
    hidden = mask_from_visible_cells(visible, 36).reshape(2, 1, 6, 6).bool().expand_as(out)
    assert torch.count_nonzero(out[hidden]) == 0 and torch.count_nonzero(out[~hidden]) == out[~hidden].numel()
    pixel_mask = mask_from_visible_cells(visible, 36).reshape(2, 1, 6, 1, 6, 1).expand(2, 1, 6, 16, 6, 16)
    perturbed = images + 100.0 * torch.randn_like(images) * pixel_mask.reshape(2, 1, 96, 96)
    with torch.no_grad():
        assert torch.equal(encoder(perturbed, visible), out), "a hidden 16x16 patch changed a visible output"


@pytest.mark.parametrize("in_chans", [1, 4])
def test_fcmae_reconstructs_every_channel_of_sixteen_pixel_patches(in_chans):
    model = build_fcmae("convnextv2_atto", decoder_dim=32, stem_stride=2, in_chans=in_chans)
    images = torch.randn(2, in_chans, 64, 48)
    loss, pred, mask = model(images)
    assert model.patch_size == 16 and pred.shape == (2, 12, 16 * 16 * in_chans) and mask.shape == (2, 12)
    target = patchify(images, 16)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_input_not_a_multiple_of_sixteen_or_of_other_channels_is_rejected():
    model = build_fcmae("convnextv2_atto", decoder_dim=32, stem_stride=2, in_chans=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 1, 40, 48))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\) for this 1-channel encoder"):
        model(torch.randn(1, 3, 48, 48))


def test_loading_takes_stem_stride_and_channels_from_the_file(tmp_path):
    """An export of a stride-2, 1-channel encoder: load_pretrained, FeatureExtractor and
    create_backbone need no flag for it."""
    from engine.checkpoint import save_safetensors

    encoder = SparseConvNeXtV2("convnextv2_atto", stem_stride=2, in_chans=1)
    randomize_grn(encoder)
    path = save_safetensors(models.encoder_export_state(encoder), tmp_path / "encoder.safetensors")
    images = torch.randn(2, 1, 32, 32)
    dense = load_pretrained("convnextv2_atto", path, num_classes=0).eval()
    assert dense.stem[0].kernel_size == (2, 2) and dense.stem[0].in_channels == 1
    with torch.no_grad():
        full = encoder.eval()(images, torch.arange(4).expand(2, 4))
        torch.testing.assert_close(dense.forward_features(images), full, rtol=1e-5, atol=1e-5)
    extractor = FeatureExtractor("convnextv2_atto", path)
    torch.testing.assert_close(extractor.stages(images)[3], full, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="read as RGB, but the model takes 1 channels"):
        extractor.pooled([str(path)])
    backbone = models.create_backbone("convnextv2_atto", path)
    assert backbone.feature_info.reduction() == [2, 4, 8, 16]
    assert [tuple(m.shape[2:]) for m in backbone(images)] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_adapted_stem_sees_an_image_as_the_rgb_stride_four_stem_saw_it_at_twice_the_size():
    """fit_stem 3 -> 1 channels, 4x4 -> 2x2 kernel: on a gray image the new stem gives exactly what
    the old one gives on that image upscaled 2x (nearest) and repeated in R, G and B."""
    source = create_dense_model("convnextv2_atto", num_classes=0)
    state, changes = fit_stem(source.state_dict(), stem_stride=2, in_chans=1)
    assert state["stem.0.weight"].shape == (40, 1, 2, 2) and len(changes) == 2
    assert "3 -> 1 input channels (summed" in changes[0] and "4x4 stride-4 kernel -> 2x2 stride-2" in changes[1]
    gray = torch.randn(2, 1, 24, 24)
    new = F.conv2d(gray, state["stem.0.weight"], state["stem.0.bias"], stride=2)
    old = F.conv2d(F.interpolate(gray, scale_factor=2, mode="nearest").expand(-1, 3, -1, -1),
                   source.stem[0].weight, source.stem[0].bias, stride=4)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    unchanged = [key for key in state if key != "stem.0.weight" and torch.equal(state[key], source.state_dict()[key])]
    assert len(unchanged) == len(state) - 1


def test_a_grown_kernel_sees_the_block_averaged_image_and_odd_ratios_are_refused():
    weight = torch.randn(8, 3, 2, 2)
    image = torch.randn(1, 3, 16, 16)
    grown = resample_stem_kernel(weight, 4)
    torch.testing.assert_close(F.conv2d(image, grown, stride=4), F.conv2d(F.avg_pool2d(image, 2), weight, stride=2),
                               rtol=1e-5, atol=1e-5)
    assert grown.sum().item() == pytest.approx(weight.sum().item(), rel=1e-5)  # a constant image: same response
    with pytest.raises(ValueError, match="one size must divide the other"):
        resample_stem_kernel(torch.randn(8, 3, 4, 4), 3)


def test_load_pretrained_adapts_when_asked_for_another_geometry(tmp_path):
    source = create_dense_model("convnextv2_atto", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "rgb.pth")
    adapted = load_pretrained("convnextv2_atto", tmp_path / "rgb.pth", num_classes=0, stem_stride=2, in_chans=4)
    assert adapted.stem[0].weight.shape == (40, 4, 2, 2)
    expected, _ = fit_stem(source.state_dict(), 2, 4)
    assert torch.equal(adapted.stem[0].weight, expected["stem.0.weight"])
    assert torch.equal(adapted.stages[3].blocks[1].mlp.fc2.weight, source.stages[3].blocks[1].mlp.fc2.weight)
