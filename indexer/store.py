"""The stored artefacts of one version: the FAISS index (the only copy of every vector) and the
DuckDB metadata; and the reader that decodes stored vectors back from the index."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexer.corpus import ExampleTable, connect

# Exhaustive search over 8-bit codes (a trained range per dimension), at any size: gradient
# vectors do not cluster (an IVF at 100k found 0.55 of the flat top-10); large corpora add a
# compact code scanned first (`indexer.retrieval`).
FLAT_FACTORY = "IDMap,SQ8"
ADD_CHUNK_ROWS = 1024  # rows decoded and added at a time: 192 MiB of float32 at D = 49,152
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
    content_hash BIGINT NOT NULL,
    norm DOUBLE NOT NULL,
    exact_norm DOUBLE,
    loss DOUBLE NOT NULL,
    source VARCHAR NOT NULL
)
"""


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


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index; ValueError names a factory string FAISS does not know."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e


def check_factory(dim: int, factory: str, n: int, *, ids: bool) -> None:
    """Refuse, before any pass, an index the build could not fill with `n` vectors: a factory
    FAISS does not know, an inverted file with more lists than vectors to train them, or, as
    `ids` asks, one that keeps no example ids (the stored index) or keeps only ids (a compact
    code, whose rows are the stored index's). ValueError names the problem."""
    index = new_index(dim, factory)
    lists = _n_lists(index)
    if lists > n:
        raise ValueError(
            f"FAISS factory {factory!r} has {lists} inverted lists, more than the {n} vectors "
            "to train them"
        )
    mapped = _id_mapped(index)
    if ids and not (mapped or lists > 1):
        raise ValueError(
            f"FAISS factory {factory!r} keeps no example ids: use an IDMap or IVF index "
            "(e.g. IDMap,SQ8)"
        )
    if mapped and not ids:
        raise ValueError(f"FAISS factory {factory!r}: a compact code's rows take no IDMap")


