"""FCMAE pretraining model for ConvNeXt V2."""
import models  # noqa: F401  (first: installs the torchvision guard before timm is imported)
from models import mask_from_visible_cells, visible_cells_from_mask
from models.convnextv2 import DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE

from .init_from import InitReport, init_from
from .masking import keep_count, random_visible_cells
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
    stem_stride: int = DEFAULT_STEM_STRIDE,
    in_chans: int = DEFAULT_IN_CHANS,
) -> FCMAE:
    """FCMAE with a ``model_name`` encoder (``convnextv2_<size>``); see ``FCMAE``.
    ``grad_checkpointing``: recompute encoder blocks in the backward pass (less memory, more compute).
    ``stem_stride``: 4 (the paper; mask patch 32) or 2 (small images; mask patch 16);
    ``in_chans``: input image channels (the reconstruction target has as many)."""
    model = FCMAE(model_name, backend, mask_ratio, decoder_dim, decoder_depth, norm_pix_loss, drop_path_rate,
                  stem_stride, in_chans)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


__all__ = ["FCMAE", "InitReport", "build_fcmae", "init_from", "keep_count", "mask_from_visible_cells", "patchify",
           "random_visible_cells", "unpatchify", "visible_cells_from_mask"]
