"""The torch scan of 8-bit codes (`indexer.scan`) answers as FAISS does, here on the CPU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.build import build_index
from indexer.config import (
    BuildConfig,
    CalibrationConfig,
    CorpusConfig,
    SketchConfig,
    StoreConfig,
)
from indexer.engine import QueryEngine
from indexer.query import Query
from indexer.scan import (
    NO_SCORE,
    CodeScan,
    MappedCodes,
    _disagreement,
    device_searcher,
    unsupported,
)
from indexer.store import open_index


def sq8_index(n: int, dim: int, seed: int = 0) -> tuple[faiss.Index, np.ndarray]:
    """An `IDMap,SQ8` inner-product index of `n` random vectors (ranges differing per dimension,
    ids not 0..n-1), and queries `[5, dim]`."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)) * rng.uniform(0.1, 5, dim) + rng.normal(size=dim)
    vectors = vectors.astype(np.float32)
    index = faiss.index_factory(dim, "IDMap,SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors, rng.permutation(3 * n)[:n].astype(np.int64))
    return index, rng.standard_normal((5, dim)).astype(np.float32)


def assert_same_search(expected: tuple, found: tuple, rtol: float = 1e-5) -> None:
    """The scan's `found` (scores, ids) `[Q, k]` are FAISS's `expected` `[Q, ≥k]`, within float32
    rounding: the same scores, and the same ids in the same order except among ties (FAISS's
    float32 sums err by ~1e-7 of their terms): an id found at another position than FAISS's has
    FAISS's score of that position. The tolerance (`rtol`) scales with the largest score."""
    k = found[0].shape[1]
    finite = np.abs(expected[0][expected[1] >= 0])
    tolerance = {"rtol": rtol, "atol": rtol / 10 * finite.max(initial=1.0)}
    np.testing.assert_allclose(found[0], expected[0][:, :k], **tolerance)
    for scores, ids, found_ids in zip(*expected, found[1], strict=True):
        faiss_score = dict(zip(ids.tolist(), scores.tolist(), strict=True))
        moved = np.flatnonzero(found_ids != ids[:k])
        assert all(found_ids[p] in faiss_score for p in moved)
        np.testing.assert_allclose(
            [faiss_score[found_ids[p]] for p in moved], scores[moved], **tolerance
        )


@pytest.mark.parametrize(("n", "dim"), [(1, 3), (40, 8), (700, 37), (2500, 130)])
def test_scan_matches_faiss_on_random_indexes(n, dim):
    index, queries = sq8_index(n, dim)
    scan = CodeScan.from_index(index, "cpu")
    for k in (1, 10, n + 3):  # past the last row: -FLT_MAX and id -1, as FAISS gives
        assert_same_search(index.search(queries, k), scan.search(queries, k))


def test_scan_merges_chunks(monkeypatch):
    """A top-k spread over several chunks of rows is merged as one search finds it."""
    index, queries = sq8_index(1000, 16, seed=1)
    monkeypatch.setattr("indexer.scan._chunk_rows", lambda *_: 64)
    scan = CodeScan.from_index(index, "cpu")
    assert_same_search(index.search(queries, 25), scan.search(queries, 25))


@pytest.mark.parametrize(
    "factory", ["IDMap,SQ4", "IDMap,SQfp16", "IDMap,Flat", "IVF4,SQ8", "IDMap,SQ8_direct"]
)
def test_other_indexes_keep_faiss(factory):
    index = faiss.index_factory(8, factory, faiss.METRIC_INNER_PRODUCT)
    assert unsupported(index)
    with pytest.raises(ValueError, match="cannot scan"):
        CodeScan.from_index(index, "cpu")
    assert unsupported(faiss.index_factory(8, "IDMap,SQ8", faiss.METRIC_L2))


def test_cpu_engines_scan_the_mapped_codes(tmp_path):
    """On the CPU the scan reads a memory-mapped index's codes in place (no copy), and an index
    it cannot scan is searched by FAISS."""
    index, queries = sq8_index(300, 24)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    mapped = open_index(tmp_path / "index.faiss")
    scan = device_searcher(mapped, "cpu")
    assert isinstance(scan, CodeScan) and isinstance(scan.codes, MappedCodes)
    assert not scan.codes.codes.flags.owndata
    assert_same_search(index.search(queries, 10), scan.search(queries, 10))
    ivf = faiss.index_factory(8, "IVF1,Flat", faiss.METRIC_INNER_PRODUCT)
    assert device_searcher(ivf, "cpu") is ivf


def sketch_only_index(root: Path, model_dir: Path, corpus: Path) -> Path:
    """A tiny published `IDMap,SQ8` version without exact factors (`root`). Its settings are
    `tests.test_build.tiny_config`'s, which this module does not import: tests/test_gpu.py
    imports it on GPU hosts, which lack the server's gRPC packages that test_build needs."""
    config = BuildConfig(
        model=model_dir,
        out=root,
        corpus=CorpusConfig(str(corpus), max_length=64),
        sketch=SketchConfig(rank_in=8, rank_out=8),
        store=StoreConfig(exact_rerank=False),
        calibration=CalibrationConfig(queries=0),
        progress=False,
    )
    build_index(config)
    return root


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir, small_corpus_path):
    root = tmp_path_factory.mktemp("scan-index")
    engine = QueryEngine.open(sketch_only_index(root, tiny_model_dir, small_corpus_path))
    yield engine
    engine.close()


