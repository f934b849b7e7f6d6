"""Fidelity, fact tracing and bytes per example across index settings, on the demo model.

Sweeps rank (in x out per module), score kind, damping and FAISS factory (with nprobe), measuring
against exact EK-FAC (full space, no projection), which is computed once in a single streaming
pass and reused by every setting. Also measures the alternative "precondition in the full space
with the full EK-FAC factors, then project" (`v = P (H+λ)⁻¹ G Rᵀ`, query `P G_q Rᵀ`), which the
same pass yields for free: `⟨P G_q Rᵀ, P G̃ Rᵀ⟩ = ⟨precondition(PᵀP G_q RᵀR), v_exact⟩`.

    .venv/bin/python benchmarks/sweep.py --out benchmarks/results/sweep.json

prints JSON to stdout and writes it to --out. About 10 minutes on 2 CPU cores (the demo model is
trained first if it is not cached, which takes a few minutes more).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

from indexer import metrics
from indexer.baselines import ScoreTarget, stream_scores
from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig, CurvatureConfig, SketchConfig, StoreConfig
from indexer.corpus import Example, load_corpus
from indexer.curvature import Curvature
from indexer.demo.train import ensure_demo_model
from indexer.evaluate import QuerySpec, read_queries, sketch_scores
from indexer.exact import ExactConfig, ExactScorer
from indexer.model import DEFAULT_MAX_LENGTH, LoadedModel, load_model
from indexer.query import EncodedQuery, encode_query, query_capture
from indexer.sketch import gaussian_projection
from indexer.store import write_faiss
from server.engine import QueryEngine

log = logging.getLogger("sweep")

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SweepConfig:
    cache_dir: Path
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    default_rank: int = 32
    dampings: tuple[float, ...] = (0.01, 0.1, 1.0)
    default_damping: float = 0.1
    pq_bytes: tuple[int, ...] = (64, 256)  # PQ code sizes (bytes per vector), two of them
    nprobes: tuple[int, ...] = (1, 4, 16)
    k: int = 10  # top-k for fidelity recall and fact-tracing recall
    depth: int = 100  # examples retrieved per query
    batch_size: int = 16
    progress: bool = True


@dataclass
class Setup:
    """The demo model, corpus and queries every setting is measured on."""

    model_dir: Path
    corpus_path: Path
    loaded: LoadedModel
    examples: list[Example]
    queries: list[QuerySpec]
    encoded: list[EncodedQuery]

    @property
    def doc_ids(self) -> list[str]:
        return [e.doc_id for e in self.examples]


@dataclass
class Reference:
    """Exact EK-FAC scores `[Q, N]` per damping and kind, and the full-space-preconditioned,
    projected scores per rank (influence kind, default damping)."""

    exact: dict[float, dict[str, np.ndarray]]
    projected: dict[int, np.ndarray]
    n_modules: int
    seconds: float


@dataclass
class Measured:
    """One setting's numbers: fidelity against exact, fact tracing, size, time."""

    setting: dict
    spearman: float
    recall: float  # exact top-k within this setting's top-k
    fact_recall: float  # recall@k of the first gold document
    index_bytes_per_example: float | None = None
    vectors_bytes_per_example: float | None = None
    extra: dict = field(default_factory=dict)


def load_setup(config: SweepConfig) -> Setup:
    artifacts = ensure_demo_model(config.cache_dir, progress=config.progress)
    loaded = load_model(artifacts.model_dir)
    max_length = min(loaded.context_length, DEFAULT_MAX_LENGTH)
    corpus = load_corpus(CorpusConfig(str(artifacts.corpus_path)), loaded.tokenizer, max_length)
    queries = read_queries(artifacts.queries_path)
    encoded = [
        encode_query(loaded.tokenizer, q.prompt, q.completion, loaded.context_length)
        for q in queries
    ]
    return Setup(
        artifacts.model_dir, artifacts.corpus_path, loaded, corpus.examples, queries, encoded
    )


def with_damping(curvature: Curvature, factor: float) -> Curvature:
    """The same factors with `λ = factor · mean(Λ)` per module."""
    return Curvature(
        {
            name: replace(m, damping=factor * m.eigvals.mean().item())
            for name, m in curvature.modules.items()
        }
    )


