"""Reading a corpus with DuckDB and cutting it into indexed examples (token chunks)."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
from transformers import PreTrainedTokenizerBase

from indexer.config import CorpusConfig
from indexer.errors import InvalidInputError
from indexer.hashing import int63

log = logging.getLogger(__name__)

DOCUMENT_BATCH = 1024  # documents read, tokenized and chunked at a time

_READERS = {
    ".jsonl": "read_json(?, format='newline_delimited', filename=true)",
    ".ndjson": "read_json(?, format='newline_delimited', filename=true)",
    ".json": "read_json(?, filename=true)",
    ".parquet": "read_parquet(?, filename=true)",
    ".csv": "read_csv(?, filename=true, header=true)",
    ".tsv": "read_csv(?, filename=true, header=true, delim='\t')",
}


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str


@dataclass(frozen=True)
class Example:
    """One indexed training sequence: a chunk of a document, at most `max_length` tokens."""

    example_id: int
    doc_id: str
    chunk: int
    token_ids: list[int]
    text: str
    source: str


@dataclass
class Corpus:
    examples: list[Example]
    n_documents: int
    n_empty_skipped: int


def example_id(doc_id: str, chunk: int) -> int:
    """A stable non-negative int63 id: the same document chunk keeps its id across rebuilds."""
    return int63(doc_id, chunk)


def content_hash(token_ids: list[int]) -> int:
    """A non-negative int63 of an example's token sequence (framing included): all its stored
    vector depends on besides the model and the build's settings, so an example whose hash is
    unchanged keeps its vector in an incremental build."""
    tokens = np.asarray(token_ids, dtype="<i4").tobytes()
    return int.from_bytes(hashlib.blake2b(tokens, digest_size=8).digest(), "big") >> 1


def _matching_files(pattern: str) -> list[Path]:
    """The corpus files: `pattern` itself when it names a file (whose name may hold glob
    characters, `[1]`), else the files its glob matches."""
    if Path(pattern).is_file():
        files = [Path(pattern)]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise InvalidInputError(f"corpus path matches no files: {pattern}")
    unknown = sorted({f.suffix for f in files if f.suffix.lower() not in _READERS})
    if unknown:
        raise InvalidInputError(
            f"unsupported corpus file type {', '.join(unknown)} (use JSONL, Parquet or CSV)"
        )
    nonempty = [f for f in files if f.stat().st_size > 0]
    if not nonempty:
        raise InvalidInputError(f"corpus is empty: {pattern}")
    return nonempty


def _relations(
    con: duckdb.DuckDBPyConnection, files: list[Path], config: CorpusConfig
) -> list[tuple[str, list[str]]]:
    """One `SELECT doc_id, text, source` per file type, with its parameter (the paths); the
    columns are checked first."""
    by_type: dict[str, list[Path]] = {}
    for f in files:
        by_type.setdefault(f.suffix.lower(), []).append(f)
    relations = []
    for group in by_type.values():
        reader = _READERS[group[0].suffix.lower()]
        paths = [str(f) for f in group]
        try:
            described = con.execute(f"DESCRIBE SELECT * FROM {reader}", [paths]).fetchall()
        except duckdb.Error as e:
            raise _unreadable(group[0], e) from e
        types = {row[0]: row[1] for row in described}
        columns = sorted(types)
        for column, flag in (
            (config.id_column, "--id-column"),
            (config.text_column, "--text-column"),
        ):
            if column not in columns:
                raise InvalidInputError(
                    f"corpus has no column {column!r} (set {flag}); it has: {', '.join(columns)}"
                )
        doc_id = _as_text(config.id_column, types[config.id_column])
        text = _as_text(config.text_column, types[config.text_column])
        query = f"SELECT {doc_id} AS doc_id, {text} AS text, filename AS source FROM {reader}"
        relations.append((query, paths))
    return relations


def _as_text(column: str, column_type: str) -> str:
    """SQL for a column's values as text. DuckDB types a JSON key whose values mix types (ids
    1 and "a") as JSON, and casting that would keep each string's quotes: its values' text is
    extracted instead."""
    if column_type == "JSON":
        return f"json_extract_string(\"{column}\", '$')"
    return f'CAST("{column}" AS VARCHAR)'


def _unreadable(source: object, error: duckdb.Error) -> InvalidInputError:
    """One line naming the file and DuckDB's reason (its first line: the rest quotes SQL)."""
    return InvalidInputError(f"cannot read corpus {source}: {str(error).splitlines()[0]}")


