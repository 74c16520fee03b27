"""Decisions every rank takes at the same point of the run, agreed through the job's key-value store.

At each optimizer-update boundary (and at each batch of a k-NN pass) every rank calls
``agreement.check()``; all ranks get the same ``Decision``: ``stop`` when a stop signal reached
any rank, ``save`` when ``--save_ckpt_minutes`` passed on rank 0's clock, and the run acts on it
at once. No collective runs on the training device and no second process group is needed: the
ranks talk through the c10d store that torchrun (or the launcher) already runs, so the GPU stream
is never waited on, and no extra network interface has to be configured.

The protocol, one "tick" per call (ticks are numbered alike on every rank because every rank
calls ``check`` at the same points):

* a rank posts its flags for tick ``n`` by one atomic ``store.add`` on key ``n``: a count of the
  ranks that posted, plus the stop and save flags in higher bits;
* it then reads tick ``n - 1``, whose count is complete by then in practice (every rank posted it
  before the update that separates the two ticks could finish; when a rank runs ahead of the
  others, it waits for the key its last poster writes); the decision of tick ``n`` is thus made
  from what every rank knew one update earlier: a stop starts saving within one update.

Cost: two store round trips per check (three for the last poster; rank 0 also deletes old keys):
``python -m benchmarks.agreement_cost`` measures it on two gloo ranks. While waiting, a rank also
watches the job's abort key, which a failing rank sets (``engine.distributed.announce_failure``),
so one rank's fault ends every rank promptly instead of after ``--dist_timeout``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch.distributed as dist

from .distributed import ABORT_KEY, PeerFailedError
from .signals import stop_requested

_COUNT_BITS = 20  # world sizes below 2**20
_STOP_SHIFT, _SAVE_SHIFT = _COUNT_BITS, 2 * _COUNT_BITS
_FIELD = (1 << _COUNT_BITS) - 1
MAX_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Decision:
    stop: bool = False
    save: bool = False


class Agreement:
    """``check()`` -> the ``Decision`` of this point of the run, the same on every rank.

    ``store`` None (a single process): decided locally, at once. ``save_minutes``: minutes since
    ``saved()`` was last called after which rank 0 asks for a checkpoint (None: never).
    ``stop_flag()``: whether this rank was asked to stop (default: a stop signal arrived).
    """

    def __init__(self, store: Optional[dist.Store], rank: int, world_size: int, save_minutes: Optional[float],
                 timeout_s: float, stop_flag: Callable[[], bool] = stop_requested):
        self.store, self.rank, self.world_size, self.stop_flag = store, rank, world_size, stop_flag
        self.save_minutes, self.timeout_s = save_minutes, timeout_s
        self.tick = 0
        self.last_save = time.monotonic()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def _save_due(self) -> bool:
        return (self.save_minutes is not None and self.rank == 0
                and time.monotonic() - self.last_save >= 60 * self.save_minutes)

    def check(self) -> Decision:
        stop, save = self.stop_flag(), self._save_due()
        if self.store is None:
            return Decision(stop, save)
        tick, self.tick = self.tick, self.tick + 1
        posted = self.store.add(f"tick/{tick}", 1 + (int(stop) << _STOP_SHIFT) + (int(save) << _SAVE_SHIFT))
        if posted & _FIELD == self.world_size:
            self.store.set(f"done/{tick}", str(posted))
        if tick == 0:
            return Decision()
        value = self.store.add(f"tick/{tick - 1}", 0)
        if value & _FIELD != self.world_size:
            value = int(self._wait_for(f"done/{tick - 1}"))
        if self.rank == 0 and tick >= 3:  # every rank has read tick - 3 before posting tick - 1
            self.store.delete_key(f"tick/{tick - 3}")
            self.store.delete_key(f"done/{tick - 3}")
        return Decision(stop=(value >> _STOP_SHIFT) & _FIELD > 0, save=value >> _SAVE_SHIFT > 0)

    def barrier(self, name: str) -> None:
        """Wait until every rank called ``barrier(name)`` (each name once per run)."""
        if self.store is None:
            return
        if self.store.add(f"barrier/{name}", 1) == self.world_size:
            self.store.set(f"barrier/{name}/done", "1")
        self._wait_for(f"barrier/{name}/done")

    def _wait_for(self, key: str) -> str:
        """The value of ``key`` once some rank has set it; raises ``PeerFailedError`` as soon as
        another rank announced a failure, or after ``timeout_s``."""
        start, pause = time.monotonic(), 0.001
        while not self.store.check([key]):
            if self.store.check([ABORT_KEY]):
                raise PeerFailedError(self.store.get(ABORT_KEY).decode())
            waited = time.monotonic() - start
            if waited >= self.timeout_s:
                raise PeerFailedError(f"rank {self.rank} waited {waited:.0f} s (--dist_timeout) for the other ranks "
                                      f"({key}); one of them is hung or gone")
            time.sleep(pause)
            pause = min(2 * pause, MAX_POLL_SECONDS)
        return self.store.get(key).decode()
