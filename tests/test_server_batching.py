"""MicroBatcher with plain functions: batching under concurrency, the bound, deadlines."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.batching import (
    BatcherClosed,
    BatcherConfig,
    DeadlineExceeded,
    MicroBatcher,
    Overloaded,
)


class Recorder:
    """Batch function doubling its items; records each batch; can block until released."""

    def __init__(self, *, blocking: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not blocking:
            self.release.set()

    def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(10)
        return [ValueError(f"bad {i}") if i < 0 else 2 * i for i in items]


def test_concurrent_submissions_share_batches() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=8, max_wait_ms=50, max_queue=64))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher.submit([i]).result(5), range(32)))
    batcher.close()
    assert results == [[2 * i] for i in range(32)]
    assert sorted(i for batch in fn.batches for i in batch) == list(range(32))
    assert max(map(len, fn.batches)) > 1
    assert all(len(batch) <= 8 for batch in fn.batches)


def test_a_job_stays_in_one_batch_and_gets_its_results_in_order() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=4, max_wait_ms=1))
    assert batcher.submit([5, 6, 7]).result(5) == [10, 12, 14]
    # A job larger than max_batch_size still runs, alone.
    assert batcher.submit(list(range(6))).result(5) == [0, 2, 4, 6, 8, 10]
    batcher.close()
    assert fn.batches == [[5, 6, 7], list(range(6))]


def test_full_queue_raises_overloaded() -> None:
    fn = Recorder(blocking=True)
    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=1, max_wait_ms=0, max_queue=2))
    running = batcher.submit([1])
    assert fn.entered.wait(5)
    queued = [batcher.submit([2]), batcher.submit([3])]
    assert batcher.depth == 2
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.submit([4])
    fn.release.set()
    assert [f.result(5) for f in (running, *queued)] == [[2], [4], [6]]
    batcher.close()


def test_expired_deadline_is_not_computed() -> None:
    fn = Recorder(blocking=True)
    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=1, max_wait_ms=0))
    running = batcher.submit([1])
    assert fn.entered.wait(5)
    expired = batcher.submit([2], deadline=time.monotonic() + 0.01)
    alive = batcher.submit([3], deadline=time.monotonic() + 30)
    time.sleep(0.05)
    fn.release.set()
    with pytest.raises(DeadlineExceeded):
        expired.result(5)
    assert alive.result(5) == [6]
    assert running.result(5) == [2]
    batcher.close()
    assert [2] not in fn.batches


def test_cancelled_job_is_not_computed() -> None:
    fn = Recorder(blocking=True)
    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=1, max_wait_ms=0))
    batcher.submit([1])
    assert fn.entered.wait(5)
    assert batcher.submit([2]).cancel()
    fn.release.set()
    batcher.close()
    assert fn.batches == [[1]]


def test_errors_fail_only_their_job() -> None:
    fn = Recorder(blocking=True)
    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=8, max_wait_ms=0))
    batcher.submit([0])
    assert fn.entered.wait(5)
    bad, good = batcher.submit([4, -1]), batcher.submit([3])
    fn.release.set()
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(5)
    assert good.result(5) == [6]
    batcher.close()


def test_raising_batch_function_fails_every_job_and_the_worker_survives() -> None:
    calls = []

    def explode(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    batcher = MicroBatcher(explode, BatcherConfig(max_wait_ms=0))
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit([1]).result(5)
    assert batcher.submit([2]).result(5) == [2]
    batcher.close()


def test_close_drains_queued_jobs_then_refuses() -> None:
    fn = Recorder(blocking=True)
    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=1, max_wait_ms=0))
    futures = [batcher.submit([i]) for i in range(3)]
    assert fn.entered.wait(5)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    fn.release.set()
    closer.join(5)
    assert [f.result(0) for f in futures] == [[0], [2], [4]]
    with pytest.raises(BatcherClosed):
        batcher.submit([9])


def test_jobs_whose_rpcs_ended_stop_counting_against_the_queue() -> None:
    """They counted until the worker reached them: live queries got RESOURCE_EXHAUSTED from
    a queue of dead ones."""
    gate = threading.Event()

    def held(items: list[int]) -> list[int]:
        gate.wait(30)
        return items

    batcher = MicroBatcher(held, BatcherConfig(max_batch_size=1, max_wait_ms=0, max_queue=2))
    first = batcher.submit([0])
    deadline = time.monotonic() + 30
    while batcher.depth and time.monotonic() < deadline:  # the worker holds the first job
        time.sleep(0.01)
    ended = [batcher.submit([1]), batcher.submit([2])]
    for future in ended:
        future.cancel()  # what the servicer does when their RPCs end
    live = batcher.submit([3])
    assert batcher.depth == 1
    gate.set()
    assert first.result(30) == [0] and live.result(30) == [3]
    batcher.close(30)


def test_a_job_cancelled_while_its_batch_is_collected_leaves_the_worker_alive() -> None:
    """Dropping it emptied the queue under the collecting worker, which then popped an empty
    queue and died: no query was answered again."""
    batcher = MicroBatcher(lambda items: items, BatcherConfig(max_wait_ms=300))
    cancelled = batcher.submit([1])
    time.sleep(0.1)  # the worker now collects the batch (it waits 300 ms for more)
    cancelled.cancel()
    assert batcher.depth == 0  # drops it while the worker waits for more items
    time.sleep(0.5)  # past the worker's wait: it takes its batch from the emptied queue
    assert batcher.submit([2]).result(10) == [2]
    batcher.close(30)
