"""engine.knn and finetune.linear_probe: classifiers on frozen features; the probe and k-NN CLIs."""
import runpy
import sys

import pytest
import torch

import models
from engine.checkpoint import save_safetensors
from engine.knn import knn_accuracy, knn_predict
from finetune.knn import main as knn_main
from finetune.linear_probe import main as linear_probe_main
from finetune.linear_probe import probe_accuracy, train_linear_probe
from finetune_helpers import make_colour_folder
from image_folders import make_image_folder


def clustered_features(classes=5, per_class=40, dim=32, spread=0.3, seed=0):
    """Gaussian clusters around random unit directions: separable by angle."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + spread / dim**0.5 * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_knn_on_separable_features_is_perfect():
    train, train_labels = clustered_features(seed=0)
    query, query_labels = clustered_features(per_class=20, seed=0)
    query = query + 0.01 * torch.randn(query.shape, generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(train, train_labels, query, query_labels, k=20) == 100.0


def test_knn_votes_are_weighted_by_similarity():
    # one very close neighbour of class 0 against two distant ones of class 1
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.02]])
    assert knn_predict(train, labels, query, k=3, temperature=0.07).item() == 0  # exp(1/0.07) >> 2 exp(0.07/0.07)
    assert knn_predict(train, labels, query, k=3, temperature=100.0).item() == 1  # near-uniform weights: majority


def test_knn_is_invariant_to_feature_scale():
    train, labels = clustered_features(seed=2)
    query, _ = clustered_features(per_class=5, seed=3)
    torch.testing.assert_close(knn_predict(train, labels, query), knn_predict(7 * train, labels, 0.1 * query))


def test_linear_probe_separates_linearly_separable_classes():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(16, 4, generator=generator)
    features = torch.randn(600, 16, generator=generator) * 3 + 5  # off-centre, scaled: standardisation matters
    labels = ((features - 5) @ weights).argmax(1)
    probe = train_linear_probe(features[:400], labels[:400], num_classes=4, epochs=100, lr=0.1)
    assert probe_accuracy(probe, features[400:], labels[400:]) >= 90.0  # chance: ~25%


def test_linear_probe_is_deterministic_for_a_seed():
    features, labels = clustered_features(per_class=10)
    first = train_linear_probe(features, labels, epochs=3, seed=4)
    second = train_linear_probe(features, labels, epochs=3, seed=4)
    torch.testing.assert_close(first.fc.weight, second.fc.weight, rtol=0, atol=0)


def test_linear_probe_cli_on_colour_folders_beats_chance(tmp_path):
    make_colour_folder(tmp_path / "data" / "train", per_class=6, size=32, seed=0)
    make_colour_folder(tmp_path / "data" / "val", per_class=3, size=32, seed=1)
    results = linear_probe_main(["--model", "convnextv2_atto", "--data_path", str(tmp_path / "data"),
                                 "--input_size", "32", "--batch_size", "32", "--num_workers", "0", "--epochs", "50",
                                 "--knn_k", "5", "--device", "cpu"])
    assert results["train_images"] == 24 and results["val_images"] == 12
    assert results["linear_probe_acc1"] >= 75.0  # chance: 25%; random-init features still encode colour
    assert results["knn_acc1"] >= 75.0


def test_linear_probe_cli_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit):
        linear_probe_main(["--model", "convnextv2_gigantic"])
    assert "unknown model 'convnextv2_gigantic'" in capsys.readouterr().err


def test_knn_cli_help_says_what_it_does_and_shows_its_flags(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "finetune.knn")  # run it afresh, as python -m finetune.knn -h does
    monkeypatch.setattr(sys, "argv", ["knn.py", "-h"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("finetune.knn", run_name="__main__")
    help_text = capsys.readouterr().out
    assert exited.value.code == 0 and help_text.startswith("usage: python -m finetune.knn"), help_text
    assert "k-NN top-1 of a frozen encoder" in help_text and "--knn_k" in help_text
    assert "--epochs" not in help_text  # the linear probe's flags are not its


def test_knn_cli_reports_the_knn_top1_of_the_linear_probe_cli(tmp_path):
    for split, per_class, seed in (("train", 6, 0), ("val", 3, 1)):  # content unrelated to the class: a middling top-1
        make_image_folder(tmp_path / "data" / split, classes=3, per_class=per_class, size=36, seed=seed)
    torch.manual_seed(0)
    checkpoint = save_safetensors(models.create_dense_model("convnextv2_atto", num_classes=0).state_dict(),
                                  tmp_path / "encoder.safetensors")
    flags = ["--model", "convnextv2_atto", "--checkpoint", str(checkpoint), "--data_path", str(tmp_path / "data"),
             "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--knn_k", "5", "--device", "cpu"]
    knn = knn_main(flags)
    probe = linear_probe_main([*flags, "--epochs", "1"])
    assert (knn["train_images"], knn["val_images"]) == (probe["train_images"], probe["val_images"]) == (18, 9)
    assert knn["knn_acc1"] == probe["knn_acc1"] and 0 < knn["knn_acc1"] < 100
    assert "linear_probe_acc1" not in knn


def test_knn_cli_rejects_zero_neighbours(capsys):
    with pytest.raises(SystemExit) as exited:
        knn_main(["--knn_k", "0"])
    assert exited.value.code == 2 and "--knn_k 0: must be >= 1" in capsys.readouterr().err
