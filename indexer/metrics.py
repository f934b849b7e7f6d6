"""Ranking metrics for evaluating influence scores: pure functions on scores and rankings.

Conventions: a *ranking* is a sequence of item ids, best first. Example-level scores are arrays
`[N]` indexed by example row. Documents may be split into several chunks (examples); a document
ranks by its best chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the `k` highest `scores [N]`, best first; ties go to the lower row (stable)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order[:k]


def recall_curve(
    reference: np.ndarray, predicted: Sequence[int], ks: Sequence[int], rtol: float = 1e-5
) -> list[float]:
    """For each k: the fraction of the reference's top k that the predicted first k rows hold.

    `reference [N]` scores every row; `predicted` ranks rows, best first. Ties are honoured: a
    predicted row counts when its reference score reaches the k-th best score (within `rtol`,
    relative), so any of several equally scored rows (e.g. duplicate texts) is a hit. Without
    ties this is `|top_k(reference) ∩ predicted[:k]| / k`.
    """
    reference = np.asarray(reference, dtype=np.float64)
    best = np.sort(reference)[::-1]
    predicted_scores = reference[np.asarray(list(predicted), dtype=np.int64)]
    recalls = []
    for k in ks:
        k = min(k, len(reference))
        threshold = best[k - 1] - rtol * abs(best[k - 1])
        recalls.append(float(np.count_nonzero(predicted_scores[:k] >= threshold)) / k)
    return recalls


def top_k_recall(reference: np.ndarray, predicted: Sequence[int], k: int) -> float:
    """Recall of the reference's top k within the predicted first k (see `recall_curve`).

    With `reference` = exact scores and `predicted` = the index's ranking, this is the "recall
    of the exact top-k within the index's top-k".
    """
    return recall_curve(reference, predicted, [k])[0]


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
    from scipy.stats import spearmanr  # the `eval` extra; the serving install leaves it out

    return float(spearmanr(a, b).statistic)


def relative_squared_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared error of `estimate [N]` against `reference [N]` over the reference's
    variance: 0 exact, 1 no better than the reference's mean everywhere; NaN for a constant
    reference."""
    reference = np.asarray(reference, dtype=np.float64)
    spread = reference.var()
    if spread == 0:
        return math.nan
    return float(np.mean((np.asarray(estimate, dtype=np.float64) - reference) ** 2) / spread)


def mean(values: Iterable[float]) -> float:
    """Mean ignoring NaN (undefined per-query values); NaN when nothing is defined."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
