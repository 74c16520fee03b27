"""Processes and devices: torchrun (one or many nodes) or a single process.

* ``choose_device(requested, local_rank)``: ``--device`` if given, else CUDA, then MPS, then CPU;
  ``device_problem(name)`` says why a requested device cannot be used (None if it can).
* ``init_distributed(requested_device, timeout_s, cpu_threads)`` -> ``DistributedInfo(rank, world_size, local_rank, device)``:
  under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) joins the ``env://`` process group
  with NCCL on CUDA and gloo otherwise; without torchrun, a single process. A collective that
  waits longer than ``timeout_s`` for a hung rank raises instead of blocking the job forever (a
  rank that dies is noticed at once: torchrun then stops the others).
* ``get_rank``, ``get_world_size``, ``is_main_process``, ``barrier``, ``all_reduce_mean``,
  ``all_gather_objects``, ``broadcast_object`` work with and without a process group.
* ``wrap_ddp(model, device)``, ``unwrap_model(model)`` (removes DDP and torch.compile wrappers),
  ``check_replicas_identical(state_dict)``: equal weights on every rank (SHA-256 of the bytes).
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


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
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        rendezvous = ({"store": agent_store_of_this_restart(timeout)} if os.environ.get("TORCHELASTIC_USE_AGENT_STORE")
                      == "True" else {"init_method": "env://"})
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **rendezvous,
                                device_id=device if device.type == "cuda" else None, timeout=timeout)
    return DistributedInfo(rank, world_size, local_rank, device)


def agent_store_of_this_restart(timeout: Optional[datetime.timedelta]) -> dist.Store:
    """torchrun's store (its agent hosts it at ``MASTER_ADDR:MASTER_PORT``) with this worker
    group's keys under ``restart_<TORCHELASTIC_RESTART_COUNT>/``.

    The agent keeps one store across ``--max_restarts`` restarts, and the process group's keys
    (gloo addresses, NCCL ids) carry no restart number: a restarted group could read the dead
    group's entries and try to connect to them until the timeout (seen with torch 2.13 and gloo). The
    restart count is the same for every worker of one agent (one node); for elastic restarts
    across nodes, run torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (then rank 0 hosts a
    fresh store for each restart and this is not used)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout or datetime.timedelta(minutes=30))
    return dist.PrefixStore(f"restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    """DistributedDataParallel around ``model`` when there is more than one process."""
    if get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


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
