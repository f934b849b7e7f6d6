"""Configuration dataclasses: what defines an index (stored in its manifest) and how to build it.

The command line is generated from these classes (`server.cli.options`): a field with
`metadata["help"]` is an option, with the field's default, so a default is stated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path

from indexer.errors import InvalidInputError

DEFAULT_MAX_LENGTH = 512  # tokens per example when the model's context is longer
# Stored dimensions per example unless `--dims` says otherwise: at most 32,768 so that
# distributed vector engines can hold the vectors; the demo's sketch alone finds 0.76 / 0.55 of
# exact top-10 (cosine / influence) there, 64x64 per module 0.78 / 0.55 at 1.5x the bytes
# (benchmarks/RESULTS.md, issue 13).
DEFAULT_DIMS = 32_768
# From this many examples on, a compact code is scanned first: the flat scan reads D bytes an
# example (0.33 GB at 10k examples of 32,768 dimensions; 0.69 GB took 0.4-2.4 s, RESULTS.md).
RETRIEVAL_MIN_EXAMPLES = 10_000
# The default compact code's dimensions: half of the rotation at the default budget (32,768).
ROTATED_CODE_DIMS = 16_384


class ScoreKind(str, Enum):
    """How hits are ranked: raw EK-FAC influence (inner product) or cosine of the sketches."""

    INFLUENCE = "influence"
    COSINE = "cosine"

    def __str__(self) -> str:
        return self.value


class AllocationRule(str, Enum):
    """How a budget of dimensions per example is split across the tracked modules
    (`indexer.budget`)."""

    UNIFORM = "uniform"
    PARAMS = "params"

    def __str__(self) -> str:
        return self.value


def default_of(cls: type, name: str) -> object:
    """The declared default of dataclass field `name` (for command-line defaults)."""
    return next(f.default for f in fields(cls) if f.name == name)


def example_max_length(requested: int | None, context_length: int) -> int:
    """Tokens per example: `requested`, or the model's context capped at DEFAULT_MAX_LENGTH."""
    return min(context_length, DEFAULT_MAX_LENGTH) if requested is None else requested


def checked_max_length(requested: int | None, context_length: int) -> int:
    """`example_max_length`, refused (InvalidInputError) outside 2 (a token and its
    prediction) to the model's context."""
    max_length = example_max_length(requested, context_length)
    if not 2 <= max_length <= context_length:
        raise InvalidInputError(
            f"--max-length {max_length} must be between 2 and the model's context "
            f"({context_length} tokens)"
        )
    return max_length


def check_batch_size(batch_size: int) -> None:
    """InvalidInputError for a batch size under 1 (of any pass over examples)."""
    if batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")


class Autocast(str, Enum):
    """The precision of the build's passes over the corpus: float32, or the model's forward
    under bfloat16 autocast (`torch.autocast`; sketches and curvature still sum in float32)."""

    OFF = "off"
    BF16 = "bf16"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CorpusConfig:
    """Where the training corpus lives and how its rows become examples.

    `prefix_tokens` / `suffix_tokens` frame every sequence as the model saw it in training
    (e.g. `("<|endoftext|>",)` for a GPT-2-style model trained on separator-delimited
    documents): special tokens by name. `prefix_tokens` None means the tokenizer's own special
    tokens (e.g. its BOS). Queries get the same prefix; the suffix ends each document.
    """

    data: str = field(metadata={"help": "JSONL/Parquet/CSV file or glob"})
    id_column: str = field(default="id", metadata={"help": "document id column"})
    text_column: str = field(default="text", metadata={"help": "text column"})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "tokens per example; longer documents are chunked (default: the model's "
            "context, at most 512)"
        },
    )
    prefix_tokens: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "special token that starts every example and query, as in training "
            "(repeatable; default: the tokenizer's own, e.g. its BOS)",
            "flags": ("--prefix-token",),
            "action": "append",
            "metavar": "TOKEN",
        },
    )
    suffix_tokens: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "special token that ends every document, as in training (repeatable)",
            "flags": ("--suffix-token",),
            "action": "append",
            "metavar": "TOKEN",
        },
    )

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the config hashable and comparable.
        if self.prefix_tokens is not None:
            object.__setattr__(self, "prefix_tokens", tuple(self.prefix_tokens))
        object.__setattr__(self, "suffix_tokens", tuple(self.suffix_tokens))


