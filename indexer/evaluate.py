"""`influence-index eval`: does the index find what exact influence finds, and the facts' sources?

Methods compared on the same queries (each timed):
- `index`: the sketch path (query gradient, FAISS search, metadata lookup), one query at a time;
- `index+rerank`: the service path with exact re-ranking of the top K′ candidates, and
  `index+lexical+rerank` with BM25 candidates joining them (when the version stores what
  they need);
- `exact`: full EK-FAC with no projection, same corpus, modules and curvature settings as the build;
- `bm25`, `grad-cosine`: the baselines of `indexer.baselines`; `no-curvature`: the stored
  sketches with their EK-FAC preconditioning undone, in the index's kind (for cosine, TrackStar
  without its curvature: unit-normalised projected gradients).

Fidelity separates the two error sources: *sketch* error (stored sketches scored exhaustively vs
exact) and *compression* error (FAISS vs exhaustive search over the stored sketches).

With a retraining cache (`--lds`, see `indexer.lds` and `benchmarks/lds.py`), every method also
gets its linear datamodeling score: truth against retraining rather than agreement with exact
EK-FAC.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from indexer import lds, metrics
from indexer.baselines import (
    BM25Scorer,
    GradientCosine,
    GradientCosineConfig,
    ScoreTarget,
    StreamedScores,
    flat_gradients,
    stream_scores,
)
from indexer.config import CorpusConfig, ScoreKind, check_batch_size
from indexer.corpus import Example, document_batches, load_corpus
from indexer.curvature import Curvature
from indexer.engine import EngineOptions, QueryEngine
from indexer.errors import InvalidInputError
from indexer.exact import DEFAULT_MEMORY_LIMIT, ExactConfig, ExactScorer
from indexer.query import LabeledQuery, TokenizedQuery, query_vectors
from indexer.scores import RerankBound
from indexer.store import StoredVectors, VectorsAtNorms

log = logging.getLogger(__name__)

BASELINES = ("bm25", "grad-cosine", "no-curvature")
SCORE_CHUNK_ROWS = 8192
T = TypeVar("T")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and against what."""

    index: Path = field(metadata={"help": "index ROOT"})
    queries: tuple[LabeledQuery, ...]
    exact: bool = field(
        default=False, metadata={"help": "compare with exact EK-FAC (small models)"}
    )
    baselines: tuple[str, ...] = field(
        default=(),
        metadata={"help": "comma list of: " + ", ".join(BASELINES), "choices": BASELINES},
    )
    # fidelity: recall of the exact top-k within the top-k
    ks: tuple[int, ...] = field(
        default=(10, 100), metadata={"help": "fidelity ks", "flags": ("-k", "--k"), "min": 1}
    )
    # fact tracing: recall@k of the first gold document
    fact_ks: tuple[int, ...] = field(
        default=(1, 10), metadata={"help": "fact-tracing ks", "flags": ("--fact-k",), "min": 1}
    )
    version: str | None = field(default=None, metadata={"help": "a version id (default: CURRENT)"})
    data: str | None = field(
        default=None, metadata={"help": "corpus path or glob, if it moved since the build"}
    )
    batch_size: int = field(default=32, metadata={"help": "examples per pass batch"})
    memory_limit_bytes: int = field(
        default=DEFAULT_MEMORY_LIMIT,
        metadata={
            "help": "refuse exact/gradient baselines needing more",
            "flags": ("--memory-limit-gb",),
            "unit": 1 << 30,
        },
    )
    device: str = field(default="cpu", metadata={"help": "torch device"})
    progress: bool = True
    rerank_depth: int = field(
        default=EngineOptions.rerank_depth,
        metadata={"help": "K′ of the re-ranked methods (0: evaluate the sketch only)"},
    )
    lexical_candidates: int = field(
        default=100, metadata={"help": "BM25 candidates of the index+lexical+rerank method"}
    )
    lds: Path | None = field(
        default=None,
        metadata={
            "help": "retraining cache (benchmarks/lds.py): report each method's linear "
            "datamodeling score",
            "flags": ("--lds",),
        },
    )

    @property
    def depth(self) -> int:
        """How many examples the index retrieves per query: ranks beyond it count as misses."""
        return max(*self.ks, *self.fact_ks)


