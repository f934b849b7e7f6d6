"""Exact re-ranking: the returned scores are the exact EK-FAC scorer's, and bad requests are
refused with the limit or the build flag they need."""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.baselines import ScoreTarget, stream_scores
from indexer.build import build_index
from indexer.calibration import Calibrator
from indexer.config import CalibrationConfig, ScoreKind
from indexer.curvature import Curvature
from indexer.engine import EngineOptions, QueryEngine
from indexer.errors import InvalidInputError, PreconditionError
from indexer.evaluate import matching_corpus
from indexer.exact import ExactConfig, ExactScorer
from indexer.manifest import FULL_CURVATURE_FILE
from indexer.query import Query, query_vectors
from indexer.rerank import StopReason
from tests.test_build import tiny_config

QUERY = Query("The market", " was busy", top_k=5)


@pytest.fixture(scope="module", params=list(ScoreKind))
def root(request, tmp_path_factory, tiny_model_dir, small_corpus_path) -> Path:
    root = tmp_path_factory.mktemp(f"rerank-{request.param}")
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root, score=request.param))
    return root


@pytest.fixture(scope="module")
def engine(root: Path) -> QueryEngine:
    """Re-ranks every candidate (no early stop): its scores are exact EK-FAC's to compare."""
    engine = QueryEngine.open(root, options=EngineOptions(rerank_early_stop=False))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def early(root: Path) -> QueryEngine:
    """Stops re-ranking once the top-k is settled within the version's calibrated bound."""
    engine = QueryEngine.open(root)
    yield engine
    engine.close()


def exact_scores(engine: QueryEngine, query: Query) -> np.ndarray:
    """Exact scores `[N]` by corpus row, in the index's kind, from the version's full factors."""
    examples = matching_corpus(engine, None)
    full = Curvature.load(engine.path / FULL_CURVATURE_FILE)
    config = ExactConfig(
        curvature=engine.manifest.curvature, modules=engine.manifest.sketch.modules
    )
    scorer = ExactScorer(engine.loaded, examples, config, curvature=full)
    tokenized = engine.prepare(replace(query, rerank_depth=0))
    vectors = query_vectors(scorer.sketcher, full, [tokenized], engine.pad_id)
    streamed = stream_scores(scorer.pass_, {"exact": ScoreTarget(full.vectors, vectors)}, "exact")
    streamed = streamed["exact"]
    if engine.info.score_kind == ScoreKind.INFLUENCE:
        return streamed.dots[0]
    return streamed.cosine(vectors.double().norm(dim=1).numpy())[0]


def test_reranked_scores_are_the_exact_scorers(engine: QueryEngine) -> None:
    n = engine.info.n_examples
    (result,) = engine.query([replace(QUERY, rerank_depth=n)])
    reference = exact_scores(engine, QUERY)
    rows = {
        r.example_id: r.row
        for r in engine.metadata.lookup([h.example_id for h in result.hits]).values()
    }
    assert all(hit.exact for hit in result.hits)
    returned = np.array([hit.score for hit in result.hits])
    expected = reference[[rows[hit.example_id] for hit in result.hits]]
    np.testing.assert_allclose(returned, expected, rtol=1e-3, atol=1e-6 * np.abs(reference).max())
    # With every example a candidate, the answer is exact EK-FAC's own top k.
    np.testing.assert_allclose(returned, np.sort(reference)[::-1][: QUERY.top_k], rtol=1e-3)


def test_the_exact_stage_stops_once_sure_and_says_so(early: QueryEngine) -> None:
    n = early.info.n_examples
    (result,) = early.query([replace(QUERY, rerank_depth=n)])
    assert result.rerank_stop == StopReason.CERTAIN
    assert QUERY.top_k <= result.candidates_reranked < n
    assert all(hit.exact for hit in result.hits)
    reference = exact_scores(early, QUERY)
    rows = {
        r.example_id: r.row
        for r in early.metadata.lookup([h.example_id for h in result.hits]).values()
    }
    returned = np.array([hit.score for hit in result.hits])
    np.testing.assert_allclose(
        returned,
        reference[[rows[h.example_id] for h in result.hits]],
        rtol=1e-3,
        atol=1e-6 * np.abs(reference).max(),
    )
    assert list(returned) == sorted(returned, reverse=True)


