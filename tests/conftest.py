"""Shared fixtures: a tiny model directory built in the test session, and the demo artefacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from indexer.demo.corpus import generate_corpus
from indexer.demo.train import DemoTrainingConfig, build_model, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole suite: fastest for its tiny models, and far faster on a
    machine shared with other work, where two threads wait on each other (the demo's eval
    took minutes instead of seconds beside another job on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_corpus() -> list[dict]:
    """The first documents of the demo corpus, plus its longest one (to exercise chunking)."""
    documents = generate_corpus(seed=0).documents
    longest = max(documents, key=lambda d: len(d["text"]))
    return [*documents[:120], longest]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, small_corpus) -> Path:
    """An untrained 2-block GPT-2 (width 32) with a 400-token BPE tokenizer, in safetensors."""
    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_tokenizer([d["text"] for d in small_corpus], vocab_size=400, max_length=64)
    config = DemoTrainingConfig(n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    build_model(config, tokenizer).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def small_corpus_path(tmp_path_factory, small_corpus) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", small_corpus)


@pytest.fixture(scope="session")
def demo_artifacts():
    """The bundled demo model, trained once (about 2-3 minutes) and cached in REPO/.cache."""
    from indexer.demo.train import ensure_demo_model

    return ensure_demo_model(REPO / ".cache" / "demo", progress=False)


@pytest.fixture(scope="session")
def demo_index_root(tmp_path_factory, demo_artifacts) -> Path:
    """A published index of the demo corpus with the default build settings."""
    from indexer.build import build_index
    from indexer.config import BuildConfig, CorpusConfig

    root = tmp_path_factory.mktemp("demo-index")
    config = BuildConfig(
        model=demo_artifacts.model_dir,
        out=root,
        corpus=CorpusConfig(str(demo_artifacts.corpus_path)),
        progress=False,
    )
    build_index(config)
    return root


@pytest.fixture(scope="session")
def demo_queries(demo_artifacts) -> list[dict]:
    lines = demo_artifacts.queries_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