@dataclass
class MethodReport:
    """One method's wall time and its fact-tracing means over the queries with gold."""

    seconds: float
    seconds_per_query: float
    fact: dict[str, float] = field(default_factory=dict)


@dataclass
class QueryReport:
    id: str
    has_gold: bool
    fidelity: dict[str, float] = field(default_factory=dict)
    first_gold_rank: dict[str, int | None] = field(default_factory=dict)
    lds: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    """Everything `eval` measured; `to_dict()` is its JSON. `scores` (per method `[Q, N]`, by
    corpus row) is kept for plots and never serialised."""

    index: str
    version: str
    score_kind: ScoreKind
    faiss_factory: str
    n_examples: int
    dim: int
    depth: int
    ks: list[int]
    n_queries: int
    n_with_gold: int
    fidelity: dict[str, float] = field(default_factory=dict)
    fidelity_curves: dict[str, list[float]] = field(default_factory=dict)
    methods: dict[str, MethodReport] = field(default_factory=dict)
    queries: list[QueryReport] = field(default_factory=list)
    # per method: mean LDS over queries and its bootstrap interval (`indexer.lds.Estimate`)
    lds: dict[str, dict[str, float]] = field(default_factory=dict)
    lds_settings: dict[str, object] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["scores"]
        return json_safe(data)


def json_safe(value: object) -> object:
    """NaN (an undefined metric) becomes null, so the output is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def sketch_scores(
    vectors: StoredVectors | VectorsAtNorms | np.ndarray,
    queries: np.ndarray,
    column_scale: np.ndarray | None = None,
) -> StreamedScores:
    """Exhaustive inner products of `queries [Q, D]` with the stored `vectors [N, D]` (decoded
    from the index in chunks of rows, in row order) and the vectors' norms: what a flat index
    over the stored sketches computes.

    `column_scale [D]`, if given, multiplies the columns of both sides first.
    """
    n = vectors.shape[0]
    if column_scale is not None:
        queries = queries * column_scale
    dots, norms = np.zeros((queries.shape[0], n)), np.zeros(n)
    for start in range(0, n, SCORE_CHUNK_ROWS):
        block = np.asarray(vectors[start : start + SCORE_CHUNK_ROWS], dtype=np.float32)
        if column_scale is not None:
            block = block * column_scale
        dots[:, start : start + len(block)] = queries @ block.T
        norms[start : start + len(block)] = np.linalg.norm(block, axis=1)
    return StreamedScores(dots, norms)


def in_kind(streamed: StreamedScores, query_norms: np.ndarray, kind: ScoreKind) -> np.ndarray:
    """Scores `[Q, N]` in the index's score kind: raw influence or cosine."""
    return streamed.dots if kind == ScoreKind.INFLUENCE else streamed.cosine(query_norms)


def exact_influence_target(curvature: Curvature, queries: Tensor) -> ScoreTarget:
    """Exact influence as inner products with the raw full gradients `G_n`.

    `⟨q, precondition(G_n)⟩ = ⟨M, G_n⟩` (`Curvature.fold`), so folding the preconditioning into
    the queries `[Q, D]` (once) spares rotating every example's gradient (several times cheaper).
    """
    folded = curvature.fold(queries)
    flat = torch.cat([m.flatten(1) for m in folded.values()], dim=1)  # [Q, D_full]
    return ScoreTarget(partial(flat_gradients, names=list(folded)), flat)


def build_corpus(engine: QueryEngine, data: str | None) -> CorpusConfig:
    """The build's corpus settings, reading `data` instead of the recorded path if given."""
    manifest = engine.manifest
    return replace(manifest.corpus, data=data) if data else manifest.corpus


