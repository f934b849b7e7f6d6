"""The server's batch function: runs a batch of queued work on the served engine.

Queries arrive prepared (validated and tokenized on the request threads); all passes through
the model happen here, on the batcher's one worker thread. The batch's queries share one
engine.answer call (one forward/backward); each attribution is its own call. A failing call
fails only its own items.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from indexer.engine import QueryResult, TokenAttribution
from indexer.errors import ResourceLimitError, UnavailableError
from indexer.query import TokenizedQuery
from server.metrics import ServerMetrics
from server.reload import EngineHolder

if TYPE_CHECKING:
    from indexer.engine import QueryEngine


@dataclass(frozen=True)
class QueryWork:
    """A query to answer; `deadline` (`time.monotonic()` seconds) bounds its exact stage, and
    `on_sketch` receives its sketch answer before the exact stage (a streaming RPC's first
    message)."""

    query: TokenizedQuery
    deadline: float | None = None
    on_sketch: Callable[[ServedQuery], None] | None = None
    abandoned: Callable[[], bool] | None = None  # True once its RPC has ended
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class AttributionWork:
    query: TokenizedQuery
    example_ids: tuple[int, ...]
    submitted: float = field(default_factory=time.monotonic)


WorkItem = QueryWork | AttributionWork


@dataclass(frozen=True)
class ServedQuery:
    """A query's result; `queue_us`: microseconds it waited for its batch."""

    version: str
    result: QueryResult
    queue_us: int


@dataclass(frozen=True)
class ServedAttribution:
    version: str
    attributions: list[TokenAttribution]


Outcome = ServedQuery | ServedAttribution | Exception


class Dispatcher:
    """Callable batch function for MicroBatcher[WorkItem, ServedQuery | ServedAttribution]."""

    def __init__(self, holder: EngineHolder, metrics: ServerMetrics) -> None:
        self._holder = holder
        self._metrics = metrics

    def __call__(self, items: list[WorkItem]) -> list[Outcome]:
        self._metrics.observe_batch(len(items))
        started = time.monotonic()
        outcomes: dict[int, Outcome] = {}
        with self._holder.lease() as engine:
            queries = [i for i, item in enumerate(items) if isinstance(item, QueryWork)]
            if queries:
                work = [items[i] for i in queries]
                for i, outcome in zip(queries, _answer(engine, work, started), strict=True):
                    outcomes[i] = outcome
            for i, item in enumerate(items):
                if isinstance(item, AttributionWork):
                    outcomes[i] = _attribute(engine, item)
        return [outcomes[i] for i in range(len(items))]


def _attribute(engine: QueryEngine, item: AttributionWork) -> ServedAttribution | Exception:
    try:
        return ServedAttribution(
            engine.version, engine.attribute_tokens(item.query, list(item.example_ids))
        )
    except Exception as exc:
        return exc


# Failures no query causes alone (Milvus down, memory): a batch that meets one is not
# answered again query by query.
SERVICE_WIDE = (UnavailableError, ResourceLimitError)


def _live(item: QueryWork) -> bool:
    """Whether a client still waits for the query's answer, in time."""
    expired = item.deadline is not None and item.deadline <= time.monotonic()
    return not expired and not (item.abandoned is not None and item.abandoned())


def _answer(
    engine: QueryEngine, work: list[QueryWork], started: float
) -> list[ServedQuery | Exception]:
    """The batch's answers, in one engine.answer call. A query prepared by a version that has
    been replaced since is prepared again first, and one that this version refuses, or that
    makes the engine fail, fails alone."""
    outcomes: dict[int, ServedQuery | Exception] = {}
    prepared: dict[int, TokenizedQuery] = {}
    for row, item in enumerate(work):
        try:
            prepared[row] = engine.prepared(item.query)
        except Exception as exc:
            outcomes[row] = exc
    sketched: set[int] = set()

    def served(row: int, result: QueryResult) -> ServedQuery:
        return ServedQuery(engine.version, result, int((started - work[row].submitted) * 1e6))

    def answer(rows: list[int]) -> None:
        """Answer `rows` together; when that fails, each alone, so that one query that
        breaks the engine fails only its own RPC."""

        def on_sketch(position: int, result: QueryResult) -> None:
            row = rows[position]
            if work[row].on_sketch is not None and row not in sketched:
                sketched.add(row)  # a row answered again sends its first answer once
                work[row].on_sketch(served(row, result))

        try:
            results = engine.answer(
                [prepared[row] for row in rows],
                deadlines=[work[row].deadline for row in rows],
                abandoned=[work[row].abandoned for row in rows],
                on_sketch=on_sketch,
            )
            outcomes.update({row: served(row, r) for row, r in zip(rows, results, strict=True)})
        except Exception as exc:
            if len(rows) == 1 or isinstance(exc, SERVICE_WIDE):
                outcomes.update(dict.fromkeys(rows, exc))
                return
            for row in rows:
                if _live(work[row]):
                    answer([row])
                else:
                    outcomes[row] = exc

    if prepared:
        answer(list(prepared))
    return [outcomes[row] for row in range(len(work))]
