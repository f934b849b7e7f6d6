"""`influence-index build`: corpus -> sketches -> EK-FAC -> FAISS + DuckDB -> published version."""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from indexer import __version__
from indexer.config import BuildConfig, ScoreKind, example_max_length
from indexer.corpus import Corpus, load_corpus
from indexer.curvature import Curvature, FittedCurvature, fit_curvature, subsample
from indexer.errors import InvalidInputError
from indexer.exact import DEFAULT_MEMORY_LIMIT, required_bytes
from indexer.lexical import write_lexical_index
from indexer.manifest import (
    CURVATURE_FILE,
    FULL_CURVATURE_FILE,
    INDEX_FILE,
    LEXICAL_DIR,
    METADATA_FILE,
    VECTORS_FILE,
    Counts,
    Manifest,
    ModelIdentity,
    ModuleLayout,
)
from indexer.model import LoadedModel, load_model, module_shape, tracked_modules
from indexer.passes import ExamplePass
from indexer.publish import (
    build_lock,
    ensure_writable,
    new_version_id,
    publish,
    staging_dir,
    write_manifest,
)
from indexer.sketch import GradientSketcher, gaussian_projection
from indexer.store import default_factory, open_vectors, write_faiss, write_metadata

log = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    version: str
    root: str
    n_documents: int
    n_examples: int
    n_empty_skipped: int
    n_tokens: int
    dim: int
    index_factory: str
    index_bytes_per_example: float
    vectors_bytes_per_example: float
    full_curvature_bytes: int  # the exact re-rank factors; 0 when not stored
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.seconds.get("sketch", 0.0), 1e-9)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    seconds[phase] = round(time.perf_counter() - start, 3)


def _check_config(config: BuildConfig, loaded: LoadedModel) -> int:
    """Validate options against the model; return the max example length in tokens."""
    if config.store.score not in tuple(ScoreKind):
        raise InvalidInputError(f"--score must be one of {', '.join(map(str, ScoreKind))}")
    if config.batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    if min(config.sketch.rank_in, config.sketch.rank_out) < 1:
        raise InvalidInputError("--rank-in and --rank-out must be at least 1")
    if config.curvature.damping <= 0:
        raise InvalidInputError("--damping must be positive")
    max_length = example_max_length(config.corpus.max_length, loaded.context_length)
    if not 2 <= max_length <= loaded.context_length:
        raise InvalidInputError(
            f"--max-length {max_length} must be between 2 and the model's context "
            f"({loaded.context_length} tokens)"
        )
    return max_length


def _projections(modules: dict, config: BuildConfig) -> dict:
    projections = {}
    for name, module in modules.items():
        shape = module_shape(module)
        if config.sketch.rank_in > shape.d_in or config.sketch.rank_out > shape.d_out:
            raise InvalidInputError(
                f"ranks {config.sketch.rank_out}x{config.sketch.rank_in} (out x in) exceed module "
                f"{name} ({shape.d_out}x{shape.d_in}); lower --rank-out/--rank-in"
            )
        projections[name] = gaussian_projection(
            name, module, config.sketch.rank_in, config.sketch.rank_out, config.sketch.seed
        )
    return projections


