"""Training memory per ConvNeXt V2 size: weights, gradients, AdamW state, activations.

For FCMAE pretraining (sparse encoder backend, 224 px, mask ratio 0.6) and for fine-tuning
(timm's dense model, 1000 classes, 224 px, with the EMA copy the recipe keeps), per size:

* parameters and the per-parameter state of training: fp32 weights, fp32 gradients and
  AdamW's two moments (16 bytes per parameter; fine-tuning adds the fp32 EMA: 20);
* activations: the bytes autograd keeps for the backward pass (``saved_activation_bytes``),
  in fp32 and under bf16 autocast, with and without activation checkpointing, fitted as
  ``fixed + per_image * batch`` from batches 1 and 2 (exactly linear: every saved tensor
  has the batch dimension, except autocast's bf16 copies of the weights);
* the total at the official batch per GPU (pretraining 64 = 4096 / (8 GPUs x update_freq 8),
  fine-tuning 32 = 1024 / (8 x 4)) and the largest batch per GPU that fits an 80 GB GPU.

The activations are computed by running the real forward pass on fake tensors
(``FakeTensorMode``: shapes, dtypes and autocast, no data), so the big sizes cost seconds and
no memory. For the small sizes the same forward also runs on real CPU tensors, and the
``verify`` table compares the two (measured vs computed). Not counted: transient tensors
of the backward pass (about the largest few activations), the CUDA context and allocator
slack (the 80 GB budget keeps 10% for them), and DDP's gradient buckets (4 bytes per
parameter more, unless ``gradient_as_bucket_view``).

    python -m benchmarks.memory_table                      # all sizes, ~2 minutes on 1 CPU
    python -m benchmarks.memory_table --output docs/memory_table.md
    python -m benchmarks.memory_table --models atto tiny --verify-models atto
    python -m benchmarks.memory_table --models atto --verify-models --time-checkpointing
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import models  # noqa: E402  (first: installs the torchvision guard before timm is imported)
from fcmae import build_fcmae  # noqa: E402
from finetune.model import build_finetune_model  # noqa: E402

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
INPUT_SIZE = 224
MASK_RATIO = 0.6
NUM_CLASSES = 1000
RECIPE_BATCH = {"pretrain": 64, "finetune": 32}  # per GPU in the official 8-GPU commands
STATE_BYTES_PER_PARAM = {"pretrain": 16, "finetune": 20}  # weights + grads + AdamW (+ EMA), fp32
GPU_BYTES = 80 * 10**9
USABLE_SHARE = 0.9  # CUDA context, allocator slack, backward transients
GIB, MIB = 2**30, 2**20


def saved_activation_bytes(step: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``step()`` (a loss), each
    storage counted once, ``parameters`` left out: the activation memory alive when the
    backward pass starts. Deterministic, device-independent, works on fake tensors. Under
    activation checkpointing it counts what the checkpoints keep (their blocks' inputs),
    not what they recompute."""
    # a storage's identity is its C++ object (``_cdata``), which fake and meta tensors have too
    excluded = {param.untyped_storage()._cdata for param in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def build_model(task: str, model_name: str, grad_checkpointing: bool, backend: str = "sparse") -> torch.nn.Module:
    if task == "pretrain":
        return build_fcmae(model_name, backend, MASK_RATIO, grad_checkpointing=grad_checkpointing)
    return build_finetune_model(model_name, NUM_CLASSES, grad_checkpointing=grad_checkpointing)


def training_loss(task: str, model: torch.nn.Module, batch: int) -> torch.Tensor:
    images = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE)
    if task == "pretrain":
        return model(images)[0]
    return F.cross_entropy(model(images), torch.zeros(batch, dtype=torch.long))


