"""Configuration dataclasses: what defines an index (stored in its manifest) and how to build it.

The command line takes its defaults from these classes, so a default is stated once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

DEFAULT_MAX_LENGTH = 512  # tokens per example when the model's context is longer


class ScoreKind(str, Enum):
    """How hits are ranked: raw EK-FAC influence (inner product) or cosine of the sketches."""

    INFLUENCE = "influence"
    COSINE = "cosine"

    def __str__(self) -> str:
        return self.value


def default_of(cls: type, name: str) -> object:
    """The declared default of dataclass field `name` (for command-line defaults)."""
    return next(f.default for f in fields(cls) if f.name == name)


def example_max_length(requested: int | None, context_length: int) -> int:
    """Tokens per example: `requested`, or the model's context capped at DEFAULT_MAX_LENGTH."""
    return requested or min(context_length, DEFAULT_MAX_LENGTH)


@dataclass(frozen=True)
class CorpusConfig:
    """Where the training corpus lives and how its rows become examples.

    `prefix_tokens` / `suffix_tokens` frame every sequence as the model saw it in training
    (e.g. `("<|endoftext|>",)` for a GPT-2-style model trained on separator-delimited
    documents): special tokens by name. `prefix_tokens` None means the tokenizer's own special
    tokens (e.g. its BOS). Queries get the same prefix; the suffix ends each document.
    """

    data: str
    id_column: str = "id"
    text_column: str = "text"
    max_length: int | None = None  # tokens per example; None = the model's context, capped at 512
    prefix_tokens: tuple[str, ...] | None = None
    suffix_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the config hashable and comparable.
        if self.prefix_tokens is not None:
            object.__setattr__(self, "prefix_tokens", tuple(self.prefix_tokens))
        object.__setattr__(self, "suffix_tokens", tuple(self.suffix_tokens))


@dataclass(frozen=True)
class SketchConfig:
    """The Kronecker projection: `S = sum_t (P g_t)(R a_t)^T`, an `rank_out x rank_in` matrix."""

    # 64x64 (8-bit codes) holds 0.97 / 0.91 of exact top-10 (cosine / influence) within its
    # top 200 on the demo, 32x32 0.90 / 0.83 (benchmarks/RESULTS.md, issue 8)
    rank_in: int = 64
    rank_out: int = 64
    seed: int = 0
    modules: str | None = None  # regex over module names; None = Linear/Conv1D inside the blocks


@dataclass(frozen=True)
class CurvatureConfig:
    """EK-FAC in sketch space, fitted on a subsample with labels sampled from the model."""

    fit_examples: int = 2000  # subsample for covariances and eigenvalue correction
    damping: float = 0.1  # lambda = damping * mean(Lambda), per module
    seed: int = 0


@dataclass(frozen=True)
class StoreConfig:
    """How vectors are indexed and kept."""

    score: ScoreKind = ScoreKind.COSINE  # traces facts better (benchmarks/RESULTS.md)
    index_factory: str | None = None  # None = chosen from the corpus size
    nprobe: int = 32  # inverted lists scanned per query (IVF indexes only)
    keep_versions: int = 3
    # Full-space EK-FAC factors for exact re-ranking; None: stored when they fit in memory.
    exact_rerank: bool | None = None
    lexical_index: bool = True  # BM25 over the texts, for lexical candidates


class IncrementalMode(str, Enum):
    """Whether a build reuses CURRENT's curvature and unchanged examples' vectors: `auto` when
    CURRENT is compatible (a full build otherwise), `on` or fail, `off` never."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class IncrementalConfig:
    """How a build reuses the previous version (`indexer.incremental`)."""

    mode: IncrementalMode = IncrementalMode.AUTO
    refit_curvature: bool = False  # refit (and re-sketch everything) even when reusable
    # Refit once the examples added, changed or deleted since the fit pass this fraction of the
    # corpus: the curvature describes the corpus it was fitted on.
    refit_threshold: float = 0.25


@dataclass(frozen=True)
class BuildConfig:
    model: Path
    out: Path
    corpus: CorpusConfig
    sketch: SketchConfig = field(default_factory=SketchConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True
