"""`influence-index build`: corpus -> sketches -> EK-FAC -> FAISS + DuckDB -> published version."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from indexer import __version__
from indexer.backend import open_pointers
from indexer.budget import ModuleRanks, describe, module_ranks, total_dim
from indexer.calibration import (
    Calibrator,
    KnownScores,
    PseudoQuery,
    cut_queries,
    main_pass_queries,
    query_batch,
    score_spaces,
)
from indexer.config import (
    RETRIEVAL_MIN_EXAMPLES,
    Autocast,
    Backend,
    BuildConfig,
    CalibrationConfig,
    CompactCode,
    IncrementalMode,
    ScoreKind,
    check_batch_size,
    checked_max_length,
)
from indexer.corpus import ExampleTable, stage_corpus
from indexer.curvature import Curvature, FittedCurvature, fit_curvature, subsample
from indexer.distributed import Ranks, join
from indexer.errors import (
    IndexVerificationError,
    InvalidInputError,
    NotFoundError,
    ResourceLimitError,
)
from indexer.exact import ExactReranker, QueryTargets
from indexer.incremental import (
    Diff,
    MergedVectors,
    Previous,
    Settings,
    all_new,
    diff,
    previous_training,
    refit_reason,
)
from indexer.lexical import write_lexical_index
from indexer.manifest import (
    CURVATURE_FILE,
    FULL_CURVATURE_FILE,
    INDEX_FILE,
    LEXICAL_DIR,
    METADATA_FILE,
    RETRIEVAL_FILE,
    CollectionRecord,
    Counts,
    Coverage,
    CurvatureFit,
    Manifest,
    ModelIdentity,
    ModuleLayout,
    RetrievalCheck,
)
from indexer.model import (
    LoadedModel,
    coverage,
    load_model,
    log_coverage,
    module_shape,
    tracked_modules,
)
from indexer.passes import ExamplePass
from indexer.publish import (
    Pointers,
    build_lock,
    discard_unpublished,
    ensure_writable,
    new_version_id,
    publish,
    read_current,
    staging_dir,
    verify_version,
    version_dir,
    write_manifest,
)
from indexer.retrieval import (
    RETRIEVAL_CANDIDATES,
    RETRIEVAL_CHECK_QUERIES,
    RETRIEVAL_MIN_RECALL,
    flat_top10_recall,
    write_compact_index,
)
from indexer.scan import MAX_DIM
from indexer.scores import RerankBound
from indexer.sketch import GradientSketcher, Projection, gaussian_projection
from indexer.store import (
    FLAT_FACTORY,
    MetadataReader,
    ScratchShards,
    ScratchVectors,
    check_factory,
    open_index,
    set_nprobe,
    write_faiss,
    write_metadata,
)

if TYPE_CHECKING:
    from indexer.milvus import MilvusBackend

log = logging.getLogger(__name__)

# The most of the free disk that the exact stage's factors may take: the rest of the version
# (and the next one) need room too.
_FACTORS_SHARE_OF_FREE_DISK = 0.5

# Scratch files in the staging directory, one per rank, deleted before the manifest is
# written (every name starting with a dot is one): the staged corpus (tokenized examples), the
# sketched vectors waiting to be indexed (the index is the version's only copy of them) and
# the sketched rows' norms (sketch and exact) and losses, and their exact scores on the
# calibration's pseudo-queries.
CORPUS_FILE = ".corpus.duckdb"
SCRATCH_FILE = ".vectors.scratch"
SKETCHED_FILE = ".sketched.csv"
SCORES_FILE = ".calibration.scratch"


def _scratch(staging: Path, name: str, rank: int) -> Path:
    return staging / f"{name}.{rank}"


@dataclass
class BuildSummary:
    """What a build published. A full build counts every example as new; an incremental one
    counts against the version it started from (`built_from`)."""

    version: str
    root: str
    n_documents: int
    n_examples: int
    n_empty_skipped: int
    n_tokens: int
    dim: int
    allocation: str  # `r_out x r_in` per module group (`indexer.budget.describe`)
    coverage: Coverage  # the share of the blocks' parameters tracked, and what was skipped
    index_factory: str
    index_bytes_per_example: float
    retrieval_code: str | None  # the compact code scanned first (`indexer.retrieval`), if any
    retrieval_check: RetrievalCheck | None  # how a compact code searched (kept or not)
    full_curvature_bytes: int  # the exact re-rank factors; 0 when not stored
    mode: str  # "incremental" or "full"
    full_reason: str  # why a full build ("" for an incremental one)
    built_from: str | None
    reused: int
    new: int
    changed: int
    deleted: int
    seconds: dict[str, float] = field(default_factory=dict)
    collection: str = ""  # the version's Milvus collection (--backend milvus)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.seconds.get("sketch", 0.0), 1e-9)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    """Adds the block's wall seconds to `seconds[phase]` (a phase may run in parts)."""
    start = time.perf_counter()
    yield
    seconds[phase] = round(seconds.get(phase, 0.0) + time.perf_counter() - start, 3)


