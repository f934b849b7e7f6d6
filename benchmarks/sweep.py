"""Fidelity, fact tracing and bytes per example across index settings, on the demo model.

Sweeps the rank (in x out per module), score kind, damping and FAISS factory (with nprobe).
Everything is measured against exact EK-FAC (full space, no projection), computed once in one
streaming pass over the corpus and reused by every setting. The same pass also yields the
alternative "precondition in the full space with the full EK-FAC factors, then project"
(`v = P (H+λ)⁻¹ G Rᵀ`, query `P G_q Rᵀ`, issue 2), at every rank, since
`⟨P G_q Rᵀ, P (H+λ)⁻¹G Rᵀ⟩ = ⟨(H+λ)⁻¹ PᵀP G_q RᵀR, G⟩` is linear in the raw gradient `G`.

- rank: one real build per rank (IDMap,Flat), both score kinds from the same vectors (a cosine
  index stores the same vectors, normalised);
- damping: derived from the default build: a build with damping d stores
  `v ⊙ sqrt((Λ+λ₀)/(Λ+λ_d))` (same eigenbases and Λ, only λ differs), up to float16 rounding;
- FAISS factory: indexes over the default build's stored vectors, written by the build's own
  `write_faiss`, searched at several nprobe.

    .venv/bin/python -m benchmarks.sweep --out benchmarks/results/sweep.json

prints JSON to stdout and writes it to --out. About 10 minutes on 2 CPU cores once the demo
model is cached (training it first takes a few minutes more).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.common import demo_artifacts, emit
from indexer import metrics
from indexer.baselines import ScoreTarget, StreamedScores, flat_gradients, stream_scores
from indexer.build import build_index
from indexer.config import (
    BuildConfig,
    CorpusConfig,
    CurvatureConfig,
    SketchConfig,
    StoreConfig,
    example_max_length,
)
from indexer.corpus import Example, load_corpus
from indexer.curvature import Curvature, rotate
from indexer.engine import QueryEngine
from indexer.evaluate import (
    exact_influence_target,
    json_safe,
    sketch_scores,
)
from indexer.exact import ExactConfig, ExactScorer
from indexer.model import LoadedModel, load_model
from indexer.query import LabeledQuery, TokenizedQuery, query_capture, read_queries, tokenize_query
from indexer.sketch import Capture, gaussian_projection
from indexer.store import write_faiss

log = logging.getLogger("sweep")


@dataclass(frozen=True)
class SweepConfig:
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    default_rank: int = 64  # the uniform r x r per module this sweep chose (issue 8)
    dampings: tuple[float, ...] = (0.01, 0.1, 1.0)
    default_damping: float = CurvatureConfig.damping
    pq_bytes: tuple[int, ...] = (32, 128)  # two PQ code sizes, bytes per vector
    nprobes: tuple[int, ...] = (1, 4, 16)  # plus nlist (every list)
    ef_searches: tuple[int, ...] = (16, 64, 256)  # HNSW
    k: int = 10  # fidelity: exact top-k in the top-k; fact tracing: recall@k
    batch_size: int = 32
    progress: bool = True

    @property
    def all_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({*self.ranks, self.default_rank}))

    @property
    def all_dampings(self) -> tuple[float, ...]:
        return tuple(sorted({*self.dampings, self.default_damping}))


@dataclass
class Setup:
    """The demo model, corpus and queries every setting is measured on."""

    model_dir: Path
    corpus_path: Path
    loaded: LoadedModel
    examples: list[Example]
    queries: list[LabeledQuery]
    encoded: list[TokenizedQuery]

    @property
    def doc_ids(self) -> list[str]:
        return [e.doc_id for e in self.examples]


@dataclass
class Reference:
    """Exact EK-FAC scores `[Q, N]` per damping and kind; the full-space alternatives' scores
    `[Q, N]` per rank (influence, default damping)."""

    exact: dict[float, dict[str, np.ndarray]]
    schemes: dict[str, dict[int, np.ndarray]]  # alternative scheme -> rank -> [Q, N]
    n_modules: int
    seconds: float


@dataclass
class Measured:
    """One setting: fidelity against exact EK-FAC, fact tracing, size."""

    setting: dict
    spearman: float
    recall: float  # exact top-k within this setting's top-k
    fact_recall: float  # recall@k of the first gold document
    index_bytes_per_example: float | None = None
    vectors_bytes_per_example: float | None = None
    extra: dict = field(default_factory=dict)


def load_setup() -> Setup:
    artifacts = demo_artifacts()
    loaded = load_model(artifacts.model_dir)
    max_length = example_max_length(None, loaded.context_length)
    corpus = load_corpus(CorpusConfig(str(artifacts.corpus_path)), loaded.tokenizer, max_length)
    queries = read_queries(artifacts.queries_path)
    encoded = [tokenize_query(loaded.tokenizer, q.query, loaded.context_length) for q in queries]
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


def inverse_eigenvalues(curvature: Curvature) -> Tensor:
    """`1 / (Λ + λ)` of every module, flattened and concatenated: `[D]`."""
    return torch.cat(
        [(m.eigvals + m.damping).reciprocal().flatten() for m in curvature.modules.values()]
    )


class PerBatch:
    """`fn(capture)` computed once per batch, although several score targets ask for it."""

    def __init__(self, fn: Callable[[Capture], Tensor]):
        self.fn = fn
        self._capture: Capture | None = None
        self._value: Tensor | None = None

    def __call__(self, capture: Capture) -> Tensor:
        if capture is not self._capture:
            self._capture, self._value = capture, self.fn(capture)
        return self._value


def projected_fold(
    curvature: Curvature, query_gradients: dict[str, Tensor], rank: int, named: dict[str, nn.Module]
) -> Tensor:
    """Asymmetric scheme: `[Q, D_full]` matrices `M_q = (H+λ)⁻¹ PᵀP G_q RᵀR` with
    `⟨M_q, G⟩ = ⟨P G_q Rᵀ, P (H+λ)⁻¹G Rᵀ⟩`, with the build's projections at this rank."""
    parts = []
    for name, module in curvature.modules.items():
        p = gaussian_projection(name, named[name], rank, rank, SketchConfig.seed)
        folded = p.P.T @ p.P @ query_gradients[name] @ p.R.T @ p.R
        parts.append(module.fold(module.precondition(folded)).flatten(1))
    return torch.cat(parts, dim=1)


