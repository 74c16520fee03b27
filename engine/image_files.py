"""Finding a dataset's images: a folder in any layout, class folders, or a file list -> ``Scan``.

* ``IMAGE_EXTENSIONS``: what counts as an image file (case-insensitive): torchvision's image
  extensions and ``.npy`` arrays. Other files are passed over, counted, and a few named
  (``describe_skipped``).
* ``scan_folder(root)``: every image file under ``root``, searched recursively (symbolic links
  to folders followed, each folder listed once), unlabelled, in a fixed order: a folder's files
  sorted by name, then its subfolders in name order. For ``<root>/<class>/<image>`` this is
  torchvision ImageFolder's order.
* ``scan_class_folders(root)``: the images under each subfolder of ``root`` (the classes,
  sorted by name), each labelled with its class's index; files directly in ``root`` are not
  part of it. ``FileNotFoundError`` if ``root`` is not a folder or has no subfolder.
* ``read_file_list(path)``: one image path per line, relative to the list's folder or absolute;
  blank lines and lines starting with ``#`` are ignored. Listed files are not checked here (a
  missing one is an unreadable image when loaded).

A ``Scan`` also holds ``stamps``: the modification time and size of every folder listed (or of
the list file), taken before it was read, from which ``engine.index_cache`` tells whether a
saved index still describes the folder.
"""
from __future__ import annotations

import array
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .image_index import ImageIndex, PathArray
from .progress_bar import progress_bar

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".npy")
_IMAGE_SUFFIXES = tuple(os.fsencode(extension) for extension in IMAGE_EXTENSIONS)
SKIPPED_EXAMPLES = 5


@dataclass(eq=False)  # numpy fields: compare the arrays themselves
class Stamps:
    """``paths`` (relative to the index root) with ``mtime_ns`` and ``sizes`` as ``os.stat`` gave
    them at ``taken_ns`` (wall clock, ns), just before the scan listed or read them."""

    paths: PathArray
    mtime_ns: np.ndarray
    sizes: np.ndarray
    taken_ns: int


@dataclass(eq=False)  # numpy fields: compare the arrays themselves
class Scan:
    """What a scan of ``source`` (a folder or a list file) found: ``index``, ``stamps``, and the
    count of files passed over because they are not images, with a few of their paths."""

    source: str
    index: ImageIndex
    stamps: Stamps
    skipped_count: int = 0
    skipped_examples: tuple[str, ...] = ()


@dataclass
class _Recorder:
    """Stamps and skipped files of a scan in progress."""

    taken_ns: int = field(default_factory=time.time_ns)
    stamped: list = field(default_factory=list)
    mtime_ns: array.array = field(default_factory=lambda: array.array("q"))
    sizes: array.array = field(default_factory=lambda: array.array("q"))
    visited: set = field(default_factory=set)
    skipped_count: int = 0
    skipped_examples: list = field(default_factory=list)

    def stamp(self, relative: bytes, status: os.stat_result) -> None:
        self.stamped.append(relative)
        self.mtime_ns.append(status.st_mtime_ns)
        self.sizes.append(status.st_size)

    def skip(self, relative: bytes) -> None:
        self.skipped_count += 1
        if len(self.skipped_examples) < SKIPPED_EXAMPLES:
            self.skipped_examples.append(os.fsdecode(relative))

    def scan(self, source: str | os.PathLike, index: ImageIndex) -> Scan:
        stamps = Stamps(PathArray.pack(self.stamped), np.frombuffer(self.mtime_ns, dtype=np.int64),
                        np.frombuffer(self.sizes, dtype=np.int64), self.taken_ns)
        return Scan(os.fspath(source), index, stamps, self.skipped_count, tuple(self.skipped_examples))


def is_image_file(name: bytes) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _walk_images(root: bytes, top: bytes, recorder: _Recorder) -> Iterator[bytes]:
    """Paths (relative to ``root``) of the image files under ``root/top`` in the module's order."""
    pending = [top]
    while pending:
        folder = pending.pop()
        path = os.path.join(root, folder) if folder else root
        try:
            status = os.stat(path)
            if (status.st_dev, status.st_ino) in recorder.visited:  # a link back up the tree
                continue
            with os.scandir(path) as listing:
                children = sorted((entry.name, entry.is_dir()) for entry in listing)
        except OSError as error:
            if folder == top:
                raise
            _logger.warning("cannot list folder %s (%s); its files are left out", os.fsdecode(path), error)
            continue
        recorder.visited.add((status.st_dev, status.st_ino))
        recorder.stamp(folder, status)
        subfolders = []
        for name, is_folder in children:
            relative = os.path.join(folder, name) if folder else name
            if is_folder:
                subfolders.append(relative)
            elif is_image_file(name):
                yield relative
            else:
                recorder.skip(relative)
        pending.extend(reversed(subfolders))


def scan_folder(root: str | os.PathLike) -> Scan:
    """Every image file under ``root``, recursively, without labels."""
    recorder = _Recorder()
    entries = PathArray.pack(scanning(_walk_images(os.fsencode(root), b"", recorder), root))
    return recorder.scan(root, ImageIndex(os.fspath(root), entries))


def scan_class_folders(root: str | os.PathLike) -> Scan:
    """The images under ``root/<class>/``, labelled by the index of ``<class>`` among the sorted subfolders."""
    try:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except (FileNotFoundError, NotADirectoryError) as error:
        raise FileNotFoundError(f"no such folder: {root}") from error
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}")
    recorder, counts = _Recorder(), [0] * len(classes)
    recorder.stamp(b"", os.stat(root))

    def labelled_images() -> Iterator[bytes]:
        for label, name in enumerate(classes):
            for relative in _walk_images(os.fsencode(root), os.fsencode(name), recorder):
                counts[label] += 1
                yield relative

    entries = PathArray.pack(scanning(labelled_images(), root))
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return recorder.scan(root, ImageIndex(os.fspath(root), entries, labels, tuple(classes)))


def read_file_list(list_path: str | os.PathLike) -> Scan:
    """The image paths listed in ``list_path``, one per line, relative to its folder or absolute."""
    recorder = _Recorder()
    recorder.stamp(os.fsencode(os.path.basename(list_path)), os.stat(list_path))

    def listed_images() -> Iterator[bytes]:
        with open(list_path, "rb") as lines:
            for line in lines:
                entry = line.strip()
                if not entry or entry.startswith(b"#"):
                    continue
                if is_image_file(entry):
                    yield entry
                else:
                    recorder.skip(entry)

    entries = PathArray.pack(scanning(listed_images(), list_path))
    return recorder.scan(list_path, ImageIndex(os.path.dirname(os.fspath(list_path)), entries))


def scanning(images: Iterator[bytes], source: str | os.PathLike) -> Iterator[bytes]:
    """``images`` counted on a progress bar (the callers log the scan's duration)."""
    return progress_bar(images, f"scanning {os.fspath(source)}", unit="image", log=False)


def describe_skipped(scan: Scan) -> str:
    """"3 non-image files skipped (notes.txt, labels.csv, ...)", or "" when there were none."""
    if not scan.skipped_count:
        return ""
    more = ", ..." if scan.skipped_count > len(scan.skipped_examples) else ""
    return (f"{scan.skipped_count} non-image file{'s' if scan.skipped_count != 1 else ''} skipped "
            f"({', '.join(scan.skipped_examples)}{more})")
