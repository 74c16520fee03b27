"""Every supported checkpoint layout loads into timm's dense ConvNeXt V2 with identical outputs,
our encoder export loads strictly into timm, and unusable files get messages saying what they are.

The layouts are fabricated in ``checkpoint_layouts`` (random tensors everywhere, official key
names built independently of ``models.checkpoint``).
"""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
from checkpoint_layouts import (encoder_state, fcmae_training_checkpoint, randomised_model, to_official_dense,
                                to_official_minkowski)
from safetensors.torch import load_file, save_file

import fcmae
import models.checkpoint
from engine.checkpoint import save_safetensors
from models.checkpoint import convert_to_timm, encoder_export_state, load_pretrained, read_checkpoint
from models.convnextv2 import create_dense_model

IMAGE_SIZE = 64


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


def test_official_flags_load_on_a_torch_without_the_safe_globals_context(tmp_path, monkeypatch):
    """torch 2.4 has only the process-wide list of classes weights_only may build: the fallback uses it."""
    allowed = torch.serialization.get_safe_globals()
    monkeypatch.setattr(models.checkpoint, "SAFE_GLOBALS_CONTEXT", False)
    torch.save({"model": {}, "args": argparse.Namespace(model="convnextv2_atto")}, tmp_path / "checkpoint-1.pth")
    try:
        assert read_checkpoint(tmp_path / "checkpoint-1.pth")["args"] == argparse.Namespace(model="convnextv2_atto")
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed)


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


@pytest.fixture(scope="module")
def exported_encoder(tmp_path_factory):
    """``encoder.safetensors`` as pretraining writes it, from an FCMAE encoder with random weights."""
    model = fcmae.build_fcmae("convnextv2_atto", decoder_dim=32)
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    save_safetensors(encoder_export_state(model.encoder), path, {"model_name": "convnextv2_atto"})
    return model.encoder, path


def test_encoder_export_loads_strictly_into_timm_without_classifier(exported_encoder):
    encoder, path = exported_encoder
    model = timm.create_model("convnextv2_atto", num_classes=0, pretrained=False)
    model.load_state_dict(load_file(path))  # strict: no missing or unexpected key
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), f"{name} changed on the way to timm"
    assert torch.equal(model.head.norm.weight, torch.ones(320)) and torch.equal(model.head.norm.bias, torch.zeros(320))


def test_encoder_export_pooled_features_are_the_standardised_pooled_map(exported_encoder, images):
    _, path = exported_encoder
    model = timm.create_model("convnextv2_atto", num_classes=0, pretrained=False).eval()
    model.load_state_dict(load_file(path))
    with torch.no_grad():
        pooled_map = model.forward_features(images).mean((2, 3))
        expected = torch.nn.functional.layer_norm(pooled_map, (320,), eps=1e-6)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_encoder_export_takes_a_new_classifier_through_load_pretrained(exported_encoder, images):
    _, path = exported_encoder
    timm_model = timm.create_model("convnextv2_atto", num_classes=0, pretrained=False).eval()
    timm_model.load_state_dict(load_file(path))
    loaded = load_pretrained("convnextv2_atto", path, num_classes=10).eval()
    assert loaded.head.fc.weight.shape == (10, 320)
    with torch.no_grad():
        pooled = loaded.forward_head(loaded.forward_features(images), pre_logits=True)
        assert torch.equal(pooled, timm_model(images))


def test_official_fcmae_file_gives_the_same_features_as_our_export(exported_encoder, images, tmp_path):
    encoder, path = exported_encoder
    torch.save({"model": to_official_dense(encoder.state_dict())}, tmp_path / "fcmae.pt")
    official = load_pretrained("convnextv2_atto", tmp_path / "fcmae.pt", num_classes=0).eval()
    ours = load_pretrained("convnextv2_atto", path, num_classes=0).eval()
    assert torch.equal(official.head.norm.weight, torch.ones(320))  # timm's init: the file has no final norm
    with torch.no_grad():
        assert torch.equal(official(images), ours(images))


def test_text_file_named_pth_is_reported_as_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    path.write_text("git-lfs pointer or an HTML error page\n")
    with pytest.raises(ValueError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert f"{path} is not a checkpoint" in message and "(text)" in message and "zip archive or a pickle" in message
    assert "run code" not in message


def test_empty_file_is_reported_as_empty(tmp_path):
    (tmp_path / "checkpoint-1.pth").touch()
    with pytest.raises(ValueError, match=r"checkpoint-1\.pth is empty \(0 bytes\)"):
        read_checkpoint(tmp_path / "checkpoint-1.pth")


def test_folder_given_as_checkpoint_lists_the_checkpoints_in_it(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint-3.pth")
    (tmp_path / "train.log").write_text("")
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint file; pass a file in it: \[checkpoint-3\.pth\]"):
        read_checkpoint(tmp_path)


def test_missing_file_is_reported_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")


def test_truncated_safetensors_and_zip_are_reported_as_truncated(atto, tmp_path):
    save_file(encoder_state(atto), tmp_path / "encoder.safetensors")
    data = (tmp_path / "encoder.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"cut\.safetensors is a truncated safetensors file: its header alone is"):
        read_checkpoint(tmp_path / "cut.safetensors")
    torch.save(encoder_state(atto), tmp_path / "encoder.pth")
    data = (tmp_path / "encoder.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth is a damaged PyTorch checkpoint: its zip archive cannot be read"):
        read_checkpoint(tmp_path / "cut.pth")


def test_format_is_read_from_the_bytes_not_the_name(atto, tmp_path):
    save_file(encoder_state(atto), tmp_path / "encoder.pth")  # safetensors content, torch-style name
    torch.save(encoder_state(atto), tmp_path / "encoder.safetensors", _use_new_zipfile_serialization=False)
    for name in ("encoder.pth", "encoder.safetensors"):
        state = read_checkpoint(tmp_path / name)
        assert torch.equal(state["stem.0.weight"], atto.stem[0].weight), name