def whitened_fold(
    curvature: Curvature, exact_queries: Tensor, rank: int, named: dict[str, nn.Module]
) -> Tensor:
    """Symmetric scheme: `[Q, D]` queries whose inner product with an exact vector `v` (rotated,
    whitened `G`) is `⟨P Q̃ Rᵀ, P Ṽ Rᵀ⟩`, where `X̃ = (H+λ)^-1/2 X` in the full space."""
    slices = curvature.layer_slices()
    parts = []
    for name, module in curvature.modules.items():
        p = gaussian_projection(name, named[name], rank, rank, SketchConfig.seed)
        rotated = exact_queries[:, slices[name]].view(-1, *module.eigvals.shape)
        whitened = module.eigvecs_b @ rotated @ module.eigvecs_a.T
        projected = p.P.T @ p.P @ whitened @ p.R.T @ p.R
        parts.append(rotate(projected, module.eigvecs_a, module.eigvecs_b).flatten(1))
    return torch.cat(parts, dim=1)


def exact_reference(setup: Setup, config: SweepConfig) -> Reference:
    """Every exact and full-space-projected score of the sweep from one corpus pass.

    Raw gradients `G` score the exact queries of every damping and the asymmetric scheme;
    exact vectors (default damping, computed once per batch) score the symmetric scheme and,
    squared, give every damping's example norms: `|v_d|² = Σ v² (Λ+λ)/(Λ+λ_d)`.
    """
    start = time.perf_counter()
    scorer = ExactScorer(
        setup.loaded,
        setup.examples,
        ExactConfig(
            CurvatureConfig(damping=config.default_damping),
            batch_size=config.batch_size,
            progress=config.progress,
        ),
    )
    base = scorer.curvature
    capture = query_capture(scorer.sketcher, setup.encoded, setup.loaded.tokenizer.pad_token_id)
    dampings, ranks = config.all_dampings, config.all_ranks
    variants = {d: with_damping(base, d) for d in dampings}
    queries = {d: v.vectors(capture) for d, v in variants.items()}
    named = dict(setup.loaded.model.named_modules())
    raw = [exact_influence_target(variants[d], queries[d]).queries for d in dampings]
    raw += [projected_fold(base, capture.sketches(), r, named) for r in ranks]
    exact_vectors = PerBatch(base.vectors)
    base_inverse = inverse_eigenvalues(base)
    targets = {
        "raw": ScoreTarget(partial(flat_gradients, names=list(base.modules)), torch.cat(raw)),
        "whitened": ScoreTarget(
            exact_vectors,
            torch.cat(
                [whitened_fold(base, queries[config.default_damping], r, named) for r in ranks]
            ),
        ),
        "squared_norms": ScoreTarget(
            lambda c: exact_vectors(c).square(),
            torch.stack([inverse_eigenvalues(variants[d]) / base_inverse for d in dampings]),
        ),
    }
    streamed = stream_scores(scorer.pass_, targets, "exact reference")
    raw_blocks = np.split(streamed["raw"].dots, len(raw))
    exact = {}
    for i, damping in enumerate(dampings):
        norms = np.sqrt(np.maximum(streamed["squared_norms"].dots[i], 0.0))
        scores = StreamedScores(raw_blocks[i], norms)
        query_norms = queries[damping].double().norm(dim=1).numpy()
        exact[damping] = {"influence": scores.dots, "cosine": scores.cosine(query_norms)}
    schemes = {
        "precondition-full-then-project": dict(
            zip(ranks, raw_blocks[len(dampings) :], strict=True)
        ),
        "whiten-full-then-project": dict(
            zip(ranks, np.split(streamed["whitened"].dots, len(ranks)), strict=True)
        ),
    }
    return Reference(exact, schemes, len(base.modules), time.perf_counter() - start)


