"""The exact stage's bound and its early stop, on synthetic scores (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.config import CalibrationConfig, ScoreKind
from indexer.exact import ExactScores
from indexer.rerank import (
    CandidateList,
    SecondsPerCandidate,
    StopReason,
    run_exact_stage,
)
from indexer.scores import CorpusNoise, fit_corpus_noise, fit_rerank_bound


def test_the_bound_fits_the_line_and_the_residual_quantile_per_band() -> None:
    rng = np.random.default_rng(0)
    cosines, exact = [], []
    for _ in range(40):
        x = np.sort(rng.uniform(0, 0.5, 100))[::-1]
        noise = rng.normal(0, 0.01, 100) * np.where(np.arange(100) < 16, 3.0, 1.0)
        cosines.append(x)
        exact.append(2 * x + 0.1 + noise)
    bound = fit_rerank_bound(cosines, exact, quantile=0.9, rank_edges=(0, 16, 64, 128))
    assert bound.slope == pytest.approx(2, abs=0.02)
    assert bound.intercept == pytest.approx(0.1, abs=0.01)
    # Gaussian 0.9 quantile: 1.28 sigma; the top band's sigma is three times the others'.
    assert bound.residuals[0] == pytest.approx(1.28 * 0.03, rel=0.2)
    assert bound.residuals[1] == pytest.approx(1.28 * 0.01, rel=0.2)
    assert bound.residuals[3] == bound.residuals[2]  # no pair reaches rank 128
    assert (bound.n_queries, bound.n_pairs) == (40, 4000)
    x = np.array([0.3, 0.3])
    upper = bound.upper(x, np.array([0, 20]))
    assert upper[0] - upper[1] == pytest.approx(bound.residuals[0] - bound.residuals[1])


def test_corpus_estimates_shrink_each_query_by_the_share_of_its_spread_that_is_noise() -> None:
    cosines = np.array([[0.1, 0.3, 0.2], [0.01, 0.03, 0.02]])
    line = fit_rerank_bound([cosines[0]], [cosines[0]], quantile=0.9)
    assert line.noise_variance is None
    np.testing.assert_allclose(line.corpus_estimates(cosines), line.estimate(cosines))
    corpus = CorpusNoise(scale=2.0, offset=0.5, variance=0.0025)
    bound = fit_rerank_bound([cosines[0]], [cosines[0]], quantile=0.9, corpus=corpus)
    # query 0: mean 0.2, variance 0.02/3, so the signal is 1 - 0.0025 * 3 / 0.02 = 0.625 of it;
    # query 1's whole spread (variance 0.0002/3) is under the noise: every estimate its mean.
    # Both then in exact units: twice the sketch's, plus the offset.
    expected = 2 * np.array([[0.2 - 0.0625, 0.2 + 0.0625, 0.2], [0.02, 0.02, 0.02]]) + 0.5
    np.testing.assert_allclose(bound.corpus_estimates(cosines), expected)


def test_the_corpus_noise_is_the_regression_of_sketch_on_exact_cosines() -> None:
    rng = np.random.default_rng(2)
    exact = [rng.normal(q, 0.05, 400) for q in (0.0, 1.0, 2.0)]  # per-query offsets drop out
    sketch = [e / 4 - 0.25 + rng.normal(0, 0.01, e.size) for e in exact]  # y = 4x + 1
    corpus = fit_corpus_noise(sketch, exact)
    assert corpus.scale == pytest.approx(4, rel=0.05)
    assert corpus.offset == pytest.approx(1, abs=0.02)
    assert corpus.variance == pytest.approx(0.01**2, rel=0.15)
    assert fit_corpus_noise([rng.normal(0, 1, 50)], [np.zeros(50)]) is None  # no relation
    assert fit_corpus_noise([np.array([np.nan, 1.0])], [np.array([0.0, 1.0])]) is None
    assert fit_corpus_noise([], []) is None


def test_corpus_estimates_are_closer_to_exact_than_the_candidates_line() -> None:
    """The line is fitted on the top of each ranking, where the sketch's noise lifted the
    candidates (a winner's curse) and the scores are large, and so overstates the many small
    scores of the rest of the corpus; the corpus's own noise model, fitted on a uniform sample,
    is the least-squares estimate there."""
    rng = np.random.default_rng(1)
    # most examples barely matter to a query, a few (2 %) much: the top is signal, the bulk
    # mostly noise, as gradient similarities are; the sketch's units are a third of exact's
    exact = rng.normal(0, 0.004, (40, 5000))
    strong = rng.random(exact.shape) < 0.02
    exact[strong] = rng.uniform(0.02, 0.3, strong.sum())
    sketch = exact / 3 + rng.normal(0, 0.0025, exact.shape)
    order = np.argsort(-sketch, axis=1)[:, :200]
    cosines = [s[o] for s, o in zip(sketch, order, strict=True)]
    exact_top = [e[o] for e, o in zip(exact, order, strict=True)]
    sample = rng.choice(5000, 256, replace=False)
    corpus = fit_corpus_noise(list(sketch[:8, sample]), list(exact[:8, sample]))
    bound = fit_rerank_bound(cosines, exact_top, quantile=0.99, corpus=corpus)
    line_error = np.mean((bound.estimate(sketch) - exact) ** 2)
    corpus_error = np.mean((bound.corpus_estimates(sketch) - exact) ** 2)
    scaled_error = np.mean((3 * sketch - exact) ** 2)  # the sketch in exact's units, unshrunk
    assert corpus_error < 0.95 * scaled_error
    assert corpus_error < 0.5 * line_error


def test_the_quantile_defaults_by_score_kind_unless_asked() -> None:
    default = CalibrationConfig()
    assert default.quantile_for(ScoreKind.COSINE) == 0.99
    assert default.quantile_for(ScoreKind.INFLUENCE) == 0.995  # its sketch tracks more loosely
    asked = CalibrationConfig(quantile=0.9)
    assert {asked.quantile_for(kind) for kind in ScoreKind} == {0.9}


class _Scores:
    """Exact scores from a table; records what each call scored."""

    def __init__(self, table: dict[int, float]) -> None:
        self.table = table
        self.calls: list[list[list[int]]] = []

    def __call__(self, wanted: dict[int, list[int]]) -> list[ExactScores]:
        self.calls.append(list(wanted.values()))
        return [ExactScores(np.array([self.table[i] for i in ids])) for ids in wanted.values()]


def _candidates(exact: np.ndarray, slack: float, top_k: int, **kw) -> CandidateList:
    """Candidates in sketch order whose estimates are off by at most `slack`."""
    estimates = exact + np.linspace(-slack, slack, len(exact))[::-1]
    order = np.argsort(-estimates, kind="stable")
    ids = [int(i) for i in order]
    return CandidateList(ids, estimates[order], estimates[order] + slack, top_k, **kw)


def test_the_stage_stops_once_no_remaining_candidate_can_enter_the_top_k() -> None:
    exact = np.linspace(1.0, 0.0, 200)
    scores = _Scores(dict(enumerate(exact)))
    candidates = _candidates(exact, slack=0.05, top_k=10)
    (result,) = run_exact_stage([candidates], scores, 16, SecondsPerCandidate())
    assert result.stop == StopReason.CERTAIN
    assert len(result.ids) < 200
    top = [result.ids[i] for i in np.argsort(-result.scores)[:10]]
    assert top == list(range(10))  # the exact top-10 of all 200


def test_without_a_usable_bound_every_candidate_is_re_ranked() -> None:
    exact = np.linspace(1.0, 0.0, 50)
    scores = _Scores(dict(enumerate(exact)))
    candidates = _candidates(exact, slack=0.05, top_k=10)
    candidates.upper[:] = np.inf
    (result,) = run_exact_stage([candidates], scores, 16, SecondsPerCandidate())
    assert result.stop == StopReason.DEPTH
    assert sorted(result.ids) == list(range(50))


def test_queries_of_a_batch_share_each_round_and_stop_on_their_own() -> None:
    exact = np.linspace(1.0, 0.0, 100)
    scores = _Scores(dict(enumerate(exact)))
    sure = _candidates(exact, slack=0.01, top_k=5)
    unsure = _candidates(exact, slack=0.01, top_k=5)
    unsure.upper[:] = np.inf
    sure_result, unsure_result = run_exact_stage([sure, unsure], scores, 16, SecondsPerCandidate())
    assert sure_result.stop == StopReason.CERTAIN and unsure_result.stop == StopReason.DEPTH
    assert len(scores.calls[0]) == 2  # one call scores both queries' first chunks
    assert all(len(call) == 1 for call in scores.calls[len(sure_result.ids) // 16 :])


def test_a_round_that_would_miss_the_deadline_is_not_started() -> None:
    exact = np.linspace(1.0, 0.0, 100)
    scores = _Scores(dict(enumerate(exact)))
    now = [0.0]

    def clock() -> float:
        now[0] += 0.5  # each reading half a second later: a round costs 0.5 s
        return now[0]

    candidates = _candidates(exact, slack=0.01, top_k=5, deadline=1.2)
    candidates.upper[:] = np.inf
    cost = SecondsPerCandidate()
    (result,) = run_exact_stage([candidates], scores, 16, cost, clock=clock)
    assert result.stop == StopReason.DEADLINE
    assert len(result.ids) == 16  # the first round ran; the second would have ended at 1.5 s
    expired = _candidates(exact, slack=0.01, top_k=5, deadline=0.0)
    (nothing,) = run_exact_stage([expired], scores, 16, cost, clock=clock)
    assert nothing.stop == StopReason.DEADLINE and nothing.ids == []
