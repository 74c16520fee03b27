"""How long a huge checkpoint takes to save, and the disk bandwidth a stop needs.

    python -m benchmarks.checkpoint_save --model convnextv2_huge --output-dir /path/on/the/cluster/fs

Builds the state a fine-tuning checkpoint of ``--model`` holds (fp32 weights, AdamW's two moments,
the EMA copy; ``--no-ema`` for pretraining) in host memory, writes it with the same
``engine.checkpoint.save_checkpoint`` the runs use (a temporary file, fsync, rename), reads it back
and prints the size, the time and the bandwidth, and the bandwidth that would fit the save into
``--budget-s`` seconds (torchrun gives workers 30 s between SIGTERM and SIGKILL). Needs about
the checkpoint's size in free memory, and as much free disk.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from models import create_dense_model  # noqa: E402

GB = 1e9


def huge_state(model_name: str, ema: bool) -> dict:
    """A checkpoint dict shaped like a real one: weights, AdamW state (step, exp_avg, exp_avg_sq), EMA."""
    weights = create_dense_model(model_name, num_classes=1000).state_dict()
    optimizer_state = {index: {"step": torch.tensor(1000.0), "exp_avg": torch.randn_like(tensor),
                               "exp_avg_sq": torch.rand_like(tensor)}
                       for index, tensor in enumerate(weights.values()) if tensor.is_floating_point()}
    optimizer = {"state": optimizer_state, "param_groups": [{"params": list(optimizer_state)}]}
    state = {"model": weights, "optimizer": optimizer, "epoch": 1, "iteration": 0}
    if ema:
        state["model_ema"] = {name: tensor.clone() for name, tensor in weights.items()}
    return state


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnextv2_huge")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="a pretraining checkpoint (no EMA copy)")
    parser.add_argument("--output-dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="seconds a save may take")
    args = parser.parse_args(argv)
    state = huge_state(args.model, args.ema)
    size = state_bytes(state)
    with tempfile.TemporaryDirectory(dir=args.output_dir) as folder:
        start = time.perf_counter()
        path = save_checkpoint(state, folder, epoch=1, keep_last=1)
        save_s = time.perf_counter() - start
        written = path.stat().st_size
        del state  # room for reading it back
        start = time.perf_counter()
        load_checkpoint(path)
        load_s = time.perf_counter() - start
    result = {"model": args.model, "ema": args.ema, "tensor_gb": size / GB, "file_gb": written / GB,
              "save_s": save_s, "save_gb_per_s": written / GB / save_s, "load_s": load_s,
              "needed_gb_per_s": written / GB / args.budget_s}
    print(f"| model | EMA | file (GB) | save (s) | save (GB/s) | load (s) | needed for {args.budget_s:.0f} s (GB/s) |\n"
          "|---|---|---|---|---|---|---|\n"
          f"| {args.model} | {'yes' if args.ema else 'no'} | {result['file_gb']:.2f} | {save_s:.1f} | "
          f"{result['save_gb_per_s']:.2f} | {load_s:.1f} | {result['needed_gb_per_s']:.2f} |")
    return result


if __name__ == "__main__":
    main()
