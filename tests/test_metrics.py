"""Ranking metrics on hand-made rankings with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexer import metrics


def test_top_k_is_best_first_and_breaks_ties_by_row():
    assert metrics.top_k(np.array([0.5, 2.0, 2.0, -1.0]), 3).tolist() == [1, 2, 0]


@pytest.mark.parametrize(("k", "expected"), [(1, 0.0), (2, 0.5), (3, 2 / 3), (4, 0.5)])
def test_top_k_recall(k, expected):
    # reference ranking: rows 5, 3, 9, 1, then the rest
    reference = np.zeros(10)
    reference[[5, 3, 9, 1]] = [4.0, 3.0, 2.0, 1.0]
    predicted = [3, 7, 5, 8]
    assert metrics.top_k_recall(reference, predicted, k) == pytest.approx(expected)


def test_top_k_recall_counts_any_of_tied_rows():
    reference = np.array([5.0, 4.0, 3.0, 3.0, 1.0])  # rows 2 and 3 tie for third place
    assert metrics.top_k_recall(reference, [1, 3, 0], 3) == 1.0
    assert metrics.top_k_recall(reference, [0, 3, 4], 3) == pytest.approx(2 / 3)
    assert metrics.top_k_recall(reference, [4], 3) == 0.0


def test_recall_curve_and_short_predictions():
    reference = np.array([0.1, 0.9, 0.5, 0.7])  # best first: rows 1, 3, 2, 0
    assert metrics.recall_curve(reference, [1, 2, 3, 0], [1, 2, 3, 4]) == [1.0, 0.5, 1.0, 1.0]
    assert metrics.top_k_recall(reference, [3], 2) == 0.5
    assert metrics.top_k_recall(reference, [1, 3], 10) == 0.5  # k is capped at N = 4


def test_documents_rank_by_their_best_chunk():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    ranking = metrics.document_ranking(scores, ["a", "b", "a", "c"])
    assert ranking == ["b", "c", "a"]
    assert metrics.rank_documents(["x", "y", "x", "z", "y"]) == ["x", "y", "z"]


def test_first_gold_rank_recall_and_reciprocal_rank():
    ranking = ["b", "c", "a", "d"]
    rank = metrics.first_gold_rank(ranking, {"a", "d"})
    assert rank == 3
    assert metrics.recall_at_k(rank, 1) == 0.0
    assert metrics.recall_at_k(rank, 3) == 1.0
    assert metrics.reciprocal_rank(rank) == pytest.approx(1 / 3)
    missing = metrics.first_gold_rank(ranking, {"zz"})
    assert missing is None
    assert metrics.recall_at_k(missing, 10) == 0.0
    assert metrics.reciprocal_rank(missing) == 0.0


def test_mean_reciprocal_rank_over_queries():
    ranks = [1, 3, None]
    mrr = metrics.mean(metrics.reciprocal_rank(r) for r in ranks)
    assert mrr == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_spearman_with_ties_uses_average_ranks():
    # ranks of a: [1, 2.5, 2.5, 4]; of b: [1, 3, 2, 4] -> Pearson of ranks = 4.5 / sqrt(4.5 * 5)
    a = np.array([1.0, 2.0, 2.0, 3.0])
    b = np.array([10.0, 30.0, 20.0, 40.0])
    assert metrics.spearman(a, b) == pytest.approx(3 / math.sqrt(10))


def test_spearman_ties_on_both_sides_can_cancel():
    assert metrics.spearman(np.array([1, 1, 2, 2]), np.array([1, 2, 1, 2])) == pytest.approx(0.0)


def test_spearman_is_rank_based():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert metrics.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert metrics.spearman(a, -(a**3)) == pytest.approx(-1.0)


def test_spearman_of_a_constant_is_undefined():
    assert math.isnan(metrics.spearman(np.ones(4), np.arange(4.0)))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.spearman(np.ones(3), np.ones(4))


def test_mean_ignores_undefined_values():
    assert metrics.mean([1.0, math.nan, 0.0]) == 0.5
    assert math.isnan(metrics.mean([math.nan]))


def test_relative_squared_error_is_zero_exact_and_one_for_the_mean():
    reference = np.array([1.0, 2.0, 3.0, 6.0])  # mean 3, variance 3.5
    assert metrics.relative_squared_error(reference, reference) == 0.0
    assert metrics.relative_squared_error(np.full(4, 3.0), reference) == pytest.approx(1.0)
    assert metrics.relative_squared_error(reference + 1, reference) == pytest.approx(1 / 3.5)
    assert math.isnan(metrics.relative_squared_error(reference, np.ones(4)))
