"""The typed manifest of a published version, and the file names of the version format.

`manifest.json` describes one version: the model and settings it was built with, the layout
of its vectors, its counts, and the sha256 of every file. A version's id is its directory's
name, never a field of the manifest, so a copied version cannot claim to be another.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from indexer.config import (
    Autocast,
    CompactCode,
    CorpusConfig,
    CurvatureConfig,
    Projection,
    ScoreKind,
    SketchConfig,
)
from indexer.errors import IndexVerificationError
from indexer.scores import RerankBound

# 4: the index is the only copy of the vectors (no vectors.f16); content hashes in the metadata;
# the curvature fit's age; incremental builds. 5: each example's exact preconditioned norm in
# the metadata (a cosine index with re-rank factors). 6: the exact stage's calibrated bound;
# each module's sketch ranks in its layout (a budget per example, allocated across modules).
# 7: the share of the blocks' parameters tracked (experts and routers tracked too).
# 8: a compact retrieval code (RETRIEVAL_FILE) scanned before the stored codes; with Milvus,
# the collection that holds the vectors; the code's projection recorded since random projections
# replaced principal directions (a record without one is PCA's); how the build's compact code
# searched its pseudo-queries (`retrieval_check`, absent before: none recorded); a Hadamard
# rotation among the projections (`hadamard`, the default since stop 29: code readers before
# it call such a manifest malformed).
FORMAT_VERSION = 8

MANIFEST_FILE = "manifest.json"
CURVATURE_FILE = "curvature.safetensors"
FULL_CURVATURE_FILE = "curvature-full.safetensors"
# The BM25 index (bm25s 0.3's files, plus the example ids in its order).
LEXICAL_FILES = tuple(
    f"lexical/{name}"
    for name in (
        "params.index.json",
        "vocab.index.json",
        "data.csc.index.npy",
        "indices.csc.index.npy",
        "indptr.csc.index.npy",
        "ids.npy",
    )
)
LEXICAL_DIR = "lexical"
INDEX_FILE = "index.faiss"
RETRIEVAL_FILE = "retrieval.faiss"  # the compact retrieval code, when `retrieval` is set
METADATA_FILE = "metadata.duckdb"


@dataclass(frozen=True)
class ModelIdentity:
    """The model a version was built from; a server refuses other weights."""

    path: str
    weights_sha256: str
    tokenizer_sha256: str
    context_length: int  # tokens: the limit on a query's prompt plus completion
    # sha256 of config.json: the architecture the weights run in (activation, norms, ...);
    # '' in versions built before it was recorded
    config_sha256: str = ""


@dataclass(frozen=True)
class ModuleLayout:
    """A tracked module and its columns `[start, stop)` in every stored vector: its
    `rank_out x rank_in` sketch (`stop - start` coordinates) of a `d_out x d_in` gradient."""

    name: str
    start: int
    stop: int
    d_in: int  # counts the appended 1 of a bias
    d_out: int
    has_bias: bool
    rank_out: int
    rank_in: int


@dataclass(frozen=True)
class Coverage:
    """How much of the transformer blocks' parameters (embeddings and LM head excluded) the
    tracked modules hold: `tracked` of `total` elements; `skipped` names the block parameters
    left out (wholly or in part), their layer indices as `*`."""

    tracked: int
    total: int
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skipped", tuple(self.skipped))  # from JSON

    @property
    def share(self) -> float:
        return self.tracked / max(self.total, 1)

    def __str__(self) -> str:
        skipped = ", ".join(self.skipped) or "nothing"
        return (
            f"{self.share:.1%} of the blocks' parameters ({self.tracked:,} of {self.total:,}); "
            f"skipped: {skipped}"
        )


@dataclass(frozen=True)
class Counts:
    documents: int
    examples: int
    empty_skipped: int
    tokens: int


@dataclass(frozen=True)
class CurvatureFit:
    """When the stored curvature was fitted, and how far the corpus has moved since: an
    incremental build reuses it until `changed_since / examples now` passes its threshold."""

    created: str  # ISO 8601, UTC: when the fit was made
    examples: int  # corpus examples when it was fitted
    changed_since: int = 0  # examples added, changed or deleted by incremental builds since


@dataclass(frozen=True)
class CollectionRecord:
    """A version's Milvus collection (`indexer.milvus`): its name, its rows, and the sha256 of
    its rows' digests in id order, checked by reading it back before the alias moves."""

    name: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class RetrievalCheck:
    """How a compact code (`indexer.retrieval`) searched the build's own `queries`
    pseudo-queries: the share of the flat index's top-10 found by its top `candidates` (K″)
    re-scored (`flat_top10`); `kept`: whether the version stores the code."""

    code: str
    candidates: int
    queries: int
    flat_top10: float
    kept: bool

    def __str__(self) -> str:
        verdict = "scanned first" if self.kept else "not stored: every stored code is scanned"
        return (
            f"{self.code} kept {self.flat_top10:.3f} of the flat top-10 at K″ = "
            f"{self.candidates} ({self.queries} pseudo-queries): {verdict}"
        )


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to trust and use a version. `files` is filled at publishing."""

    created: str  # ISO 8601, UTC
    code_version: str
    model: ModelIdentity
    modules: tuple[ModuleLayout, ...]
    corpus: CorpusConfig  # max_length resolved to the tokens per example actually used
    sketch: SketchConfig
    curvature: CurvatureConfig
    score: ScoreKind
    index_factory: str
    nprobe: int
    dim: int
    exact_rerank: bool  # full-space factors stored (FULL_CURVATURE_FILE)
    lexical_index: bool  # a BM25 index of the examples' texts stored (LEXICAL_FILES)
    counts: Counts
    curvature_fit: CurvatureFit
    coverage: Coverage
    built_from: str | None = None  # the version whose curvature and vectors were reused
    # How far the sketch's score may be from the exact one (with re-rank factors only)
    rerank_bound: RerankBound | None = None
    retrieval: CompactCode | None = None  # the compact code scanned first (RETRIEVAL_FILE)
    # How the build's compact code searched its pseudo-queries, kept or not (None: none built)
    retrieval_check: RetrievalCheck | None = None
    autocast: Autocast = Autocast.OFF  # the precision of the build's passes over the corpus
    build_seconds: dict[str, float] = field(default_factory=dict)
    # With --backend milvus: the collection that holds the vectors a server searches. The
    # version's files stay complete, so a reader that ignores this field reads a FAISS version.
    collection: CollectionRecord | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def max_length(self) -> int:
        """Tokens per example."""
        assert self.corpus.max_length is not None
        return self.corpus.max_length

    def shared_ranks(self) -> tuple[int, int]:
        """`(rank_out, rank_in)` when every module has the same ranks, else `(0, 0)`."""
        ranks = {(m.rank_out, m.rank_in) for m in self.modules}
        return ranks.pop() if len(ranks) == 1 else (0, 0)

    def required_files(self) -> tuple[str, ...]:
        """The files the format requires of this version, whatever `files` lists."""
        names = [CURVATURE_FILE, INDEX_FILE, METADATA_FILE]
        if self.exact_rerank:
            names.append(FULL_CURVATURE_FILE)
        if self.lexical_index:
            names.extend(LEXICAL_FILES)
        if self.retrieval is not None:
            names.append(RETRIEVAL_FILE)
        return tuple(names)

    def with_files(self, files: dict[str, FileRecord]) -> Manifest:
        return replace(self, files=dict(files))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; IndexVerificationError names what is missing or malformed."""
        try:
            data = json.loads(text)
            found = data.get("format_version") if isinstance(data, dict) else None
            if found != FORMAT_VERSION:
                raise IndexVerificationError(
                    f"format version {found} is not {FORMAT_VERSION}, which this code reads"
                )
            return cls(
                created=data["created"],
                code_version=data["code_version"],
                model=ModelIdentity(**data["model"]),
                modules=tuple(ModuleLayout(**m) for m in data["modules"]),
                corpus=CorpusConfig(**data["corpus"]),
                sketch=SketchConfig(**data["sketch"]),
                curvature=CurvatureConfig(**data["curvature"]),
                score=ScoreKind(data["score"]),
                index_factory=data["index_factory"],
                nprobe=data["nprobe"],
                dim=data["dim"],
                exact_rerank=data["exact_rerank"],
                lexical_index=data["lexical_index"],
                counts=Counts(**data["counts"]),
                curvature_fit=CurvatureFit(**data["curvature_fit"]),
                coverage=Coverage(**data["coverage"]),
                built_from=data["built_from"],
                autocast=Autocast(data["autocast"]),
                rerank_bound=(
                    RerankBound(**data["rerank_bound"]) if data["rerank_bound"] else None
                ),
                retrieval=_compact_code(data["retrieval"]),
                retrieval_check=(
                    RetrievalCheck(**data["retrieval_check"])
                    if data.get("retrieval_check")
                    else None
                ),
                build_seconds=dict(data["build_seconds"]),
                collection=(
                    CollectionRecord(**data["collection"]) if data.get("collection") else None
                ),
                files={name: FileRecord(**f) for name, f in data["files"].items()},
            )
        except KeyError as e:
            raise IndexVerificationError(f"manifest lacks {e.args[0]}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise IndexVerificationError(f"malformed manifest ({e})") from e


def _compact_code(record: dict | None) -> CompactCode | None:
    """The manifest's compact code; one recorded before projections were named is PCA's."""
    if not record:
        return None
    return CompactCode(
        record["dims"], record["quantizer"], Projection(record.get("projection", "pca"))
    )
