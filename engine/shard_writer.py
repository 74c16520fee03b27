"""Writing a folder of images (or a file list) as WebDataset shards.

    python -m engine.shard_writer /data/imagenet/train /data/shards/train            # 1000 images a shard
    python -m engine.shard_writer /data/photos /data/shards/photos --shard_size 5000 --prefix photos

Every image file the scan finds (``engine.image_files``: a folder in any layout, searched
recursively, or a text file listing images) becomes one sample: ``<key>.<ext>`` holding the file's
bytes unchanged (no decoding, no re-encoding), ``key`` its six-digit (or longer) number. When
``SRC`` holds class folders (subfolders and no image directly inside it) each sample also gets
``<key>.cls``: the index of its class folder in sorted order, as torchvision's ImageFolder
numbers them, and ``classes.txt`` (one class name a line, line ``i`` for label ``i``) is written
beside the shards; ``--no-labels`` leaves both out. Samples are shuffled (``--seed``) unless
``--no-shuffle``, so that a shard mixes classes: streamed shards are read one after another.

The shards are plain POSIX (ustar) tar files of regular members, ``<prefix>-000000.tar``,
``<prefix>-000001.tar``, ...: what WebDataset, timm, OpenCLIP and DALI read. Each is written to a
hidden temporary file and renamed when complete; ``shards.txt`` lists them, one a line, and is
written last: ``--data_path OUT/shards.txt`` reads them all (so does the brace pattern printed).
``OUT`` must not hold shards already.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from .checkpoint import atomic_write
from .config import BooleanFlag, Check, ConfigError, validate
from .image_files import IMAGE_EXTENSIONS, is_image_file, read_file_list, scan_class_folders, scan_folder
from .image_index import ImageIndex
from .shards import CLASS_LIST_NAME, SHARD_SUFFIX, plural

KEY_DIGITS = 6
SHARD_LIST_NAME = "shards.txt"


def has_class_folders(root: Path) -> bool:
    """Subfolders and no image file directly inside: ``<root>/<class>/<image>``."""
    entries = list(os.scandir(root))
    return any(entry.is_dir() for entry in entries) and not any(
        entry.is_file() and is_image_file(os.fsencode(entry.name)) for entry in entries)


def source_index(source: Path, labels: bool) -> ImageIndex:
    """The images of ``source`` (a file list, class folders with ``labels``, or any folder)."""
    if source.is_file():
        return read_file_list(source).index
    return (scan_class_folders(source) if labels and has_class_folders(source) else scan_folder(source)).index


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}{SHARD_SUFFIX}"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode = len(data), 0o444  # mtime 0: the same images give the same bytes
    tar.addfile(member, io.BytesIO(data))


def write_shards(index: ImageIndex, output: Path, shard_size: int, prefix: str = "data",
                 order: Optional[np.ndarray] = None, progress: bool = False) -> list[Path]:
    """Write ``index``'s images (in ``order``, default as listed) as shards of ``shard_size`` samples
    into ``output``; returns the shard paths. Sample ``n`` of the output has key ``n`` (zero-padded)
    and, if the index has labels, a ``.cls`` member."""
    order = np.arange(len(index)) if order is None else order
    digits = max(KEY_DIGITS, len(str(len(index) - 1)))
    paths = []
    bar = tqdm(total=len(index), unit="img", disable=not progress)
    for start in range(0, len(index), shard_size):
        path = output / shard_name(prefix, len(paths))

        def write(file, start=start):
            with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for number in range(start, min(start + shard_size, len(index))):
                    position = int(order[number])
                    source = index.path(position)
                    key = f"{number:0{digits}d}"
                    add_member(tar, f"{key}.{Path(source).suffix[1:].lower()}", Path(source).read_bytes())
                    if index.labels is not None:
                        add_member(tar, f"{key}.cls", str(index.label(position)).encode())
                    bar.update()

        paths.append(atomic_write(path, write))
    bar.close()
    return paths


def data_path_of(shards: list[Path]) -> str:
    """The ``--data_path`` naming ``shards`` (a brace pattern from the first to the last)."""
    if len(shards) == 1:
        return str(shards[0])
    first, last = (path.name[:-len(SHARD_SUFFIX)] for path in (shards[0], shards[-1]))
    stem = first.rsplit("-", 1)[0] + "-"
    return str(shards[0].parent / f"{stem}{{{first[len(stem):]}..{last[len(stem):]}}}{SHARD_SUFFIX}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.shard_writer", description=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("SRC", help="a folder of images (class folders give labels) or a text file listing images")
    parser.add_argument("OUT", help="folder for the shards (created)")
    parser.add_argument("--shard_size", type=int, default=1000,
                        help="samples per shard (aim for 100 MB - 1 GB a shard: 1000 ImageNet JPEGs are ~110 MB)")
    parser.add_argument("--prefix", default="data", help="shard names: <prefix>-000000.tar, ...")
    parser.add_argument("--labels", action=BooleanFlag, default=True,
                        help="class folders -> .cls members and classes.txt")
    parser.add_argument("--shuffle", action=BooleanFlag, default=True, help="shuffle the samples over the shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    return parser


def holds_shards(folder: Path) -> bool:
    return (folder / SHARD_LIST_NAME).exists() or any(folder.glob(f"*{SHARD_SUFFIX}"))


WRITER_CHECKS = (
    Check("SRC", lambda a: Path(a.SRC).exists(), "no such folder or file"),
    Check("--shard_size", lambda a: a.shard_size >= 1, "must be >= 1 (samples per shard)"),
    Check("--prefix", lambda a: bool(a.prefix) and "/" not in a.prefix, "must be a non-empty file name prefix"),
    Check("OUT", lambda a: not holds_shards(Path(a.OUT)),
          f"already holds shards ({SHARD_LIST_NAME} or {SHARD_SUFFIX} files); choose another folder"),
)


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args, WRITER_CHECKS)
    except ConfigError as error:
        parser.error(str(error))
    source, output = Path(args.SRC), Path(args.OUT)
    index = source_index(source, args.labels)
    if not len(index):
        parser.error(f"SRC {source}: no image files ({' '.join(IMAGE_EXTENSIONS)}) found")
    output.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(args.seed).permutation(len(index)) if args.shuffle else None
    shards = write_shards(index, output, args.shard_size, args.prefix, order, progress=sys.stderr.isatty())
    if index.labels is not None:
        atomic_write(output / CLASS_LIST_NAME, lambda file: file.write("".join(
            f"{name}\n" for name in index.classes).encode()))
    listing = atomic_write(output / SHARD_LIST_NAME, lambda file: file.write("".join(
        f"{path.name}\n" for path in shards).encode()))
    classes = f", {len(index.classes)} classes ({CLASS_LIST_NAME})" if index.labels is not None else ""
    print(f"wrote {len(index)} samples in {plural(len(shards), 'shard')} to {output}{classes}; read them with "
          f"--data_path {listing} (or '{data_path_of(shards)}')")
    return shards


if __name__ == "__main__":
    main()
