"""The query engine: one published index version, ready to answer queries.

It owns the model, the curvature, the FAISS index, the vectors and the metadata of one
version. A query is prepared (validated and tokenized, once) and then answered, alone or in a
batch that shares one forward/backward pass. The gRPC server is one caller; eval is another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from indexer.budget import describe, layout_ranks
from indexer.config import ScoreKind
from indexer.corpus import framing
from indexer.curvature import Curvature
from indexer.errors import (
    IndexVerificationError,
    InvalidInputError,
    NotFoundError,
    PreconditionError,
)
from indexer.exact import ExactReranker, ExactScores, QueryTargets
from indexer.lexical import LexicalIndex
from indexer.manifest import (
    CURVATURE_FILE,
    FULL_CURVATURE_FILE,
    INDEX_FILE,
    LEXICAL_DIR,
    METADATA_FILE,
    RETRIEVAL_FILE,
    Manifest,
    ModelIdentity,
)
from indexer.model import LoadedModel, load_model, modules_named, trackable_modules
from indexer.publish import verify_version, version_dir
from indexer.query import (
    Query,
    TokenizedQuery,
    max_query_chars,
    query_capture,
    query_vectors,
    tokenize_query,
)
from indexer.rerank import (
    CandidateList,
    SecondsPerCandidate,
    StageResult,
    StopReason,
    run_exact_stage,
)
from indexer.retrieval import RETRIEVAL_CANDIDATES, TieredSearcher
from indexer.scan import CodeScan, Searcher, device_searcher
from indexer.scores import ScoreSpace
from indexer.sketch import GradientSketcher, make_batch
from indexer.store import (
    ExampleRecord,
    MetadataReader,
    StoredVectors,
    open_index,
    set_nprobe,
)

if TYPE_CHECKING:
    from indexer.milvus import MilvusBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How a served engine answers: the default exact re-rank depth and the budget guarding it."""

    # The depth's upper bound (the exact stage stops earlier when it can): 200 candidates hold
    # 0.977 (cosine) and 0.915 (influence) of exact top-10 at the default budget on the demo
    # (benchmarks/RESULTS.md)
    rerank_depth: int = field(
        default=200,
        metadata={"help": "most candidates re-ranked exactly when a query does not say (0: off)"},
    )
    max_rerank_tokens: int = field(
        default=131_072,
        metadata={"help": "budget of one query's re-rank: depth x tokens per example"},
    )
    retrieval_candidates: int = field(
        default=RETRIEVAL_CANDIDATES,
        metadata={
            "help": "K″: candidates of the compact retrieval code (when the version has one) "
            "re-scored on the stored codes per search (0: scan every stored code instead)"
        },
    )
    rerank_batch_size: int = 32  # candidates per forward/backward of the re-rank pass
    rerank_chunk: int = field(
        default=16,
        metadata={"help": "candidates each query re-ranks per round of the exact stage"},
    )
    rerank_early_stop: bool = field(
        default=True,
        metadata={
            "help": "stop re-ranking a query once no remaining candidate can enter its exact "
            "top-k (within the bound its version calibrated); off: always the whole depth",
            "flags": ("--rerank-early-stop",),
        },
    )


@dataclass(frozen=True)
class Hit:
    """One retrieved training example. `score` is in the query's score kind; `exact` says
    whether it is exact EK-FAC (re-ranked) or the sketch's estimate. A re-ranked hit's
    `influence` is exact too, its `cosine` only for a cosine index."""

    example_id: int
    doc_id: str
    chunk: int
    score: float
    influence: float
    cosine: float
    exact: bool = False
    text: str | None = None
    layer_scores: dict[str, float] | None = None


@dataclass
class StageTimings:
    """Wall time of each stage of one batch of queries, in microseconds."""

    tokenize_us: int = 0
    gradient_us: int = 0
    search_us: int = 0
    lookup_us: int = 0
    rerank_us: int = 0


