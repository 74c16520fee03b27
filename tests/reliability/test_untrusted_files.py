"""No file runs code when loaded (issue 5, item 5).

A checkpoint whose unpickling would create a marker file is offered to every loading path:
``pretrain.py --resume`` / ``--auto_resume`` (a malicious ``checkpoint-9.pth`` in --output_dir),
``finetune.py --finetune`` / ``--resume`` / ``--auto_resume`` / ``--eval``,
``models.load_pretrained``, the feature extractor's API and CLI, and the feature and YAML
config readers. Each must refuse it with a clear message, and the marker must never appear.
The first test shows the payload does run code when unpickled unsafely, so the others can fail.
"""
import io
import logging
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open

import models
import pretrain
from engine.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint
from finetune import features
from finetune_helpers import load_finetune_script
from reliability.faults import CreatesMarkerWhenUnpickled, finetune_args, pretrain_args


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "loading the file ran code"


def malicious_checkpoint(path, marker, layout: str = "zip"):
    """A training-checkpoint-shaped file whose unpickling touches ``marker``."""
    state = {"model": {"stem.0.weight": CreatesMarkerWhenUnpickled(marker)}, "optimizer": {}, "epoch": 9}
    if layout == "raw_pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=layout != "legacy")
        path.write_bytes(buffer.getvalue())
    return path


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "code-ran"
    torch.load(malicious_checkpoint(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw_pickle"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_library_loaders_refuse_code_in_any_layout(layout, suffix, tmp_path, marker):
    path = malicious_checkpoint(tmp_path / f"evil{suffix}", marker, layout)
    with pytest.raises(ValueError, match=f"{path}"):
        models.load_pretrained("convnextv2_atto", path)
    with pytest.raises(ValueError, match=f"{path}"):
        features.FeatureExtractor("convnextv2_atto", path)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}"):
        load_checkpoint(path)


def test_auto_resume_skips_a_malicious_checkpoint_and_keeps_new_ones(pretrain_data, tmp_path, marker, caplog):
    output = tmp_path / "out"
    output.mkdir()
    malicious_checkpoint(output / "checkpoint-9.pth", marker)
    with caplog.at_level(logging.WARNING):
        pretrain.main(pretrain_args(pretrain_data, output, "--save_ckpt_num", "1", epochs=1))
    assert f"skipping unusable checkpoint {output / 'checkpoint-9.pth'}" in caplog.text
    # the foreign newer file must not make the run delete the checkpoint it has just written
    assert sorted(path.name for path in output.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-9.pth"], \
        "the run deleted the checkpoint it had just written"
    assert latest_valid_checkpoint(output)[1]["epoch"] == 1
    with safe_open(output / "encoder.safetensors", framework="pt") as export:  # exports are safetensors
        assert export.metadata()["model_name"] == "convnextv2_atto" and "stem.0.weight" in export.keys()


def test_pretrain_resume_refuses_a_malicious_checkpoint(pretrain_data, tmp_path, marker, caplog):
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        pretrain.main(pretrain_args(pretrain_data, tmp_path / "out", "--resume", str(evil), epochs=1))
    assert exit_info.value.code == 1
    assert f"cannot read checkpoint {evil}: UnpicklingError" in caplog.text


@pytest.mark.parametrize("how", ["--finetune", "--resume", "--auto_resume", "--eval"])
def test_finetune_refuses_a_malicious_checkpoint(how, finetune_data, tmp_path, marker, caplog, capsys):
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    output = tmp_path / "out"
    extra = {"--finetune": ["--finetune", str(evil)], "--resume": ["--resume", str(evil)],
             "--eval": ["--eval", "--resume", str(evil)], "--auto_resume": []}[how]
    if how == "--auto_resume":
        output.mkdir()
        evil.rename(output / "checkpoint-9.pth")
    argv = finetune_args(finetune_data, output, "--save_ckpt_num", "1", *extra, epochs=1)
    with caplog.at_level(logging.WARNING):
        if how == "--auto_resume":
            load_finetune_script().main(argv)
        else:
            with pytest.raises(SystemExit) as exit_info:
                load_finetune_script().main(argv)
            assert exit_info.value.code in (1, 2)
    reported = caplog.text + capsys.readouterr().err
    if how == "--auto_resume":
        assert f"skipping unusable checkpoint {output / 'checkpoint-9.pth'}" in reported
        assert (output / "checkpoint-1.pth").exists(), "the run deleted the checkpoint it had just written"
        assert latest_valid_checkpoint(output)[1]["epoch"] == 1
    elif how == "--resume":
        assert f"cannot read checkpoint {evil}: UnpicklingError" in reported
    else:
        assert f"{evil} is not a plain tensor checkpoint: unpickling it would run code" in reported


def test_features_cli_refuses_a_malicious_checkpoint(finetune_data, tmp_path, marker, capsys):
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    output = tmp_path / "features.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        features.main(["--model", "convnextv2_atto", "--checkpoint", str(evil), "--data_path",
                       str(finetune_data / "val"), "--output", str(output), "--num_workers", "0"])
    assert exit_info.value.code == 2
    assert f"--checkpoint {evil}: {evil} is not a plain tensor checkpoint" in capsys.readouterr().err
    assert not output.exists()


def test_feature_file_with_pickled_objects_is_refused(tmp_path, marker):
    path = tmp_path / "features.npz"
    np.savez(path, pooled=np.zeros((1, 4), np.float32),
             class_names=np.array([CreatesMarkerWhenUnpickled(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        features.load_features(path)


@pytest.mark.parametrize("cli", ["pretrain", "finetune"])
def test_yaml_config_cannot_construct_python_objects(cli, tmp_path, marker, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text(f"model: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    main = pretrain.main if cli == "pretrain" else load_finetune_script().main
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"--config {config}: not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
