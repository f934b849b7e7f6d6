"""The build's calibration of the exact stage's bound (`indexer.bound`).

Pseudo-queries are cut from corpus examples as a user's query looks: a prefix of the example
as the prompt and its next 1-4 tokens as the completion. Each is answered as the engine would
answer it, the sketch's top candidates from the version's own index then scored exactly, and
the pairs (sketch cosine, exact score in cosine units) fit the bound stored in the manifest.

The pseudo-queries' examples are chosen by a hash of their ids, so the build knows them before
its main pass: where it pays (`main_pass_queries`), the main pass scores every example it
sketches on them exactly, and the calibration reads those scores (`KnownScores`) instead of
passing over the candidates again; the rest are scored by passes over their candidates.

The first pseudo-queries are also scored on a uniform sample of the corpus (`BULK_SAMPLE`
examples), whose sketch errors measure the sketch's noise away from the top of a ranking: what
the estimates of the examples an answer does not name are shrunk by
(`fit_corpus_noise`, `RerankBound.corpus_estimates`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import faiss
import numpy as np
import torch

from indexer.config import ScoreKind
from indexer.curvature import Curvature
from indexer.exact import ExactReranker, ExactScores, exact_scores
from indexer.hashing import int63
from indexer.scan import device_searcher
from indexer.scores import (
    CorpusNoise,
    RerankBound,
    ScoreSpace,
    fit_corpus_noise,
    fit_rerank_bound,
)
from indexer.sketch import Capture, GradientSketcher, TokenBatch, make_batch
from indexer.store import MetadataReader, StoredVectors

if TYPE_CHECKING:
    from indexer.engine import QueryEngine

MAX_COMPLETION_TOKENS = 4
# What the queries of one pass may hold of their full-space gradients (each is a model's worth
# of floats, twice: preconditioned and folded). One pass scores the union of its queries'
# candidates, so the fewer passes the cheaper: at 1 GiB a GPT-2-small build (85M tracked
# parameters, 680 MB a query) scored its 32 queries' candidates one query at a time. The
# main pass holds its queries' targets within the same bytes, once each.
_QUERY_TARGET_BYTES = 4 << 30
# What scoring one example in the build's main pass costs, against passing over one candidate
# apart (its forward/backward and contraction), by the index's kind: a cosine build rotates
# every example for its exact norm already and adds one product; an influence build adds the
# example's gradient and its contraction. Measured on the mid setting (RESULTS.md, "Build cost
# (issue 13)").
_MAIN_PASS_COST = {ScoreKind.COSINE: 0.5, ScoreKind.INFLUENCE: 0.6}
# Examples drawn uniformly that the first pseudo-queries are scored on apart from their
# candidates: 8 queries x 256 examples estimate the noise variance to about 3 % (its relative
# error is sqrt(2 / n)). The first queries only: where the main pass did not score the sample
# (a reused example in an incremental build, a query past its memory), a pass over candidates
# passes over it too, a forward/backward per example, once per pass.
BULK_SAMPLE = 256
BULK_QUERIES = 8


@dataclass(frozen=True)
class PseudoQuery:
    """Token ids `[prompt + completion]`; the loss covers positions `>= loss_start`; `source`:
    the id of the example it was cut from (-1: none given)."""

    token_ids: list[int]
    loss_start: int
    source: int = -1


def pseudo_query(token_ids: list[int], key: int) -> PseudoQuery | None:
    """A query cut from an example's tokens at a place chosen by `key` (None: too short):
    the prompt is at least half the example, the completion 1-4 tokens."""
    if len(token_ids) < 3:
        return None
    lowest = max(2, len(token_ids) // 2)
    completion = min(1 + key % MAX_COMPLETION_TOKENS, len(token_ids) - lowest)
    highest = len(token_ids) - completion
    cut = lowest + (key // MAX_COMPLETION_TOKENS) % (highest - lowest + 1)
    return PseudoQuery(token_ids[: cut + completion], cut)


def choose_examples(
    example_ids: np.ndarray, count: int, seed: int, purpose: str = "cal"
) -> list[int]:
    """Ids of `count` examples chosen by a hash of their ids and `purpose` (stable across
    rebuilds; another purpose draws another sample)."""
    return heapq.nsmallest(
        count, (int(i) for i in example_ids), key=lambda i: int63(purpose, seed, i)
    )


def cut_queries(
    example_ids: np.ndarray,
    count: int,
    seed: int,
    tokens_of: Callable[[list[int]], dict[int, list[int]]],
) -> list[PseudoQuery]:
    """The pseudo-queries cut from `count` of the examples (chosen by `seed`), in a fixed
    order; `tokens_of(ids)` gives those examples' token ids (staged corpus or metadata alike)."""
    chosen = choose_examples(example_ids, count, seed)
    tokens = tokens_of(chosen)
    pseudo = {i: pseudo_query(tokens[i], int63("cut", seed, i)) for i in chosen}
    return [replace(p, source=i) for i, p in pseudo.items() if p is not None]