def test_the_calibrated_bound_holds_for_queries_it_was_not_fitted_on(early: QueryEngine) -> None:
    bound = early.manifest.rerank_bound
    assert bound is not None and bound.n_queries == CalibrationConfig().queries
    assert bound.quantile == CalibrationConfig().quantile_for(early.info.score_kind)
    calibrator = Calibrator(
        early.sketcher, early.curvature, early.reranker, early.index, early.metadata,
        early.info.score_kind, early.pad_id,
    )  # fmt: skip
    ids = early.metadata.ids_and_norms(np.arange(early.info.n_examples))[0]
    pairs = calibrator.pairs(ids, queries=32, depth=200, seed=12345)
    over = [
        y > bound.upper(x, np.arange(len(x)))
        for x, y in zip(pairs.cosines, pairs.exact, strict=True)
    ]
    assert np.concatenate(over).mean() <= 3 * (1 - bound.quantile)


def test_a_due_deadline_gets_the_sketch_answer_marked_as_estimates(early: QueryEngine) -> None:
    (tokenized,) = [early.prepare(replace(QUERY, rerank_depth=50))]
    (result,) = early.answer([tokenized], deadlines=[time.monotonic()])
    assert result.rerank_stop == StopReason.DEADLINE and result.candidates_reranked == 0
    assert len(result.hits) == QUERY.top_k and not any(hit.exact for hit in result.hits)
    (sketch,) = early.query([replace(QUERY, rerank_depth=0)])
    assert [h.example_id for h in result.hits] == [h.example_id for h in sketch.hits]


def test_a_deadline_ranks_what_it_did_not_reach_by_calibrated_estimates(
    early: QueryEngine,
) -> None:
    """Exact scores and the sketch's are on different scales (a cosine index's calibrated
    slope is about 0.4): an answer cut short by its deadline mixes exact hits with candidates it
    did not reach, so those rank by the bound's line, the exact scores' expected value."""
    bound = early.manifest.rerank_bound
    tokenized = early.prepare(replace(QUERY, rerank_depth=50))
    (result,) = early.answer([tokenized], deadlines=[time.monotonic()])
    (sketch,) = early.query([replace(QUERY, top_k=50, rerank_depth=0)])
    sketched = {h.example_id: h for h in sketch.hits}
    for hit in result.hits:
        cosine, influence = sketched[hit.example_id].cosine, sketched[hit.example_id].influence
        scale = 1.0 if early.info.score_kind == ScoreKind.COSINE else influence / cosine
        assert hit.score == pytest.approx(bound.estimate(np.array(cosine)) * scale, rel=1e-5)
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)


