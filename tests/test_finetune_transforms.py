"""finetune.transforms: the RandAugment recipe survives its strongest posterize draw."""
import numpy as np
from PIL import Image

from finetune.transforms import build_train_transform


def test_randaugment_posterize_at_full_magnitude_gives_a_black_image_instead_of_an_error():
    randaugment = build_train_transform(32).transforms[2]
    posterize = next(op for op in randaugment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0  # keeps 0 bits
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(posterize(image)).max() == 0
    posterize.magnitude = 5  # keeps 2 bits: 200 = 0b11001000 -> 0b11000000
    assert np.asarray(posterize(image)).max() == 192
