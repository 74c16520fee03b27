"""Shared fixtures: tiny models, deterministic inputs."""
import os
import socket
import sys

# One torch thread per process, here and in the subprocesses tests start: on a 2-core machine,
# several processes with 2 threads each stall in OpenMP barriers (seen: 30x slower steps).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import models  # noqa: E402,F401  (installs the torchvision guard before any test imports timm)
from engine.compat import get_tf32, set_tf32  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _stop_leftover_processes():
    """Processes a failed test left behind (e.g. a job it was waiting for) are stopped with its module."""
    from reliability.faults import stop_started_processes

    yield
    stop_started_processes()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def restore_tf32():
    """Put the TF32 switches back as they were, through the API the product sets them with."""
    saved = get_tf32()
    yield
    set_tf32(*saved)


def randomize_grn(module: torch.nn.Module, std: float = 0.5) -> None:
    """GRN gamma/beta start at zero, which would hide GRN bugs; give them values."""
    generator = torch.Generator().manual_seed(123)
    for name, param in module.named_parameters():
        if ".grn." in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the parity measure of the backend tests."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def output_and_gradients(encoder, backend: str, images: torch.Tensor, visible_cells: torch.Tensor):
    """Run ``encoder`` with ``backend``: its output and the parameter gradients of a fixed
    random projection of that output."""
    encoder.backend = backend
    encoder.zero_grad()
    out = encoder(images, visible_cells)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * projection).sum().backward()
    return out.detach(), {name: param.grad.clone() for name, param in encoder.named_parameters()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a test's gloo process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
