"""Ranking metrics for evaluating influence scores: pure functions on scores and rankings.

Conventions: a *ranking* is a sequence of item ids, best first. Example-level scores are arrays
`[N]` indexed by example row. Documents may be split into several chunks (examples); a document
ranks by its best chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import spearmanr


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the `k` highest `scores [N]`, best first; ties go to the lower row (stable)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order[:k]


def top_k_recall(reference: Sequence[int], predicted: Sequence[int], k: int) -> float:
    """Fraction of the reference's first `k` items found among the predicted first `k`.

    With `reference` = exact top rows and `predicted` = the index's top rows, this is the
    "recall of the exact top-k within the index's top-k". A reference shorter than `k` is
    judged on the items it has; an empty one gives NaN.
    """
    wanted = set(list(reference)[:k])
    if not wanted:
        return math.nan
    return len(wanted & set(list(predicted)[:k])) / len(wanted)


def rank_documents(ranked_doc_ids: Iterable[str]) -> list[str]:
    """Documents in the order of their best chunk: `[doc of chunk 1, doc of chunk 2, ...]` with
    repeats dropped."""
    return list(dict.fromkeys(ranked_doc_ids))


def document_ranking(scores: np.ndarray, doc_ids: Sequence[str]) -> list[str]:
    """All documents ranked by their best chunk's score; `scores [N]` and `doc_ids [N]` by row."""
    return rank_documents(doc_ids[row] for row in top_k(scores, len(scores)))


def first_gold_rank(ranked_docs: Sequence[str], gold: Iterable[str]) -> int | None:
    """1-based rank of the first gold document in `ranked_docs`; None when none is ranked."""
    wanted = set(gold)
    for rank, doc in enumerate(ranked_docs, start=1):
        if doc in wanted:
            return rank
    return None


def recall_at_k(first_rank: int | None, k: int) -> float:
    """1.0 when the first gold document is within the top `k` documents, else 0.0."""
    return float(first_rank is not None and first_rank <= k)


def reciprocal_rank(first_rank: int | None) -> float:
    """`1 / rank` of the first gold document (0 when it was not retrieved); averaged -> MRR."""
    return 0.0 if first_rank is None else 1.0 / first_rank


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of `a [N]` and `b [N]`; ties get their average rank.

    NaN when either side is constant (the correlation is undefined).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal shapes, got {a.shape} and {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def mean(values: Iterable[float]) -> float:
    """Mean ignoring NaN (undefined per-query values); NaN when nothing is defined."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
