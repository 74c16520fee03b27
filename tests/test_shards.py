"""WebDataset shards: the converter's format, shards written with plain tarfile, the index of local
and streamed shards, training on them, what is never decoded, bad members and bad shard names."""
import contextlib
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch.multiprocessing as mp
from PIL import Image

import pretrain
from conftest import free_port
from engine.checkpoint import load_checkpoint
from engine.image_decode import load_rgb_image
from engine.image_index import NO_LABEL
from engine.shards import SHARD_INDEX_NAME, ShardIndexCache, is_shard_source, open_shard, stream_order
from finetune_helpers import load_finetune_script, make_colour_folder
from image_folders import make_image_folder
from reliability.faults import assert_states_equal, finetune_args, pretrain_args
from shard_ranks import WORLD_SIZE, streamed_labels_on_rank
from shard_files import convert, image_bytes, piped, unpickling_payload, write_tar

PRETRAIN_KEYS = ("model", "optimizer", "stepper")


def error_of(main, argv, output, capsys) -> str:
    """stderr of ``main(argv)``, which must stop with exit code 2 before writing anything."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert not output.exists(), "a run that fails to start leaves nothing behind"
    return capsys.readouterr().err


# ---------------------------------------------------------------- the format

def test_converter_writes_class_folders_as_plain_tar_shards_with_cls_labels(tmp_path, capsys):
    source = make_image_folder(tmp_path / "src", classes=3, per_class=5)
    pattern = convert(source, tmp_path / "out", "--shard_size", "4")
    assert pattern == str(tmp_path / "out" / "data-{000000..000003}.tar")
    assert f"wrote 15 samples in 4 shards to {tmp_path / 'out'}, 3 classes" in capsys.readouterr().out
    assert (tmp_path / "out" / "classes.txt").read_text() == "class_0\nclass_1\nclass_2\n"
    assert (tmp_path / "out" / "shards.txt").read_text() == "".join(f"data-{number:06d}.tar\n" for number in range(4))
    found, keys = {}, []
    for number in range(4):
        with tarfile.open(tmp_path / "out" / f"data-{number:06d}.tar") as tar:
            members = tar.getmembers()
            assert all(member.isreg() for member in members)
            for image, label in zip(members[::2], members[1::2]):
                key = image.name.split(".")[0]
                assert (image.name, label.name) == (f"{key}.jpg", f"{key}.cls")
                keys.append(key)
                found[tar.extractfile(image).read()] = int(tar.extractfile(label).read())
    assert keys == [f"{number:06d}" for number in range(15)]
    expected = {path.read_bytes(): int(path.parent.name[-1]) for path in source.rglob("*.jpg")}
    assert found == expected, "every image once, its bytes unchanged, labelled with its class folder's index"


def plain_shard(path):
    """Members as other tools write them: extra members, a folder entry, a key with dots in its
    folder, a sample without an image, an array image. Returns (shard, images, labels) of the
    image samples in order."""
    images = [image_bytes(0), image_bytes(1, format="PNG"), image_bytes(2)]
    array = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    array_file = path.parent / "array.npy"
    np.save(array_file, array)
    shard = write_tar(path, [
        ("s0.jpg", images[0]), ("s0.cls", b"1"), ("s0.txt", b"a caption"),
        ("folder", None),
        ("s1.png", images[1]), ("s1.json", b'{"label": 2}'),
        ("s2.json", b"{}"),  # no image: left out
        ("sub.dir/s3.jpeg", images[2]), ("sub.dir/s3.cls", b" 0\n"),
        ("s4.npy", array_file.read_bytes()), ("s4.cls", b"not a number"),
    ])
    return shard, [*images, array], [1, NO_LABEL, 0, NO_LABEL]


@pytest.mark.parametrize("stream", [False, True], ids=["local", "pipe"])
def test_shards_written_with_tarfile_index_and_decode_like_their_source_files(tmp_path, stream, caplog):
    shard, images, labels = plain_shard(tmp_path / "plain.tar")
    with caplog.at_level(logging.INFO):
        index = ShardIndexCache().load_or_build(piped(str(shard)) if stream else str(shard))
    assert index.streamed == stream
    assert len(index) == 4 and index.labels.tolist() == labels
    assert "1 samples without an image member" in caplog.text
    for position, original in enumerate(images):
        expected = original if isinstance(original, np.ndarray) else decoded(original)
        assert np.array_equal(np.asarray(load_rgb_image(index[position])), expected), position


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------- training on shards

def test_pretraining_on_local_shards_equals_pretraining_on_the_folder_they_were_written_from(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "photos", classes=2, per_class=4)
    pattern = convert(folder, tmp_path / "shards", "--shard_size", "3", "--no-shuffle")
    pretrain.main(pretrain_args(folder, tmp_path / "from_folder", epochs=2))
    with caplog.at_level(logging.INFO):
        pretrain.main(pretrain_args(pattern, tmp_path / "from_shards", epochs=2))
    assert f"data: 8 images in 3 shards of {pattern}" in caplog.text
    from_shards = load_checkpoint(tmp_path / "from_shards" / "checkpoint-2.pth")
    from_folder = load_checkpoint(tmp_path / "from_folder" / "checkpoint-2.pth")
    for key in PRETRAIN_KEYS:
        assert_states_equal(from_shards[key], from_folder[key], key)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        pretrain.main(pretrain_args(pattern, tmp_path / "from_shards", epochs=3))
    assert f"reusing the index of 3 shards saved in {tmp_path / 'from_shards' / SHARD_INDEX_NAME}" in caplog.text


def test_finetuning_on_shards_equals_finetuning_on_the_class_folders(tmp_path):
    finetune = load_finetune_script()
    root = tmp_path / "colours"
    make_colour_folder(root / "train", per_class=2, size=24, seed=0)
    make_colour_folder(root / "val", per_class=1, size=24, seed=1)
    train = convert(root / "train", tmp_path / "train", "--shard_size", "3", "--no-shuffle")
    val = convert(root / "val", tmp_path / "val", "--shard_size", "3", "--no-shuffle")
    from_folder = finetune.main(finetune_args(root, tmp_path / "from_folder", epochs=1))
    from_shards = finetune.main(finetune_args(train, tmp_path / "from_shards", "--eval_data_path", val, epochs=1))
    assert from_shards["model"]["count"] == from_folder["model"]["count"] == 4
    assert from_shards == from_folder
    assert_states_equal(load_checkpoint(tmp_path / "from_shards" / "checkpoint-1.pth")["model"],
                        load_checkpoint(tmp_path / "from_folder" / "checkpoint-1.pth")["model"], "model")

    streamed = finetune.main(finetune_args(piped(train), tmp_path / "streamed", "--eval_data_path", piped(val),
                                           epochs=1, workers=2))
    assert streamed["model"]["count"] == 4, "streamed validation shards count every image once"


def test_a_corrupt_member_is_skipped_and_counted(tmp_path, caplog):
    members = []
    for number in range(5):
        data = image_bytes(number)
        members.append((f"{number}.jpg", data[: len(data) // 3] if number == 2 else data))
    shard = write_tar(tmp_path / "shards" / "broken.tar", members)
    for source, output in ((str(shard), "local"), (piped(str(shard)), "pipe")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stats = pretrain.main(pretrain_args(source, tmp_path / output, epochs=1))
        assert stats["unreadable_images"] == 1, output
        assert f"skipping unreadable image {source}:2.jpg" in caplog.text, output


@pytest.mark.parametrize("stream", [False, True], ids=["local", "pipe"])
def test_members_that_would_be_unpickled_are_never_loaded(tmp_path, stream):
    marker = tmp_path / "code-ran"
    payload = unpickling_payload(marker)
    shard = write_tar(tmp_path / "shards" / "pickles.tar", [
        member for number in range(4) for member in (
            (f"{number}.pyd", payload), (f"{number}.jpg", image_bytes(number)), (f"{number}.pickle", payload),
            (f"{number}.pth", payload), (f"{number}.cls", b"0"))])
    source = piped(str(shard)) if stream else str(shard)
    stats = pretrain.main(pretrain_args(source, tmp_path / "out", epochs=1, workers=1))
    assert stats["unreadable_images"] == 0
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text())["epoch"] == 1
    assert not marker.exists(), "a .pyd/.pickle/.pth member was unpickled"


def test_a_shard_damaged_part_way_keeps_the_samples_before_the_damage(tmp_path, caplog):
    shard = write_tar(tmp_path / "damaged.tar", [(f"{number}.jpg", image_bytes(number)) for number in range(3)])
    with tarfile.open(shard) as tar:
        second_header = tar.getmembers()[1].offset
    with open(shard, "r+b") as file:
        file.seek(second_header)
        file.write(b"garbage" * 20)
    with caplog.at_level(logging.WARNING):
        index = ShardIndexCache().load_or_build(str(shard))
    assert len(index) == 1 and np.array_equal(np.asarray(load_rgb_image(index[0])), decoded(image_bytes(0)))
    assert f"shard {shard}: damaged after its first 1 samples (no member header at byte {second_header})" in caplog.text


# ---------------------------------------------------------------- shards named wrongly

@pytest.mark.parametrize("problem", ["missing shard", "empty list", "pipe in a list", "failing command"])
def test_unusable_shard_names_are_one_error_line_and_nothing_is_written(tmp_path, capsys, problem):
    write_tar(tmp_path / "shards" / "data-000000.tar", [("0.jpg", image_bytes(0))])
    listing = tmp_path / "shards" / "shards.txt"
    data_path, expected = {
        "missing shard": (str(tmp_path / "shards" / "data-{000000..000001}.tar"),
                          f"no such shard {tmp_path / 'shards' / 'data-000001.tar'}"),
        "empty list": (str(listing), f"no images listed in {listing}; expected image files"),
        "pipe in a list": (str(listing), f"line 2 of {listing} is a command (pipe:cat data-000000.tar); a shard list "
                                         "names files or http(s) URLs only"),
        "failing command": (piped(str(tmp_path / "missing.tar")), f"cannot read shard pipe:cat {tmp_path}"),
    }[problem]
    lists = {"empty list": "# shards to come\n", "pipe in a list": "data-000000.tar\npipe:cat data-000000.tar\n"}
    listing.write_text(lists.get(problem, ""))
    output = tmp_path / "out"
    error = error_of(pretrain.main, pretrain_args(data_path, output), output, capsys)
    lines = [line for line in error.splitlines() if "--data_path" in line and "run `" not in line]
    assert len(lines) == 1 and f"--data_path {data_path}: {expected}" in lines[0], error


# ---------------------------------------------------------------- the order of streamed shards

@pytest.mark.parametrize("drop_last", [True, False], ids=["training", "evaluation"])
def test_stream_order_covers_every_sample_once_with_equal_batches_per_rank(drop_last):
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 7, size=rng.integers(1, 6))
        world_size, batch_size, streams = (int(value) for value in rng.integers(1, 4, size=3))
        shard_order = rng.permutation(len(counts))
        orders = [stream_order(counts, shard_order, rank, world_size, batch_size, streams, drop_last)
                  for rank in range(world_size)]
        seen = np.concatenate(orders)
        assert len(np.unique(seen)) == len(seen), "a sample read twice in one epoch"
        total = int(counts.sum())
        if drop_last:
            assert len({len(order) for order in orders}) == 1, "ranks with different numbers of batches"
            assert len(orders[0]) == total // world_size // batch_size * batch_size
        else:
            assert sorted(seen.tolist()) == list(range(total))
            assert [len(order) for order in orders] == [len(range(rank, total, world_size))
                                                       for rank in range(world_size)]


def test_stream_order_reads_each_workers_part_of_the_shards_in_order():
    counts, shard_order = np.array([5, 1, 3, 6]), np.array([2, 0, 3, 1])
    # the epoch's sequence: shard 2 (6 7 8), shard 0 (0-4), shard 3 (9-14), shard 1 (5); rank 1 of 2: 4 9 10 11 12 13 14
    order = stream_order(counts, shard_order, 1, 2, 2, 2, True)
    assert order.tolist() == [4, 9, 12, 13, 10, 11]  # batches 0, 2 from the part 4 9 10 11; batch 1 from 12 13


def test_shard_sources_are_told_from_image_lists(tmp_path):
    (tmp_path / "images.txt").write_text("# photos\na.jpg\nb.tar\n")
    (tmp_path / "shards.txt").write_text("\n# shards\na.tar\n")
    (tmp_path / "urls.txt").write_text("https://example.invalid/a.tar?token=1\n")
    assert not is_shard_source(tmp_path / "images.txt") and not is_shard_source(tmp_path)
    assert all(map(is_shard_source, (tmp_path / "shards.txt", tmp_path / "urls.txt", "pipe:cat x", "a-{0..3}.tar",
                                     "https://example.invalid/a.tar")))


@pytest.mark.slow
def test_two_ranks_on_uneven_streamed_shards_read_every_sample_once_in_equal_steps(tmp_path):
    counts = (5, 1, 7, 0, 4)  # 17 samples; label = the sample's number
    number = 0
    for shard, count in enumerate(counts):
        members = []
        for _ in range(count):
            members += [(f"{number:03d}.jpg", image_bytes(number)), (f"{number:03d}.cls", str(number).encode())]
            number += 1
        write_tar(tmp_path / f"data-{shard}.tar", members)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(streamed_labels_on_rank, args=(free_port(), piped(str(tmp_path / "data-{0..4}.tar")), results),
                 nprocs=WORLD_SIZE, join=True)
        results = dict(results)
    assert len(results[0]) == len(results[1]) == 17 // 2 // 2, "ranks with different numbers of steps"
    seen = [label for rank in (0, 1) for batch in results[rank] for label in batch]
    assert len(seen) == len(set(seen)) == 16, "a sample read twice, or more dropped than the last one"


def test_pipe_commands_run_in_a_session_of_their_own(tmp_path):
    """A scheduler's SIGTERM to the job's process group must not cut the streams the stop's last
    batches are read from (also when the training process reads them itself, --num_workers 0)."""
    shard = write_tar(tmp_path / "data.tar", [("0.jpg", image_bytes(0))])
    stream = open_shard(f"pipe:cat {shard}; sleep 30")
    try:
        assert os.getsid(stream.proc.pid) == stream.proc.pid != os.getsid(0)
        assert tarfile.open(fileobj=stream, mode="r|").next().name == "0.jpg"
    finally:
        stream.proc.kill()
        with contextlib.suppress(OSError):
            stream.close()


def test_visualize_redraws_the_picture_of_a_run_on_streamed_shards(tmp_path):
    from fcmae.visualize import main as visualize

    pattern = convert(make_image_folder(tmp_path / "photos", classes=2, per_class=3), tmp_path / "shards",
                      "--shard_size", "4")
    pretrain.main(pretrain_args(piped(pattern), tmp_path / "out", epochs=1))
    visualize(["--checkpoint", str(tmp_path / "out" / "checkpoint-1.pth"), "--output", str(tmp_path / "redrawn.png"),
               "--device", "cpu"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "redrawn.png")),
                          np.asarray(Image.open(tmp_path / "out" / "reconstruction.png")))


def test_resuming_streamed_shards_with_another_number_of_workers_is_refused(tmp_path, capsys):
    pattern = convert(make_image_folder(tmp_path / "photos", classes=2, per_class=2), tmp_path / "shards")
    output = tmp_path / "out"
    pretrain.main(pretrain_args(piped(pattern), output, epochs=1, workers=1))
    with pytest.raises(SystemExit) as caught:
        pretrain.main(pretrain_args(piped(pattern), output, epochs=2, workers=2))
    assert caught.value.code == 2
    assert (f"--num_workers 2: checkpoint {output / 'checkpoint-1.pth'} was trained on streamed shards with "
            "--num_workers 1, and their order depends on it") in capsys.readouterr().err
    assert not (output / "checkpoint-2.pth").exists()
