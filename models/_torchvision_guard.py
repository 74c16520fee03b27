"""Make ``import torchvision`` (and hence ``import timm``) work on CPU-only torch.

The torchvision 0.28.0 wheel on PyPI is a CUDA build. With the CPU build of torch its
compiled extension ``torchvision/_C.so`` fails to load, and torchvision's
``_meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` without checking, which raises
``RuntimeError: operator torchvision::nms does not exist`` at import time.

``install()`` defines only those two missing operator *schemas*, and only when the
extension cannot be loaded. Where torchvision works it does nothing. No kernels are
defined: calling ``torchvision.ops.nms`` still fails (we never use it); the schemas
only let the import finish. Must run before the first ``import torchvision``/``timm``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

# Schemas as torchvision's C++ extension declares them (torchvision/csrc/ops/nms.cpp).
_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library.Library alive (dropping it removes the schemas)


def torchvision_extension_loads() -> bool:
    """True when torchvision's compiled ``_C`` extension loads (or torchvision is absent)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    package_dir = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(package_dir) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return True
    try:
        torch.ops.load_library(os.path.join(package_dir, candidates[0]))
    except OSError:
        return False
    return True


def install() -> bool:
    """Define the missing torchvision op schemas if needed. Returns True if it did."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    if torchvision_extension_loads():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _MISSING_SCHEMAS.items():
        if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not _op_exists(name):
            _library.define(schema)
    return True


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True
