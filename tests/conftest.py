"""Shared fixtures: tiny models, deterministic inputs."""
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import models  # noqa: E402,F401  (installs the torchvision guard before any test imports timm)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def randomize_grn(module: torch.nn.Module, std: float = 0.5) -> None:
    """GRN gamma/beta start at zero, which would hide GRN bugs; give them values."""
    generator = torch.Generator().manual_seed(123)
    for name, param in module.named_parameters():
        if ".grn." in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
