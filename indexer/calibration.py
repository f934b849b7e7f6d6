"""The build's calibration of the exact stage's bound (`indexer.bound`).

Pseudo-queries are cut from corpus examples as a user's query looks: a prefix of the example
as the prompt and its next 1-4 tokens as the completion. Each is answered as the engine would
answer it, the sketch's top candidates from the version's own index then scored exactly, and
the pairs (sketch cosine, exact score in cosine units) fit the bound stored in the manifest.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from indexer.config import ScoreKind
from indexer.curvature import Curvature
from indexer.exact import ExactReranker
from indexer.hashing import int63
from indexer.scores import RerankBound, ScoreSpace, fit_rerank_bound
from indexer.sketch import GradientSketcher, make_batch
from indexer.store import MetadataReader

MAX_COMPLETION_TOKENS = 4
# What the queries of one pass may hold of their full-space gradients (each is a model's worth
# of floats, twice: preconditioned and folded). One pass scores the union of its queries'
# candidates, so the fewer passes the cheaper: at 1 GiB a GPT-2-small build (85M tracked
# parameters, 680 MB a query) scored its 32 queries' candidates one query at a time.
_QUERY_TARGET_BYTES = 4 << 30


@dataclass(frozen=True)
class PseudoQuery:
    """Token ids `[prompt + completion]`; the loss covers positions `>= loss_start`."""

    token_ids: list[int]
    loss_start: int


def pseudo_query(token_ids: list[int], key: int) -> PseudoQuery | None:
    """A query cut from an example's tokens at a place chosen by `key` (None: too short):
    the prompt is at least half the example, the completion 1-4 tokens."""
    if len(token_ids) < 3:
        return None
    completion = 1 + key % MAX_COMPLETION_TOKENS
    completion = min(completion, len(token_ids) - 2)
    lowest = max(2, len(token_ids) // 2)
    highest = len(token_ids) - completion
    cut = lowest + (key // MAX_COMPLETION_TOKENS) % (highest - lowest + 1)
    return PseudoQuery(token_ids[: cut + completion], cut)


def choose_examples(example_ids: np.ndarray, count: int, seed: int) -> list[int]:
    """Ids of `count` examples chosen by a hash of their ids (stable across rebuilds)."""
    return heapq.nsmallest(
        count, (int(i) for i in example_ids), key=lambda i: int63("cal", seed, i)
    )


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

    def calibrate(
        self, example_ids: np.ndarray, queries: int, depth: int, quantile: float, seed: int
    ) -> RerankBound:
        """Fit the bound on `queries` pseudo-queries and their top `depth` candidates."""
        cosines, exact = self.pairs(example_ids, queries, depth, seed)
        return fit_rerank_bound(cosines, exact, quantile)

    def pairs(
        self, example_ids: np.ndarray, queries: int, depth: int, seed: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per pseudo-query cut from `queries` of the examples (chosen by `seed`): its top
        `depth` candidates' sketch cosines and exact scores in cosine units, in sketch order."""
        chosen = choose_examples(example_ids, queries, seed)
        records = self.metadata.lookup(chosen)
        pseudo = [pseudo_query(records[i].token_ids, int63("cut", seed, i)) for i in chosen]
        pseudo = [p for p in pseudo if p is not None]
        per_pass = max(1, _QUERY_TARGET_BYTES // (8 * self.reranker.curvature.dim))
        cosines, exact = [], []
        for start in range(0, len(pseudo), per_pass):
            x, y = self._pairs(pseudo[start : start + per_pass], depth)
            cosines += x
            exact += y
        return cosines, exact

    def _pairs(
        self, queries: list[PseudoQuery], depth: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query: its candidates' sketch cosines and exact scores in cosine units, both
        `[depth]`, in sketch order."""
        batch = make_batch(
            [q.token_ids for q in queries],
            [q.loss_start for q in queries],
            self.pad_id,
            [0] * len(queries),
        )
        capture = self.sketcher.run(batch, "data", keep_unprojected=True)
        with torch.no_grad():
            q = self.sketch.vectors(capture).cpu().numpy().astype(np.float32)
            targets = self.reranker.targets(capture.unprojected)
        spaces = [ScoreSpace.of(self.kind, vector) for vector in q]
        search = np.stack([space.search for space in spaces])
        scores, ids = self.index.search(search, min(depth, self.index.ntotal))
        candidates = [[int(i) for i in row if i >= 0] for row in ids]
        records = self.metadata.lookup(sorted({i for row in candidates for i in row}))
        exact = self.reranker.score(
            targets,
            candidates,
            {i: r.token_ids for i, r in records.items()},
            {i: r.exact_norm for i, r in records.items()},
            self.kind,
        )
        cosines, exact_units = [], []
        for space, found, row_scores, row_ids in zip(
            spaces, exact, scores, candidates, strict=True
        ):
            norms = np.array([records[i].norm for i in row_ids], dtype=np.float64)
            scale = space.cosine_scale(norms)
            exact_scores = found.influence if found.cosine is None else found.cosine
            cosines.append(row_scores[: len(row_ids)] / scale)
            exact_units.append(exact_scores / scale)
        return cosines, exact_units