def _check_config(config: BuildConfig, loaded: LoadedModel) -> int:
    """Validate options against the model; return the max example length in tokens."""
    if config.store.score not in tuple(ScoreKind):
        raise InvalidInputError(f"--score must be one of {', '.join(map(str, ScoreKind))}")
    check_batch_size(config.batch_size)
    config.curvature.check()
    if config.store.nprobe < 1:
        raise InvalidInputError("--nprobe must be at least 1")
    _check_calibration(config.calibration)
    if not config.incremental.refit_threshold >= 0:  # NaN too
        raise InvalidInputError("--refit-threshold must be at least 0")
    config.store.check_retrieval()
    return checked_max_length(config.corpus.max_length, loaded.context_length)


def _check_calibration(calibration: CalibrationConfig) -> None:
    if calibration.queries < 0:
        raise InvalidInputError("--calibration-queries must be 0 (none) or positive")
    if calibration.depth < 1:
        raise InvalidInputError("--calibration-depth must be at least 1")
    quantile = calibration.quantile
    if quantile is not None and not 0 < quantile <= 1:
        raise InvalidInputError(f"--calibration-quantile must be in (0, 1], got {quantile}")


def _projections(modules: dict, ranks: dict[str, ModuleRanks], seed: int) -> dict:
    return {
        name: gaussian_projection(name, module, ranks[name].rank_in, ranks[name].rank_out, seed)
        for name, module in modules.items()
    }


def _ranks(projections: dict[str, Projection]) -> dict[str, ModuleRanks]:
    """Each module's `r_out x r_in`, as its projections `P [r_out, d_out]`, `R [r_in, d_in]`
    have them."""
    return {n: ModuleRanks(p.P.shape[0], p.R.shape[0]) for n, p in projections.items()}


@dataclass
class _MainPassScores:
    """The calibration's share of the main pass: its pseudo-queries' `targets` (rotated in a
    cosine build, folded in an influence one) and where each sketched row's exact influence on
    them `[Q]` goes, in the order of the rank's rows."""

    targets: QueryTargets
    scratch: ScratchVectors


def _write_vectors(
    example_pass: ExamplePass,
    curvature: FittedCurvature,
    vectors: ScratchVectors,
    sketched: Path,
    rows: np.ndarray,
    *,
    cosine: bool,
    calibration: _MainPassScores | None = None,
) -> float:
    """The main pass over `rows` (ascending): training-loss sketches, preconditioned, into
    `vectors [len(rows), D]` in the order of `rows` (unit vectors for a `cosine` index);
    each row's norm (before any scaling), exact preconditioned norm and loss go to the CSV
    file `sketched`. The exact norm, what an exact cosine divides by, costs about a per-example
    gradient: only a cosine index with unprojected factors pays for it (empty otherwise), once
    here, so that re-ranking a candidate costs only its contraction with the query. With
    `calibration`, each row's exact influence on the pseudo-queries too: in a cosine index
    from the same rotated sums as its exact norm, in an influence index from its gradient.

    Returns the seconds this full-space work took: it shares the pass's forward/backward, and
    the build reports its cost apart from the sketches'."""
    unprojected = curvature.unprojected if cosine else None
    norms_wanted = unprojected is not None
    keep, full_seconds = norms_wanted or calibration is not None, 0.0
    with sketched.open("w") as stats:
        for batch, capture in example_pass.run(
            rows, "data", "sketch corpus", keep_unprojected=keep
        ):
            block = curvature.sketch.vectors(capture).cpu()
            norms = block.double().norm(dim=1).tolist()
            start = time.perf_counter()
            exact_norms, dots = [None] * len(batch), None
            if norms_wanted:
                weights = None if calibration is None else calibration.targets.per_module
                found, dots = unprojected.norms(capture.unprojected, weights)
                exact_norms = found.tolist()
            elif calibration is not None:
                folded = calibration.targets.per_module
                dots = curvature.unprojected.example_scores(capture.unprojected, folded)
            if dots is not None:
                calibration.scratch.write(np.searchsorted(rows, batch), dots.T.cpu().numpy())
            full_seconds += time.perf_counter() - start
            if cosine:
                block = block / block.norm(dim=1, keepdim=True).clamp_min(1e-30)
            stored = block.numpy().astype(np.float16)
            if not np.isfinite(stored).all():
                raise InvalidInputError("preconditioned vectors overflow float16: raise --damping")
            vectors.write(np.searchsorted(rows, batch), stored)
            losses = capture.losses.double().tolist()
            lines = zip(batch, norms, exact_norms, losses, strict=True)
            stats.writelines(f"{r},{n!r},{_csv(e)},{loss!r}\n" for r, n, e, loss in lines)
    return full_seconds


