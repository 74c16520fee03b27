"""Continued pretraining (fcmae.init_from, pretrain.py --init_from): every checkpoint layout, the
decoder where it fits, stem adaptation, fresh optimizer and epoch, and auto-resume winning."""
import logging

import pytest
import torch
from safetensors.torch import load_file

import fcmae
import pretrain
from checkpoint_layouts import LAYOUTS, encoder_state, randomised_model, to_official_dense, to_official_minkowski, \
    write_layout
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, parse_args
from image_folders import make_image_folder
from models import fit_stem
from tests.conftest import randomize_grn

torch.set_num_threads(1)


def pretrain_args(*flags):
    return parse_args(pretrain.build_parser(), ["--model", "convnextv2_atto", "--decoder_embed_dim", "32", *flags])


def tiny_run_args(data, output, *flags):
    return ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--warmup_epochs", "0",
            "--decoder_embed_dim", "32", "--data_path", str(data), "--output_dir", str(output), "--num_workers", "0",
            "--print_freq", "1", "--device", "cpu", *flags]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A 2-epoch pretraining run (2 updates per epoch) whose checkpoint the tests start from."""
    root = tmp_path_factory.mktemp("source_run")
    data = make_image_folder(root / "data", classes=2, per_class=2)
    pretrain.main(tiny_run_args(data, root / "source", "--epochs", "2"))
    return data, root / "source" / "checkpoint-2.pth"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_init_from_loads_the_encoder_of_every_layout(layout, tmp_path, caplog):
    source = randomised_model("convnextv2_atto", seed=1)
    path = write_layout(layout, source, tmp_path)
    with caplog.at_level(logging.INFO):
        args = pretrain_args("--init_from", str(path), "--output_dir", str(tmp_path / "out"))
        model = pretrain.build_model(args)
        pretrain.apply_init_from(args, model)
    loaded = model.encoder.state_dict()
    expected = encoder_state(source)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value.reshape(loaded[key].shape)), f"{layout}: {key} differs"
    assert f"initialised from {path}" in caplog.text and "loaded: encoder (" in caplog.text
    assert "initialised fresh: pred" in caplog.text  # these files hold no decoder of this width


def test_a_pretraining_checkpoint_gives_its_decoder_and_mask_token_too(tmp_path):
    earlier = fcmae.build_fcmae("convnextv2_atto", decoder_dim=32)
    randomize_grn(earlier)
    torch.save({"model": earlier.state_dict(), "epoch": 5, "optimizer": {}}, tmp_path / "checkpoint-5.pth")
    model = fcmae.build_fcmae("convnextv2_atto", decoder_dim=32)
    report = fcmae.init_from(model, tmp_path / "checkpoint-5.pth")
    assert report.loaded[1:] == ["proj", "mask_token", "decoder", "pred"] and not report.fresh and not report.adapted
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in earlier.state_dict().items())


def test_the_official_training_code_s_decoder_names_are_understood(tmp_path):
    """Official FCMAE training checkpoints: MinkowskiEngine encoder, decoder of dense official blocks."""
    earlier = fcmae.build_fcmae("convnextv2_atto", decoder_dim=32)
    randomize_grn(earlier)
    encoder = {f"encoder.{key}": value for key, value in
               to_official_minkowski(to_official_dense(earlier.encoder.state_dict())).items()}
    decoder = to_official_dense({key: value for key, value in earlier.state_dict().items()
                                 if not key.startswith("encoder.")})
    assert "decoder.0.dwconv.weight" in decoder and "decoder.0.grn.gamma" in decoder
    torch.save({"model": {**encoder, **decoder}}, tmp_path / "checkpoint-799.pth")
    model = fcmae.build_fcmae("convnextv2_atto", decoder_dim=32)
    report = fcmae.init_from(model, tmp_path / "checkpoint-799.pth")
    assert report.layout == "official_minkowski" and not report.fresh
    state = model.state_dict()
    for key, value in earlier.state_dict().items():
        assert torch.allclose(state[key], value.reshape(state[key].shape), atol=1e-7), f"{key} differs"


def test_a_three_channel_stride_four_encoder_is_adapted_to_one_channel_stride_two(tmp_path, caplog):
    source = randomised_model("convnextv2_atto", seed=2)
    path = write_layout("encoder_safetensors", source, tmp_path)
    args = pretrain_args("--init_from", str(path), "--in_chans", "1", "--stem_stride", "2", "--output_dir",
                         str(tmp_path / "out"))
    with caplog.at_level(logging.INFO):
        model = pretrain.build_model(args)
        pretrain.apply_init_from(args, model)
    expected, _ = fit_stem(encoder_state(source), stem_stride=2, in_chans=1)
    loaded = model.encoder.state_dict()
    assert loaded["stem.0.weight"].shape == (40, 1, 2, 2)
    assert all(torch.equal(loaded[key], value.reshape(loaded[key].shape)) for key, value in expected.items())
    assert "adapted: stem.0.weight: 3 -> 1 input channels (summed" in caplog.text
    assert "adapted: stem.0.weight: 4x4 stride-4 kernel -> 2x2 stride-2" in caplog.text
    assert model.pred.out_channels == 16 * 16 * 1


def test_a_decoder_whose_output_differs_starts_fresh(tmp_path):
    earlier = fcmae.build_fcmae("convnextv2_atto", decoder_dim=32)  # stride 4: pred is 32 * 32 * 3 wide
    model = fcmae.build_fcmae("convnextv2_atto", decoder_dim=32, stem_stride=2)
    fresh_pred = model.pred.weight.detach().clone()
    torch.save({"model": earlier.state_dict()}, tmp_path / "checkpoint-1.pth")
    report = fcmae.init_from(model, tmp_path / "checkpoint-1.pth")
    assert report.fresh == ["pred (pred.weight: file (3072, 32, 1, 1), model (768, 32, 1, 1))"]
    assert report.loaded[1:] == ["proj", "mask_token", "decoder"]
    assert torch.equal(model.pred.weight, fresh_pred)
    assert torch.equal(model.proj.weight, earlier.proj.weight)


def test_an_encoder_of_another_size_is_a_configuration_error_naming_the_size(tmp_path):
    path = write_layout("encoder_safetensors", randomised_model("convnextv2_atto"), tmp_path)
    args = pretrain_args("--init_from", str(path), "--model", "convnextv2_femto", "--output_dir", str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"--init_from .*encoder.safetensors: .*it looks like convnextv2_atto"):
        pretrain.apply_init_from(args, pretrain.build_model(args))


def test_init_from_with_resume_is_refused_before_any_work(source_run, tmp_path, capsys):
    _, checkpoint = source_run
    with pytest.raises(SystemExit) as caught:
        pretrain.main(["--init_from", str(checkpoint), "--resume", str(checkpoint), "--output_dir",
                       str(tmp_path / "out")])
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert f"--init_from '{checkpoint}': cannot be combined with --resume" in error
    assert not (tmp_path / "out").exists()


def test_continued_pretraining_starts_fresh_and_a_rerun_auto_resumes_instead(source_run, tmp_path, caplog):
    data, checkpoint = source_run
    output = tmp_path / "continued"
    argv = tiny_run_args(data, output, "--init_from", str(checkpoint))
    pretrain.main(argv + ["--epochs", "0"])  # nothing trained: the export is the initial weights
    source = load_checkpoint(checkpoint)
    exported = load_file(output / "encoder.safetensors")
    assert all(torch.equal(exported[key[len("encoder."):]], value) for key, value in source["model"].items()
               if key.startswith("encoder."))
    with caplog.at_level(logging.INFO):
        pretrain.main(argv + ["--epochs", "1"])
    assert "loaded: proj" in caplog.text and "1 epoch from epoch 0" in caplog.text and "resumed from" not in caplog.text
    continued = load_checkpoint(output / "checkpoint-1.pth")
    steps = {int(state["step"]) for state in continued["optimizer"]["state"].values()}
    assert continued["epoch"] == 1 and steps == {2}, f"AdamW steps {steps}: the source's 4 updates carried over?"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        pretrain.main(argv + ["--epochs", "2"])
    assert f"--init_from {checkpoint} not applied: the run resumes from {output / 'checkpoint-1.pth'}" in caplog.text
    assert f"resumed from {output / 'checkpoint-1.pth'}" in caplog.text
    assert load_checkpoint(output / "checkpoint-2.pth")["epoch"] == 2


def test_an_output_folder_with_only_an_unusable_checkpoint_starts_from_the_file(source_run, tmp_path, caplog):
    data, checkpoint = source_run
    output = tmp_path / "continued"
    output.mkdir()
    (output / "checkpoint-3.pth").write_bytes(b"truncated")  # nothing auto-resume can continue from
    with caplog.at_level(logging.INFO):
        pretrain.main(tiny_run_args(data, output, "--init_from", str(checkpoint), "--epochs", "0"))
    assert "skipping unusable checkpoint" in caplog.text and "not applied" not in caplog.text
    source, exported = load_checkpoint(checkpoint), load_file(output / "encoder.safetensors")
    assert all(torch.equal(exported[key[len("encoder."):]], value) for key, value in source["model"].items()
               if key.startswith("encoder."))
