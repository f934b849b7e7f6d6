"""Fast checks of the demo corpus, tokenizer and model cache (no full-size training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from indexer.demo.corpus import DemoCorpus, generate_corpus, write_corpus
from indexer.demo.train import (
    MARKER_NAME,
    DemoTrainingConfig,
    collate,
    encode_windows,
    ensure_demo_model,
    save_tokenizer,
    settings_hash,
    train_tokenizer,
)

TINY = DemoTrainingConfig(
    n_entities=2,
    vocab_size=300,
    n_layer=1,
    n_embd=32,
    n_head=2,
    n_positions=64,
    epochs=1,
    batch_size=64,
)


@pytest.fixture(scope="module")
def corpus() -> DemoCorpus:
    return generate_corpus(seed=0)


def test_corpus_is_deterministic(corpus: DemoCorpus) -> None:
    assert generate_corpus(seed=0) == corpus


def test_other_seed_invents_other_entities(corpus: DemoCorpus) -> None:
    other = generate_corpus(seed=1)
    assert not {q["prompt"] for q in corpus.queries} & {q["prompt"] for q in other.queries}


def test_corpus_size_and_ids(corpus: DemoCorpus) -> None:
    doc_ids = [d["id"] for d in corpus.documents]
    query_ids = [q["id"] for q in corpus.queries]
    assert 1500 <= len(doc_ids) <= 3000
    assert len(query_ids) >= 40
    assert len(set(doc_ids)) == len(doc_ids)
    assert len(set(query_ids)) == len(query_ids)
    assert sum(len(d["text"]) > 1500 for d in corpus.documents) >= 5


def test_gold_documents_state_the_fact(corpus: DemoCorpus) -> None:
    texts = {d["id"]: d["text"] for d in corpus.documents}
    for q in corpus.queries:
        assert q["completion"].startswith(" ") and not q["prompt"].endswith(" ")
        assert len(q["gold"]) >= 3
        for doc_id in q["gold"]:
            assert q["completion"].strip() in texts[doc_id]
        assert any(q["prompt"] + q["completion"] in texts[doc_id] for doc_id in q["gold"])


def test_write_corpus_round_trips(corpus: DemoCorpus, tmp_path: Path) -> None:
    corpus_path, queries_path = write_corpus(corpus, tmp_path)
    docs = [json.loads(line) for line in corpus_path.read_text().splitlines()]
    queries = [json.loads(line) for line in queries_path.read_text().splitlines()]
    assert DemoCorpus(docs, queries) == corpus


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(corpus: DemoCorpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [d["text"] for d in corpus.documents[:200]]
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(texts, vocab_size=300, max_length=64), directory)
    return directory


def test_tokenizer_prepends_bos_only_with_special_tokens(tiny_tokenizer_dir: Path) -> None:
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tok.bos_token_id == tok.eos_token_id is not None
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.bos_token_id
    plain = tok("The capital of Zorbania is", add_special_tokens=False)["input_ids"]
    special = tok("The capital of Zorbania is", add_special_tokens=True)["input_ids"]
    assert special == [tok.bos_token_id, *plain]
    assert tok.bos_token_id not in plain and tok.pad_token_id not in plain
    assert tok.decode(plain) == "The capital of Zorbania is"


def test_prompt_and_completion_tokens_concatenate(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prompt = tok("The capital of Zorbania is")["input_ids"]
    completion = tok(" Quellport", add_special_tokens=False)["input_ids"]
    assert tok("The capital of Zorbania is Quellport")["input_ids"] == prompt + completion


def test_windows_cover_long_text_and_padding_is_masked(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = " ".join(["The ferry did not sail because of the wind."] * 40)
    windows = encode_windows(tok, [text, "Short."], window=64)
    full = tok(text)["input_ids"]
    assert all(len(w) <= 64 for w in windows)
    assert [i for w in windows[:-1] for i in w] == full and windows[0][0] == tok.bos_token_id
    batch = collate(windows[-2:], tok.pad_token_id)
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == -100).all()
    assert (batch["input_ids"][padded] == tok.pad_token_id).all()


def test_settings_hash_tracks_config() -> None:
    assert settings_hash(0, TINY) == settings_hash(0, TINY)
    assert settings_hash(0, TINY) != settings_hash(1, TINY)
    assert settings_hash(0, TINY) != settings_hash(0, DemoTrainingConfig())


def test_tiny_model_is_built_once_then_reused(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path, progress=False, config=TINY)
    files = {p.name for p in first.model_dir.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert json.loads((first.model_dir.parent / MARKER_NAME).read_text())["settings_hash"]
    assert [p.name for p in tmp_path.iterdir()] == [first.model_dir.parent.name]
    weights_mtime = (first.model_dir / "model.safetensors").stat().st_mtime_ns
    again = ensure_demo_model(tmp_path, progress=False, config=TINY)
    assert again == first
    assert (again.model_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_unfinished_build_is_not_reused(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path, progress=False, config=TINY)
    (first.model_dir.parent / MARKER_NAME).unlink()
    rebuilt = ensure_demo_model(tmp_path, progress=False, config=TINY)
    assert (rebuilt.model_dir.parent / MARKER_NAME).exists()
    assert rebuilt.model_dir.joinpath("model.safetensors").exists()
