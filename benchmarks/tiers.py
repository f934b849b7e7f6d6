"""Tiered candidate retrieval (issue 14): recall against milliseconds, and batch throughput.

    .venv/bin/python -m benchmarks.tiers --setting 100k --work .cache/issue14/100k \
        --out benchmarks/results/tiers-100k.json
    .venv/bin/python -m benchmarks.tiers --setting large --work .cache/issue14/large \
        --out benchmarks/results/tiers-large.json

For a version's stored index (the flat `IDMap,SQ8` codes) each compact code in `--codes` is
built here from the stored vectors (`indexer.retrieval.build_compact_index`, as the build does)
and searched through `TieredSearcher` (as the engine does) at each K″ in `--candidates`:

- recall of the flat index's top-10 within the tiered top-10 (the tiered scores are the flat
  index's, so the rest of the answer is unchanged when the two agree), and the same counting
  a tiered hit whose flat score ties the flat 10th's or beats it as found (texts repeated in the
  corpus have the same vector: the flat index orders them arbitrarily);
- with `--exact` (the default), recall of the exact EK-FAC top-10 (its ties counted as found)
  within the tiered top-K′ (K′ = 200, the exact stage's default depth) beside the flat
  top-K′'s (its ceiling), from `benchmarks.rerank.exact_reference` (one exact pass, cached
  under `--work`; the 100k version stores no full factors, so they are fitted there);
- p50 ms of one query at a time searching the exact stage's depth (K′ = 200) on 1 and 2
  threads (FAISS's and torch's), and of the compact scan alone (the rest is the re-scoring on
  the stored codes; on 2 threads one query's scan is split into two ranges of rows,
  `RowSplitSearcher`, as the engine splits it), with the load average: the machine is
  shared, so these are upper bounds;
- batch throughput (queries/s) at 1, 8 and 32 queries per search, as a server batch searches,
  the tier's and the flat scan's (`indexer.scan.CodeScan`, as the engine scans a flat index),
  and the compact scan's alone (what the tier's re-scoring adds is the difference).

Settings: `100k`, 98,000 synthetic demo-style documents with the demo model at the default
budget or `--dims` (`benchmarks.retrieval.ensure_version`) and 64 fact queries; `large`, the 21,331
examples of `benchmarks.rerank`'s large setting and its 48 queries; `1m`, timing only: each
code's scan over 1M synthetic rows (Gaussian projections, in memory; its speed does not depend
on the values), whose candidates' re-scoring costs what it costs at 100k (K″ rows read by
row, whatever N; from disk where the index outgrows the page cache).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.common import comma_ints, comma_list, emit, start_run
from benchmarks.rerank import ensure_build, exact_reference, load_setting, p50
from benchmarks.retrieval import ensure_version, fact_queries, unit_query_vectors
from indexer.config import CompactCode, Projection, ScoreKind, SketchConfig, StoreConfig
from indexer.engine import QueryEngine
from indexer.query import Query
from indexer.retrieval import (
    RETRIEVAL_CANDIDATES,
    RowSplitSearcher,
    TieredSearcher,
    build_compact_index,
    code_transforms,
    pre_transformed,
    search_range,
)
from indexer.scan import CodeScan, device_searcher

log = logging.getLogger("tiers")

TOP = 10
DEPTH = 200  # the exact stage's default depth: what a re-ranked query searches for
BATCHES = (1, 8, 32)


def parse_code(text: str) -> CompactCode:
    """`1024:SQ8` -> CompactCode(1024, "SQ8") (a random projection); `hr16384:RaBitQ` -> the
    first 16,384 dimensions of the Hadamard rotation (`hr:RaBitQ`: all of them) coded by
    `RaBitQ`; `RaBitQ` -> the stored vectors' every dimension (no projection)."""
    if ":" not in text:
        return CompactCode(0, text, Projection.NONE)
    dims, quantizer = text.split(":", 1)
    if dims.lower().startswith("hr"):
        return CompactCode(int(dims[2:] or 0), quantizer, Projection.HADAMARD)
    return CompactCode(int(dims), quantizer, Projection.RANDOM)


