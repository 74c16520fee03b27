"""Speed of one FCMAE pretraining step per encoder backend, next to a dense supervised step.

For each model size, batch size and mask ratio this times a whole training step (forward,
backward, AdamW step) of FCMAE with each encoder backend (``sparse``, ``masked``, and
``minkowski`` when MinkowskiEngine imports) and of timm's dense ConvNeXt V2 trained with
cross-entropy on random labels (``dense``), and prints a markdown table: images/s, its ratio
to ``masked``, peak memory, FLOPs counted by ``torch.utils.flop_counter``, and the share of
the FLOP-ideal speed-up over ``masked`` that each mode achieves.

Every mode runs in its own fresh process, so its peak memory is its own: peak RSS on CPU
(VmHWM, reset just before the timed steps), ``torch.cuda.max_memory_allocated`` on CUDA.
The modes of one comparison are timed round-robin, one repeat each in turn, and the median
repeat is reported, so a noisy machine slows every mode alike and the ratios stay meaningful.
On a CPU shared with other work (load above the core count), OpenMP's default busy-waiting
stalls every parallel op, the small ones of ``sparse`` most: time with ``--threads 1`` or
with ``OMP_WAIT_POLICY=PASSIVE`` set in the environment.

    python -m benchmarks.pretrain_speed                  # atto and tiny, 224 px, batch 32
    python -m benchmarks.pretrain_speed --models tiny --mask-ratios 0.6 --output docs/speed.md
    python -m benchmarks.pretrain_speed --smoke          # under a minute; used by the tests
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402  (first: installs the torchvision guard before timm is imported)
from engine.flops import flop_counter  # noqa: E402
from engine.optim import build_adamw  # noqa: E402
from fcmae import build_fcmae  # noqa: E402
from models import check_model_name, create_dense_model  # noqa: E402
from fcmae.model import PAPER_PATCH_SIZE as PATCH_SIZE  # noqa: E402

MODES = ("sparse", "masked", "minkowski", "dense")  # FCMAE encoder backends, then the dense reference
BASELINE = "masked"  # ratios are taken against the dense-cost FCMAE backend
NUM_CLASSES = 1000  # dense supervised step: ImageNet-1k head
FLOP_COUNT_BATCH = 2  # FLOPs per image do not depend on the batch; count on a small one
SMOKE = dict(models=["atto"], input_size=64, batch_sizes=[2], mask_ratios=[0.6], steps=1, warmup=0, repeats=1)


def minkowski_available() -> bool:
    return (importlib.util.find_spec("MinkowskiEngine") is not None
            and importlib.util.find_spec("models.backends.minkowski") is not None)


def parse_with_smoke_defaults(parser: argparse.ArgumentParser, argv: Optional[list[str]],
                              smoke: dict) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke`` the ``smoke`` values become the defaults (explicit flags
    still win). ``--models`` sizes (``atto``) become full names (``convnextv2_atto``)."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    try:
        args.models = [check_model_name(name if name.startswith("convnextv2_") else f"convnextv2_{name}")
                       for name in args.models]
    except ValueError as error:
        parser.error(f"--models: {error}")
    return args


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["atto", "tiny"],
                        help="sizes (atto, tiny, ...) or convnextv2_<size> names (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=224,
                        help="square input side, a multiple of 32 (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32], help="(default: %(default)s)")
    parser.add_argument("--mask-ratios", type=float, nargs="+", default=[0.4, 0.6, 0.75],
                        help="(default: %(default)s)")
    parser.add_argument("--backends", nargs="+", choices=MODES, default=None,
                        help="modes to time (default: all; minkowski only when MinkowskiEngine imports)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed repeat (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps per mode before its first repeat (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per mode; the median is reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per mode (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--amp", choices=["none", "bf16"], default=None,
                        help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the table to this markdown file and the raw results beside it as .json")
    parser.add_argument("--smoke", action="store_true",
                        help="atto, 64 px, batch 2, mask 0.6, one step, one repeat (explicit flags still win)")
    args = parse_with_smoke_defaults(parser, argv, SMOKE)
    if args.input_size < PATCH_SIZE or args.input_size % PATCH_SIZE:
        parser.error(f"--input-size must be a positive multiple of {PATCH_SIZE}, got {args.input_size}")
    if not all(0.0 <= ratio < 1.0 for ratio in args.mask_ratios):
        parser.error(f"--mask-ratios must lie in [0, 1), got {args.mask_ratios}")
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-sizes, --steps and --repeats must be >= 1, --warmup >= 0")
    if args.backends is None:
        args.backends = [mode for mode in MODES if mode != "minkowski" or minkowski_available()]
    resolve_backends_and_device(parser, args)
    return args


def resolve_backends_and_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check ``args.backends`` can run; fill in ``args.device`` (cuda when available) and ``args.amp``
    (bf16 on CUDA, none on CPU) where not given. Shared with benchmarks.profile_step."""
    if "minkowski" in args.backends and not minkowski_available():
        parser.error("--backends minkowski: MinkowskiEngine is not importable; build it with "
                     "`bash scripts/install_minkowski.sh` or leave minkowski out")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")


