"""Dataset index at scale: start-up time and DataLoader workers' private memory, old vs new.

For each size, a file list of ImageNet-like relative paths (``n01440764/n01440764_10026.JPEG``,
1,000 images per class folder; the files need not exist) is written, then each kind of dataset is
built from it:

* ``list of tuples``: torchvision ImageFolder's layout, ``samples = [(path, class_index), ...]``;
* ``ImageFiles``: ``engine.data.ImageFiles`` over ``engine.image_files.read_file_list`` (paths
  in numpy arrays, ``engine.image_index``);
* ``ImageFiles, saved index``: the same, its index reused from an ``image_index.npz`` (what a
  resumed run does: ``engine.index_cache``).

Each (a process of its own, forked from this one, which holds no dataset) reports its start-up time (building the dataset) and its resident memory, then
forks ``--workers`` processes (as DataLoader workers are forked) that each look up every index
the way ``__getitem__`` does before decoding (path and label) and report their unique memory
(USS: private clean + private dirty pages of ``/proc/<pid>/smaps_rollup``) before and after.

With ``--tree-files N``, it also scans a synthetic tree of N empty ``.JPEG`` files (1,000 per
folder) with torchvision ImageFolder and with ``engine.image_files.scan_folder``, and times the
check that a saved index is still current (``engine.index_cache.first_change``), warm page cache.

    python -m benchmarks.dataset_index                     # 1.28M and 14M entries, a 100k-file tree
    python -m benchmarks.dataset_index --smoke             # seconds; used by the tests
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402,F401  (first: installs the torchvision guard before torchvision is imported)
from engine.data import ImageFiles  # noqa: E402
from engine.image_files import read_file_list, scan_folder  # noqa: E402
from engine.index_cache import first_change, load_scan, save_scan  # noqa: E402

IMAGES_PER_CLASS = 1000
KINDS = ("list of tuples", "ImageFiles", "ImageFiles, saved index")
SMOKE = dict(sizes=[20_000], workers=2, tree_files=2_000)
MIB = 2 ** 20


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_281_167, 14_197_122],
                        help="entries of each file list (default: ImageNet-1k train and ImageNet-21k)")
    parser.add_argument("--workers", type=int, default=2, help="forked workers per dataset (default: %(default)s)")
    parser.add_argument("--tree-files", type=int, default=100_000,
                        help="empty files of the synthetic tree to scan; 0: no scan (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (markdown) and .json")
    parser.add_argument("--smoke", action="store_true", help=f"small sizes: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.workers < 1 or args.tree_files < 0:
        parser.error("--sizes and --workers must be >= 1, --tree-files >= 0")
    return args


def imagenet_like_path(position: int) -> str:
    """``n<8 digits>/n<8 digits>_<5 digits>.JPEG``: the shape and length of ImageNet's paths."""
    class_id = 1_440_764 + position // IMAGES_PER_CLASS
    return f"n{class_id:08d}/n{class_id:08d}_{10_000 + position % IMAGES_PER_CLASS}.JPEG"


def write_file_list(path: Path, entries: int) -> None:
    with open(path, "w") as lines:
        for start in range(0, entries, 100_000):
            lines.write("".join(imagenet_like_path(position) + "\n"
                                for position in range(start, min(start + 100_000, entries))))


def unique_memory_mib(pid: str | int = "self") -> float:
    """USS of process ``pid``: its private (clean + dirty) pages, from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])  # kB
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


class TupleListImages:
    """torchvision ImageFolder's sample list from a file list: ``[(full path, class index), ...]``."""

    def __init__(self, list_path: Path):
        root, class_to_idx, self.samples = os.path.dirname(list_path), {}, []
        with open(list_path) as lines:
            for line in lines:
                relative = line.strip()
                label = class_to_idx.setdefault(relative.split("/", 1)[0], len(class_to_idx))
                self.samples.append((os.path.join(root, relative), label))

    def __len__(self) -> int:
        return len(self.samples)

    def locate(self, position: int) -> tuple[str, int]:
        path, label = self.samples[position]  # what ImageFolder.__getitem__ does before loading
        return path, label


class IndexedImages(ImageFiles):
    def locate(self, position: int) -> tuple[str, int]:
        return self.index.path(position), self.index.label(position)  # what ImageFiles._load looks up


def build(kind: str, list_path: Path, saved_index: Path):
    if kind == "list of tuples":
        return TupleListImages(list_path)
    if kind == "ImageFiles":
        return IndexedImages(read_file_list(list_path).index)
    return IndexedImages(load_scan(saved_index).index)