def _id_mapped(index: faiss.Index) -> bool:
    """Whether `index` is an IDMap (maybe behind a transform): it takes ids, not positions."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _id_mapped(index.index)
    return isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2)


class ScratchVectors:
    """A `[n_rows, dim]` float16 matrix in a file, for vectors waiting to be indexed (or of
    another `dtype`: the calibration's exact scores are float32).

    Read and written with pread/pwrite, not mapped: the build's resident memory does not grow
    with the corpus, and its blocks are allocated up front, so a full disk is an OSError
    (ENOSPC) here rather than a SIGBUS when a page of a sparse mapping is first written.
    """

    def __init__(
        self,
        path: Path,
        n_rows: int,
        dim: int,
        *,
        create: bool = True,
        dtype: type[np.floating] = np.float16,
    ):
        """A new matrix at `path`, or (`create` False) one another process wrote, to read."""
        self.shape = (n_rows, dim)
        self.dtype = np.dtype(dtype)
        self._row_bytes = dim * self.dtype.itemsize
        if not create:
            self._fd = os.open(path, os.O_RDONLY)
            return
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if n_rows:
                os.posix_fallocate(self._fd, 0, n_rows * self._row_bytes)
        except OSError:
            os.close(self._fd)
            raise

    def write(self, rows: np.ndarray, block: np.ndarray) -> None:
        """Store `block [len(rows), dim]` at `rows`."""
        data = np.ascontiguousarray(block, dtype=self.dtype)
        for row, values in zip(rows.tolist(), data, strict=True):
            os.pwrite(self._fd, values.tobytes(), row * self._row_bytes)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """The rows `[len(rows), dim]`, read a contiguous run at a time."""
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        if not len(rows):
            return out
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
        for begin, end in zip(starts, [*starts[1:], len(rows)], strict=True):
            raw = os.pread(self._fd, (end - begin) * self._row_bytes, rows[begin] * self._row_bytes)
            out[begin:end] = np.frombuffer(raw, dtype=self.dtype).reshape(end - begin, -1)
        return out

    def __enter__(self) -> ScratchVectors:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


class ScratchShards:
    """The scratch matrices `[n, dim]` of the ranks of a build as one: rank k of N sketched
    rows k, k + N, k + 2N, ... (`Ranks.shard`) into its own matrix."""

    def __init__(self, shards: list[ScratchVectors]):
        self.shards = shards

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """The rows `[len(rows), dim]`, each from the shard that holds it."""
        size = len(self.shards)
        out = np.empty((len(rows), self.shards[0].shape[1]), dtype=self.shards[0].dtype)
        for rank, shard in enumerate(self.shards):
            mine = rows % size == rank
            out[mine] = shard[rows[mine] // size]
        return out


def open_index(path: Path) -> faiss.Index:
    """A written index, memory-mapped: FAISS maps the codes of flat-code and IVF indexes
    (`IO_FLAG_MMAP_IFC`) instead of reading them, so pages load on first use and processes
    serving the same version share the page cache."""
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)


def _as_search_vectors(block: np.ndarray, normalize: bool) -> np.ndarray:
    vectors = np.ascontiguousarray(block, dtype=np.float32)
    if normalize:
        faiss.normalize_L2(vectors)
    return vectors


def write_faiss(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str,
    path: Path,
    *,
    normalize: bool = False,
    seed: int = 0,
    trained: faiss.Index | None = None,
) -> faiss.Index:
    """Build an inner-product index over `vectors [N, D]` (unit-normalised first when
    `normalize`) with `ids [N]` and write it.

    Rows are added in order, so row r of an `IDMap` index's inner index is `vectors[r]`; an IVF
    index gets a direct map, so that `StoredVectors` can decode any row of either. ValueError
    names a factory FAISS does not know or whose index cannot give its vectors back.

    `trained` (an index of the same factory, e.g. the previous version's) lends its training
    instead of a fit on `vectors`: the vectors it decoded then encode to the same codes again.
    """
    n, dim = vectors.shape
    index = new_index(dim, factory)
    if trained is not None:
        copy_training(trained, index)
    if not index.is_trained:
        sample = min(n, max(TRAIN_ROWS_PER_LIST * _n_lists(index), 10_000))
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
        index.train(_as_search_vectors(vectors[rows], normalize))
    _reserve_codes(index, n)
    for start in range(0, n, ADD_CHUNK_ROWS):
        block = _as_search_vectors(vectors[start : start + ADD_CHUNK_ROWS], normalize)
        index.add_with_ids(block, ids[start : start + ADD_CHUNK_ROWS])
    _add_direct_map(index)
    try:
        decode_rows(index, np.zeros(1, dtype=np.int64), ids[:1])
    except RuntimeError as e:
        raise ValueError(
            f"FAISS factory {factory!r} cannot give its vectors back, and the index is their "
            f"only copy: {str(e).splitlines()[0]}"
        ) from e
    faiss.write_index(index, str(path))
    return index


def _codec(index: faiss.Index) -> faiss.Index:
    """The index that encodes: an `IDMap`'s inner index, an IVF index itself."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return faiss.downcast_index(index)


def copy_training(source: faiss.Index, target: faiss.Index) -> None:
    """Give the untrained, empty `target` the training of `source` (the same factory): the
    scalar quantiser's ranges and, for IVF, the coarse centroids. Other kinds of index stay
    untrained (the caller fits them anew)."""
    src, dst = _codec(source), _codec(target)
    if dst.is_trained or type(src) is not type(dst):
        return
    if isinstance(dst, faiss.IndexIVFScalarQuantizer):
        dst.quantizer.add(src.quantizer.reconstruct_n(0, src.nlist))
    elif not isinstance(dst, faiss.IndexScalarQuantizer):
        return
    dst.sq = src.sq  # a copy of the C++ struct: per-dimension ranges (8/6/4 bits)
    dst.is_trained = True
    target.is_trained = True


# Scalar quantisers with a range per dimension (`trained` = [vmin, vdiff], D each)
_PER_DIMENSION = (
    faiss.ScalarQuantizer.QT_8bit,
    faiss.ScalarQuantizer.QT_6bit,
    faiss.ScalarQuantizer.QT_4bit,
)


def widen_ranges(index: faiss.Index, blocks: Iterable[np.ndarray]) -> int:
    """Widen a trained scalar quantiser's per-dimension ranges to hold every row of `blocks`
    (each `[n, D]` float32; IVF: their residuals), so that none is clipped; returns how many
    dimensions widened. Only those dimensions' codes change for vectors encoded before."""
    codec = _codec(index)
    sq = getattr(codec, "sq", None)
    if sq is None or sq.qtype not in _PER_DIMENSION or not codec.is_trained:
        return 0
    vmin, vdiff = faiss.vector_to_array(sq.trained).reshape(2, -1)
    low, high = vmin.copy(), vmin + vdiff
    for block in blocks:
        if not len(block):
            continue
        values = _encoded_values(codec, block)
        low, high = np.minimum(low, values.min(axis=0)), np.maximum(high, values.max(axis=0))
    # Dimensions whose values fit keep their (vmin, vdiff) exactly: recomputing them from
    # (low, high) could round vdiff, and with it codes.
    wider = (low < vmin) | (high > vmin + vdiff)
    trained = np.concatenate([np.where(wider, low, vmin), np.where(wider, high - low, vdiff)])
    faiss.copy_array_to_vector(trained.astype(np.float32), sq.trained)
    return int(wider.sum())


def _encoded_values(codec: faiss.Index, block: np.ndarray) -> np.ndarray:
    """What a scalar quantiser encodes of `block [n, D]`: the vectors, or an IVF index's
    residuals from their lists' centroids."""
    if not getattr(codec, "by_residual", False):
        return block
    _, lists = codec.quantizer.search(block, 1)
    return block - codec.quantizer.reconstruct_batch(lists[:, 0])


def _reserve_codes(index: faiss.Index, n: int) -> None:
    """Give a flat-code index (e.g. `IDMap,SQfp16`) room for `n` codes before any is added:
    growing its codes vector one chunk at a time would reallocate and copy it, briefly holding
    it twice (resizing down keeps a std::vector's capacity)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexFlatCodes):
        inner.codes.resize(n * inner.code_size)
        inner.codes.resize(0)


def _add_direct_map(index: faiss.Index) -> None:
    """Let an IVF index reconstruct a vector from its id (a hash table: ids are not 0..N-1)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)


def decode_rows(index: faiss.Index, rows: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
    """The index's own vectors `[n, D]` (float32) of `rows` (whose example ids are `ids`): by
    position in an `IDMap`'s inner index, by id through the direct map otherwise."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if np.all(np.diff(rows) == 1):  # a slice: decode the codes in one run
            return inner.reconstruct_n(int(rows[0]), len(rows))
        return inner.reconstruct_batch(rows)
    return index.reconstruct_batch(ids)


# An example keeps the previous version's vector (and norms, loss) when its id and content
# hash are unchanged; `c` is the staged corpus, `previous` the previous version's metadata.
REUSE_JOIN = "LEFT JOIN previous.examples p ON p.id = c.id AND p.content_hash = c.content_hash"


_SKETCHED = (
    "read_csv(?, header=false, delim=',', auto_detect=false, "
    "columns={'row': 'INTEGER', 'norm': 'DOUBLE', 'exact_norm': 'DOUBLE', 'loss': 'DOUBLE'})"
)


def sql_path(path: Path) -> str:
    """`path` as a SQL string literal's body (DuckDB's ATTACH takes no parameters)."""
    return str(path).replace("'", "''")


def write_metadata(
    path: Path, corpus: ExampleTable, sketched: list[Path], *, reuse: bool = False
) -> None:
    """The version's examples table, in DuckDB from the staged corpus: each example's norms and
    loss come from `sketched` (headerless CSVs of row, norm, exact norm, loss: the main pass's
    output, one per rank) or, when `reuse`, from the previous version's metadata (attached as
    `previous`)."""
    con = corpus.con
    columns = ("norm", "exact_norm", "loss")
    taken = [f"COALESCE(s.{c}, p.{c})" if reuse else f"s.{c}" for c in columns]
    con.execute(f"ATTACH '{sql_path(path)}' AS out")
    try:
        con.execute(METADATA_SCHEMA.replace("CREATE TABLE examples", "CREATE TABLE out.examples"))
        con.execute(
            'INSERT INTO out.examples SELECT c.id, c."row", c.doc_id, c.chunk, c.text, '
            f"c.n_tokens, c.token_ids, c.content_hash, {', '.join(taken)}, c.source "
            f'FROM examples c LEFT JOIN {_SKETCHED} s ON s."row" = c."row" '
            f'{REUSE_JOIN if reuse else ""} ORDER BY c."row"',
            [[str(p) for p in sketched]],
        )
    finally:
        con.execute("DETACH out")


@dataclass(frozen=True)
class ExampleRecord:
    example_id: int
    row: int
    doc_id: str
    chunk: int
    text: str
    token_ids: list[int]
    norm: float
    exact_norm: float | None  # only in a cosine index with full-space factors


class MetadataReader:
    """Read-only, parameterised lookups; one connection guarded by a lock (DuckDB's are not
    safe to share across threads)."""

    def __init__(self, path: Path):
        self._con = connect(str(path), read_only=True)
        self._lock = threading.Lock()

    def lookup(self, ids: list[int]) -> dict[int, ExampleRecord]:
        if not ids:
            return {}
        with self._lock:
            rows = self._con.execute(
                'SELECT id, "row", doc_id, chunk, text, token_ids, norm, exact_norm '
                "FROM examples WHERE id IN (SELECT UNNEST(?::BIGINT[]))",
                [list(ids)],
            ).fetchall()
        return {r[0]: ExampleRecord(*r) for r in rows}

    def count(self) -> int:
        with self._lock:
            return self._con.execute("SELECT count(*) FROM examples").fetchone()[0]

    def ids_and_norms(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Example ids `[n]` (int64) and vector norms `[n]` (float64) of the given rows."""
        with self._lock:
            found = self._con.execute(
                'SELECT "row", id, norm FROM examples WHERE "row" IN (SELECT UNNEST(?::INTEGER[]))',
                [rows.tolist()],
            ).fetchnumpy()
        order = np.argsort(found["row"])
        position = np.searchsorted(found["row"][order], rows)
        return found["id"][order][position], found["norm"][order][position]

    def close(self) -> None:
        with self._lock:
            self._con.close()


