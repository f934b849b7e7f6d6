"""Which projection keeps exact EK-FAC best at the same bytes (issues 13 and 15): the index's
Kronecker sketch against a Hadamard sketch of the exact preconditioned gradient.

The index stores, per module, `precondition(P G Rᵀ)`: Gaussian `P`, `R` project the module's
gradient `G` before the sketch-space EK-FAC preconditions it. The alternative measured here
preconditions in the full space first (the version's exact re-rank factors: the vector whose
inner products *are* exact EK-FAC) and then keeps `--dims` outputs of a seeded randomized
Hadamard rotation of it (FAISS's `HadamardRotation`, as the compact code uses): a dense
Johnson-Lindenstrauss map, where the Kronecker one is structured. Nothing here is built into
the index; the full vectors of the demo corpus (`[N, 593,280]` float32, 3.9 GB) are held in
memory, so this runs on the demo only.

For each score kind, against exact EK-FAC's scores of the demo queries on every example:
top-10 agreement, Spearman, and the LDS of the scores alone (the retraining cache of
`benchmarks/lds.py`), for the stored sketch and for the Hadamard sketch at each seed.

    .venv/bin/python -m benchmarks.sketch_transform --kinds cosine,influence --seeds 0,1,2 \
        --out benchmarks/results/sketch-transform-demo.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.common import CACHE, comma_ints, comma_list, emit, start_run
from benchmarks.rerank import ensure_build, load_setting
from indexer import lds, metrics
from indexer.config import ScoreKind, SketchConfig, StoreConfig, rotated_dims
from indexer.engine import QueryEngine
from indexer.evaluate import in_kind, matching_corpus, sketch_scores
from indexer.exact import ExactConfig, ExactScorer
from indexer.query import query_vectors
from indexer.retrieval import hadamard_rotation

ROWS_PER_ROTATION = 64  # rows rotated at once: 64 x 2^20 floats = 256 MiB for the demo


def exact_vectors(engine: QueryEngine, prepared: list) -> tuple[np.ndarray, np.ndarray]:
    """Full-space preconditioned vectors of every corpus example `[N, D_full]` and of the
    queries `[Q, D_full]`, with the version's exact re-rank factors."""
    manifest = engine.manifest
    curvature = engine.reranker.curvature
    scorer = ExactScorer(
        engine.loaded,
        matching_corpus(engine, None),
        ExactConfig(curvature=manifest.curvature, modules=manifest.sketch.modules),
        curvature=curvature,
    )
    queries = query_vectors(scorer.sketcher, curvature, prepared, engine.pad_id)
    n = len(scorer.pass_.examples)
    vectors = np.zeros((n, curvature.dim), dtype=np.float32)
    for rows, capture in scorer.pass_.run(list(range(n)), "data", "full vectors"):
        vectors[rows] = curvature.vectors(capture).float().cpu().numpy()
    return vectors, queries.float().cpu().numpy()


def hadamard_sketch(vectors: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """The first `dims` outputs of a seeded randomized Hadamard rotation of `vectors [n, D]`,
    scaled by `sqrt(padded / dims)` so that inner products are kept in expectation."""
    transforms = hadamard_rotation(vectors.shape[1], dims, seed)
    scale = np.float32((rotated_dims(vectors.shape[1]) / dims) ** 0.5)
    out = np.empty((len(vectors), dims), dtype=np.float32)
    for start in range(0, len(vectors), ROWS_PER_ROTATION):
        block = np.ascontiguousarray(vectors[start : start + ROWS_PER_ROTATION])
        for transform in transforms:
            block = transform.apply(block)
        out[start : start + len(block)] = block * scale
    return out


def compare(
    scores: np.ndarray, exact: np.ndarray, in_subset: np.ndarray, losses: np.ndarray
) -> dict:
    """A method's scores `[Q, N]` against exact EK-FAC's: top-10 agreement, Spearman, LDS."""
    pairs = list(zip(scores, exact, strict=True))
    agreement = [metrics.top_k_recall(e, metrics.top_k(s, 10), 10) for s, e in pairs]
    return {
        "top10_agreement": metrics.mean(agreement),
        "spearman": metrics.mean(metrics.spearman(s, e) for s, e in pairs),
        "lds": asdict(lds.bootstrap_mean(lds.lds_per_query(scores, in_subset, losses))),
    }


def retrained_losses(
    cache_path: Path, engine: QueryEngine, query_ids: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The cache's losses `[M, Q]` of these queries (seeds averaged) and the membership of the
    version's rows in its subsets `[M, N]`."""
    cache = lds.read_cache(cache_path)
    if cache.key.model != engine.info.model_sha256:
        raise SystemExit(f"error: {cache_path} was retrained from another model")
    used, seeds = cache.usable()
    position = {q["id"]: k for k, q in enumerate(cache.queries)}
    losses = cache.loss_matrix(used, seeds)[:, [position[i] for i in query_ids]]
    rows = matching_corpus(engine, None)
    in_subset = lds.membership(
        [cache.subsets[m] for m in used], cache.doc_ids, [e.doc_id for e in rows]
    )
    return losses, in_subset


def measure_kind(kind: ScoreKind, args: argparse.Namespace) -> dict:
    setting = load_setting("demo", None)
    root = args.work / f"index-{kind}"
    ensure_build(setting, root, StoreConfig(score=kind), SketchConfig())
    engine = QueryEngine.open(root)
    try:
        prepared = [engine.prepare(q.query) for q in setting.queries]
        losses, in_subset = retrained_losses(args.cache, engine, [q.id for q in setting.queries])
        vectors, queries = exact_vectors(engine, prepared)
        exact = in_kind(sketch_scores(vectors, queries), np.linalg.norm(queries, axis=1), kind)
        stored_queries = engine.query_vectors(prepared)
        stored = in_kind(
            sketch_scores(engine.vectors, stored_queries),
            np.linalg.norm(stored_queries, axis=1),
            kind,
        )
        result = {
            "version": engine.version,
            "full_dim": int(vectors.shape[1]),
            "exact": compare(exact, exact, in_subset, losses),
            "kronecker": {"dim": engine.info.dim, **compare(stored, exact, in_subset, losses)},
            "hadamard": [],
        }
        for seed in tqdm(args.seeds, desc=f"{kind}: Hadamard sketches"):
            sketched = hadamard_sketch(vectors, args.dims, seed)
            sketched_queries = hadamard_sketch(queries, args.dims, seed)
            scores = in_kind(
                sketch_scores(sketched, sketched_queries),
                np.linalg.norm(sketched_queries, axis=1),
                kind,
            )
            result["hadamard"].append(
                {"seed": seed, "dim": args.dims, **compare(scores, exact, in_subset, losses)}
            )
        return result
    finally:
        engine.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE / "lds" / "demo.json")
    parser.add_argument("--work", type=Path, default=CACHE / "lds", help="the demo indexes")
    parser.add_argument("--kinds", type=comma_list(ScoreKind), default=tuple(ScoreKind))
    parser.add_argument("--dims", type=int, default=32_768, help="the Hadamard sketch's")
    parser.add_argument("--seeds", type=comma_ints, default=(0, 1, 2))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start_run(args.threads)
    result = {
        "load_average_start": list(os.getloadavg()),
        "kinds": {str(kind): measure_kind(kind, args) for kind in args.kinds},
        "load_average_end": list(os.getloadavg()),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
