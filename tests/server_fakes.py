"""A deterministic stand-in for QueryEngine, so the gRPC layer is tested in milliseconds."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest

from indexer.config import ScoreKind
from indexer.engine import Hit, IndexInfo, QueryResult, StageTimings, TokenAttribution
from indexer.errors import IndexVerificationError, InvalidInputError, NotFoundError
from indexer.publish import read_current
from indexer.query import Query, TokenizedQuery
from server.app import InfluenceServer, ServerConfig
from server.client import InfluenceClient
from server.reload import Reloader, ReloadPolicy

T = TypeVar("T")

# How long a server may take to load, in seconds: a fresh process imports torch and
# transformers first, which takes tens of seconds on a loaded 2-core machine.
LOAD_TIMEOUT_S = 120
N_EXAMPLES = 100
MAX_LENGTH = 64
EXPLODE = "explode"
"""A completion that makes the fake engine raise an unexpected error."""

INFO = IndexInfo(
    version="",
    model_path="/models/fake",
    model_sha256="0" * 64,
    n_examples=N_EXAMPLES,
    dim=8,
    score_kind=ScoreKind.INFLUENCE,
    faiss_factory="Flat",
    build_time="2026-01-01T00:00:00+00:00",
    tracked_modules=["transformer.h.0.mlp.c_fc"],
    rank_in=4,
    rank_out=2,
    damping=0.1,
    max_length=MAX_LENGTH,
)


class FakeEngine:
    """Hits derive from the completion's text; query length is counted in characters."""

    def __init__(
        self, version: str, *, delay_s: float = 0.0, gate: threading.Event | None = None
    ) -> None:
        """`delay_s`: how long each pass takes; `gate`: when given, each pass also waits for
        it to be set (a test then holds the engine as long as it needs)."""
        self.version = version
        self.info = replace(INFO, version=version)
        self.delay_s = delay_s
        self.gate = gate
        self.batches: list[int] = []
        self.deadlines: list[float | None] = []
        self.abandoned: list[Callable[[], bool] | None] = []
        self.busy = threading.Event()
        self.closed = False

    def prepare(self, query: Query) -> TokenizedQuery:
        if not query.completion:
            raise InvalidInputError("the completion is empty: its tokens carry the query loss")
        if len(query.prompt) + len(query.completion) > MAX_LENGTH:
            raise InvalidInputError(
                f"prompt + completion exceed the context of {MAX_LENGTH} tokens"
            )
        if (query.score_kind or self.info.score_kind) != self.info.score_kind:
            raise InvalidInputError(f"this index ranks by {self.info.score_kind}")
        characters = [ord(c) for c in query.prompt + query.completion]
        return TokenizedQuery(query, characters, len(query.prompt), self.version)

    def prepared(self, query: TokenizedQuery) -> TokenizedQuery:
        return query if query.tokenized_by == self.version else self.prepare(query.query)

    def answer(
        self,
        queries: list[TokenizedQuery],
        *,
        deadlines: Sequence[float | None] | None = None,
        abandoned: Sequence[Callable[[], bool] | None] | None = None,
        on_sketch: Callable[[int, QueryResult], None] | None = None,
    ) -> list[QueryResult]:
        """Re-ranked queries (a rerank_depth) get their sketch answer (`on_sketch`) first, then
        after `delay_s` the same hits marked exact."""
        assert not self.closed, "query on a closed engine"
        self.busy.set()
        self.deadlines += deadlines or [None] * len(queries)
        self.abandoned += abandoned or [None] * len(queries)
        timings = StageTimings(tokenize_us=1, gradient_us=2, search_us=3, lookup_us=4)
        results = [
            QueryResult(self._hits(q.query), q.n_completion_tokens, self.info.score_kind, timings)
            for q in queries
        ]
        for row, q in enumerate(queries):
            if q.query.rerank_depth and on_sketch is not None:
                on_sketch(row, results[row])
        time.sleep(self.delay_s)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        self.batches.append(len(queries))
        if any(q.query.completion == EXPLODE for q in queries):
            raise RuntimeError("simulated engine bug")
        return [
            replace(r, hits=[replace(h, exact=True) for h in r.hits], candidates_reranked=20)
            if q.query.rerank_depth
            else r
            for q, r in zip(queries, results, strict=True)
        ]

    def attribute_tokens(
        self, query: TokenizedQuery, example_ids: list[int]
    ) -> list[TokenAttribution]:
        unknown = [i for i in example_ids if not 0 <= i < N_EXAMPLES]
        if unknown:
            raise NotFoundError(f"unknown example ids: {unknown}")
        return [
            TokenAttribution(i, f"doc-{i}", ["The", " cat", " sat"], [0.5, -0.25, 1.0], 1.25)
            for i in example_ids
        ]

    def close(self) -> None:
        self.closed = True

    def _hits(self, query: Query) -> list[Hit]:
        seed, top_k = zlib.crc32(f"{query.prompt}|{query.completion}".encode()), query.top_k
        return [
            Hit(
                example_id=(seed + 7 * rank) % N_EXAMPLES,
                doc_id=f"doc-{(seed + 7 * rank) % N_EXAMPLES}",
                chunk=0,
                score=float(top_k - rank),
                influence=float(top_k - rank),
                cosine=0.5,
                text=f"text of example {(seed + 7 * rank) % N_EXAMPLES}"
                if query.include_text
                else None,
                layer_scores={"transformer.h.0.mlp.c_fc": float(top_k - rank)}
                if query.include_layer_scores
                else None,
            )
            for rank in range(min(top_k, N_EXAMPLES))
        ]


