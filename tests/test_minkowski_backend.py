"""The MinkowskiEngine backend: same numbers as the masked reference, clear error when absent."""
import os
import subprocess
import sys

import pytest
import torch

from fcmae import random_visible_cells
from models import SparseConvNeXtV2, mask_from_visible_cells
from models.backends.minkowski import import_minkowski
from tests.conftest import REPO_ROOT, output_and_gradients, randomize_grn, relative_error

try:
    import_minkowski()
    MINKOWSKI_MISSING = False
except ImportError:
    MINKOWSKI_MISSING = True

needs_minkowski = pytest.mark.skipif(
    MINKOWSKI_MISSING, reason="MinkowskiEngine is not installed (bash scripts/install_minkowski.sh)"
)


@needs_minkowski
@pytest.mark.parametrize(
    "model_name, size, mask_ratio",
    [
        ("convnextv2_atto", (64, 64), 0.6),  # atto: 1x1-conv MLP in timm
        ("convnextv2_atto", (64, 96), 0.6),
        ("convnextv2_atto", (64, 64), 0.0),
        ("convnextv2_tiny", (64, 64), 0.5),  # tiny: nn.Linear MLP
    ],
)
def test_minkowski_and_masked_backends_agree_on_outputs_and_gradients(model_name, size, mask_ratio):
    encoder = SparseConvNeXtV2(model_name)
    randomize_grn(encoder)
    images = torch.randn(2, 3, *size)
    cells = (size[0] // 32) * (size[1] // 32)
    visible = random_visible_cells(2, cells, mask_ratio, generator=torch.Generator().manual_seed(3))
    masked_out, masked_grads = output_and_gradients(encoder, "masked", images, visible)
    minkowski_out, minkowski_grads = output_and_gradients(encoder, "minkowski", images, visible)
    err = relative_error(minkowski_out, masked_out)
    assert err < 1e-5, f"minkowski output differs from masked by {err:.2e}"
    for name, grad in masked_grads.items():
        assert grad.abs().max() > 0, f"{name} got no gradient from the masked backend; the test is vacuous"
        err = relative_error(minkowski_grads[name], grad)
        assert err < 1e-5, f"gradient of {name} differs by {err:.2e} between minkowski and masked"


@needs_minkowski
def test_minkowski_hidden_cells_are_exactly_zero():
    encoder = SparseConvNeXtV2("convnextv2_atto", backend="minkowski")
    randomize_grn(encoder)
    visible = random_visible_cells(2, 6, 0.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 64, 96), visible)
    hidden = mask_from_visible_cells(visible, 6).reshape(2, 1, 2, 3).bool().expand_as(out)
    assert torch.count_nonzero(out[hidden]) == 0
    assert torch.count_nonzero(out[~hidden]) == out[~hidden].numel()


def test_missing_minkowski_engine_error_names_install_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    encoder = SparseConvNeXtV2("convnextv2_atto", backend="minkowski")
    with pytest.raises(ImportError, match=r"bash scripts/install_minkowski\.sh.*MinkowskiEngine backend"):
        encoder(torch.randn(1, 3, 64, 64), torch.arange(4)[None])


OPENMP_THREADS_AFTER_MINKOWSKI = """
import ctypes, sys, torch
import models
from engine.distributed import init_distributed
from fcmae import random_visible_cells
init_distributed("cpu", cpu_threads=int(sys.argv[1]))
encoder = models.SparseConvNeXtV2("convnextv2_atto", backend="minkowski")
with torch.no_grad():
    encoder(torch.randn(2, 3, 64, 64), random_visible_cells(2, 4, 0.5, generator=torch.Generator().manual_seed(0)))
openmp = ctypes.CDLL(next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line))
print(openmp.omp_get_max_threads())
"""


@needs_minkowski
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: every thread bound is 1 anyway")
def test_cpu_threads_bound_minkowski_openmp_threads():
    """MinkowskiEngine sets the OpenMP thread count it shares with torch (all CPUs by default);
    with --cpu_threads 1 it must run, and leave torch, on one thread."""
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", OPENMP_THREADS_AFTER_MINKOWSKI, "1"], cwd=REPO_ROOT,
                         env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1", f"OpenMP runs {run.stdout.split()[-1]} threads after a minkowski forward"
