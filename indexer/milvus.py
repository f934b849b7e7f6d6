"""The Milvus backend: each published version's vectors and records in a Milvus collection,
CURRENT and PINNED as collection aliases.

A version is still a directory of ROOT: its manifest, factors and lexical index, which a server
loads, and the FAISS index and DuckDB metadata the build wrote, which the next incremental build
and `eval` read (a server never opens them). Its collection `<prefix>_<version id>` holds, per
example, the vector the version's FAISS index scores, decoded from it (float32, the only vector
type Milvus Lite has), so a FLAT inner-product search in Milvus ranks as FAISS does, and the
fields the engine reads (`ExampleRecord`'s). A build writes the collection, reads it back to
check its rows and checksum, and only then moves the alias; a server resolves the alias to a
version, loads that version's factors from ROOT and searches the version's collection by name,
so an alias switch reaches it as a new version (`server.reload`).

Milvus Lite (a `*.db` path) lets one process at a time open a file: a build and a server that
run at once share one through `milvus-lite server --data-dir FILE` and an http URI, as they
would share any Milvus. Imported only with `--backend milvus` (pymilvus speaks gRPC).
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import duckdb
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState, Status
from pymilvus.exceptions import ConnectError, ErrorCode, MilvusUnavailableException
from tqdm import tqdm

from indexer.config import MILVUS_MAX_VARCHAR, BackendConfig
from indexer.errors import (
    BackendError,
    IndexVerificationError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from indexer.manifest import INDEX_FILE, METADATA_FILE, CollectionRecord, Manifest
from indexer.publish import (
    CURRENT,
    PINNED,
    VERSIONS,
    list_versions,
    new_version_id,
    read_manifest,
)
from indexer.scan import NO_SCORE
from indexer.store import ExampleRecord, MetadataReader, StoredVectors, open_index

VECTOR = "vector"
RECORD_FIELDS = ("id", "row", "doc_id", "chunk", "text", "token_ids", "norm", "exact_norm")
INSERT_BYTES = 16 << 20  # vectors per insert request, well within gRPC's 64 MiB message limit
READ_ROWS = 128  # rows per request when a collection is read back
MAX_NAME = 255  # characters of a collection or alias name (Milvus's limit)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REMOTE = re.compile(r"(https?|tcp|unix)://")
# Milvus Lite's gRPC server (in-process or `milvus-lite server`) keeps gRPC's default ping
# policy, one per 5 minutes: pymilvus's 10 s keepalive has it close the channel during a long
# insert ("too_many_pings").
_KEEPALIVE = {"grpc.keepalive_time_ms": 300_000}
_VERSION_SUFFIX = re.compile(r"\d{8}T\d{12}Z_[0-9a-f]{6}")  # `new_version_id`, '-' as '_'
# Who wrote a collection: the random id of its ROOT, kept in ROOT/ROOT_ID_FILE. Roots that share
# a Milvus (and a prefix) then never take each other's collections for their own.
OWNER_PROPERTY = "influence_index.root"
ROOT_ID_FILE = ".milvus-root-id"
T = TypeVar("T")


class MilvusBackend:
    """A Milvus (or Milvus Lite) holding the collections of the versions of ROOT. Also the
    `indexer.publish.Pointers` of ROOT: CURRENT and PINNED are aliases."""

    def __init__(self, client: MilvusClient, config: BackendConfig, root: Path):
        self.client = _Client(client, config.milvus_uri)
        self.config = config
        self.root = Path(root)
        self.local = not _REMOTE.match(config.milvus_uri)  # a Milvus Lite file

    @classmethod
    def connect(cls, config: BackendConfig, root: Path) -> MilvusBackend:
        """Connect to `config.milvus_uri`; InvalidInputError says in one line why it cannot."""
        uri, prefix = config.milvus_uri, config.collection_prefix
        if not uri:
            raise InvalidInputError(
                "--backend milvus needs --milvus-uri: a Milvus Lite file (*.db) or "
                "http://host:19530"
            )
        if not _NAME.fullmatch(prefix):
            raise InvalidInputError(
                f"--milvus-prefix {prefix!r}: letters, digits and underscores only, "
                "not starting with a digit"
            )
        longest = MAX_NAME - len(cls.collection_of("", new_version_id()))
        if len(prefix) > longest:
            raise InvalidInputError(
                f"--milvus-prefix is {len(prefix)} characters; with a version id a Milvus name "
                f"has at most {MAX_NAME}, so the prefix at most {longest}"
            )
        if not _REMOTE.match(uri):
            if not uri.endswith(".db"):
                raise InvalidInputError(
                    f"--milvus-uri {uri!r} is neither a Milvus Lite file (*.db) nor "
                    "http://host:port"
                )
            if not Path(uri).parent.is_dir():
                raise InvalidInputError(f"--milvus-uri {uri}: {Path(uri).parent} does not exist")
        try:
            client = MilvusClient(uri=uri, timeout=30, grpc_options=_KEEPALIVE)
        except MilvusException as e:
            if _REMOTE.match(uri):  # a server that may be back later: worth a retry
                raise UnavailableError(f"cannot reach Milvus at {uri}: {e.message}") from e
            raise InvalidInputError(
                f"cannot open Milvus at {uri}: {e.message} (is another process using this "
                "Milvus Lite file?)"
            ) from e
        return cls(client, config, root)

    def collection(self, version_id: str) -> str:
        """The name of a version's collection."""
        return self.collection_of(self.config.collection_prefix, version_id)

    @staticmethod
    def collection_of(prefix: str, version_id: str) -> str:
        """Milvus names allow no '-'."""
        return f"{prefix}_{version_id.replace('-', '_')}"

    # -- CURRENT and PINNED (indexer.publish.Pointers) --------------------------------------

    def _alias(self, name: str) -> str:
        return f"{self.config.collection_prefix}_{name.lower()}"

    def _aliases(self) -> list[str]:
        return self.client.list_aliases()["aliases"]

    def read(self, name: str) -> str | None:
        """The version the alias of CURRENT or PINNED names (None: no such alias)."""
        alias = self._alias(name)
        if alias not in self._aliases():
            return None
        collection = self.client.describe_alias(alias)["collection_name"]
        versions = {self.collection(v): v for v in list_versions(self.root)}
        return versions.get(collection, collection)  # an unknown name: NotFoundError later

    def write(self, name: str, version_id: str) -> None:
        """Point the alias of CURRENT or PINNED at the version's collection (one atomic
        operation in Milvus), after checking the collection against the version's manifest."""
        collection = self.check(read_manifest(self.root / VERSIONS / version_id), version_id)
        alias = self._alias(name)
        if alias in self._aliases():
            self.client.alter_alias(collection, alias)
        else:
            self.client.create_alias(collection, alias)

    def clear(self, name: str) -> None:
        alias = self._alias(name)
        if alias in self._aliases():
            self.client.drop_alias(alias)

    def drop(self, version_id: str) -> None:
        """Drop a pruned version's collection."""
        self._drop(self.collection(version_id))

    def claim_prefix(self) -> None:
        """Refuse (InvalidInputError) to build where CURRENT's or PINNED's alias names a
        collection of another ROOT: two roots with one prefix would move each other's aliases."""
        ours = {self.collection(v) for v in list_versions(self.root)}
        for name in (CURRENT, PINNED):
            alias = self._alias(name)
            if alias not in self._aliases():
                continue
            collection = self.client.describe_alias(alias)["collection_name"]
            owner = self._owner(collection)
            if owner == self.root_id() or (owner is None and collection in ours):
                continue
            raise InvalidInputError(
                f"Milvus alias {alias} names {collection}, a collection of another index root: "
                "give each root its own --milvus-prefix (a root made anew in the same place has "
                f"a new id, {ROOT_ID_FILE}: drop the alias to let it take the prefix over)"
            )

    def drop_orphans(self) -> list[str]:
        """Drop this ROOT's collections whose version is not in ROOT (a build killed before
        it published, or after its version was pruned); returns their names."""
        kept = {self.collection(v) for v in list_versions(self.root)}
        prefix = self.config.collection_prefix + "_"
        ours = [
            c
            for c in self.client.list_collections()
            if c.startswith(prefix)
            and _VERSION_SUFFIX.fullmatch(c[len(prefix) :])
            and self._owner(c) == self.root_id()
        ]
        orphans = [c for c in ours if c not in kept]
        for name in orphans:
            self._drop(name)
        return orphans

    def release_unserved(self, previous: str | None) -> list[str]:
        """Release the loaded collections of this ROOT's versions no server should search: all
        but CURRENT's, PINNED's and `previous` (the version servers are moving from); returns
        their names. Loaded collections live in the query nodes' memory; a server that opens
        a released one (a rollback) loads it again."""
        keep = {self.read(CURRENT), self.read(PINNED), previous}
        released = []
        for version in list_versions(self.root):
            name = self.collection(version)
            if version in keep or not self.client.has_collection(name):
                continue
            if self.client.get_load_state(name)["state"] == LoadState.Loaded:
                self.client.release_collection(name)
                released.append(name)
        return released

    def root_id(self) -> str:
        """This ROOT's id, made at its first Milvus build (`OWNER_PROPERTY`)."""
        path = self.root / ROOT_ID_FILE
        try:
            with path.open("x") as f:
                f.write(secrets.token_hex(8) + "\n")
        except FileExistsError:
            pass
        return path.read_text().strip()

    def _owner(self, collection: str) -> str | None:
        """The id of the ROOT that wrote `collection` (None: written before ids were kept)."""
        properties = self.client.describe_collection(collection).get("properties") or {}
        return properties.get(OWNER_PROPERTY)

    def _drop(self, collection: str) -> None:
        if self.client.has_collection(collection):
            self.client.drop_collection(collection)

    # -- writing and checking a version's collection ----------------------------------------

    def write_collection(
        self,
        version_id: str,
        path: Path,
        max_length: int,
        *,
        unit: bool,
        progress: bool = False,
    ) -> CollectionRecord:
        """Write the collection of the version in `path` (staged by a build, or published with
        --backend faiss): each example's stored vector, decoded from the version's FAISS index
        (unit vectors for a cosine index: `unit`), and its metadata row; then read it back and
        check its rows and checksum. Returns what the manifest records."""
        metadata = MetadataReader(path / METADATA_FILE)
        try:
            vectors = StoredVectors(open_index(path / INDEX_FILE), metadata, unit=unit)
            return self._write(version_id, vectors, path, max_length, progress)
        finally:
            metadata.close()

    def _write(
        self,
        version_id: str,
        vectors: StoredVectors,
        path: Path,
        max_length: int,
        progress: bool,
    ) -> CollectionRecord:
        name = self.collection(version_id)
        self.config.check_max_length(max_length)
        self._drop(name)
        self.client.create_collection(
            name,
            schema=self._schema(vectors.shape[1], max_length),
            properties={OWNER_PROPERTY: self.root_id()},
        )
        # Milvus Lite builds indexes at once and lacks the call pymilvus waits with.
        self.client.create_index(name, self._index(), sync=not self.local)
        digests: dict[int, bytes] = {}
        rows_per_insert = max(1, INSERT_BYTES // (4 * vectors.shape[1]))
        bar = tqdm(total=len(vectors), desc="milvus collection", unit="ex", disable=not progress)
        with bar:
            for records in _metadata_rows(path / METADATA_FILE, rows_per_insert):
                block = vectors[[r["row"] for r in records]]
                for record, vector in zip(records, block, strict=True):
                    record[VECTOR] = vector
                    digests[record["id"]] = _row_digest(record)
                self.client.insert(name, records)
                bar.update(len(records))
        self.client.flush(name)
        record = CollectionRecord(name, len(digests), _combined(digests))
        self.verify(record, path)
        return record

    def verify(self, record: CollectionRecord, version: Path) -> None:
        """Read the collection back (the rows of the examples in the metadata of the version
        in `version`): IndexVerificationError unless it holds the recorded number of rows and
        its checksum. A build checks this before it moves an alias; `info --verify` too."""
        self._load(record.name)
        digests: dict[int, bytes] = {}
        con = _metadata(version / METADATA_FILE)
        try:
            wanted = con.execute("SELECT id FROM examples ORDER BY id").fetchnumpy()["id"].tolist()
        finally:
            con.close()
        for start in range(0, len(wanted), READ_ROWS):
            batch = wanted[start : start + READ_ROWS]
            for row in self.client.get(
                record.name, ids=batch, output_fields=[*RECORD_FIELDS, VECTOR]
            ):
                digests[row["id"]] = _row_digest(row)
        rows = self.count(record.name)
        if rows != record.rows or _combined(digests) != record.sha256:
            raise IndexVerificationError(
                f"Milvus collection {record.name} does not hold the {record.rows} rows written "
                f"({rows} rows; row count or checksum differs)"
            )

    def check(self, manifest: Manifest, version_id: str) -> str:
        """The version's collection, after checking that it exists, loaded, with the row count
        its manifest records (the checksum was checked when it was written: reading every
        vector back at each load would cost what the server avoids); IndexVerificationError
        otherwise."""
        record = manifest.collection
        if record is None:
            raise IndexVerificationError(
                f"version {version_id} was built with --backend faiss: it has no Milvus collection"
            )
        if record.name != self.collection(version_id):
            raise IndexVerificationError(
                f"version {version_id} names collection {record.name}, not its own"
            )
        if not self.client.has_collection(record.name):
            raise NotFoundError(f"Milvus has no collection {record.name} (version {version_id})")
        self._load(record.name)
        rows = self.count(record.name)
        if rows != record.rows:
            raise IndexVerificationError(
                f"Milvus collection {record.name} holds {rows} rows, its manifest {record.rows}"
            )
        return record.name

    def count(self, collection: str) -> int:
        found = self.client.query(collection, filter="", output_fields=["count(*)"])
        return int(found[0]["count(*)"])

    def _load(self, collection: str) -> None:
        """Collections are searched once loaded (Milvus releases them when it restarts)."""
        self.client.load_collection(collection)

    def _schema(self, dim: int, max_length: int):
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("row", DataType.INT64)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MILVUS_MAX_VARCHAR)
        schema.add_field("chunk", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=MILVUS_MAX_VARCHAR)
        schema.add_field(
            "token_ids", DataType.ARRAY, element_type=DataType.INT64, max_capacity=max_length
        )
        schema.add_field("norm", DataType.DOUBLE)
        schema.add_field("exact_norm", DataType.DOUBLE, nullable=True)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
        return schema

    def _index(self):
        """Exhaustive inner-product search (FLAT), as the version's flat FAISS index."""
        params = self.client.prepare_index_params()
        params.add_index(field_name=VECTOR, index_type="FLAT", metric_type="IP")
        return params

    # -- what a served engine reads ----------------------------------------------------------

    def searcher(self, collection: str) -> CollectionSearcher:
        return CollectionSearcher(self.client, collection)

    def records(self, collection: str) -> CollectionRecords:
        return CollectionRecords(self, collection)

    def vectors(self, collection: str, shape: tuple[int, int]) -> CollectionVectors:
        return CollectionVectors(self.client, collection, shape)

    def close(self) -> None:
        self.client.close()


