"""ConvNeXt V2 models: dense (timm), sparse FCMAE encoder, checkpoint loading, layer-wise lr decay
(``models.layer_decay``), dense-task backbones.

The torchvision guard must run before anything imports timm or torchvision.
"""
from . import _torchvision_guard

_torchvision_guard.install()

from .convnextv2 import MODEL_CONFIGS, check_model_name, create_dense_model, stem_geometry, total_stride  # noqa: E402
from .masks import mask_from_visible_cells, visible_cells_from_mask  # noqa: E402
from .sparse_encoder import BACKENDS, SparseConvNeXtV2  # noqa: E402
from .checkpoint import (convert_to_timm, encoder_export_state, fit_stem, load_pretrained,  # noqa: E402
                         read_checkpoint)
from .backbone import FeaturePyramidBackbone, backbone_param_groups, create_backbone  # noqa: E402

__all__ = [
    "MODEL_CONFIGS",
    "BACKENDS",
    "SparseConvNeXtV2",
    "check_model_name",
    "create_dense_model",
    "stem_geometry",
    "total_stride",
    "mask_from_visible_cells",
    "visible_cells_from_mask",
    "convert_to_timm",
    "encoder_export_state",
    "fit_stem",
    "load_pretrained",
    "read_checkpoint",
    "create_backbone",
    "backbone_param_groups",
    "FeaturePyramidBackbone",
]