@dataclass
class QueryResult:
    """A query's top hits, best first, in `score_kind`; `candidates_reranked` were scored
    exactly, and `rerank_stop` says why that stopped (None: not re-ranked)."""

    hits: list[Hit]
    n_completion_tokens: int
    score_kind: ScoreKind
    timings: StageTimings = field(default_factory=StageTimings)
    candidates_reranked: int = 0
    rerank_stop: StopReason | None = None


@dataclass(frozen=True)
class TokenAttribution:
    """Per-token influence of one training example on the query; sums to its influence."""

    example_id: int
    doc_id: str
    tokens: list[str]
    scores: list[float]
    total: float


@dataclass(frozen=True)
class IndexInfo:
    """What a served version is; the fields of GetIndexInfo."""

    version: str
    model_path: str
    model_sha256: str
    n_examples: int
    dim: int
    score_kind: ScoreKind
    faiss_factory: str
    build_time: str
    tracked_modules: list[str]
    # The sketch ranks when every module has the same (a uniform allocation), else 0: the
    # manifest's layouts hold each module's.
    rank_in: int
    rank_out: int
    damping: float
    max_length: int  # tokens: the limit on a query's prompt plus completion
    rerank_available: bool = False
    lexical_available: bool = False
    rerank_depth: int = 0  # the default depth; 0: no re-ranking unless asked
    max_rerank_depth: int = 0
    allocation: str = ""  # `r_out x r_in` per module group (`indexer.budget.describe`)
    index_bytes_per_example: float = 0.0
    tracked_parameter_share: float = 0.0  # of the blocks' parameters (`Manifest.coverage`)
    skipped_parameters: tuple[str, ...] = ()
    retrieval_code: str = ""  # the compact code scanned first (`indexer.retrieval`), if any
    retrieval_candidates: int = 0  # K″: its candidates re-scored on the stored codes

    @classmethod
    def from_manifest(
        cls, version: str, manifest: Manifest, options: EngineOptions, searcher: Searcher
    ) -> IndexInfo:
        """`searcher`: what answers the version's searches (it names the compact code only when
        it scans one: not on CUDA, nor on Milvus)."""
        rank_out, rank_in = manifest.shared_ranks()
        tiered = isinstance(searcher, TieredSearcher)
        return cls(
            version=version,
            model_path=manifest.model.path,
            model_sha256=manifest.model.weights_sha256,
            n_examples=manifest.counts.examples,
            dim=manifest.dim,
            score_kind=manifest.score,
            faiss_factory=manifest.index_factory,
            build_time=manifest.created,
            tracked_modules=[m.name for m in manifest.modules],
            rank_in=rank_in,
            rank_out=rank_out,
            damping=manifest.curvature.damping,
            max_length=manifest.model.context_length,
            rerank_available=manifest.exact_rerank,
            lexical_available=manifest.lexical_index,
            rerank_depth=options.rerank_depth if options and manifest.exact_rerank else 0,
            max_rerank_depth=(
                options.max_rerank_tokens // manifest.max_length
                if options and manifest.exact_rerank
                else 0
            ),
            allocation=describe(layout_ranks(manifest.modules)),
            index_bytes_per_example=manifest.files[INDEX_FILE].bytes
            / max(manifest.counts.examples, 1),
            tracked_parameter_share=manifest.coverage.share,
            skipped_parameters=manifest.coverage.skipped,
            retrieval_code=manifest.retrieval.name if manifest.retrieval and tiered else "",
            retrieval_candidates=options.retrieval_candidates if tiered else 0,
        )


@dataclass(frozen=True)
class _Ranked:
    """A query's hits, best first, before they become `Hit`s: example ids `[k]`, their scores
    in the index's kind, influence and cosine `[k]`, and whether each is exact `[k]`."""

    ids: list[int]
    score: np.ndarray
    influence: np.ndarray
    cosine: np.ndarray
    exact: np.ndarray


def _check_counts(query: Query) -> None:
    """Refuse a top_k under 1 and a negative depth or lexical count, naming the field."""
    if query.top_k < 1:
        raise InvalidInputError(f"top_k must be at least 1, got {query.top_k}")
    for name in ("rerank_depth", "lexical_candidates"):
        value = getattr(query, name)
        if value is not None and value < 0:
            raise InvalidInputError(f"{name} must be 0 or more, got {value}")


