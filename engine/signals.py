"""Stopping a run cleanly when the scheduler asks: SIGTERM / SIGUSR1 -> checkpoint -> exit 3.

Slurm (and most schedulers) send SIGTERM, or the signal chosen with ``--signal``, some time
before they kill a job. While ``handle_stop_signals()`` is active, SIGTERM and SIGUSR1 only
``request_stop``; the training loop sees ``stop_requested()`` at its next optimizer-update
boundary, every rank agrees on it, rank 0 writes a complete checkpoint and the process exits
with ``EXIT_STOPPED``. A second signal during the save changes nothing (the flag is already
set; the checkpoint is written atomically either way).

* ``EXIT_STOPPED``: the documented exit code of a run stopped on a signal after writing a
  complete checkpoint (rerun the same command to resume).
* ``EXIT_INTERRUPTED``: Ctrl-C (SIGINT), 128 + 2 as shells report it.
* ``request_stop(reason)``: ask the run to stop at the next boundary; safe from signal handlers
  and other threads (e.g. a submitit checkpoint hook). The first reason is kept.
* ``stop_requested()`` / ``stop_reason()``.
* ``handle_stop_signals()``: context that clears any earlier request, installs the handlers (main
  thread only) and restores the previous ones on exit.
* Under torchrun with ``--max_restarts``, torchrun restarts workers that exit with any non-zero
  code, so a run stopped on purpose would resume and run on into the scheduler's kill. The stop
  therefore also writes ``STOP_MARKER`` (the torchrun agents of the stopped run) next to its
  checkpoint; workers that the same agents restart see it (``stopped_under_this_torchrun``) and
  exit with ``EXIT_STOPPED`` at once. A new launch (a requeued job, a rerun command) has new
  agents: it resumes and removes the marker.
* ``workers_ignore_stop_signals(loader)``: DataLoader workers ignore SIGTERM / SIGUSR1, which a
  scheduler sends to the whole process group: PyTorch's workers would otherwise die at once and
  take the main process down before it could checkpoint. They still end when the loader tells
  them to (and with the main process).
* ``stop_signals_blocked()``: context that holds SIGTERM / SIGUSR1 back in the calling thread;
  start a loader's workers inside it (``iter(loader)``) and each starts with the signals blocked,
  so it cannot die of one in the moment between its fork and the ``worker_init_fn`` that makes it
  ignore them. A signal sent meanwhile reaches the main process when the context ends.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from .checkpoint import atomic_write

EXIT_STOPPED: int = 3
EXIT_INTERRUPTED: int = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_MARKER = "stopped-by-torchrun-agents.json"

# A plain module attribute: assigning it is atomic under the GIL, so a signal handler or another
# thread can set it without a lock (a lock taken in a handler could deadlock the main thread).
_stop_reason: Optional[str] = None


class StopRequested(Exception):
    """Raised by long work outside the training step (e.g. a k-NN pass, checked at each of its
    batches on every rank alike) once the ranks agreed to stop; the runner then writes a
    checkpoint and exits with ``EXIT_STOPPED``."""


def request_stop(reason: str) -> None:
    """Ask the running training to stop at its next update boundary, checkpoint and exit."""
    global _stop_reason
    if _stop_reason is None:
        _stop_reason = reason


def stop_requested() -> bool:
    return _stop_reason is not None


def stop_reason() -> Optional[str]:
    return _stop_reason


def _on_signal(signum: int, _frame) -> None:
    request_stop(signal.Signals(signum).name)


@contextlib.contextmanager
def handle_stop_signals() -> Iterator[None]:
    """SIGTERM and SIGUSR1 call ``request_stop`` while inside; no-op outside the main thread."""
    global _stop_reason
    _stop_reason = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGUSR1 blocked in this thread while inside (and in processes forked meanwhile)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignore_stop_signals(worker_init_fn: Optional[Callable[[int], None]], worker_id: int) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked if started in stop_signals_blocked()
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def workers_ignore_stop_signals(loader) -> None:
    """Make ``loader``'s worker processes (started later) ignore the stop signals; its own
    ``worker_init_fn`` still runs after that."""
    loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)


def torchrun_agent() -> Optional[str]:
    """The torchrun agent this worker runs under (its host, pid and start time), None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()
    try:  # field 22 of /proc/<pid>/stat: the start time, which tells a reused pid apart
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "unknown"
    return f"{socket.gethostname()}/{parent}/{started}"


def write_stop_marker(output_dir: str | os.PathLike, agents: list[Optional[str]], checkpoint: str) -> None:
    """After a stop under torchrun: name the agents whose restarted workers must not resume."""
    agents = sorted({agent for agent in agents if agent is not None})
    if agents:
        text = json.dumps({"agents": agents, "checkpoint": checkpoint}, indent=1)
        atomic_write(Path(output_dir) / STOP_MARKER, lambda file: file.write(text.encode()))


def stopped_under_this_torchrun(output_dir: str | os.PathLike) -> bool:
    """Whether this worker's torchrun agent already stopped the run in ``output_dir``."""
    agent, marker = torchrun_agent(), Path(output_dir) / STOP_MARKER
    if agent is None or not marker.is_file():
        return False
    try:
        return agent in json.loads(marker.read_text())["agents"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_stop_marker(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / STOP_MARKER).unlink(missing_ok=True)
