"""gRPC InfluenceService: validates and converts requests, has the engine prepare each query,
queues the work on the batcher, converts results back and maps errors to status codes.

No math here: passes through the model run in server.dispatch on the batcher's worker thread.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from indexer.errors import (
    InvalidInputError,
    NotFoundError,
    PreconditionError,
    ResourceLimitError,
    UnavailableError,
)
from indexer.query import Query, TokenizedQuery
from influence.v1 import influence_pb2 as pb
from influence.v1 import influence_pb2_grpc
from server import messages
from server.batching import (
    BatcherClosed,
    ConcurrencyLimit,
    DeadlineExceeded,
    MicroBatcher,
    Overloaded,
)
from server.dispatch import (
    AttributionWork,
    QueryWork,
    ServedAttribution,
    ServedQuery,
    WorkItem,
)
from server.metrics import ServerMetrics
from server.reload import EngineHolder, NoEngineError, Reloader
from server.rpc import FieldError, RejectedRequest, abort, rpc_scope

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Served = ServedQuery | ServedAttribution

# gRPC reports "no deadline" as about 2**63 seconds away, beyond what a wait accepts.
_NO_DEADLINE_S = 1e9
# What an answer keeps of a deadline for converting and sending it: at least this much, or this
# share of the time the RPC had left.
_ANSWER_MARGIN_S = 0.02
_ANSWER_MARGIN_SHARE = 0.05

_STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoEngineError, grpc.StatusCode.UNAVAILABLE),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BatcherClosed, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (futures.CancelledError, grpc.StatusCode.CANCELLED),
)


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request limits; each violation is INVALID_ARGUMENT naming the limit. Query RPCs
    beyond `max_concurrent_queries` get RESOURCE_EXHAUSTED, telling clients to retry after
    `retry_delay_s` seconds (as they do for a full queue)."""

    max_top_k: int = field(default=1000, metadata={"help": "largest top_k a query may ask"})
    max_queries_per_batch: int = field(default=256, metadata={"help": "largest QueryBatch request"})
    max_attribution_examples: int = field(
        default=32, metadata={"help": "most example ids per AttributeTokens request"}
    )
    max_concurrent_queries: int = field(
        default=64,
        metadata={
            "help": "concurrent query RPCs (Query, QueryBatch, AttributeTokens); beyond them "
            "RESOURCE_EXHAUSTED. Health checks and GetIndexInfo have threads of their own",
            "flags": ("--workers",),
        },
    )
    retry_delay_s: float = 0.1


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an error; unexpected errors are logged, not leaked."""
    for cls, code in _STATUS_CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


class InfluenceServicer(influence_pb2_grpc.InfluenceServiceServicer):
    def __init__(
        self,
        holder: EngineHolder,
        batcher: MicroBatcher[WorkItem, Served],
        reloader: Reloader,
        limits: ServiceLimits,
        metrics: ServerMetrics,
    ) -> None:
        self._holder = holder
        self._batcher = batcher
        self._reloader = reloader
        self._limits = limits
        self._metrics = metrics
        self._queries = ConcurrencyLimit(limits.max_concurrent_queries, "query RPCs")

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        return self._unary("Query", request, context, self._query, limited=True)

    def QueryStream(
        self, request: pb.QueryRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.QueryResponse]:
        with self._rpc("QueryStream", request, context, limited=True) as rpc:
            for response in self._query_stream(request, context):
                rpc.response = response
                yield response

    def QueryBatch(
        self, request: pb.QueryBatchRequest, context: grpc.ServicerContext
    ) -> pb.QueryBatchResponse:
        return self._unary("QueryBatch", request, context, self._query_batch, limited=True)

    def AttributeTokens(
        self, request: pb.AttributeTokensRequest, context: grpc.ServicerContext
    ) -> pb.AttributeTokensResponse:
        return self._unary("AttributeTokens", request, context, self._attribute, limited=True)

    def GetIndexInfo(
        self, request: pb.GetIndexInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetIndexInfoResponse:
        return self._unary("GetIndexInfo", request, context, lambda _r, _c: self._info())

    def _unary(
        self,
        method: str,
        request: Message | RejectedRequest,
        context: grpc.ServicerContext,
        body: Callable[[Message, grpc.ServicerContext], M],
        *,
        limited: bool = False,
    ) -> M:
        """A unary RPC: its body's response, under `_rpc`."""
        with self._rpc(method, request, context, limited=limited) as rpc:
            rpc.response = body(request, context)
        return rpc.response

    @contextmanager
    def _rpc(
        self,
        method: str,
        request: Message | RejectedRequest,
        context: grpc.ServicerContext,
        *,
        limited: bool = False,
    ) -> Iterator[_Call]:
        """Run one RPC's body under its request id: admit it (query RPCs share one concurrency
        limit), record metrics, log one line, turn errors into statuses with details. The body
        sets the response it sends (the last one, for a stream)."""
        start = time.monotonic()
        call = _Call()
        with rpc_scope(context) as request_id:
            try:
                with self._queries.hold() if limited else nullcontext():
                    if isinstance(request, RejectedRequest):
                        raise request.error()
                    yield call
            except GeneratorExit:
                # A stream's client went away (cancelled, or its deadline passed).
                self._finish(method, grpc.StatusCode.CANCELLED, start, "the client went away")
                raise
            except Exception as exc:
                code, message = status_for(exc)
                self._finish(method, code, start, message)
                retry = self._limits.retry_delay_s
                abort(context, code, message, exc, request_id=request_id, retry_delay_s=retry)
            self._finish(method, grpc.StatusCode.OK, start, _describe(call.response))

    def _finish(self, method: str, code: grpc.StatusCode, start: float, detail: str) -> None:
        seconds = time.monotonic() - start
        self._metrics.observe_request(method, code.name, seconds)
        log.debug("%s %s total_us=%d %s", method, code.name, seconds * 1e6, detail)

    def _query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        start = time.monotonic()
        deadline = _deadline(context)
        work = _work(self._prepare(request, path=""), deadline, context)
        (served,) = self._wait(self._submit([work], deadline, context), deadline)
        return self._query_response(served, start)

    def _query_stream(
        self, request: pb.QueryRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.QueryResponse]:
        """The sketch answer as soon as the index was searched (a re-ranked query only), then
        the final one."""
        start = time.monotonic()
        deadline = _deadline(context)
        sketches: queue.SimpleQueue[ServedQuery | None] = queue.SimpleQueue()
        query = self._prepare(request, path="")
        work = _work(query, deadline, context, on_sketch=sketches.put)
        future = self._submit([work], deadline, context)
        future.add_done_callback(lambda _: sketches.put(None))
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            sketch = sketches.get(timeout=wait)
        except queue.Empty:
            sketch = None  # the final answer (or the deadline's error) follows at once
        if sketch is not None:
            yield self._query_response(sketch, start, final=False)
        (served,) = self._wait(future, deadline)
        yield self._query_response(served, start)

    def _query_batch(
        self, request: pb.QueryBatchRequest, context: grpc.ServicerContext
    ) -> pb.QueryBatchResponse:
        start = time.monotonic()
        n, limit = len(request.queries), self._limits.max_queries_per_batch
        if not 1 <= n <= limit:
            raise FieldError("queries", f"QueryBatch takes 1 to {limit} queries, got {n}")
        deadline = _deadline(context)
        work = [
            _work(self._prepare(q, path=f"queries[{i}]"), deadline, context)
            for i, q in enumerate(request.queries)
        ]
        served = self._wait(self._submit(work, deadline, context), deadline)
        return pb.QueryBatchResponse(responses=[self._query_response(s, start) for s in served])

    def _attribute(
        self, request: pb.AttributeTokensRequest, context: grpc.ServicerContext
    ) -> pb.AttributeTokensResponse:
        n, limit = len(request.example_ids), self._limits.max_attribution_examples
        if not 1 <= n <= limit:
            raise FieldError(
                "example_ids", f"AttributeTokens takes 1 to {limit} example_ids, got {n}"
            )
        query = self._tokenize(Query(request.prompt, request.completion), path="")
        deadline = _deadline(context)
        work = [AttributionWork(query, tuple(request.example_ids))]
        (served,) = self._wait(self._submit(work, deadline, context), deadline)
        return pb.AttributeTokensResponse(
            attributions=[messages.attribution_message(a) for a in served.attributions],
            index_version=served.version,
        )

    def _info(self) -> pb.GetIndexInfoResponse:
        engine, status = self._reloader.served()
        fields: dict[str, object] = {
            "last_reload_error": status.last_error,
            "pending_version": status.pending_version,
            "max_top_k": self._limits.max_top_k,
            "max_queries_per_batch": self._limits.max_queries_per_batch,
            "max_attribution_examples": self._limits.max_attribution_examples,
        }
        if engine is not None:
            fields.update(messages.index_info_fields(engine.info))
        return pb.GetIndexInfoResponse(**fields)

    def _prepare(self, request: pb.QueryRequest, path: str) -> TokenizedQuery:
        """`path`: where the query is in the request ('' for the request itself)."""
        k, limit = request.top_k, self._limits.max_top_k
        if not 1 <= k <= limit:
            raise FieldError(
                f"{path}.top_k" if path else "top_k",
                f"{_label(path)}top_k must be between 1 and {limit} (the server's --max-top-k), "
                f"got {k}",
            )
        try:
            query = messages.query_from_request(request)
        except InvalidInputError as exc:
            raise FieldError(path or "query", f"{_label(path)}{exc}") from exc
        return self._tokenize(query, path)

    def _tokenize(self, query: Query, path: str) -> TokenizedQuery:
        """Validate and tokenize the query with the served version (on this request thread)."""
        with self._holder.lease() as engine:
            try:
                return engine.prepare(query)
            except InvalidInputError as exc:
                # The engine's errors concern the query as a whole (its length, score kind...).
                raise FieldError(path or "query", f"{_label(path)}{exc}") from exc

    def _submit(
        self, work: list[WorkItem], deadline: float | None, context: grpc.ServicerContext
    ) -> futures.Future[list[Served]]:
        """Queue the items as one job (one batch)."""
        future: futures.Future[list[Served]] = self._batcher.submit(work, deadline=deadline)
        # A cancelled or expired RPC leaves its job in the queue; cancelling the future drops it.
        context.add_callback(future.cancel)
        return future

    def _wait(self, future: futures.Future[list[Served]], deadline: float | None) -> list[Served]:
        """A job's results, within the RPC's deadline (`time.monotonic()` seconds)."""
        try:
            return future.result(timeout=None if deadline is None else deadline - time.monotonic())
        except futures.TimeoutError:
            raise DeadlineExceeded("deadline passed before the query was answered") from None

    def _query_response(
        self, served: ServedQuery, start: float, *, final: bool = True
    ) -> pb.QueryResponse:
        timings = served.result.timings
        stage_us = {
            "queue": served.queue_us,
            "tokenize": timings.tokenize_us,
            "gradient": timings.gradient_us,
            "search": timings.search_us,
            "lookup": timings.lookup_us,
            "rerank": timings.rerank_us,
            "total": int((time.monotonic() - start) * 1e6),
        }
        if final:
            self._metrics.observe_stages(stage_us)
        return messages.query_response(served.result, served.version, stage_us, final=final)