class StoredVectors:
    """The vectors `[N, D]` (float32) the index searches, decoded from it (their only copy); row
    r is the example whose metadata `row` is r. An influence index stores the preconditioned
    vectors `v`, a cosine index (`unit`) the unit vectors `v / ‖v‖`, whose norms `‖v‖` the
    metadata keeps: `preconditioned` gives `v` from either.

    Index it like an array (`v[r]`, `v[a:b]`, `v[[r1, r2]]`): each access decodes only those
    rows, so an index mapped from disk is read only where it is used.
    """

    def __init__(self, index: faiss.Index, metadata: MetadataReader, *, unit: bool):
        self.index = index
        self.metadata = metadata
        self.unit = unit
        self.shape = (index.ntotal, index.d)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        rows = self.rows(key)
        block = self._decode(np.atleast_1d(rows))
        return block if rows.ndim else block[0]

    @property
    def preconditioned(self) -> StoredVectors | VectorsAtNorms:
        """The preconditioned vectors `v [N, D]`, indexed alike."""
        return VectorsAtNorms(self) if self.unit else self

    def rows(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """The rows an array index `key` selects (0-d for a single row); IndexError outside."""
        n = self.shape[0]
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64)
        rows = np.asarray(key, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"rows outside [0, {n})")
        return rows

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        ids = None
        if not isinstance(self.index, faiss.IndexIDMap | faiss.IndexIDMap2):
            ids = self.metadata.ids_and_norms(rows)[0]
        return decode_rows(self.index, rows, ids)


class VectorsAtNorms:
    """A cosine index's preconditioned vectors `v [N, D]` (float32): its stored unit vectors
    times the norms its metadata keeps. Indexed like `StoredVectors`."""

    def __init__(self, stored: StoredVectors):
        self.stored = stored
        self.shape = stored.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        rows = self.stored.rows(key)
        block = self.stored[np.atleast_1d(rows)]
        block *= self.stored.metadata.ids_and_norms(np.atleast_1d(rows))[1][:, None]
        return block if rows.ndim else block[0]
