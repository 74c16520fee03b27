"""Input pipeline speed per DataLoader worker, beside the pretraining step's speed per model size.

The pipeline is pretraining's: JPEG decode, RandomResizedCrop (scale 0.2-1, bicubic), flip,
ToTensor and normalisation, through ``engine.data``'s image folder and training loader, on
ImageNet-sized JPEGs written to a temporary folder (scikit-image's bundled photographs resized
to 500-1000 x 375-800 px with mild noise, quality 90). It is timed in the training process
(``num_workers=0``) and in one worker process (``num_workers=1``), each with full decoding
and with ``--fast_decode`` (JPEG draft decoding at a reduced scale, ``DraftRandomResizedCrop``),
interleaved over repeats (median reported), as images per wall-clock second and per CPU-second
of the processes doing the work (what a worker with a core to itself achieves, however busy
the machine). The step is the sparse FCMAE training step at the same input size, timed by
``benchmarks.pretrain_speed``'s machinery (or read from its JSON results with ``--step-results``).
Workers per GPU needed = step images/s / one worker's images per CPU-second.

    python -m benchmarks.input_pipeline                       # atto, tiny, base; step on CUDA if present
    python -m benchmarks.input_pipeline --step-results benchmarks/results/pretrain_speed_cpu.json
    python -m benchmarks.input_pipeline --smoke               # seconds; used by the tests
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

import models  # noqa: E402,F401  (first: installs the torchvision guard before timm is imported)
from benchmarks.pretrain_speed import (machine_info, parse_with_smoke_defaults, resolve_backends_and_device,  # noqa: E402
                                       time_cases)
from engine.data import (TRAIN_PREFETCH_FACTOR, build_image_folder, build_loader, embedded_photos,  # noqa: E402
                         pretrain_transform)
from engine.image_decode import load_rgb_image  # noqa: E402

MASK_RATIO = 0.6  # the FCMAE recipe's
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
JPEG_QUALITY = 90
NOISE_STD = 3.0  # grey levels: resized photos are smoother than camera images, which decode slower
PATHS = (  # (name, num_workers, fast_decode)
    ("training process (num_workers 0)", 0, False),
    ("training process (num_workers 0)", 0, True),
    ("1 worker process", 1, False),
    ("1 worker process", 1, True),
)
SMOKE = dict(images=4, image_sizes=[96, 72, 128, 96], input_size=64, batch_size=2, seconds=0.3, repeats=1,
             models=["atto"], step_batch=2, steps=1, warmup=0)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64,
                        help="JPEG files to write and cycle over (default: %(default)s)")
    parser.add_argument("--image-sizes", type=int, nargs=4, default=[500, 375, 1000, 800],
                        metavar=("MIN_W", "MIN_H", "MAX_W", "MAX_H"),
                        help="JPEG width and height drawn uniformly in these ranges (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=224, help="crop size in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="loader batch size (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="seconds per timed repeat of one pipeline path (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats per path, interleaved; the median is reported (default: %(default)s)")
    parser.add_argument("--models", nargs="*", default=["atto", "tiny", "base"],
                        help="step table sizes; none: the pipeline table only (default: %(default)s)")
    parser.add_argument("--step-results", type=Path, nargs="*", default=[],
                        help="benchmarks.pretrain_speed JSON files to read sparse steps from (same input size, "
                             f"mask ratio {MASK_RATIO}); models not found there are timed")
    parser.add_argument("--step-batch", type=int, default=8, help="batch of the timed steps (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--device", default=None, help="step device: cpu | cuda (default: cuda when available)")
    parser.add_argument("--amp", choices=["none", "bf16"], default=None,
                        help="step autocast (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training process and of the step (default: %(default)s; "
                             "DataLoader workers always use 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the report (markdown) and .json beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny images, atto at 64 px, fractions of a second")
    args = parse_with_smoke_defaults(parser, argv, SMOKE)
    min_width, min_height, max_width, max_height = args.image_sizes
    if not 0 < min_width <= max_width or not 0 < min_height <= max_height:
        parser.error(f"--image-sizes: need 0 < MIN_W <= MAX_W and 0 < MIN_H <= MAX_H, got {args.image_sizes}")
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1 or args.seconds <= 0:
        parser.error("--images, --batch-size, --repeats must be >= 1 and --seconds > 0")
    args.backends = ["sparse"]
    resolve_backends_and_device(parser, args)
    return args


def write_jpegs(folder: Path, count: int, sizes: list[int], seed: int) -> dict:
    """``count`` JPEGs under ``folder/photos/``: random crops of the embedded photos resized to a
    random size in ``sizes`` (min w, min h, max w, max h), plus Gaussian noise; returns their stats."""
    rng = np.random.default_rng(seed)
    photos = embedded_photos()
    (folder / "photos").mkdir(parents=True)
    pixels = file_bytes = 0
    for index in range(count):
        width, height = int(rng.integers(sizes[0], sizes[2] + 1)), int(rng.integers(sizes[1], sizes[3] + 1))
        photo = photos[index % len(photos)]
        crop_width, crop_height = (min(photo.width, round(photo.height * width / height)),
                                   min(photo.height, round(photo.width * height / width)))
        left = int(rng.integers(0, photo.width - crop_width + 1))
        top = int(rng.integers(0, photo.height - crop_height + 1))
        resized = photo.resize((width, height), Image.Resampling.BICUBIC,
                               box=(left, top, left + crop_width, top + crop_height))
        noisy = np.asarray(resized, dtype=np.float32) + rng.normal(0.0, NOISE_STD, (height, width, 3))
        path = folder / "photos" / f"{index:04d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)).save(path, quality=JPEG_QUALITY)
        pixels += width * height
        file_bytes += path.stat().st_size
    return {"images": count, "mean_pixels": pixels / count, "bytes_per_pixel": file_bytes / pixels}


class PipelinePath:
    """The training loader of one path (a dataset, workers); ``images_per_s(seconds)`` times it.

    Workers are persistent: they start (and the first batch is waited for) before the first timing.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int):
        self.batch_size = batch_size
        self.loader = build_loader(dataset, batch_size, num_workers, seed)
        self.epoch = 0
        self.batches = self._batches()
        next(self.batches)
        self.queued = num_workers * TRAIN_PREFETCH_FACTOR  # batches made while another path was timed

    def _batches(self):
        while True:
            self.loader.sampler.set_epoch(self.epoch)
            yield from self.loader
            self.epoch += 1

    def images_per_s(self, seconds: float) -> tuple[float, float]:
        """(images per wall-clock second, images per CPU-second of this process and its workers)."""
        for _ in range(self.queued):
            next(self.batches)
        count, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - start < seconds:
            count += next(self.batches)[0].shape[0]
        return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu_start)

    def close(self) -> None:
        self.batches.close()
        self.loader = None  # ends the persistent workers