def projected_query_vectors(
    curvature: Curvature, query_gradients: dict[str, Tensor], rank: int, seed: int, named
) -> Tensor:
    """Query-side vectors `[Q, D_full]` whose inner product with an exact example vector is the
    score of the full-space-preconditioned, projected scheme at `rank`:
    `⟨P G_q Rᵀ, P (H+λ)⁻¹G Rᵀ⟩ = ⟨precondition(PᵀP G_q RᵀR), precondition(G)⟩`."""
    parts = []
    for name, module in curvature.modules.items():
        p = gaussian_projection(name, named[name], rank, rank, seed)
        folded = p.P.T @ p.P @ query_gradients[name] @ p.R.T @ p.R
        parts.append(module.precondition(folded))
    return torch.cat(parts, dim=1)


def exact_reference(setup: Setup, config: SweepConfig) -> Reference:
    """One full-gradient pass for every exact score the sweep compares against."""
    start = time.perf_counter()
    curvature_config = CurvatureConfig(damping=config.default_damping)
    scorer = ExactScorer(
        setup.loaded,
        setup.examples,
        ExactConfig(curvature_config, batch_size=config.batch_size, progress=config.progress),
    )
    base = scorer.curvature
    capture = query_capture(scorer.sketcher, setup.encoded, setup.loaded.tokenizer.pad_token_id)
    query_gradients = capture.sketches()
    named = dict(setup.loaded.model.named_modules())
    n_queries = len(setup.queries)
    projected = [projected_query_vectors(base, query_gradients, r, 0, named) for r in config.ranks]
    targets = {}
    for damping in config.dampings:
        variant = with_damping(base, damping)
        queries = variant.vectors(capture)
        if damping == config.default_damping:
            queries = torch.cat([queries, *projected])
        targets[str(damping)] = ScoreTarget(variant.vectors, queries)
    streamed = stream_scores(scorer.pass_, targets, "exact reference")
    exact, projected_scores = {}, {}
    for damping in config.dampings:
        result = streamed[str(damping)]
        q = targets[str(damping)].queries[:n_queries]
        influence = result.dots[:n_queries]
        cosine = influence / np.maximum(np.outer(q.double().norm(dim=1), result.norms), 1e-30)
        exact[damping] = {"influence": influence, "cosine": cosine}
        if damping == config.default_damping:
            for i, rank in enumerate(config.ranks, start=1):
                projected_scores[rank] = result.dots[i * n_queries : (i + 1) * n_queries]
    n_modules = len(base.modules)
    return Reference(exact, projected_scores, n_modules, time.perf_counter() - start)


def fidelity(scores: np.ndarray, exact: np.ndarray, k: int) -> tuple[float, float]:
    """Mean Spearman over all examples and mean recall of the exact top-k in the top-k."""
    spearman = metrics.mean(metrics.spearman(s, e) for s, e in zip(scores, exact, strict=True))
    recall = metrics.mean(
        metrics.top_k_recall(metrics.top_k(e, k), metrics.top_k(s, k), k)
        for s, e in zip(scores, exact, strict=True)
    )
    return spearman, recall


def fact_recall(rankings: list[list[str]], queries: list[QuerySpec], k: int) -> float:
    """Mean recall@k of the first gold document over queries that have gold."""
    return metrics.mean(
        metrics.recall_at_k(metrics.first_gold_rank(r, q.gold), k)
        for r, q in zip(rankings, queries, strict=True)
        if q.gold
    )


def full_scores_fact_recall(scores: np.ndarray, setup: Setup, k: int) -> float:
    rankings = [metrics.document_ranking(s, setup.doc_ids) for s in scores]
    return fact_recall(rankings, setup.queries, k)


def build(setup: Setup, out: Path, rank: int, damping: float, config: SweepConfig) -> dict:
    """Build a flat index with this rank and damping; return the build summary."""
    summary = build_index(
        BuildConfig(
            model=setup.model_dir,
            out=out,
            corpus=CorpusConfig(str(setup.corpus_path)),
            sketch=SketchConfig(rank_in=rank, rank_out=rank),
            curvature=CurvatureConfig(damping=damping),
            store=StoreConfig(index_factory="IDMap,Flat"),
            batch_size=config.batch_size,
            progress=config.progress,
        )
    )
    return summary.to_dict()


