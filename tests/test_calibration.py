"""The calibration's exact scores taken from the build's main pass: the same scores, and the
same bound, as the calibration's own pass over the candidates (`ExactReranker.score`) gives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import indexer.calibration
from indexer.build import build_index
from indexer.calibration import (
    BULK_QUERIES,
    MAX_COMPLETION_TOKENS,
    CalibrationPairs,
    Calibrator,
    main_pass_queries,
    pseudo_query,
)
from indexer.config import CalibrationConfig, ScoreKind
from indexer.engine import QueryEngine
from indexer.exact import ExactReranker
from indexer.model import load_model, module_shape, tracked_modules
from indexer.scores import RerankBound, fit_rerank_bound
from tests.test_build import tiny_config


@dataclass
class Recorded:
    """A build's published root, the pairs its calibration fitted on, and the examples each
    of its passes over candidates scored (none when the main pass scored every one)."""

    root: Path
    pairs: CalibrationPairs
    passes: list[int]


def recorded_build(config, patch: pytest.MonkeyPatch) -> Recorded:
    """Build `config`, recording what its calibration did."""
    pairs, passes = [], []
    calibrator_pairs, reranker_dots = Calibrator.pairs, ExactReranker.dots

    def recording_pairs(self, *args, **kwargs) -> CalibrationPairs:
        pairs.append(calibrator_pairs(self, *args, **kwargs))
        return pairs[-1]

    def recording_dots(self, targets, tokens):
        passes.append(len(tokens))
        return reranker_dots(self, targets, tokens)

    patch.setattr(Calibrator, "pairs", recording_pairs)
    patch.setattr(ExactReranker, "dots", recording_dots)
    build_index(config)
    (found,) = pairs
    return Recorded(config.out, found, passes)


def separate_pass_pairs(engine: QueryEngine) -> CalibrationPairs:
    """The published version's calibration pairs, every candidate scored by passes over the
    candidates (`ExactReranker.score`), as builds calibrated before the main pass did."""
    calibrator = Calibrator.of(engine)
    ids = engine.metadata.ids_and_norms(np.arange(engine.info.n_examples))[0]
    calibration = CalibrationConfig()
    return calibrator.pairs(
        ids, calibration.queries, calibration.depth, engine.manifest.sketch.seed
    )


def assert_same_bound(found: RerankBound, expected: RerankBound) -> None:
    assert (found.n_queries, found.n_pairs, found.quantile) == (
        expected.n_queries,
        expected.n_pairs,
        expected.quantile,
    )
    assert found.rank_edges == expected.rank_edges
    np.testing.assert_allclose(found.slope, expected.slope, rtol=1e-4)
    np.testing.assert_allclose(found.intercept, expected.intercept, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(found.residuals, expected.residuals, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(found.corpus_scale, expected.corpus_scale, rtol=1e-3)
    np.testing.assert_allclose(found.corpus_offset, expected.corpus_offset, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(found.noise_variance, expected.noise_variance, rtol=1e-3)


def assert_bound_of_separate_passes(root: Path) -> None:
    """The version's bound is the one its pairs, scored by passes over the candidates, fit."""
    engine = QueryEngine.open(root)
    try:
        pairs = separate_pass_pairs(engine)
        bound = engine.manifest.rerank_bound
        expected = fit_rerank_bound(
            pairs.cosines, pairs.exact, bound.quantile, corpus=pairs.corpus_noise()
        )
        assert_same_bound(bound, expected)
    finally:
        engine.close()


@pytest.fixture(scope="module", params=list(ScoreKind))
def built(request, tmp_path_factory, tiny_model_dir, small_corpus_path) -> Recorded:
    root = tmp_path_factory.mktemp(f"calibration-{request.param}")
    config = tiny_config(tiny_model_dir, small_corpus_path, root, score=request.param)
    with pytest.MonkeyPatch.context() as patch:
        return recorded_build(config, patch)


def test_the_main_pass_gives_the_exact_scores_of_the_candidates(built: Recorded) -> None:
    assert built.passes == []  # no pass over candidates: the main pass scored them all
    engine = QueryEngine.open(built.root)
    try:
        separate = separate_pass_pairs(engine)
    finally:
        engine.close()
    assert len(separate.exact) == CalibrationConfig().queries
    # The same candidates (sketch cosines to float noise) and their exact scores, and the
    # same on the uniform sample (the small corpus's every example but the query's own).
    n_examples = engine.info.n_examples
    assert [len(x) for x in separate.bulk_exact] == [n_examples - 1] * BULK_QUERIES
    for field in ("cosines", "exact", "bulk_cosines", "bulk_exact"):
        for found, expected in zip(
            getattr(built.pairs, field), getattr(separate, field), strict=True
        ):
            tolerance = 1e-6 * np.abs(expected).max()
            np.testing.assert_allclose(found, expected, rtol=1e-4, atol=tolerance)


def test_the_bound_is_the_one_passes_over_the_candidates_fit(built: Recorded) -> None:
    assert_bound_of_separate_passes(built.root)


def test_queries_past_the_memory_limit_are_scored_apart(
    tmp_path, tiny_model_dir, small_corpus_path
) -> None:
    """With room for 10 queries' targets, the main pass scores those and passes over the
    candidates score the other 22 (5 queries a pass: their folded targets take twice the
    room); the bound is the same."""
    config = tiny_config(tiny_model_dir, small_corpus_path, tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        dim = _full_dim(tiny_model_dir)
        patch.setattr(indexer.calibration, "_QUERY_TARGET_BYTES", 4 * dim * 10)
        recorded = recorded_build(config, patch)
    assert len(recorded.passes) == 5  # 22 queries, 5 a pass
    assert_bound_of_separate_passes(tmp_path)


def _full_dim(model_dir: Path) -> int:
    """The full space's dimension of the model's tracked modules (bias columns included)."""
    modules = tracked_modules(load_model(model_dir).model, None)
    return sum(s.d_out * s.d_in for s in map(module_shape, modules.values()))


def test_the_main_pass_scores_only_what_it_can_hold_and_what_pays() -> None:
    dim = 1000
    room = indexer.calibration._QUERY_TARGET_BYTES // (4 * dim)
    assert main_pass_queries(32, dim, 3000, 3000, 200, ScoreKind.COSINE) == 32
    assert main_pass_queries(room + 5, dim, 3000, 3000, 200, ScoreKind.COSINE) == room
    huge = indexer.calibration._QUERY_TARGET_BYTES // 4 + 1
    assert main_pass_queries(32, huge, 3000, 3000, 200, ScoreKind.COSINE) == 0
    # Twenty million examples: passing over the 6,400 candidates costs less.
    assert main_pass_queries(32, dim, 20_000_000, 20_000_000, 200, ScoreKind.INFLUENCE) == 0
    # An incremental build sketching a few examples of many scores them in the main pass.
    assert main_pass_queries(32, dim, 100, 20_000_000, 200, ScoreKind.INFLUENCE) == 32


@pytest.mark.parametrize("length", range(3, 40))
def test_a_pseudo_query_fits_every_example_length(length: int) -> None:
    """The prompt is at least half the example (and 2 tokens), the completion 1-4 tokens."""
    for key in range(8 * MAX_COMPLETION_TOKENS):
        query = pseudo_query(list(range(length)), key)
        completion = len(query.token_ids) - query.loss_start
        assert query.loss_start >= max(2, length // 2)
        assert 1 <= completion <= MAX_COMPLETION_TOKENS and len(query.token_ids) <= length
