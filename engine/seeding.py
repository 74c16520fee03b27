"""Reproducible randomness that does not depend on how a run was interrupted and resumed.

* ``derive_seed(seed, *indices)``: a 63-bit seed for e.g. (seed, epoch, rank) or
  (seed, epoch, iteration, rank); the same indices always give the same seed.
* ``seed_everything(seed)``: python ``random``, numpy and torch (CPU and every CUDA device).
  The training loop calls it before every micro-batch with ``derive_seed(seed, epoch, iteration,
  rank)`` (and the runner before each epoch's loader with ``derive_seed(seed, epoch, rank)``), so
  what a micro-batch draws depends only on where it is: a run resumed at any update boundary needs
  no saved RNG state, and every rank's streams are its own.
* ``generator(seed, device)``: a ``torch.Generator`` on ``device``, for draws that must not touch
  the global RNGs (e.g. a fixed subset of the data).
* ``configure_determinism(device)``: deterministic algorithms on CPU, cuDNN autotuning on CUDA.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *indices: int) -> int:
    """Deterministic seed in [0, 2**63) from ``seed`` and integer ``indices``."""
    text = ",".join(str(int(value)) for value in (seed, *indices))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def configure_determinism(device: torch.device) -> None:
    """CPU: deterministic algorithms (free there), so equal seeds give equal weights.
    GPU: cuDNN autotuning for speed; bitwise reproducibility is not promised there."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
