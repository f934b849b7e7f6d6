"""Incremental builds: reuse CURRENT's curvature and the stored vectors of unchanged examples.

A nightly rebuild of a corpus that barely changed need not sketch it all again. When CURRENT
verifies and was built with the same code, model weights, tokenizer, tracked modules,
framing, sketch and curvature settings, score, index factory and re-rank factors as this
build, an example whose content hash (`indexer.corpus.content_hash`) is unchanged keeps its
stored vector and metadata (norm, loss); only new and changed examples are sketched, deleted
ones are dropped, and the result is a new immutable version. The curvature is refitted (a full
build) on request or once the examples changed since the fit pass a fraction of the corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import faiss
import numpy as np

from indexer.config import Autocast, BuildConfig, CurvatureConfig, ScoreKind, SketchConfig
from indexer.corpus import ExampleTable
from indexer.manifest import INDEX_FILE, METADATA_FILE, Manifest
from indexer.store import (
    ADD_CHUNK_ROWS,
    FLAT_FACTORY,
    REUSE_JOIN,
    MetadataReader,
    ScratchShards,
    ScratchVectors,
    StoredVectors,
    copy_training,
    new_index,
    open_index,
    sql_path,
    widen_ranges,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything a stored vector depends on besides its example's tokens."""

    code_version: str
    weights_sha256: str
    config_sha256: str
    tokenizer_sha256: str
    modules: tuple[str, ...]
    framing: tuple  # (prefix tokens, suffix tokens, tokens per example)
    sketch: SketchConfig
    curvature: CurvatureConfig
    score: ScoreKind
    index_factory: str
    exact_rerank: bool
    autocast: Autocast

    @classmethod
    def of(cls, manifest: Manifest) -> Settings:
        corpus = manifest.corpus
        return cls(
            code_version=manifest.code_version,
            weights_sha256=manifest.model.weights_sha256,
            config_sha256=manifest.model.config_sha256,
            tokenizer_sha256=manifest.model.tokenizer_sha256,
            modules=tuple(m.name for m in manifest.modules),
            framing=(corpus.prefix_tokens, corpus.suffix_tokens, corpus.max_length),
            sketch=manifest.sketch,
            curvature=manifest.curvature,
            score=ScoreKind(manifest.score),
            index_factory=manifest.index_factory,
            exact_rerank=manifest.exact_rerank,
            autocast=manifest.autocast,
        )

    def difference(self, other: Settings) -> str | None:
        """The first setting in which `other` differs, in words (None: the vectors are
        comparable)."""
        for f in fields(Settings):
            if getattr(self, f.name) != getattr(other, f.name):
                return _WORDS[f.name]
        return None


_WORDS = {
    "code_version": "code version",
    "weights_sha256": "model weights",
    "config_sha256": "model config",
    "tokenizer_sha256": "tokenizer",
    "modules": "tracked modules",
    "framing": "framing or tokens per example",
    "sketch": "sketch settings",
    "curvature": "curvature settings",
    "score": "score kind",
    "index_factory": "index factory",
    "exact_rerank": "exact re-rank factors",
    "autocast": "autocast",
}


def built_with(manifest: Manifest, config: BuildConfig) -> bool:
    """Whether a version was built with the settings `config` fixes without loading a model:
    sketch, curvature, score and index factory (`config`'s, or the default flat one). The
    others (model, tokenizer, code, framing, ...) count as the version's own."""
    built = Settings.of(manifest)
    asked = replace(
        built,
        sketch=config.sketch,
        curvature=config.curvature,
        score=config.store.score,
        index_factory=config.store.index_factory or FLAT_FACTORY,
        autocast=config.autocast,
    )
    return built.difference(asked) is None


@dataclass
class Previous:
    """A published version opened for reuse: its manifest and its stored vectors."""

    path: Path
    manifest: Manifest
    vectors: StoredVectors

    @classmethod
    def open(cls, path: Path, manifest: Manifest) -> Previous:
        metadata = MetadataReader(path / METADATA_FILE)
        index = open_index(path / INDEX_FILE)
        unit = manifest.score == ScoreKind.COSINE
        return cls(path, manifest, StoredVectors(index, metadata, unit=unit))

    def close(self) -> None:
        self.vectors.metadata.close()


