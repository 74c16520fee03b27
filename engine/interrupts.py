"""Ctrl-C held back while a file or a tracker is being written.

Python raises ``KeyboardInterrupt`` at whatever line runs when SIGINT arrives. Inside
``torch.save`` that breaks the zip it is writing (``unexpected pos ...``, exit 1 instead of the
Ctrl-C exit, and the checkpoint of a finished epoch lost); inside a library that hands work to
a thread it can leave that hand-over half done: cut inside ``queue.Queue.put`` after the item is
counted but before the thread is woken, TensorBoard's writer makes the close that follows wait
for its next flush, up to 120 s. So the writes run inside ``interrupts_deferred()``:

    with interrupts_deferred():
        torch.save(state, file)   # a Ctrl-C here lets the save finish, then raises KeyboardInterrupt

* The first SIGINT inside the block is noted; ``KeyboardInterrupt`` is raised as the block ends
  (through whatever handler was installed before, so a caller's own SIGINT handler still decides).
* A second SIGINT inside the block raises ``KeyboardInterrupt`` at once: a write that hangs (a
  dead network file system, a tracker server gone) can still be left.
* Blocks nest; the outermost raises. Outside the main thread (where Python delivers no signals)
  it does nothing. It also works as a decorator: ``@interrupts_deferred()``.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT inside the block waits for its end (a second one does not); see the module docstring."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if len(received) == 1:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)
