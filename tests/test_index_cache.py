"""engine.index_cache: a folder is scanned once per run, its index reused while it is unchanged."""
import logging
import os
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import index_cache
from engine.index_cache import INDEX_CACHE_NAME, IndexCache, load_scan
from own_data import NESTED_IMAGES, make_nested_folder, settle, write_photo


@pytest.fixture
def photos(tmp_path):
    root = make_nested_folder(tmp_path / "photos")
    settle(root)
    return root


def saved_scan(photos, output) -> IndexCache:
    cache = IndexCache(output / INDEX_CACHE_NAME)
    cache.load_or_scan(photos)
    output.mkdir()
    assert cache.save_pending() == output / INDEX_CACHE_NAME
    return cache


def test_saved_index_is_reused_without_scanning_while_the_folder_is_unchanged(photos, tmp_path, monkeypatch, caplog):
    saved_scan(photos, tmp_path / "out")
    monkeypatch.setattr(index_cache, "scan_source", lambda source: pytest.fail(f"{source} was scanned again"))
    cache = IndexCache(tmp_path / "out" / INDEX_CACHE_NAME)
    with caplog.at_level(logging.INFO):
        scan = cache.load_or_scan(photos)
    assert list(scan.index.entries) == list(NESTED_IMAGES) and scan.skipped_count == 3
    assert "reusing the index of" in caplog.text
    assert cache.save_pending() is None, "a reused index is not written again"


@pytest.mark.parametrize("change", ["add a file deep down", "remove a file", "add a folder"])
def test_a_changed_folder_is_scanned_again_and_the_log_says_which_folder(change, photos, tmp_path, caplog):
    saved_scan(photos, tmp_path / "out")
    if change == "add a file deep down":
        write_photo(photos / "a" / "b" / "c" / "new.png")
        expected, changed = [*NESTED_IMAGES[:5], "a/b/c/new.png", NESTED_IMAGES[5]], photos / "a" / "b" / "c"
    elif change == "remove a file":
        (photos / "a" / "1.png").unlink()
        expected, changed = [entry for entry in NESTED_IMAGES if entry != "a/1.png"], photos / "a"
    else:
        write_photo(photos / "new_folder" / "x.jpg")
        expected, changed = [*NESTED_IMAGES[:5], "new_folder/x.jpg", NESTED_IMAGES[5]], photos
    with caplog.at_level(logging.INFO):
        scan = IndexCache(tmp_path / "out" / INDEX_CACHE_NAME).load_or_scan(photos)
    assert list(scan.index.entries) == expected
    assert f"changed since its index was saved in {tmp_path / 'out' / INDEX_CACHE_NAME}" in caplog.text
    assert f"({changed} was modified)" in caplog.text


def test_index_of_another_folder_or_a_broken_file_is_not_used(photos, tmp_path, caplog):
    saved_scan(photos, tmp_path / "out")
    other = make_nested_folder(tmp_path / "other")
    (other / "top.jpg").unlink()
    with caplog.at_level(logging.INFO):
        assert len(IndexCache(tmp_path / "out" / INDEX_CACHE_NAME).load_or_scan(other).index) == len(NESTED_IMAGES) - 1
    assert f"is of {photos}, not {other}; scanning" in caplog.text
    (tmp_path / "out" / INDEX_CACHE_NAME).write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING):
        assert len(IndexCache(tmp_path / "out" / INDEX_CACHE_NAME).load_or_scan(photos).index) == len(NESTED_IMAGES)
    assert "cannot use the saved index" in caplog.text


def test_a_folder_modified_just_before_the_scan_is_not_saved(tmp_path):
    fresh = make_nested_folder(tmp_path / "fresh")  # coarse timestamps could hide a change in the same tick
    cache = IndexCache(tmp_path / "out" / INDEX_CACHE_NAME)
    assert len(cache.load_or_scan(fresh).index) == len(NESTED_IMAGES)
    (tmp_path / "out").mkdir()
    assert cache.save_pending() is None and not (tmp_path / "out" / INDEX_CACHE_NAME).exists()


def test_file_list_index_is_reused_until_the_list_changes(tmp_path, caplog):
    listing = tmp_path / "train.txt"
    listing.write_text("a.jpg\nb.jpg\n")
    settle(tmp_path)
    os.utime(listing, (os.stat(listing).st_atime, os.stat(tmp_path).st_mtime))
    saved_scan(listing, tmp_path / "out")
    listing.write_text("a.jpg\nb.jpg\nc.jpg\n")
    with caplog.at_level(logging.INFO):
        scan = IndexCache(tmp_path / "out" / INDEX_CACHE_NAME).load_or_scan(listing)
    assert list(scan.index.entries) == ["a.jpg", "b.jpg", "c.jpg"] and "train.txt was modified" in caplog.text


def test_saved_index_holds_plain_arrays_only(photos, tmp_path):
    saved_scan(photos, tmp_path / "out")
    with np.load(tmp_path / "out" / INDEX_CACHE_NAME, allow_pickle=False) as stored:
        assert all(stored[name].dtype != object for name in stored.files)
    assert list(load_scan(tmp_path / "out" / INDEX_CACHE_NAME).index.entries) == list(NESTED_IMAGES)


def _rank_scans(rank: int, port: int, photos: str, scans_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        def counted_scan(source):
            with open(scans_file, "a") as log:
                log.write(f"rank {rank}\n")
            return original(source)

        original = index_cache.scan_source
        index_cache.scan_source = counted_scan
        scan = IndexCache(os.path.join(photos, "..", "out", INDEX_CACHE_NAME)).load_or_scan(photos)
        results.put((rank, list(scan.index)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_two_processes_only_rank_0_scans_and_both_get_its_index(photos, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    scans_file = tmp_path / "scans.txt"
    context_processes = mp.start_processes(_rank_scans, args=(port, str(photos), str(scans_file), results), nprocs=2,
                                           start_method="spawn", join=False)
    context_processes.join(timeout=120)
    gathered = dict(results.get() for _ in range(2))
    assert scans_file.read_text() == "rank 0\n", "the folder must be scanned once, by rank 0"
    assert gathered[0] == gathered[1] == [os.path.join(photos, relative) for relative in NESTED_IMAGES]
