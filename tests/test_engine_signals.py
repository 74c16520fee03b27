"""engine.signals: loader workers can neither die of a stop signal nor keep it blocked."""
import multiprocessing
import signal

from torch.utils.data import DataLoader, Dataset

from engine.signals import STOP_SIGNALS, stop_signals_blocked, workers_ignore_stop_signals


def report_blocked_signals(queue) -> None:
    queue.put(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))


class WorkerSignalState(Dataset):
    """Item i: (SIGTERM ignored, SIGTERM blocked) in the process that loads it."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, signal.SIGTERM in signal.pthread_sigmask(
            signal.SIG_BLOCK, [])


def test_a_process_forked_inside_stop_signals_blocked_starts_with_them_blocked():
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    with stop_signals_blocked():
        child = context.Process(target=report_blocked_signals, args=(queue,))
        child.start()
    blocked = queue.get()
    child.join()
    assert set(STOP_SIGNALS) <= blocked, "a worker could die of SIGTERM before it ignores it"
    assert not set(STOP_SIGNALS) & set(signal.pthread_sigmask(signal.SIG_BLOCK, [])), "the parent kept them blocked"


def test_loader_workers_started_with_the_signals_blocked_ignore_them_and_unblock_them():
    loader = DataLoader(WorkerSignalState(), batch_size=None, num_workers=1)
    workers_ignore_stop_signals(loader)
    with stop_signals_blocked():
        batches = iter(loader)
    assert [tuple(state) for state in batches] == [(True, False), (True, False)]
