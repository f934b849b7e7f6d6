"""Corpus reading through DuckDB: formats, globs, chunking, stable ids, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from transformers import AutoTokenizer

from indexer.config import CorpusConfig
from indexer.corpus import example_id, load_corpus, special_prefix
from indexer.errors import InvalidInputError
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_jsonl_csv_and_parquet_read_alike(tmp_path, tokenizer, small_corpus):
    rows = small_corpus[:5]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with duckdb.connect() as con:
        con.execute("CREATE TABLE t (id VARCHAR, text VARCHAR)")
        con.executemany("INSERT INTO t VALUES (?, ?)", [(r["id"], r["text"]) for r in rows])
        con.execute(f"COPY t TO '{tmp_path / 'b.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY t TO '{tmp_path / 'c.csv'}' (HEADER)")
    loaded = [
        [
            (e.example_id, e.doc_id, e.chunk, e.token_ids, e.text, Path(e.source).name)
            for e in load_corpus(CorpusConfig(str(tmp_path / name)), tokenizer, 64).examples
        ]
        for name in ("a.jsonl", "b.parquet", "c.csv")
    ]
    assert [e[:5] for e in loaded[0]] == [e[:5] for e in loaded[1]] == [e[:5] for e in loaded[2]]
    assert list(dict.fromkeys(e[1] for e in loaded[0])) == [r["id"] for r in rows]
    assert {e[5] for e in loaded[1]} == {"b.parquet"}


def test_glob_reads_every_file_in_order(tmp_path, tokenizer, small_corpus):
    write_jsonl(tmp_path / "part-1.jsonl", small_corpus[2:4])
    write_jsonl(tmp_path / "part-0.jsonl", small_corpus[:2])
    corpus = load_corpus(CorpusConfig(str(tmp_path / "part-*.jsonl")), tokenizer, 64)
    assert list(dict.fromkeys(e.doc_id for e in corpus.examples)) == [
        r["id"] for r in small_corpus[:4]
    ]


def test_long_documents_are_chunked_not_dropped(tmp_path, tokenizer, small_corpus):
    longest = max(small_corpus, key=lambda d: len(d["text"]))
    write_jsonl(tmp_path / "long.jsonl", [longest])
    examples = load_corpus(CorpusConfig(str(tmp_path / "long.jsonl")), tokenizer, 32).examples
    body = tokenizer(longest["text"], add_special_tokens=False)["input_ids"]
    prefix = special_prefix(tokenizer)
    assert len(examples) > 1
    assert all(len(e.token_ids) <= 32 and e.token_ids[: len(prefix)] == prefix for e in examples)
    assert [t for e in examples for t in e.token_ids[len(prefix) :]] == body
    assert [e.chunk for e in examples] == list(range(len(examples)))
    assert examples[1].example_id == example_id(longest["id"], 1)


def test_empty_texts_are_skipped_and_counted(tmp_path, tokenizer, small_corpus):
    write_jsonl(tmp_path / "c.jsonl", [*small_corpus[:3], {"id": "blank", "text": "  "}])
    corpus = load_corpus(CorpusConfig(str(tmp_path / "c.jsonl")), tokenizer, 256)
    assert (corpus.n_documents, corpus.n_empty_skipped, len(corpus.examples)) == (4, 1, 3)


@pytest.mark.parametrize(
    ("rows", "config_kwargs", "message"),
    [
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], {}, "duplicate document id 'a'"),
        ([{"key": "a", "text": "x"}], {}, "no column 'id'"),
        ([{"id": "a", "body": "x"}], {}, "no column 'text'"),
        ([{"id": "a", "body": "x"}], {"text_column": "body", "id_column": "nope"}, "'nope'"),
        ([{"id": "a", "text": ""}], {}, "no non-empty texts"),
    ],
)
def test_bad_corpora_name_the_problem(tmp_path, tokenizer, rows, config_kwargs, message):
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidInputError, match=message):
        load_corpus(CorpusConfig(str(tmp_path / "bad.jsonl"), **config_kwargs), tokenizer, 64)


SAMPLED = 30_000  # rows past DuckDB's schema sample (20,480 by default)


@pytest.mark.parametrize(
    ("last", "message"),
    [
        ('{"id": "x", "text": ', "Malformed JSON"),
        ('{"id": "y", "text": "c", "other": 1}', 'unknown key "other"'),
        ('{"id": "abc", "text": "c"}', "Failed to cast"),
    ],
)
def test_a_bad_row_past_the_schema_sample_is_one_line_naming_it(tmp_path, tokenizer, last, message):
    path = tmp_path / "late.jsonl"
    numeric = "cast" in message  # integer ids, then one that is not
    rows = [json.dumps({"id": i if numeric else f"d{i}", "text": "a b"}) for i in range(SAMPLED)]
    path.write_text("\n".join([*rows, last]) + "\n")
    with pytest.raises(InvalidInputError, match=f"cannot read corpus {path}") as error:
        load_corpus(CorpusConfig(str(path)), tokenizer, 64)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_ids_of_mixed_types_are_their_text(tmp_path, tokenizer):
    """DuckDB types a key with string and number values as JSON: the ids are still their
    values' text, not JSON with quotes."""
    write_jsonl(tmp_path / "mixed.jsonl", [{"id": "doc-1", "text": "x y"}, {"id": 7, "text": "z"}])
    corpus = load_corpus(CorpusConfig(str(tmp_path / "mixed.jsonl")), tokenizer, 64)
    assert [e.doc_id for e in corpus.examples] == ["doc-1", "7"]
    write_jsonl(tmp_path / "same.jsonl", [{"id": "7", "text": "x y"}, {"id": 7, "text": "z"}])
    with pytest.raises(InvalidInputError, match="duplicate document id '7'"):
        load_corpus(CorpusConfig(str(tmp_path / "same.jsonl")), tokenizer, 64)


