"""Fixtures of the fault-injection suite; helpers live in ``faults.py``, images in ``tests/image_folders.py``."""
import pytest
import torch

from finetune_helpers import make_colour_folder
from image_folders import make_image_folder

torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): bitwise-equal numbers


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    """8 images in 2 classes: 4 iterations of batch 2 per epoch."""
    return make_image_folder(tmp_path_factory.mktemp("pretrain_data") / "data", classes=2, per_class=4)


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    """Colour classes, 4 x 2 training images (4 iterations of batch 2), 4 x 1 validation images."""
    root = tmp_path_factory.mktemp("finetune_data") / "data"
    make_colour_folder(root / "train", per_class=2, size=24, seed=0)
    make_colour_folder(root / "val", per_class=1, size=24, seed=1)
    return root