@dataclass
class _Call:
    """What an RPC's body answered: its (last) response, for the request log."""

    response: Message | None = None


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The RPC's deadline in `time.monotonic()` seconds (None: it has none)."""
    remaining = context.time_remaining()
    bounded = remaining is not None and remaining < _NO_DEADLINE_S
    return time.monotonic() + remaining if bounded else None


def _work(
    query: TokenizedQuery,
    deadline: float | None,
    context: grpc.ServicerContext,
    on_sketch: Callable[[ServedQuery], None] | None = None,
) -> QueryWork:
    """A query's work: its exact stage ends in time to answer before the RPC's deadline, and
    starts no round once the RPC has ended (cancelled, or its deadline passed)."""
    return QueryWork(
        query,
        _exact_deadline(deadline),
        on_sketch=on_sketch,
        abandoned=lambda: not context.is_active(),
    )


def _exact_deadline(deadline: float | None) -> float | None:
    """When a query's exact stage must be done: the RPC's deadline, less the time the answer
    needs to reach the client."""
    if deadline is None:
        return None
    return deadline - max(_ANSWER_MARGIN_S, _ANSWER_MARGIN_SHARE * (deadline - time.monotonic()))


def _label(path: str) -> str:
    """The prefix naming a nested query in error messages, e.g. 'queries[1]: '."""
    return f"{path}: " if path else ""


def _describe(response: Message) -> str:
    """Request-log detail: a query's stage timings, or the number of results."""
    if isinstance(response, pb.QueryResponse):
        timings = " ".join(
            f"{f.name}={getattr(response.timings, f.name)}" for f in pb.Timings.DESCRIPTOR.fields
        )
        return f"version={response.index_version} k={len(response.influences)} {timings}"
    if isinstance(response, pb.QueryBatchResponse):
        return f"queries={len(response.responses)}"
    if isinstance(response, pb.AttributeTokensResponse):
        return f"version={response.index_version} examples={len(response.attributions)}"
    return ""
