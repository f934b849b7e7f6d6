"""The exact stage of an answer: re-rank candidates in sketch order, a chunk at a time, and stop
as soon as no remaining candidate can enter the exact top-k.

"Can" is decided by a bound on how far the sketch's score may be from the exact one
(`indexer.scores.RerankBound`), which the build calibrates per version and stores in the
manifest: each candidate comes with an upper bound of its exact score.

A client deadline bounds the stage too: a round that would not finish in time is not started,
and the query keeps the exact scores so far (the rest are estimates, marked as such). A query
whose client has gone starts no further round either.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from indexer.exact import ExactScores


class StopReason(str, Enum):
    """Why a query's exact stage ended."""

    CERTAIN = "certain"  # no remaining candidate can enter the exact top-k (within the bound)
    DEPTH = "depth"  # every candidate was re-ranked
    DEADLINE = "deadline"  # the client's deadline would pass during the next round

    def __str__(self) -> str:
        return self.value


@dataclass
class CandidateList:
    """One query's candidates in the order they are re-ranked: `ids [n]`, the sketch's score
    estimates in the index's kind `estimates [n]`, and the upper bounds of their exact scores
    in the same kind `upper [n]` (+inf: must be re-ranked, e.g. a lexical candidate)."""

    ids: list[int]
    estimates: np.ndarray
    upper: np.ndarray
    top_k: int
    deadline: float | None = None  # time.monotonic() seconds
    abandoned: Callable[[], bool] | None = None  # True once no client waits for the answer


@dataclass
class StageResult:
    """A query's exact stage: the re-ranked candidates' exact scores (`influence`, and
    `cosine` when the kind is cosine) in the order of `ids`, and why it stopped."""

    ids: list[int] = field(default_factory=list)
    influence: list[float] = field(default_factory=list)
    cosine: list[float] | None = None
    stop: StopReason = StopReason.DEPTH

    @property
    def scores(self) -> np.ndarray:
        """Exact scores `[n]` in the index's kind."""
        return np.asarray(self.influence if self.cosine is None else self.cosine)


ScoreFunction = Callable[[dict[int, list[int]]], list[ExactScores]]
"""Exact scores of the given candidates of some queries (by their position in the stage's
list), in one batched pass, in the order of the dict."""


@dataclass
class _Progress:
    candidates: CandidateList
    result: StageResult
    position: int = 0
    done: bool = False

    def certain(self) -> bool:
        """Whether the exact top-k is settled: the k-th exact score so far beats every
        remaining candidate's upper bound."""
        c = self.candidates
        if self.position < c.top_k:
            return False
        kth = np.partition(self.result.scores, -c.top_k)[-c.top_k]
        return bool(c.upper[self.position :].max(initial=-np.inf) < kth)


class SecondsPerCandidate:
    """A running estimate of the exact stage's cost per candidate, for deadlines."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.value: float | None = None
        self._smoothing = smoothing

    def observe(self, seconds: float, candidates: int) -> None:
        each = seconds / max(candidates, 1)
        self.value = (
            each if self.value is None else self.value + self._smoothing * (each - self.value)
        )

    def predict(self, candidates: int) -> float:
        return 0.0 if self.value is None else self.value * candidates


def run_exact_stage(
    queries: Sequence[CandidateList],
    score: ScoreFunction,
    chunk: int,
    cost: SecondsPerCandidate,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> list[StageResult]:
    """Re-rank each query's candidates in rounds until each is certain, exhausted or out of
    time. A round scores the next `chunk` candidates of every active query (the first: at
    least its top_k) in one call of `score`; `cost` predicts a round's time and learns it."""
    progress = [_Progress(c, StageResult()) for c in queries]
    for p in progress:
        p.done = not p.candidates.ids
    while True:
        now = clock()
        wanted = {}
        for q, p in enumerate(progress):
            if p.done:
                continue
            step = max(chunk, p.candidates.top_k) if p.position == 0 else chunk
            wanted[q] = p.candidates.ids[p.position : p.position + step]
        round_size = len({i for ids in wanted.values() for i in ids})
        for q in list(wanted):
            c = progress[q].candidates
            late = c.deadline is not None and now + cost.predict(round_size) > c.deadline
            if late or (c.abandoned is not None and c.abandoned()):
                # A client that has gone is past its deadline as far as the answer goes.
                progress[q].done, progress[q].result.stop = True, StopReason.DEADLINE
                del wanted[q]
        if not wanted:
            return [p.result for p in progress]
        scores = score(wanted)
        cost.observe(clock() - now, len({i for ids in wanted.values() for i in ids}))
        for (q, ids), exact in zip(wanted.items(), scores, strict=True):
            _advance(progress[q], ids, exact)


def _advance(p: _Progress, ids: list[int], exact: ExactScores) -> None:
    result = p.result
    result.ids.extend(ids)
    result.influence.extend(exact.influence.tolist())
    if exact.cosine is not None:
        result.cosine = (result.cosine or []) + exact.cosine.tolist()
    p.position += len(ids)
    if p.position >= len(p.candidates.ids):
        p.done, result.stop = True, StopReason.DEPTH
    elif p.certain():
        p.done, result.stop = True, StopReason.CERTAIN
