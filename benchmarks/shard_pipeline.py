"""Input pipeline speed from WebDataset shards against the image folder they were written from.

The same ImageNet-sized JPEGs (``benchmarks.input_pipeline.write_jpegs``) and the same transform
(pretraining's: decode, RandomResizedCrop, flip, normalisation) through ``engine.data``'s training
loader, read three ways: the image folder, local shards of them (``engine.shard_writer``; read at
random by offset) and the same shards streamed through ``pipe:cat`` (read in order, one stream per
worker). Timed interleaved over repeats (median), as images per wall-clock second and per
CPU-second of the processes doing the work (the training process and its loader workers; the
``cat`` processes are not counted), with each path's ratio to the folder.

    python -m benchmarks.shard_pipeline                     # 256 JPEGs, 1 worker, 3 x 5 s per path
    python -m benchmarks.shard_pipeline --workers 2 --output benchmarks/results/shard_pipeline_cpu.md
    python -m benchmarks.shard_pipeline --smoke             # seconds; used by the tests
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import models  # noqa: E402,F401  (first: installs the torchvision guard before timm is imported)
from benchmarks.input_pipeline import JPEG_QUALITY, PipelinePath, save_report, write_jpegs  # noqa: E402
from benchmarks.pretrain_speed import cpu_model_name  # noqa: E402
from engine.data import ImageFiles, pretrain_transform  # noqa: E402
from engine.image_files import scan_folder  # noqa: E402
from engine.shard_writer import data_path_of, write_shards  # noqa: E402
from engine.shards import ShardIndexCache  # noqa: E402

SOURCES = ("image folder", "local shards", "pipe:cat shards")
SMOKE = dict(images=8, image_sizes=[96, 72, 128, 96], input_size=64, batch_size=2, shard_size=3, seconds=0.3,
             repeats=1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="JPEG files to write (default: %(default)s)")
    parser.add_argument("--image-sizes", type=int, nargs=4, default=[500, 375, 1000, 800],
                        metavar=("MIN_W", "MIN_H", "MAX_W", "MAX_H"),
                        help="JPEG width and height drawn uniformly in these ranges (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=224, help="crop size in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="loader batch size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per timed repeat (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats per source, interleaved; the median is reported (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the report (markdown) and .json beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny images at 64 px, fractions of a second")
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke values become the defaults; explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


def datasets(folder: Path, args: argparse.Namespace) -> list[ImageFiles]:
    """The JPEGs under ``folder/photos`` as a folder, as local shards and as pipe: shards (same order)."""
    transform = pretrain_transform(args.input_size)
    images = ImageFiles(scan_folder(folder / "photos").index, transform)
    pattern = data_path_of(write_shards(images.index, folder, args.shard_size))
    return [images, *(ImageFiles(ShardIndexCache().load_or_build(source), transform)
                      for source in (pattern, f"pipe:cat {pattern}"))]


def time_sources(folder: Path, args: argparse.Namespace) -> list[dict]:
    pipelines = [PipelinePath(dataset, args.batch_size, args.workers, args.seed) for dataset in datasets(folder, args)]
    speeds: list[list[tuple[float, float]]] = [[] for _ in SOURCES]
    try:
        for repeat in range(args.repeats):
            for offset in range(len(SOURCES)):
                index = (repeat + offset) % len(SOURCES)
                speeds[index].append(pipelines[index].images_per_s(args.seconds))
    finally:
        for pipeline in pipelines:
            pipeline.close()
    rows = [{"source": source, "images_per_s": statistics.median(wall for wall, _ in speeds[index]),
             "images_per_cpu_s": statistics.median(cpu for _, cpu in speeds[index]), "repeats": speeds[index]}
            for index, source in enumerate(SOURCES)]
    for row in rows:
        row["wall_vs_folder"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["cpu_vs_folder"] = row["images_per_cpu_s"] / rows[0]["images_per_cpu_s"]
    return rows


def format_report(info: dict, jpegs: dict, args: argparse.Namespace, rows: list[dict]) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores, load average {info['load_average']} at start; "
        f"torch {info['torch']}",
        f"Command: `{info['command']}`",
        f"JPEGs: {jpegs['images']} files, {args.image_sizes[0]}-{args.image_sizes[2]} x "
        f"{args.image_sizes[1]}-{args.image_sizes[3]} px, quality {JPEG_QUALITY}; shards of {args.shard_size}; "
        f"crops of {args.input_size} px, batches of {args.batch_size}, {args.workers} loader workers; median of "
        f"{args.repeats} interleaved repeats of {args.seconds:g} s",
        "",
        "| source | images/s (wall clock) | vs folder | images per CPU-second | vs folder |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {row['source']} | {row['images_per_s']:.1f} | {row['wall_vs_folder']:.2f}x | "
              f"{row['images_per_cpu_s']:.1f} | {row['cpu_vs_folder']:.2f}x |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    info = {"cpu": cpu_model_name(), "cpu_cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "command": "python -m benchmarks.shard_pipeline " + shlex.join(argv)}
    with tempfile.TemporaryDirectory() as folder:
        jpegs = write_jpegs(Path(folder), args.images, args.image_sizes, args.seed)
        print(f"wrote {jpegs['images']} JPEGs; timing the folder and its shards", file=sys.stderr, flush=True)
        rows = time_sources(Path(folder), args)
    report = format_report(info, jpegs, args, rows)
    print(report)
    results = {"machine": info, "jpegs": jpegs, "sources": rows}
    save_report(args.output, report, results)
    return results


if __name__ == "__main__":
    main()