def _write_vectors(
    example_pass: ExamplePass, curvature: Curvature, path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The main pass: training-loss sketches, preconditioned, into the float16 matrix.

    Returns `(vectors [N, D] memmap, norms [N], losses [N])`.
    """
    n = len(example_pass.examples)
    vectors = open_vectors(path, n, curvature.dim, mode="w+")
    norms, losses = np.zeros(n), np.zeros(n)
    for rows, capture in example_pass.run(list(range(n)), "data", "sketch corpus"):
        block = curvature.vectors(capture).cpu()
        stored = block.numpy().astype(np.float16)
        if not np.isfinite(stored).all():
            raise InvalidInputError("preconditioned vectors overflow float16: raise --damping")
        vectors[rows] = stored
        norms[rows] = block.double().norm(dim=1).numpy()
        losses[rows] = capture.losses.cpu().numpy()
    vectors.flush()
    return vectors, norms, losses


def _exact_rerank(config: BuildConfig, modules: dict) -> bool:
    """Whether to fit and store full-space factors: as asked, or (auto) when they fit."""
    need = required_bytes(modules, config.batch_size, n_queries=0)
    if config.store.exact_rerank is None:
        if need > DEFAULT_MEMORY_LIMIT:
            log.warning(
                "not storing exact re-rank factors: they need ~%.1f GiB (over %.0f GiB)",
                need / 2**30,
                DEFAULT_MEMORY_LIMIT / 2**30,
            )
        return need <= DEFAULT_MEMORY_LIMIT
    return config.store.exact_rerank


def _manifest(
    state: _BuildState, curvature: FittedCurvature, factory: str, summary: BuildSummary
) -> Manifest:
    config, loaded, corpus = state.config, state.loaded, state.corpus
    return Manifest(
        created=datetime.now(timezone.utc).isoformat(),
        code_version=__version__,
        model=ModelIdentity(
            path=str(loaded.model_dir.resolve()),
            weights_sha256=loaded.weights_sha256,
            tokenizer_sha256=loaded.tokenizer_sha256,
            context_length=loaded.context_length,
        ),
        modules=tuple(
            ModuleLayout(n, s.start, s.stop, **asdict(module_shape(state.modules[n])))
            for n, s in curvature.sketch.layer_slices().items()
        ),
        corpus=replace(config.corpus, max_length=state.max_length),
        sketch=config.sketch,
        curvature=config.curvature,
        score=ScoreKind(config.store.score),
        index_factory=factory,
        nprobe=config.store.nprobe,
        dim=curvature.sketch.dim,
        vectors_stored=config.store.keep_vectors,
        exact_rerank=curvature.full is not None,
        lexical_index=config.store.lexical_index,
        counts=Counts(
            documents=corpus.n_documents,
            examples=len(corpus.examples),
            empty_skipped=corpus.n_empty_skipped,
            tokens=summary.n_tokens,
        ),
        build_seconds=summary.seconds,
    )


@dataclass
class _BuildState:
    """What the build has loaded before it starts writing a version."""

    config: BuildConfig
    loaded: LoadedModel
    modules: dict
    corpus: Corpus
    example_pass: ExamplePass
    max_length: int
    seconds: dict[str, float]


def build_index(config: BuildConfig) -> BuildSummary:
    """Build a new version under `config.out` and publish it. CURRENT moves only on success."""
    root = config.out
    ensure_writable(root)
    with build_lock(root):
        state = _prepare(config)
        version = new_version_id()
        staging = staging_dir(root, version)
        try:
            summary = _write_version(state, staging, version)
            with _timed(state.seconds, "publish"):
                publish(root, staging, version, config.store.keep_versions)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("published %s: %d examples, dim %d", version, summary.n_examples, summary.dim)
    return summary


def _prepare(config: BuildConfig) -> _BuildState:
    seconds: dict[str, float] = {}
    with _timed(seconds, "load"):
        loaded = load_model(config.model, config.device)
        max_length = _check_config(config, loaded)
        modules = tracked_modules(loaded.model, config.sketch.modules)
        projections = _projections(modules, config)
        corpus = load_corpus(config.corpus, loaded.tokenizer, max_length)
    example_pass = ExamplePass(
        GradientSketcher(loaded.model, modules, projections),
        corpus.examples,
        loaded.tokenizer.pad_token_id,
        config.batch_size,
        config.curvature.seed,
        config.progress,
    )
    return _BuildState(config, loaded, modules, corpus, example_pass, max_length, seconds)


def _write_version(state: _BuildState, staging: Path, version: str) -> BuildSummary:
    """Curvature, vectors, FAISS, metadata and manifest, all inside `staging`."""
    config, corpus, seconds = state.config, state.corpus, state.seconds
    n = len(corpus.examples)
    with _timed(seconds, "curvature"):
        rows = subsample(n, config.curvature.fit_examples, config.curvature.seed)
        full = _exact_rerank(config, state.modules)
        fitted = fit_curvature(state.example_pass, rows, config.curvature.damping, full=full)
    curvature = fitted.sketch
    with _timed(seconds, "sketch"):
        vectors, norms, losses = _write_vectors(
            state.example_pass, curvature, staging / VECTORS_FILE
        )
    factory = config.store.index_factory or default_factory(n)
    ids = np.array([e.example_id for e in corpus.examples], dtype=np.int64)
    with _timed(seconds, "index"):
        try:
            write_faiss(
                vectors, ids, factory, config.store.score == ScoreKind.COSINE, staging / INDEX_FILE
            )
        except ValueError as e:
            raise InvalidInputError(str(e)) from e
        write_metadata(
            staging / METADATA_FILE, corpus.examples, norms, losses, staging / "metadata.jsonl"
        )
        curvature.save(staging / CURVATURE_FILE)
        if fitted.full is not None:
            fitted.full.save(staging / FULL_CURVATURE_FILE)
        if config.store.lexical_index:
            write_lexical_index([e.text for e in corpus.examples], ids, staging / LEXICAL_DIR)
        if not config.store.keep_vectors:
            (staging / VECTORS_FILE).unlink()
    summary = BuildSummary(
        version=version,
        root=str(config.out),
        n_documents=corpus.n_documents,
        n_examples=n,
        n_empty_skipped=corpus.n_empty_skipped,
        n_tokens=sum(len(e.token_ids) for e in corpus.examples),
        dim=curvature.dim,
        index_factory=factory,
        index_bytes_per_example=(staging / INDEX_FILE).stat().st_size / n,
        vectors_bytes_per_example=2.0 * curvature.dim if config.store.keep_vectors else 0.0,
        full_curvature_bytes=_size(staging / FULL_CURVATURE_FILE),
        seconds=seconds,
    )
    write_manifest(staging, _manifest(state, fitted, factory, summary))
    return summary


def _size(path: Path) -> int:
    """Bytes of `path`, 0 when it does not exist."""
    return path.stat().st_size if path.exists() else 0