def _metadata(path: Path) -> duckdb.DuckDBPyConnection:
    """A version's metadata, read-only; no progress bar on stdout (a query streamed while the
    collection is written runs long enough for DuckDB to draw one)."""
    con = duckdb.connect(str(path), read_only=True)
    con.execute("SET enable_progress_bar = false")
    return con


def _metadata_rows(path: Path, size: int) -> Iterator[list[dict]]:
    """The version's metadata rows (`RECORD_FIELDS`), `size` at a time, in row order."""
    con = _metadata(path)
    try:
        columns = ", ".join(f'"{c}"' for c in RECORD_FIELDS)
        cursor = con.execute(f'SELECT {columns} FROM examples ORDER BY "row"')
        while rows := cursor.fetchmany(size):
            yield [dict(zip(RECORD_FIELDS, r, strict=True)) for r in rows]
    finally:
        con.close()


def _row_digest(row: dict) -> bytes:
    """sha256 of one row as stored: its fields and its float32 vector's bytes."""
    h = hashlib.sha256()
    h.update(struct.pack("<qqq", row["id"], row["row"], row["chunk"]))
    for text in (row["doc_id"], row["text"]):
        encoded = text.encode()
        h.update(struct.pack("<q", len(encoded)) + encoded)
    h.update(np.asarray(row["token_ids"], dtype=np.int64).tobytes())
    exact = row["exact_norm"]
    h.update(struct.pack("<dd?", row["norm"], exact or 0.0, exact is None))
    h.update(np.ascontiguousarray(row[VECTOR], dtype=np.float32).tobytes())
    return h.digest()


