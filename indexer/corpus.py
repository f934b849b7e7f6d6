"""Reading a corpus with DuckDB and cutting it into indexed examples (token chunks)."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import duckdb
from transformers import PreTrainedTokenizerBase

from indexer.config import CorpusConfig
from indexer.errors import InvalidInputError
from indexer.hashing import int63

log = logging.getLogger(__name__)

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


def _matching_files(pattern: str) -> list[Path]:
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


def _read_files(
    con: duckdb.DuckDBPyConnection, files: list[Path], config: CorpusConfig
) -> list[tuple]:
    reader = _READERS[files[0].suffix.lower()]
    paths = [str(f) for f in files]
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {reader}", [paths]).fetchall()
    except duckdb.Error as e:
        raise InvalidInputError(f"cannot read corpus {files[0]}: {e}") from e
    columns = sorted(row[0] for row in described)
    for column, flag in ((config.id_column, "--id-column"), (config.text_column, "--text-column")):
        if column not in columns:
            raise InvalidInputError(
                f"corpus has no column {column!r} (set {flag}); it has: {', '.join(columns)}"
            )
    query = (
        f'SELECT CAST("{config.id_column}" AS VARCHAR), CAST("{config.text_column}" AS VARCHAR), '
        f"filename FROM {reader}"
    )
    return con.execute(query, [paths]).fetchall()


def read_documents(config: CorpusConfig) -> list[Document]:
    """All rows of all matching files, in file then row order. Ids must be present and unique."""
    files = _matching_files(config.data)
    by_type: dict[str, list[Path]] = {}
    for f in files:
        by_type.setdefault(f.suffix.lower(), []).append(f)
    con = duckdb.connect()
    rows = [row for group in by_type.values() for row in _read_files(con, group, config)]
    documents, seen = [], set()
    for doc_id, text, source in rows:
        if doc_id is None:
            raise InvalidInputError(f"corpus row in {source} has no {config.id_column!r}")
        if doc_id in seen:
            raise InvalidInputError(f"duplicate document id {doc_id!r} in corpus ({source})")
        seen.add(doc_id)
        documents.append(Document(doc_id, text or "", source))
    if not documents:
        raise InvalidInputError(f"corpus is empty: {config.data}")
    return documents


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


def load_corpus(
    config: CorpusConfig, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Corpus:
    """Read, tokenize and chunk. Empty texts are skipped and counted, never silently dropped."""
    documents = read_documents(config)
    frame = framing(tokenizer, config)
    if max_length <= len(frame.prefix) + len(frame.suffix):
        raise InvalidInputError(f"--max-length {max_length} leaves no room for text tokens")
    kept = [d for d in documents if d.text.strip()]
    if not kept:
        raise InvalidInputError(f"corpus has no non-empty texts: {config.data}")
    bodies = tokenizer([d.text for d in kept], add_special_tokens=False, verbose=False)["input_ids"]
    examples = [
        ex
        for doc, body in zip(kept, bodies, strict=True)
        for ex in chunk_document(doc, body, frame, max_length, tokenizer)
    ]
    ids = [e.example_id for e in examples]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("example id collision (two document chunks hash to one id)")
    skipped = len(documents) - len(kept)
    if skipped:
        log.warning("skipped %d documents with empty text", skipped)
    return Corpus(examples, len(documents), skipped)
