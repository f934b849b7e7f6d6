"""Candidate retrieval at scale (issue 8): recall of the flat index's top-K′ against search ms.

    .venv/bin/python -m benchmarks.retrieval --documents 98000 \
        --out benchmarks/results/retrieval.json

Vectors: real preconditioned 64×64 sketches (D = 49,152 with the demo model) of a synthetic
demo-style corpus (`benchmarks.common.synthetic_corpus`; 98,000 documents ≈ 100k examples),
built once by the library (`build_index`, no re-rank factors, no lexical index, the flat
`IDMap,SQ8` index) under `--work` and reused by later runs; the flat index's decoded codes are
the vectors (unit vectors: a cosine index). Queries: the generator's fact queries, through the
engine's query path (`QueryEngine.query_vectors`), unit-normalised.

Reference: exact inner products of the queries with those vectors (the flat index's ranking).
Each structure (a FAISS factory string) is built here from the same vectors; for each of its
search settings and each K′ in `--depths`: recall of the reference top-K′ within the K′ it
returns, recall of the reference top-10 (what an exact re-rank needs) within them, and the p50
of one query at a time at 1 and 2 FAISS threads; with its build seconds and bytes per example
(its serialised size). The flat index's own p50 is timed on a few queries. Builds and searches
run on a machine other processes share: each setting records the load average.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.common import CACHE, demo_artifacts, emit, peak_rss_mib, synthetic_corpus
from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig, SketchConfig, StoreConfig
from indexer.demo.corpus import generate_corpus
from indexer.engine import QueryEngine
from indexer.incremental import built_with
from indexer.manifest import INDEX_FILE
from indexer.publish import read_current, read_manifest, version_dir
from indexer.query import Query

log = logging.getLogger(__name__)

SKETCH = SketchConfig(rank_in=64, rank_out=64)  # the 64×64 default, stated so it cannot drift
REFERENCE_FACTORY = "IDMap,SQ8"  # the flat index: exhaustive search over 8-bit codes


def _build_config(model: Path, corpus: Path, root: Path, sketch: SketchConfig) -> BuildConfig:
    return BuildConfig(
        model=model,
        out=root,
        corpus=CorpusConfig(str(corpus)),
        sketch=sketch,
        store=StoreConfig(index_factory=REFERENCE_FACTORY, exact_rerank=False, lexical_index=False),
        progress=False,
    )


def ensure_version(
    work: Path, documents: int, threads: int, sketch: SketchConfig = SKETCH
) -> dict | None:
    """A version of `documents` synthetic documents under `work/root` with `sketch`'s
    dimensions: built (its summary returned) unless CURRENT already holds them, built with
    these settings (None; a version of other dimensions is built again, not measured)."""
    root = work / "root"
    config = _build_config(demo_artifacts().model_dir, work / "corpus.jsonl", root, sketch)
    if read_current(root) is not None:
        manifest = read_manifest(version_dir(root))
        if manifest.counts.documents == documents and built_with(manifest, config):
            return None
    torch.set_num_threads(threads)
    synthetic_corpus(work / "corpus.jsonl", documents)
    start = time.perf_counter()
    summary = build_index(config)
    return {"wall_seconds": time.perf_counter() - start, **summary.to_dict()}


def fact_queries(n_queries: int) -> list[Query]:
    """The generator's fact queries, seed after seed (the corpus's first documents come from
    the first seeds), up to `n_queries`."""
    queries: list[Query] = []
    seed = 0
    while len(queries) < n_queries:
        queries += [Query(q["prompt"], q["completion"]) for q in generate_corpus(seed).queries]
        seed += 1
    return queries[:n_queries]


def unit_query_vectors(engine: QueryEngine, queries: list[Query], batch: int = 16) -> np.ndarray:
    """Unit query vectors `[n, D]` (float32) from the engine's own query path, as a cosine
    index searches them."""
    blocks = []
    for start in range(0, len(queries), batch):
        prepared = [engine.prepare(q) for q in queries[start : start + batch]]
        blocks.append(engine.query_vectors(prepared))
    vectors = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
    faiss.normalize_L2(vectors)
    return vectors


def decoded_blocks(path: Path, block: int) -> Iterator[np.ndarray]:
    """The stored vectors of an `IDMap,…` flat index, `[≤ block, D]` float32 rows in order.
    The file is mapped again for each block, so that its pages leave this process's RSS."""
    n = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC).ntotal
    for start in range(0, n, block):
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        yield faiss.downcast_index(index.index).reconstruct_n(start, min(block, n - start))
        del index


def decoded_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """The stored vectors `[len(rows), D]` (float32) of some rows of an `IDMap,…` index."""
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    return faiss.downcast_index(index.index).reconstruct_batch(rows)


