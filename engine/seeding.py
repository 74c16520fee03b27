"""Reproducible randomness that does not depend on how a run was interrupted and resumed.

* ``derive_seed(seed, *indices)``: a 63-bit seed for e.g. (seed, epoch, rank) or
  (seed, epoch, iteration, rank); the same indices always give the same seed.
* ``seed_everything(seed)``: python ``random``, numpy and torch (CPU and every CUDA device).
  The training scripts call it at the start of every epoch with ``derive_seed(seed, epoch, rank)``,
  so augmentations and DataLoader worker seeds depend only on the epoch.
* ``generator(seed)``: a CPU ``torch.Generator`` (e.g. one per iteration for the FCMAE mask).
* ``capture_rng_state()`` / ``restore_rng_state(state)``: every global RNG as tensors, ints and
  floats, which ``torch.load(..., weights_only=True)`` accepts (no numpy arrays).
* ``configure_determinism(device)``: deterministic algorithms on CPU, cuDNN autotuning on CUDA.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

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


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states in weights_only-loadable types."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; CUDA states are restored when this machine has as many devices."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def configure_determinism(device: torch.device) -> None:
    """CPU: deterministic algorithms (free there), so equal seeds give equal weights.
    GPU: cuDNN autotuning for speed; bitwise reproducibility is not promised there."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