def matching_corpus(engine: QueryEngine, data: str | None) -> list[Example]:
    """The build's corpus (from the manifest, or `data`), checked row by row against metadata."""
    manifest = engine.manifest
    corpus_config = build_corpus(engine, data)
    examples = load_corpus(corpus_config, engine.loaded.tokenizer, manifest.max_length).examples
    if len(examples) != engine.info.n_examples:
        raise InvalidInputError(
            f"corpus {corpus_config.data} has {len(examples)} examples but the index has "
            f"{engine.info.n_examples}: it is not the corpus this index was built from"
        )
    records = engine.metadata.lookup([e.example_id for e in examples])
    for row, example in enumerate(examples):
        record = records.get(example.example_id)
        if record is None or record.row != row or record.token_ids != example.token_ids:
            raise InvalidInputError(
                f"corpus {corpus_config.data} does not match the index at row {row} "
                f"(document {example.doc_id!r}, chunk {example.chunk}): rebuild the index or "
                "pass --data with the corpus it was built from"
            )
    return examples


@dataclass
class _IndexRun:
    """The service path's answers: per query, retrieved example rows and documents, best first,
    the hits' scores and whether each is exact."""

    rows: list[list[int]]
    docs: list[list[str]]
    scores: list[list[float]]
    exact: list[list[bool]]


def sketch_estimates(
    streamed: StreamedScores, query_norms: np.ndarray, kind: ScoreKind, bound: RerankBound | None
) -> np.ndarray:
    """The sketch's estimates `[Q, N]` of exact scores in `kind` over the whole corpus: the
    version's calibrated estimates (`RerankBound.corpus_estimates`, in cosine units, scaled
    back to `kind`), or without a bound the sketch scores themselves."""
    if bound is None:
        return in_kind(streamed, query_norms, kind)
    scale = 1.0 if kind == ScoreKind.COSINE else np.outer(query_norms, streamed.norms)
    return bound.corpus_estimates(streamed.cosine(query_norms)) * scale


def served_scores(estimates: np.ndarray, run: _IndexRun) -> np.ndarray:
    """A served answer over the whole corpus `[Q, N]`: its exact hits' scores, and the sketch's
    `estimates [Q, N]` for every other example."""
    scores = estimates.copy()
    for q, (rows, hit_scores, exact) in enumerate(
        zip(run.rows, run.scores, run.exact, strict=True)
    ):
        kept = np.asarray(exact, dtype=bool)
        scores[q, np.asarray(rows, dtype=np.int64)[kept]] = np.asarray(hit_scores)[kept]
    return scores


def hits_only_scores(estimates: np.ndarray, run: _IndexRun) -> np.ndarray:
    """A served answer's hits alone `[Q, N]`: the hits as `served_scores` gives them, every
    other example at the query's mean estimate (no say about the examples it does not name)."""
    served = served_scores(estimates, run)
    scores = np.repeat(estimates.mean(axis=1, keepdims=True), estimates.shape[1], axis=1)
    for q, rows in enumerate(run.rows):
        scores[q, rows] = served[q, rows]
    return scores


