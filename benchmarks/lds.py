"""The linear datamodeling score (issue 15): the demo model retrained on random half corpora.

Retraining: M random subsets of half the demo corpus's documents (`--subsets`, `--fraction`,
`--subset-seed`); on each, for each of `--seeds`, a fresh demo model trained with the demo's
own recipe (`indexer.demo.train`: its config, its tokenizer, `seed` for the initialisation and
the batch order, as the demo model was with seed 0), and every demo query's completion loss
(summed NLL, nats) recorded. The same seed for every subset (common random numbers): the
subsets' losses then differ by their data, not by their initialisation. Results land in the
`--cache` file (`indexer.lds.RetrainCache`) one retraining at a time, written atomically, so a
killed run resumes where it stopped; a cache made for another corpus, recipe, subsets, queries
or model is refused in one line (exit 2). Seeds run one after another: every subset's seed 0
before any seed 1.

Scoring: `influence-index eval --lds CACHE` on the demo index, for each score kind, with the
exact scorer and the baselines: the LDS of every method, with its bootstrap interval over
queries. `--dims 8192,131072` scores indexes of those budgets instead of the default one (how
the sketch's bytes move LDS), `--top-k 10,100,200` served answers of more exact hits.
`--phase retrain` only retrains, `--phase score` only scores what the cache holds (an
unfinished cache: the subsets retrained so far, at least `indexer.lds.MIN_SUBSETS`).

    .venv/bin/python -m benchmarks.lds --subsets 50 --seeds 0,1 --workers 3 --phase retrain
    .venv/bin/python -m benchmarks.lds --phase score --kinds cosine \
        --out benchmarks/results/lds-demo-cosine.json

`--check-recipe` first retrains on the whole corpus with seed 0 and compares the weights with
the demo model's: the retraining is the demo's recipe exactly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from benchmarks.common import CACHE, comma_ints, comma_list, demo_artifacts, emit, start_run
from benchmarks.rerank import KINDS, ensure_build, load_setting
from indexer.config import CorpusConfig, ScoreKind, SketchConfig, StoreConfig, default_of
from indexer.corpus import document_batches
from indexer.demo.train import (
    DemoArtifacts,
    DemoTrainingConfig,
    build_model,
    train_model,
    training_windows,
)
from indexer.errors import InfluenceIndexError
from indexer.evaluate import BASELINES, EvalConfig, evaluate
from indexer.lds import (
    RetrainCache,
    bootstrap_mean,
    check_key,
    new_cache,
    random_subsets,
    read_cache,
    write_cache,
)
from indexer.metrics import spearman
from indexer.model import tokenizer_sha256, weights_sha256
from indexer.query import Query, TokenizedQuery, query_token_batch, read_queries, tokenize_query
from indexer.sketch import summed_nll

log = logging.getLogger("lds")

# Bump when a change to this file alters what a retraining computes.
RETRAIN_VERSION = 1
PHASES = ("retrain", "score", "both")
TOP_K = default_of(Query, "top_k")
# The targets: the served answer against the exact scorer, both against the baselines.
PAIRED = (
    ("index+rerank", "exact"),
    ("index+rerank hits", "exact"),
    ("index", "exact"),
    ("exact", "bm25"),
    ("exact", "grad-cosine"),
    ("index+rerank", "bm25"),
    ("index+rerank", "grad-cosine"),
)


@dataclass(frozen=True)
class Retraining:
    """What every retraining shares: the demo's recipe, tokenizer, documents and queries."""

    model_dir: Path
    config: DemoTrainingConfig
    texts: list[str]
    queries: list[Query]


def recipe(artifacts: DemoArtifacts, config: DemoTrainingConfig) -> dict:
    """The settings that shape a retrained model's losses (hashed into the cache's key)."""
    return {
        "version": RETRAIN_VERSION,
        "config": asdict(config),
        "tokenizer_sha256": tokenizer_sha256(artifacts.model_dir),
        "loss": "summed NLL of the completion tokens (nats)",
    }