class TopK:
    """The running exact top-`k` rows `[n_queries, k]` by inner product, best first."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.rows = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, block: np.ndarray, first_row: int) -> None:
        scores = np.concatenate([self.scores, self.queries @ block.T], axis=1)
        rows = np.concatenate(
            [
                self.rows,
                np.broadcast_to(first_row + np.arange(len(block)), (len(scores), len(block))),
            ],
            axis=1,
        )
        keep = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(scores, keep, axis=1)
        self.rows = np.take_along_axis(rows, keep, axis=1)


REFINE = ",Refine(SQ8)"  # a suffix: the first stage's candidates re-scored on 8-bit codes


@dataclass(frozen=True)
class Structure:
    """A candidate index: a FAISS factory string, and its search settings (FAISS
    `ParameterSpace` strings, e.g. `nprobe=16,k_factor_rf=4`), cheapest first. A factory ending
    in `,Refine(SQ8)` re-scores its first stage's candidates on the flat index's own codes,
    which is what that factory builds (the same 8-bit quantiser of the same vectors)."""

    factory: str
    settings: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.factory.removesuffix(REFINE)

    @property
    def refined(self) -> bool:
        return self.factory.endswith(REFINE)


def structures(n: int) -> list[Structure]:
    """The structures measured at `n` examples: today's default (IVF over 8-bit codes), and a
    compact first stage (an exhaustive scan of 512-byte 4-bit fast-scan PQ codes) refined on
    8-bit codes. On 8k examples IVF + PQ256x4fs first stages and HNSW over a random rotation to
    256 dimensions found at most half of the flat top-200 (benchmarks/RESULTS.md)."""
    nlist = int(min(65536, max(64, math.sqrt(n))))
    return [
        Structure(f"IVF{nlist},SQ8", tuple(f"nprobe={p}" for p in (8, 32, 128))),
        Structure(f"PQ1024x4fs{REFINE}", tuple(f"k_factor_rf={k}" for k in (1, 2, 4, 8))),
    ]


@dataclass
class Built:
    """A structure's index as built here, and the seconds its training and adds took."""

    structure: Structure
    index: faiss.Index
    seconds: float = 0.0


def train_structure(structure: Structure, sample: np.ndarray, centroids: np.ndarray) -> Built:
    """An empty, trained index of `structure.base`. An IVF over the full dimension gets the
    shared coarse `centroids [nlist, D]` (k-means once, not per structure)."""
    start = time.perf_counter()
    index = faiss.index_factory(sample.shape[1], structure.base, faiss.METRIC_INNER_PRODUCT)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None and ivf.d == centroids.shape[1] and ivf.nlist == len(centroids):
        ivf.quantizer.add(centroids)  # FAISS skips k-means for a quantizer holding nlist
    index.train(sample)
    return Built(structure, index, time.perf_counter() - start)


