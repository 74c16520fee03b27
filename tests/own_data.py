"""Folders and file lists of people's own data, for tests (helper module, no tests here)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

# a folder in no particular layout: images at every depth, files that are not images, an empty folder
NESTED_IMAGES = ("top.jpg", "a/1.png", "a/b/2.jpg", "a/b/c/3.JPEG", "a/b/c/4.tif", "z/5.bmp")
NESTED_NON_IMAGES = ("notes.txt", "a/b/labels.csv", "z/.DS_Store")


def write_photo(path: Path, size: tuple[int, int] = (72, 80), seed: int = 0) -> Path:
    """A smooth random colour image at ``path`` (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).save(path)
    return path


def make_nested_folder(root: Path) -> Path:
    """``NESTED_IMAGES`` and ``NESTED_NON_IMAGES`` under ``root``, plus an empty folder."""
    for seed, relative in enumerate(NESTED_IMAGES):
        write_photo(root / relative, seed=seed)
    for relative in NESTED_NON_IMAGES:
        (root / relative).write_text("not an image")
    (root / "empty").mkdir()
    return root


def settle(root: Path, seconds_ago: float = 60.0) -> None:
    """Date every folder under ``root`` (and ``root``) ``seconds_ago`` into the past, as a dataset
    prepared earlier would be: only then is a scan of it saved for reuse (``engine.index_cache``)."""
    moment = time.time() - seconds_ago
    for folder, _, _ in os.walk(root):
        os.utime(folder, (moment, moment))