def _csv(value: float | None) -> str:
    return "" if value is None else repr(value)  # an empty field reads back as NULL


def exact_factors_bytes(modules: dict) -> int:
    """Bytes of the unprojected factors the exact stage needs (float32 `U_A [d_in, d_in]`,
    `U_B [d_out, d_out]`, `Λ [d_out, d_in]` per module): what `curvature-full.safetensors`
    holds."""
    shapes = [module_shape(m) for m in modules.values()]
    return 4 * sum(s.d_in**2 + s.d_out**2 + s.d_out * s.d_in for s in shapes)


def store_exact_factors(config: BuildConfig, modules: dict) -> bool:
    """Whether to fit and store the exact stage's factors: as asked, or (auto) when they fit on
    the index's disk with room to spare. Fitting them needs no more memory than they take
    (float64 sums) plus one batch's activations: the exact stage works module by module."""
    size = exact_factors_bytes(modules)
    if config.store.exact_rerank is not None:
        return config.store.exact_rerank
    existing = next(p for p in (config.out, *config.out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if size > free * _FACTORS_SHARE_OF_FREE_DISK:
        log.warning(
            "not storing exact re-rank factors: they need %.1f GiB, and %s has %.1f GiB free",
            size / 2**30,
            existing,
            free / 2**30,
        )
        return False
    log.info("exact re-rank factors: %.1f MiB", size / 2**20)
    return True


def compact_code(config: BuildConfig, n: int, factory: str, dim: int) -> CompactCode | None:
    """The compact retrieval code to store for `n` examples of `dim` dimensions in an index of
    `factory`: as asked, or (auto) from `RETRIEVAL_MIN_EXAMPLES` on, over the flat 8-bit index
    (its candidates are re-scored on its codes, read by row: `indexer.scan.CodeScan`, up to
    `MAX_DIM` dimensions). InvalidInputError names a code that cannot be built."""
    store = config.store
    code = store.compact_code().over(dim)
    if store.retrieval_code is False:
        return None
    try:
        check_factory(code.dims, code.quantizer, n, ids=False)
    except ValueError as e:
        raise InvalidInputError(f"--retrieval-quantizer: {e}") from e
    flat = factory == FLAT_FACTORY and dim <= MAX_DIM
    if store.retrieval_code is None:
        usable = flat and n >= RETRIEVAL_MIN_EXAMPLES and code.fits(dim)
        return code if usable else None
    if not flat:
        raise InvalidInputError(
            f"--retrieval-code on needs the flat index {FLAT_FACTORY} of at most {MAX_DIM:,} "
            f"dimensions to re-score on, not {factory!r} of {dim:,}"
        )
    if not code.fits(dim):
        raise InvalidInputError(
            f"--retrieval-dims of a random projection must be under {dim:,}, not {code.dims:,}"
        )
    return code


@dataclass
class _BuildState:
    """What the build has loaded before it starts writing a version."""

    config: BuildConfig
    loaded: LoadedModel
    modules: dict
    corpus: ExampleTable
    example_pass: ExamplePass
    max_length: int
    seconds: dict[str, float]
    ranks: Ranks
    coverage: Coverage  # of the blocks' parameters by `modules`
    pointers: Pointers | None  # CURRENT and PINNED (rank 0 only)

    @property
    def milvus(self) -> MilvusBackend | None:
        """The Milvus that holds the versions' collections (--backend milvus, rank 0)."""
        milvus = self.config.backend.backend == Backend.MILVUS
        return self.pointers if milvus else None

    def close(self) -> None:
        self.corpus.close()


@dataclass
class _Plan:
    """What a build reuses: a previous version (incremental) or nothing (full, and why)."""

    factory: str
    change: Diff
    exact_rerank: bool
    previous: Previous | None = None
    full_reason: str = ""

    def close(self) -> None:
        if self.previous is not None:
            self.previous.close()


def _manifest(
    state: _BuildState,
    plan: _Plan,
    curvature: Curvature,
    summary: BuildSummary,
    rerank_bound: RerankBound | None,
    retrieval: CompactCode | None,
    collection: CollectionRecord | None,
) -> Manifest:
    config, loaded, corpus = state.config, state.loaded, state.corpus
    ranks = _ranks(curvature.projections())
    now = datetime.now(timezone.utc).isoformat()
    fit = CurvatureFit(created=now, examples=len(corpus))
    if plan.previous is not None:
        before = plan.previous.manifest.curvature_fit
        fit = replace(before, changed_since=before.changed_since + plan.change.touched)
    return Manifest(
        created=now,
        code_version=__version__,
        model=ModelIdentity(
            path=str(loaded.model_dir.resolve()),
            weights_sha256=loaded.weights_sha256,
            tokenizer_sha256=loaded.tokenizer_sha256,
            context_length=loaded.context_length,
            config_sha256=loaded.config_sha256,
        ),
        modules=tuple(
            ModuleLayout(
                n,
                s.start,
                s.stop,
                **asdict(module_shape(state.modules[n])),
                **asdict(ranks[n]),
            )
            for n, s in curvature.layer_slices().items()
        ),
        corpus=replace(config.corpus, max_length=state.max_length),
        sketch=config.sketch,
        curvature=config.curvature,
        score=ScoreKind(config.store.score),
        index_factory=plan.factory,
        nprobe=config.store.nprobe,
        dim=curvature.dim,
        exact_rerank=plan.exact_rerank,
        lexical_index=config.store.lexical_index,
        counts=Counts(
            documents=corpus.n_documents,
            examples=len(corpus),
            empty_skipped=corpus.n_empty_skipped,
            tokens=corpus.n_tokens,
        ),
        curvature_fit=fit,
        coverage=summary.coverage,
        built_from=summary.built_from,
        rerank_bound=rerank_bound,
        retrieval=retrieval,
        retrieval_check=summary.retrieval_check,
        autocast=config.autocast,
        build_seconds=summary.seconds,
        collection=collection,
    )


def build_index(config: BuildConfig) -> BuildSummary:
    """Build a new version under `config.out` and publish it. CURRENT moves only on success.

    Under torchrun every rank calls this (`indexer.distributed`); rank 0 locks ROOT, assembles
    and publishes, and every rank returns its summary."""
    root, ranks = config.out, join()
    pointers = None
    if ranks.main:
        ensure_writable(root)
        pointers = open_pointers(root, config.backend)  # Milvus: fails early on a bad URI
        if config.backend.backend == Backend.MILVUS:
            pointers.claim_prefix()
    with build_lock(root) if ranks.main else nullcontext():
        version = new_version_id()
        version, staging = ranks.broadcast(
            (version, staging_dir(root, version)) if ranks.main else None
        )
        state, plan = None, None
        try:
            state = _prepare(config, staging, ranks, pointers)
            if state.milvus is not None:
                state.milvus.drop_orphans()  # of builds killed before they published
            with _timed(state.seconds, "plan"):  # verifies CURRENT: reads all its files once
                plan = _plan(state)
            summary = _write_version(state, plan, staging, version)
            if ranks.main:
                with _timed(state.seconds, "publish"):
                    previous = read_current(root, pointers)
                    publish(root, staging, version, config.store.keep_versions, pointers)
                    if state.milvus is not None:
                        _release_unserved(state.milvus, previous)
            summary = ranks.broadcast(summary)
        except BaseException as e:
            removed = ranks.main and discard_unpublished(root, staging, version, pointers)
            if removed and state is not None and state.milvus is not None:
                _drop_collection(state.milvus, version)
            if _disk_full(e) and (removed or not ranks.main):
                raise ResourceLimitError(
                    f"disk full in {root} while writing a new version (its files are removed, "
                    "CURRENT is unchanged): free space and build again"
                ) from e
            raise
        finally:
            for opened in (plan, state):
                if opened is not None:
                    opened.close()
    if ranks.main:
        log.info("published %s: %d examples, dim %d", version, summary.n_examples, summary.dim)
    return summary


def _release_unserved(milvus: MilvusBackend, previous: str | None) -> None:
    """Release older versions' collections after a publish; a failure is a warning (the new
    version is published, and Milvus only holds more in memory)."""
    try:
        milvus.release_unserved(previous)
    except Exception as e:
        log.warning("could not release older versions' collections: %s", e)


def _drop_collection(milvus: MilvusBackend, version: str) -> None:
    """Drop the collection of a version that failed before it was published; if Milvus is
    what failed, the next build drops it (`drop_orphans`)."""
    try:
        milvus.drop(version)
    except Exception:
        log.warning("could not drop the collection of unpublished version %s", version)


def _disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) reports a full disk or quota. FAISS, DuckDB
    and safetensors raise their own types, with the system's message in the text."""
    full = (errno.ENOSPC, errno.EDQUOT)
    seen = set()  # a chain may loop: pymilvus raises its errors `from` themselves
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in full:
            return True
        if any(os.strerror(code) in str(error) for code in full):
            return True
        error = error.__cause__ or error.__context__
    return False


def _prepare(
    config: BuildConfig, staging: Path, ranks: Ranks, pointers: Pointers | None
) -> _BuildState:
    """Load the model and stage the corpus (tokenized, chunked, hashed) in `staging`."""
    seconds: dict[str, float] = {}
    with _timed(seconds, "load"):
        loaded = load_model(config.model, config.device)
        max_length = _check_config(config, loaded)
        config.backend.check_max_length(max_length)
        modules = tracked_modules(loaded.model, config.sketch.modules)
        tracked = coverage(loaded.model, modules)
        if ranks.main:
            log_coverage(tracked)
        allocation = module_ranks({n: module_shape(m) for n, m in modules.items()}, config.sketch)
        projections = _projections(modules, allocation, config.sketch.seed)
        staged = _scratch(staging, CORPUS_FILE, ranks.rank)
        corpus = stage_corpus(config.corpus, loaded.tokenizer, max_length, staged)
        if config.backend.backend == Backend.MILVUS:
            config.backend.check_text_bytes(corpus.longest_bytes(("doc_id", "text")))
    example_pass = ExamplePass(
        GradientSketcher(loaded.model, modules, projections),
        corpus,
        loaded.tokenizer.pad_token_id,
        config.batch_size,
        config.curvature.seed,
        config.progress and ranks.main,
        config.autocast,
    )
    return _BuildState(
        config, loaded, modules, corpus, example_pass, max_length, seconds, ranks, tracked, pointers
    )


def _settings(state: _BuildState, factory: str, *, exact_rerank: bool) -> Settings:
    """This build's settings, as `Settings.of` reads them from a manifest."""
    config, loaded = state.config, state.loaded
    return Settings(
        code_version=__version__,
        weights_sha256=loaded.weights_sha256,
        config_sha256=loaded.config_sha256,
        tokenizer_sha256=loaded.tokenizer_sha256,
        modules=tuple(state.modules),
        framing=(config.corpus.prefix_tokens, config.corpus.suffix_tokens, state.max_length),
        sketch=config.sketch,
        curvature=config.curvature,
        score=ScoreKind(config.store.score),
        index_factory=factory,
        exact_rerank=exact_rerank,
        autocast=config.autocast,
    )


def _plan(state: _BuildState) -> _Plan:
    """Incremental when CURRENT verifies, matches this build's settings and the curvature
    needs no refit; a full build otherwise, said in one line. InvalidInputError when
    `--incremental on` cannot be honoured (nothing published, or CURRENT corrupt or
    incompatible); a refit, asked for or past the threshold, is a full build either way."""
    config, n = state.config, len(state.corpus)
    options, factory = config.incremental, config.store.index_factory or FLAT_FACTORY
    exact = store_exact_factors(config, state.modules)
    # Rank 0 reads CURRENT (a Milvus alias: only it holds a connection)
    main = state.ranks.main
    current = state.ranks.broadcast(read_current(config.out, state.pointers) if main else None)
    manifest, refused = None, ""
    if options.mode == IncrementalMode.OFF:
        refused = "--incremental off"
    elif current is None:
        refused = "nothing published yet"
    else:
        try:
            manifest = verify_version(version_dir(config.out, current))
        except (IndexVerificationError, NotFoundError, InvalidInputError, OSError) as e:
            # A pointer to a missing, misnamed or unreadable version is a corrupt CURRENT too.
            refused = f"CURRENT does not verify ({e})"
    if manifest is not None:
        other = Settings.of(manifest).difference(_settings(state, factory, exact_rerank=exact))
        refused = f"CURRENT ({current}) was built with other {other}" if other else ""
    if refused:
        if options.mode == IncrementalMode.ON:
            raise InvalidInputError(f"cannot build incrementally: {refused}")
        return _full_build(factory, n, refused, exact_rerank=exact)
    if options.refit_curvature:
        return _full_build(factory, n, "--refit-curvature", exact_rerank=exact)
    previous = Previous.open(version_dir(config.out, current), manifest)
    change = diff(state.corpus, previous)
    refit = refit_reason(manifest, change, n, options.refit_threshold)
    if refit:
        previous.close()
        return _full_build(factory, n, refit, exact_rerank=exact)
    log.info(
        "incremental build from %s: %d reused, %d new, %d changed, %d deleted",
        current, change.reused, change.new, change.changed, change.deleted,
    )  # fmt: skip
    return _Plan(factory, change, exact_rerank=exact, previous=previous)


def _full_build(factory: str, n_examples: int, reason: str, *, exact_rerank: bool) -> _Plan:
    log.info("full build: %s", reason)
    return _Plan(factory, all_new(n_examples), exact_rerank=exact_rerank, full_reason=reason)


def _curvature(state: _BuildState, plan: _Plan, staging: Path) -> FittedCurvature:
    """The sketch-space curvature, and the unprojected factors when asked, stored in `staging`:
    fitted on a subsample, or (incremental) the previous version's files, hard-linked."""
    config, main = state.config, state.ranks.main
    if plan.previous is not None:
        names = [CURVATURE_FILE] + ([FULL_CURVATURE_FILE] if plan.exact_rerank else [])
        for name in names if main else []:
            _link_or_copy(plan.previous.path / name, staging / name)
        loaded = [Curvature.load(plan.previous.path / name, config.device) for name in names]
        return FittedCurvature(*loaded)
    ids = state.corpus.column("id").tolist()
    rows = subsample(ids, config.curvature.fit_examples, config.curvature.seed)
    if len(rows) < state.ranks.size:
        raise InvalidInputError(f"{state.ranks.size} ranks need as many examples to fit on")
    fitted = fit_curvature(
        state.example_pass,
        rows,
        config.curvature.damping,
        unprojected=plan.exact_rerank,
        ranks=state.ranks,
    )
    if main:
        fitted.sketch.save(staging / CURVATURE_FILE)
        if fitted.unprojected is not None:
            fitted.unprojected.save(staging / FULL_CURVATURE_FILE)
    return fitted


def _link_or_copy(source: Path, target: Path) -> None:
    """Share an immutable file of a published version (a copy where links are impossible)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_version(
    state: _BuildState, plan: _Plan, staging: Path, version: str
) -> BuildSummary | None:
    """Curvature, vectors, FAISS, metadata and manifest, all inside `staging`. Every rank
    sketches its shard; rank 0 then assembles the version (other ranks return None)."""
    config, corpus, seconds, ranks = state.config, state.corpus, state.seconds, state.ranks
    n = len(corpus)
    dim = total_dim(_ranks(state.example_pass.sketcher.projections))
    try:
        check_factory(dim, plan.factory, n, ids=True)  # before the passes, not after them
    except ValueError as e:
        raise InvalidInputError(str(e)) from e
    retrieval = compact_code(config, n, plan.factory, dim)
    config.backend.check_dimension(dim)
    with _timed(seconds, "curvature"):
        curvature = _curvature(state, plan, staging)
    rows = plan.change.to_sketch
    mine = ranks.shard(rows)
    cosine = config.store.score == ScoreKind.COSINE
    calibrated = curvature.unprojected is not None and config.calibration.queries > 0
    reranker = _reranker(state, curvature.unprojected) if calibrated else None
    targets = None
    if reranker is not None:
        with _timed(seconds, "calibration"):
            targets = _main_pass_targets(state, reranker, len(rows), cosine=cosine)
    with ExitStack() as opened, _timed(seconds, "sketch"):
        scratch = _scratch(staging, SCRATCH_FILE, ranks.rank)
        vectors = opened.enter_context(ScratchVectors(scratch, len(mine), dim))
        scores = None
        if targets is not None:
            scratch = _scratch(staging, SCORES_FILE, ranks.rank)
            out = ScratchVectors(scratch, len(mine), len(targets.norms), dtype=np.float32)
            scores = _MainPassScores(targets, opened.enter_context(out))
        stats = _scratch(staging, SKETCHED_FILE, ranks.rank)
        full_seconds = _write_vectors(
            state.example_pass, curvature, vectors, stats, mine, cosine=cosine, calibration=scores
        )
    query_norms = None if targets is None else targets.norms
    targets = scores = None  # up to `_QUERY_TARGET_BYTES`, not needed past the main pass
    # Phases do not overlap: the main pass's full-space work is a phase of its own: a cosine
    # index's exact norms (with the calibration's scores from the same rotations), or an
    # influence index's calibration scores (a part of the calibration).
    seconds["sketch"] = round(seconds["sketch"] - full_seconds, 3)
    seconds["exact_norms"] = round(full_seconds if cosine else 0.0, 3)
    if not cosine and query_norms is not None:
        seconds["calibration"] = round(seconds["calibration"] + full_seconds, 3)
    if not ranks.main:
        state.close()  # before rank 0 deletes the staged corpus and publishes
    ranks.barrier()  # every rank's shard is written
    if not ranks.main:
        return None
    ids = corpus.column("id").astype(np.int64)
    shards = [
        ScratchVectors(
            _scratch(staging, SCRATCH_FILE, k), len(rows[k :: ranks.size]), dim, create=False
        )
        for k in range(ranks.size)
    ]
    previous = plan.previous.vectors if plan.previous is not None else None
    with _timed(seconds, "index"), ExitStack() as opened:
        for shard in shards:
            opened.enter_context(shard)
        sketched, trained = ScratchShards(shards), None
        if previous is not None:  # unchanged examples keep their codes
            trained = previous_training(previous, sketched, len(rows), plan.factory)
        try:
            write_faiss(
                MergedVectors(sketched, plan.change, previous, curvature.sketch.dim),
                ids,
                plan.factory,
                staging / INDEX_FILE,
                trained=trained,
            )
        except ValueError as e:
            raise InvalidInputError(str(e)) from e
    retrieval_check = None
    if retrieval is not None:
        with _timed(seconds, "retrieval"):
            write_compact_index(
                staging / INDEX_FILE, staging / RETRIEVAL_FILE, retrieval, config.sketch.seed
            )
            retrieval_check = _check_compact_code(state, curvature.sketch, staging, retrieval)
        retrieval = retrieval if retrieval_check.kept else None
    with _timed(seconds, "metadata"):
        sketched = [_scratch(staging, SKETCHED_FILE, k) for k in range(ranks.size)]
        reuse = plan.previous is not None
        write_metadata(staging / METADATA_FILE, corpus, sketched, reuse=reuse)
        if config.store.lexical_index:
            write_lexical_index(corpus.texts(), ids, staging / LEXICAL_DIR)
    rerank_bound = None
    if reranker is not None:
        with _timed(seconds, "calibration"):
            rerank_bound = _calibrate(
                state, curvature.sketch, reranker, staging, ids, query_norms, plan.change
            )
    state.close()  # the staged corpus is in the metadata now
    for scratch in staging.glob(".*"):
        scratch.unlink()
    collection = None
    if state.milvus is not None:
        with _timed(seconds, "collection"):
            collection = state.milvus.write_collection(
                version,
                staging,
                state.max_length,
                unit=config.store.score == ScoreKind.COSINE,
                progress=config.progress,
            )
    change = plan.change
    summary = BuildSummary(
        version=version,
        root=str(config.out),
        n_documents=corpus.n_documents,
        n_examples=n,
        n_empty_skipped=corpus.n_empty_skipped,
        n_tokens=corpus.n_tokens,
        dim=curvature.sketch.dim,
        allocation=describe(_ranks(curvature.sketch.projections())),
        coverage=state.coverage,
        index_factory=plan.factory,
        index_bytes_per_example=(staging / INDEX_FILE).stat().st_size / n,
        retrieval_code=retrieval.name if retrieval is not None else None,
        retrieval_check=retrieval_check,
        full_curvature_bytes=_size(staging / FULL_CURVATURE_FILE),
        mode="incremental" if plan.previous is not None else "full",
        full_reason=plan.full_reason,
        built_from=plan.previous.path.name if plan.previous is not None else None,
        reused=change.reused,
        new=change.new,
        changed=change.changed,
        deleted=change.deleted,
        seconds=seconds,
        collection=collection.name if collection is not None else "",
    )
    manifest = _manifest(
        state, plan, curvature.sketch, summary, rerank_bound, retrieval, collection
    )
    write_manifest(staging, manifest)
    return summary


def _reranker(state: _BuildState, unprojected: Curvature) -> ExactReranker:
    """The exact scorer the calibration scores with (and its targets are made with)."""
    pad_id = state.loaded.tokenizer.pad_token_id
    return ExactReranker(state.loaded.model, unprojected, pad_id, state.config.batch_size)


def _main_pass_targets(
    state: _BuildState, reranker: ExactReranker, n_sketched: int, *, cosine: bool
) -> QueryTargets | None:
    """The targets of the pseudo-queries the main pass scores exactly (rotated for a `cosine`
    index, which rotates every example for its exact norm; folded otherwise), cut from the
    staged corpus as the calibration cuts them from the metadata; None when the main pass
    scores none (`indexer.calibration.main_pass_queries`)."""
    config = state.config
    if config.autocast != Autocast.OFF:
        return None  # the exact stage scores in float32: so must the calibration
    pseudo = _staged_pseudo_queries(state, config.calibration.queries)
    count = main_pass_queries(
        len(pseudo),
        reranker.curvature.dim,
        n_sketched,
        len(state.corpus),
        config.calibration.depth,
        ScoreKind(config.store.score),
    )
    if not count:
        return None
    batch = query_batch(pseudo[:count], state.loaded.tokenizer.pad_token_id)
    capture = reranker.sketcher.run(batch, "data")
    with torch.no_grad():
        return reranker.targets(capture, rotated=cosine)


def _staged_pseudo_queries(state: _BuildState, count: int) -> list[PseudoQuery]:
    """The pseudo-queries cut from `count` examples of the staged corpus, as the calibration
    cuts its own from the metadata (the first ones are the calibration's)."""
    config, corpus = state.config, state.corpus
    ids = corpus.column("id").astype(np.int64)

    def tokens_of(chosen: list[int]) -> dict[int, list[int]]:
        rows = np.flatnonzero(np.isin(ids, chosen))
        return {e.example_id: e.token_ids for e in corpus.fetch(rows.tolist())}

    return cut_queries(ids, count, config.sketch.seed, tokens_of)


def _check_compact_code(
    state: _BuildState, sketch: Curvature, staging: Path, code: CompactCode
) -> RetrievalCheck:
    """Search the staged compact code with the pseudo-queries, as the engine would, against
    the flat scan; a code chosen by `auto` that keeps under `RETRIEVAL_MIN_RECALL` of the
    flat top-10 is removed from the version (one asked for is kept, with its figure)."""
    pseudo = _staged_pseudo_queries(state, RETRIEVAL_CHECK_QUERIES)
    recall = 0.0
    if pseudo:
        kind, step = ScoreKind(state.config.store.score), state.config.batch_size
        search = np.concatenate(
            [
                _search_vectors(state, sketch, pseudo[start : start + step], kind)
                for start in range(0, len(pseudo), step)
            ]
        )
        stored, compact = open_index(staging / INDEX_FILE), open_index(staging / RETRIEVAL_FILE)
        recall = flat_top10_recall(stored, compact, search, RETRIEVAL_CANDIDATES)
    kept = state.config.store.retrieval_code is True or recall >= RETRIEVAL_MIN_RECALL
    check = RetrievalCheck(code.name, RETRIEVAL_CANDIDATES, len(pseudo), recall, kept)
    log.info("compact retrieval code %s", check)
    if not check.kept:
        (staging / RETRIEVAL_FILE).unlink()
    return check


def _search_vectors(
    state: _BuildState, sketch: Curvature, pseudo: list[PseudoQuery], kind: ScoreKind
) -> np.ndarray:
    """The pseudo-queries' search vectors `[len(pseudo), D]`, as the engine searches with them."""
    batch = query_batch(pseudo, state.loaded.tokenizer.pad_token_id)
    capture = state.example_pass.sketcher.run(batch, "data")
    return np.stack([space.search for space in score_spaces(sketch, capture, kind)])


def _calibrate(
    state: _BuildState,
    sketch: Curvature,
    reranker: ExactReranker,
    staging: Path,
    ids: np.ndarray,
    query_norms: np.ndarray | None,
    change: Diff,
) -> RerankBound:
    """The exact stage's bound, measured on the staged version's own index and metadata, with
    the exact scores the main pass wrote for the first `len(query_norms)` pseudo-queries (None:
    none) and the examples it sketched (`change`: those to sketch, on every rank)."""
    config = state.config
    index = open_index(staging / INDEX_FILE)
    set_nprobe(index, config.store.nprobe)
    metadata = MetadataReader(staging / METADATA_FILE)
    pad_id = state.loaded.tokenizer.pad_token_id
    with ExitStack() as opened:
        opened.callback(metadata.close)
        known = None
        if query_norms is not None:
            size, rows = state.ranks.size, change.to_sketch
            shards = [
                opened.enter_context(
                    ScratchVectors(
                        _scratch(staging, SCORES_FILE, k),
                        len(rows[k::size]),
                        len(query_norms),
                        create=False,
                        dtype=np.float32,
                    )
                )
                for k in range(size)
            ]
            slot = np.full(len(change.previous_row), -1, dtype=np.int64)
            slot[rows] = np.arange(len(rows))
            known = KnownScores(ScratchShards(shards).__getitem__, slot, query_norms)
        calibrator = Calibrator(
            sketcher=state.example_pass.sketcher,
            sketch=sketch,
            reranker=reranker,
            index=index,
            metadata=metadata,
            kind=ScoreKind(config.store.score),
            pad_id=pad_id,
        )
        calibration = config.calibration
        return calibrator.calibrate(
            ids,
            calibration.queries,
            calibration.depth,
            calibration.quantile_for(config.store.score),
            config.sketch.seed,
            known,
        )


def _size(path: Path) -> int:
    """Bytes of `path`, 0 when it does not exist."""
    return path.stat().st_size if path.exists() else 0