def _combined(digests: dict[int, bytes]) -> str:
    """The collection's checksum: sha256 of its rows' digests in id order."""
    h = hashlib.sha256()
    for example_id in sorted(digests):
        h.update(digests[example_id])
    return h.hexdigest()


class _Client:
    """A MilvusClient whose calls raise Milvus's errors as one line that names the URI:
    UnavailableError when Milvus cannot be reached or is overloaded (a reloader reports it,
    the server answers UNAVAILABLE, the CLI exits 1: worth a retry), BackendError otherwise."""

    def __init__(self, client: MilvusClient, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as e:
                if not isinstance(e, MilvusException) and not _is_rpc_error(e):
                    raise
                message = getattr(e, "message", None) or str(e)
                error = UnavailableError if _transient(e) else BackendError
                raise error(f"Milvus at {self._uri}: {message}") from e

        return call


# What a retry may get over: Milvus unreachable, overloaded or slow (pymilvus passes gRPC's
# status codes on, or raises gRPC's own errors).
_TRANSIENT_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def _is_rpc_error(error: Exception) -> bool:
    return type(error).__module__.startswith("grpc")


def _transient(error: Exception) -> bool:
    if isinstance(error, MilvusUnavailableException | ConnectError):
        return True
    code = error.code() if _is_rpc_error(error) else getattr(error, "code", None)
    if getattr(code, "name", None) in _TRANSIENT_CODES:
        return True
    return code in (Status.CONNECT_FAILED, ErrorCode.RATE_LIMIT)


def _searchable(client: _Client, collection: str, call: Callable[[], T]) -> T:
    """`call()`; when it fails because Milvus released the collection (as it does when it
    restarts), the collection is loaded again and `call` tried once more."""
    try:
        return call()
    except (UnavailableError, BackendError):
        if client.get_load_state(collection)["state"] == LoadState.Loaded:
            raise
        client.load_collection(collection)
        return call()


class CollectionSearcher:
    """`indexer.scan.Searcher` over a collection: Milvus's FLAT inner-product search."""

    def __init__(self, client: _Client, collection: str):
        self.client, self.collection = client, collection

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores `[Q, k]` (float32, best first) and ids `[Q, k]` (int64) of each query
        `[Q, D]`'s `k` best inner products, as FAISS gives them (-FLT_MAX and -1 past the
        last row)."""
        scores = np.full((len(queries), k), NO_SCORE, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        found = _searchable(
            self.client,
            self.collection,
            lambda: self.client.search(
                self.collection,
                data=[np.asarray(q, dtype=np.float32) for q in queries],
                limit=k,
                anns_field=VECTOR,
                search_params={"metric_type": "IP"},
                output_fields=["id"],  # no output fields means all of them, vectors too
            ),
        )
        for row, hits in enumerate(found):
            ids[row, : len(hits)] = [hit["id"] for hit in hits]
            scores[row, : len(hits)] = [hit["distance"] for hit in hits]
        return scores, ids


class CollectionRecords:
    """The engine's `MetadataReader` over a collection: records by example id."""

    def __init__(self, backend: MilvusBackend, collection: str):
        self.backend, self.collection = backend, collection

    def lookup(self, ids: list[int]) -> dict[int, ExampleRecord]:
        if not ids:
            return {}
        client = self.backend.client
        found = _searchable(
            client,
            self.collection,
            lambda: client.get(self.collection, ids=list(ids), output_fields=list(RECORD_FIELDS)),
        )
        return {r["id"]: ExampleRecord(*(r[f] for f in RECORD_FIELDS)) for r in found}

    def count(self) -> int:
        client = self.backend.client
        return _searchable(client, self.collection, lambda: self.backend.count(self.collection))

    def close(self) -> None:
        """Nothing to release: the backend's client serves every version."""


class CollectionVectors:
    """The stored vectors `[N, D]` (float32) of a collection by metadata row, as
    `StoredVectors` gives them (`v[[r1, r2, ...]]`)."""

    def __init__(self, client: _Client, collection: str, shape: tuple[int, int]):
        self.client, self.collection, self.shape = client, collection, shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        wanted = [int(r) for r in rows]
        out = np.zeros((len(wanted), self.shape[1]), dtype=np.float32)
        if not wanted:
            return out
        found = _searchable(
            self.client,
            self.collection,
            lambda: self.client.query(
                self.collection,
                filter=f"row in {sorted(set(wanted))}",
                output_fields=["row", VECTOR],
            ),
        )
        by_row = {r["row"]: r[VECTOR] for r in found}
        missing = [r for r in wanted if r not in by_row]
        if missing:
            raise IndexError(f"rows {missing[:10]} are not in collection {self.collection}")
        for k, r in enumerate(wanted):
            out[k] = by_row[r]
        return out
