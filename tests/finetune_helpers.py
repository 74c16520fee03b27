"""Helpers for the fine-tuning and transfer tests (no tests here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}


def make_colour_folder(root: Path, classes=tuple(COLOURS), per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """``root/<colour>/<i>.png``: noisy images whose mean colour is the class (linearly separable)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.array(COLOURS[name], dtype=np.float64) + rng.normal(0, 25, size=(size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return Path(root)


def load_finetune_script():
    """The top-level ``finetune.py`` as a module (``import finetune`` is the package)."""
    spec = importlib.util.spec_from_file_location("finetune_cli", REPO_ROOT / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