class FakeOpener:
    """EngineOpener over fake published versions; a CORRUPT marker fails verification."""

    def __init__(self, *, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.engines: list[FakeEngine] = []

    def __call__(self, root: Path, version: str, current: FakeEngine | None) -> FakeEngine:
        if not (root / "versions" / version).is_dir():
            raise NotFoundError(f"version {version} not found in {root}")
        if (root / "versions" / version / "CORRUPT").exists():
            raise IndexVerificationError(f"versions/{version}/index.faiss fails its sha256")
        engine = FakeEngine(version, delay_s=self.delay_s, gate=self.gate)
        self.engines.append(engine)
        return engine


def publish(root: Path, version: str, *, corrupt: bool = False) -> None:
    """Publish a fake version the way the indexer does: new directory, then atomic rename."""
    directory = root / "versions" / version
    directory.mkdir(parents=True)
    if corrupt:
        (directory / "CORRUPT").touch()
    (root / "CURRENT.tmp").write_text(version)
    os.replace(root / "CURRENT.tmp", root / "CURRENT")


@contextlib.contextmanager
def running_server(
    root: Path, opener: FakeOpener, *, token: str | None = None, **overrides: object
) -> Iterator[tuple[InfluenceServer, InfluenceClient]]:
    """A started server on a free port and a client; waits for the index if one is published."""
    config = ServerConfig(
        index_root=root, port=0, reload=ReloadPolicy(poll_seconds=0.05), grace_seconds=5.0
    )
    server = InfluenceServer(configure(config, **overrides), opener=opener)
    server.start()
    try:
        if read_current(root) is not None:
            assert server.wait_until_serving(10)
        with InfluenceClient(f"127.0.0.1:{server.port}", token=token, timeout_s=10) as client:
            yield server, client
    finally:
        server.stop(grace_s=1)


def configure(config: T, **changes: object) -> T:
    """`config` with fields replaced by name at any depth (a ServerConfig's names are unique)."""
    updated = _replace_nested(config, changes)
    if changes:
        raise TypeError(f"no such field: {', '.join(changes)}")
    return updated


def _replace_nested(config: T, changes: dict[str, object]) -> T:
    """Replace (and remove from `changes`) the fields it names, in `config` and nested configs."""
    values = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in changes:
            values[f.name] = changes.pop(f.name)
        elif is_dataclass(value):
            values[f.name] = _replace_nested(value, changes)
    return replace(config, **values)


def counted_checks(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count every reloader's completed checks of the published version: a test that asserts
    nothing changed waits for a few checks, not for a time that a loaded machine may spend
    without one."""
    done: list[None] = []
    check_once = Reloader.check_once

    def counted(self: Reloader) -> None:
        check_once(self)
        done.append(None)

    monkeypatch.setattr(Reloader, "check_once", counted)
    return lambda: len(done)


def after_checks(count: Callable[[], int], checks: int = 3, timeout_s: float = 60) -> None:
    """Wait until `checks` more checks have completed."""
    target, deadline = count() + checks, time.monotonic() + timeout_s
    while count() < target:
        assert time.monotonic() < deadline, "the reloader stopped checking"
        time.sleep(0.01)
