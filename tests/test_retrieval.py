"""The compact retrieval code (`indexer.retrieval`): its projection, the tiered search against
the flat index it stands in for, and a version built and served with one."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.build import build_index, compact_code
from indexer.config import RETRIEVAL_MIN_EXAMPLES, CompactCode, Projection
from indexer.engine import EngineOptions, IndexInfo, QueryEngine
from indexer.manifest import RETRIEVAL_FILE
from indexer.publish import verify_version, version_dir
from indexer.query import Query
from indexer.retrieval import (
    MIN_SPLIT_ROWS,
    RETRIEVAL_MIN_RECALL,
    RowSplitSearcher,
    TieredSearcher,
    build_compact_index,
    flat_top10_recall,
    random_directions,
)
from indexer.scan import CodeScan
from indexer.store import FLAT_FACTORY, new_index
from tests.test_build import tiny_config


def _low_rank_vectors(n: int, dim: int, rank: int, seed: int) -> np.ndarray:
    """Unit vectors `[n, dim]` near a `rank`-dimensional subspace (what gradients look like)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    x = rng.standard_normal((n, rank)) @ basis.T + 0.05 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    faiss.normalize_L2(x)
    return x


def _flat(vectors: np.ndarray) -> faiss.IndexIDMap:
    index = new_index(vectors.shape[1], FLAT_FACTORY)
    index.train(vectors)
    index.add_with_ids(vectors, 1000 + 7 * np.arange(len(vectors)))  # ids are not rows
    return index


def test_random_directions_are_orthonormal_and_fixed_by_their_seed():
    directions = random_directions(64, 8, seed=0)
    assert directions.shape == (64, 8) and directions.dtype == np.float32
    np.testing.assert_allclose(directions.T @ directions, np.eye(8), atol=1e-5)
    np.testing.assert_array_equal(directions, random_directions(64, 8, seed=0))
    assert not np.allclose(directions, random_directions(64, 8, seed=1))


def test_a_code_recorded_without_its_projection_is_read_as_principal_directions():
    from indexer.manifest import _compact_code

    assert _compact_code({"dims": 8, "quantizer": "SQ8"}).name == "PCA8,SQ8"
    assert _compact_code({"dims": 8, "quantizer": "SQ8", "projection": "random"}) == CompactCode(
        8, "SQ8", Projection.RANDOM
    )
    assert _compact_code({"dims": 8, "quantizer": "RaBitQ", "projection": "none"}) == CompactCode(
        8, "RaBitQ", Projection.NONE
    )
    rotated = {"dims": 16_384, "quantizer": "RaBitQ", "projection": "hadamard"}
    assert _compact_code(rotated) == CompactCode(16_384, "RaBitQ", Projection.HADAMARD)
    assert _compact_code(None) is None


def test_all_candidates_give_the_flat_index_answer():
    x = _low_rank_vectors(600, 128, 12, seed=1)
    flat = _flat(x)
    compact = build_compact_index(flat, CompactCode(16, "SQ8"))
    queries = x[:5] + 0.1 * _low_rank_vectors(5, 128, 12, seed=2)
    tiered = TieredSearcher(compact, flat, candidates=len(x))
    scores, ids = tiered.search(queries, 10)
    flat_scores, flat_ids = flat.search(queries, 10)
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_allclose(scores, flat_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "code",
    [
        CompactCode(128, "SQ8"),
        CompactCode(256, "RaBitQ", Projection.NONE),
        CompactCode(0, "RaBitQ", Projection.HADAMARD),
    ],
    ids=["random-half-8-bit", "every-dimension-1-bit", "rotated-1-bit"],
)
def test_few_candidates_find_the_flat_top_ten_and_score_them_as_the_flat_index(code):
    # Vectors that do not cluster (as gradients), each query the sum of ten of them: its flat
    # top-10. A random code of half the dimensions in 8 bits, or every dimension in 1 bit
    # (rotated or not), finds them among 5 % of the rows.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 256)).astype(np.float32)
    faiss.normalize_L2(x)
    flat = _flat(x)
    planted = [rng.choice(len(x), 10, replace=False) for _ in range(20)]
    queries = np.stack([x[p].sum(axis=0) for p in planted])
    tiered = TieredSearcher(build_compact_index(flat, code), flat, 200)
    scores, ids = tiered.search(queries, 10)
    flat_scores, flat_ids = flat.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, flat_ids, strict=True)])
    assert recall >= 0.95
    found = {(q, i): s for q in range(20) for i, s in zip(flat_ids[q], flat_scores[q], strict=True)}
    for q in range(20):
        for i, s in zip(ids[q], scores[q], strict=True):
            if (q, i) in found:
                assert s == pytest.approx(found[q, i], rel=1e-5, abs=1e-6)


