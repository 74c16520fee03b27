"""k-NN top-1 of a frozen encoder on a labelled folder: the k-NN-only entry point of
``finetune.linear_probe`` (same flags minus the probe's, same features, same number; the
classifier is ``engine.knn``'s)::

    python -m finetune.knn --model convnextv2_atto --checkpoint encoder.safetensors \\
        --data_path /data/imagenette2-224 --input_size 128 --knn_k 20

For the checkpoint of a pretraining epoch, with the same ``--input_size`` and ``--batch_size``,
it prints the ``knn_top1`` that pretraining's k-NN monitor logged for that epoch.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .linear_probe import main as evaluate_frozen_encoder


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``{"knn_acc1": %, "train_images", "val_images", "extract_time_s", "total_time_s"}``."""
    return evaluate_frozen_encoder(argv, with_probe=False)


if __name__ == "__main__":
    main()