def query_batch(queries: list[PseudoQuery], pad_id: int) -> TokenBatch:
    """The pseudo-queries as one batch, the loss on their completions."""
    return make_batch(
        [q.token_ids for q in queries], [q.loss_start for q in queries], pad_id, [0] * len(queries)
    )


def score_spaces(sketch: Curvature, capture: Capture, kind: ScoreKind) -> list[ScoreSpace]:
    """Where the index scores each query of a captured batch: its preconditioned sketch vector
    in the index's score kind, as the engine searches with it."""
    with torch.no_grad():
        vectors = sketch.vectors(capture).cpu().numpy().astype(np.float32)
    return [ScoreSpace.of(kind, vector) for vector in vectors]


def main_pass_queries(
    n_queries: int, dim: int, n_sketched: int, n_examples: int, depth: int, kind: ScoreKind
) -> int:
    """How many of `n_queries` pseudo-queries the build's main pass scores exactly, every one
    of its `n_sketched` examples, rather than the calibration's own pass, their candidates
    only (`depth` of `n_examples` each, at most): as many as their targets fit in
    `_QUERY_TARGET_BYTES` (4 bytes a coordinate of the full space's `dim`), when scoring all
    the sketched examples costs less than passing over the candidates again; otherwise none."""
    fits = min(n_queries, _QUERY_TARGET_BYTES // (4 * dim))
    candidates = min(n_examples, n_queries * depth)
    if fits == 0 or n_sketched * _MAIN_PASS_COST[ScoreKind(kind)] > candidates:
        return 0
    return fits


@dataclass
class KnownScores:
    """Exact influence of the first `len(norms)` pseudo-queries on the examples the main pass
    sketched: `read(slots) [n, Q]` by the example's place among the sketched rows, `slot [N]`
    by corpus row (-1: not sketched in this build, a reused example), and the queries' exact
    preconditioned norms `norms [Q]`."""

    read: Callable[[np.ndarray], np.ndarray]
    slot: np.ndarray
    norms: np.ndarray

    @property
    def n_queries(self) -> int:
        return len(self.norms)

    def select(self, start: int, stop: int) -> KnownScores:
        """Those of queries `start:stop` only."""
        return KnownScores(
            lambda slots: self.read(slots)[:, start:stop], self.slot, self.norms[start:stop]
        )


@dataclass
class CalibrationPairs:
    """Per pseudo-query: its candidates' sketch cosines and exact scores in cosine units,
    `[depth]` each in sketch order; and for the first `BULK_QUERIES` of them the same on the
    uniform sample of the corpus, `bulk_cosines` and `bulk_exact` `[BULK_SAMPLE]` each."""

    cosines: list[np.ndarray]
    exact: list[np.ndarray]
    bulk_cosines: list[np.ndarray]
    bulk_exact: list[np.ndarray]

    def corpus_noise(self) -> CorpusNoise | None:
        """The corpus's noise model, fitted on the uniform sample (`fit_corpus_noise`)."""
        return fit_corpus_noise(self.bulk_cosines, self.bulk_exact)

    def extend(self, other: CalibrationPairs) -> None:
        self.cosines += other.cosines
        self.exact += other.exact
        self.bulk_cosines += other.bulk_cosines
        self.bulk_exact += other.bulk_exact


@dataclass
class Calibrator:
    """What a version answers with: the build's sketcher and factors, its index and metadata."""

    sketcher: GradientSketcher
    sketch: Curvature
    reranker: ExactReranker
    index: faiss.Index
    metadata: MetadataReader
    kind: ScoreKind
    pad_id: int

    @classmethod
    def of(cls, engine: QueryEngine) -> Calibrator:
        """The calibrator of a published version, as its engine serves it (with re-rank
        factors)."""
        if engine.reranker is None:
            raise ValueError(f"version {engine.version} stores no re-rank factors")
        return cls(
            engine.sketcher, engine.curvature, engine.reranker, engine.index, engine.metadata,
            engine.info.score_kind, engine.pad_id,
        )  # fmt: skip

    def calibrate(
        self,
        example_ids: np.ndarray,
        queries: int,
        depth: int,
        quantile: float,
        seed: int,
        known: KnownScores | None = None,
    ) -> RerankBound:
        """Fit the bound on `queries` pseudo-queries and their top `depth` candidates, and the
        corpus's noise model on the uniform sample."""
        pairs = self.pairs(example_ids, queries, depth, seed, known)
        return fit_rerank_bound(pairs.cosines, pairs.exact, quantile, corpus=pairs.corpus_noise())

    def pairs(
        self,
        example_ids: np.ndarray,
        queries: int,
        depth: int,
        seed: int,
        known: KnownScores | None = None,
    ) -> CalibrationPairs:
        """Per pseudo-query cut from `queries` of the examples (chosen by `seed`): its top
        `depth` candidates' sketch cosines and exact scores in cosine units, in sketch order,
        and for the first `BULK_QUERIES` the same on `BULK_SAMPLE` examples drawn uniformly.
        `known`: the main pass's exact scores of the first queries (the rest, and the examples
        it did not sketch, are scored by passes over them)."""
        pseudo = cut_queries(example_ids, queries, seed, self._tokens)
        bulk = choose_examples(example_ids, BULK_SAMPLE, seed, purpose="bulk")
        main = 0 if known is None else known.n_queries
        per_pass = max(1, _QUERY_TARGET_BYTES // (8 * self.reranker.curvature.dim))
        pairs = CalibrationPairs([], [], [], [])
        for first, last, scored in ((0, main, known), (main, len(pseudo), None)):
            for start in range(first, last, per_pass):
                stop = min(start + per_pass, last)
                part = None if scored is None else scored.select(start, stop)
                sampled = max(0, min(stop, BULK_QUERIES) - start)
                sample = bulk if sampled else []
                pairs.extend(self._pairs(pseudo[start:stop], depth, sample, sampled, part))
        return pairs

    def _tokens(self, ids: list[int]) -> dict[int, list[int]]:
        return {i: r.token_ids for i, r in self.metadata.lookup(ids).items()}

    def _pairs(
        self,
        queries: list[PseudoQuery],
        depth: int,
        bulk: list[int],
        sampled: int,
        known: KnownScores | None,
    ) -> CalibrationPairs:
        """`pairs` of these queries, the first `sampled` of them with their pairs on the
        uniform sample's ids `bulk`; `known`: the queries' exact scores of the examples the
        main pass sketched (the other candidates and sampled examples are passed over here)."""
        batch = query_batch(queries, self.pad_id)
        capture = self.sketcher.run(batch, "data", keep_unprojected=True)
        spaces = score_spaces(self.sketch, capture, self.kind)
        search = np.stack([space.search for space in spaces])
        # the engine's scan: one pass over flat codes for all the queries, not one per query
        searcher = device_searcher(self.index, "cpu")
        scores, ids = searcher.search(search, min(depth, self.index.ntotal))
        candidates = [[int(i) for i in row if i >= 0] for row in ids]
        records = self.metadata.lookup(sorted({i for row in candidates for i in row} | set(bulk)))
        dots, query_norms = {}, None
        if known is not None:
            scored = [i for i, r in records.items() if known.slot[r.row] >= 0]
            slots = np.array([known.slot[records[i].row] for i in scored], dtype=np.int64)
            dots = dict(zip(scored, known.read(slots).astype(np.float64), strict=True))
            query_norms = known.norms
        unknown = {i: r.token_ids for i, r in records.items() if i not in dots}
        if unknown:
            with torch.no_grad():
                targets = self.reranker.targets(capture.unprojected)
            dots.update(self.reranker.dots(targets, unknown))
            query_norms = targets.norms
        exact_norms = {i: r.exact_norm for i, r in records.items()}
        found = exact_scores(dots, candidates, query_norms, exact_norms, self.kind)
        pairs = CalibrationPairs([], [], [], [])
        for q, (space, exact, row_ids) in enumerate(zip(spaces, found, candidates, strict=True)):
            norms = np.array([records[i].norm for i in row_ids], dtype=np.float64)
            pairs.cosines.append(space.cosine_units(scores[q, : len(row_ids)], norms))
            pairs.exact.append(space.cosine_units(exact.scores, norms))
        sample = exact_scores(dots, [bulk] * sampled, query_norms, exact_norms, self.kind)
        pairs.bulk_cosines, pairs.bulk_exact = self._bulk_pairs(
            queries[:sampled], spaces[:sampled], sample, bulk, records
        )
        return pairs

    def _bulk_pairs(
        self,
        queries: list[PseudoQuery],
        spaces: list[ScoreSpace],
        exact: list[ExactScores],
        bulk: list[int],
        records: dict,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query: its sketch cosines and exact scores, both in cosine units, on the sampled
        examples `bulk` but the one it was cut from (which scores as the top of its ranking,
        not as the corpus's bulk); the sketch's from the stored vectors, as the index scores
        them."""
        rows = np.array([records[i].row for i in bulk], dtype=np.int64)
        stored = StoredVectors(self.index, self.metadata, unit=self.kind == ScoreKind.COSINE)
        vectors = stored[rows].astype(np.float64)  # [len(bulk), D]
        norms = np.array([records[i].norm for i in bulk], dtype=np.float64)
        cosines, truths = [], []
        for query, space, found in zip(queries, spaces, exact, strict=True):
            kept = np.array([i != query.source for i in bulk], dtype=bool)
            cosines.append(space.cosine_units(vectors @ space.search, norms)[kept])
            truths.append(space.cosine_units(found.scores, norms)[kept])
        return cosines, truths
