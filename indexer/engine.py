"""The query engine: one published index version, ready to answer queries.

It owns the model, the curvature, the FAISS index, the vectors and the metadata of one
version. A query is prepared (validated and tokenized, once) and then answered, alone or in a
batch that shares one forward/backward pass. The gRPC server is one caller; eval is another.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from indexer.config import ScoreKind
from indexer.corpus import framing
from indexer.curvature import Curvature
from indexer.errors import (
    IndexVerificationError,
    InvalidInputError,
    NotFoundError,
    PreconditionError,
)
from indexer.exact import ExactReranker, ExactScores
from indexer.lexical import LexicalIndex
from indexer.manifest import (
    CURVATURE_FILE,
    FULL_CURVATURE_FILE,
    INDEX_FILE,
    LEXICAL_DIR,
    METADATA_FILE,
    Manifest,
)
from indexer.model import LoadedModel, load_model
from indexer.publish import verify_version, version_dir
from indexer.query import (
    Query,
    TokenizedQuery,
    max_query_chars,
    query_capture,
    query_vectors,
    token_influence,
    tokenize_query,
)
from indexer.sketch import Capture, GradientSketcher, make_batch
from indexer.store import (
    ExampleRecord,
    MetadataReader,
    StoredVectors,
    open_index,
    set_nprobe,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How a served engine answers: the default exact re-rank depth and the budget guarding it."""

    # Candidates re-ranked exactly when a query does not say (0: off); 200 holds 0.97 (cosine) and
    # 0.91 (influence) of exact top-10 at 64x64 on the demo (benchmarks/RESULTS.md)
    rerank_depth: int = 200
    max_rerank_tokens: int = 131_072  # re-rank depth x tokens per example, at most
    rerank_batch_size: int = 32  # candidates per forward/backward of the re-rank pass


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
    """A query's top hits, best first, in `score_kind`."""

    hits: list[Hit]
    n_completion_tokens: int
    score_kind: ScoreKind
    timings: StageTimings = field(default_factory=StageTimings)


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
    rank_in: int
    rank_out: int
    damping: float
    max_length: int  # tokens: the limit on a query's prompt plus completion
    rerank_available: bool = False
    lexical_available: bool = False
    rerank_depth: int = 0  # the default depth; 0: no re-ranking unless asked
    max_rerank_depth: int = 0

    @classmethod
    def from_manifest(
        cls, version: str, manifest: Manifest, options: EngineOptions | None = None
    ) -> IndexInfo:
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
            rank_in=manifest.sketch.rank_in,
            rank_out=manifest.sketch.rank_out,
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
        )


@dataclass(frozen=True)
class _Scoring:
    """A query's preconditioned sketch vector `[D]` and its norm."""

    vector: np.ndarray
    norm: float


@dataclass(frozen=True)
class _ExactRow:
    """A query's re-ranked candidates: ids `[n]`, the sketch's scores `[n]`, exact scores."""

    ids: list[int]
    estimates: np.ndarray
    exact: ExactScores


def _candidates(query: Query) -> int:
    """How many candidates the query's exact re-rank scores (0: none); at least its top_k."""
    return max(query.rerank_depth, query.top_k) if query.rerank_depth else 0


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
    """A loaded model, the lock that serialises passes through it (hooks are per model), and
    the lock that serialises its tokenizer (a fast tokenizer is not safe across threads)."""

    loaded: LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)


