"""Bytes per example and search time of the flat index's storage (issue 8 item 3, issue 9).

    python -m benchmarks.vector_storage --threads 1 [--synthetic 20000] [--out results.json]

Builds the demo index (default score and sketch: cosine, 64×64) once per flat factory:
`IDMap,Flat` (float32 codes: the index of format 3, which also stored every vector again in
vectors.f16, 2 bytes a dimension) and `IDMap,SQfp16` (float16 codes, the index as the
vectors' only copy).
For each: bytes per example on disk, p50 of one FAISS search per query (the demo's fact
queries, top 10, the index memory-mapped as the server opens it) and the overlap of its top-10
with the float32 index's. `--synthetic N` repeats the search timing on N random unit vectors
of the demo's dimension, where a flat scan costs more than noise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.common import demo_artifacts, emit
from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig, StoreConfig
from indexer.engine import QueryEngine
from indexer.manifest import INDEX_FILE
from indexer.query import read_queries
from indexer.store import open_index, write_faiss

FACTORIES = ("IDMap,Flat", "IDMap,SQfp16")
FORMAT3_VECTOR_BYTES = 2  # per dimension: the float16 copy format 3 kept beside the index
TOP_K = 10


def search_ms(index: faiss.Index, queries: np.ndarray, repeats: int) -> float:
    """p50 wall time in ms of one search for one query vector (`queries [Q, D]`, float32)."""
    times = []
    for _ in range(repeats):
        for q in queries:
            start = time.perf_counter()
            index.search(q[None], TOP_K)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo_factory(root: Path, factory: str, queries: np.ndarray | None, repeats: int) -> dict:
    """Build the demo index with `factory`; its sizes, search p50 and top-k ids per query."""
    artifacts = demo_artifacts()
    build_index(
        BuildConfig(
            model=artifacts.model_dir,
            out=root,
            corpus=CorpusConfig(str(artifacts.corpus_path)),
            store=StoreConfig(index_factory=factory),
            progress=False,
        )
    )
    engine = QueryEngine.open(root)
    if queries is None:
        prepared = [engine.prepare(q.query) for q in read_queries(artifacts.queries_path)]
        queries = engine.query_vectors(prepared)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # a cosine index
    n = engine.info.n_examples
    version_bytes = sum(p.stat().st_size for p in engine.path.rglob("*") if p.is_file())
    index_bytes = (engine.path / INDEX_FILE).stat().st_size
    _, ids = engine.index.search(queries, TOP_K)
    result = {
        "factory": factory,
        "examples": n,
        "dim": engine.info.dim,
        "index_bytes_per_example": index_bytes / n,
        "version_bytes_per_example": version_bytes / n,
        "search_p50_ms": search_ms(engine.index, queries, repeats),
    }
    engine.close()
    return {"result": result, "ids": ids, "queries": queries}


def synthetic_search(work: Path, n: int, dim: int, repeats: int) -> list[dict]:
    """Search p50 of each factory over `n` random unit vectors, memory-mapped as served."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(n, 20, replace=False)] + 0.01
    results = []
    for factory in FACTORIES:
        path = work / f"synthetic-{factory.replace(',', '_')}.faiss"
        write_faiss(vectors, np.arange(n, dtype=np.int64), factory, path)
        index = open_index(path)
        index.search(queries, TOP_K)  # fault the mapped pages in once: a warm server
        results.append(
            {
                "factory": factory,
                "examples": n,
                "index_bytes_per_example": path.stat().st_size / n,
                "search_p50_ms": search_ms(index, queries, repeats),
            }
        )
        del index
        path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic", type=int, default=0, help="random vectors (0: skip)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows, ids, queries = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for factory in FACTORIES:
            run = demo_factory(Path(tmp) / factory, factory, queries, args.repeats)
            queries = run["queries"]
            ids[factory] = run["ids"]
            rows.append(run["result"])
        flat = ids["IDMap,Flat"]
        for row in rows:
            pairs = zip(ids[row["factory"]], flat, strict=True)
            same = [len(set(a) & set(b)) / TOP_K for a, b in pairs]
            row["top10_overlap_with_float32"] = float(np.mean(same))
        # What format 3 stored per example: this float32 index and the float16 copy beside it.
        rows[0]["format3_vector_bytes_per_example"] = (
            rows[0]["index_bytes_per_example"] + FORMAT3_VECTOR_BYTES * rows[0]["dim"]
        )
        synthetic = []
        if args.synthetic:
            synthetic = synthetic_search(Path(tmp), args.synthetic, rows[0]["dim"], args.repeats)
    emit(
        {
            "benchmark": "vector_storage",
            "threads": args.threads,
            "demo": rows,
            "synthetic": synthetic,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
