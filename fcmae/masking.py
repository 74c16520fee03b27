"""Random masking on the final-stage grid (FCMAE, paper section 3.1).

A mask is each image's visible cells, an (N, K) int64 tensor (``models.masks``); the (N, L)
0/1 form is ``models.mask_from_visible_cells``.
"""
from __future__ import annotations

from typing import Optional

import torch


def keep_count(num_cells: int, mask_ratio: float) -> int:
    """Cells each image keeps visible: ``int(L * (1 - mask_ratio))``, at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_cells * (1.0 - mask_ratio)))


def random_visible_cells(
    batch_size: int,
    num_cells: int,
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """One uniformly random mask per image, made without reading anything back from a device.

    Returns (N, K) int64 on ``device``: each image's ``K = keep_count(L, mask_ratio)`` visible
    cells, ascending; valid by construction, so nothing needs checking.
    The noise is drawn on ``generator``'s device (a CUDA generator gives CUDA noise, no copy);
    without a generator, on ``device`` from its default generator (traceable by torch.compile).
    A seed gives the same masks for the same generator device. Cells drawn on the CPU for a CUDA
    ``device`` are copied from pinned memory without blocking the host.
    """
    kept = keep_count(num_cells, mask_ratio)
    device = torch.device(device) if device is not None else None
    noise_device = generator.device if generator is not None else (device or torch.device("cpu"))
    noise = torch.rand(batch_size, num_cells, generator=generator, device=noise_device)
    cells = torch.argsort(noise, dim=1)[:, :kept].sort(dim=1).values
    if device is None or device == cells.device:
        return cells
    if cells.device.type == "cpu" and device.type == "cuda":
        # pinned: the copy is queued on the stream and the host moves on
        return cells.pin_memory().to(device, non_blocking=True)
    return cells.to(device)
