"""The Imagenette FCMAE study (benchmarks/imagenette_study.py) end to end at smoke scale, and its pieces."""
import json
import math

import pytest
import torch
from PIL import Image

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
    for section, arms in (("finetune", ("fcmae", "scratch")), ("linear_probe", ("fcmae", "random"))):
        for arm in arms:
            assert 0.0 <= written[section][arm]["acc1"] <= 100.0
    assert written["gains"]["finetune"] == pytest.approx(
        written["finetune"]["fcmae"]["acc1"] - written["finetune"]["scratch"]["acc1"])
    assert written["setup"]["val_images"] == 4 and written["setup"]["labelled_images"] == 8
    assert written["setup"]["pretrain_images"] == 12  # --smoke: the whole (fake) train split
    assert results["targets_met"] == written["targets_met"]


def test_smoke_study_logs_a_finite_loss_per_pretraining_iteration(smoke_run):
    results, _, _ = smoke_run
    losses = results["pretrain_loss"]["per_iteration"]
    assert len(losses) == 12 // 4  # 12 fake train images, batch 4, one epoch
    assert all(math.isfinite(value) and value > 0 for value in losses)


def test_smoke_study_writes_table_and_pictures(smoke_run):
    _, root, _ = smoke_run
    table = (root / "out" / "study.md").read_text()
    assert "| fine-tune top-1 (%) |" in table and "| linear probe top-1 (%) |" in table
    with Image.open(root / "out" / "reconstructions.png") as picture:  # 5 labelled columns of 64 px images
        assert picture.width == 5 * 64 + 6 * 2
    pytest.importorskip("matplotlib")
    with Image.open(root / "out" / "pretrain_loss.png") as plot:
        assert plot.width > 100


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


def test_input_size_not_a_multiple_of_32_is_rejected_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        study.main(["--smoke", "--input-size", "100"])
    assert "--input-size" in capsys.readouterr().err
