"""Lexical candidates: a BM25 index over the examples' texts, built into a version.

For facts stated in other words than asked, a lexical filter finds documents the gradient
sketch misses (Grosse et al. 2023 used TF-IDF the same way); exact re-ranking then orders the
union of both candidate sets. The index is bm25s's sparse matrices, memory-mapped when served.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np

from indexer.errors import InvalidInputError

IDS_FILE = "ids.npy"  # example id of each BM25 document, in index order
_STOPWORDS = "en"


def _tokenize(texts: Sequence[str]) -> bm25s.tokenization.Tokenized:
    return bm25s.tokenize(list(texts), stopwords=_STOPWORDS, show_progress=False)


def write_lexical_index(texts: Sequence[str], ids: np.ndarray, directory: Path) -> None:
    """Index `texts [N]` (one per example, ids `[N]`) into `directory`, which must not exist.
    InvalidInputError when no text has a word to index (all stopwords or punctuation)."""
    tokenized = _tokenize(texts)
    if not tokenized.vocab:
        raise InvalidInputError(
            "the corpus has no word a lexical index could match (only stopwords and "
            "punctuation): build with --lexical-index off"
        )
    retriever = bm25s.BM25()
    retriever.index(tokenized, show_progress=False)
    directory.mkdir()
    retriever.save(str(directory))
    np.save(directory / IDS_FILE, np.asarray(ids, dtype=np.int64))


class LexicalIndex:
    """A version's BM25 index, memory-mapped; safe to search from one thread at a time."""

    def __init__(self, directory: Path):
        self._retriever = bm25s.BM25.load(str(directory), mmap=True)
        self._ids = np.load(directory / IDS_FILE, mmap_mode="r")

    def search(self, texts: Sequence[str], k: int) -> list[list[int]]:
        """Example ids of the best `k` matches of each text (those with a positive score)."""
        k = min(k, len(self._ids))
        results = self._retriever.retrieve(_tokenize(texts), k=k, show_progress=False)
        return [
            [int(self._ids[row]) for row, score in zip(rows, scores, strict=True) if score > 0]
            for rows, scores in zip(results.documents, results.scores, strict=True)
        ]