def test_a_rotated_code_finds_the_flat_top_ten_where_unequal_coordinates_hide_it():
    # As a sketch's modules do, a few coordinates carry most of each vector. The signs of the
    # vector as stored weigh the small coordinates as much as the large, and miss much of the
    # flat top-10 within K″ = 100; the Hadamard rotation spreads every coordinate over all.
    rng = np.random.default_rng(3)
    scales = np.r_[np.full(16, 10.0), np.full(240, 0.3)].astype(np.float32)
    x = rng.standard_normal((4000, 256)).astype(np.float32) * scales
    faiss.normalize_L2(x)
    flat = _flat(x)
    queries = np.stack([x[rng.choice(len(x), 10, replace=False)].sum(axis=0) for _ in range(20)])
    flat_ids = flat.search(queries, 10)[1]

    def recall(code: CompactCode) -> float:
        ids = TieredSearcher(build_compact_index(flat, code), flat, 100).search(queries, 10)[1]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, flat_ids, strict=True)])

    assert recall(CompactCode(0, "RaBitQ", Projection.HADAMARD)) >= 0.95
    assert recall(CompactCode(0, "RaBitQ", Projection.NONE)) <= 0.8


@pytest.mark.parametrize(
    "code",
    [
        CompactCode(64, "RaBitQ", Projection.NONE),
        CompactCode(16, "SQ8", Projection.RANDOM),
        CompactCode(32, "RaBitQ", Projection.HADAMARD),
    ],
    ids=["1-bit", "projected", "rotated-half"],
)
def test_a_search_split_across_threads_answers_as_the_whole_index(code, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2 * MIN_SPLIT_ROWS + 123, 64)).astype(np.float32)
    compact = build_compact_index(_flat(x), code)
    queries = rng.standard_normal((2, 64)).astype(np.float32)
    ranges: list[tuple[int, int]] = []
    search_range = RowSplitSearcher._search_range

    def spy(self, queries, k, start, stop):
        ranges.append((start, stop))
        return search_range(self, queries, k, start, stop)

    monkeypatch.setattr(RowSplitSearcher, "_search_range", spy)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        for query in queries:
            scores, rows = RowSplitSearcher(compact).search(query[None], 50)
            whole_scores, whole_rows = compact.search(query[None], 50)
            np.testing.assert_array_equal(rows, whole_rows)
            np.testing.assert_array_equal(scores, whole_scores)
        assert RowSplitSearcher(compact).search(queries, 50)[1].shape == (2, 50)
    finally:
        faiss.omp_set_num_threads(threads)
    half = len(x) // 2
    assert sorted(set(ranges)) == [(0, half), (half, len(x))]  # one query split, two not


def test_a_code_whose_search_ignores_ranges_is_searched_whole():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2 * MIN_SPLIT_ROWS, 64)).astype(np.float32)
    compact = build_compact_index(_flat(x), CompactCode(64, "PQ16x4fs", Projection.NONE))
    searcher = RowSplitSearcher(compact)
    assert not searcher.splits and RowSplitSearcher(faiss.IndexRaBitQ(8)).splits is False
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        np.testing.assert_array_equal(searcher.search(x[:1], 5)[1], compact.search(x[:1], 5)[1])
    finally:
        faiss.omp_set_num_threads(threads)


def test_a_code_no_smaller_than_the_vectors_is_refused():
    flat = _flat(_low_rank_vectors(50, 16, 4, seed=4))
    with pytest.raises(ValueError, match="not smaller than 16"):
        build_compact_index(flat, CompactCode(16, "SQ8"))


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (
            {
                "retrieval_dims": 24,
                "retrieval_quantizer": "SQ8",
                "retrieval_projection": Projection.RANDOM,
            },
            "RR24,SQ8",
        ),
        ({"retrieval_projection": Projection.NONE}, "RaBitQ"),
        ({}, "HR512,RaBitQ"),  # the tiny model's dimensions, rotated: padded to 512
    ],
    ids=["random-24-dims", "as-stored", "default"],
)
def test_a_version_with_a_compact_code_answers_as_its_flat_index(
    tmp_path, tiny_model_dir, small_corpus_path, options, name
):
    root = tmp_path / "index"
    config = tiny_config(tiny_model_dir, small_corpus_path, root, retrieval_code=True, **options)
    summary = build_index(config)
    assert summary.retrieval_code == name and "retrieval" in summary.seconds
    manifest = verify_version(version_dir(root))
    assert manifest.retrieval == config.store.compact_code().over(summary.dim)
    assert RETRIEVAL_FILE in manifest.files
    # K″ = 3,000 re-scores all 121 examples: the flat top-10 itself
    check = manifest.retrieval_check
    assert check == summary.retrieval_check and check.code == name
    assert check.kept and check.flat_top10 == 1.0
    # more pseudo-queries than the calibration's: one query's share found varies widely
    assert config.calibration.queries < check.queries <= summary.n_examples
    engine = QueryEngine.open(root, options=EngineOptions(retrieval_candidates=summary.n_examples))
    assert isinstance(engine.searcher, TieredSearcher)
    assert (engine.info.retrieval_code, engine.info.retrieval_candidates) == (
        name,
        summary.n_examples,
    )
    queries = [Query("The capital of", " the", top_k=5, rerank_depth=0)]
    tiered = engine.query(queries)[0]
    flat_engine = QueryEngine.open(
        root, options=EngineOptions(retrieval_candidates=0), reuse_model_from=engine
    )
    assert isinstance(flat_engine.searcher, CodeScan)  # 0: every stored code scanned
    assert (flat_engine.info.retrieval_code, flat_engine.info.retrieval_candidates) == ("", 0)
    # asked for the tier but scanning the stored codes (on CUDA, or Milvus): no code is named
    asked = EngineOptions(retrieval_candidates=summary.n_examples)
    info = IndexInfo.from_manifest(summary.version, manifest, asked, flat_engine.searcher)
    assert (info.retrieval_code, info.retrieval_candidates) == ("", 0)
    flat = flat_engine.query(queries)[0]
    flat_engine.close()
    engine.close()
    assert [h.example_id for h in tiered.hits] == [h.example_id for h in flat.hits]
    assert [h.score for h in tiered.hits] == pytest.approx([h.score for h in flat.hits])