def cpu_seconds() -> float:
    """CPU time used so far by this process and its live child processes (Linux; else this process).

    Images per CPU-second is what one worker on a core of its own achieves, however busy the
    machine: the other paths' persistent workers sit idle (their queues full) while one path is timed.
    """
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return total


def decode_images_per_s(paths: list[Path], seconds: float) -> tuple[float, float]:
    """Full-size JPEG decoding alone, in this process: per wall-clock second, per CPU-second."""
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        load_rgb_image(paths[count % len(paths)])
        count += 1
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def time_pipeline(root: Path, args: argparse.Namespace) -> list[dict]:
    """Median images/s of every path in ``PATHS`` and of decoding alone, timed round-robin."""
    pipelines = [PipelinePath(build_image_folder(root, "train", pretrain_transform(args.input_size, fast)),
                              args.batch_size, workers, args.seed) for _, workers, fast in PATHS]
    paths = sorted((root / "photos").glob("*.jpg"))
    speeds: list[list[tuple[float, float]]] = [[] for _ in range(len(PATHS) + 1)]
    try:
        for repeat in range(args.repeats):
            for offset in range(len(speeds)):
                index = (repeat + offset) % len(speeds)
                speeds[index].append(pipelines[index].images_per_s(args.seconds) if index < len(pipelines)
                                     else decode_images_per_s(paths, args.seconds))
    finally:
        for pipeline in pipelines:
            pipeline.close()
    names = [(name, workers, "draft (--fast_decode)" if fast else "full") for name, workers, fast in PATHS]
    names.append(("JPEG decode alone (training process)", 0, "full"))
    rows = [{"path": name, "num_workers": workers, "decode": decode,
             "images_per_s": statistics.median(wall for wall, _ in speeds[index]),
             "images_per_cpu_s": statistics.median(cpu for _, cpu in speeds[index]), "repeats": speeds[index]}
            for index, (name, workers, decode) in enumerate(names)]
    full = {row["num_workers"]: row["images_per_cpu_s"] for row in rows[:len(PATHS)] if row["decode"] == "full"}
    for row in rows[:len(PATHS)]:
        row["vs_full_decode"] = row["images_per_cpu_s"] / full[row["num_workers"]]
    return rows


