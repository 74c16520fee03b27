"""Training memory per ConvNeXt V2 size: parameters, gradients, AdamW state, activations.

(placeholder; filled in below)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def saved_activation_bytes(step: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``step()`` (a loss), each
    storage counted once, ``parameters`` left out: the activation memory alive when the
    backward pass starts. Deterministic, device-independent. Under activation checkpointing
    it counts what the checkpoints keep (their blocks' inputs), not what they recompute."""
    excluded = {param.untyped_storage().data_ptr() for param in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())