def _check_ids(
    con: duckdb.DuckDBPyConnection, relations: list[tuple[str, list[str]]], id_column: str
) -> None:
    """Every document has an id and no two share one (checked by DuckDB, out of core)."""
    union = " UNION ALL ".join(f"({query})" for query, _ in relations)
    params = [paths for _, paths in relations]
    missing = con.execute(
        f"SELECT source FROM ({union}) WHERE doc_id IS NULL LIMIT 1", params
    ).fetchone()
    if missing:
        raise InvalidInputError(f"corpus row in {missing[0]} has no {id_column!r}")
    duplicate = con.execute(
        f"SELECT doc_id, min(source) FROM ({union}) GROUP BY doc_id HAVING count(*) > 1 "
        "ORDER BY doc_id LIMIT 1",
        params,
    ).fetchone()
    if duplicate:
        raise InvalidInputError(
            f"duplicate document id {duplicate[0]!r} in corpus ({duplicate[1]})"
        )


def connect(path: str = ":memory:", *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection without its progress bar: DuckDB prints it to stdout, where `--json`
    output goes, for any query past 2 seconds (a loaded machine's lookup in a staged corpus)."""
    con = duckdb.connect(path, read_only=read_only)
    con.execute("SET enable_progress_bar = false")
    return con


def document_batches(config: CorpusConfig) -> Iterator[list[Document]]:
    """All rows of all matching files, in file then row order, `DOCUMENT_BATCH` at a time:
    never the whole corpus in memory. Ids must be present and unique."""
    files = _matching_files(config.data)
    con = connect()
    relations = _relations(con, files, config)
    try:
        _check_ids(con, relations, config.id_column)
    except duckdb.Error as e:
        raise _unreadable(config.data, e) from e
    empty = True
    for query, paths in relations:
        try:
            cursor = con.execute(query, [paths])
            while rows := cursor.fetchmany(DOCUMENT_BATCH):
                empty = False
                yield [Document(doc_id, text or "", source) for doc_id, text, source in rows]
        except duckdb.Error as e:
            raise _unreadable(paths[0] if len(paths) == 1 else config.data, e) from e
    if empty:
        raise InvalidInputError(f"corpus is empty: {config.data}")


@dataclass(frozen=True)
class Framing:
    """Token ids around every sequence: `prefix` starts each example and each query's prompt,
    `suffix` ends each document's last chunk."""

    prefix: list[int]
    suffix: list[int]


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. BOS)."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def framing(tokenizer: PreTrainedTokenizerBase, config: CorpusConfig) -> Framing:
    """The framing `config` asks for; InvalidInputError names a token the vocabulary lacks."""
    prefix = (
        special_prefix(tokenizer)
        if config.prefix_tokens is None
        else _token_ids(tokenizer, config.prefix_tokens)
    )
    return Framing(prefix, _token_ids(tokenizer, config.suffix_tokens))


def _token_ids(tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, ...]) -> list[int]:
    vocabulary = tokenizer.get_vocab()
    unknown = [t for t in tokens if t not in vocabulary]
    if unknown:
        raise InvalidInputError(f"token {unknown[0]!r} is not in the tokenizer's vocabulary")
    return [vocabulary[t] for t in tokens]


def chunk_document(
    doc: Document, body: list[int], frame: Framing, max_length: int, tokenizer
) -> list[Example]:
    """Split a document's tokens into chunks of at most `max_length` tokens, framing included:
    every chunk starts with the prefix, the last one ends with the suffix."""
    step = max_length - len(frame.prefix) - len(frame.suffix)
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    examples = []
    for chunk, piece in enumerate(pieces):
        text = doc.text if len(pieces) == 1 else tokenizer.decode(piece)
        end = frame.suffix if chunk == len(pieces) - 1 else []
        examples.append(
            Example(
                example_id(doc.doc_id, chunk),
                doc.doc_id,
                chunk,
                frame.prefix + piece + end,
                text,
                doc.source,
            )
        )
    return examples


