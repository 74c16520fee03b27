"""Scanning a dataset once per run, and reusing the scan while the folder is unchanged.

Listing millions of files takes minutes on a network file system, and every rank of a job needs
the same list. ``IndexCache(path).load_or_scan(source)`` runs on every rank: rank 0 reuses the
scan saved at ``path`` (by an earlier run, in its output folder) if it is of the same ``source``
and still current, else scans ``source`` (a folder, recursively, or a file list); the other
ranks receive rank 0's result (``engine.distributed.broadcast_object``; they wait up to the
process group's timeout). ``save_pending()`` then writes a fresh scan to ``path`` atomically;
call it on rank 0 once the output folder exists, so that a run that fails to start writes
nothing.

Still current means: every folder the scan listed (or the list file) has the modification time
(ns) and size it had just before it was read. Adding, removing or renaming a file or folder
changes the modification time of the folder holding it, so the test costs one ``stat`` per
folder (about 1,000 for ImageNet) and lists nothing. A file rewritten in place keeps its path,
which is all the index holds. A folder modified less than ``SETTLE_S`` seconds before the scan
is not trusted (a file system with coarse timestamps could hide a change made in the same
tick): such a scan is used but not saved.

The file is a ``.npz`` of plain arrays, read with ``allow_pickle=False``.
"""
from __future__ import annotations

import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from .checkpoint import atomic_write
from .distributed import broadcast_object, get_rank
from .image_files import Scan, Stamps, read_file_list, scan_folder
from .image_index import PathArray, index_arrays, index_from_arrays

_logger = logging.getLogger(__name__)

INDEX_CACHE_NAME = "image_index.npz"
CACHE_FORMAT = 1
SETTLE_S = 2.0
_UNUSABLE_FILE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def scan_source(source: str | os.PathLike) -> Scan:
    """A file list if ``source`` is a file, else every image file under the folder."""
    return read_file_list(source) if os.path.isfile(source) else scan_folder(source)


def first_change(scan: Scan) -> Optional[str]:
    """What changed since ``scan`` was taken ("<folder> was modified"), or None if nothing did."""
    stamps = scan.stamps
    for position, relative in enumerate(stamps.paths):
        path = os.path.join(scan.index.root, relative) if relative else scan.index.root
        try:
            status = os.stat(path)
        except OSError:
            return f"{path} is gone"
        if (status.st_mtime_ns, status.st_size) != (stamps.mtime_ns[position], stamps.sizes[position]):
            return f"{path} was modified"
    return None


def is_settled(scan: Scan) -> bool:
    """Whether every stamp is older than ``SETTLE_S`` seconds before the scan (trustworthy later)."""
    return bool((scan.stamps.mtime_ns < scan.stamps.taken_ns - int(SETTLE_S * 1e9)).all())


def save_scan(scan: Scan, path: str | os.PathLike) -> Path:
    """Write ``scan`` to ``path`` (``.npz``) atomically; OutputWriteError if it cannot be written."""
    stamps = scan.stamps
    arrays = {**index_arrays(scan.index), "format": np.array(CACHE_FORMAT), "source": np.array(scan.source),
              "stamp_data": stamps.paths.data, "stamp_offsets": stamps.paths.offsets,
              "stamp_mtime_ns": stamps.mtime_ns, "stamp_sizes": stamps.sizes, "stamp_taken_ns": np.array(stamps.taken_ns),
              "skipped_count": np.array(scan.skipped_count), "skipped_examples": np.array(scan.skipped_examples, dtype=str)}
    return atomic_write(path, lambda file: np.savez(file, **arrays))


def load_scan(path: str | os.PathLike) -> Scan:
    """A scan written by ``save_scan``; one of ``OSError, ValueError, KeyError, EOFError,
    zipfile.BadZipFile`` if the file is not one."""
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    if int(arrays["format"]) != CACHE_FORMAT:
        raise ValueError(f"format {int(arrays['format'])}, not {CACHE_FORMAT}")
    stamps = Stamps(PathArray(arrays["stamp_data"], arrays["stamp_offsets"]), arrays["stamp_mtime_ns"],
                    arrays["stamp_sizes"], int(arrays["stamp_taken_ns"]))
    return Scan(str(arrays["source"]), index_from_arrays(arrays), stamps, int(arrays["skipped_count"]),
                tuple(str(example) for example in arrays["skipped_examples"]))


class IndexCache:
    """The saved scan of one run at ``path`` (None: never saved, never reused)."""

    def __init__(self, path: Optional[str | os.PathLike] = None):
        self.path = Path(path) if path is not None else None
        self.pending: Optional[Scan] = None  # a fresh scan for save_pending (rank 0)

    def load_or_scan(self, source: str | os.PathLike) -> Scan:
        """The scan of ``source`` on every rank (see the module docstring); the OSError of a
        failed scan is raised on every rank."""
        scan, error = None, None
        if get_rank() == 0:
            try:
                scan = self._reuse_or_scan(os.path.abspath(source))
            except OSError as failure:
                error = failure
        scan, error = broadcast_object((scan, error))
        if error is not None:
            raise error
        return scan

    def _reuse_or_scan(self, source: str) -> Scan:
        cached = self._current_cached_scan(source)
        if cached is not None:
            _logger.info("data: reusing the index of %s saved in %s (unchanged since)", source, self.path)
            return cached
        _logger.info("data: looking for images in %s", source)
        started = time.monotonic()
        scan = scan_source(source)
        _logger.info("data: found %d images in %s in %.1f s", len(scan.index), source, time.monotonic() - started)
        if self.path is not None and len(scan.index):
            if is_settled(scan):
                self.pending = scan
            else:
                _logger.info("data: %s changed less than %g s before the scan; its index is not saved for reuse",
                             source, SETTLE_S)
        return scan

    def _current_cached_scan(self, source: str) -> Optional[Scan]:
        """The saved scan if it is of ``source`` and still current; else None, the log saying why."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            cached = load_scan(self.path)
        except _UNUSABLE_FILE_ERRORS as error:
            _logger.warning("data: cannot use the saved index %s (%s: %s); scanning again", self.path,
                            type(error).__name__, error)
            return None
        if cached.source != source:
            _logger.info("data: the index saved in %s is of %s, not %s; scanning", self.path, cached.source, source)
            return None
        change = first_change(cached)
        if change is not None:
            _logger.info("data: %s changed since its index was saved in %s (%s); scanning it again", source,
                         self.path, change)
            return None
        return cached

    def save_pending(self) -> Optional[Path]:
        """Write the fresh scan of ``load_or_scan`` to ``path`` (rank 0; a no-op elsewhere and after a
        reuse). A failed write is a warning, not an error: the cache only saves time."""
        if self.pending is None or self.path is None:
            return None
        try:
            save_scan(self.pending, self.path)
        except OSError as error:
            _logger.warning("data: could not save the image index to %s (%s); the next run scans again",
                            self.path, error)
            return None
        _logger.info("data: saved the index of %d images to %s", len(self.pending.index), self.path)
        self.pending = None
        return self.path
