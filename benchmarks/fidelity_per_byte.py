"""Fidelity per byte (issues 8 and 13): sketch allocation x vector storage (FAISS factory),
re-rank off.

For each sketch — a uniform rank r×r per module (`--ranks`), or a budget of D dimensions per
example split across the modules by an allocation rule (`--dims` x `--rules`,
`indexer.budget`) — it builds (or reuses) an influence version over float16 codes
(`IDMap,SQfp16`: the raw preconditioned vectors as float16, what `vectors.f16` held), then
indexes those stored vectors with each FAISS factory through the build's own `write_faiss`,
and measures, per score kind, against the exact EK-FAC reference of `benchmarks.rerank` (the
default version's own full factors; the exact scores do not depend on the sketch):

- exact top-10 recall within the index's top-10 (sketch-only fidelity, re-rank off);
- candidate recall: the exact top-10 within the index's top-K′, K′ = 100 / 200 / 500;
- search ms per query (one query at a time, top-500, median) and the vs-flat recall;
- bytes per example: the FAISS code plus its 64-bit id, the index file per example, and the
  total with a float16 copy of every vector kept beside it (format 3: `vectors.f16`).

    .venv/bin/python -m benchmarks.fidelity_per_byte --setting demo --work .cache/issue8/demo \
        --out benchmarks/results/fidelity_per_byte-demo.json
    .venv/bin/python -m benchmarks.fidelity_per_byte --setting large --work .cache/issue8/large \
        --ranks 32,64 --factories SQfp16,SQ8,SQ4 --queries 24 \
        --out benchmarks/results/fidelity_per_byte-large.json

    .venv/bin/python -m benchmarks.fidelity_per_byte --setting demo --work .cache/issue13/demo \
        --ranks '' --dims 16384,32768,49152 --rules uniform,params --factories SQ8 \
        --out benchmarks/results/budget-demo.json

The reference is the default influence build of `benchmarks.rerank` in the same `--work`
(built here when missing) and its exact reference, shared with a `benchmarks.rerank` run of
the same setting and `--queries`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.common import comma_ints, emit, start_run
from benchmarks.rerank import (
    SETTINGS,
    TOP,
    Setting,
    candidate_recall,
    ensure_build,
    exact_reference,
    load_setting,
)
from indexer import metrics
from indexer.budget import describe, layout_ranks
from indexer.config import AllocationRule, ScoreKind, SketchConfig, StoreConfig
from indexer.engine import QueryEngine
from indexer.evaluate import json_safe
from indexer.query import Query
from indexer.store import write_faiss

log = logging.getLogger("fidelity_per_byte")

RANKS = (32, 48, 64)
RULES = tuple(AllocationRule)
FACTORIES = ("Flat", "SQfp16", "SQ8", "SQ6", "SQ4")  # each behind IDMap
DEPTHS = (100, 200, 500)
STORED = "IDMap,SQfp16"  # the builds' own index: the vectors as float16, as vectors.f16 held
BUDGET_BYTES = 24_576 + 49_160  # format 3's 32x32 vectors.f16 + flat float32 index, per example
REFERENCE_ROOT = "default-influence"  # `benchmarks.rerank`'s build, with the full factors


@dataclass
class Row:
    """One sketch x factory x score kind."""

    sketch: str  # `r x r` per module, or `D/rule`
    allocation: str  # `r_out x r_in` per module group
    dim: int
    factory: str
    score: str
    exact_top10_recall: float
    candidate_recall: dict[int, float]
    vs_flat_top10: float  # the stored vectors' exhaustive top-10 found by this index
    search_ms_per_query: float
    code_bytes_per_example: int  # code + 64-bit id
    index_file_bytes_per_example: float
    with_vectors_f16_bytes_per_example: float  # as today: index + vectors.f16
    within_budget_index_only: bool
    within_budget_with_vectors: bool


@dataclass(frozen=True)
class Sketch:
    """One measured sketch: its label, where its version lives under `--work`, its settings."""

    label: str
    directory: str
    config: SketchConfig


def sketches(ranks: tuple[int, ...], dims: tuple[int, ...], rules: tuple[str, ...]) -> list[Sketch]:
    """Uniform `r x r` per module for each rank, then each budget under each rule."""
    uniform = [Sketch(f"{r}x{r}", f"rank{r}", SketchConfig(r, r)) for r in ranks]
    return uniform + [
        Sketch(f"{d}/{rule}", f"dims{d}-{rule}", SketchConfig(dims=d, allocation=rule))
        for d in dims
        for rule in rules
    ]


def build_sketch(setting: Setting, work: Path, sketch: Sketch) -> dict:
    """A version of `sketch` whose stored vectors are re-indexed below: influence (raw vectors)
    over float16 codes (the default build's are 8-bit), without re-rank factors."""
    store = StoreConfig(
        score=ScoreKind.INFLUENCE, index_factory=STORED, exact_rerank=False, lexical_index=False
    )
    return ensure_build(setting, work / sketch.directory, store, sketch.config)


def search(index: faiss.Index, q: np.ndarray, depth: int) -> tuple[list[list[int]], float]:
    """Top-`depth` rows per query (ids = rows), one query at a time; median ms per query."""
    rows, times = [], []
    for i in range(q.shape[0]):
        start = time.perf_counter()
        _, ids = index.search(np.ascontiguousarray(q[i : i + 1]), depth)
        times.append(1000 * (time.perf_counter() - start))
        rows.append([int(r) for r in ids[0] if r >= 0])
    return rows, float(statistics.median(times))


def measure_sketch(
    engine: QueryEngine,
    label: str,
    queries: list[Query],
    exact: dict[str, np.ndarray],
    factories: tuple[str, ...],
    work: Path,
) -> list[Row]:
    """Every factory over this version's stored vectors, both score kinds; `exact` holds the
    reference scores `[Q, N]` per kind."""
    vectors = engine.vectors.preconditioned
    n, dim = vectors.shape
    allocation = describe(layout_ranks(engine.manifest.modules))
    tokenized = [engine.prepare(replace(q, rerank_depth=0)) for q in queries]
    q_raw = engine.query_vectors(tokenized)
    rows = []
    for kind in (ScoreKind.COSINE, ScoreKind.INFLUENCE):
        normalize = kind == ScoreKind.COSINE
        q = q_raw / np.linalg.norm(q_raw, axis=1, keepdims=True) if normalize else q_raw
        flat_top: list[list[int]] | None = None
        for factory in factories:
            path = work / f"{label.replace('/', '-')}-{kind}-{factory}.faiss"
            log.info("%s %s %s", label, kind, factory)
            index = write_faiss(
                vectors, np.arange(n, dtype=np.int64), f"IDMap,{factory}", path, normalize=normalize
            )
            found, ms = search(index, q, max(DEPTHS))
            flat_top = flat_top or found  # the first factory is the reference scan
            code = index.sa_code_size() + 8
            size = path.stat().st_size / n
            rows.append(
                Row(
                    sketch=label,
                    allocation=allocation,
                    dim=dim,
                    factory=factory,
                    score=str(kind),
                    exact_top10_recall=metrics.mean(
                        metrics.top_k_recall(exact[str(kind)][i], f, TOP)
                        for i, f in enumerate(found)
                    ),
                    candidate_recall={
                        d: metrics.mean(
                            candidate_recall(exact[str(kind)][i], f, d) for i, f in enumerate(found)
                        )
                        for d in DEPTHS
                    },
                    vs_flat_top10=metrics.mean(
                        len(set(f[:TOP]) & set(r[:TOP])) / TOP
                        for f, r in zip(found, flat_top, strict=True)
                    ),
                    search_ms_per_query=ms,
                    code_bytes_per_example=code,
                    index_file_bytes_per_example=size,
                    with_vectors_f16_bytes_per_example=size + 2 * dim,
                    within_budget_index_only=size <= BUDGET_BYTES,
                    within_budget_with_vectors=size + 2 * dim <= BUDGET_BYTES,
                )
            )
            path.unlink()
            del index
    return rows


def run(
    setting_name: str, n_queries: int | None, measured: list[Sketch], factories, work: Path
) -> dict:
    started = time.perf_counter()
    setting = load_setting(setting_name, n_queries)
    queries = [q.query for q in setting.queries]
    reference_build = ensure_build(
        setting, work / REFERENCE_ROOT, StoreConfig(score=ScoreKind.INFLUENCE), SketchConfig()
    )
    builds = {s.label: build_sketch(setting, work, s) for s in measured}
    default = QueryEngine.open(work / REFERENCE_ROOT)
    tokenized = [default.prepare(replace(q, rerank_depth=0)) for q in queries]
    reference = exact_reference(default, tokenized, work)
    default.close()
    rows = []
    for sketch in measured:
        engine = QueryEngine.open(work / sketch.directory)
        rows += measure_sketch(engine, sketch.label, queries, reference.scores, factories, work)
        engine.close()
    return {
        "benchmark": "fidelity_per_byte",
        "setting": setting_name,
        "model": str(setting.model_dir),
        "n_examples": len(reference.doc_ids),
        "n_queries": len(setting.queries),
        "budget_bytes_per_example": BUDGET_BYTES,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "reference_build": reference_build,
        "builds": builds,
        "exact_reference_seconds": reference.seconds,
        "full_curvature_sha256": reference.full_curvature_sha256,
        "rows": [asdict(r) for r in rows],
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, default="demo")
    parser.add_argument("--queries", type=int, help="queries (the same as the rerank run's)")
    parser.add_argument("--ranks", type=comma_ints, default=RANKS, help="uniform r x r ('': none)")
    parser.add_argument("--dims", type=comma_ints, default=(), help="budgets per example")
    parser.add_argument("--rules", default=",".join(RULES), help="allocation rules of --dims")
    parser.add_argument("--factories", default=",".join(FACTORIES), help="behind IDMap")
    parser.add_argument("--work", type=Path, required=True, help="the rerank run's --work")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    start_run(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    factories = tuple(args.factories.split(","))
    measured = sketches(args.ranks, args.dims, tuple(args.rules.split(",")))
    emit(json_safe(run(args.setting, args.queries, measured, factories, args.work)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
