"""The adaptive exact stage (issue 13) against the fixed-depth re-rank, side by side in one run.

For one setting (`demo` or `large`, see `benchmarks.rerank`) and each score kind, the default
index is built (re-rank factors and the calibrated bound included) and every query answered
alone, warm, three ways in turn (so that they share the machine's load):

- `sketch`: no re-rank (`rerank_depth` 0), searched as `adaptive` searches;
- `fixed`: the previous default, every one of K′ = 200 candidates re-ranked
  (`EngineOptions(rerank_early_stop=False)`), from a scan of every stored code (no compact
  code first: `retrieval_candidates=0`, as before issue 14; the engine's scan, which is
  `indexer.scan.CodeScan` on the CPU since stop 23 and was FAISS's before);
- `adaptive`: the default now, K′ = 200 an upper bound, stopping once the top-10 is settled
  within the version's calibrated bound. Its first (sketch) answer's time is taken when the
  engine hands it over (`on_sketch`), as QueryStream sends it.

Each gets the exact EK-FAC top-10 agreement (the version's own full factors, whole corpus) and
p50 latency; `adaptive` also the candidates it re-ranked and why it stopped.

    .venv/bin/python -m benchmarks.exact_stage --setting demo --work .cache/issue8/demo64 \
        --out benchmarks/results/exact-stage-demo.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.common import comma_floats, emit, start_run
from benchmarks.rerank import (
    KINDS,
    TOP,
    Reference,
    Setting,
    ensure_build,
    exact_reference,
    load_setting,
    p50,
    row_of,
)
from indexer import metrics
from indexer.calibration import Calibrator
from indexer.config import CalibrationConfig, ScoreKind, SketchConfig, StoreConfig
from indexer.engine import EngineOptions, QueryEngine, QueryResult
from indexer.evaluate import json_safe
from indexer.query import TokenizedQuery
from indexer.scores import fit_rerank_bound

log = logging.getLogger("exact_stage")

DEPTH = 200


def timed(engine: QueryEngine, query: TokenizedQuery) -> tuple[QueryResult, float, float | None]:
    """The answer, its wall ms, and the ms at which its sketch answer was handed over."""
    start = time.perf_counter()
    first: list[float] = []
    (result,) = engine.answer(
        [query], on_sketch=lambda _row, _r: first.append(time.perf_counter() - start)
    )
    ms = 1000 * (time.perf_counter() - start)
    return result, ms, 1000 * first[0] if first else None


def agreement(engine: QueryEngine, exact: np.ndarray, result: QueryResult) -> float:
    rows = row_of(engine, [h.example_id for h in result.hits])
    return metrics.top_k_recall(exact, [rows[h.example_id] for h in result.hits], TOP)


def measure_kind(setting: Setting, root: Path, reference: Reference) -> dict:
    previous = EngineOptions(rerank_early_stop=False, retrieval_candidates=0)
    fixed = QueryEngine.open(root, options=previous)
    adaptive = QueryEngine.open(root, reuse_model_from=fixed)
    kind = str(fixed.info.score_kind)
    exact = reference.scores[kind]
    modes = {
        "sketch": (adaptive, 0),
        "fixed": (fixed, DEPTH),
        "adaptive": (adaptive, DEPTH),
    }
    prepared = {
        name: [engine.prepare(replace(q.query, top_k=TOP, rerank_depth=d)) for q in setting.queries]
        for name, (engine, d) in modes.items()
    }
    for name, (engine, _) in modes.items():
        timed(engine, prepared[name][0])  # warm-up, not counted
    runs: dict[str, list[tuple[QueryResult, float, float | None, float]]] = {m: [] for m in modes}
    names = list(modes)
    for i in range(len(setting.queries)):
        # Each mode leads in turn: no mode always runs right after another's identical passes.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            engine = modes[name][0]
            result, ms, first_ms = timed(engine, prepared[name][i])
            runs[name].append((result, ms, first_ms, agreement(engine, exact[i], result)))
    out = {"score": kind, "bound": asdict(adaptive.manifest.rerank_bound)}
    for name, answered in runs.items():
        out[name] = {
            "agreement_with_exact_top10": metrics.mean(a for *_, a in answered),
            "p50_ms": p50([ms for _, ms, _, _ in answered]),
            "p50_rerank_ms": p50([r.timings.rerank_us / 1000 for r, *_ in answered]),
        }
    reranked = [r.candidates_reranked for r, *_ in runs["adaptive"]]
    out["adaptive"] |= {
        "mean_candidates_reranked": float(np.mean(reranked)),
        "max_candidates_reranked": int(np.max(reranked)),
        "stops": dict(Counter(str(r.rerank_stop) for r, *_ in runs["adaptive"])),
        "p50_first_answer_ms": p50([f for _, _, f, _ in runs["adaptive"]]),
    }
    out["adaptive_p50_over_fixed"] = out["adaptive"]["p50_ms"] / out["fixed"]["p50_ms"]
    out["first_answer_over_sketch_p50"] = (
        out["adaptive"]["p50_first_answer_ms"] / out["sketch"]["p50_ms"]
    )
    adaptive.close()
    fixed.close()
    log.info("%s: %s", kind, out)
    return out


def quantile_sweep(
    setting: Setting, root: Path, reference: Reference, quantiles: Sequence[float]
) -> list[dict]:
    """The early stop at other calibration quantiles: the version's bound refitted at each on
    the build's own calibration pairs (the same pseudo-queries, seed and depth; the
    default quantile gives back the stored bound), and every query answered with it."""
    engine = QueryEngine.open(root)
    calibrator = Calibrator.of(engine)
    ids = engine.metadata.ids_and_norms(np.arange(engine.info.n_examples))[0]
    calibration = CalibrationConfig()
    seed = engine.manifest.sketch.seed
    pairs = calibrator.pairs(ids, calibration.queries, calibration.depth, seed)
    exact = reference.scores[str(engine.info.score_kind)]
    prepared = [
        engine.prepare(replace(q.query, top_k=TOP, rerank_depth=DEPTH)) for q in setting.queries
    ]
    rows = []
    for quantile in quantiles:
        bound = fit_rerank_bound(pairs.cosines, pairs.exact, quantile, corpus=pairs.corpus_noise())
        engine.manifest = replace(engine.manifest, rerank_bound=bound)
        results = [engine.answer([t])[0] for t in prepared]
        rows.append(
            {
                "quantile": quantile,
                "agreement_with_exact_top10": metrics.mean(
                    agreement(engine, e, r) for e, r in zip(exact, results, strict=True)
                ),
                "mean_candidates_reranked": metrics.mean(r.candidates_reranked for r in results),
            }
        )
        log.info("%s quantile %s: %s", engine.info.score_kind, quantile, rows[-1])
    engine.close()
    return rows


def run(
    setting_name: str,
    n_queries: int | None,
    kinds: list[ScoreKind],
    work: Path,
    quantiles: Sequence[float] = (),
) -> dict:
    started = time.perf_counter()
    setting = load_setting(setting_name, n_queries)
    builds, roots = {}, {}
    for kind in kinds:
        roots[kind] = work / f"default-{kind}"
        builds[str(kind)] = ensure_build(
            setting, roots[kind], StoreConfig(score=kind), SketchConfig()
        )
    first = QueryEngine.open(roots[kinds[0]])
    tokenized = [first.prepare(replace(q.query, rerank_depth=0)) for q in setting.queries]
    reference = exact_reference(first, tokenized, work)
    first.close()
    return {
        "benchmark": "exact_stage",
        "setting": setting_name,
        "n_queries": len(setting.queries),
        "depth": DEPTH,
        "engine_options": asdict(EngineOptions()),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "builds": builds,
        "kinds": [measure_kind(setting, roots[k], reference) for k in kinds],
        "quantile_sweep": {
            str(k): quantile_sweep(setting, roots[k], reference, quantiles) for k in kinds
        },
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("demo", "large"), default="demo")
    parser.add_argument("--queries", type=int, help="queries (deterministic sample; default 48)")
    parser.add_argument("--kinds", default=",".join(map(str, KINDS)))
    parser.add_argument("--work", type=Path, help="keep builds and exact scores here (reused)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--quantiles",
        type=comma_floats,
        default=(),
        help="also replay every query's early stop with the bound refitted at these "
        "calibration quantiles (agreement and candidates, e.g. 0.99,0.995,0.999)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    start_run(args.threads)
    kinds = [ScoreKind(k) for k in args.kinds.split(",")]
    with tempfile.TemporaryDirectory(prefix="exact-stage-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        emit(json_safe(run(args.setting, args.queries, kinds, work, args.quantiles)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
