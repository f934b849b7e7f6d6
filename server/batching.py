"""Micro-batching: concurrent callers share one call of a batch function.

Callers submit jobs (one or more items each) to a bounded queue. One worker thread takes
jobs until the batch holds `max_batch_size` items or the oldest job has waited
`max_wait_ms`, calls the batch function once with all their items, and resolves each job's
future with its share of the results. A job is never split across batches.

ConcurrencyLimit bounds how many callers may hold a resource at once, refusing the next one
at once instead of queueing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from indexer.errors import InvalidInputError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFunction = Callable[[list[T]], Sequence[R | Exception]]
"""Takes the items of a batch; returns one result per item, in order. An element that is
an exception fails the job holding that item; raising fails every job in the batch."""


class Overloaded(Exception):
    """The queue is full: the caller should back off and retry."""


class DeadlineExceeded(Exception):
    """The job's deadline passed while it waited in the queue; it was not computed."""


class BatcherClosed(Exception):
    """The batcher is shutting down and accepts no more jobs."""


class ConcurrencyLimit:
    """At most `limit` holders at a time; one more is refused at once with Overloaded, so
    that work beyond the limit never queues (and never holds a thread while waiting)."""

    def __init__(self, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError(f"a concurrency limit must be at least 1, got {limit}")
        self._limit = limit
        self._what = what
        self._slots = threading.BoundedSemaphore(limit)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise Overloaded(
                f"server is busy: {self._limit} {self._what} in progress (the limit); retry later"
            )
        try:
            yield
        finally:
            self._slots.release()


@dataclass(frozen=True)
class BatcherConfig:
    """Limits of a MicroBatcher. Sizes count items, not jobs."""

    max_batch_size: int = field(default=16, metadata={"help": "queries per forward/backward pass"})
    max_wait_ms: float = field(
        default=5.0,
        metadata={"help": "longest a query waits for others to share its batch, in milliseconds"},
    )
    max_queue: int = field(
        default=256,
        metadata={"help": "queued queries beyond which requests get RESOURCE_EXHAUSTED"},
    )

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or not self.max_wait_ms >= 0:
            raise InvalidInputError(
                "--max-batch-size and --max-queue must be at least 1 and --max-wait-ms at "
                f"least 0 (got {self.max_batch_size}, {self.max_queue}, {self.max_wait_ms})"
            )


@dataclass
class _Job(Generic[T, R]):
    items: list[T]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[list[R]] = field(default_factory=Future)


class MicroBatcher(Generic[T, R]):
    """Bounded queue plus one worker thread that calls `fn` on batches of items."""

    def __init__(
        self, fn: BatchFunction[T, R], config: BatcherConfig, *, name: str = "batcher"
    ) -> None:
        self._fn = fn
        self._config = config
        self._jobs: deque[_Job[T, R]] = deque()
        self._depth = 0
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Number of items waiting in the queue (their RPCs still live)."""
        with self._cond:
            self._drop_cancelled()
            return self._depth

    def submit(self, items: Sequence[T], deadline: float | None = None) -> Future[list[R]]:
        """Queue items as one job. `deadline` is a time.monotonic() value in seconds.

        Raises Overloaded when the queue cannot take all the items, BatcherClosed after close().
        The future can be cancelled while the job is still queued.
        """
        if not items:
            raise ValueError("a job needs at least one item")
        job: _Job[T, R] = _Job(list(items), deadline)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            self._drop_cancelled()
            if self._depth + len(job.items) > self._config.max_queue:
                raise Overloaded(
                    f"server queue is full ({self._depth} of {self._config.max_queue} "
                    "queries waiting); retry later"
                )
            self._jobs.append(job)
            self._depth += len(job.items)
            self._cond.notify()
        return job.future

    def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting jobs, finish the queued ones, and wait for the worker (seconds)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout_s)

    def _run(self) -> None:
        while True:
            jobs = self._next_batch()
            if not jobs:
                return
            self._execute(jobs)

    def _next_batch(self) -> list[_Job[T, R]]:
        """Block until a batch is ready; an empty list means closed and drained."""
        with self._cond:
            while True:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return []
                # The oldest job's wait counts from when it was queued, not from when the
                # worker got free: after a long batch, the jobs queued meanwhile go at once.
                collect_until = self._jobs[0].enqueued + self._config.max_wait_ms / 1000
                while self._depth < self._config.max_batch_size and not self._closed:
                    remaining = collect_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._jobs:  # cancelled jobs may have been dropped while it waited
                    return self._take_jobs()

    def _drop_cancelled(self) -> None:
        """Forget queued jobs whose caller cancelled them (their RPC ended: a client gone, a
        deadline passed), so that they no longer count against `max_queue`."""
        if any(job.future.cancelled() for job in self._jobs):
            kept = deque(job for job in self._jobs if not job.future.cancelled())
            self._depth = sum(len(job.items) for job in kept)
            self._jobs = kept

    def _take_jobs(self) -> list[_Job[T, R]]:
        jobs = [self._jobs.popleft()]
        size = len(jobs[0].items)
        while self._jobs and size + len(self._jobs[0].items) <= self._config.max_batch_size:
            jobs.append(self._jobs.popleft())
            size += len(jobs[-1].items)
        self._depth -= size
        return jobs

    def _execute(self, jobs: list[_Job[T, R]]) -> None:
        live = [job for job in jobs if self._admit(job)]
        if not live:
            return
        items = [item for job in live for item in job.items]
        try:
            results = self._fn(items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(items)} items"
                )
        except Exception as exc:
            for job in live:
                job.future.set_exception(exc)
            return
        start = 0
        for job in live:
            share = list(results[start : start + len(job.items)])
            start += len(job.items)
            error = next((r for r in share if isinstance(r, Exception)), None)
            if error is None:
                job.future.set_result(share)
            else:
                job.future.set_exception(error)

    @staticmethod
    def _admit(job: _Job[T, R]) -> bool:
        """False for jobs cancelled by their caller or past their deadline."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.deadline is not None and job.deadline <= time.monotonic():
            job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            return False
        return True