class _Session:
    """One evaluation: an open engine, the encoded queries, and the report being filled."""

    def __init__(
        self, config: EvalConfig, engine: QueryEngine, retrained: lds.RetrainCache | None = None
    ):
        self.config = config
        self.engine = engine
        self.retrained = retrained
        self.queries = list(config.queries)
        self.estimates: np.ndarray | None = None  # the sketch's estimates of exact scores
        self.tokenized = {
            method: [self._prepare(q, rerank, lexical) for q in self.queries]
            for method, (rerank, lexical) in self._index_methods().items()
        }
        self.report = EvalReport(
            index=str(config.index),
            version=engine.version,
            score_kind=engine.info.score_kind,
            faiss_factory=engine.info.faiss_factory,
            n_examples=engine.info.n_examples,
            dim=engine.info.dim,
            depth=config.depth,
            ks=list(config.ks),
            n_queries=len(self.queries),
            n_with_gold=sum(bool(q.gold) for q in self.queries),
            queries=[QueryReport(q.id, bool(q.gold)) for q in self.queries],
        )

    def _index_methods(self) -> dict[str, tuple[int, int]]:
        """The service-path methods this version supports: name -> (re-rank depth, lexical)."""
        info, depth = self.engine.info, self.config.rerank_depth
        methods = {"index": (0, 0)}
        if info.rerank_available and depth:
            methods["index+rerank"] = (depth, 0)
            if info.lexical_available:
                methods["index+lexical+rerank"] = (depth, self.config.lexical_candidates)
        return methods

    def _prepare(self, labeled: LabeledQuery, rerank: int, lexical: int) -> TokenizedQuery:
        query = replace(
            labeled.query,
            top_k=self.config.depth,
            rerank_depth=rerank,
            lexical_candidates=lexical,
        )
        try:
            return self.engine.prepare(query)
        except InvalidInputError as e:
            raise InvalidInputError(f"query {labeled.id!r}: {e}") from e

    def run(self) -> EvalReport:
        losses = self._retrained_losses() if self.retrained is not None else None
        runs = {
            method: self._timed(method, partial(self._run_index, method))
            for method in self.tokenized
        }
        for method, run in runs.items():
            self._trace_facts(method, run.docs)
        sketch = self._sketch_scores()
        exact, examples = None, None
        if self.config.exact or self.config.baselines or losses is not None:
            examples = matching_corpus(self.engine, self.config.data)
            if self.config.exact:
                exact = self._full_method("exact", lambda: self._exact_scores(examples), examples)
            for name in self.config.baselines:
                self._full_method(name, lambda n=name: self._baseline(n, examples), examples)
        self._fidelity(runs, sketch, exact)
        if losses is not None:
            self._linear_datamodeling(runs, examples, losses)
        return self.report

    def _retrained_losses(self) -> np.ndarray:
        """The retrained losses `[M, Q]` of this evaluation's queries (seeds averaged), once the
        cache is checked against this version's model, corpus and queries (InvalidInputError
        names what differs)."""
        cache, path = self.retrained, self.config.lds
        if cache.key.model != self.engine.info.model_sha256:
            raise InvalidInputError(
                f"LDS cache {path} was made for another model (sha256 {cache.key.model[:12]}, "
                f"this index's is {self.engine.info.model_sha256[:12]})"
            )
        documents = document_batches(build_corpus(self.engine, self.config.data))
        if lds.corpus_sha256(d for batch in documents for d in batch) != cache.key.corpus:
            raise InvalidInputError(f"LDS cache {path} was made for another corpus")
        position = {q["id"]: k for k, q in enumerate(cache.queries)}
        for labeled in self.queries:
            k = position.get(labeled.id)
            asked = {"prompt": labeled.query.prompt, "completion": labeled.query.completion}
            if k is None or any(cache.queries[k][f] != v for f, v in asked.items()):
                raise InvalidInputError(
                    f"LDS cache {path} has no retrained loss for query {labeled.id!r} as asked"
                )
        return cache.loss_matrix(*cache.usable())[:, [position[q.id] for q in self.queries]]

    def _timed(self, method: str, compute: Callable[[], T]) -> T:
        """Run `compute`, recording its wall time as the method's."""
        log.info("%s: %d queries", method, len(self.queries))
        start = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - start
        self.report.methods[method] = MethodReport(seconds, seconds / len(self.queries))
        return result

    def _run_index(self, method: str) -> _IndexRun:
        """Each query alone through the service path, as a client would send it."""
        results = [self.engine.answer([tq])[0] for tq in self.tokenized[method]]
        ids = sorted({h.example_id for r in results for h in r.hits})
        row_of = {i: record.row for i, record in self.engine.metadata.lookup(ids).items()}
        return _IndexRun(
            rows=[[row_of[h.example_id] for h in r.hits] for r in results],
            docs=[metrics.rank_documents(h.doc_id for h in r.hits) for r in results],
            scores=[[h.score for h in r.hits] for r in results],
            exact=[[h.exact for h in r.hits] for r in results],
        )

    def _sketch_scores(self) -> np.ndarray:
        """The stored sketches' scores `[Q, N]` (what a flat index would return); keeps the
        sketch's estimates of exact scores for the served answers' LDS."""
        q = self.engine.query_vectors(self.tokenized["index"])
        streamed = sketch_scores(self.engine.vectors, q)
        norms, kind = np.linalg.norm(q, axis=1), self.report.score_kind
        scores = in_kind(streamed, norms, kind)
        self.report.scores["index-sketch"] = scores
        self.estimates = sketch_estimates(streamed, norms, kind, self.engine.manifest.rerank_bound)
        return scores

    def _exact_scores(self, examples: list[Example]) -> np.ndarray:
        """Exact EK-FAC scores `[Q, N]` in the index's score kind, with the build's settings
        (and its full factors, which re-ranking uses, when the version stores them)."""
        manifest = self.engine.manifest
        reranker = self.engine.reranker
        scorer = ExactScorer(
            self.engine.loaded,
            examples,
            ExactConfig(
                curvature=manifest.curvature,
                modules=manifest.sketch.modules,
                batch_size=self.config.batch_size,
                memory_limit_bytes=self.config.memory_limit_bytes,
                progress=self.config.progress,
            ),
            curvature=reranker.curvature if reranker is not None else None,
        )
        curvature = scorer.curvature
        q = query_vectors(scorer.sketcher, curvature, self.tokenized["index"], self.engine.pad_id)
        if self.report.score_kind == ScoreKind.INFLUENCE:
            target = exact_influence_target(curvature, q)
        else:  # cosine needs every example's preconditioned norm, so precondition each one
            target = ScoreTarget(curvature.vectors, q)
        streamed = stream_scores(scorer.pass_, {"exact": target}, "exact EK-FAC")["exact"]
        return in_kind(streamed, q.double().norm(dim=1).cpu().numpy(), self.report.score_kind)

    def _baseline(self, name: str, examples: list[Example]) -> np.ndarray:
        if name == "bm25":
            bm25 = BM25Scorer([e.text for e in examples])
            return bm25.score([f"{q.query.prompt} {q.query.completion}" for q in self.queries])
        if name == "no-curvature":
            return self._unpreconditioned_scores()
        gradient_config = GradientCosineConfig(
            modules=self.engine.manifest.sketch.modules,
            batch_size=self.config.batch_size,
            memory_limit_bytes=self.config.memory_limit_bytes,
            progress=self.config.progress,
        )
        gradient_cosine = GradientCosine(self.engine.loaded, examples, gradient_config)
        return gradient_cosine.score(self.tokenized["index"])

    def _unpreconditioned_scores(self) -> np.ndarray:
        """Scores `[Q, N]` of the stored sketches with their preconditioning undone: each
        module's columns times `sqrt(Λ + λ)` (the eigenbasis rotation keeps inner products), in
        the index's kind: for cosine, TrackStar without its curvature."""
        curvature = self.engine.curvature
        scale = (
            torch.cat(
                [(m.eigvals + m.damping).sqrt().flatten() for m in curvature.modules.values()]
            )
            .cpu()
            .numpy()
        )
        q = self.engine.query_vectors(self.tokenized["index"])
        streamed = sketch_scores(self.engine.vectors.preconditioned, q, scale)
        return in_kind(streamed, np.linalg.norm(q * scale, axis=1), self.report.score_kind)

    def _linear_datamodeling(
        self, runs: dict[str, _IndexRun], examples: list[Example], losses: np.ndarray
    ) -> None:
        """Each method's LDS against the retrained `losses [M, Q]`: per query, and its mean
        with a bootstrap interval over the queries. `index` is the stored sketches' scores of
        every example; a re-ranked method is its served answer (exact hits) with the sketch's
        estimates for every other example, and `<method> hits` its hits alone."""
        cache = self.retrained
        used, seeds = cache.usable()
        in_subset = lds.membership(
            [cache.subsets[m] for m in used], cache.doc_ids, [e.doc_id for e in examples]
        )
        scored = {"index": self.report.scores["index-sketch"]}
        for method, run in runs.items():
            if method != "index":
                scored[method] = served_scores(self.estimates, run)
                scored[f"{method} hits"] = hits_only_scores(self.estimates, run)
        scored |= {m: s for m, s in self.report.scores.items() if m != "index-sketch"}
        for method, scores in scored.items():
            per_query = lds.lds_per_query(scores, in_subset, losses)
            for query, value in zip(self.report.queries, per_query, strict=True):
                query.lds[method] = float(value)
            self.report.lds[method] = asdict(lds.bootstrap_mean(per_query))
        self.report.lds_settings = {
            "cache": str(self.config.lds),
            "subsets": len(used),
            "subsets_planned": len(cache.subsets),
            "documents_per_subset": len(cache.subsets[0]),
            "documents": len(cache.doc_ids),
            "seeds": seeds,
            "confidence": lds.CONFIDENCE,
            "bootstrap_resamples": lds.BOOTSTRAP_RESAMPLES,
        }

    def _full_method(
        self, name: str, compute: Callable[[], np.ndarray], examples: list[Example]
    ) -> np.ndarray:
        """Time a scorer of the whole corpus, keep its scores, trace facts with them."""
        scores = self._timed(name, compute)
        self.report.scores[name] = scores
        doc_ids = [e.doc_id for e in examples]
        self._trace_facts(name, [metrics.document_ranking(s, doc_ids) for s in scores])
        return scores

    def _trace_facts(self, method: str, rankings: list[list[str]]) -> None:
        """First gold rank per query; recall@k and MRR means over the queries with gold."""
        with_gold = []
        for query, query_report, ranking in zip(
            self.queries, self.report.queries, rankings, strict=True
        ):
            rank = metrics.first_gold_rank(ranking, query.gold) if query.gold else None
            query_report.first_gold_rank[method] = rank
            if query.gold:
                with_gold.append(rank)
        fact = {
            f"recall@{k}": metrics.mean(metrics.recall_at_k(r, k) for r in with_gold)
            for k in self.config.fact_ks
        }
        fact["mrr"] = metrics.mean(metrics.reciprocal_rank(r) for r in with_gold)
        self.report.methods[method].fact = fact

    def _fidelity(
        self, runs: dict[str, _IndexRun], sketch: np.ndarray, exact: np.ndarray | None
    ) -> None:
        """Per-query and mean fidelity: recall curves (k = 1..depth) of the exact top-k in the
        stored sketches' top-k ("sketch"), of the sketches' top-k in FAISS's ("ann"), of the
        exact top-k in FAISS's ("end_to_end") and in what the re-ranked methods return
        ("rerank", "lexical_rerank"); Spearman over all examples; and how far the sketch's
        estimates of exact scores are from them (`estimate_error`, relative squared error)."""
        report, ks = self.report, range(1, self.config.depth + 1)
        curves: dict[str, list[list[float]]] = {}
        returned = {
            "end_to_end": "index",
            "rerank": "index+rerank",
            "lexical_rerank": "index+lexical+rerank",
        }
        for i, query in enumerate(report.queries):
            sketch_top = metrics.top_k(sketch[i], self.config.depth).tolist()
            compared = {"ann": (sketch[i], runs["index"].rows[i])}
            if exact is not None:
                compared["sketch"] = (exact[i], sketch_top)
                for name, method in returned.items():
                    if method in runs:
                        compared[name] = (exact[i], runs[method].rows[i])
                query.fidelity["spearman"] = metrics.spearman(sketch[i], exact[i])
                query.fidelity["estimate_error"] = metrics.relative_squared_error(
                    self.estimates[i], exact[i]
                )
            for name, (reference, predicted) in compared.items():
                curve = metrics.recall_curve(reference, predicted, ks)
                curves.setdefault(name, []).append(curve)
                for k in self.config.ks:
                    query.fidelity[f"{name}_recall@{k}"] = curve[k - 1]
        names = sorted({name for q in report.queries for name in q.fidelity})
        report.fidelity = {n: metrics.mean(q.fidelity[n] for q in report.queries) for n in names}
        report.fidelity_curves = {
            name: np.nanmean(np.array(rows), axis=0).tolist() for name, rows in curves.items()
        }