class QueryEngine:
    """Answers queries against one verified version. Safe to call from several threads."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        model: _ModelHandle,
        curvature: Curvature,
        index: faiss.Index,
        metadata: MetadataReader,
        vectors: StoredVectors,
        reranker: ExactReranker | None = None,
        lexical: LexicalIndex | None = None,
        options: EngineOptions | None = None,
    ):
        self.path = path
        self.version = path.name
        self.manifest = manifest
        self.options = options or EngineOptions()
        self.info = IndexInfo.from_manifest(self.version, manifest, self.options)
        self.reranker = reranker
        self.lexical = lexical
        self._model = model
        self.curvature = curvature
        self.index = index
        self.metadata = metadata
        self.vectors = vectors
        named = dict(model.loaded.model.named_modules())
        self.sketcher = GradientSketcher(
            model.loaded.model, {n: named[n] for n in curvature.modules}, curvature.projections()
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
    ) -> QueryEngine:
        """Load and verify a version (default: CURRENT's). Raises IndexVerificationError when a
        file fails its sha256 or the model's weights are not the ones the index was built from."""
        path = version_dir(Path(root), version)
        manifest = verify_version(path)
        model = _open_model(path.name, manifest, model_dir, device, reuse_model_from)
        named = dict(model.loaded.model.named_modules())
        missing = [m.name for m in manifest.modules if m.name not in named]
        if missing:
            raise IndexVerificationError(f"model has no module {missing[0]} that the index tracks")
        curvature = Curvature.load(path / CURVATURE_FILE, device)
        index = open_index(path / INDEX_FILE)
        set_nprobe(index, manifest.nprobe)
        metadata = MetadataReader(path / METADATA_FILE)
        vectors = StoredVectors(index, metadata, unit_norm=manifest.score == ScoreKind.COSINE)
        reranker = None
        if manifest.exact_rerank:
            options = options or EngineOptions()
            full = Curvature.load(path / FULL_CURVATURE_FILE, device)
            pad_id = model.loaded.tokenizer.pad_token_id
            reranker = ExactReranker(model.loaded.model, full, pad_id, options.rerank_batch_size)
        lexical = LexicalIndex(path / LEXICAL_DIR) if manifest.lexical_index else None
        log.info("opened index version %s (%d examples)", path.name, metadata.count())
        return cls(
            path, manifest, model, curvature, index, metadata, vectors, reranker, lexical, options
        )

    @property
    def loaded(self) -> LoadedModel:
        return self._model.loaded

    def prepare(self, query: Query) -> TokenizedQuery:
        """Validate a query against this version and tokenize it; InvalidInputError names the
        problem (empty or too long, another score kind, a re-rank depth over the budget)."""
        kind = query.score_kind or self.info.score_kind
        if kind != self.info.score_kind:
            raise InvalidInputError(
                f"this index ranks by {self.info.score_kind}; rebuild with --score {kind} "
                "to rank by it (both scores are returned in every hit)"
            )
        query = replace(query, rerank_depth=self._rerank_depth(query))
        with self._model.tokenizer_lock:
            return tokenize_query(
                self.loaded.tokenizer,
                query,
                self.info.max_length,
                tokenized_by=self.version,
                max_chars=self._max_query_chars,
                prefix=self._prefix,
            )

    def _rerank_depth(self, query: Query) -> int:
        """The query's re-rank depth (its own or the default), checked against the budget,
        which its lexical candidates share."""
        if query.lexical_candidates and not self.info.lexical_available:
            raise PreconditionError(
                f"index version {self.version} was built without a lexical index: rebuild "
                "with --lexical-index on for lexical candidates"
            )
        depth = self.info.rerank_depth if query.rerank_depth is None else query.rerank_depth
        if query.lexical_candidates and not depth:
            raise InvalidInputError(
                "lexical_candidates need exact re-ranking (a rerank_depth above 0) to be "
                "ranked with the index's candidates"
            )
        if query.rerank_depth is None or not depth:
            return depth
        if not self.info.rerank_available:
            raise PreconditionError(
                f"index version {self.version} was built without exact re-rank factors: "
                "rebuild with --exact-rerank on to re-rank"
            )
        if depth + query.lexical_candidates > self.info.max_rerank_depth:
            raise InvalidInputError(
                f"rerank_depth {depth} + lexical_candidates {query.lexical_candidates} is over "
                f"this server's limit of {self.info.max_rerank_depth} "
                f"({self.options.max_rerank_tokens} tokens, --max-rerank-tokens, at "
                f"{self.manifest.max_length} tokens per example)"
            )
        return depth

    def _prepared(self, queries: list[TokenizedQuery]) -> list[TokenizedQuery]:
        """The queries, tokenized again only if another version prepared them."""
        return [q if q.tokenized_by == self.version else self.prepare(q.query) for q in queries]

    def query_vectors(self, queries: list[TokenizedQuery]) -> np.ndarray:
        """Preconditioned query vectors `[n_queries, D]` (float32): one forward/backward."""
        with self._model.lock:
            vectors = query_vectors(self.sketcher, self.curvature, queries, self.pad_id)
        return vectors.cpu().numpy().astype(np.float32)

    def query(self, queries: list[Query]) -> list[QueryResult]:
        """Prepare and answer queries (see `answer`)."""
        return self.answer([self.prepare(q) for q in queries])

    def answer(self, queries: list[TokenizedQuery]) -> list[QueryResult]:
        """Top-k influencers of each prepared query: one batched forward/backward, one search,
        one metadata lookup, and for queries with a re-rank depth K′ one batched
        forward/backward over their K′ candidates that scores them exactly. Each query gets its
        own top_k, depth and include flags."""
        clock = _Clock()
        queries = self._prepared(queries)
        timings = StageTimings(tokenize_us=clock.lap())
        depths = [_candidates(tq.query) for tq in queries]
        with self._model.lock:
            capture = query_capture(self.sketcher, queries, self.pad_id, keep_full=any(depths))
            q = self.curvature.vectors(capture).cpu().numpy().astype(np.float32)
        timings.gradient_us = clock.lap()
        q_norms = np.linalg.norm(q, axis=1)
        kind = self.info.score_kind
        search = q / np.maximum(q_norms[:, None], 1e-30) if kind == ScoreKind.COSINE else q
        depth = max(max(tq.query.top_k, d) for tq, d in zip(queries, depths, strict=True))
        scores, ids = self.index.search(np.ascontiguousarray(search), depth)
        timings.search_us = clock.lap()
        candidates, estimates = [], []
        for row, d in enumerate(depths):
            kept = ids[row][:d] >= 0
            candidates.append(ids[row][:d][kept].tolist())
            estimates.append(scores[row][:d][kept])
        self._add_lexical(queries, candidates, estimates, q)
        wanted = {int(i) for i in ids.ravel() if i >= 0} | {i for c in candidates for i in c}
        records = self.metadata.lookup(sorted(wanted))
        timings.lookup_us = clock.lap()
        exact = None
        if any(depths):
            exact = self._rerank(capture.full, candidates, records)
            timings.rerank_us = clock.lap()
        results = []
        for row, tq in enumerate(queries):
            sketch = _Scoring(q[row], float(q_norms[row]))
            if depths[row]:
                exact_row = _ExactRow(candidates[row], estimates[row], exact[row])
                hits = self._exact_hits(records, exact_row, sketch, tq.query)
            else:
                ranked = zip(scores[row][: tq.query.top_k], ids[row][: tq.query.top_k], strict=True)
                hits = [
                    self._hit(records[int(i)], float(s), sketch, tq.query)
                    for s, i in ranked
                    if i >= 0
                ]
            results.append(QueryResult(hits, tq.n_completion_tokens, kind, timings))
        return results

    def _add_lexical(
        self,
        queries: list[TokenizedQuery],
        candidates: list[list[int]],
        estimates: list[np.ndarray],
        q: np.ndarray,
    ) -> None:
        """Append each query's BM25 matches (prompt + completion) to its candidates, with the
        sketch's estimates of their scores."""
        asking = [row for row, tq in enumerate(queries) if tq.query.lexical_candidates]
        if not asking:
            return
        texts = [f"{queries[r].query.prompt}{queries[r].query.completion}" for r in asking]
        k = max(queries[r].query.lexical_candidates for r in asking)
        for row, found in zip(asking, self.lexical.search(texts, k), strict=True):
            seen = set(candidates[row])
            new = [i for i in found[: queries[row].query.lexical_candidates] if i not in seen]
            candidates[row].extend(new)
            estimates[row] = np.concatenate([estimates[row], self._sketch_scores(q[row], new)])

    def _sketch_scores(self, q: np.ndarray, example_ids: list[int]) -> np.ndarray:
        """The index's score `[n]` of the given examples, from the stored vectors."""
        records = self.metadata.lookup(example_ids)
        rows = [records[i].row for i in example_ids]
        v = np.asarray(self.vectors[rows], dtype=np.float32)
        if self.info.score_kind == ScoreKind.COSINE:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
            q = q / max(float(np.linalg.norm(q)), 1e-30)
        return v @ q

    def _rerank(
        self, full: Capture, candidates: list[list[int]], records: dict[int, ExampleRecord]
    ) -> list[ExactScores]:
        tokens = {i: records[i].token_ids for ids in candidates for i in ids}
        norms = {i: records[i].exact_norm for i in tokens}
        with self._model.lock:
            return self.reranker.score(full, candidates, tokens, norms, self.info.score_kind)

    def _exact_hits(
        self, records: dict[int, ExampleRecord], row: _ExactRow, sketch: _Scoring, query: Query
    ) -> list[Hit]:
        """The query's candidates ranked by exact score, best `top_k` first. The exact scores
        replace the sketch's estimates; a cosine the re-rank did not compute stays estimated."""
        exact = row.exact
        scores = exact.influence if exact.cosine is None else exact.cosine
        hits = []
        for i in np.argsort(-scores, kind="stable")[: query.top_k]:
            estimated = self._hit(records[row.ids[i]], float(row.estimates[i]), sketch, query)
            cosine = estimated.cosine if exact.cosine is None else float(exact.cosine[i])
            influence = float(exact.influence[i])
            hits.append(
                replace(
                    estimated,
                    score=float(scores[i]),
                    influence=influence,
                    cosine=cosine,
                    exact=True,
                )
            )
        return hits

    def _hit(self, record: ExampleRecord, score: float, sketch: _Scoring, query: Query) -> Hit:
        """A hit whose other score is estimated from the sketch norms."""
        q, q_norm = sketch.vector, sketch.norm
        scale = max(q_norm * record.norm, 1e-30)
        if self.info.score_kind == ScoreKind.COSINE:
            influence, cosine = score * scale, score
        else:
            influence, cosine = score, score / scale
        layers = None
        if query.include_layer_scores:
            v = np.asarray(self.vectors[record.row], dtype=np.float32)
            layers = {n: float(q[s] @ v[s]) for n, s in self.curvature.layer_slices().items()}
        return Hit(
            example_id=record.example_id,
            doc_id=record.doc_id,
            chunk=record.chunk,
            score=score,
            influence=influence,
            cosine=cosine,
            text=record.text if query.include_text else None,
            layer_scores=layers,
        )

    def attribute_tokens(
        self, query: TokenizedQuery, example_ids: list[int]
    ) -> list[TokenAttribution]:
        """Influence of each token of the given training examples on the query."""
        records = self.metadata.lookup(example_ids)
        missing = [i for i in example_ids if i not in records]
        if missing:
            raise NotFoundError(f"unknown example ids: {', '.join(map(str, missing[:10]))}")
        ordered = [records[i] for i in example_ids]
        (query,) = self._prepared([query])
        batch = make_batch(
            [r.token_ids for r in ordered], [1] * len(ordered), self.pad_id, [0] * len(ordered)
        )
        with self._model.lock:
            q = query_vectors(self.sketcher, self.curvature, [query], self.pad_id)[0]
            scores = token_influence(self.sketcher.run(batch), self.curvature, q)
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


def _open_model(
    version: str, manifest: Manifest, model_dir: Path | None, device: str, reuse: QueryEngine | None
) -> _ModelHandle:
    """The manifest's model (or `model_dir`), refused unless its weights' sha256 matches."""
    expected = manifest.model.weights_sha256
    if reuse is not None and reuse.loaded.weights_sha256 == expected:
        return reuse._model
    directory = Path(model_dir or manifest.model.path)
    try:
        loaded = load_model(directory, device)
    except InvalidInputError as e:
        raise IndexVerificationError(f"cannot load the index's model: {e}") from e
    if loaded.weights_sha256 != expected:
        raise IndexVerificationError(
            f"model weights in {directory} (sha256 {loaded.weights_sha256[:12]}) are not the ones "
            f"index {version} was built from (sha256 {expected[:12]})"
        )
    return _ModelHandle(loaded)
