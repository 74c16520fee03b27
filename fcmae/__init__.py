"""FCMAE pretraining model for ConvNeXt V2."""
import models  # noqa: F401  (first: installs the torchvision guard before timm is imported)

from .masking import keep_count, random_masking
from .model import FCMAE, patchify, unpatchify


def build_fcmae(
    model_name: str,
    backend: str = "sparse",
    mask_ratio: float = 0.6,
    decoder_dim: int = 512,
    decoder_depth: int = 1,
    norm_pix_loss: bool = True,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
) -> FCMAE:
    """FCMAE with a ``model_name`` encoder (``convnextv2_<size>``); see ``FCMAE``.
    ``grad_checkpointing``: recompute encoder blocks in the backward pass (less memory, more compute)."""
    model = FCMAE(model_name, backend, mask_ratio, decoder_dim, decoder_depth, norm_pix_loss, drop_path_rate)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


__all__ = ["FCMAE", "build_fcmae", "keep_count", "patchify", "random_masking", "unpatchify"]