def evaluate(config: EvalConfig) -> EvalReport:
    """Run every requested method on the queries and measure fidelity and fact tracing (and,
    with a retraining cache, the LDS: the cache is read and checked before any scoring)."""
    check_batch_size(config.batch_size)  # used by the last methods: refused before the first
    retrained = lds.read_cache(config.lds) if config.lds is not None else None
    engine = QueryEngine.open(config.index, device=config.device, version=config.version)
    try:
        return _Session(config, engine, retrained).run()
    finally:
        engine.close()


def render_table(report: EvalReport) -> str:
    """The report as terminal text: per-query lines, then the means and each method's time."""
    methods = list(report.methods)
    k = min(report.ks)
    per_query = [
        n for n in ("spearman", f"sketch_recall@{k}", f"ann_recall@{k}") if n in report.fidelity
    ]
    rows = [
        [
            q.id,
            *(_fmt(q.fidelity.get(n)) for n in per_query),
            *(_fmt(q.first_gold_rank.get(m)) for m in methods),
        ]
        for q in report.queries
    ]
    fact_names = sorted({n for m in report.methods.values() for n in m.fact}, key=_metric_order)
    method_rows = [
        [
            name,
            *(_fmt(m.fact.get(n)) for n in fact_names),
            f"{m.seconds:.2f}",
            f"{m.seconds_per_query:.4f}",
        ]
        for name, m in report.methods.items()
    ]
    return "\n".join(
        [
            f"index {report.index} version {report.version}: {report.n_examples} examples, "
            f"dim {report.dim}, score {report.score_kind}, faiss {report.faiss_factory}",
            f"{report.n_queries} queries ({report.n_with_gold} with gold); the index retrieves "
            f"the top {report.depth} examples; rank = first gold document's rank, - = not found",
            "",
            *_table(["query", *per_query, *(f"rank:{m}" for m in methods)], rows),
            "",
            "fidelity, mean over queries (sketch: stored sketches vs exact; ann: FAISS vs "
            "stored sketches; end_to_end: FAISS vs exact)",
            *(f"  {name:<24}{_fmt(value)}" for name, value in report.fidelity.items()),
            "",
            *_table(["method", *fact_names, "seconds", "s/query"], method_rows),
            *_lds_lines(report),
        ]
    )


