"""What differs between the torch releases this project supports, and the check that the
installed releases are supported.

* ``MINIMUM_VERSIONS``, ``require_supported_versions(prog)``: the oldest torch, torchvision and
  timm the test suite passes with; an older (or missing) one stops a CLI before any work with
  one line naming the installed versions, the needed ones and the install command (exit code 2).
* ``TF32``, ``get_tf32()``, ``set_tf32(matmul, conv)``: whether FP32 CUDA matmuls (cuBLAS) and
  cuDNN convolutions may run in TF32. torch has two sets of switches for this: the
  ``fp32_precision`` settings (torch 2.9 and later) and the ``allow_tf32`` flags they replace.
  A torch with both refuses to *read* an ``allow_tf32`` flag once the other set changed it
  ("mix of the legacy and new APIs"), while the ``fp32_precision`` value stays readable
  whichever set (or ``torch.set_float32_matmul_precision``) changed it, and is the value its
  cuBLAS and cuDNN calls consult. So both functions use ``fp32_precision`` where torch has it
  and the ``allow_tf32`` flags only where it does not; ``get_tf32`` never raises.
* ``total_norm(tensors)``: ``torch.nn.utils.get_total_norm`` where torch has it (2.6 and later),
  else the same L2 norm of all the tensors' entries computed by hand.
"""
from __future__ import annotations

import importlib.metadata
import re
import sys
from typing import Iterable, NamedTuple, Optional

import torch

# The oldest releases the quick tests (`python -m pytest -m "not slow"`) pass with (README,
# "Which torch these commands install"); each older one fails them.
MINIMUM_VERSIONS = {"torch": "2.4", "torchvision": "0.19", "timm": "1.0.31"}
INSTALL_COMMANDS = {
    "torch": "pip install torch==2.13.0 torchvision==0.28.0",  # the pinned pair of README, "Quick start"
    "torchvision": "pip install torch==2.13.0 torchvision==0.28.0",
    "timm": 'pip install "timm>=1.0.31,<2"',
}


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# Read once, at import; torchvision and timm from their package metadata (importing them here
# would come before the torchvision guard in ``models``).
INSTALLED_VERSIONS: dict[str, Optional[str]] = {
    "torch": str(torch.__version__),
    "torchvision": _distribution_version("torchvision"),
    "timm": _distribution_version("timm"),
}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.13.0+cpu"`` -> (2, 13, 0), ``"2.6.0a0+git1"``
    -> (2, 6, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def unsupported_versions() -> dict[str, Optional[str]]:
    """The packages of ``MINIMUM_VERSIONS`` that are missing (None) or older than their minimum,
    with the version installed."""
    return {name: installed for name, installed in INSTALLED_VERSIONS.items()
            if installed is None or release(installed) < release(MINIMUM_VERSIONS[name])}


def version_problem() -> Optional[str]:
    """One sentence naming the unsupported packages, the versions needed and the install command;
    None when every package is supported."""
    unsupported = unsupported_versions()
    if not unsupported:
        return None
    needed = ", ".join(f"{name} >= {MINIMUM_VERSIONS[name]}" for name in unsupported)
    installed = ", ".join(f"{name} {version or 'not installed'}" for name, version in unsupported.items())
    commands = " and ".join(f"`{command}`" for command in dict.fromkeys(INSTALL_COMMANDS[name] for name in unsupported))
    return f"this project needs {needed} (installed: {installed}); run {commands}"


def require_supported_versions(prog: str) -> None:
    """Exit with code 2 and one line on stderr when a package is unsupported; nothing otherwise."""
    problem = version_problem()
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------- TF32

FP32_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


class TF32(NamedTuple):
    """Whether FP32 CUDA matmuls (``matmul``) and cuDNN convolutions (``conv``) may use TF32."""

    matmul: bool
    conv: bool


def get_tf32() -> TF32:
    """What FP32 matmuls and convolutions run at now, whichever torch switch set it."""
    if FP32_PRECISION_API:
        return TF32(torch.backends.cuda.matmul.fp32_precision == "tf32",
                    torch.backends.cudnn.conv.fp32_precision == "tf32")
    return TF32(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def set_tf32(matmul: bool, conv: bool) -> None:
    """Allow (True) or forbid TF32 in FP32 CUDA matmuls and in cuDNN convolutions."""
    if FP32_PRECISION_API:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if conv else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


# --------------------------------------------------------------------------------------- norms

HAS_GET_TOTAL_NORM = hasattr(torch.nn.utils, "get_total_norm")


def total_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all entries of ``tensors`` together, as a 0-d tensor on their device (0 for
    none): what ``torch.nn.utils.clip_grad_norm_`` measures, without clipping."""
    tensors = list(tensors)
    if HAS_GET_TOTAL_NORM:
        return torch.nn.utils.get_total_norm(tensors)
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(tensor) for tensor in tensors]))
