"""engine.image_files and engine.image_index: folders in any layout, class folders, file lists, and
an index that holds no Python object per image."""
import gc
import os
import pickle
import types

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from engine.data import ImageFiles, ImageFolderSkippingUnreadable, pretraining_source
from engine.image_files import describe_skipped, read_file_list, scan_class_folders, scan_folder
from engine.image_index import NO_LABEL, ImageIndex, PathArray
from image_folders import make_image_folder
from own_data import NESTED_IMAGES, NESTED_NON_IMAGES, make_nested_folder, write_photo


def test_folder_scan_finds_every_image_at_any_depth_and_counts_the_other_files(tmp_path):
    root = make_nested_folder(tmp_path / "photos")
    scan = scan_folder(root)
    assert list(scan.index.entries) == list(NESTED_IMAGES), "every image, files before subfolders, names sorted"
    assert list(scan.index) == [os.path.join(root, relative) for relative in NESTED_IMAGES]
    assert scan.index.labels is None and scan.index.label(0) == NO_LABEL
    assert scan.skipped_count == 3 and scan.skipped_examples == NESTED_NON_IMAGES
    assert describe_skipped(scan) == "3 non-image files skipped (notes.txt, a/b/labels.csv, z/.DS_Store)"


def test_class_folder_scan_has_torchvision_imagefolders_labels_and_order(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=3, per_class=3)
    write_photo(root / "class_1" / "nested" / "deeper.png")
    (root / "class_2" / "readme.md").write_text("skipped")
    reference = ImageFolder(str(root))
    scan = scan_class_folders(root)
    assert [(scan.index.path(i), scan.index.label(i)) for i in range(len(scan.index))] == reference.samples
    assert list(scan.index.classes) == reference.classes
    assert scan.skipped_count == 1


def test_plain_folder_without_class_folders_is_refused_by_the_labelled_scan(tmp_path):
    write_photo(tmp_path / "loose.jpg")
    with pytest.raises(FileNotFoundError, match="no class folders in"):
        scan_class_folders(tmp_path)


def test_file_list_takes_relative_and_absolute_lines_and_ignores_comments_and_blank_lines(tmp_path):
    first = write_photo(tmp_path / "images" / "first.jpg")
    second = write_photo(tmp_path / "lists" / "here" / "second.png")
    elsewhere = write_photo(tmp_path / "elsewhere" / "third.jpg")
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"# my dataset\n\n  ../images/first.jpg  \nhere/second.png\r\n{elsewhere}\nnotes.txt\n# end\n")
    scan = read_file_list(listing)
    assert [os.path.normpath(path) for path in scan.index] == [str(first), str(second), str(elsewhere)]
    assert scan.skipped_count == 1 and scan.skipped_examples == ("notes.txt",)


def test_pretraining_reads_a_file_a_train_folder_or_the_folder_itself(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n")
    assert pretraining_source(listing) == listing
    assert pretraining_source(tmp_path) == tmp_path
    (tmp_path / "train").mkdir()
    assert pretraining_source(tmp_path) == tmp_path / "train"


def test_paths_that_are_not_utf8_survive_the_index(tmp_path):
    name = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"  # Latin-1 bytes: not valid UTF-8
    write_photo(tmp_path / "ok.jpg")
    with open(name, "wb") as file:
        file.write((tmp_path / "ok.jpg").read_bytes())
    index = scan_folder(tmp_path).index
    assert len(index) == 2 and all(os.path.isfile(path) for path in index)


def reachable_objects(root) -> int:
    """Python objects reachable from ``root`` (classes, modules and functions not followed)."""
    seen, pending = set(), [root]
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        pending.extend(gc.get_referents(obj))
    return len(seen)


def synthetic_index(entries: int) -> ImageIndex:
    paths = PathArray.pack(f"n{i // 100:08d}/n{i // 100:08d}_{i}.JPEG".encode() for i in range(entries))
    return ImageIndex("/data/imagenet/train", paths, np.arange(entries, dtype=np.int64) // 100,
                      tuple(f"n{i:08d}" for i in range(-(-entries // 100))))


def test_the_dataset_holds_a_fixed_number_of_python_objects_whatever_its_size():
    small, large = ImageFiles(synthetic_index(100)), ImageFiles(synthetic_index(20_000))
    class_names = len(large.index.classes) - len(small.index.classes)
    assert reachable_objects(large) - reachable_objects(small) == class_names, (
        "an object per image: DataLoader workers would copy them (copy-on-read)")
    old_style = ImageFolder.__new__(ImageFolder)
    old_style.samples = [(large.index.path(i), large.index.label(i)) for i in range(len(large))]
    assert reachable_objects(old_style) > 2 * len(large), "the measure must see a list of tuples"


def test_the_pickled_index_is_its_arrays_and_nothing_per_image():
    index = synthetic_index(20_000)
    arrays = index.entries.data.nbytes + index.entries.offsets.nbytes + index.labels.nbytes
    overhead = len(pickle.dumps(index)) - arrays
    assert 0 < overhead < 5_000 + 20 * len(index.classes), f"{overhead} bytes beyond the arrays"
    restored = pickle.loads(pickle.dumps(ImageFiles(index)))
    assert restored.index.path(12_345) == index.path(12_345) == "/data/imagenet/train/n00000123/n00000123_12345.JPEG"
    assert restored.index.label(12_345) == 123


def test_class_folder_dataset_keeps_imagefolder_attributes(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    dataset, reference = ImageFolderSkippingUnreadable(root), ImageFolder(str(root))
    assert list(dataset.samples) == reference.samples and dataset.targets.tolist() == reference.targets
    assert dataset.classes == reference.classes and dataset.class_to_idx == reference.class_to_idx
    assert dataset.root == reference.root and len(dataset) == len(reference)