def test_a_file_whose_name_holds_glob_characters_is_read(tmp_path, tokenizer):
    """`corpus[1].jsonl` was read as a pattern matching `corpus1.jsonl`: "matches no files"."""
    path = write_jsonl(tmp_path / "corpus[1].jsonl", [{"id": "a", "text": "x y"}])
    assert [e.doc_id for e in load_corpus(CorpusConfig(str(path)), tokenizer, 64).examples] == ["a"]


def test_path_matching_nothing(tmp_path, tokenizer):
    with pytest.raises(InvalidInputError, match="matches no files"):
        load_corpus(CorpusConfig(str(tmp_path / "none-*.jsonl")), tokenizer, 64)


def test_framing_tokens_surround_every_document(tmp_path, tokenizer, small_corpus):
    longest = max(small_corpus, key=lambda d: len(d["text"]))
    write_jsonl(tmp_path / "long.jsonl", [longest, small_corpus[0]])
    separator = tokenizer.eos_token
    config = CorpusConfig(
        str(tmp_path / "long.jsonl"), prefix_tokens=(separator,), suffix_tokens=(separator,)
    )
    examples = load_corpus(config, tokenizer, 32).examples
    eos = tokenizer.eos_token_id
    assert all(len(e.token_ids) <= 32 and e.token_ids[0] == eos for e in examples)
    last_chunks = [
        e for e in examples if e.chunk == max(x.chunk for x in examples if x.doc_id == e.doc_id)
    ]
    assert len(last_chunks) == 2 and all(e.token_ids[-1] == eos for e in last_chunks)
    with pytest.raises(InvalidInputError, match="not in the tokenizer's vocabulary"):
        load_corpus(replace(config, prefix_tokens=("<no such token>",)), tokenizer, 32)


def test_a_staged_corpus_prints_no_progress_bar(tmp_path, tiny_model_dir, small_corpus):
    """DuckDB prints a progress bar to stdout for any query past 2 s (a loaded machine's lookup
    in the staged corpus): into a build's `--json` output, which then did not parse. Checked in
    a process of its own: under pytest DuckDB starts without the bar."""
    write_jsonl(tmp_path / "a.jsonl", small_corpus[:5])
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from transformers import AutoTokenizer\n"
        "from indexer.config import CorpusConfig\n"
        "from indexer.corpus import stage_corpus\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "staged = stage_corpus(CorpusConfig(sys.argv[1]), tokenizer, 64, Path(sys.argv[3]))\n"
        "print(staged.con.execute(\"SELECT current_setting('enable_progress_bar')\").fetchone()[0])"
    )
    arguments = [str(tmp_path / "a.jsonl"), str(tiny_model_dir), str(tmp_path / "staged")]
    found = subprocess.run(
        [sys.executable, "-c", code, *arguments], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "False"
