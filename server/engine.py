"""The query engine: one published index version, ready to answer queries.

It owns the model, the curvature, the FAISS index, the vectors and the metadata of one
version. It never imports grpc: the servicer converts requests into these calls.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer.curvature import Curvature
from indexer.errors import IndexVerificationError, InvalidInputError, NotFoundError
from indexer.model import LoadedModel, load_model
from indexer.publish import verify_version, version_dir
from indexer.query import EncodedQuery, encode_query, query_vectors, token_influence
from indexer.sketch import GradientSketcher, make_batch
from indexer.store import (
    CURVATURE_FILE,
    INDEX_FILE,
    METADATA_FILE,
    VECTORS_FILE,
    ExampleRecord,
    MetadataReader,
    open_vectors,
    set_nprobe,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryInput:
    """One (prompt, completion) pair. The completion's tokens carry the query loss."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Hit:
    """One retrieved training example. `score` is in the requested score kind."""

    example_id: int
    doc_id: str
    chunk: int
    score: float
    influence: float
    cosine: float
    text: str | None = None
    layer_scores: dict[str, float] | None = None


@dataclass
class StageTimings:
    """Wall time of each stage of one query, in microseconds."""

    tokenize_us: int = 0
    gradient_us: int = 0
    search_us: int = 0
    lookup_us: int = 0


@dataclass
class QueryResult:
    hits: list[Hit]
    n_completion_tokens: int
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
    score_kind: str
    faiss_factory: str
    build_time: str
    tracked_modules: list[str]
    rank_in: int
    rank_out: int
    damping: float
    max_length: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> IndexInfo:
        return cls(
            version=manifest["version"],
            model_path=manifest["model"]["path"],
            model_sha256=manifest["model"]["weights_sha256"],
            n_examples=manifest["counts"]["examples"],
            dim=manifest["dim"],
            score_kind=manifest["score"],
            faiss_factory=manifest["index_factory"],
            build_time=manifest["created"],
            tracked_modules=[m["name"] for m in manifest["modules"]],
            rank_in=manifest["sketch"]["rank_in"],
            rank_out=manifest["sketch"]["rank_out"],
            damping=manifest["curvature"]["damping"],
            max_length=manifest["model"]["context_length"],
        )


@dataclass(frozen=True)
class _QueryScoring:
    """What turns a search score into both score kinds: the query vector `[D]` and its norm."""

    vector: np.ndarray
    norm: float
    kind: str


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
    """A loaded model and the lock that serialises passes through it (hooks are per model)."""

    loaded: LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock)