def activation_bytes(task: str, model_name: str, batch: int, bf16: bool, checkpointing: bool, fake: bool,
                     backend: str = "sparse") -> int:
    """Saved activation bytes of one training forward; ``fake``: computed on fake tensors."""
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = build_model(task, model_name, checkpointing, backend)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        if fake:
            model.to_empty(device="cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return saved_activation_bytes(lambda: training_loss(task, model, batch), model.parameters())


def activation_fit(task: str, model_name: str, bf16: bool, checkpointing: bool, backend: str) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of the saved activations, computed from batches 1 and 2."""
    one, two = (activation_bytes(task, model_name, batch, bf16, checkpointing, True, backend) for batch in (1, 2))
    return one - (two - one), two - one


def parameter_count(task: str, model_name: str) -> int:
    with torch.device("meta"):
        return sum(param.numel() for param in build_model(task, model_name, False).parameters())


def size_row(task: str, size: str, backend: str) -> dict:
    model_name = f"convnextv2_{size}"
    params = parameter_count(task, model_name)
    state = params * STATE_BYTES_PER_PARAM[task]
    fits = {(bf16, ckpt): activation_fit(task, model_name, bf16, ckpt, backend)
            for bf16 in (False, True) for ckpt in (False, True)}
    batch = RECIPE_BATCH[task]
    budget = GPU_BYTES * USABLE_SHARE
    total = {key: state + fixed + per_image * batch for key, (fixed, per_image) in fits.items()}
    max_batch = {key: max(0, int((budget - state - fixed) // per_image)) for key, (fixed, per_image) in fits.items()}
    return dict(size=size, params=params, state=state, fits=fits, total=total, max_batch=max_batch,
                needs_checkpointing=total[(True, False)] > budget)


def state_cell(task: str, params: int) -> str:
    """fp32 weights / gradients / AdamW moments (/ EMA) in GiB."""
    parts = [4, 4, 8] + ([4] if task == "finetune" else [])
    return " / ".join(f"{params * bytes_per_param / GIB:.2f}" for bytes_per_param in parts)


def markdown_table(task: str, rows: list[dict]) -> str:
    batch = RECIPE_BATCH[task]
    extra = " / EMA" if task == "finetune" else ""
    header = [
        "model", "params (M)", f"weights / grads / AdamW{extra} (GiB)",
        "act/img fp32 (MiB)", "act/img bf16 (MiB)", "act/img bf16 + ckpt (MiB)",
        f"total @{batch} bf16 (GiB)", f"total @{batch} bf16 + ckpt (GiB)",
        "max batch/GPU bf16", "max batch/GPU bf16 + ckpt", f"checkpointing needed at {batch}/GPU",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        per_image = {key: fit[1] for key, fit in row["fits"].items()}
        cells = [
            row["size"], f"{row['params'] / 1e6:.1f}", state_cell(task, row["params"]),
            f"{per_image[(False, False)] / MIB:.1f}", f"{per_image[(True, False)] / MIB:.1f}",
            f"{per_image[(True, True)] / MIB:.1f}",
            f"{row['total'][(True, False)] / GIB:.1f}", f"{row['total'][(True, True)] / GIB:.1f}",
            str(row["max_batch"][(True, False)]), str(row["max_batch"][(True, True)]),
            "yes" if row["needs_checkpointing"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verify_table(sizes: list[str], batch: int = 2) -> str:
    """Saved activation bytes at ``batch`` measured on real CPU tensors vs computed on fake ones."""
    lines = ["| task | model | precision | checkpointing | measured (MiB) | computed (MiB) | difference |",
             "|---|---|---|---|---|---|---|"]
    for task in RECIPE_BATCH:
        for size in sizes:
            for bf16 in (False, True):
                for ckpt in (False, True):
                    real = activation_bytes(task, f"convnextv2_{size}", batch, bf16, ckpt, fake=False)
                    fake = activation_bytes(task, f"convnextv2_{size}", batch, bf16, ckpt, fake=True)
                    lines.append(f"| {task} | {size} | {'bf16' if bf16 else 'fp32'} | {'yes' if ckpt else 'no'} "
                                 f"| {real / MIB:.2f} | {fake / MIB:.2f} | {(real - fake) / real:+.2%} |")
    return "\n".join(lines)


def checkpointing_overhead(model_name: str = "convnextv2_atto", batch: int = 16, repeats: int = 3) -> str:
    """Median CPU time of one forward + backward with and without checkpointing, interleaved."""
    inputs = {task: build_model(task, model_name, False) for task in RECIPE_BATCH}
    seconds = {(task, ckpt): [] for task in RECIPE_BATCH for ckpt in (False, True)}
    for repeat in range(repeats + 1):  # the first round warms up
        for task, ckpt in seconds:
            model = inputs[task]
            model.set_grad_checkpointing(ckpt)
            start = time.perf_counter()
            training_loss(task, model, batch).backward()
            model.zero_grad(set_to_none=True)
            if repeat:
                seconds[(task, ckpt)].append(time.perf_counter() - start)
    lines = []
    for task in RECIPE_BATCH:
        plain, checkpointed = (statistics.median(seconds[(task, ckpt)]) for ckpt in (False, True))
        lines.append(f"- {task}, {model_name}, batch {batch}, {torch.get_num_threads()} thread(s): forward + backward "
                     f"{plain:.2f} s, with checkpointing {checkpointed:.2f} s ({checkpointed / plain - 1:+.0%})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--verify-models", nargs="*", default=["atto", "femto", "pico", "nano", "tiny"],
                        choices=SIZES, help="sizes also measured on real CPU tensors (batch 2)")
    parser.add_argument("--backend", default="sparse", choices=["sparse", "masked"],
                        help="FCMAE encoder backend for the pretraining table (default: %(default)s)")
    parser.add_argument("--time-checkpointing", action="store_true",
                        help="also time forward + backward of atto on the CPU with and without checkpointing")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.time()
    sections = []
    for task in RECIPE_BATCH:
        rows = [size_row(task, size, args.backend) for size in args.models]
        title = f"FCMAE pretraining ({args.backend} backend, mask 0.6)" if task == "pretrain" else "Fine-tuning (dense, EMA)"
        sections.append(f"### {title}, {INPUT_SIZE} px\n\n{markdown_table(task, rows)}")
    if args.verify_models:
        sections.append(f"### Measured on CPU vs computed on fake tensors (batch 2)\n\n{verify_table(args.verify_models)}")
    if args.time_checkpointing:
        sections.append(f"### Checkpointing overhead (CPU)\n\n{checkpointing_overhead()}")
    command = "python -m benchmarks.memory_table " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n\n".join(sections) + (f"\n\n`{command.strip()}`: torch {torch.__version__}, "
                                    f"{time.time() - started:.0f} s\n")
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
