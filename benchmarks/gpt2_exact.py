"""The exact stage at the GPT-2-small shape (issue 13): 12 blocks of 768, random weights.

A default build (`--exact-rerank auto`) over `--documents` demo-generator documents must store
the exact re-rank factors on this machine; each demo query is then answered with the exact
stage over every example (depth N, or the engine's limit when lower; the early stop on, as
served) and its top-10 compared with exact EK-FAC's over the whole corpus, computed apart from
the engine (full preconditioned gradients streamed, `benchmarks.rerank.exact_reference`).
Random weights: the figures are cost and agreement of two computations of the same scores,
not attribution quality.

    .venv/bin/python -m benchmarks.gpt2_exact --documents 200 --queries 8 \
        --out benchmarks/results/gpt2-exact.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.budget_cost import random_model
from benchmarks.common import demo_artifacts, emit, peak_rss_mib, start_run, synthetic_corpus
from benchmarks.large_model import sample_queries
from benchmarks.rerank import TOP, answer, candidate_recall, exact_reference
from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig
from indexer.engine import QueryEngine
from indexer.exact import ExactConfig

log = logging.getLogger("gpt2_exact")

SHAPE = "12x768"  # LAYERSxWIDTH
# The reference holds a batch of full preconditioned gradients (340 MB an example at this
# shape): two at a time, under a limit above the scorer's default (it is sized for 64 queries).
REFERENCE = ExactConfig(batch_size=2, memory_limit_bytes=64 << 30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=SHAPE, help="LAYERSxWIDTH (smaller: a smoke test)")
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    start_run(args.threads)
    artifacts = demo_artifacts()
    with tempfile.TemporaryDirectory(prefix="gpt2-exact-") as tmp:
        work = Path(tmp)
        model = work / "model"
        layers, width = (int(v) for v in args.shape.split("x"))
        parameters = random_model(model, layers, width, artifacts.model_dir)
        corpus = synthetic_corpus(work / "corpus.jsonl", args.documents)
        config = BuildConfig(model=model, out=work / "root", corpus=CorpusConfig(str(corpus)))
        summary = build_index(replace(config, progress=False))
        if not summary.full_curvature_bytes:
            raise SystemExit("the default build stored no exact re-rank factors")
        build_rss = peak_rss_mib()
        engine = QueryEngine.open(work / "root")
        try:
            record = measure(engine, artifacts.queries_path, args.queries, work)
        finally:
            engine.close()
    emit(
        {
            "benchmark": "gpt2_exact",
            "shape": args.shape,
            "parameters": parameters,
            "weights": "random (seed 0)",
            "examples": summary.n_examples,
            "dim": summary.dim,
            "allocation": summary.allocation,
            "exact_factors_bytes": summary.full_curvature_bytes,
            "build_seconds": summary.seconds,
            "build_peak_rss_mib": build_rss,
            **record,
            "peak_rss_mib": peak_rss_mib(),
        },
        args.out,
    )
    return 0


def measure(engine: QueryEngine, queries_path: Path, n_queries: int, work: Path) -> dict:
    """Each query answered with the exact stage over the whole corpus, against exact EK-FAC."""
    depth = min(engine.info.n_examples, engine.info.max_rerank_depth)
    labeled = sample_queries(queries_path, n_queries)
    tokenized = [engine.prepare(replace(q.query, top_k=TOP, rerank_depth=depth)) for q in labeled]
    start = time.perf_counter()
    reference = exact_reference(engine, tokenized, work, REFERENCE)
    reference_seconds = time.perf_counter() - start
    exact = reference.scores[str(engine.info.score_kind)]
    answer(engine, tokenized[0])  # warm-up
    rows = []
    for scores, t in zip(exact, tokenized, strict=True):
        answered, result = answer(engine, t)
        rows.append(
            {
                "agreement": candidate_recall(scores, answered.rows, TOP),
                "candidates_reranked": result.candidates_reranked,
                "stop": str(result.rerank_stop),
                "ms": answered.ms,
                "stages_ms": answered.stages_ms,
            }
        )
        log.info("query %d/%d: %s", len(rows), len(tokenized), rows[-1])
    return {
        "score_kind": str(engine.info.score_kind),
        "queries": len(rows),
        "rerank_depth": depth,
        "top10_agreement_mean": float(np.mean([r["agreement"] for r in rows])),
        "top10_agreement_min": float(np.min([r["agreement"] for r in rows])),
        "mean_candidates_reranked": float(np.mean([r["candidates_reranked"] for r in rows])),
        "p50_answer_ms": float(np.median([r["ms"] for r in rows])),
        "reference_seconds": reference_seconds,
        "per_query": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