def read_step_results(files: list[Path], input_size: int) -> dict[str, dict]:
    """Sparse-backend steps at ``input_size`` and ``MASK_RATIO`` from pretrain_speed JSON files, by model."""
    found = {}
    for file in files:
        content = json.loads(file.read_text())
        for result in content["results"]:
            if (result["mode"] == "sparse" and result["input_size"] == input_size
                    and result["mask_ratio"] == MASK_RATIO and result["model"] not in found):
                found[result["model"]] = {**result, "source": str(file), "step_device": content["machine"]["device"]}
    return found


def step_speeds(args: argparse.Namespace) -> list[dict]:
    """One sparse FCMAE step result per model: read from ``--step-results`` or timed now."""
    found = read_step_results(args.step_results, args.input_size)
    cases = [dict(mode="sparse", model=model, input_size=args.input_size, batch_size=args.step_batch,
                  mask_ratio=MASK_RATIO, device=args.device, amp=args.amp, threads=args.threads, steps=args.steps,
                  warmup=args.warmup) for model in args.models if model not in found]
    if cases:
        print(f"timing the sparse step of {', '.join(case['model'] for case in cases)} on {args.device}",
              file=sys.stderr, flush=True)
    timed = {result["model"]: {**result, "source": "timed now", "step_device": args.device}
             for result in (time_cases(cases, args.repeats) if cases else [])}
    return [found.get(model) or timed[model] for model in args.models]


def format_report(info: dict, jpegs: dict, args: argparse.Namespace, pipeline: list[dict], steps: list[dict]) -> str:
    per_worker = {row["decode"]: row["images_per_cpu_s"] for row in pipeline if row["num_workers"] == 1}
    lines = [
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores, load average {info['load_average']} at start; "
        f"torch {info['torch']}, {info['torch_threads']} threads in the training process, 1 per worker",
        f"Command: `{info['command']}`",
        f"JPEGs: {jpegs['images']} files, {args.image_sizes[0]}-{args.image_sizes[2]} x "
        f"{args.image_sizes[1]}-{args.image_sizes[3]} px (mean {jpegs['mean_pixels'] / 1e3:.0f} kpixels), "
        f"quality {JPEG_QUALITY}, {jpegs['bytes_per_pixel']:.2f} bytes/pixel; crops of {args.input_size} px, "
        f"batches of {args.batch_size}; median of {args.repeats} interleaved repeats of {args.seconds:g} s",
        "",
        "| input pipeline | decode | images/s (wall clock) | images per CPU-second | CPU ms/image "
        "| vs full decode (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for row in pipeline:
        ratio = f"{row['vs_full_decode']:.2f}x" if "vs_full_decode" in row else "-"
        lines.append(f"| {row['path']} | {row['decode']} | {row['images_per_s']:.1f} | {row['images_per_cpu_s']:.1f} | "
                     f"{1000 / row['images_per_cpu_s']:.1f} | {ratio} |")
    if not steps:
        return "\n".join(lines)
    lines += [
        "",
        "| model | step device | amp | batch | step images/s | step source | workers needed, full decode "
        "| workers needed, --fast_decode |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for step in steps:
        speed = step["images_per_s"]
        lines.append(
            f"| {step['model'].removeprefix('convnextv2_')} | {step['step_device']} | {step.get('amp', '-')} | "
            f"{step['batch_size']} | {speed:.2f} | {step['source']} | {speed / per_worker['full']:.2f} | "
            f"{speed / per_worker['draft (--fast_decode)']:.2f} |")
    lines += [
        "",
        f"Workers needed = step images/s / one worker's images per CPU-second: the DataLoader workers per GPU (per "
        f"training process), each on a core of its own, that keep the step fed at this input size; round up and "
        f"leave a margin. The step is the sparse FCMAE step (mask ratio {MASK_RATIO}; forward, backward, AdamW).",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args, argv, "benchmarks.input_pipeline")
    with tempfile.TemporaryDirectory() as folder:
        jpegs = write_jpegs(Path(folder), args.images, args.image_sizes, args.seed)
        print(f"wrote {jpegs['images']} JPEGs; timing the input pipeline", file=sys.stderr, flush=True)
        pipeline = time_pipeline(Path(folder), args)
    steps = step_speeds(args) if args.models else []
    report = format_report(info, jpegs, args, pipeline, steps)
    print(report)
    results = {"machine": info, "jpegs": jpegs, "pipeline": pipeline, "steps": steps}
    save_report(args.output, report, results)
    return results


def save_report(output: Optional[Path], report: str, results: dict) -> None:
    """Write ``report`` (markdown) to ``output`` and ``results`` as JSON beside it (None: nothing)."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report + "\n")
        output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
