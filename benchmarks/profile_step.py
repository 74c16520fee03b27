"""Where does the time of one FCMAE training step go? A torch.profiler breakdown per backend.

For each mode (an FCMAE encoder backend, or ``dense``: timm's ConvNeXt V2 with cross-entropy)
this profiles ``--steps`` training steps of ``benchmarks.pretrain_speed.TrainingStep`` after a
warm-up and prints two markdown tables:

* phases: encoder forward, the rest of the forward (FCMAE: decoder and loss; dense: head and
  loss), backward, optimizer step, as milliseconds per step and share of the step;
* operators: the ``--top`` aten operators by self time (CPU, or CUDA kernel time on a GPU),
  milliseconds per step and share of the step.

    python -m benchmarks.profile_step                           # atto, 224 px, batch 32, mask 0.6, 1 thread
    python -m benchmarks.profile_step --model tiny --backends sparse
    python -m benchmarks.profile_step --smoke                   # seconds; used by the tests
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.pretrain_speed import MODES, TrainingStep, machine_info, resolve_backends_and_device  # noqa: E402
from engine.config import DefaultsOnceHelpFormatter  # noqa: E402
from models import check_model_name  # noqa: E402
from fcmae.model import PAPER_PATCH_SIZE as PATCH_SIZE  # noqa: E402

PHASES = ("encoder forward", "rest of forward", "backward", "optimizer step")
SMOKE = dict(model="atto", input_size=64, batch_size=2, steps=1, warmup=0, top=5)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsOnceHelpFormatter)
    parser.add_argument("--model", default="atto", help="size (atto, tiny, ...) or convnextv2_<size> name")
    parser.add_argument("--input-size", type=int, default=224, help="a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--backends", nargs="+", choices=MODES, default=["sparse", "masked"])
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="unprofiled steps per mode first")
    parser.add_argument("--top", type=int, default=12, help="operators listed per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--amp", choices=["none", "bf16"], default=None,
                        help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this markdown file")
    parser.add_argument("--smoke", action="store_true", help="atto, 64 px, batch 2, one step (explicit flags win)")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    try:
        args.model = check_model_name(args.model if args.model.startswith("convnextv2_") else f"convnextv2_{args.model}")
    except ValueError as error:
        parser.error(f"--model: {error}")
    if args.input_size < PATCH_SIZE or args.input_size % PATCH_SIZE:
        parser.error(f"--input-size must be a positive multiple of {PATCH_SIZE}, got {args.input_size}")
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must lie in [0, 1), got {args.mask_ratio}")
    if min(args.batch_size, args.steps, args.top, args.threads) < 1 or args.warmup < 0:
        parser.error("--batch-size, --steps, --top and --threads must be >= 1, --warmup >= 0")
    resolve_backends_and_device(parser, args)
    return args


def mark_encoder_forward(step: TrainingStep) -> None:
    """Wrap the encoder's forward (dense: timm's ``forward_features``) in an "encoder forward" range."""
    owner, name = (step.model, "forward_features") if step.mode == "dense" else (step.model.encoder, "forward")
    forward = getattr(owner, name)

    def marked_forward(*args, **kwargs):
        with record_function("encoder forward"):
            return forward(*args, **kwargs)
    setattr(owner, name, marked_forward)  # an instance attribute: nn.Module.__call__ and timm's forward use it


def profiled_step(step: TrainingStep) -> None:
    """One training step with its phases marked ("encoder forward" comes from mark_encoder_forward)."""
    with record_function("forward"), step.autocast():
        loss = step.loss(step.images, step.labels)
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer step"):
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)


def profile_mode(mode: str, args: argparse.Namespace) -> dict:
    """Per-step milliseconds of each phase and of the top operators, for one mode."""
    step = TrainingStep(mode, args.model, args.input_size, args.batch_size,
                        None if mode == "dense" else args.mask_ratio, args.device, args.amp)
    mark_encoder_forward(step)
    for _ in range(args.warmup):
        profiled_step(step)
    cuda = step.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            profiled_step(step)
        if cuda:
            torch.cuda.synchronize(step.device)
    events = profiler.key_averages()
    ranges = {event.key: event.cpu_time_total / 1e3 / args.steps for event in events
              if event.key in ("forward", "encoder forward", "backward", "optimizer step")}
    phases = {"encoder forward": ranges.get("encoder forward", 0.0),
              "rest of forward": ranges.get("forward", 0.0) - ranges.get("encoder forward", 0.0),
              "backward": ranges.get("backward", 0.0),
              "optimizer step": ranges.get("optimizer step", 0.0)}

    def self_time(event) -> float:
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3 / args.steps

    operators = sorted((event for event in events if event.key.startswith("aten::")), key=self_time, reverse=True)
    operator_total = sum(self_time(event) for event in operators)
    return {"mode": mode, "phases_ms": phases, "step_ms": sum(phases.values()),
            "operators_ms": {event.key: self_time(event) for event in operators[:args.top]},
            "operator_total_ms": operator_total, "time_kind": "CUDA kernel" if cuda else "CPU"}


def format_report(info: dict, args: argparse.Namespace, results: list[dict]) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cpu_cores']} cores, load average {info['load_average']}; "
             f"torch {info['torch']}, {args.threads} threads; device {info['device']}; amp {info['amp']}",
             f"Command: `{info['command']}`",
             f"Case: {args.model.removeprefix('convnextv2_')}, {args.input_size} px, batch {args.batch_size}, "
             f"mask ratio {args.mask_ratio:g} (FCMAE modes); {args.steps} profiled steps after {args.warmup} warm-up",
             "",
             "| mode | " + " | ".join(PHASES) + " | step |",
             "|---|" + "---|" * (len(PHASES) + 1)]
    for result in results:
        step = result["step_ms"]
        cells = [f"{result['phases_ms'][phase]:.1f} ms ({100 * result['phases_ms'][phase] / step:.0f}%)"
                 for phase in PHASES]
        lines.append(f"| {result['mode']} | " + " | ".join(cells) + f" | {step:.1f} ms |")
    for result in results:
        total = result["operator_total_ms"]
        lines += ["", f"{result['mode']}: top operators by self {result['time_kind']} time "
                      f"(all aten operators: {total:.1f} ms per step)", "",
                  "| operator | ms per step | share of operator time |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.1f} | {100 * ms / total:.1f}% |" for name, ms in result["operators_ms"].items()]
    lines += ["", "Phases are profiler ranges around each part of the step (wall time of the host thread on "
                  "CPU); the encoder range wraps the encoder's forward. Operator self time excludes time spent in "
                  "the operators it calls."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info(args, argv, "benchmarks.profile_step")
    results = [profile_mode(mode, args) for mode in args.backends]
    report = format_report(info, args, results)
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
    return results


if __name__ == "__main__":
    main()