@dataclass(frozen=True)
class SketchConfig:
    """The Kronecker projection: `S = sum_t (P g_t)(R a_t)^T`, an `r_out x r_in` matrix per
    module, the ranks allocated from a budget of `dims` per example (`indexer.budget`) unless
    `rank_in` / `rank_out` fix them for every module."""

    rank_in: int | None = field(
        default=None,
        metadata={
            "help": "sketch rows of R in every module: a uniform allocation that overrides "
            "--dims (default: --rank-out's if given, else allocated from --dims)"
        },
    )
    rank_out: int | None = field(
        default=None,
        metadata={
            "help": "sketch rows of P in every module, overriding --dims (default: --rank-in's "
            "if given, else allocated from --dims)"
        },
    )
    seed: int = field(default=0, metadata={"help": "projections and label sampling"})
    modules: str | None = field(
        default=None,
        metadata={
            "help": "regex of module names to track (default: every linear map in the blocks: "
            "Linear/Conv1D, routers, each expert's matrices as <experts>.<parameter>.<expert>)"
        },
    )
    dims: int | None = field(
        default=None,
        metadata={
            "help": "stored dimensions per example, allocated across the tracked modules by "
            f"--allocation (default: {DEFAULT_DIMS:,}, or all the modules hold when fewer)"
        },
    )
    # By parameters: at the same bytes, sketch-only top-10 agreement with exact EK-FAC above
    # uniform's on the demo (+0.025 / +0.021 at 32k), equal on a 4x256 model (RESULTS.md).
    allocation: AllocationRule = field(
        default=AllocationRule.PARAMS,
        metadata={
            "help": "how --dims is split across modules: uniform (the same r_out x r_in in "
            "each) or params (by the module's parameters d_out*d_in); near-square either way"
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "allocation", AllocationRule(self.allocation))  # from JSON


@dataclass(frozen=True)
class CurvatureConfig:
    """EK-FAC in sketch space, fitted on a subsample with labels sampled from the model."""

    fit_examples: int = field(default=2000, metadata={"help": "EK-FAC fit subsample"})
    damping: float = field(default=0.1, metadata={"help": "lambda = damping * mean(Λ), per module"})
    seed: int = field(default=0, metadata={"help": "label sampling"})

    def check(self) -> None:
        """InvalidInputError for what cannot be fitted: no examples, or a damping that is not
        positive (every score would be NaN)."""
        if self.fit_examples < 1:
            raise InvalidInputError("--fit-examples must be at least 1")
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise InvalidInputError("--damping must be a positive number")


class Projection(str, Enum):
    """How a compact code projects the stored vectors: not at all (it codes every stored
    dimension), a seeded randomized Hadamard rotation (sign flips, then the Walsh-Hadamard
    transform of the vector padded to a power of 2; its first `dims` outputs when fewer), a
    seeded random orthonormal map, or principal directions (format-8 versions built before
    random maps)."""

    NONE = "none"
    HADAMARD = "hadamard"
    RANDOM = "random"
    PCA = "pca"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StoreConfig:
    """How vectors are indexed and kept."""

    # Cosine traces facts better (benchmarks/RESULTS.md).
    score: ScoreKind = field(default=ScoreKind.COSINE, metadata={"help": "what the index ranks by"})
    index_factory: str | None = field(
        default=None,
        metadata={
            "help": "FAISS factory string; the index is the only copy of the vectors, so it must "
            "reconstruct them (default: IDMap,SQ8, 8-bit codes all scanned, at any size)"
        },
    )
    nprobe: int = field(default=32, metadata={"help": "IVF lists scanned per query"})
    keep_versions: int = field(
        default=3,
        metadata={
            "help": "published versions kept in ROOT (never CURRENT's or PINNED's; the rollback "
            "target while there is room)"
        },
    )
    exact_rerank: bool | None = field(
        default=None,
        metadata={
            "help": "store full-space EK-FAC factors so that answers can be re-ranked exactly "
            "(auto: when they fit on the index's disk; the build says their size)"
        },
    )
    lexical_index: bool = field(
        default=True, metadata={"help": "store a BM25 index of the texts, for lexical candidates"}
    )
    retrieval_code: bool | None = field(
        default=None,
        metadata={
            "help": "store a compact retrieval code per example, scanned before the stored codes "
            f"(auto: from {RETRIEVAL_MIN_EXAMPLES:,} examples, with a flat index, kept where "
            "it finds 0.95 of the flat top-10 for the build's pseudo-queries)"
        },
    )
    # RaBitQ: 1 bit a dimension plus two floats, the query in 4 bits (FAISS's default `qb`).
    retrieval_quantizer: str = field(
        default="RaBitQ",
        metadata={"help": "FAISS factory string of the compact code's own index"},
    )
    # A seeded randomized Hadamard rotation first, as RaBitQ's error bound assumes, and half of
    # its 32,768 dimensions at the default budget (2 KB an example). At 100k examples the
    # 1-bit code of 16,384 rotated dimensions kept 0.995 of the flat top-10 within K″ = 3,000
    # (ties counted), all 32,768 kept 1.00 within 1,000, the vectors as stored 0.97 within
    # 3,000; at 1M the half code's scan reads half the bytes: 100 ms against 166 on two
    # threads (RESULTS.md, issue 14, stop 29).
    retrieval_projection: Projection = field(
        default=Projection.HADAMARD,
        metadata={
            "help": "how the compact code sees the stored vectors: rotated (hadamard), as "
            "stored (none) or through a random orthonormal projection (random)"
        },
    )
    retrieval_dims: int | None = field(
        default=None,
        metadata={
            "help": "dimensions of the compact retrieval code: with hadamard the first N of the "
            f"rotation (at most all of it; 0: all; default {ROTATED_CODE_DIMS:,}), with random "
            "a projection to N < D (no default); ignored with none"
        },
    )

    def check_retrieval(self) -> None:
        """InvalidInputError for a compact code that cannot be asked for: negative dimensions,
        a random projection to none, or principal directions (no longer built)."""
        if self.retrieval_dims is not None and self.retrieval_dims < 0:
            raise InvalidInputError("--retrieval-dims must be 0 (every dimension) or positive")
        if self.retrieval_projection == Projection.RANDOM and not self.retrieval_dims:
            raise InvalidInputError("--retrieval-projection random needs --retrieval-dims N > 0")
        if self.retrieval_projection == Projection.PCA:
            raise InvalidInputError(
                "--retrieval-projection pca is not built any more (format-8 versions built "
                "before random maps hold it); use hadamard, none or random"
            )

    def compact_code(self) -> CompactCode:
        """The asked-for code; its `dims` are 0 (every one) until `CompactCode.over`."""
        dims = self.retrieval_dims
        if dims is None:
            dims = ROTATED_CODE_DIMS if self.retrieval_projection == Projection.HADAMARD else 0
        return CompactCode(dims, self.retrieval_quantizer, self.retrieval_projection)


@dataclass(frozen=True)
class CompactCode:
    """A compact retrieval code (`indexer.retrieval`): each stored vector projected to `dims`
    dimensions by `projection`, the projections indexed by FAISS factory `quantizer`."""

    dims: int
    quantizer: str
    projection: Projection = Projection.RANDOM

    @property
    def name(self) -> str:
        """As FAISS would spell the pipeline: e.g. `HR32768,RaBitQ` (Hadamard rotation),
        `RR1024,SQ8` (random rotation), `RaBitQ` (no projection)."""
        if self.projection == Projection.NONE:
            return self.quantizer
        prefix = {Projection.HADAMARD: "HR", Projection.RANDOM: "RR"}.get(self.projection, "PCA")
        return f"{prefix}{self.dims},{self.quantizer}"

    @property
    def projected(self) -> bool:
        """Whether the code is of a projection of the stored vector (else of the vector)."""
        return self.projection != Projection.NONE

    def fits(self, dim: int) -> bool:
        """Whether the code can stand for stored vectors of `dim` dimensions: a random
        projection must have fewer (a rotation keeps at most its own, `over`)."""
        return self.projection != Projection.RANDOM or self.dims < dim

    def over(self, dim: int) -> CompactCode:
        """This code for stored vectors of `dim` dimensions: a code without projection has
        them all, a rotation at most its own (`rotated_dims`; 0 asks for them all)."""
        if self.projection == Projection.NONE:
            return replace(self, dims=dim)
        if self.projection == Projection.HADAMARD:
            rotated = rotated_dims(dim)
            return replace(self, dims=min(self.dims or rotated, rotated))
        return self


def rotated_dims(dim: int) -> int:
    """The dimensions of a Hadamard rotation of `dim`: the next power of 2 (FAISS pads)."""
    return 1 << max(0, dim - 1).bit_length()


class Backend(str, Enum):
    """Where a published version's vectors are searched: FAISS in the server's process (the
    embedded default), or a Milvus collection (`indexer.milvus`) that many hosts share."""

    FAISS = "faiss"
    MILVUS = "milvus"

    def __str__(self) -> str:
        return self.value


# Milvus refuses vectors over its proxy's `proxy.maxDimension` (32,768 unless raised): the
# default budget (DEFAULT_DIMS) is exactly that.
MILVUS_MAX_DIMENSION = 32_768
MILVUS_MAX_VARCHAR = 65_535  # bytes of a VARCHAR field (doc ids, texts)
MILVUS_MAX_ARRAY = 4_096  # elements of an ARRAY field: tokens per example


@dataclass(frozen=True)
class BackendConfig:
    """The vector engine behind a published index: with Milvus, a version is a collection
    `<prefix>_<version id>` and CURRENT / PINNED are the aliases `<prefix>_current` /
    `<prefix>_pinned`; ROOT keeps each version's manifest and factors."""

    backend: Backend = field(
        default=Backend.FAISS,
        metadata={"help": "vector engine: faiss (in-process) or milvus (--milvus-uri)"},
    )
    milvus_uri: str = field(
        default="",
        metadata={
            "help": "Milvus to use with --backend milvus: a Milvus Lite file (*.db) or "
            "http://host:19530"
        },
    )
    collection_prefix: str = field(
        default="influence",
        metadata={
            "help": "Milvus collections and aliases of this index start with it (letters, "
            "digits, underscores)",
            "flags": ("--milvus-prefix",),
        },
    )
    max_dimension: int = field(
        default=MILVUS_MAX_DIMENSION,
        metadata={
            "help": "the Milvus server's proxy.maxDimension: a build over it exits 2",
            "flags": ("--milvus-max-dimension",),
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", Backend(self.backend))

    def check_max_length(self, max_length: int) -> None:
        """InvalidInputError when Milvus could not hold `max_length` tokens per example (checked
        before the corpus is read)."""
        if self.backend == Backend.MILVUS and max_length > MILVUS_MAX_ARRAY:
            raise InvalidInputError(
                f"{max_length} tokens per example are over Milvus's {MILVUS_MAX_ARRAY} array "
                f"elements: build with --max-length {MILVUS_MAX_ARRAY} or less"
            )

    def check_text_bytes(self, longest: dict[str, int]) -> None:
        """InvalidInputError when a text field's longest value (bytes, by field name) is over
        Milvus's VARCHAR limit (checked once the corpus is staged, before the passes)."""
        if self.backend != Backend.MILVUS:
            return
        for name, size in longest.items():
            if size > MILVUS_MAX_VARCHAR:
                raise InvalidInputError(
                    f"a {name} of {size} bytes is over Milvus's {MILVUS_MAX_VARCHAR}-byte text "
                    f"field: shorten it (or build with a smaller --max-length, for texts)"
                )

    def check_dimension(self, dim: int) -> None:
        """InvalidInputError when this backend would refuse vectors of `dim` dimensions (every
        rank of a build checks, before its passes)."""
        limit = self.max_dimension
        if self.backend == Backend.MILVUS and dim > limit:
            raise InvalidInputError(
                f"{dim} dimensions per example are over Milvus's limit of {limit} "
                f"(proxy.maxDimension): build with --dims {limit}, or raise proxy.maxDimension "
                "on the Milvus server and pass --milvus-max-dimension"
            )


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

    mode: IncrementalMode = field(
        default=IncrementalMode.AUTO,
        metadata={
            "help": "reuse CURRENT's curvature and the vectors of unchanged examples; auto: when "
            "CURRENT is compatible (else a full build, saying why); on (the bare flag): or exit 2",
            "flags": ("--incremental",),
            "nargs": "?",
            "const": IncrementalMode.ON,
        },
    )
    refit_curvature: bool = field(
        default=False,
        metadata={"help": "refit the curvature (a full build) even when CURRENT's could be reused"},
    )
    # The curvature describes the corpus it was fitted on.
    refit_threshold: float = field(
        default=0.25,
        metadata={
            "help": "refit once the examples added, changed or deleted since the curvature's fit "
            "exceed this fraction of the corpus"
        },
    )


_DEFAULT_QUANTILES = {ScoreKind.COSINE: 0.99, ScoreKind.INFLUENCE: 0.995}


@dataclass(frozen=True)
class CalibrationConfig:
    """How the build calibrates the exact stage's early stop (`indexer.calibration`): its
    pseudo-queries, cut from corpus examples, each get their top `depth` sketch candidates
    scored exactly, and the bound is the `quantile` of the sketch's error (per band of ranks).
    """

    queries: int = field(
        default=32,
        metadata={
            "help": "pseudo-queries the exact stage's early stop is calibrated on (0: none; "
            "queries then re-rank their whole depth)",
            "flags": ("--calibration-queries",),
        },
    )
    depth: int = field(
        default=200,
        metadata={
            "help": "sketch candidates of each pseudo-query scored exactly",
            "flags": ("--calibration-depth",),
        },
    )
    quantile: float | None = field(
        default=None,
        metadata={
            "help": "how surely a candidate's exact score stays under its bound (default: "
            "0.99 for a cosine index, 0.995 for influence)",
            "flags": ("--calibration-quantile",),
        },
    )

    def quantile_for(self, kind: ScoreKind) -> float:
        """The quantile asked for, or the default for an index of `kind`: an influence index's
        exact scores follow its sketch's more loosely (they scale with exact norms the sketch
        only approximates), and at 0.99 its early stop lost 0.02 of exact top-10 agreement on
        the demo, 0.006 at 0.995 (benchmarks/RESULTS.md)."""
        if self.quantile is not None:
            return self.quantile
        return _DEFAULT_QUANTILES[ScoreKind(kind)]


@dataclass(frozen=True)
class BuildConfig:
    model: Path = field(metadata={"help": "local Hugging Face model dir"})
    out: Path = field(metadata={"help": "index ROOT (versions + CURRENT)"})
    corpus: CorpusConfig
    sketch: SketchConfig = field(default_factory=SketchConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    batch_size: int = field(default=16, metadata={"help": "examples per forward/backward pass"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    autocast: Autocast = field(
        default=Autocast.OFF,
        metadata={
            "help": "the model's forward in the passes over the corpus: off (float32) or bf16 "
            "autocast, for GPUs (its fidelity cost: benchmarks/RESULTS.md); queries stay float32"
        },
    )
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "autocast", Autocast(self.autocast))  # from JSON
