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
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """One uniformly random mask per image, made without reading anything back from a device.

    Returns (N, L) float on ``device``, 1 = hidden; every row hides exactly
    ``L - keep_count(L, mask_ratio)`` cells, so the result needs no checking.
    The noise is drawn on ``generator``'s device (a CUDA generator gives CUDA noise, no copy);
    without a generator, on ``device`` from its default generator. A seed gives the same masks
    for the same generator device. A mask drawn on the CPU for a CUDA ``device`` is copied
    from pinned memory without blocking the host.
    """
    kept = keep_count(num_cells, mask_ratio)
    device = torch.device(device) if device is not None else None
    noise_device = generator.device if generator is not None else (device or torch.device("cpu"))
    noise = torch.rand(batch_size, num_cells, generator=generator, device=noise_device)
    kept_ids = torch.argsort(noise, dim=1)[:, :kept]
    mask = torch.ones(batch_size, num_cells, device=noise_device)
    mask.scatter_(1, kept_ids, 0.0)
    if device is None or device == mask.device:
        return mask
    if mask.device.type == "cpu" and device.type == "cuda":
        # pinned: the copy is queued on the stream and the host moves on
        return mask.pin_memory().to(device, non_blocking=True)
    return mask.to(device)
