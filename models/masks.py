"""The FCMAE mask as the encoder takes it: each image's visible cells, an (N, K) index tensor.

A cell is one position of the final-stage grid (``total_stride`` x ``total_stride`` input
pixels), numbered row-major: an H x W image has L = (H / total_stride) * (W / total_stride).
Every image keeps the same number K of cells visible, so a batch's mask is a regular (N, K)
int64 tensor of cell indices, each row ascending. K is a shape, not a value: code that runs on
it (the encoder backends, a compiled training step) never waits for the device to learn it.

* ``visible_cells_from_mask(mask)``: a (N, L) 0/1 mask, checked once (one host-device sync),
  as visible cells; the way in for a mask made elsewhere.
* ``mask_from_visible_cells(visible_cells, num_cells)``: the (N, L) float mask, 1 = hidden,
  that the decoder and the loss use; no sync.

``fcmae.random_visible_cells`` draws a random one (valid by construction, nothing to check).
"""
from __future__ import annotations

import torch


def visible_cells_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) mask, 1 = hidden, 0 = visible -> (N, K) each image's visible cells, ascending.

    Checks the mask (values 0 or 1, the same hidden count in every image, at least one cell
    visible) with one host-device sync; raises ValueError naming what is wrong.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (N, L), 1 = hidden, got shape {tuple(mask.shape)}")
    mask = mask.float()
    binary = (mask == 0) | (mask == 1)
    hidden_counts = mask.sum(dim=1)
    well_formed = binary.all() & (hidden_counts == hidden_counts[0]).all()
    kept = int(torch.where(well_formed, mask.shape[1] - hidden_counts[0], -1).item())  # the one read
    if kept < 0:
        if not binary.all():
            raise ValueError("mask values must be 0 (visible) or 1 (hidden)")
        raise ValueError("every image must hide the same number of cells (fcmae.random_visible_cells draws such masks)")
    if kept < 1:
        raise ValueError("mask hides every cell; keep at least one visible (mask_ratio < 1)")
    return torch.argsort(mask, dim=1, stable=True)[:, :kept]  # visible (0) first, in cell order


def mask_from_visible_cells(visible_cells: torch.Tensor, num_cells: int) -> torch.Tensor:
    """(N, K) visible cells -> (N, L = num_cells) float mask on their device, 1 = hidden."""
    mask = torch.ones(visible_cells.shape[0], num_cells, device=visible_cells.device)
    return mask.scatter_(1, visible_cells, 0.0)


def check_visible_cells(visible_cells: torch.Tensor, batch_size: int, num_cells: int) -> None:
    """Raise ValueError unless ``visible_cells`` is an integer (N, K) tensor with N = ``batch_size``
    and 1 <= K <= ``num_cells``. Reads shapes only, never the device."""
    if visible_cells.ndim != 2 or visible_cells.shape[0] != batch_size or visible_cells.is_floating_point():
        raise ValueError(
            f"visible_cells must be an integer (N, K) tensor of visible cell indices with N = {batch_size}, got "
            f"{visible_cells.dtype} of shape {tuple(visible_cells.shape)}; turn a (N, L) 0/1 mask into one with "
            "models.visible_cells_from_mask(mask)")
    if not 1 <= visible_cells.shape[1] <= num_cells:
        raise ValueError(f"visible_cells keeps {visible_cells.shape[1]} cells per image; it must keep between 1 and "
                         f"the {num_cells} cells of the grid")