def coarse_centroids(sample: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids `[nlist, D]`, as an inner-product IVF trains them."""
    kmeans = faiss.Kmeans(sample.shape[1], nlist, niter=10, seed=seed, spherical=True)
    kmeans.train(sample)
    return kmeans.centroids


def fill(built: list[Built], truth: TopK, blocks: Iterator[np.ndarray]) -> None:
    """One pass over the stored vectors: every structure's adds and the exact reference."""
    first = 0
    for block in blocks:
        truth.add(block, first)
        first += len(block)
        for b in built:
            start = time.perf_counter()
            b.index.add(block)
            b.seconds += time.perf_counter() - start


def index_bytes(index: faiss.Index, scratch: Path) -> int:
    """Bytes of the index written to a file (what a version stores)."""
    faiss.write_index(index, str(scratch))
    size = scratch.stat().st_size
    scratch.unlink()
    return size


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each reference row set `truth [n, t]` within `found [n, k]`."""
    hits = [len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


def p50_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median wall ms of one query at a time (in memory: nothing to warm)."""
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


@dataclass(frozen=True)
class Measure:
    """What each search setting is measured on."""

    queries: np.ndarray  # [n, D] unit
    truth: np.ndarray  # reference rows [n, max depth], best first
    depths: tuple[int, ...]
    timed: int  # queries timed one at a time
    head: int  # the flat top-`head` (what a re-rank needs) is also looked for in the K′
    threads: tuple[int, ...]
    give_up_ms: float  # a setting slower than this at 1 thread ends its structure's sweep


def sweep(index: faiss.Index, settings: tuple[str, ...], m: Measure) -> list[dict]:
    """Recall and p50 at each setting, cheapest first, until one is slower than `give_up_ms`."""
    space, rows = faiss.ParameterSpace(), []
    for setting in settings:
        space.set_index_parameters(index, setting)
        row: dict = {"setting": setting, "recall": {}, "head_recall": {}, "p50_ms": {}}
        for k in m.depths:
            faiss.omp_set_num_threads(1)
            found = index.search(m.queries, k)[1]
            row["recall"][k] = recall(found, m.truth[:, :k])
            row["head_recall"][k] = recall(found, m.truth[:, : m.head])
            for t in m.threads:
                faiss.omp_set_num_threads(t)
                row["p50_ms"].setdefault(k, {})[t] = p50_ms(index, m.queries[: m.timed], k)
        row["load_average"] = os.getloadavg()
        rows.append(row)
        log.info("%s: %s", setting, row)
        if min(row["p50_ms"][min(m.depths)].values()) > m.give_up_ms:
            break
    return rows


def flat_p50(index: faiss.Index, m: Measure) -> dict:
    """The flat index's p50 ms per K′ and thread count (its ranking is the reference)."""
    out: dict = {}
    for k in m.depths:
        for t in m.threads:
            faiss.omp_set_num_threads(t)
            out.setdefault(k, {})[t] = p50_ms(index, m.queries[: m.timed], k)
    return {"p50_ms": out, "load_average": os.getloadavg()}


def describe(b: Built, index: faiss.Index, extra_bytes: int, m: Measure, scratch: Path) -> dict:
    """A structure's row: bytes per example, build seconds and its settings' sweep."""
    n = index.ntotal
    return {
        "factory": b.structure.factory,
        "bytes_per_example": index_bytes(b.index, scratch) / n + extra_bytes,
        "build_seconds": b.seconds,
        "settings": sweep(index, b.structure.settings, m),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=98_000, help="≈ 100k examples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (build, queries)")
    parser.add_argument("--work", type=Path, help="default .cache/retrieval/n<documents>")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--timed", type=int, default=24, help="queries timed one at a time")
    parser.add_argument("--flat-timed", type=int, default=3, help="the same, flat index")
    parser.add_argument("--depths", default="100,200,500", help="K′, comma-separated")
    parser.add_argument("--sample", type=int, default=8192, help="training rows")
    parser.add_argument("--give-up-ms", type=float, default=300.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    load_start = os.getloadavg()
    # One FAISS thread but where a search is timed: OpenMP threads that spin-wait for each
    # other are many times slower on cores other processes share.
    faiss.omp_set_num_threads(1)
    work = args.work or CACHE / "retrieval" / f"n{args.documents}"
    work.mkdir(parents=True, exist_ok=True)
    built_now = ensure_version(work, args.documents, args.threads)
    engine = QueryEngine.open(work / "root")
    path, manifest = engine.path / INDEX_FILE, engine.manifest
    n, dim = engine.index.ntotal, engine.index.d
    queries = unit_query_vectors(engine, fact_queries(args.queries))
    engine.close()
    del engine

    depths = tuple(int(k) for k in args.depths.split(","))
    rows = np.random.default_rng(0).choice(n, size=min(n, args.sample), replace=False)
    sample = decoded_rows(path, np.sort(rows))
    start = time.perf_counter()
    centroids = coarse_centroids(sample, int(min(65536, max(64, math.sqrt(n)))))
    kmeans_seconds = time.perf_counter() - start
    log.info("k-means: %.0f s", kmeans_seconds)
    built = [train_structure(s, sample, centroids) for s in structures(n)]
    log.info("trained: %s", [(b.structure.factory, round(b.seconds)) for b in built])
    del sample
    for b in built:
        b.seconds += kmeans_seconds if "IVF" in b.structure.base else 0.0
    truth = TopK(queries, max(depths))
    fill(built, truth, decoded_blocks(path, 1024))
    log.info("filled: %s", [(b.structure.factory, round(b.seconds)) for b in built])
    m = Measure(queries, truth.rows, depths, args.timed, 10, (1, 2), args.give_up_ms)
    scratch = work / "probe.faiss"
    results = []
    for b in [b for b in built if not b.structure.refined]:  # each holds its own codes
        results.append(describe(b, b.index, 0, m, scratch))
        b.index = None
    flat = faiss.read_index(str(path))  # the flat index's 8-bit codes, in memory
    codes = faiss.downcast_index(flat.index)
    flat_row = {
        "factory": manifest.index_factory,
        "bytes_per_example": path.stat().st_size / n,
        "build_seconds": manifest.build_seconds,
        **flat_p50(codes, replace(m, timed=args.flat_timed)),
    }
    for b in [b for b in built if b.structure.refined]:
        refined = faiss.IndexRefine(b.index, codes)
        results.append(describe(b, refined, codes.code_size, m, scratch))
    emit(
        {
            "benchmark": "retrieval",
            "n_examples": n,
            "dim": dim,
            "sketch": [SKETCH.rank_out, SKETCH.rank_in],
            "score": str(manifest.score),
            "queries": len(queries),
            "timed_queries": args.timed,
            "build": built_now,
            "kmeans_seconds": kmeans_seconds,
            "flat": flat_row,
            "structures": results,
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "peak_rss_mib": peak_rss_mib(),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