class TrainingStep:
    """One mode's model, optimizer (pretrain.py's AdamW) and fixed random batch; calling it runs one step.

    ``mode``: an FCMAE encoder backend (the FCMAE loss, a fresh mask each step as in
    pretraining) or ``"dense"`` (timm ConvNeXt V2, cross-entropy on random labels).
    """

    def __init__(self, mode: str, model_name: str, input_size: int, batch_size: int,
                 mask_ratio: Optional[float], device: str, amp: str):
        self.mode, self.mask_ratio, self.amp = mode, mask_ratio, amp
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, input_size, input_size, generator=generator).to(self.device)
        self.labels = torch.randint(NUM_CLASSES, (batch_size,), generator=generator).to(self.device)
        if mode == "dense":
            self.model = create_dense_model(model_name, num_classes=NUM_CLASSES)
        else:
            self.model = build_fcmae(model_name, backend=mode, mask_ratio=mask_ratio)
        self.model.to(self.device).train()
        self.optimizer = build_adamw(self.model, lr=1.5e-4, weight_decay=0.05)  # pretrain.py's optimizer

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16")

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return F.cross_entropy(self.model(images), labels)
        return self.model(images)[0]

    def encoder_forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return self.model.forward_features(images)
        return self.model.encoder(images, self.model.random_visible_cells(images))

    def __call__(self) -> None:
        with self.autocast():
            loss = self.loss(self.images, self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def counted_flops(self) -> dict[str, float]:
        """FLOPs per image of the encoder forward and of the step's forward + backward."""
        count = min(FLOP_COUNT_BATCH, self.images.shape[0])
        images, labels = self.images[:count], self.labels[:count]
        encoder_counter, step_counter = flop_counter(), flop_counter()
        with encoder_counter, torch.no_grad(), self.autocast():
            self.encoder_forward(images)
        with step_counter:
            with self.autocast():
                loss = self.loss(images, labels)
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        return {"encoder_flops": encoder_counter.get_total_flops() / count,
                "step_flops": step_counter.get_total_flops() / count}

    def timed_repeat(self, steps: int) -> dict[str, Optional[float]]:
        """Images/s over ``steps`` steps and the peak memory they reached."""
        reset_peak_memory(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        return {"images_per_s": steps * self.images.shape[0] / seconds, "peak_memory_mib": peak_memory_mib(self.device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # Linux: resets this process's peak RSS (VmHWM) to its current RSS


def peak_memory_mib(device: torch.device) -> Optional[float]:
    """Peak allocated CUDA memory, or this process's peak RSS on CPU (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def run_worker(case: dict, connection) -> None:
    """Process body for one mode: build, count FLOPs, warm up, then one timed repeat per request."""
    try:
        if not connection.recv():  # the go-ahead (see time_cases)
            return
        if case["threads"]:
            torch.set_num_threads(case["threads"])
        step = TrainingStep(case["mode"], case["model"], case["input_size"], case["batch_size"],
                            case["mask_ratio"], case["device"], case["amp"])
        flops = step.counted_flops()
        for _ in range(case["warmup"]):
            step()
        connection.send(flops)
        while connection.recv():
            connection.send(step.timed_repeat(case["steps"]))
    except Exception:  # reported by the parent, which names the case
        connection.send({"error": traceback.format_exc()})


class Worker:
    """One case's process (``run_worker``); ``ask`` sends it a request and returns its reply."""

    def __init__(self, context, case: dict):
        self.case = case
        self.connection, child_connection = context.Pipe()
        self.process = context.Process(target=run_worker, args=(case, child_connection), daemon=True)
        self.process.start()
        child_connection.close()  # ours closed, a dead worker reads as EOF instead of a hang

    def ask(self, request: bool = True) -> dict:
        try:
            self.connection.send(request)
            reply = self.connection.recv()
        except (EOFError, BrokenPipeError):
            self.process.join(timeout=10)
            raise RuntimeError(f"{self.describe()}: worker died with exit code {self.process.exitcode} "
                               "(out of memory? try a smaller --batch-sizes)") from None
        if "error" in reply:
            raise RuntimeError(f"{self.describe()} failed:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(False)
            except BrokenPipeError:
                pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()

    def describe(self) -> str:
        case = self.case
        return (f"{case['model']} {case['input_size']}px batch {case['batch_size']} "
                f"mask {case['mask_ratio']} {case['mode']}")


def worker_context():
    """Processes forked from a server that has imported torch, timm and our packages once
    ("forkserver"): each starts in a moment with a fresh allocator and none of the parent's
    CUDA state. Where there is no forkserver (Windows), spawned processes import everything."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["models", "fcmae", "engine.optim"])
    return context


def time_cases(cases: list[dict], repeats: int) -> list[dict]:
    """Time the cases of one comparison round-robin, each in its own fresh process.

    Returns one result per case: its FLOPs, every repeat's images/s, their median and the
    largest peak memory.
    """
    context = worker_context()
    workers, results = [], []
    try:
        for case in cases:  # their start-ups overlap
            workers.append(Worker(context, case))
        for worker in workers:  # build, count FLOPs and warm up one at a time: warm-ups do not compete
            results.append({**worker.case, **worker.ask(), "repeats": []})
        for repeat in range(repeats):
            for offset in range(len(workers)):  # rotate the order so no mode always runs first
                index = (repeat + offset) % len(workers)
                results[index]["repeats"].append(workers[index].ask())
    finally:
        for worker in workers:
            worker.close()
    for result in results:
        speeds = [repeat["images_per_s"] for repeat in result["repeats"]]
        memories = [repeat["peak_memory_mib"] for repeat in result["repeats"] if repeat["peak_memory_mib"] is not None]
        result["images_per_s"] = statistics.median(speeds)
        result["peak_memory_mib"] = max(memories) if memories else None
    return results


def add_ratios(results: list[dict]) -> None:
    """Speed ratio to ``masked``, FLOP-ideal speed-up over it, and the achieved share of that ideal."""
    baseline = next((result for result in results if result["mode"] == BASELINE), None)
    for result in results:
        if baseline is None:
            result.update(vs_masked=None, ideal_speedup=None, share_of_ideal=None)
            continue
        result["vs_masked"] = result["images_per_s"] / baseline["images_per_s"]
        result["ideal_speedup"] = baseline["step_flops"] / result["step_flops"]
        result["share_of_ideal"] = result["vs_masked"] / result["ideal_speedup"]


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args: argparse.Namespace, argv: list[str], script: str = "benchmarks.pretrain_speed") -> dict:
    """The machine, torch and settings a table was measured with; ``script``: the module run with ``argv``."""
    device = torch.device(args.device)
    return {
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": args.amp,
        "command": f"python -m {script} " + shlex.join(argv),
    }


COLUMNS = (  # header, result key, format
    ("model", "model", lambda name: name.removeprefix("convnextv2_")),
    ("input", "input_size", str),
    ("batch", "batch_size", str),
    ("mask ratio", "mask_ratio", lambda ratio: "-" if ratio is None else f"{ratio:g}"),
    ("mode", "mode", str),
    ("images/s", "images_per_s", lambda value: f"{value:.2f}"),
    ("vs masked", "vs_masked", lambda value: f"{value:.2f}x"),
    ("peak memory (MiB)", "peak_memory_mib", lambda value: f"{value:.0f}"),
    ("encoder GFLOPs/img", "encoder_flops", lambda value: f"{value / 1e9:.4g}"),
    ("step GFLOPs/img", "step_flops", lambda value: f"{value / 1e9:.4g}"),
    ("ideal speed-up", "ideal_speedup", lambda value: f"{value:.2f}x"),
    ("share of ideal", "share_of_ideal", lambda value: f"{100 * value:.0f}%"),
)


def format_report(info: dict, results: list[dict]) -> str:
    """Machine info, the markdown table and what its columns mean."""
    memory = "peak allocated CUDA memory" if info["device"] != "cpu" else "peak RSS of the mode's own process"
    lines = [
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores, load average {info['load_average']} at start; "
        f"torch {info['torch']}, {info['torch_threads']} threads, OMP_WAIT_POLICY {info['omp_wait_policy']}; "
        f"device {info['device']}; amp {info['amp']}",
        f"Command: `{info['command']}`",
        "",
        "| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for result in results:
        cells = ["-" if result[key] is None and key != "mask_ratio" else fmt(result[key]) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "One training step = forward, backward and AdamW step; images/s is the median over repeats timed "
        "round-robin. dense = timm ConvNeXt V2 with a 1000-class head and cross-entropy (no masking), timed "
        f"alongside each comparison. Peak memory: {memory}. FLOPs are counted by torch.utils.flop_counter "
        "(matmuls and convolutions, grouped-conv backward corrected), so arithmetic outside those ops is not "
        "counted (minkowski's depthwise sums); step FLOPs = forward + backward of the whole model (FCMAE: "
        "encoder, decoder, loss). Ideal speed-up = masked step FLOPs / this mode's; "
        "share of ideal = (vs masked) / ideal.",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = machine_info(args, argv)
    results = []
    for model_name in args.models:
        for batch_size in args.batch_sizes:
            for mask_ratio in args.mask_ratios:
                cases = [dict(mode=mode, model=model_name, input_size=args.input_size, batch_size=batch_size,
                              mask_ratio=None if mode == "dense" else mask_ratio, device=args.device, amp=args.amp,
                              threads=args.threads, steps=args.steps, warmup=args.warmup)
                         for mode in args.backends]
                print(f"timing {model_name} {args.input_size}px batch {batch_size} mask {mask_ratio}: "
                      f"{', '.join(args.backends)}", file=sys.stderr, flush=True)
                group = time_cases(cases, args.repeats)
                add_ratios(group)
                results += group
    report = format_report(info, results)
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
        args.output.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
