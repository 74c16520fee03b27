"""The Imagenette study (benchmarks/imagenette_study.py) end to end at smoke scale, across a cut
session and a resume, and its pieces."""
import collections
import json
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks import imagenette_study as study

STEP_FUNCTIONS = ("calibrate", "pretrain_arm", "finetune_arm", "probe_arm")
STEP_PREFIXES = {"calibrate": "calibrate-", "pretrain_arm": "pretrain-", "finetune_arm": "finetune-",
                 "probe_arm": "probe-"}


def count_calls(patch: pytest.MonkeyPatch, calls: collections.Counter, fail_on: str = "", fail_with=None):
    """Wrap the study's step functions to count their calls; ``fail_on``'s first call raises ``fail_with``."""
    for name in STEP_FUNCTIONS:
        original = getattr(study, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            if _name == fail_on:
                raise fail_with
            return _original(*args)

        patch.setattr(study, name, counted)


def stored_steps(out):
    return {path.name: (path.stat().st_mtime_ns, path.read_text()) for path in (out / "steps").iterdir()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke study cut by an interrupt at its first probe, then continued, then rerun once finished."""
    root = tmp_path_factory.mktemp("study")
    flags = ["--smoke", "--output-dir", str(root / "out"), "--cache-dir", str(root / "cache"), "--threads", "1"]
    cut_calls, resumed_calls = collections.Counter(), collections.Counter()
    with pytest.MonkeyPatch.context() as patch:
        count_calls(patch, cut_calls, fail_on="probe_arm", fail_with=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            study.main(flags)
    after_cut = stored_steps(root / "out")
    with pytest.MonkeyPatch.context() as patch:
        count_calls(patch, resumed_calls)
        results = study.main(flags)
    with pytest.MonkeyPatch.context() as patch:
        for name in STEP_FUNCTIONS:
            patch.setattr(study, name, lambda *args, _name=name: pytest.fail(f"{_name} ran in a finished study"))
        rerun = study.main(flags)
    return types.SimpleNamespace(root=root, out=root / "out", flags=flags, results=results, rerun=rerun,
                                 after_cut=after_cut, cut_calls=cut_calls, resumed_calls=resumed_calls)


def test_a_cut_study_continues_without_rerunning_a_finished_step(smoke):
    reference = "64px-stem4-mask0.6-0.002min"
    assert sorted(smoke.after_cut) == sorted([f"calibrate-{reference}.json", f"pretrain-{reference}.json",
                                              f"finetune-{reference}-seed0.json",
                                              "finetune-scratch-64px-stem4-seed0.json"])
    now = stored_steps(smoke.out)
    assert all(now[name] == stored for name, stored in smoke.after_cut.items()), "a finished step was rewritten"
    for function, prefix in STEP_PREFIXES.items():  # every step ran exactly once over the two sessions
        files = [name for name in now if name.startswith(prefix)]
        assert smoke.cut_calls[function] + smoke.resumed_calls[function] == len(files) + (function == "probe_arm"), \
            function


def test_a_finished_study_reruns_nothing_and_reports_the_same(smoke):
    assert smoke.rerun == smoke.results
    assert json.loads((smoke.out / "study.json").read_text()) == smoke.results


def test_the_study_compares_the_arms_then_the_mask_ratio_seeds_and_longer_budget_of_the_winner(smoke):
    results = smoke.results
    arms = results["arms"]
    first = ["64px-stem4-mask0.6-0.002min", "32px-stem2-mask0.6-0.002min", "64px-stem2-mask0.6-0.002min"]
    assert list(arms)[:3] == first and results["reference"] == first[0]

    def first_seed_gain(name):
        return arms[name]["gains"]["finetune"]["0"]

    best = max(first, key=first_seed_gain)
    ratio_arm = best.replace("mask0.6", "mask0.75")
    assert list(arms)[3] == ratio_arm
    assert results["winner"] == max([*first, ratio_arm], key=first_seed_gain)
    assert results["long"] == results["winner"].replace("0.002min", "0.004min") == list(arms)[4]
    for name, arm in arms.items():
        seeds = ["0", "1"] if name in (results["reference"], results["winner"], results["long"]) else ["0"]
        assert list(arm["finetune"]) == seeds == list(arm["scratch"]), name


def test_every_arm_pretrains_for_the_epochs_its_calibration_gives_its_budget(smoke):
    for name, arm in smoke.results["arms"].items():
        calibration, pretraining = arm["calibration"], arm["pretraining"]
        assert calibration["epochs"] == study.planned_epochs(arm["arm"]["budget_minutes"] * 60,
                                                             calibration["images_per_s"], 12), name
        assert pretraining["epochs"] == calibration["epochs"]
        assert pretraining["images_seen"] == pretraining["epochs"] * 12  # 12 fake train images, batch 4
        assert pretraining["images_per_s"] == pytest.approx(pretraining["images_seen"] / pretraining["train_s"])
        assert len(pretraining["loss_per_epoch"]) == pretraining["epochs"]
        assert [point["epoch"] for point in pretraining["knn_curve"]] == [0, pretraining["epochs"]]  # --knn-points 2


def test_the_longer_budget_reuses_the_winners_calibration(smoke):
    """One speed per setting: the longer budget buys its ratio of the winner's updates, whatever
    the machine's speed when it starts (a study may span sessions)."""
    arms, long_name = smoke.results["arms"], smoke.results["long"]
    assert arms[long_name]["calibration"]["images_per_s"] == arms[smoke.results["winner"]]["calibration"]["images_per_s"]
    assert not (smoke.out / "steps" / f"calibrate-{long_name}.json").exists()


def test_gains_are_fine_tune_minus_scratch_of_the_same_seed_and_probe_minus_random_encoder(smoke):
    for name, arm in smoke.results["arms"].items():
        gains = arm["gains"]
        for seed, run in arm["finetune"].items():
            assert gains["finetune"][seed] == pytest.approx(run["acc1"] - arm["scratch"][seed]["acc1"]), name
        probes = arm["linear_probe"]
        assert gains["linear_probe"] == pytest.approx(probes["fcmae"]["acc1"] - probes["random"]["acc1"])
        assert gains["knn"] == pytest.approx(probes["fcmae"]["knn_acc1"] - probes["random"]["knn_acc1"])
        assert 0 <= probes["fcmae"]["acc1"] <= 100 and probes["fcmae"]["val_images"] == 4


def test_stride_2_arms_pretrain_a_2x2_stem_and_the_monitor_ends_at_the_probe_20nn(smoke):
    for name, arm in smoke.results["arms"].items():
        encoder = load_file(arm["pretraining"]["encoder"])
        stride = arm["arm"]["stem_stride"]
        assert encoder["stem.0.weight"].shape == (40, 3, stride, stride), name
        # the monitor embeds the probe's images in its batches with the in-memory encoder
        assert arm["pretraining"]["knn_curve"][-1]["knn_top1"] == arm["linear_probe"]["fcmae"]["knn_acc1"], name
    assert not list(smoke.out.glob("runs/*/checkpoint-*.pth")), "finished pretrainings keep their checkpoints"


def test_the_study_writes_its_table_plot_and_reconstructions(smoke):
    table = (smoke.out / "study.md").read_text()
    assert "| arm | input (px) | stem stride | mask grid |" in table
    for name, arm in smoke.results["arms"].items():
        assert f"| {name} |" in table or f"| **{name}** (" in table
        with Image.open(smoke.out / f"reconstructions-{name}.png") as picture:  # 5 labelled columns
            assert picture.width == 5 * arm["arm"]["input_size"] + 6 * 2
    assert "| 32 | 2 | 2x2 of 16 px | 0.6 | 0.002 |" in table
    with Image.open(smoke.out / "study.png") as plot:
        assert plot.width > 100


def test_a_rerun_with_other_settings_is_refused_naming_them(smoke, capsys):
    before = stored_steps(smoke.out)
    with pytest.raises(SystemExit) as exit_info:
        study.main([*smoke.flags, "--finetune-epochs", "2"])
    assert exit_info.value.code == 2
    assert "--finetune-epochs 1 -> 2" in capsys.readouterr().err
    assert stored_steps(smoke.out) == before


def test_a_pretraining_cut_after_an_epoch_continues_to_the_same_encoder(smoke, tmp_path, monkeypatch):
    args = study.parse_args(study.build_parser(), ["--smoke", "--cache-dir", str(smoke.root / "cache"),
                                                   "--output-dir", str(tmp_path), "--threads", "1"])
    arm = study.Arm(64, 2, 0.6, 1.0)
    splits = study.SplitsBySize(args)(64)
    whole = study.pretrain_arm(args, arm, 2, tmp_path / "whole", splits)
    epochs_trained = []
    original = study.train_one_epoch

    def train_one_epoch(*train_args):
        epochs_trained.append(train_args[5])
        if train_args[5] == 1 and len(epochs_trained) == 2:
            raise KeyboardInterrupt  # the session ends during the second epoch
        return original(*train_args)

    monkeypatch.setattr(study, "train_one_epoch", train_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        study.pretrain_arm(args, arm, 2, tmp_path / "cut", splits)
    continued = study.pretrain_arm(args, arm, 2, tmp_path / "cut", splits)
    assert epochs_trained == [0, 1, 1], "the continued run did not start at the second epoch"
    assert continued["loss_per_epoch"] == whole["loss_per_epoch"]
    assert [point["knn_top1"] for point in continued["knn_curve"]] == \
        [point["knn_top1"] for point in whole["knn_curve"]]
    expected, got = load_file(whole["encoder"]), load_file(continued["encoder"])
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_one_setting_with_stem_stride_2(tmp_path):
    results = study.main(["--smoke", "--stem-stride", "2", "--second-mask-ratio", "0", "--long-budget-minutes", "0",
                          "--finetune-seeds", "0", "--output-dir", str(tmp_path / "out"),
                          "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert list(results["arms"]) == ["64px-stem2-mask0.6-0.002min"] == [results["reference"]] == [results["winner"]]
    assert results["long"] is None and "gain_grows_with_budget" not in results["aims"]
    assert load_file(results["arms"][results["winner"]]["pretraining"]["encoder"])["stem.0.weight"].shape[2:] == (2, 2)


def test_planned_epochs_fill_the_budget_with_whole_epochs():
    assert study.planned_epochs(40 * 60, images_per_s=80.0, images_per_epoch=9440) == 20  # 20.3 epochs
    assert study.planned_epochs(40 * 60, images_per_s=18.0, images_per_epoch=9440) == 5  # 4.6
    assert study.planned_epochs(1.0, images_per_s=10.0, images_per_epoch=9440) == 1  # at least one


def test_knn_epochs_spread_the_points_from_initialisation_to_the_end():
    assert study.knn_epochs(17, points=6) == [0, 3, 7, 10, 14, 17]
    assert study.knn_epochs(2, points=6) == [0, 1, 2]


@pytest.mark.parametrize("flags, named", [
    (["--input-size", "100"], "--input-size/--stem-stride 100/4: the input size must be a multiple of the mask "
                              "patch 32"),
    (["--arms", "128/4", "40/2"], "--arms 40/2: the input size must be a multiple of the mask patch 16"),
    (["--arms", "96/3"], "--arms 96/3: the stem stride must be 4 or 2"),
    (["--arms", "96/2", "--stem-stride", "2"], "give one or the other"),
    (["--second-mask-ratio", "0.6"], "--second-mask-ratio 0.6: must be in (0, 1) and differ from --mask-ratio"),
    (["--budget-minutes", "40", "--long-budget-minutes", "20"], "--long-budget-minutes 20.0: must exceed"),
])
def test_bad_settings_are_refused_naming_the_flag(flags, named, tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--smoke", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *flags])
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_setting_flags_replace_the_arm_list():
    parser = study.build_parser()
    assert study.parse_args(parser, ["--stem-stride", "2"]).arms == [(128, 2)]
    assert study.parse_args(study.build_parser(), ["--input-size", "96", "--stem-stride", "2"]).arms == [(96, 2)]
    assert study.parse_args(study.build_parser(), []).arms == [(128, 4), (96, 2), (128, 2)]


def test_cached_split_is_read_back_without_decoding(smoke, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(study, "decode_split", no_decoding)
    data_root = smoke.root / "cache" / "fake-imagenette"
    cached = study.load_split(data_root.resolve(), "val", 64, smoke.root / "cache", workers=0)
    assert cached["images"].shape == (6, 3, 64, 64) and cached["images"].dtype == torch.uint8
    assert cached["labels"].tolist() == [0, 0, 0, 1, 1, 1]


def test_balanced_subset_takes_the_same_count_from_every_class():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    chosen = study.balanced_subset(labels, per_class=3, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert torch.equal(chosen, study.balanced_subset(labels, per_class=3, seed=0))


def test_seeded_epochs_give_fine_tuning_and_scratch_the_same_batches():
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    dataset = study.CachedImages(images, torch.arange(8), study.train_augmentation(32, study.FINETUNE_CROP_SCALE))

    def batches():
        loader = study.train_loader(dataset, batch_size=4)
        return [batch for _ in study.seeded_epochs(2, seed=5) for batch in loader]

    first, second = batches(), batches()
    assert len(first) == 4
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)