def _lds_lines(report: EvalReport) -> list[str]:
    """The LDS section of the table (none without a retraining cache)."""
    if not report.lds:
        return []
    settings = report.lds_settings
    rows = [
        [method, _fmt(e["mean"]), f"[{_fmt(e['low'])}, {_fmt(e['high'])}]", str(e["n"])]
        for method, e in report.lds.items()
    ]
    return [
        "",
        f"linear datamodeling score: Spearman across {_subsets(settings)} subsets of "
        f"{settings['documents_per_subset']} of {settings['documents']} documents, the model "
        f"retrained on each (seeds {settings['seeds']}, losses averaged), mean over queries; "
        f"{settings['confidence']:.0%} bootstrap interval over queries",
        *_table(["method", "LDS", "interval", "queries"], rows),
    ]


def _subsets(settings: dict) -> str:
    """`50`, or `40 (of 50 planned)` while the retraining is unfinished."""
    used, planned = settings["subsets"], settings.get("subsets_planned", settings["subsets"])
    return str(used) if used == planned else f"{used} (of {planned} planned)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        f"{r[0]:<{widths[0]}}"
        + "".join(f"  {c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True))
        for r in [header, *rows]
    ]


def _metric_order(name: str) -> tuple[int, str]:
    """recall@1 < recall@10 < mrr."""
    if name.startswith("recall@"):
        return int(name.split("@")[1]), name
    return 1 << 30, name


