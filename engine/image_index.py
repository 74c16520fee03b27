"""The paths (and labels) of a dataset's images, held in a few numpy arrays.

A Python list of ``(path, label)`` tuples costs about 190 bytes per image, and a DataLoader
worker that reads it touches every object's reference count, which makes the pages holding
the objects private to the worker (copy-on-read): at 14M images, gigabytes per worker. Here
the paths are one ``uint8`` array of their bytes (``os.fsencode``) plus an ``int64`` offsets
array, and the labels one ``int64`` array: reading an entry writes nothing, so forked workers
keep sharing the parent's pages, whatever the dataset's size.

* ``PathArray``: a read-only sequence of strings packed in ``data`` + ``offsets``;
  ``PathArray.pack(items)`` builds one from ``bytes`` items.
* ``ImageIndex(root, entries, labels=None, classes=())``: ``path(i)`` is ``root`` joined with
  entry ``i`` (an absolute entry stays as it is), ``label(i)`` its label (``NO_LABEL`` without
  labels); as a sequence it yields the full paths.
* ``index_arrays(index)`` / ``index_from_arrays(arrays)``: the index as a dict of numpy arrays
  (for ``np.savez``; read back with ``allow_pickle=False``).
"""
from __future__ import annotations

import array
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

NO_LABEL = -2  # the label of every image of an index without labels (pretraining ignores labels)


class PathArray(Sequence[str]):
    """Strings packed in two arrays: ``data`` (uint8, the encoded strings one after another) and
    ``offsets`` (int64, length + 1 entries: string ``i`` is ``data[offsets[i]:offsets[i + 1]]``)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        if data.dtype != np.uint8 or offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) < 1:
            raise ValueError("PathArray needs uint8 data and an int64 offsets array of length + 1 entries")
        self.data, self.offsets = data, offsets

    @classmethod
    def pack(cls, items: Iterable[bytes]) -> "PathArray":
        """The ``bytes`` items (``os.fsencode`` of the strings) packed without a per-item object."""
        data, lengths = bytearray(), array.array("q")
        for item in items:
            data += item
            lengths.append(len(item))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
        return cls(np.frombuffer(data, dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def encoded(self, position: int) -> bytes:
        if not 0 <= position < len(self):
            raise IndexError(f"entry {position} out of range for {len(self)} entries")
        return self.data[self.offsets[position]:self.offsets[position + 1]].tobytes()

    def __getitem__(self, position: int) -> str:
        return os.fsdecode(self.encoded(position))

    def __iter__(self) -> Iterator[str]:
        return (self[position] for position in range(len(self)))


@dataclass(eq=False)  # numpy fields: compare the arrays themselves
class ImageIndex(Sequence[str]):
    """The images of a dataset: ``entries`` relative to ``root`` (or absolute), ``labels`` (N,) int64
    indices into ``classes`` (None: no labels)."""

    root: str
    entries: PathArray
    labels: Optional[np.ndarray] = None
    classes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.labels is not None and len(self.labels) != len(self.entries):
            raise ValueError(f"{len(self.labels)} labels for {len(self.entries)} entries")

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, position: int) -> str:
        """Full path of image ``position``."""
        return os.path.join(self.root, self.entries[position])

    def label(self, position: int) -> int:
        return int(self.labels[position]) if self.labels is not None else NO_LABEL

    def __getitem__(self, position: int) -> str:
        return self.path(position)

    def __iter__(self) -> Iterator[str]:
        return (self.path(position) for position in range(len(self)))


def index_arrays(index: ImageIndex) -> dict[str, np.ndarray]:
    """``index`` as plain numpy arrays (no object arrays: loadable with ``allow_pickle=False``)."""
    arrays = {"root": np.array(index.root), "entries_data": index.entries.data,
              "entries_offsets": index.entries.offsets, "classes": np.array(index.classes, dtype=str)}
    if index.labels is not None:
        arrays["labels"] = index.labels
    return arrays


def index_from_arrays(arrays: Mapping[str, np.ndarray]) -> ImageIndex:
    """The inverse of ``index_arrays``; KeyError/ValueError if an array is missing or malformed."""
    return ImageIndex(str(arrays["root"]), PathArray(arrays["entries_data"], arrays["entries_offsets"]),
                      arrays["labels"] if "labels" in arrays else None, tuple(str(name) for name in arrays["classes"]))
