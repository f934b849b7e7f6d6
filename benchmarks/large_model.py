"""The second, larger benchmark setting of issue 8: a 4-layer GPT-2 trained the way GPT-2 was.

Corpus: the demo generator's seeds 0..12 concatenated (20,943 documents, ~21k examples at 128
tokens), with the document ids of `benchmarks.common.synthetic_corpus` (`s<seed>-doc-…`) and
every seed's fact queries (624; their gold ids prefixed the same way). Model: 4 layers, width
128, trained with GPT-2's tokenizer conventions (`DemoTrainingConfig.add_bos=False`: the
tokenizer adds no BOS; documents are packed into full windows, each preceded by
`<|endoftext|>`). It is indexed with the framing it was trained with:
`build --prefix-token '<|endoftext|>'` (`large_corpus_config`).

    .venv/bin/python -m benchmarks.large_model --out benchmarks/results/large_model.json

trains the model once (about 15 minutes on one contended core) and caches it in
`.cache/large/`, like `ensure_demo_model`; later runs reuse it. Prints JSON: where it lives,
its fact accuracy (greedy decoding of all 624 queries, prompt after the separator), the
training time and the corpus size in examples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.common import CACHE, emit
from indexer.config import CorpusConfig, example_max_length
from indexer.corpus import load_corpus
from indexer.demo.corpus import DemoCorpus, generate_corpus
from indexer.demo.train import (
    BOS_TOKEN,
    MARKER_NAME,
    DemoArtifacts,
    DemoTrainingConfig,
    ensure_trained_model,
    settings_hash,
)
from indexer.model import load_model
from indexer.query import LabeledQuery, read_queries

LARGE_SEEDS = 13  # generator seeds: 13 x 1,611 documents
LARGE_CONFIG = DemoTrainingConfig(n_layer=4, n_embd=128, n_head=4, epochs=6, add_bos=False)
# The `mid` setting (issue 13): 4 layers 256 wide, trained the same way on 2 seeds (~3.5k examples).
MID_SEEDS = 2
MID_CONFIG = replace(LARGE_CONFIG, n_embd=256)
SEPARATOR = BOS_TOKEN  # `<|endoftext|>`: what every training document followed
CORPUS_FORMAT = 1  # bump when `large_corpus` changes what it generates


def large_corpus(n_seeds: int = LARGE_SEEDS) -> DemoCorpus:
    """Generator seeds `0..n_seeds-1` concatenated; ids as `synthetic_corpus` writes them
    (`s<seed>-<doc id>`), queries `s<seed>-<query id>` with gold ids prefixed the same way."""
    corpus = DemoCorpus()
    for seed in range(n_seeds):
        part = generate_corpus(seed=seed)
        tag = f"s{seed}-"
        corpus.documents += [{**d, "id": tag + d["id"]} for d in part.documents]
        corpus.queries += [
            {**q, "id": tag + q["id"], "gold": [tag + g for g in q["gold"]]} for q in part.queries
        ]
    return corpus


def ensure_large_model(
    *, progress: bool = False, config: DemoTrainingConfig = LARGE_CONFIG, n_seeds: int = LARGE_SEEDS
) -> DemoArtifacts:
    """The cached large model (trained first if needed) in `.cache/large/`."""
    settings = {"model": settings_hash(0, config), "seeds": n_seeds, "corpus": CORPUS_FORMAT}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    run_dir = CACHE / "large" / f"large-{n_seeds}seeds-{digest[:12]}"
    return ensure_trained_model(
        run_dir, digest, lambda: large_corpus(n_seeds), seed=0, config=config, progress=progress
    )


def large_corpus_config(artifacts: DemoArtifacts) -> CorpusConfig:
    """The corpus framed as in training: `<|endoftext|>` before every example and query."""
    return CorpusConfig(str(artifacts.corpus_path), prefix_tokens=(SEPARATOR,))


def sample_queries(path: Path, n: int, seed: int = 0) -> list[LabeledQuery]:
    """A deterministic sample of `n` queries from a queries file, in file order."""
    queries = read_queries(path)
    if n >= len(queries):
        return queries
    keep = sorted(random.Random(seed).sample(range(len(queries)), n))
    return [queries[i] for i in keep]


def describe(artifacts: DemoArtifacts) -> dict:
    """The marker's training facts and the corpus size once framed and chunked."""
    marker = json.loads((artifacts.model_dir.parent / MARKER_NAME).read_text())
    loaded = load_model(artifacts.model_dir)
    config = large_corpus_config(artifacts)
    corpus = load_corpus(config, loaded.tokenizer, example_max_length(None, loaded.context_length))
    return {
        "model_dir": str(artifacts.model_dir),
        "corpus": str(artifacts.corpus_path),
        "queries": str(artifacts.queries_path),
        "training_config": marker["config"],
        "fact_accuracy": marker["fact_accuracy"],
        "train_seconds": marker["train_seconds"],
        "final_loss": marker["final_loss"],
        "n_documents": corpus.n_documents,
        "n_examples": len(corpus.examples),
        "n_tokens": sum(len(e.token_ids) for e in corpus.examples),
        "n_queries": marker["n_queries"],
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "prefix_tokens": list(config.prefix_tokens),
        "tokenizer_adds": loaded.tokenizer("", add_special_tokens=True)["input_ids"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    artifacts = ensure_large_model(progress=not args.quiet)
    emit(
        {"benchmark": "large_model", **describe(artifacts), "config": asdict(LARGE_CONFIG)},
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