def recall(found: np.ndarray, wanted: np.ndarray) -> float:
    """Mean share of each row of `wanted [Q, k]` within the same row of `found [Q, ≥k]` (-1,
    no result, is not wanted)."""
    shares = [
        len(set(f) & set(w[w >= 0])) / max(int((w >= 0).sum()), 1)
        for f, w in zip(found, wanted, strict=True)
    ]
    return float(np.mean(shares))


def _recall_with_ties(found_scores: np.ndarray, tenth: np.ndarray) -> float:
    """Mean share of each row of `found_scores [Q, k]` (flat scores) at or above that query's
    flat 10th score `tenth [Q]`, within float32 rounding."""
    return float(np.mean(found_scores >= (tenth - 1e-6 * np.abs(tenth))[:, None]))


def _timed_p50(searcher, queries: np.ndarray, k: int, threads: int) -> dict[str, float]:
    """p50 ms of `searcher.search` one query at a time (after one warm-up query): wall clock,
    and this process's CPU time, which other processes' load does not inflate (on one thread
    it is the search's own time, memory stalls included)."""
    with _threads(threads):
        searcher.search(queries[:1], k)
        wall, cpu = [], []
        for q in queries:
            start, start_cpu = time.perf_counter(), time.process_time()
            searcher.search(q[None], k)
            wall.append(1000 * (time.perf_counter() - start))
            cpu.append(1000 * (time.process_time() - start_cpu))
    return {"wall": p50(wall), "cpu": p50(cpu)}


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """FAISS's and torch's threads (the scan's products) set to `threads`, then back to one."""
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(1)
        torch.set_num_threads(1)


def _throughput(
    searcher, queries: np.ndarray, k: int, threads: int, batches: tuple[int, ...] = BATCHES
) -> dict[int, dict]:
    """Queries per second at each batch size of `batches` over `max(batches)` queries (the
    queries cycled to fill them), by wall clock and by this process's CPU time (see
    `_timed_p50`)."""
    rates = {}
    block = np.resize(queries, (max(batches), queries.shape[1]))
    with _threads(threads):
        for batch in batches:
            start, start_cpu = time.perf_counter(), time.process_time()
            for begin in range(0, len(block), batch):
                searcher.search(block[begin : begin + batch], k)
            rates[batch] = {
                "wall": len(block) / (time.perf_counter() - start),
                "cpu": len(block) / (time.process_time() - start_cpu),
            }
    return rates


def exact_tops(engine: QueryEngine, queries: list[Query], work: Path) -> list[set[int]]:
    """Per query, the ids of its exact cosine top-10 with their ties: every example whose exact
    score reaches the 10th's (repeated texts score alike and would be cut arbitrarily)."""
    tokenized = [engine.prepare(replace(q, rerank_depth=0)) for q in queries]
    cosine = exact_reference(engine, tokenized, work).scores[str(ScoreKind.COSINE)]
    tops = []
    for scores in cosine:
        tenth = np.sort(scores)[-TOP]
        rows = np.flatnonzero(scores >= tenth - 1e-5 * abs(tenth))
        tops.append(set(engine.metadata.ids_and_norms(rows)[0].tolist()))
    return tops


def recall_exact(found: np.ndarray, tops: list[set[int]]) -> float:
    """Mean share of each query's exact top-10 (`exact_tops`) within its row of `found [Q, k]`
    (ids); a tie found counts as its member."""
    return float(
        np.mean([min(len(set(f) & t), TOP) / TOP for f, t in zip(found, tops, strict=True)])
    )


def setting_queries(
    args: argparse.Namespace, root: Path, *, exact: bool
) -> tuple[np.ndarray, list[set[int]] | None]:
    """The setting's unit query vectors `[Q, D]` (its version built first, unless CURRENT holds
    it), and with `exact` each query's exact top-10 (`exact_tops`)."""
    if args.setting == "large":
        setting = load_setting("large", None)
        ensure_build(setting, root, StoreConfig(score=ScoreKind.COSINE), SketchConfig())
        queries = [q.query for q in setting.queries]
    else:
        ensure_version(args.work, 98_000, args.threads, SketchConfig(dims=args.dims))
        queries = fact_queries(args.queries)
    engine = QueryEngine.open(root)
    vectors = unit_query_vectors(engine, queries)
    tops = exact_tops(engine, queries, args.work) if exact else None
    engine.close()
    return vectors, tops


