"""lib/common/pools.py: an interrupted pool finishes what its threads hold and drops the rest."""

import threading
import time

import pytest

from lib.common.pools import thread_pool


def test_an_interrupt_cancels_the_work_that_has_not_started():
    started, lock = [], threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.01)
        return item

    with pytest.raises(KeyboardInterrupt), thread_pool(2) as pool:
        for done, _ in enumerate(pool.map(work, range(500)), start=1):
            if done == 3:
                raise KeyboardInterrupt  # Ctrl-C while the results come in
    assert 3 <= len(started) < 20  # the two workers' items in hand, not the 500 submitted


def test_a_pool_that_is_not_interrupted_does_all_its_work():
    with thread_pool(2) as pool:
        results = list(pool.map(lambda item: item * item, range(100)))
    assert results == [item * item for item in range(100)]
