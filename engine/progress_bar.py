"""Progress of long work that is not a training step (a folder scan, a k-NN pass, feature
extraction, reconstruction pictures of many images, the first ``torch.compile`` step).

    for batch in progress_bar(loader, "k-NN monitor: train split", total=len(loader), unit="batch"):
        ...
    with busy("torch.compile: compiling the model"):
        first_update()

A tqdm bar on the terminal while the work runs, only where a person watches: on rank 0 and when
stdout is a terminal (a log file, a pipe or a Slurm job's output gets no bar). The duration goes
to the log when the work ends ("k-NN monitor: train split: 120 batches in 14.2 s"), bar or not.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Iterable, Iterator, Optional, TypeVar

from .distributed import get_rank

_logger = logging.getLogger(__name__)

T = TypeVar("T")
BUSY_REFRESH_S = 1.0  # how often the bar of ``busy`` redraws its elapsed time


def shows_bar() -> bool:
    """Rank 0 with a terminal on stdout."""
    return get_rank() == 0 and sys.stdout.isatty()


def _bar(description: str, total: Optional[int], unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stdout, leave=False, dynamic_ncols=True)


def progress_bar(items: Iterable[T], description: str, total: Optional[int] = None, unit: str = "item",
                 log: bool = True) -> Iterator[T]:
    """``items``, with a bar counting them (``total``: how many, None: a plain count); with ``log``
    the count and duration are logged at the end (also when the loop is left early)."""
    bar = _bar(description, total, unit) if shows_bar() else None
    count, start = 0, time.perf_counter()
    try:
        for item in items:
            yield item
            count += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log:
            _logger.info("%s: %d %s in %.1f s", description, count, unit if count == 1 else plural(unit),
                         time.perf_counter() - start)


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


@contextlib.contextmanager
def busy(description: str) -> Iterator[None]:
    """A bar showing the time spent on one long call; the duration is logged at the end."""
    bar = _bar(description, None, "s") if shows_bar() else None
    done = threading.Event()
    ticker = None
    if bar is not None:
        def tick() -> None:
            while not done.wait(BUSY_REFRESH_S):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        done.set()
        if ticker is not None:
            ticker.join()
            bar.close()
        _logger.info("%s: %.1f s", description, time.perf_counter() - start)


def busy_until_first(items: Iterable[T], description: str) -> Iterator[T]:
    """``items``, with ``busy(description)`` around producing the first one (e.g. the first,
    compiled, optimizer update of a loop)."""
    iterator = iter(items)
    with busy(description):
        first = next(iterator, _NOTHING)
    if first is _NOTHING:
        return
    yield first
    yield from iterator


_NOTHING = object()