@pytest.mark.parametrize("kind", list(ScoreKind))
def test_an_example_without_a_gradient_scores_zero_and_leaves_the_bound_sound(
    tmp_path: Path, tiny_model_dir: Path, small_corpus_path: Path, kind: ScoreKind
) -> None:
    """A one-token example (no prefix token: nothing to predict) has norm 0, but its 8-bit code
    decodes to noise: its cosine was that noise over 1e-30, and such pairs broke the build's fit
    of the bound (a slope of -2e-30); a deadline's estimate of it was the bound's intercept."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(small_corpus_path.read_text() + '{"id": "one-token", "text": "The"}\n')
    config = tiny_config(tiny_model_dir, corpus, tmp_path / "root", score=kind)
    build_index(replace(config, corpus=replace(config.corpus, prefix_tokens=())))
    with closing(QueryEngine.open(tmp_path / "root")) as engine:
        (record,) = [r for r in engine.metadata.lookup(
            engine.metadata.ids_and_norms(np.arange(engine.info.n_examples))[0].tolist()
        ).values() if r.doc_id == "one-token"]  # fmt: skip
        assert len(record.token_ids) == 1 and record.norm == 0
        assert engine.manifest.rerank_bound.slope > 0
        every = replace(QUERY, top_k=engine.info.n_examples)
        (result,) = engine.query([replace(every, rerank_depth=0)])
        tokenized = engine.prepare(replace(every, rerank_depth=engine.info.n_examples))
        (due,) = engine.answer([tokenized], deadlines=[time.monotonic()])
        for answer in (result, due):
            (hit,) = [h for h in answer.hits if h.example_id == record.example_id]
            assert hit.score == hit.influence == hit.cosine == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 0}, "top_k must be at least 1, got 0"),
        ({"top_k": -1}, "top_k must be at least 1, got -1"),
        ({"rerank_depth": -5}, "rerank_depth must be 0 or more, got -5"),
        ({"lexical_candidates": -1}, "lexical_candidates must be 0 or more, got -1"),
        ({"prompt": "The \ud800 market"}, "prompt is not valid Unicode text"),
    ],
)
def test_a_library_query_with_bad_counts_or_text_names_the_field(
    early: QueryEngine, change: dict, message: str
) -> None:
    """The server checks top_k itself; a library caller (eval, a notebook) got 0 hits after a
    whole exact stage for top_k 0, N−1 hits for top_k −1, and a TypeError for a surrogate."""
    with pytest.raises(InvalidInputError, match=message):
        early.query([replace(QUERY, **change)])


def test_an_empty_batch_gets_no_answers(early: QueryEngine) -> None:
    assert early.query([]) == []


def test_lexical_search_sees_the_prompt_and_the_completion_as_separate_words(
    early: QueryEngine, monkeypatch
) -> None:
    """A completion without a leading space was glued to the prompt's last word
    ("market" + "was" searched as "marketwas", a word no document has)."""
    searched: list[str] = []
    search = early.lexical.search
    monkeypatch.setattr(early.lexical, "search", lambda t, k: searched.extend(t) or search(t, k))
    early.query([Query("The market", "was busy", top_k=3, rerank_depth=10, lexical_candidates=5)])
    assert searched == ["The market was busy"]


def test_the_sketch_answer_is_handed_over_before_the_candidates_are_looked_up(
    early: QueryEngine, monkeypatch
) -> None:
    """A streamed first answer waits for its top-k's records only, not for the K′ candidates'
    (nor for the lexical ones'): those are the exact stage's."""
    looked_up: list[int] = []
    lookup = early.metadata.lookup
    monkeypatch.setattr(early.metadata, "lookup", lambda ids: looked_up.extend(ids) or lookup(ids))
    sketched = {}
    tokenized = early.prepare(replace(QUERY, rerank_depth=40))

    def on_sketch(row, result):
        sketched[row] = (result, list(looked_up))

    (final,) = early.answer([tokenized], on_sketch=on_sketch)
    first, before = sketched[0]
    assert sorted(before) == sorted(h.example_id for h in first.hits)
    assert len(first.hits) == QUERY.top_k and not any(h.exact for h in first.hits)
    assert len(set(looked_up)) > QUERY.top_k and final.candidates_reranked > 0


def test_without_rerank_hits_are_sketch_estimates(engine: QueryEngine) -> None:
    (result,) = engine.query([replace(QUERY, rerank_depth=0)])
    assert result.hits and not any(hit.exact for hit in result.hits)
    assert result.timings.rerank_us == 0 and result.candidates_reranked == 0


def test_a_depth_over_the_budget_names_the_limit(engine: QueryEngine) -> None:
    limit = engine.info.max_rerank_depth
    with pytest.raises(InvalidInputError, match=f"limit of {limit}"):
        engine.prepare(replace(QUERY, rerank_depth=limit + 1))


@pytest.fixture(scope="module")
def without_factors(tmp_path_factory, tiny_model_dir: Path, small_corpus_path: Path) -> QueryEngine:
    """A version built without exact re-rank factors, served with a default depth of 50."""
    root = tmp_path_factory.mktemp("without-factors")
    config = tiny_config(tiny_model_dir, small_corpus_path, root)
    build_index(replace(config, store=replace(config.store, exact_rerank=False)))
    engine = QueryEngine.open(root, options=EngineOptions(rerank_depth=50))
    yield engine
    engine.close()


def test_rerank_of_a_version_without_factors_names_the_build_flag(
    without_factors: QueryEngine,
) -> None:
    engine = without_factors
    assert not engine.info.rerank_available and engine.info.rerank_depth == 0
    assert not engine.query([QUERY])[0].hits[0].exact  # the default depth does not apply
    with pytest.raises(PreconditionError, match="--exact-rerank on"):
        engine.prepare(replace(QUERY, rerank_depth=10))


def test_a_query_prepared_by_another_version_gets_this_versions_default(
    early: QueryEngine, without_factors: QueryEngine
) -> None:
    """The served version may change while a query waits for its batch: the new one answers it
    by its own default depth, not by the one that prepared it."""
    (plain,) = without_factors.answer([early.prepare(QUERY)])
    assert plain.candidates_reranked == 0 and not any(hit.exact for hit in plain.hits)
    (reranked,) = early.answer([without_factors.prepare(QUERY)])
    assert reranked.candidates_reranked >= QUERY.top_k and reranked.hits[0].exact


def test_every_rerank_fits_the_budget(root: Path) -> None:
    """The budget counts the top_k and the lexical candidates too, whatever sets the depth: a
    query's own depth is refused when over it, the default is cut to it."""
    max_length = QueryEngine.open(root).manifest.max_length
    options = EngineOptions(
        rerank_depth=50, max_rerank_tokens=20 * max_length, rerank_early_stop=False
    )
    engine = QueryEngine.open(root, options=options)
    assert engine.info.max_rerank_depth == 20
    tiny_budget = QueryEngine.open(root, options=replace(options, max_rerank_tokens=max_length))
    tiny_budget.warm_up()  # one candidate fits: the server can still serve the version
    tiny_budget.close()
    with pytest.raises(InvalidInputError, match=r"lexical_candidates 30 is over .* limit of 20"):
        engine.prepare(replace(QUERY, lexical_candidates=30))
    with pytest.raises(InvalidInputError, match=r"top_k 25 .* limit of 20"):
        engine.prepare(replace(QUERY, top_k=25, rerank_depth=5))
    (cut,) = engine.query([QUERY])
    assert cut.candidates_reranked == 20  # the default 50, cut to the budget
    (sketch,) = engine.query([replace(QUERY, top_k=25)])
    assert sketch.candidates_reranked == 0 and not any(hit.exact for hit in sketch.hits)
    engine.close()


def test_the_exact_stages_cost_is_measured_before_serving_and_kept_by_the_next_version(
    root: Path,
) -> None:
    """A deadline is kept by the stage's measured cost per candidate: the server's engines
    measure it before their first query (`warm_up`), and a version that reuses the model keeps
    it."""
    first = QueryEngine.open(root)
    assert first._model.rerank_cost.value is None
    first.warm_up()
    measured = first._model.rerank_cost.value
    assert measured is not None and measured > 0
    second = QueryEngine.open(root, reuse_model_from=first)
    assert second._model.rerank_cost.value == measured
    first.close()
    second.close()


def test_tokens_rotated_first_or_last_give_the_same_vectors(engine: QueryEngine) -> None:
    full = engine.reranker.curvature
    module = next(iter(full.modules.values()))
    d_out, d_in = module.eigvals.shape
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, 4 * (d_out + d_in)):  # cheaper to rotate the tokens / the sums
        g = torch.randn(2, tokens, d_out, generator=generator)
        a = torch.randn(2, tokens, d_in, generator=generator)
        expected = module.precondition(torch.einsum("bto,bti->boi", g, a))
        torch.testing.assert_close(module.precondition_tokens(g, a), expected, rtol=1e-4, atol=1e-4)


