"""fcmae.knn_monitor: the k-NN monitor of pretraining, alone, inside pretrain.py, and under DDP."""
import argparse
import json
import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import fcmae
import knn_ranks
import pretrain
from conftest import free_port, randomize_grn
from engine.checkpoint import load_checkpoint, save_safetensors
from engine.data import ImageFolderSkippingUnreadable
from engine.eval_transform import build_eval_transform
from engine.knn import knn_accuracy
from engine.signals import EXIT_STOPPED, StopRequested, request_stop
from fcmae import knn_monitor
from fcmae.knn_monitor import DenseEncoderView, KNNMonitor, balanced_indices, build_knn_monitor
from finetune.features import FeatureExtractor
from finetune.linear_probe import main as linear_probe_main
from image_folders import make_image_folder

torch.set_num_threads(1)

MODEL = "convnextv2_atto"


def knn_folder(root, train_per_class=5, val_per_class=1, classes=2, size=40, noise=120.0):
    """``root/{train,val}/c<i>/<j>.png``: class = a colour shift buried in heavy noise, so k-NN
    top-1 lands between chance and 100% and a change of features can move it."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            colour = np.array([120 + 25 * label, 120, 140 - 25 * label], dtype=np.float64)
            for index in range(per_class):
                pixels = colour + rng.normal(0, noise, size=(size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


def trained_looking_encoder(seed=0):
    torch.manual_seed(seed)
    encoder = fcmae.build_fcmae(MODEL).encoder
    randomize_grn(encoder)  # GRN starts as the identity; give it values so a wrong GRN shows
    return encoder


def test_balanced_indices_share_the_cap_evenly_and_deterministically():
    targets = [0] * 10 + [1] * 3 + [2] * 7
    chosen = balanced_indices(targets, 12)
    assert chosen == sorted(set(chosen)) and len(chosen) == 12
    counts = torch.bincount(torch.tensor(targets)[chosen]).tolist()
    assert counts == [5, 3, 4]  # class 1 has only 3: its share goes to the others, one apart at most
    assert chosen[:5] == [0, 2, 4, 6, 8]  # evenly spaced within class 0, not its first five
    assert balanced_indices(targets, 12) == chosen
    assert balanced_indices(targets, None) == list(range(20)) == balanced_indices(targets, 50)


def test_dense_view_of_the_encoder_equals_the_exported_encoder_loaded_into_timm(tmp_path):
    encoder = trained_looking_encoder()
    path = save_safetensors(encoder.state_dict(), tmp_path / "encoder.safetensors")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        borrowed = DenseEncoderView(MODEL, torch.device("cpu"))(encoder, images)
    assert torch.equal(borrowed, FeatureExtractor(MODEL, path).pooled(images))  # bitwise: same ops, same weights


def test_without_knn_data_path_nothing_is_built_or_read(monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("the monitor read a folder although --knn_data_path is absent")

    monkeypatch.setattr(knn_monitor, "ImageFolderSkippingUnreadable", no_reading)
    monkeypatch.setattr(knn_monitor, "KNNMonitor", no_reading)
    assert build_knn_monitor(argparse.Namespace(knn_data_path=None), torch.device("cpu")) is None


def test_pretraining_logs_knn_top1_equal_to_the_linear_probe_cli_on_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_image_folder(tmp_path / "pretrain_data", classes=2, per_class=2)
    knn_data = knn_folder(tmp_path / "knn", train_per_class=6, val_per_class=3, classes=3)
    output = tmp_path / "out"
    pretrain.main(["--model", MODEL, "--input_size", "64", "--batch_size", "2", "--epochs", "3",
                   "--warmup_epochs", "1", "--blr", "1.5e-2", "--data_path", str(data), "--output_dir", str(output),
                   "--num_workers", "0", "--print_freq", "10", "--knn_data_path", str(knn_data), "--knn_freq", "2",
                   "--knn_k", "5"])
    epochs = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert ["knn_top1" in record for record in epochs] == [False, True, True]  # every 2 epochs and after the last
    assert all(record["knn_time_s"] > 0 for record in epochs[1:])
    assert f"epoch 3/3 done: loss {epochs[2]['loss']:.4f}" in (output / "train.log").read_text()
    assert f"knn_top1 {epochs[2]['knn_top1']:.2f}%" in (output / "train.log").read_text()
    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.endswith("/knn_top1")]  # epoch/ or val/ prefix
    assert len(tags) == 1, events.Tags()["scalars"]
    assert [event.step for event in events.Scalars(tags[0])] == [4, 6]  # optimizer updates done: 2 per epoch

    probe = linear_probe_main(["--model", MODEL, "--checkpoint", str(output / "encoder.safetensors"),
                               "--data_path", str(knn_data), "--input_size", "64", "--batch_size", "2",
                               "--num_workers", "0", "--epochs", "1", "--knn_k", "5", "--device", "cpu"])
    assert probe["train_images"] == 18 and probe["val_images"] == 9
    assert 100 / 3 < probe["knn_acc1"] < 100  # neither chance nor trivial: a feature change could move it
    assert epochs[2]["knn_top1"] == probe["knn_acc1"]


def test_should_stop_is_asked_before_every_batch_and_a_true_answer_raises_stop_requested(tmp_path):
    root = knn_folder(tmp_path, train_per_class=5, val_per_class=2)  # batches of 3: train 4, val 2
    monitor, encoder = monitor_on(root), trained_looking_encoder()
    answers = []
    monitor.evaluate(encoder, should_stop=lambda: answers.append(False) or False)
    assert len(answers) == 4 + 2
    answers.clear()
    with pytest.raises(StopRequested):
        monitor.evaluate(encoder, should_stop=lambda: answers.append(len(answers) == 2) or answers[-1])
    assert answers == [False, False, True]  # stopped before the third batch, nothing asked after


def test_a_stop_asked_for_in_the_last_iteration_checkpoints_the_epoch_without_its_knn_pass(tmp_path, monkeypatch,
                                                                                           caplog):
    data = make_image_folder(tmp_path / "pretrain_data", classes=2, per_class=2)  # 2 iterations of batch 2
    knn_data = knn_folder(tmp_path / "knn", train_per_class=6, val_per_class=3, classes=3)  # train: 9 batches
    real_make_loss_fn = pretrain.make_loss_fn

    def make_loss_fn_asking_to_stop(*args, **kwargs):
        loss_fn = real_make_loss_fn(*args, **kwargs)

        def loss(model, batch, step):
            if step.iteration == 1:  # the epoch's last: its stop is left to the end of the epoch
                request_stop("test")
            return loss_fn(model, batch, step)

        return loss

    monkeypatch.setattr(pretrain, "make_loss_fn", make_loss_fn_asking_to_stop)
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exited:
        pretrain.main(["--model", MODEL, "--input_size", "64", "--batch_size", "2", "--epochs", "2",
                       "--warmup_epochs", "1", "--data_path", str(data), "--output_dir", str(output),
                       "--num_workers", "0", "--knn_data_path", str(knn_data), "--knn_k", "5"])
    assert exited.value.code == EXIT_STOPPED
    assert "k-NN monitor: pass stopped before train batch 1 of 9" in caplog.text
    assert f"stopped on test after epoch 1: wrote {output / 'checkpoint-1.pth'}; rerun" in caplog.text
    assert load_checkpoint(output / "checkpoint-1.pth")["epoch"] == 1
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [(record["epoch"], "knn_top1" in record) for record in records] == [(1, False)]


@pytest.mark.parametrize("flag_args, message", [
    (["--knn_freq", "0"], "--knn_freq"),
    (["--knn_k", "0"], "--knn_k"),
    (["--knn_max_images", "-1"], "--knn_max_images"),
])
def test_invalid_knn_flags_exit_before_any_work_naming_the_flag(tmp_path, capsys, flag_args, message):
    with pytest.raises(SystemExit) as stopped:
        pretrain.main(["--output_dir", str(tmp_path / "out"), *flag_args])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_knn_data_path_without_val_is_rejected_naming_the_flag(tmp_path, capsys):
    make_image_folder(tmp_path / "knn" / "train", classes=2, per_class=1)
    with pytest.raises(SystemExit):
        pretrain.main(["--output_dir", str(tmp_path / "out"), "--knn_data_path", str(tmp_path / "knn")])
    error = capsys.readouterr().err
    assert "--knn_data_path" in error and "val/" in error


# ----------------------------------------------------------------------------- DDP

WORLD_SIZE = 2


def monitor_on(root, batch_size=3):
    transform = build_eval_transform(64)
    train, val = (ImageFolderSkippingUnreadable(root / split, transform, substitute_unreadable=False)
                  for split in ("train", "val"))
    return KNNMonitor(MODEL, train, val, num_classes=2, k=3, batch_size=batch_size)


def embed_on_rank(rank, port, root, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        monitor, encoder = monitor_on(root), trained_looking_encoder()
        results[rank] = {"train": monitor.embed_split(encoder, "train"), "val": monitor.embed_split(encoder, "val"),
                         "top1": monitor.evaluate(encoder)["knn_top1"]}
    finally:
        dist.destroy_process_group()


# train: 10 images in batches of 3 -> 4 batches (rank 0: 1st and 3rd, rank 1: 2nd and the short 4th);
# val: 2 images, one batch, so rank 1 embeds nothing there
SHARES = {0: {"train": [0, 1, 2, 6, 7, 8], "val": [0, 1]}, 1: {"train": [3, 4, 5, 9], "val": []}}


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_features_and_top1(tmp_path):
    root = knn_folder(tmp_path, train_per_class=5, val_per_class=1)
    monitor, encoder = monitor_on(root), trained_looking_encoder()
    single = {split: monitor.embed_split(encoder, split) for split in ("train", "val")}
    single_top1 = monitor.evaluate(encoder)["knn_top1"]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(embed_on_rank, args=(free_port(), root, results), nprocs=WORLD_SIZE, join=True)
        results = dict(results)
    for split in ("train", "val"):  # the shards hold every image once
        assert sorted(SHARES[0][split] + SHARES[1][split]) == list(range(len(single[split][1])))
    for rank in range(WORLD_SIZE):
        for split in ("train", "val"):
            features, labels = results[rank][split]
            rows = torch.tensor(SHARES[rank][split], dtype=torch.int64)
            assert torch.equal(labels, single[split][1][rows]), (rank, split)
            assert torch.equal(features, single[split][0][rows]), f"rank {rank} {split} features differ"
        assert results[rank]["top1"] == single_top1


@pytest.mark.slow
def test_a_bank_sharded_over_two_ranks_gives_the_single_process_knn_top1():
    # noisy clusters: top-1 between chance and 100%, so a wrong neighbour would show; rank 1 holds
    # fewer bank rows than k (its top-k is padded) and 5 of the 13 queries
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator)
    bank_labels, query_labels = torch.arange(20) % 3, torch.arange(13) % 3
    bank = centres[bank_labels] + 1.5 * torch.randn(20, 16, generator=generator)
    queries = centres[query_labels] + 1.5 * torch.randn(13, 16, generator=generator)
    expected = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=3, k=5)
    assert 100 / 3 < expected < 100
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(knn_ranks.sharded_knn_on_rank, nprocs=WORLD_SIZE, join=True,
                 args=(free_port(), bank, bank_labels, queries, query_labels, [17, 3], [8, 5], results))
        results = dict(results)
    for rank in range(WORLD_SIZE):
        assert results[rank] == (expected, 13, 20), f"rank {rank}: {results[rank]}"
