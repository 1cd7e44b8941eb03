"""Thread pools that stop soon when the work is interrupted.

`ThreadPoolExecutor.map` submits every item at once, and leaving its `with` block waits for all of them
(`shutdown(wait=True)`, Python 3.11 concurrent/futures/_base.py Executor.__exit__): Ctrl-C while 7,000 images are
verified would wait for all 7,000. Here an exception leaving the block cancels what has not started, so only the
images already in the workers' hands are finished.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


@contextmanager
def thread_pool(workers: int | None) -> Iterator[ThreadPoolExecutor]:
    """A ThreadPoolExecutor of `workers` threads whose pending work is cancelled if the block raises."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