def fidelity(scores: np.ndarray, exact: np.ndarray, k: int) -> tuple[float, float]:
    """Mean Spearman over all examples, and mean recall of the exact top-k in the top-k."""
    pairs = list(zip(scores, exact, strict=True))
    spearman = metrics.mean(metrics.spearman(s, e) for s, e in pairs)
    recall = metrics.mean(metrics.top_k_recall(e, metrics.top_k(s, k), k) for s, e in pairs)
    return spearman, recall


def fact_recall(rankings: list[list[str]], queries: list[LabeledQuery], k: int) -> float:
    """Mean recall@k of the first gold document over the queries that have gold."""
    return metrics.mean(
        metrics.recall_at_k(metrics.first_gold_rank(r, q.gold), k)
        for r, q in zip(rankings, queries, strict=True)
        if q.gold
    )


def scores_fact_recall(scores: np.ndarray, setup: Setup, k: int) -> float:
    """Fact recall@k of full score rows `[Q, N]`, documents ranked by their best chunk."""
    rankings = [metrics.document_ranking(s, setup.doc_ids) for s in scores]
    return fact_recall(rankings, setup.queries, k)


def measure(
    setting: dict, scores: np.ndarray, exact: np.ndarray, setup: Setup, k: int, **sizes
) -> Measured:
    spearman, recall = fidelity(scores, exact, k)
    return Measured(setting, spearman, recall, scores_fact_recall(scores, setup, k), **sizes)


def in_kinds(streamed: StreamedScores, queries: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "influence": streamed.dots,
        "cosine": streamed.cosine(np.linalg.norm(queries, axis=1)),
    }


def build(setup: Setup, root: Path, rank: int, config: SweepConfig) -> dict:
    """A flat index at this rank with the default damping; the build summary."""
    summary = build_index(
        BuildConfig(
            model=setup.model_dir,
            out=root,
            corpus=CorpusConfig(str(setup.corpus_path)),
            sketch=SketchConfig(rank_in=rank, rank_out=rank),
            curvature=CurvatureConfig(damping=config.default_damping),
            store=StoreConfig(index_factory="IDMap,Flat"),
            batch_size=config.batch_size,
            progress=config.progress,
        )
    )
    return summary.to_dict()


def measure_rank(
    setup: Setup, reference: Reference, root: Path, rank: int, config: SweepConfig
) -> list[Measured]:
    """Build at `rank`; both score kinds against exact scores of the same kind."""
    summary = build(setup, root, rank, config)
    engine = QueryEngine.open(root)
    q = engine.query_vectors(setup.encoded)
    kinds = in_kinds(sketch_scores(engine.vectors.preconditioned, q), q)
    engine.close()
    sizes = {"index_bytes_per_example": summary["index_bytes_per_example"]}
    return [
        measure(
            {"rank": f"{rank}x{rank}", "damping": config.default_damping, "score": kind},
            scores,
            reference.exact[config.default_damping][kind],
            setup,
            config.k,
            **sizes,
            extra={"dim": summary["dim"], "build_seconds": summary["seconds"]},
        )
        for kind, scores in kinds.items()
    ]


def damping_scale(curvature: Curvature, factor: float) -> np.ndarray:
    """Per-column `sqrt((Λ+λ₀)/(Λ+λ_d))` turning stored vectors into those of damping d."""
    other = with_damping(curvature, factor)
    ratio = inverse_eigenvalues(other) / inverse_eigenvalues(curvature)
    return ratio.sqrt().numpy()


