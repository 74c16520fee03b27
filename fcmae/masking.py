"""Random masking on the final-stage grid (FCMAE, paper section 3.1)."""
from __future__ import annotations

from typing import Optional

import torch


def keep_count(num_cells: int, mask_ratio: float) -> int:
    """Cells each image keeps visible: ``int(L * (1 - mask_ratio))``, at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_cells * (1.0 - mask_ratio)))


def random_masking(
    batch_size: int,
    num_cells: int,
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """One uniformly random mask per image.

    Returns (N, L) float, 1 = hidden; every row hides exactly ``L - keep_count(L, ratio)``.
    The noise is drawn on ``generator``'s device (CPU by default) so a seed gives the same
    masks on every device.
    """
    kept = keep_count(num_cells, mask_ratio)
    noise = torch.rand(batch_size, num_cells, generator=generator)
    kept_ids = torch.argsort(noise, dim=1)[:, :kept]
    mask = torch.ones(batch_size, num_cells)
    mask.scatter_(1, kept_ids, 0.0)
    return mask.to(device) if device is not None else mask
