"""The server's batch function: runs a batch of queued work on the served engine.

All engine calls (validation included, since it tokenizes) happen on the batcher's one
worker thread, so the model, its hooks and the tokenizer are never used concurrently.
Queries are grouped by score kind; each group is one engine.query call, with the largest
top_k and every include flag any of its queries asked for (the servicer trims per query).
A failing query or group fails only its own items.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from indexer.errors import InvalidInputError
from server.engine import QueryInput, QueryResult, TokenAttribution
from server.metrics import ServerMetrics
from server.reload import EngineHolder

if TYPE_CHECKING:
    from server.engine import QueryEngine


@dataclass(frozen=True)
class QueryOptions:
    """Per-query options; `score_kind` None means the index's own kind."""

    top_k: int
    score_kind: str | None = None
    include_text: bool = False
    include_layer_scores: bool = False


@dataclass(frozen=True)
class QueryWork:
    """One query. `label` prefixes its error messages (e.g. 'queries[3]: ')."""

    query: QueryInput
    options: QueryOptions
    label: str = ""
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class AttributionWork:
    query: QueryInput
    example_ids: tuple[int, ...]
    submitted: float = field(default_factory=time.monotonic)


WorkItem = QueryWork | AttributionWork


@dataclass(frozen=True)
class ServedQuery:
    """A query's untrimmed result; `queue_us`: microseconds it waited for its batch."""

    version: str
    score_kind: str
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
            groups: dict[str, list[int]] = defaultdict(list)
            for i, item in enumerate(items):
                try:
                    engine.check_query(item.query)
                except InvalidInputError as exc:
                    label = item.label if isinstance(item, QueryWork) else ""
                    outcomes[i] = InvalidInputError(f"{label}{exc}")
                    continue
                if isinstance(item, AttributionWork):
                    outcomes[i] = _attribute(engine, item)
                else:
                    groups[item.options.score_kind or engine.info.score_kind].append(i)
            for kind, indices in groups.items():
                work = [items[i] for i in indices]
                for i, outcome in zip(indices, _query(engine, kind, work, started), strict=True):
                    outcomes[i] = outcome
        return [outcomes[i] for i in range(len(items))]


def _attribute(engine: QueryEngine, item: AttributionWork) -> ServedAttribution | Exception:
    try:
        return ServedAttribution(
            engine.version, engine.attribute_tokens(item.query, list(item.example_ids))
        )
    except Exception as exc:
        return exc


def _query(
    engine: QueryEngine, kind: str, work: list[QueryWork], started: float
) -> list[ServedQuery | Exception]:
    try:
        results = engine.query(
            [w.query for w in work],
            top_k=max(w.options.top_k for w in work),
            score_kind=kind,
            include_text=any(w.options.include_text for w in work),
            include_layer_scores=any(w.options.include_layer_scores for w in work),
        )
    except Exception as exc:
        return [exc] * len(work)
    return [
        ServedQuery(engine.version, kind, result, int((started - w.submitted) * 1e6))
        for w, result in zip(work, results, strict=True)
    ]
