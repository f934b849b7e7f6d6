"""The flat scan shared by a batch of queries (issue 14, item 1): queries per second at 1, 8 and
32 queries per search, FAISS's search against `indexer.scan.CodeScan`, on the same index.

    .venv/bin/python -m benchmarks.shared_scan --examples 100000 \
        --out benchmarks/results/shared-scan-100k.json

The index is a real `IDMap,SQ8` inner-product FAISS file of `--examples` rows of dimension
`--dim` (the default budget's D on the demo model), written under `--work` once and opened
memory-mapped, as the server opens a version (`indexer.store.open_index`); both searchers read
the same mapped codes. The rows are Gaussian with a range per dimension: the scan's cost does
not depend on the values. Each searcher answers batches of `--batches` random queries with
k = 200 (the exact stage's depth) on `--threads` threads (FAISS's OpenMP and torch's); per
batch size: seconds and CPU seconds per search, queries per second, and the gain over one
query at a time. FAISS answers at most `--faiss-queries` queries per batch size (a pass each:
seconds at 100k). The scan's top-10 is checked against FAISS's on the queries both answered
(ties in either order count as found). The index is written by a child process, so this
one's anonymous (private) memory after the searches is the searchers' own; its file pages are
the mapped codes, which the page cache shares between processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.common import CACHE, comma_ints, emit, peak_rss_mib, start_run, status_mib
from indexer.scan import CodeScan, Searcher
from indexer.store import open_index

K = 200  # the exact stage's default depth: what a search returns for it
ADD_ROWS = 4096  # rows encoded at a time while the index is written


def ensure_index(path: Path, n: int, dim: int, seed: int = 0) -> None:
    """Write an `IDMap,SQ8` index of `n` Gaussian rows `[n, dim]` at `path` unless one is there."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    scale, shift = rng.uniform(0.5, 2.0, dim), rng.normal(size=dim)

    def rows(m: int) -> np.ndarray:
        return (rng.standard_normal((m, dim), np.float32) * scale + shift).astype(np.float32)

    index = faiss.index_factory(dim, "IDMap,SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(rows(2048))
    for start in range(0, n, ADD_ROWS):
        block = rows(min(ADD_ROWS, n - start))
        index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)


def timed(searcher: Searcher, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Wall seconds, CPU seconds and ids `[Q, K]` of one search of `queries`."""
    start, cpu = time.perf_counter(), time.process_time()
    ids = searcher.search(queries, K)[1]
    return time.perf_counter() - start, time.process_time() - cpu, ids


def throughput(searcher: Searcher, queries: np.ndarray, batch: int, rounds: int) -> dict:
    """Median seconds per search of `batch` queries over `rounds` searches, and queries/s."""
    runs = [timed(searcher, queries[r * batch : (r + 1) * batch]) for r in range(rounds)]
    wall = float(np.median([r[0] for r in runs]))
    cpu = float(np.median([r[1] for r in runs]))
    return {"batch": batch, "seconds": wall, "cpu_seconds": cpu, "queries_per_second": batch / wall}


def top10_agreement(
    scan_ids: np.ndarray, faiss_ids: np.ndarray, scores: np.ndarray
) -> float | None:
    """Share of FAISS's top-10 in the scan's top-10, a scan hit tied with FAISS's 10th counted
    (None without queries)."""
    if not len(scan_ids):
        return None
    found = wanted = 0
    for mine, theirs, their_scores in zip(scan_ids[:, :10], faiss_ids, scores, strict=True):
        real = theirs[theirs >= 0]  # -1: no result, in an index of fewer than 10 rows
        tied = set(real[their_scores[theirs >= 0] >= their_scores[: len(real)][-1]].tolist())
        found += len(set(mine.tolist()) & (set(real[:10].tolist()) | tied))
        wanted += min(len(real), 10)
    return found / wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=32_412, help="the demo's default D")
    parser.add_argument("--batches", type=comma_ints, default=(1, 8, 32))
    parser.add_argument("--rounds", type=int, default=3, help="searches per batch size")
    parser.add_argument("--faiss-queries", type=int, default=8, help="most queries FAISS answers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=CACHE / "shared-scan")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    start_run(args.threads)
    path = args.work / f"sq8-{args.examples}x{args.dim}.faiss"
    writer = multiprocessing.get_context("spawn").Process(
        target=ensure_index, args=(path, args.examples, args.dim)
    )
    writer.start()
    writer.join()
    index = open_index(path)
    scan = CodeScan.from_index(index, "cpu")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((max(args.batches) * args.rounds, args.dim), np.float32)
    for searcher in (index, scan):  # the codes' pages into the page cache, outside the timing
        searcher.search(queries[:1], K)
    results = {"faiss": [], "scan": []}
    for batch in args.batches:
        results["scan"].append(throughput(scan, queries, batch, args.rounds))
        faiss_rounds = args.faiss_queries // batch
        if faiss_rounds:
            results["faiss"].append(throughput(index, queries, batch, faiss_rounds))
    for rows in results.values():
        for row in rows:
            row["gain_over_one_query"] = row["queries_per_second"] / rows[0]["queries_per_second"]
    checked = queries[: args.faiss_queries]
    faiss_scores, faiss_ids = index.search(checked, K)
    emit(
        {
            "benchmark": "shared_scan",
            "examples": args.examples,
            "dim": args.dim,
            "code_bytes": args.examples * args.dim,
            "threads": args.threads,
            "k": K,
            "faiss": results["faiss"],
            "scan": results["scan"],
            "scan_top10_of_faiss": top10_agreement(
                scan.search(checked, K)[1], faiss_ids, faiss_scores
            ),
            "load_average": os.getloadavg(),
            "rss_anon_mib": status_mib("RssAnon"),
            "rss_file_mib": status_mib("RssFile"),
            "peak_rss_mib": peak_rss_mib(),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