def test_scan_of_a_built_index_matches_faiss(engine):
    """The codes, ranges and ids of a published version, as its queries search them."""
    prepared = [engine.prepare(Query(p, c)) for p, c in [("The", " capital"), ("A", " city")]]
    queries = engine.query_vectors(prepared)
    scan = CodeScan.from_index(engine.index, "cpu")
    assert_same_search(engine.index.search(queries, 20), scan.search(queries, 20))


def test_engine_answers_alike_with_the_scan(engine, monkeypatch):
    """The same hits: FAISS's deeper answer holds any example tied with the scan's last hit."""
    query = Query("The capital of", " the city", top_k=8, rerank_depth=0)
    assert isinstance(engine.searcher, CodeScan)
    found = engine.query([query])[0].hits
    monkeypatch.setattr(engine, "searcher", engine.index)
    expected = engine.query([replace(query, top_k=30)])[0].hits
    assert_same_search(as_search(expected), as_search(found))


def as_search(hits: list) -> tuple[np.ndarray, np.ndarray]:
    """Hits as a search's scores and ids `[1, len(hits)]`."""
    return np.array([[h.score for h in hits]]), np.array([[h.example_id for h in hits]])


def test_a_scan_that_disagrees_with_faiss_is_refused():
    """What keeps a CUDA engine on FAISS when torch's int8 product errs on that host."""
    index, _ = sq8_index(300, 24)
    scan = CodeScan.from_index(index, "cpu")
    assert _disagreement(scan, index) == ""
    scan.vmin += 0.5
    assert "differ" in _disagreement(scan, index)


def resident_scan(index: faiss.Index) -> CodeScan:
    """A scan of `index` over a copy of its codes (as on a GPU), here in the CPU's memory."""
    inner = faiss.downcast_index(index.index)
    codes = faiss.vector_to_array(inner.codes).reshape(index.ntotal, -1)
    vmin, vdiff = faiss.vector_to_array(inner.sq.trained).reshape(2, -1)
    ids = faiss.vector_to_array(index.id_map)
    return CodeScan.from_blocks([codes], vmin, vdiff, ids, "cpu")


@pytest.mark.parametrize("chunk_rows", [None, 32])
@pytest.mark.parametrize("scan_of", [lambda i: CodeScan.from_index(i, "cpu"), resident_scan])
def test_search_rows_ranks_each_querys_own_rows(chunk_rows, scan_of, monkeypatch):
    """The tier's re-scoring: each query's candidates only, a union of the batch's rows read
    once (in one chunk, or several; from mapped or resident codes); fewer candidates than k
    (and none at all) come back as FAISS pads a search."""
    if chunk_rows:
        monkeypatch.setattr("indexer.scan._chunk_rows", lambda *_: chunk_rows)
    index, queries = sq8_index(700, 37)
    rng = np.random.default_rng(3)
    rows = np.stack([rng.choice(700, 50, replace=False) for _ in queries])
    rows[0, 30:] = -1
    rows[1] = -1
    decoded = index.index.reconstruct_n(0, index.ntotal).astype(np.float64)
    ids = faiss.vector_to_array(index.id_map)
    expected = (np.full((len(queries), 40), NO_SCORE), np.full((len(queries), 40), -1))
    for q, own in enumerate(rows):
        own = own[own >= 0]
        scores = decoded[own] @ queries[q].astype(np.float64)
        order = np.argsort(-scores)[:40]
        expected[0][q, : len(order)], expected[1][q, : len(order)] = scores[order], ids[own[order]]
    scan = scan_of(index)
    found = scan.search_rows(queries, rows, 40)
    assert_same_search(expected, found)
    assert (found[1][0, 30:] == -1).all() and (found[1][1] == -1).all()
    empty = scan.search_rows(queries, np.full((5, 3), -1), 4)
    assert (empty[1] == -1).all() and (empty[0] == NO_SCORE).all()


def test_concurrent_searches_each_answer_as_one_alone(monkeypatch):
    """Searches from several threads at once (a server's batches) each get their own answer:
    the int8 copy each thread keeps between searches is its own, never another's."""
    monkeypatch.setattr("indexer.scan._chunk_rows", lambda *_: 64)
    index, _ = sq8_index(1500, 48, seed=2)
    queries = np.random.default_rng(4).standard_normal((8, 48)).astype(np.float32)
    scan = CodeScan.from_index(index, "cpu")
    rows = np.random.default_rng(5).choice(1500, (8, 300))
    alone = [
        (scan.search(q[None], 20), scan.search_rows(q[None], r[None], 20))
        for q, r in zip(queries, rows, strict=True)
    ]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            together = list(
                pool.map(
                    lambda qr: (
                        scan.search(qr[0][None], 20),
                        scan.search_rows(qr[0][None], qr[1][None], 20),
                    ),
                    zip(queries, rows, strict=True),
                )
            )
            for (a_search, a_rows), (t_search, t_rows) in zip(alone, together, strict=True):
                np.testing.assert_array_equal(a_search[1], t_search[1])
                np.testing.assert_array_equal(a_rows[1], t_rows[1])