@dataclass
class SketchScores:
    """An index's stored sketches scored exhaustively, in both kinds, and its query vectors."""

    kinds: dict[str, np.ndarray]
    queries: np.ndarray
    engine: QueryEngine


def score_index(root: Path, setup: Setup) -> SketchScores:
    engine = QueryEngine.open(root)
    q = engine.query_vectors(setup.encoded)
    streamed = sketch_scores(engine.vectors, q)
    kinds = {
        "influence": streamed.dots,
        "cosine": streamed.cosine(np.linalg.norm(q, axis=1)),
    }
    return SketchScores(kinds, q, engine)


def measure_build(
    setup: Setup, reference: Reference, root: Path, rank: int, damping: float, config: SweepConfig
) -> list[Measured]:
    """Both score kinds of one built index against exact scores of the same damping."""
    summary = build(setup, root, rank, damping, config)
    scored = score_index(root, setup)
    scored.engine.close()
    rows = []
    for kind, scores in scored.kinds.items():
        spearman, recall = fidelity(scores, reference.exact[damping][kind], config.k)
        rows.append(
            Measured(
                setting={"rank": f"{rank}x{rank}", "damping": damping, "score": kind},
                spearman=spearman,
                recall=recall,
                fact_recall=full_scores_fact_recall(scores, setup, config.k),
                index_bytes_per_example=summary["index_bytes_per_example"],
                vectors_bytes_per_example=summary["vectors_bytes_per_example"],
                extra={"dim": summary["dim"], "build_seconds": summary["seconds"]},
            )
        )
    return rows


def nlist_for(n: int) -> int:
    """IVF lists for a corpus of n examples: about sqrt(n) (45 for the demo's ~2k examples)."""
    return max(1, round(math.sqrt(n)))


def factories(dim: int, n: int, config: SweepConfig) -> list[str]:
    """Exact, IVF + SQ8, and IVF + PQ at each code size that divides the dimension."""
    nlist = nlist_for(n)
    pq = [f"IVF{nlist},PQ{m}" for m in config.pq_bytes if dim % m == 0]
    return ["IDMap,Flat", f"IVF{nlist},SQ8", *pq]


@dataclass
class Search:
    ann_recall: float  # flat-sketch top-k within the FAISS top-k
    recall: float  # exact top-k within the FAISS top-k
    fact_recall: float
    ms_per_query: float


def measure_search(
    setup: Setup, index: faiss.Index, index_scores: SketchScores, exact: np.ndarray, k: int
) -> Search:
    """FAISS top-`depth` for every query, judged against flat search and against exact."""
    sketch, depth = index_scores.kinds["influence"], 10 * k
    start = time.perf_counter()
    _, hits = index.search(np.ascontiguousarray(index_scores.queries), depth)
    seconds = time.perf_counter() - start
    found = [[int(i) for i in row if i >= 0] for row in hits]

    def recall(reference: np.ndarray) -> float:
        return metrics.mean(
            metrics.top_k_recall(metrics.top_k(r, k), f, k)
            for r, f in zip(reference, found, strict=True)
        )

    rankings = [metrics.rank_documents(setup.doc_ids[i] for i in f) for f in found]
    return Search(
        ann_recall=recall(sketch),
        recall=recall(exact),
        fact_recall=fact_recall(rankings, setup.queries, k),
        ms_per_query=1000 * seconds / len(found),
    )


