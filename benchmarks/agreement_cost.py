"""Per-update cost of the stop / save agreement on two gloo ranks.

    python -m benchmarks.agreement_cost --updates 2000

Two processes on this machine, each running a loop of "updates" in which a tiny gloo all-reduce
stands for DDP's gradient sync. Per update the table gives the mean wall time of
``engine.agreement.Agreement.check()`` (two store round trips through the job's TCPStore, the
one torchrun already runs), and, for comparison, of the gloo all-reduce of two flags on a second
process group that the agreement replaced. Times are per rank, in microseconds, measured in the
same run (read the ratio; absolute numbers depend on the machine and its load).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.agreement import Agreement  # noqa: E402


def measure(rank: int, world_size: int, port: int, updates: int, results) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore("process_group", store), rank=rank,
                            world_size=world_size, timeout=timeout)
    side_group = dist.new_group(backend="gloo", timeout=timeout)
    agreement = Agreement(dist.PrefixStore("agreement", store), rank, world_size, None, timeout_s=120,
                          stop_flag=lambda: False)
    gradient = torch.ones(1024)
    timings = {"store agreement": 0.0, "gloo all-reduce on a side group": 0.0}
    for _ in range(updates):
        dist.all_reduce(gradient)  # the update's gradient sync
        start = time.perf_counter()
        agreement.check()
        timings["store agreement"] += time.perf_counter() - start
        dist.all_reduce(gradient)
        start = time.perf_counter()
        flags = torch.tensor([0, 0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=side_group)
        flags.tolist()
        timings["gloo all-reduce on a side group"] += time.perf_counter() - start
    results[rank] = {name: 1e6 * total / updates for name, total in timings.items()}
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2000, help="updates per rank")
    parser.add_argument("--smoke", action="store_true", help="a few updates, to check that the script runs")
    args = parser.parse_args(argv)
    updates = 20 if args.smoke else args.updates
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(measure, args=(2, free_port(), updates, results), nprocs=2, join=True)
        results = dict(results)
    lines = [f"Per-update cost on 2 gloo ranks, {updates} updates, microseconds per update (mean over the updates)",
             "", "| check | rank 0 | rank 1 | mean |", "|---|---|---|---|"]
    for name in results[0]:
        values = [results[rank][name] for rank in (0, 1)]
        lines.append(f"| {name} | {values[0]:.0f} | {values[1]:.0f} | {sum(values) / 2:.0f} |")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