def _norms(example_ids: list[int], records: dict[int, ExampleRecord]) -> np.ndarray:
    """The examples' sketch norms `[n]`."""
    return np.array([records[i].norm for i in example_ids], dtype=np.float64)


def _first(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """The first `k` results of a search (`scores [depth]`, `ids [depth]`, -1: no result) that
    exist: their example ids and scores."""
    found = ids[:k] >= 0
    return ids[:k][found].tolist(), scores[:k][found]


def _sketch_ranking(
    space: ScoreSpace,
    scores: np.ndarray,
    ids: np.ndarray,
    top_k: int,
    records: dict[int, ExampleRecord],
) -> _Ranked:
    """The search's `top_k` (`scores [depth]`, `ids [depth]`, -1: none), both scores estimated
    from the sketch (an example without a gradient scores 0, below its search's noise)."""
    example_ids, score = _first(scores, ids, top_k)
    influence, cosine = space.both(score, _norms(example_ids, records))
    score = cosine if space.kind == ScoreKind.COSINE else influence
    order = np.argsort(-score, kind="stable")
    return _Ranked(
        [example_ids[k] for k in order],
        score[order],
        influence[order],
        cosine[order],
        np.zeros(len(example_ids), bool),
    )


def _exact_ranking(
    space: ScoreSpace,
    candidates: CandidateList,
    stage: StageResult,
    records: dict[int, ExampleRecord],
) -> _Ranked:
    """The re-ranked candidates by exact score, best `top_k` first. When the stage stopped at
    a deadline, the candidates it did not reach rank by their sketch estimates, marked not
    exact. A cosine the re-rank did not compute (an influence index) stays estimated."""
    position = {i: k for k, i in enumerate(candidates.ids)}
    reached = [position[i] for i in stage.ids]
    if stage.stop == StopReason.DEADLINE:
        scored = set(reached)
        reached += [k for k in range(len(candidates.ids)) if k not in scored]
    scores = np.concatenate([stage.scores, candidates.estimates[reached[len(stage.ids) :]]])
    order = np.argsort(-scores, kind="stable")[: candidates.top_k]
    example_ids = [candidates.ids[reached[k]] for k in order]
    exact = order < len(stage.ids)
    estimates = candidates.estimates[[reached[k] for k in order]].astype(np.float64)
    influence, cosine = space.both(estimates, _norms(example_ids, records))
    influence[exact] = np.asarray(stage.influence)[order[exact]]
    if stage.cosine is not None:
        cosine[exact] = np.asarray(stage.cosine)[order[exact]]
    return _Ranked(example_ids, scores[order], influence, cosine, exact)


def _hits(
    ranked: _Ranked,
    query: Query,
    records: dict[int, ExampleRecord],
    layers: list[dict[str, float]] | None,
) -> list[Hit]:
    return [
        Hit(
            example_id=records[i].example_id,
            doc_id=records[i].doc_id,
            chunk=records[i].chunk,
            score=float(ranked.score[k]),
            influence=float(ranked.influence[k]),
            cosine=float(ranked.cosine[k]),
            exact=bool(ranked.exact[k]),
            text=records[i].text if query.include_text else None,
            layer_scores=None if layers is None else layers[k],
        )
        for k, i in enumerate(ranked.ids)
    ]


class _Clock:
    """Microseconds since the previous lap."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> int:
        now = time.perf_counter()
        elapsed, self._last = int((now - self._last) * 1e6), now
        return elapsed


@dataclass
class _ModelHandle:
    """A loaded model, the lock that serialises passes through it (hooks are per model), the
    lock that serialises its tokenizer (a fast tokenizer is not safe across threads), and the
    exact stage's cost per candidate on it, which deadlines are kept by (a property of the
    model and device, so it outlives a version that reuses the model)."""

    loaded: LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    rerank_cost: SecondsPerCandidate = field(default_factory=SecondsPerCandidate)


class QueryEngine:
    """Answers queries against one verified version. Safe to call from several threads."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        model: _ModelHandle,
        curvature: Curvature,
        index: faiss.Index | None,
        metadata: MetadataReader,
        vectors: StoredVectors,
        reranker: ExactReranker | None = None,
        lexical: LexicalIndex | None = None,
        options: EngineOptions | None = None,
        searcher: Searcher | None = None,
    ):
        """`searcher` answers the search (default: `index` itself, FAISS on the CPU). With
        Milvus there is no `index`; `metadata` and `vectors` read the version's collection."""
        self.path = path
        self.version = path.name
        self.manifest = manifest
        self.options = options or EngineOptions()
        self.searcher = index if searcher is None else searcher
        self.info = IndexInfo.from_manifest(self.version, manifest, self.options, self.searcher)
        self.reranker = reranker
        self.lexical = lexical
        self._model = model
        self.curvature = curvature
        self.index = index
        self.metadata = metadata
        self.vectors = vectors
        self.sketcher = GradientSketcher(
            model.loaded.model,
            modules_named(model.loaded.model, curvature.modules),
            curvature.projections(),
        )
        self.pad_id = model.loaded.tokenizer.pad_token_id
        self._max_query_chars = max_query_chars(model.loaded.tokenizer, self.info.max_length)
        self._prefix = framing(model.loaded.tokenizer, manifest.corpus).prefix

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        device: str = "cpu",
        model_dir: Path | None = None,
        reuse_model_from: QueryEngine | None = None,
        version: str | None = None,
        options: EngineOptions | None = None,
        milvus: MilvusBackend | None = None,
    ) -> QueryEngine:
        """Load and verify a version (default: CURRENT's). Raises IndexVerificationError when a
        file fails its sha256 or the model's weights are not the ones the index was built from.

        With `milvus` the version's collection answers searches and lookups (its row count
        checked), and its FAISS index and metadata files are neither read nor verified."""
        path = version_dir(Path(root), version, milvus)
        manifest = verify_version(path, skip=(INDEX_FILE, METADATA_FILE) if milvus else ())
        model = _open_model(path.name, manifest, model_dir, device, reuse_model_from)
        trackable = trackable_modules(model.loaded.model)
        missing = [m.name for m in manifest.modules if m.name not in trackable]
        if missing:
            raise IndexVerificationError(f"model has no module {missing[0]} that the index tracks")
        curvature = Curvature.load(path / CURVATURE_FILE, device)
        if milvus is None:
            index = open_index(path / INDEX_FILE)
            set_nprobe(index, manifest.nprobe)
            metadata = MetadataReader(path / METADATA_FILE)
            vectors = StoredVectors(index, metadata, unit=manifest.score == ScoreKind.COSINE)
            searcher = _searcher(path, manifest, index, device, options or EngineOptions())
        else:
            collection = milvus.check(manifest, path.name)
            index = None
            metadata = milvus.records(collection)
            vectors = milvus.vectors(collection, (manifest.counts.examples, manifest.dim))
            searcher = milvus.searcher(collection)
        reranker = None
        if manifest.exact_rerank:
            options = options or EngineOptions()
            full = Curvature.load(path / FULL_CURVATURE_FILE, device)
            pad_id = model.loaded.tokenizer.pad_token_id
            reranker = ExactReranker(model.loaded.model, full, pad_id, options.rerank_batch_size)
        lexical = LexicalIndex(path / LEXICAL_DIR) if manifest.lexical_index else None
        log.info("opened index version %s (%d examples)", path.name, metadata.count())
        return cls(
            path,
            manifest,
            model,
            curvature,
            index,
            metadata,
            vectors,
            reranker,
            lexical,
            options,
            searcher=searcher,
        )

    @property
    def loaded(self) -> LoadedModel:
        return self._model.loaded

    def prepare(self, query: Query) -> TokenizedQuery:
        """Validate a query against this version and tokenize it; InvalidInputError names the
        problem (empty or too long, another score kind, a re-rank over the budget). The query
        is kept as asked (its defaults unresolved), so that another version prepares it again
        by its own defaults."""
        _check_counts(query)
        kind = query.score_kind or self.info.score_kind
        if kind != self.info.score_kind:
            raise InvalidInputError(
                f"this index ranks by {self.info.score_kind}; rebuild with --score {kind} "
                "to rank by it (both scores are returned in every hit)"
            )
        self._candidates(query)
        with self._model.tokenizer_lock:
            return tokenize_query(
                self.loaded.tokenizer,
                query,
                self.info.max_length,
                tokenized_by=self.version,
                max_chars=self._max_query_chars,
                prefix=self._prefix,
            )

    def prepared(self, query: TokenizedQuery) -> TokenizedQuery:
        """The query, prepared again if another version prepared it (the served version may
        change while it waits for its batch)."""
        return query if query.tokenized_by == self.version else self.prepare(query.query)

    def _candidates(self, query: Query) -> int:
        """How many candidates the query's exact stage may score (0: none): its re-rank depth
        (its own or the default) and at least its top_k, which with its lexical candidates
        must fit the budget. A depth the query asks for is refused when over it; the default
        is cut to it, or, where the top_k alone is over it, not used (a sketch answer)."""
        lexical = query.lexical_candidates
        if lexical and not self.info.lexical_available:
            raise PreconditionError(
                f"index version {self.version} was built without a lexical index: rebuild "
                "with --lexical-index on for lexical candidates"
            )
        asked = query.rerank_depth
        depth = self.info.rerank_depth if asked is None else asked
        if lexical and not depth:
            raise InvalidInputError(
                "lexical_candidates need exact re-ranking (a rerank_depth above 0) to be "
                "ranked with the index's candidates"
            )
        if not depth:
            return 0
        if not self.info.rerank_available:
            raise PreconditionError(
                f"index version {self.version} was built without exact re-rank factors: "
                "rebuild with --exact-rerank on to re-rank"
            )
        room = self.info.max_rerank_depth - lexical
        if asked is None:
            depth = min(depth, room)
        candidates = max(depth, query.top_k)
        if candidates <= room:
            return candidates
        if asked is None and not lexical:
            return 0
        named = f"rerank_depth {depth}" if depth >= query.top_k else f"top_k {query.top_k}"
        raise InvalidInputError(
            f"{named} + lexical_candidates {lexical} is over this server's limit of "
            f"{self.info.max_rerank_depth} re-ranked candidates "
            f"({self.options.max_rerank_tokens} tokens, --max-rerank-tokens, at "
            f"{self.manifest.max_length} tokens per example)"
        )

    def query_vectors(self, queries: list[TokenizedQuery]) -> np.ndarray:
        """Preconditioned query vectors `[n_queries, D]` (float32): one forward/backward."""
        with self._model.lock:
            vectors = query_vectors(self.sketcher, self.curvature, queries, self.pad_id)
        return vectors.cpu().numpy().astype(np.float32)

    def query(self, queries: list[Query]) -> list[QueryResult]:
        """Prepare and answer queries (see `answer`)."""
        return self.answer([self.prepare(q) for q in queries])

    def warm_up(self) -> None:
        """Answer one query of two common words, with one round of the exact stage where the
        version has one: a client's first query then pays no one-time costs, and the exact
        stage has measured its cost per candidate before a client's deadline relies on it."""
        depth = min(self.options.rerank_chunk, self.info.max_rerank_depth)
        self.query([Query("The", " first", top_k=1, rerank_depth=depth)])

    def answer(
        self,
        queries: list[TokenizedQuery],
        *,
        deadlines: Sequence[float | None] | None = None,
        abandoned: Sequence[Callable[[], bool] | None] | None = None,
        on_sketch: Callable[[int, QueryResult], None] | None = None,
    ) -> list[QueryResult]:
        """Top-k influencers of each prepared query: one batched forward/backward, one search,
        one metadata lookup, then the exact stage for the queries with a re-rank depth K′: their
        candidates scored exactly, a chunk per round (one forward/backward over the round's
        candidates), until each query's top-k is settled or K′ are scored (see
        `indexer.rerank`). Each query gets its own top_k, depth and include flags.

        `deadlines[q]` (`time.monotonic()` seconds): when query q's answer is due; its exact
        stage starts no round that would end later, nor one after `abandoned[q]()` says that
        no client waits for the answer any more. `on_sketch(q, result)` receives each
        re-ranked query's sketch answer as soon as the index was searched."""
        if not queries:
            return []
        clock = _Clock()
        queries = [self.prepared(q) for q in queries]
        deadlines = deadlines or [None] * len(queries)
        abandoned = abandoned or [None] * len(queries)
        timings = StageTimings(tokenize_us=clock.lap())
        depths = [self._candidates(tq.query) for tq in queries]
        with self._model.lock:
            capture = query_capture(
                self.sketcher, queries, self.pad_id, keep_unprojected=any(depths)
            )
            q = self.curvature.vectors(capture).cpu().numpy().astype(np.float32)
        timings.gradient_us = clock.lap()
        spaces = [ScoreSpace.of(self.info.score_kind, vector) for vector in q]
        top_ks = [tq.query.top_k for tq in queries]
        depth = max(max(top_ks), *depths)
        scores, ids = self.searcher.search(np.stack([space.search for space in spaces]), depth)
        timings.search_us = clock.lap()
        # The sketch answers need their top-k's records only: looked up first, so that a
        # streamed first answer does not wait for the exact stage's candidates.
        shown = {i for row, k in enumerate(top_ks) for i in _first(scores[row], ids[row], k)[0]}
        records = self.metadata.lookup(sorted(shown))
        timings.lookup_us = clock.lap()
        ranked = [
            _sketch_ranking(space, scores[row], ids[row], k, records)
            for row, (space, k) in enumerate(zip(spaces, top_ks, strict=True))
        ]
        reranked = [row for row, d in enumerate(depths) if d]
        if on_sketch is not None:
            sketched = self._results(queries, spaces, ranked, records, replace(timings), {})
            for row in reranked:
                on_sketch(row, sketched[row])
        stages: dict[int, StageResult] = {}
        if reranked:
            retrieved = [_first(scores[row], ids[row], d) for row, d in enumerate(depths)]
            lexical = self._lexical(queries, [c for c, _ in retrieved])
            wanted = {int(i) for i in ids.ravel() if i >= 0} | {i for c in lexical for i in c}
            records |= self.metadata.lookup(sorted(wanted - records.keys()))
            timings.lookup_us += clock.lap()
            lists = {
                row: self._candidate_list(
                    spaces[row],
                    retrieved[row],
                    lexical[row],
                    records,
                    top_ks[row],
                    deadlines[row],
                    abandoned[row],
                )
                for row in reranked
            }
            with self._model.lock:
                targets = self.reranker.targets(capture.unprojected)
            stages = self._exact_stage(lists, targets, records)
            for row, stage in stages.items():
                ranked[row] = _exact_ranking(spaces[row], lists[row], stage, records)
            timings.rerank_us = clock.lap()
        return self._results(queries, spaces, ranked, records, timings, stages)

    def _results(
        self,
        queries: list[TokenizedQuery],
        spaces: list[ScoreSpace],
        ranked: list[_Ranked],
        records: dict[int, ExampleRecord],
        timings: StageTimings,
        stages: dict[int, StageResult],
    ) -> list[QueryResult]:
        layers = self._layer_scores(queries, spaces, ranked, records)
        return [
            QueryResult(
                _hits(ranked[row], tq.query, records, layers[row]),
                tq.n_completion_tokens,
                self.info.score_kind,
                timings,
                candidates_reranked=len(stages[row].ids) if row in stages else 0,
                rerank_stop=stages[row].stop if row in stages else None,
            )
            for row, tq in enumerate(queries)
        ]

    def _candidate_list(
        self,
        space: ScoreSpace,
        retrieved: tuple[list[int], np.ndarray],
        lexical: list[int],
        records: dict[int, ExampleRecord],
        top_k: int,
        deadline: float | None,
        abandoned: Callable[[], bool] | None,
    ) -> CandidateList:
        """A query's candidates in the order the exact stage scores them: by the upper bound of
        their exact scores (from the version's calibrated bound and their sketch ranks), lexical
        candidates first (they have no sketch rank to bound them by). Without a bound (or with
        early stopping off) every candidate's bound is infinite: all are scored, in sketch
        order. Their estimates are the bound's calibrated line (the sketch score without one),
        so that a deadline's answer ranks them on the exact scores' scale."""
        ids, scores = retrieved
        all_ids = lexical + ids
        scores = np.concatenate([self._index_scores(space, lexical, records), scores])
        norms = _norms(all_ids, records)
        cosines, scale = space.cosine_units(scores, norms), space.cosine_scale(norms)
        bound = self.manifest.rerank_bound
        estimates = (cosines if bound is None else bound.estimate(cosines)) * scale
        estimates[space.norm * norms <= 0] = 0.0  # no gradient: its exact score is 0 too
        upper = np.full(len(all_ids), np.inf)
        if bound is not None and self.options.rerank_early_stop:
            sketched = slice(len(lexical), None)
            upper[sketched] = bound.upper(cosines[sketched], np.arange(len(ids))) * scale[sketched]
        order = np.argsort(-upper, kind="stable")
        return CandidateList(
            ids=[all_ids[k] for k in order],
            estimates=estimates[order],
            upper=upper[order],
            top_k=top_k,
            deadline=deadline,
            abandoned=abandoned,
        )

    def _exact_stage(
        self,
        lists: dict[int, CandidateList],
        targets: QueryTargets,
        records: dict[int, ExampleRecord],
    ) -> dict[int, StageResult]:
        """Each listed query's exact stage (by batch row), all sharing each round's pass."""
        rows = list(lists)

        def score(wanted: dict[int, list[int]]) -> list[ExactScores]:
            needed = {i for ids in wanted.values() for i in ids}
            tokens = {i: records[i].token_ids for i in needed}
            norms = {i: records[i].exact_norm for i in needed}
            chosen = targets.select([rows[k] for k in wanted])
            with self._model.lock:
                return self.reranker.score(
                    chosen, list(wanted.values()), tokens, norms, self.info.score_kind
                )

        results = run_exact_stage(
            list(lists.values()), score, self.options.rerank_chunk, self._model.rerank_cost
        )
        return dict(zip(rows, results, strict=True))

    def _lexical(
        self, queries: list[TokenizedQuery], candidates: list[list[int]]
    ) -> list[list[int]]:
        """Each query's BM25 matches (prompt + completion) not among its candidates already
        (none for a query that asks for no lexical candidates)."""
        extra: list[list[int]] = [[] for _ in queries]
        asking = [row for row, tq in enumerate(queries) if tq.query.lexical_candidates]
        if not asking:
            return extra
        # A space keeps the prompt's last word and a completion's first apart, as BM25 needs.
        texts = [f"{queries[r].query.prompt} {queries[r].query.completion}" for r in asking]
        k = max(queries[r].query.lexical_candidates for r in asking)
        for row, found in zip(asking, self.lexical.search(texts, k), strict=True):
            seen = set(candidates[row])
            wanted = found[: queries[row].query.lexical_candidates]
            extra[row] = [i for i in wanted if i not in seen]
        return extra

    def _index_scores(
        self, space: ScoreSpace, example_ids: list[int], records: dict[int, ExampleRecord]
    ) -> np.ndarray:
        """The index's scores `[n]` of the given examples, as a search would give them."""
        return self.vectors[[records[i].row for i in example_ids]] @ space.search

    def _layer_scores(
        self,
        queries: list[TokenizedQuery],
        spaces: list[ScoreSpace],
        ranked: list[_Ranked],
        records: dict[int, ExampleRecord],
    ) -> list[list[dict[str, float]] | None]:
        """Per query that asks, each hit's sketch influence per tracked module (they sum to the
        hit's sketch influence): one decode of every row those hits need."""
        asking = [row for row, tq in enumerate(queries) if tq.query.include_layer_scores]
        layers: list[list[dict[str, float]] | None] = [None] * len(queries)
        if not asking:
            return layers
        rows = sorted({records[i].row for row in asking for i in ranked[row].ids})
        position = {r: k for k, r in enumerate(rows)}
        stored = self.vectors[rows]
        slices = self.curvature.layer_slices()
        starts = [s.start for s in slices.values()]
        for row in asking:
            hits = ranked[row].ids
            vectors = stored[[position[records[i].row] for i in hits]]
            per_module = np.add.reduceat(vectors * spaces[row].search, starts, axis=1)
            influence = spaces[row].both(per_module, _norms(hits, records)[:, None])[0]
            layers[row] = [dict(zip(slices, map(float, hit), strict=True)) for hit in influence]
        return layers

    def attribute_tokens(
        self, query: TokenizedQuery, example_ids: list[int]
    ) -> list[TokenAttribution]:
        """Influence of each token of the given training examples on the query."""
        records = self.metadata.lookup(example_ids)
        missing = [i for i in example_ids if i not in records]
        if missing:
            raise NotFoundError(f"unknown example ids: {', '.join(map(str, missing[:10]))}")
        ordered = [records[i] for i in example_ids]
        query = self.prepared(query)
        batch = make_batch(
            [r.token_ids for r in ordered], [1] * len(ordered), self.pad_id, [0] * len(ordered)
        )
        with self._model.lock:
            q = query_vectors(self.sketcher, self.curvature, [query], self.pad_id)
            folded = self.curvature.fold(q)
            scores = self.curvature.token_scores(self.sketcher.run(batch), folded)[0]
        tokenizer = self.loaded.tokenizer
        with self._model.tokenizer_lock:
            tokens = [[tokenizer.decode([t]) for t in r.token_ids] for r in ordered]
        return [
            TokenAttribution(
                example_id=r.example_id,
                doc_id=r.doc_id,
                tokens=tokens[b],
                scores=scores[b, : len(r.token_ids)].tolist(),
                total=float(scores[b].sum()),
            )
            for b, r in enumerate(ordered)
        ]

    def close(self) -> None:
        self.metadata.close()