@dataclass(frozen=True)
class Diff:
    """Where each example of this build (row order) gets its vector."""

    previous_row: np.ndarray  # [N]: the row reused from the previous version, -1: sketch it
    new: int
    changed: int
    deleted: int

    @property
    def reused(self) -> int:
        return int((self.previous_row >= 0).sum())

    @property
    def to_sketch(self) -> np.ndarray:
        """Rows to sketch (new and changed examples), ascending."""
        return np.flatnonzero(self.previous_row < 0)

    @property
    def touched(self) -> int:
        """Examples added, changed or deleted."""
        return self.new + self.changed + self.deleted


def all_new(n_examples: int) -> Diff:
    """A full build's: every example is sketched (and counted as new)."""
    return Diff(np.full(n_examples, -1, dtype=np.int64), n_examples, 0, 0)


def diff(corpus: ExampleTable, previous: Previous) -> Diff:
    """Compare the staged examples with the previous version's by id and content hash, in
    DuckDB (the previous metadata is attached to the corpus's connection as `previous`, where
    `write_metadata` finds the reused examples' norms and losses)."""
    con = corpus.con
    con.execute(f"ATTACH '{sql_path(previous.path / METADATA_FILE)}' AS previous (READ_ONLY)")
    found = con.execute(
        f'SELECT COALESCE(p."row", -1) AS previous_row FROM examples c {REUSE_JOIN} '
        'ORDER BY c."row"'
    ).fetchnumpy()["previous_row"]
    previous_row = np.asarray(found, dtype=np.int64)
    new = con.execute(
        "SELECT count(*) FROM examples c ANTI JOIN previous.examples p ON p.id = c.id"
    ).fetchone()[0]
    deleted = con.execute(
        "SELECT count(*) FROM previous.examples p ANTI JOIN examples c ON p.id = c.id"
    ).fetchone()[0]
    reused = int((previous_row >= 0).sum())
    return Diff(previous_row, new=new, changed=len(previous_row) - reused - new, deleted=deleted)


def refit_reason(previous: Manifest, change: Diff, n_examples: int, threshold: float) -> str | None:
    """Why the curvature must be refitted though it could be reused (None: reuse it)."""
    since = previous.curvature_fit.changed_since + change.touched
    if since > threshold * n_examples:
        return (
            f"{since} examples changed since the curvature was fitted "
            f"({since / n_examples:.1%} of {n_examples}, over --refit-threshold {threshold:g})"
        )
    return None


class MergedVectors:
    """This build's vectors `[N, D]` (float32) in row order, as the index searches them:
    sketched rows from the scratch matrix, reused rows decoded from the previous index.
    Indexable by a slice or an array of rows, which is all `write_faiss` asks."""

    def __init__(
        self, sketched: ScratchVectors, change: Diff, previous: StoredVectors | None, dim: int
    ):
        self.shape = (len(change.previous_row), dim)
        self._sketched = sketched
        self._previous = previous
        self._previous_row = change.previous_row
        self._slot = np.cumsum(change.previous_row < 0) - 1  # row -> its row in `sketched`

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        rows = np.arange(*key.indices(self.shape[0])) if isinstance(key, slice) else key
        block = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        source = self._previous_row[rows]
        fresh = source < 0
        block[fresh] = self._sketched[self._slot[rows[fresh]]]
        if not fresh.all():
            block[~fresh] = self._previous[source[~fresh]]
        return block


def previous_training(
    previous: StoredVectors, sketched: ScratchShards, n_sketched: int, factory: str
) -> faiss.Index:
    """An empty index of `factory` (the previous version's) trained as the previous index, its
    scalar quantiser's ranges widened where this build's new and changed vectors (the
    `n_sketched` rows of `sketched`) fall outside them: unchanged examples keep their codes in
    every other dimension, and no new vector is clipped to the old ranges."""
    dim = previous.shape[1]
    index = new_index(dim, factory)
    copy_training(previous.index, index)
    starts = range(0, n_sketched, ADD_CHUNK_ROWS)
    blocks = (
        sketched[np.arange(s, min(s + ADD_CHUNK_ROWS, n_sketched))].astype(np.float32)
        for s in starts
    )
    widened = widen_ranges(index, blocks)
    if widened:
        log.info("code ranges widened in %d of %d dimensions for new vectors", widened, dim)
    return index