class QueryEngine:
    """Answers queries against one verified version. Safe to call from several threads."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        model: _ModelHandle,
        curvature: Curvature,
        index: faiss.Index,
        metadata: MetadataReader,
        vectors: np.ndarray | None,
    ):
        self.path = path
        self.manifest = manifest
        self.info = IndexInfo.from_manifest(manifest)
        self.version = self.info.version
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

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        device: str = "cpu",
        model_dir: Path | None = None,
        reuse_model_from: QueryEngine | None = None,
        version: str | None = None,
    ) -> QueryEngine:
        """Load and verify a version (default: CURRENT's). Raises IndexVerificationError when a
        file fails its sha256 or the model's weights are not the ones the index was built from."""
        path = version_dir(Path(root), version)
        manifest = verify_version(path)
        model = _open_model(manifest, model_dir, device, reuse_model_from)
        named = dict(model.loaded.model.named_modules())
        missing = [m["name"] for m in manifest["modules"] if m["name"] not in named]
        if missing:
            raise IndexVerificationError(f"model has no module {missing[0]} that the index tracks")
        curvature = Curvature.load(path / CURVATURE_FILE, device)
        index = faiss.read_index(str(path / INDEX_FILE))
        set_nprobe(index, manifest["nprobe"])
        vectors = None
        if manifest["vectors_stored"]:
            n = manifest["counts"]["examples"]
            vectors = open_vectors(path / VECTORS_FILE, n, manifest["dim"])
        metadata = MetadataReader(path / METADATA_FILE)
        log.info("opened index version %s (%d examples)", manifest["version"], metadata.count())
        return cls(path, manifest, model, curvature, index, metadata, vectors)

    @property
    def loaded(self) -> LoadedModel:
        return self._model.loaded

    def encode(self, query: QueryInput) -> EncodedQuery:
        return encode_query(
            self.loaded.tokenizer, query.prompt, query.completion, self.info.max_length
        )

    def check_query(self, query: QueryInput) -> None:
        """Raise InvalidInputError for a query that cannot be answered (empty, too long)."""
        self.encode(query)

    def query_vectors(self, encoded: list[EncodedQuery]) -> np.ndarray:
        """Preconditioned query vectors `[n_queries, D]` (float32): one forward/backward."""
        with self._model.lock:
            vectors = query_vectors(self.sketcher, self.curvature, encoded, self.pad_id)
        return vectors.cpu().numpy().astype(np.float32)

    def query(
        self,
        queries: list[QueryInput],
        *,
        top_k: int,
        score_kind: str | None = None,
        include_text: bool = False,
        include_layer_scores: bool = False,
    ) -> list[QueryResult]:
        """Top-k influencers of each query: one batched forward/backward, search, lookup."""
        kind = score_kind or self.info.score_kind
        if kind != self.info.score_kind:
            raise InvalidInputError(
                f"this index ranks by {self.info.score_kind}; rebuild with --score {kind} "
                "to rank by it (both scores are returned in every hit)"
            )
        if include_layer_scores and self.vectors is None:
            raise InvalidInputError("this index was built without vectors.f16: no layer scores")
        clock = _Clock()
        encoded = [self.encode(q) for q in queries]
        timings = StageTimings(tokenize_us=clock.lap())
        q = self.query_vectors(encoded)
        timings.gradient_us = clock.lap()
        q_norms = np.linalg.norm(q, axis=1)
        search = q / np.maximum(q_norms[:, None], 1e-30) if kind == "cosine" else q
        scores, ids = self.index.search(np.ascontiguousarray(search), top_k)
        timings.search_us = clock.lap()
        records = self.metadata.lookup(sorted({int(i) for i in ids.ravel() if i >= 0}))
        results = []
        for row, query in enumerate(encoded):
            scoring = _QueryScoring(q[row], float(q_norms[row]), kind)
            hits = [
                self._hit(records[int(i)], float(s), scoring, include_text, include_layer_scores)
                for s, i in zip(scores[row], ids[row], strict=True)
                if i >= 0
            ]
            results.append(QueryResult(hits, query.n_completion_tokens, timings))
        timings.lookup_us = clock.lap()
        return results

    def _hit(
        self,
        record: ExampleRecord,
        score: float,
        scoring: _QueryScoring,
        include_text: bool,
        include_layer_scores: bool,
    ) -> Hit:
        scale = max(scoring.norm * record.norm, 1e-30)
        if scoring.kind == "cosine":
            influence, cosine = score * scale, score
        else:
            influence, cosine = score, score / scale
        layers = None
        if include_layer_scores:
            v = np.asarray(self.vectors[record.row], dtype=np.float32)
            q = scoring.vector
            layers = {n: float(q[s] @ v[s]) for n, s in self.curvature.layer_slices().items()}
        return Hit(
            example_id=record.example_id,
            doc_id=record.doc_id,
            chunk=record.chunk,
            score=score,
            influence=influence,
            cosine=cosine,
            text=record.text if include_text else None,
            layer_scores=layers,
        )

    def attribute_tokens(self, query: QueryInput, example_ids: list[int]) -> list[TokenAttribution]:
        """Influence of each token of the given training examples on the query."""
        records = self.metadata.lookup(example_ids)
        missing = [i for i in example_ids if i not in records]
        if missing:
            raise NotFoundError(f"unknown example ids: {', '.join(map(str, missing[:10]))}")
        ordered = [records[i] for i in example_ids]
        encoded = self.encode(query)
        batch = make_batch(
            [r.token_ids for r in ordered], [1] * len(ordered), self.pad_id, [0] * len(ordered)
        )
        with self._model.lock:
            q = query_vectors(self.sketcher, self.curvature, [encoded], self.pad_id)[0]
            scores = token_influence(self.sketcher.run(batch), self.curvature, q)
        tokenizer = self.loaded.tokenizer
        return [
            TokenAttribution(
                example_id=r.example_id,
                doc_id=r.doc_id,
                tokens=[tokenizer.decode([t]) for t in r.token_ids],
                scores=scores[b, : len(r.token_ids)].tolist(),
                total=float(scores[b].sum()),
            )
            for b, r in enumerate(ordered)
        ]

    def close(self) -> None:
        self.metadata.close()


def _open_model(
    manifest: dict, model_dir: Path | None, device: str, reuse: QueryEngine | None
) -> _ModelHandle:
    """The manifest's model (or `model_dir`), refused unless its weights' sha256 matches."""
    expected = manifest["model"]["weights_sha256"]
    if reuse is not None and reuse.loaded.weights_sha256 == expected:
        return reuse._model
    directory = Path(model_dir or manifest["model"]["path"])
    try:
        loaded = load_model(directory, device)
    except InvalidInputError as e:
        raise IndexVerificationError(f"cannot load the index's model: {e}") from e
    if loaded.weights_sha256 != expected:
        raise IndexVerificationError(
            f"model weights in {directory} (sha256 {loaded.weights_sha256[:12]}) are not the ones "
            f"index {manifest['version']} was built from (sha256 {expected[:12]})"
        )
    return _ModelHandle(loaded)
