"""Tiny ImageNet-style folders for tests (helper module, no tests here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 72, seed: int = 0) -> Path:
    """``root/<class_i>/<j>.jpg`` with smooth random colour images (varied sizes); returns ``root``."""
    rng = np.random.default_rng(seed)
    for class_index in range(classes):
        folder = Path(root) / f"class_{class_index}"
        folder.mkdir(parents=True, exist_ok=True)
        for image_index in range(per_class):
            coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
            height, width = size + 8 * (image_index % 2), size + 4 * class_index
            image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
            image.save(folder / f"{image_index}.jpg", quality=90)
    return Path(root)
