"""The build's corpus in bounded memory: staged in DuckDB, read back in windows of rows, and a
curvature subsample chosen by example id."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

import indexer.corpus
import indexer.passes
from indexer.config import CorpusConfig
from indexer.corpus import Example, load_corpus, stage_corpus
from indexer.curvature import subsample
from indexer.errors import InvalidInputError
from indexer.passes import fetch
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_staged_corpus_holds_what_load_corpus_reads(tmp_path, tokenizer, small_corpus, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [*small_corpus[:40], {"id": "blank", "text": " "}])
    config = CorpusConfig(str(path))
    expected = load_corpus(config, tokenizer, 32)
    monkeypatch.setattr(indexer.corpus, "DOCUMENT_BATCH", 7)  # several batches of documents
    table = stage_corpus(config, tokenizer, 32, tmp_path / "corpus.duckdb")
    assert (table.n_documents, table.n_empty_skipped) == (41, 1)
    assert len(table) == len(expected.examples)
    assert table.n_tokens == sum(len(e.token_ids) for e in expected.examples)
    rows = [len(table) - 1, 0, 5]
    assert table.fetch(rows) == [expected.examples[r] for r in rows]
    assert fetch(table, range(len(table))) == expected.examples
    assert table.column("id").tolist() == [e.example_id for e in expected.examples]
    table.close()


def test_duplicate_ids_are_found_across_batches(tmp_path, tokenizer, monkeypatch):
    rows = [{"id": str(i % 9), "text": f"text {i}"} for i in range(12)]
    monkeypatch.setattr(indexer.corpus, "DOCUMENT_BATCH", 4)
    with pytest.raises(InvalidInputError, match="duplicate document id '0'"):
        stage_corpus(CorpusConfig(str(write_jsonl(tmp_path / "d.jsonl", rows))), tokenizer, 32,
                     tmp_path / "corpus.duckdb")  # fmt: skip


def test_the_curvature_subsample_is_chosen_by_id():
    ids = list(range(1000, 1100))
    chosen = {ids[r] for r in subsample(ids, 10, seed=0)}
    assert len(chosen) == 10
    # other examples come and go: those chosen before stay chosen unless outranked
    shuffled = [*reversed(ids), *range(5000, 5003)]
    again = {shuffled[r] for r in subsample(shuffled, 13, seed=0)}
    assert chosen <= again
    assert subsample(ids, 200, seed=0) == list(range(100))
    assert {ids[r] for r in subsample(ids, 10, seed=1)} != chosen


def test_a_pass_reads_one_window_at_a_time(monkeypatch):
    """Windows of rows in the given order, each in length order: with one window, exactly the
    batches of a pass sorted by length over all rows."""
    examples = [Example(i, str(i), 0, [1] * (1 + (7 * i) % 5), "", "") for i in range(10)]
    windows = []

    def fetch_window(source, rows):
        windows.append(rows)
        return [source[r] for r in rows]

    monkeypatch.setattr(indexer.passes, "fetch", fetch_window)
    sketcher = SimpleNamespace(run=lambda batch, labels, keep_unprojected, autocast: None)
    example_pass = indexer.passes.ExamplePass(sketcher, examples, 0, 2, seed=0, progress=False)
    monkeypatch.setattr(indexer.passes, "WINDOW_ROWS", 4)
    batches = [rows for rows, _ in example_pass.run(list(range(10)), "data", "test")]
    assert windows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    length = {r: len(examples[r].token_ids) for r in range(10)}
    assert batches == [[0, 3], [1, 2], [5, 6], [4, 7], [8, 9]]  # lengths 1 2, 3 5 | 1 3, 4 5
    monkeypatch.setattr(indexer.passes, "WINDOW_ROWS", 2048)
    batches = [rows for rows, _ in example_pass.run(list(range(10)), "data", "test")]
    flat = [r for rows in batches for r in rows]
    assert flat == sorted(range(10), key=length.get)
