"""Processes and devices: torchrun (one or many nodes) or a single process.

* ``choose_device(requested, local_rank)``: ``--device`` if given, else CUDA, then MPS, then CPU;
  ``device_problem(name)`` says why a requested device cannot be used (None if it can).
* ``init_distributed(requested_device, timeout_s, cpu_threads)`` ->
  ``DistributedInfo(rank, world_size, local_rank, device)``: under torchrun (``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK`` set) joins the process group, NCCL on CUDA and gloo otherwise, on the job's store
  (``job_store()``: torchrun's, under a prefix fresh for each restart round, see
  ``job_store_of_this_round``); without torchrun, a single process. A collective that waits longer
  than ``timeout_s`` for a hung rank raises instead of blocking the job forever.
* ``announce_failure(message)``: a failing rank tells the others through the store
  (``ABORT_KEY``); ``engine.agreement`` raises ``PeerFailedError`` on them.
* ``get_rank``, ``get_world_size``, ``is_main_process``, ``barrier``, ``all_reduce_mean``,
  ``all_gather_objects``, ``broadcast_object`` work with and without a process group.
* ``wrap_ddp(model, device)``, ``find_ddp(model)`` (the DDP wrapper, also under torch.compile),
  ``check_replicas_identical(state_dict)``: equal weights on every rank (SHA-256 of the bytes).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

_job_store: Optional[dist.Store] = None


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def device_problem(name: str) -> Optional[str]:
    """Why ``name`` (e.g. ``"cuda:1"``) cannot be used here, or None if it can."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a device name"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} CUDA devices"
    elif device.type == "mps":
        if not _mps_available():
            return "MPS is not available"
    elif device.type != "cpu":
        return f"unsupported device type {device.type!r}"
    return None


def choose_device(requested: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """The device for this process: ``requested``, else CUDA (``cuda:<local_rank>``), MPS, CPU."""
    if requested is not None:
        problem = device_problem(requested)
        if problem:
            raise ValueError(f"--device {requested}: {problem}; leave --device out for automatic choice")
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(
    requested_device: Optional[str] = None, timeout_s: Optional[float] = None, cpu_threads: Optional[int] = None
) -> DistributedInfo:
    """Set this process up: torch CPU threads (if given), torchrun's process group if launched
    by it, and the device."""
    global _job_store
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    if not launched_by_torchrun():
        return DistributedInfo(0, 1, 0, choose_device(requested_device))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = choose_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else 1800)
        _job_store = job_store_of_this_round(rank, world_size, timeout)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                store=dist.PrefixStore("process_group", _job_store),
                                device_id=device if device.type == "cuda" else None, timeout=timeout)
    return DistributedInfo(rank, world_size, local_rank, device)


def job_store_of_this_round(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store of this worker group, under a key prefix that every rank shares and
    no earlier worker group used.

    torchrun's agents keep one store (``MASTER_ADDR:MASTER_PORT``, with
    ``TORCHELASTIC_USE_AGENT_STORE``) across ``--max_restarts`` restarts and membership changes,
    and a process group's keys (gloo addresses, NCCL ids) carry no round number: a restarted
    group would read the dead group's entries. ``TORCHELASTIC_RESTART_COUNT`` is no fix across
    nodes: an agent whose workers failed counts a restart, one that restarts for the membership
    change does not. So the ranks agree on a fresh prefix: rank 0 publishes a random token and
    every other rank has it confirmed, against a nonce of its own, before using it (a stale token
    of an earlier round is never confirmed again, its rank 0 is gone). Without the agent's store
    (``torch.distributed.launch``, Slurm through submitit) rank 0 hosts a new store for this job."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"fcmae/{agree_on_round_token(store, rank, world_size, timeout)}", store)


def agree_on_round_token(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """A token that all ``world_size`` ranks of this round return (see ``job_store_of_this_round``)."""
    nonce = secrets.token_hex(8)
    if rank == 0:
        store.set("round/leader", nonce)
        for other in range(1, world_size):
            acknowledged = f"round/{nonce}/ack/{other}"
            store.wait([acknowledged], timeout)
            store.set(f"round/{nonce}/confirm/{other}", store.get(acknowledged))
        return nonce
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        leader = store.get("round/leader").decode()
        store.set(f"round/{leader}/ack/{rank}", nonce)
        confirmed = f"round/{leader}/confirm/{rank}"
        for _ in range(20):  # rank 0 confirms each rank in turn; a stale leader never does
            if store.check([confirmed]) and store.get(confirmed).decode() == nonce:
                return leader
            time.sleep(0.05)
    raise RuntimeError(f"rank {rank}: rank 0 of this torchrun round did not confirm within {timeout}")


def job_store() -> Optional[dist.Store]:
    """The store this process's group was set up with (None without torchrun)."""
    return _job_store


ABORT_KEY = "abort"


class PeerFailedError(RuntimeError):
    """Another rank failed (it announced it in the job's store) or stopped answering."""


def announce_failure(message: str) -> None:
    """Tell the other ranks, through the job's store, that this one is failing (best effort):
    they stop at their next wait for the others (``engine.agreement``) instead of after the
    process-group timeout."""
    if _job_store is None:
        return
    try:
        if not _job_store.check([ABORT_KEY]):
            _job_store.set(ABORT_KEY, f"rank {get_rank()} failed: {message}")
    except Exception:  # noqa: BLE001  (the store itself may be what failed)
        pass


def destroy_distributed() -> None:
    global _job_store
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _job_store = None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all ranks (a copy; ``value`` itself is left alone)."""
    value = value.detach().clone()
    if _initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= get_world_size()
    return value


def all_gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects)."""
    if not _initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when there is more than one process.

    The gradients become views into DDP's communication buckets (``gradient_as_bucket_view``):
    the optimizer steps on them with no second copy of every gradient. A depthwise conv's
    (C, 1, 7, 7) weight gradient arrives with another stride on its size-1 axis than its bucket
    view (a layout difference without meaning: the same elements in the same order), which DDP
    copies as it copies every fresh gradient; its "Grad strides do not match bucket view strides"
    warning about it is silenced here, on purpose."""
    if get_world_size() == 1:
        return model
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def find_ddp(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The DDP wrapper inside ``model`` (possibly under torch.compile), or None."""
    while not isinstance(model, DistributedDataParallel):
        if not hasattr(model, "_orig_mod"):
            return None
        model = model._orig_mod
    return model


def state_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names and raw bytes of every tensor, in key order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_identical(state_dict: Mapping[str, torch.Tensor]) -> tuple[bool, list[str]]:
    """(all ranks hold identical tensors, per-rank checksums); every rank must call it."""
    checksums = all_gather_objects(state_checksum(state_dict))
    return len(set(checksums)) == 1, checksums
