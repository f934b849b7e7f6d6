"""Which projection makes the compact retrieval code (issue 14): principal directions or random.

    .venv/bin/python -m benchmarks.compact_projections --setting 100k --work .cache/issue14/100k \
        --out benchmarks/results/compact-projections-100k.json

For a setting already built by `benchmarks.tiers` (its version and exact reference, cached
under `--work`), each projection in `--projections` makes a compact code as
`indexer.retrieval.build_compact_index` does (the projection, then `--quantizer` trained on the
same 4,096-row sample, every stored row added) and is searched through `TieredSearcher`:
recall of the flat top-10 within the tier's top-10 and of the exact top-10 within its top-200
(the exact stage's depth), at each K″ in `--candidates`.

Projections `[D, dims]`: `pca` (the top principal directions of the sample: the builds'
until this comparison), `random` (`indexer.retrieval.random_directions`, what builds make
now: inner products kept in every direction, Johnson-Lindenstrauss), `hybrid:M` (M principal
directions, the rest random over their orthogonal complement, scaled by
√((D − M) / (dims − M)) so that the residual's inner products keep their weight beside the
principal part's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import comma_ints, comma_list, emit, start_run
from benchmarks.tiers import DEPTH, TOP, recall, recall_exact, setting_queries
from indexer.engine import QueryEngine
from indexer.retrieval import (
    TieredSearcher,
    encode_rows,
    linear_transform,
    pre_transformed,
    random_directions,
    training_sample,
)
from indexer.store import new_index


def principal_directions(sample: np.ndarray, dims: int) -> np.ndarray:
    """The top `dims` right singular vectors `[D, dims]` (float32) of `sample [n, D]`, uncentered
    (the compact code's projection before random ones replaced it): from the eigenvectors of
    the Gram matrix `[n, n]` (n < D here), `V = xᵀ U S⁻¹`."""
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    eigvals, eigvecs = torch.linalg.eigh((x @ x.T).double())
    top = eigvecs[:, torch.argsort(eigvals, descending=True)[:dims]]
    directions = x.T.double() @ top
    return (directions / directions.norm(dim=0).clamp_min(1e-30)).float().numpy()


def projection(kind: str, sample: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """The projection `[D, dims]` (float32) named `kind` (see the module's docstring)."""
    if kind == "pca":
        return principal_directions(sample, dims)
    if kind == "random":
        return random_directions(sample.shape[1], dims, seed)
    principal = int(kind.removeprefix("hybrid:"))
    kept = principal_directions(sample, principal)
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal((sample.shape[1], dims - principal)).astype(np.float32)
    gaussian -= kept @ (kept.T @ gaussian)
    scale = np.sqrt((sample.shape[1] - principal) / (dims - principal))
    return np.concatenate([kept, np.linalg.qr(gaussian)[0] * scale], axis=1).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("100k", "large"), default="100k")
    parser.add_argument("--work", type=Path, required=True, help="benchmarks.tiers' --work")
    parser.add_argument("--queries", type=int, default=64, help="fact queries (100k setting)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--projections", type=comma_list(str), default=("pca", "random", "hybrid:256")
    )
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--quantizer", default="PQ512x4fs")
    parser.add_argument("--candidates", type=comma_ints, default=(1000, 2000))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    start_run(args.threads)
    root = args.work / ("root" if args.setting == "100k" else "default-cosine")
    queries, tops = setting_queries(args, root, exact=True)
    engine = QueryEngine.open(root)
    stored = engine.index
    _, flat_ids = stored.search(queries, DEPTH)
    sample = training_sample(stored, seed=0)
    result = {
        "benchmark": "compact_projections",
        "setting": args.setting,
        "n_examples": stored.ntotal,
        "dims": args.dims,
        "quantizer": args.quantizer,
        "flat_recall_exact_top10_within_depth": recall_exact(flat_ids, tops),
        "projections": [],
    }
    for kind in args.projections:
        start = time.perf_counter()
        directions = projection(kind, sample, args.dims, seed=0)
        quantizer = new_index(args.dims, args.quantizer)
        compact = pre_transformed([linear_transform(directions)], quantizer)
        compact = encode_rows(stored, compact, sample)
        row = {"projection": kind, "build_seconds": time.perf_counter() - start, "candidates": []}
        for candidates in args.candidates:
            tiered = TieredSearcher(compact, stored, candidates)
            row["candidates"].append(
                {
                    "candidates": candidates,
                    "recall_flat_top10": recall(tiered.search(queries, TOP)[1], flat_ids[:, :TOP]),
                    "recall_exact_top10_within_depth": recall_exact(
                        tiered.search(queries, DEPTH)[1], tops
                    ),
                }
            )
        result["projections"].append(row)
    engine.close()
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