def recall_within_first_rows(
    stored: faiss.Index, compact: faiss.Index, queries: np.ndarray, args: argparse.Namespace
) -> list[dict]:
    """How the K″ a code needs grows with the corpus (for a code whose search takes a range of
    rows: not PQ or fast-scan codes): for each N of `args.first_rows`, the tier's recall of the
    flat top-10 (ties counted) when only the first N rows exist, at each K″ of
    `args.candidates` (the compact scan restricted to the rows by a range selector, its
    candidates re-scored on the stored codes, as `TieredSearcher` does)."""
    scan = CodeScan.from_index(stored, "cpu")
    points = []
    for n in args.first_rows:
        every_row = np.broadcast_to(np.arange(n, dtype=np.int64), (len(queries), n))
        tenth = scan.search_rows(queries, np.ascontiguousarray(every_row), TOP)[0][:, -1]
        for candidates in args.candidates:
            rows = search_range(compact, queries, candidates, 0, n)[1]
            scores = scan.search_rows(queries, rows, TOP)[0]
            point = {"rows": n, "candidates": candidates}
            point["recall_flat_top10_ties"] = _recall_with_ties(scores, tenth)
            points.append(point)
    return points


def measure_code(
    stored: faiss.Index,
    code: CompactCode,
    queries: np.ndarray,
    flat: tuple[np.ndarray, np.ndarray],
    exact: list[set[int]] | None,
    args: argparse.Namespace,
) -> dict:
    """One compact code's build cost, size and sweep over K″ (`flat`: the flat index's scores
    and ids `[Q, DEPTH]`)."""
    flat_scores, flat_ids = flat
    code = code.over(stored.d)
    start = time.perf_counter()
    compact = build_compact_index(stored, code)
    built = time.perf_counter() - start
    compact_scan = RowSplitSearcher(compact)  # the compact scan alone, as the tier runs it
    row = {
        "code": code.name,
        "bytes_per_example": len(faiss.serialize_index(compact)) / stored.ntotal,
        "build_seconds": built,
        "candidates": [],
    }
    for candidates in args.candidates:
        tiered = TieredSearcher(compact, stored, candidates)
        top_scores, top_ids = tiered.search(queries, TOP)
        depth_ids = tiered.search(queries, DEPTH)[1]
        point = {
            "candidates": candidates,
            "recall_flat_top10": recall(top_ids, flat_ids[:, :TOP]),
            "recall_flat_top10_ties": _recall_with_ties(top_scores, flat_scores[:, TOP - 1]),
            "p50_ms": {t: _timed_p50(tiered, queries[: args.timed], DEPTH, t) for t in (1, 2)},
            "compact_scan_p50_ms": {
                t: _timed_p50(compact_scan, queries[: args.timed], candidates, t) for t in (1, 2)
            },
            "load_average": os.getloadavg(),
        }
        if exact is not None:
            point["recall_exact_top10_within_depth"] = recall_exact(depth_ids, exact)
        log.info("%s K''=%d: %s", code.name, candidates, point)
        row["candidates"].append(point)
    if args.first_rows and compact_scan.splits:  # searches a range of rows
        row["recall_within_first_rows"] = recall_within_first_rows(stored, compact, queries, args)
    best = TieredSearcher(compact, stored, args.throughput_candidates)
    row["throughput_qps"] = {t: _throughput(best, queries, DEPTH, t) for t in (1, 2)} | {
        "candidates": args.throughput_candidates,
        "load_average": os.getloadavg(),
    }
    row["compact_scan_throughput_qps"] = {
        t: _throughput(compact_scan, queries, args.throughput_candidates, t) for t in (1, 2)
    }
    return row