def _fmt(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def render_json(report: EvalReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


SCATTER_PER_PAGE = 16


def make_plot_directory(directory: Path) -> None:
    """Create `directory` for `write_plots`; InvalidInputError (one line) when it cannot be
    (e.g. a file of that name). Called before an evaluation too, so that a bad path is refused
    before the scoring rather than after it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot make plot directory {directory}: {e.strerror}") from e


def write_plots(report: EvalReport, directory: Path) -> list[Path]:
    """PNG figures: index vs exact scatter per query, fact-tracing and fidelity recall@k curves."""
    import matplotlib

    matplotlib.use("Agg")
    make_plot_directory(directory)
    paths = [_plot_fact_recall(report, directory / "fact-recall.png")]
    if report.fidelity_curves:
        paths.append(_plot_fidelity_recall(report, directory / "fidelity-recall.png"))
    if "exact" in report.scores and "index-sketch" in report.scores:
        paths += _plot_scatter(report, directory)
    if report.lds:
        paths.append(_plot_lds(report, directory / "lds.png"))
    return paths


def _plot_lds(report: EvalReport, path: Path) -> Path:
    """LDS per method, a bar each with its bootstrap interval."""
    import matplotlib.pyplot as plt

    methods = list(report.lds)
    means = np.array([report.lds[m]["mean"] for m in methods], dtype=np.float64)
    errors = np.abs(
        np.array([[report.lds[m]["low"], report.lds[m]["high"]] for m in methods]).T - means
    )
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1.2))
    ax.barh(methods, means, xerr=errors, capsize=3, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set(
        xlabel=f"LDS ({report.lds_settings['confidence']:.0%} interval over queries)",
        title=f"linear datamodeling score, {report.lds_settings['subsets']} subsets retrained, "
        f"{report.score_kind} index",
    )
    ax.title.set_fontsize(10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_fact_recall(report: EvalReport, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ks = range(1, report.depth + 1)
    gold = [q for q in report.queries if q.has_gold]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in report.methods:
        ranks = [q.first_gold_rank[method] for q in gold]
        curve = [metrics.mean(metrics.recall_at_k(r, k) for r in ranks) for k in ks]
        ax.plot(list(ks), curve, label=method)
    ax.set(
        xscale="log",
        xlabel="k (documents)",
        ylabel="recall@k of first gold document",
        title=f"fact tracing, {report.n_with_gold} queries",
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_fidelity_recall(report: EvalReport, path: Path) -> Path:
    import matplotlib.pyplot as plt

    labels = {
        "sketch": "exact top-k in stored sketches' top-k",
        "ann": "stored sketches' top-k in FAISS top-k",
        "end_to_end": "exact top-k in FAISS top-k",
        "rerank": "exact top-k in re-ranked top-k",
        "lexical_rerank": "exact top-k in re-ranked (+BM25) top-k",
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in report.fidelity_curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=labels[name])
    ax.set(
        xscale="log",
        xlabel="k (examples)",
        ylabel="recall",
        ylim=(0, 1.02),
        title=f"fidelity, {report.n_queries} queries",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_scatter(report: EvalReport, directory: Path) -> list[Path]:
    """Index (stored sketch) score vs exact score, one panel per query, 16 panels a page."""
    import matplotlib.pyplot as plt

    paths = []
    for page, start in enumerate(range(0, report.n_queries, SCATTER_PER_PAGE), start=1):
        indices = range(start, min(start + SCATTER_PER_PAGE, report.n_queries))
        cols = min(4, len(indices))
        rows = math.ceil(len(indices) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3.2 * rows + 0.6), squeeze=False)
        for ax, i in zip(axes.flat, indices, strict=False):
            query = report.queries[i]
            ax.scatter(report.scores["exact"][i], report.scores["index-sketch"][i], s=3, alpha=0.4)
            rho = query.fidelity.get("spearman", math.nan)
            ax.set_title(f"{query.id} (ρ={rho:.3f})", fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(indices) :]:
            ax.axis("off")
        fig.supxlabel(f"exact EK-FAC {report.score_kind}")
        fig.supylabel(f"index {report.score_kind}")
        fig.tight_layout()
        path = directory / f"scatter-{page}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