def test_auto_stores_no_compact_code_for_a_small_corpus(
    tmp_path, tiny_model_dir, small_corpus_path
):
    assert (
        compact_code(
            tiny_config(tiny_model_dir, small_corpus_path, tmp_path), 121, FLAT_FACTORY, 512
        )
        is None
    )
    big = RETRIEVAL_MIN_EXAMPLES
    config = tiny_config(tiny_model_dir, small_corpus_path, tmp_path)
    half_rotated = CompactCode(16_384, "RaBitQ", Projection.HADAMARD)
    assert compact_code(config, big, FLAT_FACTORY, 32_412) == half_rotated
    assert half_rotated.name == "HR16384,RaBitQ"
    # a smaller vector keeps its whole rotation, padded to a power of 2
    assert compact_code(config, big, FLAT_FACTORY, 5_000).name == "HR8192,RaBitQ"
    assert compact_code(config, big, "IVF100,SQ8", 32_768) is None
    as_stored = tiny_config(
        tiny_model_dir, small_corpus_path, tmp_path, retrieval_projection=Projection.NONE
    )
    every_dimension = CompactCode(32_768, "RaBitQ", Projection.NONE)
    assert compact_code(as_stored, big, FLAT_FACTORY, 32_768) == every_dimension
    assert every_dimension.name == "RaBitQ" and not every_dimension.projected
    projected = tiny_config(
        tiny_model_dir,
        small_corpus_path,
        tmp_path,
        retrieval_dims=1024,
        retrieval_projection=Projection.RANDOM,
    )
    assert compact_code(projected, big, FLAT_FACTORY, 4096) == CompactCode(1024, "RaBitQ")
    assert compact_code(projected, big, FLAT_FACTORY, 1024) is None


def test_auto_drops_a_compact_code_that_misses_the_flat_top10(
    tmp_path, tiny_model_dir, small_corpus_path, monkeypatch
):
    """An `auto` code is measured on the build's pseudo-queries and not stored when it keeps
    under RETRIEVAL_MIN_RECALL of the flat top-10: here one dimension and K″ = 10."""
    monkeypatch.setattr("indexer.build.RETRIEVAL_MIN_EXAMPLES", 1)
    monkeypatch.setattr("indexer.build.RETRIEVAL_CANDIDATES", 10)
    root = tmp_path / "index"
    config = tiny_config(
        tiny_model_dir, small_corpus_path, root, retrieval_dims=1, retrieval_quantizer="SQ8"
    )
    summary = build_index(config)
    check = summary.retrieval_check
    assert summary.retrieval_code is None and check is not None
    assert not check.kept and check.candidates == 10 and check.flat_top10 < RETRIEVAL_MIN_RECALL
    manifest = verify_version(version_dir(root))
    assert manifest.retrieval is None and manifest.retrieval_check == check
    assert RETRIEVAL_FILE not in manifest.files
    assert not (version_dir(root) / RETRIEVAL_FILE).exists()
    engine = QueryEngine.open(root)
    assert isinstance(engine.searcher, CodeScan) and engine.info.retrieval_code == ""
    engine.close()


def test_flat_top10_recall_counts_the_flat_hits_the_tier_returns():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x[1] = x[0]  # a repeated text: the flat index orders the pair arbitrarily
    flat, queries = _flat(x), rng.standard_normal((12, 64)).astype(np.float32)
    queries[0] = x[0]
    compact = build_compact_index(flat, CompactCode(8, "SQ8"))
    assert flat_top10_recall(flat, compact, queries, len(x)) == 1.0
    expected_ids = flat.search(queries, 10)[1]
    tiered_ids = TieredSearcher(compact, flat, 20).search(queries, 10)[1]
    pairs = zip(tiered_ids, expected_ids, strict=True)
    by_ids = np.mean([len(set(a) & set(b)) / 10 for a, b in pairs])
    found = flat_top10_recall(flat, compact, queries, 20)
    assert found < 0.9 and found == pytest.approx(by_ids, abs=1 / 120)
