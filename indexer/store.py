"""The stored artefacts of one version: FAISS index, float16 vectors, DuckDB metadata."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import faiss
import numpy as np

from indexer.corpus import Example

EXACT_INDEX_LIMIT = 50_000  # up to this many examples a flat (exact) index is cheap enough
ADD_CHUNK_ROWS = 8192
TRAIN_ROWS_PER_LIST = 40  # k-means training sample per inverted list (FAISS asks for 30-256)

METADATA_SCHEMA = """
CREATE TABLE examples (
    id BIGINT PRIMARY KEY,
    "row" INTEGER NOT NULL,
    doc_id VARCHAR NOT NULL,
    chunk INTEGER NOT NULL,
    text VARCHAR NOT NULL,
    n_tokens INTEGER NOT NULL,
    token_ids INTEGER[] NOT NULL,
    norm DOUBLE NOT NULL,
    loss DOUBLE NOT NULL,
    source VARCHAR NOT NULL
)
"""


def default_factory(n_examples: int) -> str:
    """Exact search for small corpora; IVF with 8-bit scalar quantisation beyond that."""
    if n_examples <= EXACT_INDEX_LIMIT:
        return "IDMap,Flat"
    nlist = int(min(65536, max(64, math.sqrt(n_examples))))
    return f"IVF{nlist},SQ8"


def _n_lists(index: faiss.Index) -> int:
    """Inverted lists of an IVF index; 1 for indexes without lists (e.g. `IDMap,SQ8`)."""
    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 1


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Inverted lists scanned per search; a no-op for indexes without lists."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    ivf.nprobe = min(nprobe, ivf.nlist)


def open_vectors(path: Path, n_rows: int, dim: int, mode: str = "r") -> np.memmap:
    """The `[n_rows, dim]` float16 matrix of preconditioned vectors, row = example row."""
    return np.memmap(path, dtype=np.float16, mode=mode, shape=(n_rows, dim))


def _as_search_vectors(block: np.ndarray, normalize: bool) -> np.ndarray:
    vectors = np.ascontiguousarray(block, dtype=np.float32)
    if normalize:
        faiss.normalize_L2(vectors)
    return vectors


def write_faiss(
    vectors: np.ndarray, ids: np.ndarray, factory: str, normalize: bool, path: Path, seed: int = 0
) -> faiss.Index:
    """Build an inner-product index over `vectors [N, D]` with `ids [N]` and write it."""
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e
    if not index.is_trained:
        sample = min(n, max(TRAIN_ROWS_PER_LIST * _n_lists(index), 10_000))
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
        index.train(_as_search_vectors(vectors[rows], normalize))
    for start in range(0, n, ADD_CHUNK_ROWS):
        block = _as_search_vectors(vectors[start : start + ADD_CHUNK_ROWS], normalize)
        index.add_with_ids(block, ids[start : start + ADD_CHUNK_ROWS])
    faiss.write_index(index, str(path))
    return index


def write_metadata(
    path: Path, examples: list[Example], norms: np.ndarray, losses: np.ndarray, scratch: Path
) -> None:
    """Bulk-load the examples table through a newline-delimited JSON file that DuckDB reads."""
    with scratch.open("w") as f:
        for row, (ex, norm, loss) in enumerate(zip(examples, norms, losses, strict=True)):
            record = {
                "id": ex.example_id, "row": row, "doc_id": ex.doc_id, "chunk": ex.chunk,
                "text": ex.text, "n_tokens": len(ex.token_ids), "token_ids": ex.token_ids,
                "norm": float(norm), "loss": float(loss), "source": ex.source,
            }  # fmt: skip
            f.write(json.dumps(record) + "\n")
    columns = (
        "{'id': 'BIGINT', 'row': 'INTEGER', 'doc_id': 'VARCHAR', 'chunk': 'INTEGER', "
        "'text': 'VARCHAR', 'n_tokens': 'INTEGER', 'token_ids': 'INTEGER[]', 'norm': 'DOUBLE', "
        "'loss': 'DOUBLE', 'source': 'VARCHAR'}"
    )
    with duckdb.connect(str(path)) as con:
        con.execute(METADATA_SCHEMA)
        con.execute(
            "INSERT INTO examples SELECT * FROM "
            f"read_json(?, format='newline_delimited', columns={columns})",
            [str(scratch)],
        )
    scratch.unlink()


@dataclass(frozen=True)
class ExampleRecord:
    example_id: int
    row: int
    doc_id: str
    chunk: int
    text: str
    token_ids: list[int]
    norm: float


class MetadataReader:
    """Read-only, parameterised lookups; one connection guarded by a lock (DuckDB's are not
    safe to share across threads)."""

    def __init__(self, path: Path):
        self._con = duckdb.connect(str(path), read_only=True)
        self._lock = threading.Lock()

    def lookup(self, ids: list[int]) -> dict[int, ExampleRecord]:
        if not ids:
            return {}
        with self._lock:
            rows = self._con.execute(
                'SELECT id, "row", doc_id, chunk, text, token_ids, norm '
                "FROM examples WHERE id IN (SELECT UNNEST(?::BIGINT[]))",
                [list(ids)],
            ).fetchall()
        return {r[0]: ExampleRecord(*r) for r in rows}

    def count(self) -> int:
        with self._lock:
            return self._con.execute("SELECT count(*) FROM examples").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._con.close()