def measure_dampings(
    setup: Setup, reference: Reference, root: Path, config: SweepConfig
) -> list[Measured]:
    """Each damping at the default rank, derived from the default build's vectors."""
    engine = QueryEngine.open(root)
    q = engine.query_vectors(setup.encoded)
    rows = []
    for damping in config.all_dampings:
        scale = damping_scale(engine.curvature, damping)
        kinds = in_kinds(sketch_scores(engine.vectors.preconditioned, q, scale), q * scale)
        for kind, scores in kinds.items():
            setting = {
                "rank": f"{config.default_rank}x{config.default_rank}",
                "damping": damping,
                "score": kind,
            }
            rows.append(measure(setting, scores, reference.exact[damping][kind], setup, config.k))
    engine.close()
    return rows


def nlist_for(n: int) -> int:
    """IVF lists for n examples: about sqrt(n) (45 for the demo's ~2k examples)."""
    return max(1, round(math.sqrt(n)))


def factories(dim: int, n: int, config: SweepConfig) -> list[str]:
    """Exact; IVF + SQ8; IVF + PQ at each code size that divides the dimension; and two that
    need no clustering: a scan over 8-bit codes, and an HNSW graph over them."""
    nlist = nlist_for(n)
    pq = [f"IVF{nlist},PQ{m}" for m in config.pq_bytes if dim % m == 0]
    return ["IDMap,Flat", f"IVF{nlist},SQ8", *pq, "IDMap,SQ8", "IDMap,HNSW32,SQ8"]


@dataclass
class Search:
    ann_recall: float  # flat-sketch top-k within the FAISS top-k
    recall: float  # exact top-k within the FAISS top-k
    fact_recall: float
    ms_per_query: float


def measure_search(
    setup: Setup, index: faiss.Index, q: np.ndarray, flat: np.ndarray, exact: np.ndarray, k: int
) -> Search:
    """FAISS top-`10k` for every query (ids = rows), judged against flat search and exact."""
    start = time.perf_counter()
    _, hits = index.search(np.ascontiguousarray(q), 10 * k)
    seconds = time.perf_counter() - start
    found = [[int(i) for i in row if i >= 0] for row in hits]

    def recall(reference: np.ndarray) -> float:
        return metrics.mean(
            metrics.top_k_recall(r, f, k) for r, f in zip(reference, found, strict=True)
        )

    rankings = [metrics.rank_documents(setup.doc_ids[i] for i in f) for f in found]
    return Search(
        recall(flat),
        recall(exact),
        fact_recall(rankings, setup.queries, k),
        1000 * seconds / len(found),
    )


def code_bytes(index: faiss.Index) -> int | None:
    """Bytes stored per vector, code plus 64-bit id (file size / N adds the fixed codebooks and
    centroids, which dominate on a small corpus); None where FAISS cannot tell (HNSW)."""
    try:
        return faiss.extract_index_ivf(index).code_size + 8
    except RuntimeError:  # not an IVF index
        pass
    try:
        return index.sa_code_size() + 8
    except RuntimeError:
        return None


def measure_factories(
    setup: Setup, reference: Reference, root: Path, work: Path, config: SweepConfig
) -> list[Measured]:
    """Each FAISS factory over the default build's stored vectors, per score kind and search
    setting."""
    engine = QueryEngine.open(root)
    vectors, q = engine.vectors.preconditioned, engine.query_vectors(setup.encoded)
    flat = in_kinds(sketch_scores(vectors, q), q)
    n, dim = vectors.shape
    rows = []
    for kind in ("influence", "cosine"):
        search_q = q / np.linalg.norm(q, axis=1, keepdims=True) if kind == "cosine" else q
        exact = reference.exact[config.default_damping][kind]
        for factory in factories(dim, n, config):
            setting = {
                "rank": f"{config.default_rank}x{config.default_rank}",
                "score": kind,
                "factory": factory,
            }
            path = work / f"{kind}-{factory.replace(',', '_')}.faiss"
            start = time.perf_counter()
            try:
                index = write_faiss(
                    vectors,
                    np.arange(n, dtype=np.int64),
                    factory,
                    path,
                    normalize=kind == "cosine",
                )
            except RuntimeError as e:  # the build's index writer cannot make this factory
                log.warning("%s (%s): %s", factory, kind, e)
                error = {"error": str(e).splitlines()[0]}
                rows.append(Measured(setting, math.nan, math.nan, math.nan, extra=error))
                continue
            seconds = time.perf_counter() - start
            for knob in search_knobs(index, n, config):
                search = measure_search(setup, index, search_q, flat[kind], exact, config.k)
                rows.append(
                    Measured(
                        setting={**setting, **knob},
                        spearman=math.nan,
                        recall=search.recall,
                        fact_recall=search.fact_recall,
                        index_bytes_per_example=path.stat().st_size / n,
                        extra={
                            "code_bytes_per_example": code_bytes(index),
                            "ann_recall_vs_flat": search.ann_recall,
                            "search_ms_per_query": search.ms_per_query,
                            "train_add_seconds": seconds,
                        },
                    )
                )
    engine.close()
    return rows


