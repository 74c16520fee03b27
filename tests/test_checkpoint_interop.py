"""Every supported checkpoint layout loads into timm's dense ConvNeXt V2 with identical outputs.

Synthetic files are written from a dense timm model whose every tensor (GRN, norms and biases
included) is random, so a tensor mapped to the wrong place, transposed or left at its
initialisation changes the output. The official layouts are built here independently of
``models.checkpoint`` from the published key names and shapes.
"""
from __future__ import annotations

import argparse
import re

import pytest
import torch

import models  # noqa: F401  (torchvision guard before timm)
from models.checkpoint import convert_to_timm, load_pretrained
from models.convnextv2 import create_dense_model

IMAGE_SIZE = 64
FCMAE_DECODER_KEYS = ("proj.weight", "mask_token", "decoder.0.conv_dw.weight", "pred.weight")


def randomised_model(model_name: str, num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_dense_model(model_name, num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    return model.eval()


def encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``FCMAE.encoder.state_dict()`` holds: timm names minus ``head.*``."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def fcmae_training_checkpoint(encoder: dict[str, torch.Tensor], **extra) -> dict:
    """A pretraining checkpoint: whole FCMAE model under "model" (encoder + decoder)."""
    state = {f"encoder.{k}": v for k, v in encoder.items()}
    state.update({k: torch.randn(4, 4) for k in FCMAE_DECODER_KEYS})
    return {"model": state, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}, **extra}


def to_official_dense(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names -> released ConvNeXt V2 file names; pwconv as Linear, GRN (1, 1, 1, 4C)."""
    official = {}
    for key, value in timm_state.items():
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        if ".pwconv" in key and key.endswith(".weight"):
            value = value.flatten(1)
        if ".grn." in key:
            value = value.reshape(1, 1, 1, -1)
        official[key] = value
    return official


def minkowski_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d weight (out, in, k, k) -> ME kernel (k*k, in, out), offset t = w * k + h (the
    order documented in models.checkpoint); depthwise (C, 1, k, k) -> (k*k, C)."""
    out_channels, in_channels, size, _ = weight.shape
    kernel = torch.empty(size * size, in_channels, out_channels)
    for h in range(size):
        for w in range(size):
            kernel[w * size + h] = weight[:, :, h, w].T
    return kernel[:, 0, :] if in_channels == 1 else kernel


def to_official_minkowski(official_dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released dense encoder names -> the official sparse FCMAE encoder's tensors."""
    sparse = {}
    for key, value in official_dense.items():
        if key.startswith("downsample_layers.0."):  # the stem runs dense
            sparse[key] = value
            continue
        downsample = re.match(r"downsample_layers\.\d\.(\d)\.(weight|bias)$", key)
        if downsample and downsample.group(1) == "0":
            key = key.replace(".0.", ".0.ln.")
        elif downsample or ".dwconv." in key:
            if key.endswith(".weight"):
                key, value = key[: -len("weight")] + "kernel", minkowski_kernel(value)
            else:
                value = value.reshape(1, -1)
        elif ".norm." in key:
            key = key.replace(".norm.", ".norm.ln.")
        elif ".pwconv" in key:
            key = re.sub(r"\.(weight|bias)$", r".linear.\1", key)
        elif ".grn." in key:
            value = value.reshape(1, -1)
        sparse[key] = value
    return sparse


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a shared, busy CPU they lose 10x+."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def atto():
    return randomised_model("convnextv2_atto")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def assert_same_features(loaded, source, images):
    with torch.no_grad():
        assert torch.equal(loaded.eval().forward_features(images), source.forward_features(images)), \
            "loaded model's features differ from the model the checkpoint was written from"


def test_our_encoder_state_dict_loads_exactly(atto, images, tmp_path):
    torch.save(encoder_state(atto), tmp_path / "encoder.pt")
    loaded = load_pretrained("convnextv2_atto", tmp_path / "encoder.pt", num_classes=0)
    assert_same_features(loaded, atto, images)


def test_our_fcmae_training_checkpoint_loads_encoder_and_drops_decoder(atto, images, tmp_path):
    torch.save(fcmae_training_checkpoint(encoder_state(atto)), tmp_path / "checkpoint.pt")
    loaded = load_pretrained("convnextv2_atto", tmp_path / "checkpoint.pt", num_classes=0)
    assert_same_features(loaded, atto, images)


def test_safetensors_encoder_loads_exactly(atto, images, tmp_path):
    from safetensors.torch import save_file

    save_file(encoder_state(atto), tmp_path / "encoder.safetensors")
    loaded = load_pretrained("convnextv2_atto", tmp_path / "encoder.safetensors", num_classes=0)
    assert_same_features(loaded, atto, images)


def test_convert_to_timm_strips_ddp_prefix_and_state_dict_wrapper(atto):
    source = encoder_state(atto)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.items()}}
    converted = convert_to_timm(wrapped, "convnextv2_atto")
    assert converted.keys() == source.keys()
    assert all(torch.equal(converted[k], v) for k, v in source.items())


@pytest.mark.parametrize("model_name", ["convnextv2_atto", "convnextv2_tiny"])  # conv / Linear MLP
def test_official_fcmae_encoder_file_loads_exactly(model_name, images, tmp_path):
    source = randomised_model(model_name)
    torch.save({"model": to_official_dense(encoder_state(source))}, tmp_path / "fcmae.pt")
    loaded = load_pretrained(model_name, tmp_path / "fcmae.pt", num_classes=0)
    assert_same_features(loaded, source, images)


@pytest.mark.parametrize("model_name", ["convnextv2_atto", "convnextv2_tiny"])
def test_official_dense_conversion_matches_timms_own_filter(model_name):
    from timm.models.convnext import checkpoint_filter_fn

    model = create_dense_model(model_name, num_classes=10)
    official = {"model": to_official_dense(model.state_dict())}
    ours, timms = convert_to_timm(official, model_name), checkpoint_filter_fn(official, model)
    assert ours.keys() == timms.keys()
    assert all(torch.equal(ours[k], timms[k]) for k in ours)


def test_official_finetuned_file_loads_head_and_classifier(images, tmp_path):
    source = randomised_model("convnextv2_atto", num_classes=10)
    torch.save({"model": to_official_dense(source.state_dict())}, tmp_path / "ema.pt")
    loaded = load_pretrained("convnextv2_atto", tmp_path / "ema.pt", num_classes=10).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))


