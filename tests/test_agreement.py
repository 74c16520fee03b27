"""engine.agreement: per-update decisions agreed through the job's store, without a collective."""
import datetime
import threading
import time

import pytest
import torch.distributed as dist

from engine.agreement import Agreement, Decision
from engine.distributed import ABORT_KEY, PeerFailedError


@pytest.fixture
def store():
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=30))
    yield dist.PrefixStore("job", server)


def run_ranks(store, world_size: int, ticks: int, stop_at: dict[int, int], save_minutes=None):
    """Every rank (a thread) checks ``ticks`` times; rank r raises its stop flag from its check
    ``stop_at[r]`` on. Returns each rank's decisions."""
    decisions = {rank: [] for rank in range(world_size)}
    errors = []

    def rank_thread(rank):
        calls = {"n": 0}

        def stop_flag():
            calls["n"] += 1
            return rank in stop_at and calls["n"] - 1 >= stop_at[rank]

        agreement = Agreement(store, rank, world_size, save_minutes, timeout_s=20, stop_flag=stop_flag)
        try:
            for _ in range(ticks):
                decisions[rank].append(agreement.check())
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=rank_thread, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return decisions


def test_a_stop_on_one_rank_is_decided_on_every_rank_at_the_same_check_one_later(store):
    decisions = run_ranks(store, world_size=3, ticks=6, stop_at={2: 3})
    expected = [Decision()] * 4 + [Decision(stop=True)] * 2  # posted at check 3, decided at check 4
    assert decisions == {0: expected, 1: expected, 2: expected}


def test_rank_0s_clock_asks_every_rank_to_save(store):
    decisions = run_ranks(store, world_size=2, ticks=3, stop_at={}, save_minutes=1e-9)
    assert decisions[0] == decisions[1] == [Decision(), Decision(save=True), Decision(save=True)]


def test_a_single_process_decides_at_once_without_a_store():
    agreement = Agreement(None, 0, 1, None, timeout_s=1, stop_flag=lambda: True)
    assert agreement.check() == Decision(stop=True)


def test_old_ticks_are_deleted_from_the_store(store):
    run_ranks(store, world_size=2, ticks=8, stop_at={})
    assert not store.check(["tick/0"]) and not store.check(["tick/4"]) and store.check(["tick/7"])


def test_a_rank_waiting_for_a_failed_one_stops_promptly_naming_it(store):
    waiting = Agreement(store, 0, 2, None, timeout_s=600)
    waiting.check()  # tick 0: rank 1 never posts it
    store.set(ABORT_KEY, "rank 1 failed: OutputWriteError: cannot write encoder.safetensors")
    start = time.monotonic()
    with pytest.raises(PeerFailedError, match="rank 1 failed: OutputWriteError"):
        waiting.check()
    assert time.monotonic() - start < 5


def test_a_rank_waiting_for_a_hung_one_gives_up_after_the_timeout(store):
    waiting = Agreement(store, 0, 2, None, timeout_s=0.5)
    waiting.check()
    with pytest.raises(PeerFailedError, match=r"waited \d+ s \(--dist_timeout\) for the other ranks"):
        waiting.check()


def test_the_stop_barrier_waits_for_every_rank(store):
    arrived = []

    def late_rank():
        time.sleep(0.3)
        arrived.append("late")
        Agreement(store, 1, 2, None, timeout_s=10).barrier("stop")

    thread = threading.Thread(target=late_rank)
    thread.start()
    Agreement(store, 0, 2, None, timeout_s=10).barrier("stop")
    assert arrived == ["late"]
    thread.join()