def search_knobs(index: faiss.Index, n: int, config: SweepConfig) -> Iterator[dict]:
    """Set each search-time setting on `index` in turn and yield it: IVF nprobe (the sweep and
    every list), HNSW efSearch; one empty setting for the others."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
    if ivf is not None:
        for nprobe in sorted({*(p for p in config.nprobes if p < ivf.nlist), ivf.nlist}):
            ivf.nprobe = nprobe
            yield {"nprobe": nprobe}
    elif isinstance(inner, faiss.IndexHNSW):
        for ef in config.ef_searches:
            inner.hnsw.efSearch = ef
            yield {"efSearch": ef}
    else:
        yield {}


def measure_schemes(setup: Setup, reference: Reference, config: SweepConfig) -> list[Measured]:
    """The full-space alternatives, per rank (influence kind, default damping)."""
    exact = reference.exact[config.default_damping]["influence"]
    return [
        measure(
            {"rank": f"{rank}x{rank}", "scheme": scheme},
            scores,
            exact,
            setup,
            config.k,
            vectors_bytes_per_example=2.0 * rank * rank * reference.n_modules,
        )
        for scheme, by_rank in reference.schemes.items()
        for rank, scores in by_rank.items()
    ]


def exact_fact_recall(setup: Setup, reference: Reference, k: int) -> list[dict]:
    """Fact tracing with exact EK-FAC itself, per damping and kind: what the index aims at."""
    return [
        {"damping": d, "score": kind, "fact_recall": scores_fact_recall(scores, setup, k)}
        for d, kinds in reference.exact.items()
        for kind, scores in kinds.items()
    ]


def reference_agreement(reference: Reference, config: SweepConfig) -> list[dict]:
    """Exact EK-FAC at another damping against exact at the default one: how far a reasonable
    change of the reference itself moves the ranking (a yardstick for the fidelity goals)."""
    base = reference.exact[config.default_damping]
    rows = []
    for damping, kinds in reference.exact.items():
        if damping == config.default_damping:
            continue
        for kind, scores in kinds.items():
            spearman, recall = fidelity(scores, base[kind], config.k)
            rows.append({"damping": damping, "score": kind, "spearman": spearman, "recall": recall})
    return rows


def run(config: SweepConfig) -> dict:
    started = time.perf_counter()
    setup = load_setup()
    reference = exact_reference(setup, config)
    log.info("exact reference: %.1f s", reference.seconds)
    ranks: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        work = Path(tmp)
        for rank in config.all_ranks:
            log.info("build at rank %dx%d", rank, rank)
            ranks += measure_rank(setup, reference, work / f"rank{rank}", rank, config)
        default_root = work / f"rank{config.default_rank}"
        dampings = measure_dampings(setup, reference, default_root, config)
        factory_rows = measure_factories(setup, reference, default_root, work, config)
    return {
        "setup": {
            "model": str(setup.model_dir),
            "corpus": str(setup.corpus_path),
            "n_examples": len(setup.examples),
            "n_queries": len(setup.queries),
            "n_with_gold": sum(bool(q.gold) for q in setup.queries),
            "config": asdict(config),
        },
        "exact_reference_seconds": reference.seconds,
        "exact": exact_fact_recall(setup, reference, config.k),
        "exact_vs_exact_at_default_damping": reference_agreement(reference, config),
        "ranks": [asdict(m) for m in ranks],
        "dampings": [asdict(m) for m in dampings],
        "factories": [asdict(m) for m in factory_rows],
        "full_space_schemes": [asdict(m) for m in measure_schemes(setup, reference, config)],
        "seconds": time.perf_counter() - started,
    }


def _numbers(kind: type):
    return lambda text: tuple(kind(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--ranks", type=_numbers(int), default=SweepConfig.ranks)
    parser.add_argument("--dampings", type=_numbers(float), default=SweepConfig.dampings)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = SweepConfig(ranks=args.ranks, dampings=args.dampings, progress=not args.quiet)
    emit(json_safe(run(config)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