def test_num_classes_defaults_to_the_checkpoint_classifier(tmp_path):
    source = randomised_model("convnextv2_atto", num_classes=10)
    torch.save({"model": to_official_dense(source.state_dict())}, tmp_path / "ema.pt")
    loaded = load_pretrained("convnextv2_atto", tmp_path / "ema.pt")
    assert torch.equal(loaded.head.fc.weight, source.head.fc.weight)


def test_classifier_of_another_size_is_left_new_but_head_norm_loads(images, tmp_path):
    source = randomised_model("convnextv2_atto", num_classes=10)
    torch.save({"model": to_official_dense(source.state_dict())}, tmp_path / "ema.pt")
    loaded = load_pretrained("convnextv2_atto", tmp_path / "ema.pt", num_classes=7).eval()
    assert loaded.head.fc.weight.shape == (7, 320)
    with torch.no_grad():
        pre_logits = loaded.forward_head(loaded.forward_features(images), pre_logits=True)
        assert torch.equal(pre_logits, source.forward_head(source.forward_features(images), pre_logits=True))


@pytest.mark.parametrize("model_name", ["convnextv2_atto", "convnextv2_tiny"])
def test_official_minkowski_pretraining_checkpoint_loads_exactly(model_name, images, tmp_path):
    source = randomised_model(model_name)
    sparse_encoder = to_official_minkowski(to_official_dense(encoder_state(source)))
    assert any(k.endswith(".dwconv.kernel") for k in sparse_encoder)
    # the official training loop also pickles its argparse.Namespace of flags
    checkpoint = fcmae_training_checkpoint(sparse_encoder, args=argparse.Namespace(model=model_name, blr=1.5e-4))
    torch.save(checkpoint, tmp_path / "checkpoint-799.pth")
    loaded = load_pretrained(model_name, tmp_path / "checkpoint-799.pth", num_classes=0)
    assert_same_features(loaded, source, images)


def test_wrong_size_checkpoint_names_mismatched_shapes_and_its_size(tmp_path):
    femto = create_dense_model("convnextv2_femto", num_classes=0)
    torch.save({"model": to_official_dense(encoder_state(femto))}, tmp_path / "femto.pt")
    with pytest.raises(ValueError) as error:
        load_pretrained("convnextv2_atto", tmp_path / "femto.pt")
    message = str(error.value)
    assert "stem.0.weight: (48, 3, 4, 4) vs (40, 3, 4, 4)" in message
    assert "convnextv2_femto" in message


def test_incomplete_checkpoint_lists_missing_and_unexpected_keys(atto, tmp_path):
    state = encoder_state(atto)
    state["stages.2.blocks.5.conv_dw.kernel"] = state.pop("stages.2.blocks.5.conv_dw.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(ValueError) as error:
        load_pretrained("convnextv2_atto", tmp_path / "renamed.pt")
    assert "missing from the checkpoint: [stages.2.blocks.5.conv_dw.weight]" in str(error.value)
    assert "unexpected in the checkpoint: [stages.2.blocks.5.conv_dw.kernel]" in str(error.value)


def test_non_strict_encoder_warns_and_loads_the_tensors_that_fit(atto, tmp_path):
    state = encoder_state(atto)
    del state["stages.3.blocks.1.mlp.fc2.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.warns(UserWarning, match="stages.3.blocks.1.mlp.fc2.weight"):
        loaded = load_pretrained("convnextv2_atto", tmp_path / "partial.pt", num_classes=0, strict_encoder=False)
    assert torch.equal(loaded.stem[0].weight, atto.stem[0].weight)


def test_unknown_layout_is_rejected(tmp_path):
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(8, 3, 3, 3)}}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout.*backbone.conv1.weight"):
        load_pretrained("convnextv2_atto", tmp_path / "resnet.pt")


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"model": {"stem.0.weight": _CreatesFileWhenUnpickled(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        load_pretrained("convnextv2_atto", tmp_path / "evil.pt")
    assert not marker.exists(), "the checkpoint's pickled code was executed"
    payload = torch.load(tmp_path / "evil.pt", weights_only=False)  # a full unpickle does run it
    payload["model"]["stem.0.weight"].close()
    assert marker.exists()