def touch_every_index(dataset, results) -> None:
    """A forked worker: USS before and after looking up every index of the inherited ``dataset``."""
    before = unique_memory_mib()
    for position in range(len(dataset)):
        dataset.locate(position)
    results.put((before, unique_memory_mib()))


def measure(kind: str, list_path: Path, saved_index: Path, workers: int, results) -> None:
    """In a fresh process: build ``kind``, then fork ``workers`` that touch every index."""
    started = time.perf_counter()
    dataset = build(kind, list_path, saved_index)
    startup_s = time.perf_counter() - started
    fork = multiprocessing.get_context("fork")
    worker_results = fork.Queue()
    processes = [fork.Process(target=touch_every_index, args=(dataset, worker_results)) for _ in range(workers)]
    for process in processes:
        process.start()
    memory = [worker_results.get() for _ in processes]
    for process in processes:
        process.join()
    results.put({"kind": kind, "entries": len(dataset), "startup_s": startup_s, "main_rss_mib": resident_mib(),
                 "worker_uss_before_mib": max(before for before, _ in memory),
                 "worker_uss_after_mib": max(after for _, after in memory)})


def in_own_process(target: Callable, *args):
    """``target(*args, queue)`` in a forked process (this one holds no dataset), so that each
    dataset's memory is measured alone; its result."""
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    process = fork.Process(target=target, args=(*args, results))
    process.start()
    result = results.get()
    process.join()
    return result


def scan_tree(files: int, folder: Path) -> dict:
    """Seconds to scan a tree of ``files`` empty files: ImageFolder, scan_folder, and the currency check."""
    from torchvision.datasets import ImageFolder

    for position in range(files):
        relative = Path(imagenet_like_path(position))
        (folder / relative.parent).mkdir(exist_ok=True)
        (folder / relative).touch()
    timings = {"files": files, "folders": -(-files // IMAGES_PER_CLASS)}
    started = time.perf_counter()
    old = ImageFolder(str(folder), allow_empty=True)
    timings["imagefolder_s"] = time.perf_counter() - started
    started = time.perf_counter()
    scan = scan_folder(folder)
    timings["scan_folder_s"] = time.perf_counter() - started
    started = time.perf_counter()
    unchanged = first_change(scan) is None
    timings["currency_check_s"] = time.perf_counter() - started
    if not (len(old.samples) == len(scan.index) == files and unchanged):
        raise RuntimeError(f"scan mismatch: ImageFolder {len(old.samples)}, scan_folder {len(scan.index)}, {files} files")
    return timings


def report(rows: list[dict], tree: Optional[dict], workers: int) -> str:
    lines = [f"| entries | dataset | start-up (s) | main process RSS (MiB) | worker USS before (MiB) | "
             f"worker USS after touching every index (MiB) |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['entries']:,} | {row['kind']} | {row['startup_s']:.2f} | {row['main_rss_mib']:.0f} | "
                     f"{row['worker_uss_before_mib']:.1f} | {row['worker_uss_after_mib']:.1f} |")
    lines.append(f"\nWorker USS: the largest of {workers} forked workers.")
    if tree:
        scale = 1_281_167 / tree["files"]
        lines += ["", f"| scan of {tree['files']:,} empty files in {tree['folders']:,} folders | seconds | "
                      f"x {scale:.1f} (1.28M files, extrapolated linearly) |", "|---|---:|---:|"]
        for name, key in (("torchvision ImageFolder", "imagefolder_s"), ("engine.image_files.scan_folder", "scan_folder_s"),
                          ("saved index still current? (one stat per folder)", "currency_check_s")):
            lines.append(f"| {name} | {tree[key]:.3f} | {tree[key] * scale:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    rows, tree = [], None
    with tempfile.TemporaryDirectory(prefix="dataset_index_") as temporary:
        folder = Path(temporary)
        for size in args.sizes:
            list_path, saved_index = folder / f"list_{size}.txt", folder / f"index_{size}.npz"
            write_file_list(list_path, size)
            save_scan(read_file_list(list_path), saved_index)
            for kind in KINDS:
                rows.append(in_own_process(measure, kind, list_path, saved_index, args.workers))
                print(json.dumps(rows[-1]), flush=True)
            list_path.unlink()
            saved_index.unlink()
        if args.tree_files:
            (folder / "tree").mkdir()
            tree = scan_tree(args.tree_files, folder / "tree")
    table = report(rows, tree, args.workers)
    print(table)
    results = {"rows": rows, "tree": tree, "workers": args.workers,
               "command": "python -m benchmarks.dataset_index " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.output is not None:
        args.output.write_text(table + "\n")
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
