"""The Imagenette FCMAE study (benchmarks/imagenette_study.py) end to end at smoke scale, and its pieces."""
import argparse
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks import imagenette_study as study


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    data_root = study.write_fake_imagenette(root / "data")
    results = study.main(["--smoke", "--data-root", str(data_root), "--output-dir", str(root / "out"),
                          "--cache-dir", str(root / "cache"), "--threads", "1"])
    return results, root, data_root


def test_smoke_study_reports_every_arm_as_a_percentage(smoke_run):
    results, root, _ = smoke_run
    written = json.loads((root / "out" / "study.json").read_text())
    arms = [written["finetune"]["scratch"], *written["finetune"]["fcmae"].values(), *written["linear_probe"].values()]
    assert all(0.0 <= arm["acc1"] <= 100.0 for arm in arms)
    assert written["setup"]["val_images"] == 4 and written["setup"]["labelled_images"] == 8
    assert written["setup"]["pretrain_images"] == 12  # --smoke: the whole (fake) train split
    assert results["targets_met"] == written["targets_met"]


def test_smoke_study_fine_tunes_every_budget_against_one_scratch_baseline(smoke_run):
    results, root, _ = smoke_run
    finetune, gains = results["finetune"], results["gains"]["finetune"]
    assert list(finetune["fcmae"]) == ["1", "2"] == list(gains)  # --smoke: budgets 1 and 2 of a 2-epoch run
    for budget, arm in finetune["fcmae"].items():
        assert gains[budget] == pytest.approx(arm["acc1"] - finetune["scratch"]["acc1"])
    assert results["targets_met"]["finetune_largest_budget"] == (gains["2"] >= study.AIMED_GAIN)
    encoders = [load_file(results["setup"]["encoders"][budget]) for budget in ("1", "2")]  # kept in --cache-dir
    assert encoders[0].keys() == encoders[1].keys()
    assert any(not torch.equal(encoders[0][name], encoders[1][name]) for name in encoders[0]), \
        "the 1- and 2-epoch budgets saved the same weights"


def test_smoke_study_records_the_knn_curve_and_its_end_equals_the_final_probe(smoke_run):
    results, _, _ = smoke_run
    curve = results["knn_curve"]
    assert [point["epoch"] for point in curve] == [0, 1, 2]  # initialisation, then every epoch
    assert all(0.0 <= point["knn_top1"] <= 100.0 and point["knn_time_s"] > 0 for point in curve)
    # the monitor embeds the probes' images in the probes' batches with the in-memory encoder;
    # the probe reads the exported file: the same features, the same 20-NN
    assert curve[-1]["knn_top1"] == results["linear_probe"]["fcmae"]["knn_acc1"]


def test_knn_epochs_cover_initialisation_the_cadence_every_budget_and_the_end():
    args = argparse.Namespace(pretrain_epochs=26, knn_every=5, budgets=[5, 12, 26])
    assert study.knn_epochs(args) == [0, 5, 10, 12, 15, 20, 25, 26]


def test_smoke_study_logs_a_finite_loss_per_pretraining_iteration(smoke_run):
    results, _, _ = smoke_run
    losses = results["pretrain_loss"]["per_iteration"]
    assert len(losses) == 2 * (12 // 4)  # 12 fake train images, batch 4, two epochs
    assert all(math.isfinite(value) and value > 0 for value in losses)


def test_smoke_study_writes_table_and_pictures(smoke_run):
    _, root, _ = smoke_run
    table = (root / "out" / "study.md").read_text()
    assert "| 0 (scratch) |" in table and "| 2 |" in table and "| linear probe top-1 (%) |" in table
    assert "| epoch | 0 | 1 | 2 |" in table
    with Image.open(root / "out" / "reconstructions.png") as picture:  # 5 labelled columns of 64 px images
        assert picture.width == 5 * 64 + 6 * 2
    for name in ("pretrain_loss.png", "learning_curve.png"):
        with Image.open(root / "out" / name) as plot:
            assert plot.width > 100, name


def test_cached_split_is_read_back_without_decoding(smoke_run, monkeypatch):
    _, root, data_root = smoke_run

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(study, "decode_split", no_decoding)
    cached = study.load_split(data_root, "val", 64, root / "cache", workers=0)
    assert cached["images"].shape == (6, 3, 64, 64) and cached["images"].dtype == torch.uint8
    assert cached["labels"].tolist() == [0, 0, 0, 1, 1, 1]


def test_balanced_subset_takes_the_same_count_from_every_class():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    chosen = study.balanced_subset(labels, per_class=3, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert torch.equal(chosen, study.balanced_subset(labels, per_class=3, seed=0))


def test_seeded_epochs_give_both_finetuning_arms_the_same_batches():
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    dataset = study.CachedImages(images, torch.arange(8), study.train_augmentation(32, study.FINETUNE_CROP_SCALE))

    def batches():
        loader = study.train_loader(dataset, batch_size=4)
        return [batch for _ in study.seeded_epochs(2, seed=5) for batch in loader]

    first, second = batches(), batches()
    assert len(first) == 4
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)


def test_budget_beyond_the_pretraining_epochs_is_rejected_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        study.main(["--smoke", "--pretrain-epochs", "3", "--budgets", "2", "5"])
    assert "--budgets 2 5" in capsys.readouterr().err


def test_input_size_not_a_multiple_of_32_is_rejected_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        study.main(["--smoke", "--input-size", "100"])
    assert "--input-size" in capsys.readouterr().err