def measure_scan_at(n: int, code: CompactCode, args: argparse.Namespace) -> dict:
    """A compact code's scan alone over `n` synthetic rows (of `args.dim` dimensions where it
    codes every one): p50 ms per K″, one query at a time."""
    code = code.over(args.dim)
    rng = np.random.default_rng(0)
    index = faiss.index_factory(code.dims, code.quantizer, faiss.METRIC_INNER_PRODUCT)
    index.train(rng.standard_normal((min(20_000, 4 * code.dims), code.dims), dtype=np.float32))
    block = max(1, min(100_000, 2**28 // code.dims))  # ≤ 1 GiB of float32 rows at a time
    for start in range(0, n, block):
        index.add(rng.standard_normal((min(block, n - start), code.dims), dtype=np.float32))
    transforms = code_transforms(code, args.dim, seed=0)
    if transforms:  # the rows are the code's already; each query goes through its transforms
        index = pre_transformed(transforms, index)
    queries = rng.standard_normal((args.timed, args.dim), dtype=np.float32)
    searcher = RowSplitSearcher(index)
    return {
        "code": code.name,
        "n": n,
        "dims": code.dims,
        "bytes_per_example": len(faiss.serialize_index(index)) / n,
        "p50_ms": {
            k: {t: _timed_p50(searcher, queries, k, t) for t in (1, 2)} for k in args.candidates
        },
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("100k", "large", "1m"), default="100k")
    parser.add_argument("--work", type=Path, help="the setting's build and cache (not for 1m)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (build, queries)")
    parser.add_argument("--queries", type=int, default=64, help="fact queries (100k setting)")
    parser.add_argument("--timed", type=int, default=24, help="queries timed one at a time")
    parser.add_argument(
        "--dim", type=int, default=32_412, help="1m: stored dimensions (the demo's default D)"
    )
    parser.add_argument(
        "--dims",
        type=int,
        help="100k: the stored dimensions its version is built with (`build --dims`; "
        "default: the build's)",
    )
    parser.add_argument(
        "--codes",
        type=comma_list(parse_code),
        default=(StoreConfig().compact_code(), CompactCode(1024, "PQ512x4fs")),
        help="compact codes, comma-separated: dims:quantizer (a random projection), "
        "hrDIMS:quantizer (the first DIMS of the Hadamard rotation; hr: all) or quantizer "
        "(every stored dimension)",
    )
    parser.add_argument("--candidates", type=comma_ints, default=(1000, 2000, 3000, 4000))
    parser.add_argument("--throughput-candidates", type=int, default=RETRIEVAL_CANDIDATES)
    parser.add_argument(
        "--first-rows",
        type=comma_ints,
        default=(),
        help="also each code's recall at each K″ when only the first N rows exist, for each N "
        "(how the K″ a code needs grows with the corpus; codes that search a range of rows)",
    )
    parser.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recall of the exact EK-FAC top-10 (its reference: one exact pass, cached)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    start_run(args.threads)
    faiss.omp_set_num_threads(1)  # but where a search is timed
    if args.setting == "1m":
        scans = [measure_scan_at(1_000_000, code, args) for code in args.codes]
        emit({"benchmark": "tiers", "setting": "1m", "scans": scans}, args.out)
        return 0
    root = args.work / ("root" if args.setting == "100k" else "default-cosine")
    queries, exact = setting_queries(args, root, exact=args.exact)
    engine = QueryEngine.open(root)
    stored, flat = engine.index, device_searcher(engine.index, "cpu")  # the engine's flat scan
    flat_scores, flat_ids = flat.search(queries, DEPTH)  # the reference ranking
    result = {
        "benchmark": "tiers",
        "setting": args.setting,
        "n_examples": stored.ntotal,
        "dim": stored.d,
        "n_queries": len(queries),
        "stored_bytes_per_example": engine.manifest.files["index.faiss"].bytes / stored.ntotal,
        "flat": {
            "p50_ms": {t: _timed_p50(flat, queries[:3], DEPTH, t) for t in (1, 2)},
            "throughput_qps": _throughput(flat, queries, DEPTH, 1),
            "load_average": os.getloadavg(),
        },
        "codes": [
            measure_code(stored, c, queries, (flat_scores, flat_ids), exact, args)
            for c in args.codes
        ],
    }
    if exact is not None:
        result["flat"]["recall_exact_top10_within_depth"] = recall_exact(flat_ids, exact)
    engine.close()
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