def _searcher(
    path: Path, manifest: Manifest, index: faiss.Index, device: str, options: EngineOptions
) -> Searcher:
    """The stored codes scanned on a CUDA device; else the version's compact code, scanned
    first, when it has one; else the stored codes scanned on the CPU (`device_searcher`)."""
    searcher = device_searcher(index, device)
    on_cuda = isinstance(searcher, CodeScan) and searcher.device.type == "cuda"
    if on_cuda or manifest.retrieval is None or not options.retrieval_candidates:
        return searcher
    return TieredSearcher(open_index(path / RETRIEVAL_FILE), index, options.retrieval_candidates)


def _open_model(
    version: str, manifest: Manifest, model_dir: Path | None, device: str, reuse: QueryEngine | None
) -> _ModelHandle:
    """The manifest's model (or `model_dir`), refused unless its weights' sha256 matches, and
    its config.json's where the manifest records one."""
    if reuse is not None and _same_model(reuse.loaded, manifest.model):
        return reuse._model
    directory = Path(model_dir or manifest.model.path)
    try:
        loaded = load_model(directory, device)
    except InvalidInputError as e:
        raise IndexVerificationError(f"cannot load the index's model: {e}") from e
    expected = manifest.model
    if loaded.weights_sha256 != expected.weights_sha256:
        raise IndexVerificationError(
            f"model weights in {directory} (sha256 {loaded.weights_sha256[:12]}) are not the ones "
            f"index {version} was built from (sha256 {expected.weights_sha256[:12]})"
        )
    if not _same_model(loaded, expected):
        raise IndexVerificationError(
            f"model config {directory / 'config.json'} (sha256 {loaded.config_sha256[:12]}) is "
            f"not the one index {version} was built with (sha256 {expected.config_sha256[:12]})"
        )
    return _ModelHandle(loaded)


def _same_model(loaded: LoadedModel, built: ModelIdentity) -> bool:
    """Whether `loaded` is the model a version was built from: its weights, and its config
    where the version recorded one."""
    same_config = not built.config_sha256 or loaded.config_sha256 == built.config_sha256
    return loaded.weights_sha256 == built.weights_sha256 and same_config