class _Worker:
    """A process's retraining state: the tokenizer and the tokenized queries, loaded once."""

    def __init__(self, shared: Retraining):
        self.shared = shared
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(shared.model_dir)
        self.queries = [
            tokenize_query(self.tokenizer, q, shared.config.n_positions) for q in shared.queries
        ]

    def train(self, documents: Sequence[int], seed: int) -> GPT2LMHeadModel:
        """A fresh demo model trained with `seed` on the documents at these indices."""
        config, tokenizer = self.shared.config, self.tokenizer
        windows = training_windows(tokenizer, [self.shared.texts[i] for i in documents], config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(config, tokenizer)
        train_model(
            model, windows, config, pad_id=tokenizer.pad_token_id, seed=seed, progress=False
        )
        return model

    def losses(self, model: GPT2LMHeadModel) -> list[float]:
        """Each query's completion loss `[Q]` (summed NLL, nats) under `model`."""
        return query_losses(model, self.queries, self.tokenizer.pad_token_id).tolist()


@torch.no_grad()
def query_losses(
    model: torch.nn.Module, queries: list[TokenizedQuery], pad_id: int
) -> torch.Tensor:
    """Summed NLL `[Q]` of each query's completion tokens given its prompt (the query loss)."""
    batch = query_token_batch(queries, pad_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return summed_nll(logits, batch.targets).double()


_WORKER: _Worker | None = None


def _start_worker(shared: Retraining, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = _Worker(shared)


def _retrain(subset: int, documents: list[int], seed: int) -> tuple[int, int, list[float], dict]:
    """One retraining in a worker: (subset, seed, losses [Q], wall and CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    losses = _WORKER.losses(_WORKER.train(documents, seed))
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    return subset, seed, losses, seconds


def open_cache(
    path: Path, artifacts: DemoArtifacts, config: DemoTrainingConfig, args: argparse.Namespace
) -> tuple[RetrainCache, Retraining]:
    """The cache at `path` if it was made for exactly these settings (else InvalidInputError), or
    a new empty one; and the shared retraining state."""
    documents = [
        d for batch in document_batches(CorpusConfig(str(artifacts.corpus_path))) for d in batch
    ]
    labeled = read_queries(artifacts.queries_path)
    subsets = random_subsets(len(documents), args.subsets, args.fraction, args.subset_seed)
    fresh = new_cache(
        documents, labeled, subsets, recipe(artifacts, config), weights_sha256(artifacts.model_dir)
    )
    shared = Retraining(
        artifacts.model_dir, config, [d.text for d in documents], [q.query for q in labeled]
    )
    if not path.exists():
        return fresh, shared
    cache = read_cache(path)
    check_key(cache, fresh.key, path)
    return cache, shared


def retrain(
    cache: RetrainCache, path: Path, shared: Retraining, seeds: Sequence[int], workers: int
) -> None:
    """Run every missing retraining, writing the cache after each one lands."""
    todo = cache.missing(seeds)
    log.info(
        "%d retrainings cached, %d to run on %d workers", len(cache.losses), len(todo), workers
    )
    bar = tqdm(total=len(todo), desc="retraining", unit="model")
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(shared, 1)
    ) as pool:
        futures = [pool.submit(_retrain, m, cache.subsets[m], s) for m, s in todo]
        for future in as_completed(futures):
            subset, seed, losses, seconds = future.result()
            cache.losses[(subset, seed)] = losses
            cache.seconds[(subset, seed)] = seconds
            write_cache(cache, path)
            bar.update(1)
            bar.set_postfix(wall=f"{seconds['wall']:.0f}s", cpu=f"{seconds['cpu']:.0f}s")
    bar.close()


def check_recipe(shared: Retraining, artifacts: DemoArtifacts) -> dict:
    """Retrain on every document with seed 0 (as the demo model was); the largest absolute
    difference from the demo model's weights, and the time it took."""
    worker = _Worker(shared)
    wall, cpu = time.perf_counter(), time.process_time()
    model = worker.train(range(len(shared.texts)), seed=0)
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    demo = GPT2LMHeadModel.from_pretrained(artifacts.model_dir)
    retrained = model.state_dict()
    diff = max(float((retrained[k] - v).abs().max()) for k, v in demo.state_dict().items())
    return {"max_abs_weight_difference": diff, **seconds}


def retraining_summary(cache: RetrainCache) -> dict:
    """Counts and per-retraining wall / CPU seconds (mean and total) of the cached runs."""
    walls = np.array([s["wall"] for s in cache.seconds.values() if "wall" in s])
    cpus = np.array([s["cpu"] for s in cache.seconds.values() if "cpu" in s])
    return {
        "subsets": len(cache.subsets),
        "documents_per_subset": len(cache.subsets[0]),
        "retrainings": len(cache.losses),
        "usable_subsets": len(cache.usable()[0]),
        "usable_seeds": cache.usable()[1],
        "wall_seconds": {"mean": float(walls.mean()), "total": float(walls.sum())},
        "cpu_seconds": {"mean": float(cpus.mean()), "total": float(cpus.sum())},
    }


def score_kind(
    cache_path: Path, kind: ScoreKind, work: Path, dims: int | None = None, top_k: int = TOP_K
) -> dict:
    """`eval --lds` of the demo index of `kind` (built under `work`, or reused; `dims`: its
    stored dimensions, default the build's budget) with the exact scorer and every baseline:
    LDS and fact tracing per method, per-query LDS, and the paired differences that the issue's
    targets compare. The served answers ask for `top_k` hits (exact, as the exact stage's depth
    allows), the sketch's estimates standing for every other example."""
    setting = load_setting("demo", None)
    root = work / (f"index-{kind}" if dims is None else f"index-{kind}-dims{dims}")
    build = ensure_build(setting, root, StoreConfig(score=kind), SketchConfig(dims=dims))
    config = EvalConfig(
        index=root,
        queries=tuple(setting.queries),
        exact=True,
        baselines=BASELINES,
        lds=cache_path,
        # A query's default top-k: the served answer as a client gets it by default.
        ks=(top_k,),
        fact_ks=(1, TOP_K),
    )
    started, cpu = time.perf_counter(), time.process_time()
    report = evaluate(config)
    per_query = {m: np.array([q.lds[m] for q in report.queries]) for m in report.lds}
    differences = {
        f"{a} - {b}": asdict(bootstrap_mean(per_query[a] - per_query[b]))
        for a, b in PAIRED
        if a in per_query and b in per_query
    }
    return {
        "version": report.version,
        "dim": report.dim,
        "reused_build": bool(build.get("reused")),
        "lds": report.lds,
        "paired_differences": differences,
        "lds_settings": report.lds_settings,
        "fact": {m: r.fact for m, r in report.methods.items()},
        "fidelity": {k: v for k, v in report.fidelity.items() if k.endswith("@10")},
        "per_query_lds": {q.id: q.lds for q in report.queries},
        "eval_seconds": {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu},
    }


def _label(kind: ScoreKind, dims: int | None, top_k: int) -> str:
    """`cosine` at the defaults, else e.g. `cosine dims=8192 top_k=100`."""
    settings = ([f"dims={dims}"] if dims is not None else []) + (
        [f"top_k={top_k}"] if top_k != TOP_K else []
    )
    return " ".join([str(kind), *settings])


def seed_agreement(cache: RetrainCache) -> dict:
    """Retraining noise, where subsets were retrained with two seeds or more: per query, the
    Spearman over those subsets between two seeds' losses (the LDS a perfect predictor of one
    seed's losses would get against another's), mean over queries."""
    seeds = sorted({s for _, s in cache.losses})
    if len(seeds) < 2:
        return {}
    first, second = seeds[:2]
    both = [m for m in range(len(cache.subsets)) if {(m, first), (m, second)} <= set(cache.losses)]
    if len(both) < 3:
        return {"subsets_with_both_seeds": len(both)}
    a = np.array([cache.losses[(m, first)] for m in both])
    b = np.array([cache.losses[(m, second)] for m in both])
    per_query = np.array([spearman(a[:, q], b[:, q]) for q in range(a.shape[1])])
    return {
        "seeds": [first, second],
        "subsets_with_both_seeds": len(both),
        "spearman_between_seeds": asdict(bootstrap_mean(per_query)),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE / "lds" / "demo.json")
    parser.add_argument("--subsets", type=int, default=50, help="M random subsets")
    parser.add_argument("--fraction", type=float, default=0.5, help="of the documents per subset")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--seeds", type=comma_ints, default=(0,), help="training seeds per subset")
    parser.add_argument(
        "--workers", type=int, default=1, help="retraining processes, 1 thread each"
    )
    parser.add_argument("--phase", choices=PHASES, default="both", help="what to run")
    parser.add_argument("--check-recipe", action="store_true")
    parser.add_argument(
        "--kinds", type=comma_list(ScoreKind), default=KINDS, help="score kinds to evaluate"
    )
    parser.add_argument("--work", type=Path, default=CACHE / "lds", help="the demo indexes")
    parser.add_argument(
        "--dims",
        type=comma_list(int),
        default=(None,),
        help="stored dimensions per example of the indexes scored (default: the build's)",
    )
    parser.add_argument(
        "--top-k",
        type=comma_ints,
        default=(TOP_K,),
        help="hits the served answers ask for (exact ones up to the exact stage's depth)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the scoring")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    artifacts = demo_artifacts()
    config = DemoTrainingConfig()
    try:
        cache, shared = open_cache(args.cache, artifacts, config, args)
    except InfluenceIndexError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    start_run(args.threads)
    result: dict = {"cache": str(args.cache), "load_average_start": list(os.getloadavg())}
    if args.check_recipe:
        result["recipe_check"] = check_recipe(shared, artifacts)
        log.info("recipe check: %s", result["recipe_check"])
    if args.phase != "score":
        retrain(cache, args.cache, shared, args.seeds, args.workers)
    result["retraining"] = retraining_summary(cache)
    result["seed_agreement"] = seed_agreement(cache)
    if args.phase != "retrain":
        try:
            result["kinds"] = {
                _label(kind, dims, top_k): score_kind(args.cache, kind, args.work, dims, top_k)
                for dims in args.dims
                for top_k in args.top_k
                for kind in args.kinds
            }
        except InfluenceIndexError as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
    result["load_average_end"] = list(os.getloadavg())
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