def test_lexical_candidates_join_the_exact_rerank(engine: QueryEngine) -> None:
    query = replace(QUERY, rerank_depth=1, lexical_candidates=10)
    (result,) = engine.query([query])
    # The index's candidates are at least top_k deep.
    ann = [hit.example_id for hit in engine.query([replace(QUERY, rerank_depth=0)])[0].hits]
    (lexical,) = engine.lexical.search([QUERY.prompt + QUERY.completion], 10)
    union = {*ann, *lexical}
    assert len(lexical) == 10 and len(result.hits) == QUERY.top_k
    assert all(hit.exact for hit in result.hits)
    assert {hit.example_id for hit in result.hits} <= union
    scores = [hit.score for hit in result.hits]
    assert scores == sorted(scores, reverse=True)


def test_lexical_candidates_need_rerank_and_a_lexical_index(
    engine: QueryEngine, tmp_path: Path, tiny_model_dir: Path, small_corpus_path: Path
) -> None:
    with pytest.raises(InvalidInputError, match="need exact re-ranking"):
        engine.prepare(replace(QUERY, rerank_depth=0, lexical_candidates=5))
    config = tiny_config(tiny_model_dir, small_corpus_path, tmp_path)
    build_index(replace(config, store=replace(config.store, lexical_index=False)))
    without = QueryEngine.open(tmp_path)
    with pytest.raises(PreconditionError, match="--lexical-index on"):
        without.prepare(replace(QUERY, lexical_candidates=5))


def test_a_query_whose_client_has_gone_starts_no_further_round(engine: QueryEngine) -> None:
    tokenized = engine.prepare(replace(QUERY, rerank_depth=50))
    (gone,) = engine.answer([tokenized], abandoned=[lambda: True])
    assert gone.candidates_reranked == 0 and gone.rerank_stop == StopReason.DEADLINE
    assert not any(hit.exact for hit in gone.hits)
    asked = iter([False, True])  # waited for during the first round, gone after it
    (left,) = engine.answer([tokenized], abandoned=[lambda: next(asked)])
    first_round = max(engine.options.rerank_chunk, QUERY.top_k)
    assert left.candidates_reranked == first_round and left.rerank_stop == StopReason.DEADLINE