def measure_factories(
    setup: Setup, reference: Reference, root: Path, work: Path, config: SweepConfig
) -> list[Measured]:
    """Each FAISS factory over the default build's stored vectors, at each nprobe (influence)."""
    index_scores = score_index(root, setup)
    vectors = index_scores.engine.vectors
    n, dim = vectors.shape
    nlist = nlist_for(n)
    exact = reference.exact[config.default_damping]["influence"]
    ids = np.arange(n, dtype=np.int64)  # ids = rows, so hits index the corpus directly
    rows = []
    for factory in factories(dim, n, config):
        path = work / f"{factory.replace(',', '_')}.faiss"
        start = time.perf_counter()
        index = write_faiss(vectors, ids, factory, False, path)
        train_seconds = time.perf_counter() - start
        ivf = factory.startswith("IVF")
        for nprobe in sorted({*(p for p in config.nprobes if p < nlist), nlist}) if ivf else [None]:
            if nprobe is not None:
                faiss.extract_index_ivf(index).nprobe = nprobe
            search = measure_search(setup, index, index_scores, exact, config.k)
            rows.append(
                Measured(
                    setting={
                        "rank": f"{config.default_rank}x{config.default_rank}",
                        "factory": factory,
                        "nprobe": nprobe,
                    },
                    spearman=math.nan,
                    recall=search.recall,
                    fact_recall=search.fact_recall,
                    index_bytes_per_example=path.stat().st_size / n,
                    extra={
                        "ann_recall_vs_flat_sketch": search.ann_recall,
                        "search_ms_per_query": search.ms_per_query,
                        "train_add_seconds": train_seconds,
                    },
                )
            )
    index_scores.engine.close()
    return rows


def measure_projected(setup: Setup, reference: Reference, config: SweepConfig) -> list[Measured]:
    """The full-space-preconditioned, projected alternative, per rank (influence kind)."""
    exact = reference.exact[config.default_damping]["influence"]
    rows = []
    for rank, scores in reference.projected.items():
        spearman, recall = fidelity(scores, exact, config.k)
        rows.append(
            Measured(
                setting={"rank": f"{rank}x{rank}", "scheme": "precondition-full-then-project"},
                spearman=spearman,
                recall=recall,
                fact_recall=full_scores_fact_recall(scores, setup, config.k),
                vectors_bytes_per_example=2.0 * rank * rank * reference.n_modules,
            )
        )
    return rows


def exact_rows(setup: Setup, reference: Reference, config: SweepConfig) -> list[dict]:
    """Fact tracing with exact EK-FAC itself, per damping and kind: what the index aims at."""
    return [
        {
            "damping": damping,
            "score": kind,
            "fact_recall": full_scores_fact_recall(scores, setup, config.k),
        }
        for damping, kinds in reference.exact.items()
        for kind, scores in kinds.items()
    ]


def run(config: SweepConfig) -> dict:
    started = time.perf_counter()
    setup = load_setup(config)
    reference = exact_reference(setup, config)
    log.info("exact reference: %.1f s", reference.seconds)
    builds: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        work = Path(tmp)
        settings = [(r, config.default_damping) for r in config.ranks] + [
            (config.default_rank, d) for d in config.dampings if d != config.default_damping
        ]
        for rank, damping in settings:
            log.info("build rank %d, damping %g", rank, damping)
            root = work / f"r{rank}-d{damping}"
            builds += measure_build(setup, reference, root, rank, damping, config)
        default_root = work / f"r{config.default_rank}-d{config.default_damping}"
        factory_rows = measure_factories(setup, reference, default_root, work, config)
    projected_rows = measure_projected(setup, reference, config)
    return {
        "setup": {
            "model": str(setup.model_dir),
            "corpus": str(setup.corpus_path),
            "n_examples": len(setup.examples),
            "n_queries": len(setup.queries),
            "n_with_gold": sum(bool(q.gold) for q in setup.queries),
            "k": config.k,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        },
        "exact_reference_seconds": reference.seconds,
        "exact": exact_rows(setup, reference, config),
        "builds": [asdict(m) for m in builds],
        "factories": [asdict(m) for m in factory_rows],
        "full_space_preconditioned": [asdict(m) for m in projected_rows],
        "seconds": time.perf_counter() - started,
    }


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "demo")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--ranks", type=_ints, default=SweepConfig.ranks)
    parser.add_argument("--dampings", type=_floats, default=SweepConfig.dampings)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = SweepConfig(
        cache_dir=args.cache_dir, ranks=args.ranks, dampings=args.dampings, progress=not args.quiet
    )
    text = json.dumps(_json_safe(run(config)), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def _json_safe(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