class ExampleReader:
    """Reads a corpus a batch of documents at a time and cuts each into examples (tokenized,
    chunked, framed), counting documents, skipped empty texts, examples and tokens."""

    def __init__(self, config: CorpusConfig, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.frame = framing(tokenizer, config)
        if max_length <= len(self.frame.prefix) + len(self.frame.suffix):
            raise InvalidInputError(f"--max-length {max_length} leaves no room for text tokens")
        self.n_documents = self.n_empty_skipped = self.n_examples = self.n_tokens = 0

    def batches(self) -> Iterator[list[Example]]:
        """Examples in corpus order. Empty texts are skipped and counted, never silently
        dropped; a corpus without text is an InvalidInputError once read."""
        for documents in document_batches(self.config):
            kept = [d for d in documents if d.text.strip()]
            self.n_documents += len(documents)
            self.n_empty_skipped += len(documents) - len(kept)
            if not kept:
                continue
            bodies = self.tokenizer(
                [d.text for d in kept], add_special_tokens=False, verbose=False
            )["input_ids"]
            examples = [
                ex
                for doc, body in zip(kept, bodies, strict=True)
                for ex in chunk_document(doc, body, self.frame, self.max_length, self.tokenizer)
            ]
            self.n_examples += len(examples)
            self.n_tokens += sum(len(e.token_ids) for e in examples)
            yield examples
        if not self.n_examples:
            raise InvalidInputError(f"corpus has no non-empty texts: {self.config.data}")
        if self.n_empty_skipped:
            log.warning("skipped %d documents with empty text", self.n_empty_skipped)


_COLLISION = "example id collision (two document chunks hash to one id)"


def load_corpus(
    config: CorpusConfig, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Corpus:
    """Read, tokenize and chunk the whole corpus into memory (for small corpora: evaluation,
    exact scoring; the build stages it on disk with `stage_corpus`)."""
    reader = ExampleReader(config, tokenizer, max_length)
    examples = [ex for batch in reader.batches() for ex in batch]
    if len({e.example_id for e in examples}) != len(examples):
        raise InvalidInputError(_COLLISION)
    return Corpus(examples, reader.n_documents, reader.n_empty_skipped)


# The staged examples table: what `Example` holds, its row and its content hash.
STAGED_COLUMNS = {
    "row": "INTEGER",
    "id": "BIGINT",
    "doc_id": "VARCHAR",
    "chunk": "INTEGER",
    "text": "VARCHAR",
    "n_tokens": "INTEGER",
    "token_ids": "INTEGER[]",
    "content_hash": "BIGINT",
    "source": "VARCHAR",
}


def stage_corpus(
    config: CorpusConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, path: Path
) -> ExampleTable:
    """Read, tokenize and chunk the corpus into a DuckDB file at `path`, one batch of documents
    at a time (through a JSONL file DuckDB bulk-loads): the build's corpus, in bounded memory."""
    reader = ExampleReader(config, tokenizer, max_length)
    scratch = path.with_name(path.name + ".jsonl")
    with scratch.open("w") as f:
        row = 0
        for batch in reader.batches():
            for ex in batch:
                record = {
                    "row": row, "id": ex.example_id, "doc_id": ex.doc_id, "chunk": ex.chunk,
                    "text": ex.text, "n_tokens": len(ex.token_ids), "token_ids": ex.token_ids,
                    "content_hash": content_hash(ex.token_ids), "source": ex.source,
                }  # fmt: skip
                f.write(json.dumps(record) + "\n")
                row += 1
    con = connect(str(path))
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in STAGED_COLUMNS.items()) + "}"
    con.execute(
        "CREATE TABLE examples AS SELECT * FROM "
        f"read_json(?, format='newline_delimited', columns={columns})",
        [str(scratch)],
    )
    scratch.unlink()
    if con.execute("SELECT id FROM examples GROUP BY id HAVING count(*) > 1 LIMIT 1").fetchone():
        raise InvalidInputError(_COLLISION)
    return ExampleTable(con, reader.n_documents, reader.n_empty_skipped, reader.n_tokens)


class ExampleTable:
    """A corpus's examples staged in DuckDB (`stage_corpus`), read back a window of rows at a
    time; row r is the r-th example in corpus order."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, n_documents: int, n_empty_skipped: int, n_tokens: int
    ):
        self.con = con
        self.n_documents = n_documents
        self.n_empty_skipped = n_empty_skipped
        self.n_tokens = n_tokens
        self._n = con.execute("SELECT count(*) FROM examples").fetchone()[0]

    def __len__(self) -> int:
        return self._n

    def fetch(self, rows: Sequence[int]) -> list[Example]:
        """The examples of `rows`, in that order."""
        rows = [int(r) for r in rows]
        if not rows:
            return []
        found = self.con.execute(
            'SELECT "row", id, doc_id, chunk, token_ids, text, source FROM examples '
            'WHERE "row" BETWEEN ? AND ? AND "row" IN (SELECT UNNEST(?::INTEGER[]))',
            [min(rows), max(rows), rows],
        ).fetchall()
        by_row = {r[0]: Example(r[1], r[2], r[3], list(r[4]), r[5], r[6]) for r in found}
        return [by_row[r] for r in rows]

    def column(self, name: str) -> np.ndarray:
        """A whole column `[N]` in row order (numbers: a few bytes per example)."""
        return self.con.execute(f'SELECT "{name}" FROM examples ORDER BY "row"').fetchnumpy()[name]

    def longest_bytes(self, names: Sequence[str]) -> dict[str, int]:
        """The longest value of each text column, in UTF-8 bytes."""
        lengths = ", ".join(f'coalesce(max(strlen("{name}")), 0)' for name in names)
        found = self.con.execute(f"SELECT {lengths} FROM examples").fetchone()
        return dict(zip(names, (int(n) for n in found), strict=True))

    def texts(self) -> list[str]:
        """Every example's text, in row order (for the BM25 index, which holds them anyway)."""
        return [
            r[0] for r in self.con.execute('SELECT text FROM examples ORDER BY "row"').fetchall()
        ]

    def close(self) -> None:
        self.con.close()
