"""Exact re-ranking of retrieved candidates (issue 8): recall, agreement, latency and its floor.

For one setting (`demo`, or `large`: see `benchmarks.large_model`) it builds the default index
of each score kind (re-rank factors included), computes the exact EK-FAC reference of every
query over the whole corpus with the version's OWN stored full factors, then measures for each
candidate depth K′:

- candidate recall: the exact top-10 within the sketch's (FAISS) top-K′;
- agreement: the exact top-10 within the top-10 the engine returns re-ranking at K′
  (`Query(rerank_depth=K′)`, one query at a time, warm), and its fact recall@10;
- latency: p50 of `engine.answer` per query, with re-rank at K′ and without, each stage
  (a cosine re-rank reads its candidates' exact norms from the metadata, as the server does);
- from the reference alone, for every query: the agreement an exact re-rank of the sketch's
  top-K′ must give (checked against the engine's on the queries it answered), and candidate
  recall when the M largest-norm examples are always among the candidates;
- the re-rank stage (`timings.rerank_us`) against its floor, measured right after it on the
  same query: a bare batched forward/backward with parameter gradients (summed NLL) over
  exactly the same candidate token sequences, in the same order and batch size
  (`EngineOptions.rerank_batch_size`), on a second copy of the model.

    .venv/bin/python -m benchmarks.rerank --setting demo --engine-queries 16 --floor-queries 6 \
        --work .cache/issue8/demo64 --out benchmarks/results/rerank-demo.json
    .venv/bin/python -m benchmarks.rerank --setting large --engine-queries 4 --floor-queries 2 \
        --work .cache/issue8/large --out benchmarks/results/rerank-large.json

`--work` keeps the builds and the exact reference for reuse (by `benchmarks.fidelity_per_byte`
too); without it everything lives in a temporary directory. One torch thread by default.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.common import comma_ints, demo_artifacts, emit, start_run
from benchmarks.large_model import (
    MID_CONFIG,
    MID_SEEDS,
    ensure_large_model,
    large_corpus_config,
    sample_queries,
)
from indexer import metrics
from indexer.baselines import ScoreTarget, stream_scores
from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig, ScoreKind, SketchConfig, StoreConfig
from indexer.curvature import Curvature
from indexer.engine import EngineOptions, QueryEngine, QueryResult, ScoreSpace
from indexer.errors import IndexVerificationError
from indexer.evaluate import json_safe, matching_corpus
from indexer.exact import ExactConfig, ExactScorer
from indexer.hashing import sha256_file
from indexer.incremental import built_with
from indexer.manifest import CURVATURE_FILE, FULL_CURVATURE_FILE
from indexer.model import LoadedModel, load_model
from indexer.publish import read_current, verify_version, version_dir
from indexer.query import LabeledQuery, TokenizedQuery, query_vectors
from indexer.sketch import make_batch, summed_nll

log = logging.getLogger("rerank")

DEPTHS = (10, 50, 100, 200, 500, 1000)
# Candidate recall only (a search, no re-rank): deeper, to see how K′ must grow with N.
RECALL_DEPTHS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
TOP = 10  # returned hits; fidelity = recall of the exact top-10
KINDS = (ScoreKind.COSINE, ScoreKind.INFLUENCE)
SETTINGS = ("demo", "large", "mid")  # see `load_setting`
# Candidate lists that always hold the M largest-norm examples (query-independent), then the
# sketch's ranking: measured from the reference only, as a candidate-generation alternative.
NORM_UNION = (10, 20, 50)


@dataclass(frozen=True)
class Setting:
    """A model, its corpus framed as in training, and labelled queries."""

    name: str
    model_dir: Path
    corpus: CorpusConfig
    queries: list[LabeledQuery]
    fact_accuracy: float


def load_setting(name: str, n_queries: int | None) -> Setting:
    """`demo`: the bundled demo (tokenizer's BOS framing); `large`: 13 generator seeds and a
    4-layer, 128-wide model trained GPT-2 style, framed with `<|endoftext|>`; `mid`: the same
    on 2 seeds, 256 wide. `n_queries`: a deterministic sample (None: 48 queries)."""
    if name == "demo":
        artifacts = demo_artifacts()
        corpus = CorpusConfig(str(artifacts.corpus_path))
    elif name == "large":
        artifacts = ensure_large_model()
        corpus = large_corpus_config(artifacts)
    elif name == "mid":
        artifacts = ensure_large_model(config=MID_CONFIG, n_seeds=MID_SEEDS)
        corpus = large_corpus_config(artifacts)
    else:
        raise ValueError(f"unknown setting {name!r}")
    queries = sample_queries(artifacts.queries_path, n_queries or 48)
    return Setting(name, artifacts.model_dir, corpus, queries, artifacts.fact_accuracy)


def ensure_build(setting: Setting, root: Path, store: StoreConfig, sketch: SketchConfig) -> dict:
    """A published version under `root` (reused when one is there built with these settings:
    `indexer.incremental.built_with`); its build summary or, when reused, what its manifest says."""
    config = BuildConfig(
        model=setting.model_dir,
        out=root,
        corpus=setting.corpus,
        sketch=sketch,
        store=store,
        progress=False,
    )
    if read_current(root):
        try:
            manifest = verify_version(version_dir(root))
        except IndexVerificationError as e:
            log.warning("rebuilding %s: %s", root, e)
        else:
            if built_with(manifest, config):
                version = version_dir(root).name
                return {"reused": True, "version": version, "factory": manifest.index_factory}
            log.info("rebuilding %s: built with other settings", root)
    log.info("building %s", root)
    return build_index(config).to_dict()


@dataclass
class Reference:
    """Exact EK-FAC scores `[Q, N]` by corpus row, per score kind, and what produced them."""

    scores: dict[str, np.ndarray]
    full_curvature_sha256: str
    seconds: float
    doc_ids: list[str] = field(default_factory=list)


def exact_reference(
    engine: QueryEngine,
    tokenized: list[TokenizedQuery],
    cache: Path,
    limits: ExactConfig | None = None,
) -> Reference:
    """Exact influence and cosine of every query on every example, from the version's own full
    factors (one streaming pass: preconditioned full gradients, their norms for cosine; as
    tests/test_rerank.py's `exact_scores`); `limits`: the scorer's batch size and memory limit
    (default: `ExactConfig`'s). A version built without them (`--exact-rerank off`) gets full
    factors fitted here as `eval --exact` fits them (the build's sample, seed and damping),
    saved beside the cache.
    Cached in `cache` (npz), keyed by the factors (or the sketch factors they are fitted
    beside) and the queries' tokens."""
    stored = FULL_CURVATURE_FILE in engine.manifest.files
    sha = engine.manifest.files[FULL_CURVATURE_FILE if stored else CURVATURE_FILE].sha256
    tokens = [t.token_ids for t in tokenized]
    keyed = [sha, tokens] if stored else [sha, "full factors fitted apart", tokens]
    key = hashlib.sha256(repr(keyed).encode()).hexdigest()
    path = cache / f"exact-{key[:16]}.npz"
    fitted = cache / f"curvature-full-{key[:16]}.safetensors"
    examples = matching_corpus(engine, None)
    doc_ids = [e.doc_id for e in examples]
    if path.exists():
        stored_scores = np.load(path)
        scores = {str(k): stored_scores[str(k)] for k in KINDS}
        full_sha = sha if stored else sha256_file(fitted)
        return Reference(scores, full_sha, float(stored_scores["seconds"]), doc_ids)
    start = time.perf_counter()
    config = replace(
        limits or ExactConfig(),
        curvature=engine.manifest.curvature,
        modules=engine.manifest.sketch.modules,
    )
    full = Curvature.load(engine.path / FULL_CURVATURE_FILE) if stored else None
    scorer = ExactScorer(engine.loaded, examples, config, curvature=full)
    if not stored:
        scorer.curvature.save(fitted)
    q = query_vectors(scorer.sketcher, scorer.curvature, tokenized, engine.pad_id)
    target = ScoreTarget(scorer.curvature.vectors, q)
    streamed = stream_scores(scorer.pass_, {"exact": target}, "exact")
    streamed = streamed["exact"]
    scores = {
        str(ScoreKind.INFLUENCE): streamed.dots,
        str(ScoreKind.COSINE): streamed.cosine(q.double().norm(dim=1).numpy()),
    }
    seconds = time.perf_counter() - start
    np.savez(path, seconds=seconds, **scores)
    return Reference(scores, sha if stored else sha256_file(fitted), seconds, doc_ids)


def candidate_recall(reference: np.ndarray, predicted: Sequence[int], depth: int) -> float:
    """Fraction of the reference's top-10 (ties honoured, as `metrics.recall_curve`) among the
    first `depth` predicted rows."""
    best = np.sort(reference)[::-1][TOP - 1]
    threshold = best - 1e-5 * abs(best)
    found = np.count_nonzero(reference[np.asarray(predicted[:depth], dtype=np.int64)] >= threshold)
    return min(int(found), TOP) / TOP


def search_ids(engine: QueryEngine, tokenized: list[TokenizedQuery], depth: int) -> list[list]:
    """The index's top-`depth` example ids per query, best first, searched as the engine does
    (cosine: unit query vectors); the engine re-ranks the first K′ of them."""
    kind = engine.info.score_kind
    search = [ScoreSpace.of(kind, q).search for q in engine.query_vectors(tokenized)]
    _, ids = engine.index.search(np.stack(search), depth)
    return [[int(i) for i in line if i >= 0] for line in ids]


def row_of(engine: QueryEngine, ids: list[int]) -> dict[int, int]:
    return {i: r.row for i, r in engine.metadata.lookup(sorted(set(ids))).items()}


class Floor:
    """A bare batched forward/backward with parameter gradients (summed NLL, as training) on a
    second copy of the model: what re-ranking candidates cannot beat."""

    def __init__(self, model_dir: Path, batch_size: int):
        loaded: LoadedModel = load_model(model_dir)
        self.model = loaded.model.requires_grad_(True)
        self.pad_id = loaded.tokenizer.pad_token_id
        self.batch_size = batch_size

    def seconds(self, engine: QueryEngine, candidate_ids: list[int]) -> float:
        """Wall seconds over the candidates' token sequences, ordered and batched as
        `ExactReranker.score` does (deduplicated, sorted by length, `batch_size` a batch)."""
        records = engine.metadata.lookup(candidate_ids)
        tokens = {i: records[i].token_ids for i in candidate_ids}
        ordered = sorted(tokens, key=lambda i: len(tokens[i]))
        start = time.perf_counter()
        for at in range(0, len(ordered), self.batch_size):
            sequences = [tokens[i] for i in ordered[at : at + self.batch_size]]
            n = len(sequences)
            batch = make_batch(sequences, [1] * n, self.pad_id, [0] * n)
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            summed_nll(out.logits, batch.targets).sum().backward()
            self.model.zero_grad(set_to_none=True)
        return time.perf_counter() - start


@dataclass
class Answered:
    """One `engine.answer` call: returned rows, wall ms and stage ms."""

    rows: list[int]
    docs: list[str]
    ms: float
    stages_ms: dict[str, float]


def answer(engine: QueryEngine, tokenized: TokenizedQuery) -> tuple[Answered, QueryResult]:
    start = time.perf_counter()
    (result,) = engine.answer([tokenized])
    ms = 1000 * (time.perf_counter() - start)
    rows = row_of(engine, [h.example_id for h in result.hits])
    stages = {k.removesuffix("_us"): v / 1000 for k, v in asdict(result.timings).items()}
    answered = Answered(
        [rows[h.example_id] for h in result.hits],
        metrics.rank_documents(h.doc_id for h in result.hits),
        ms,
        stages,
    )
    return answered, result


def p50(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fact_recall(docs: Sequence[Sequence[str]], queries: Sequence[LabeledQuery]) -> float:
    """Recall@10 of the first gold document, over the queries with gold."""
    return metrics.mean(
        metrics.recall_at_k(metrics.first_gold_rank(d, q.gold), TOP)
        for d, q in zip(docs, queries, strict=True)
        if q.gold
    )


@dataclass
class DepthRun:
    """Everything measured at one depth for one score kind (means over queries, p50 in ms)."""

    depth: int
    agreement: float  # exact top-10 within the returned top-10
    fact_recall_at_10: float
    p50_ms: float
    p50_stage_ms: dict[str, float]
    p50_floor_ms: float | None = None  # the bare pass over the same candidates
    p50_rerank_on_floor_queries_ms: float | None = None
    rerank_over_floor_p50_of_ratios: float | None = None
    rerank_over_floor_ratio_of_sums: float | None = None
    n_floor_queries: int = 0


def run_depth(
    engine: QueryEngine,
    prepared: list[TokenizedQuery],
    queries: list[LabeledQuery],
    exact: np.ndarray,
    depth: int,
    floor: Floor,
    n_floor: int,
    ranked_ids: list[list[int]],
) -> DepthRun:
    """Answer every query alone at re-rank `depth` (0: off), warm model; time the floor of the
    first `n_floor` right after their answers, over their candidates (`ranked_ids[i][:depth]`)."""
    tokenized = [replace(t, query=replace(t.query, rerank_depth=depth)) for t in prepared]
    answer(engine, tokenized[0])  # warm-up, not counted
    runs, floors, reranks = [], [], []
    for i, t in enumerate(tokenized):
        answered, _ = answer(engine, t)
        runs.append(answered)
        if depth and i < n_floor:
            candidates = ranked_ids[i][: max(depth, TOP)]
            floors.append(1000 * floor.seconds(engine, candidates))
            reranks.append(answered.stages_ms["rerank"])
    stage_names = runs[0].stages_ms
    result = DepthRun(
        depth=depth,
        agreement=metrics.mean(
            metrics.top_k_recall(exact[i], r.rows, TOP) for i, r in enumerate(runs)
        ),
        fact_recall_at_10=fact_recall([r.docs for r in runs], queries),
        p50_ms=p50([r.ms for r in runs]),
        p50_stage_ms={k: p50([r.stages_ms[k] for r in runs]) for k in stage_names},
    )
    if floors:
        result.p50_floor_ms = p50(floors)
        result.p50_rerank_on_floor_queries_ms = p50(reranks)
        ratios = [r / f for r, f in zip(reranks, floors, strict=True)]
        result.rerank_over_floor_p50_of_ratios = p50(ratios)
        result.rerank_over_floor_ratio_of_sums = sum(reranks) / sum(floors)
        result.n_floor_queries = len(floors)
    log.info("depth %d: %s", depth, result)
    return result


@dataclass(frozen=True)
class RunConfig:
    setting: str = "demo"
    n_queries: int | None = None
    depths: tuple[int, ...] = DEPTHS
    recall_depths: tuple[int, ...] = RECALL_DEPTHS
    engine_queries: int | None = None  # the first n answered by the engine (None: all)
    floor_queries: int = 12  # queries whose floor is measured at each depth
    kinds: tuple[ScoreKind, ...] = KINDS


def measure_kind(
    setting: Setting, engine: QueryEngine, reference: Reference, config: RunConfig
) -> dict:
    """Candidate recall, and re-rank off / at each depth, for one score kind."""
    kind = str(engine.info.score_kind)
    exact = reference.scores[kind]
    prepared = [
        engine.prepare(replace(q.query, top_k=TOP, rerank_depth=0)) for q in setting.queries
    ]
    n = engine.info.n_examples
    recall_depths = sorted({d for d in (*config.depths, *config.recall_depths) if d <= n})
    ranked_ids = search_ids(engine, prepared, max(recall_depths))
    rows = row_of(engine, [i for ids in ranked_ids for i in ids])
    found = [[rows[i] for i in ids] for ids in ranked_ids]
    recall = {
        depth: metrics.mean(candidate_recall(exact[i], f, depth) for i, f in enumerate(found))
        for depth in recall_depths
    }
    largest = largest_norm_rows(engine, max(NORM_UNION))
    norm_union = {
        m: {
            d: metrics.mean(
                candidate_recall(exact[i], with_rows(largest[:m], f), d)
                for i, f in enumerate(found)
            )
            for d in config.depths
        }
        for m in NORM_UNION
    }
    n_engine = min(config.engine_queries or len(prepared), len(prepared))
    simulated = {
        depth: [reranked_agreement(exact[i], f, depth) for i, f in enumerate(found)]
        for depth in config.depths
    }
    floor = Floor(setting.model_dir, engine.options.rerank_batch_size)
    args = (engine, prepared[:n_engine], setting.queries[:n_engine], exact)
    off = run_depth(*args, 0, floor, 0, ranked_ids)
    runs = [run_depth(*args, d, floor, config.floor_queries, ranked_ids) for d in config.depths]
    exact_docs = [metrics.document_ranking(s, reference.doc_ids) for s in exact]
    sketch_docs = [metrics.rank_documents(reference.doc_ids[r] for r in f[:TOP]) for f in found]
    return {
        "score": kind,
        "index_factory": engine.info.faiss_factory,
        "n_engine_queries": n_engine,
        "candidate_recall_of_exact_top10": recall,
        "candidate_recall_with_largest_norms_first": norm_union,
        "agreement_from_reference": {
            d: {
                "all_queries": metrics.mean(v),
                "engine_queries": metrics.mean(v[:n_engine]),
            }
            for d, v in simulated.items()
        },
        "sketch_top10_agreement_all_queries": recall[TOP],
        "sketch_fact_recall_at_10_all_queries": fact_recall(sketch_docs, setting.queries),
        "no_rerank": asdict(off),
        "rerank": [asdict(r) for r in runs],
        "exact_fact_recall_at_10": fact_recall(exact_docs, setting.queries),
        "exact_fact_recall_at_10_engine_queries": fact_recall(
            exact_docs[:n_engine], setting.queries[:n_engine]
        ),
    }


def largest_norm_rows(engine: QueryEngine, m: int) -> list[int]:
    """The `m` example rows of largest sketch norm (metadata), largest first: the examples whose
    raw influence the sketch gets most wrong in absolute terms (its error grows with the norm)."""
    _, norms = engine.metadata.ids_and_norms(np.arange(engine.info.n_examples))
    return np.argsort(-norms, kind="stable")[:m].tolist()


def with_rows(first: list[int], ranked: list[int]) -> list[int]:
    """`first`, then `ranked` without them: a candidate list whose top K′ always holds `first`."""
    return list(dict.fromkeys([*first, *ranked]))


def reranked_agreement(exact: np.ndarray, candidates: Sequence[int], depth: int) -> float:
    """What an exact re-rank at `depth` returns, from the reference: the top-10 of the first
    `depth` candidate rows by exact score; its recall of the exact top-10."""
    pool = np.asarray(candidates[:depth], dtype=np.int64)
    best = pool[np.argsort(-exact[pool], kind="stable")[:TOP]]
    return metrics.top_k_recall(exact, best.tolist(), TOP)


def run(config: RunConfig, work: Path) -> dict:
    started = time.perf_counter()
    setting = load_setting(config.setting, config.n_queries)
    builds, engines = {}, {}
    for kind in config.kinds:
        root = work / f"default-{kind}"
        store = StoreConfig(score=kind)  # the build's default factory for this corpus size
        builds[str(kind)] = ensure_build(setting, root, store, SketchConfig())
        # Every candidate of each depth re-ranked: the fixed-depth curve (no early stop).
        engines[kind] = QueryEngine.open(root, options=EngineOptions(rerank_early_stop=False))
    first = engines[config.kinds[0]]
    tokenized = [first.prepare(replace(q.query, rerank_depth=0)) for q in setting.queries]
    reference = exact_reference(first, tokenized, work)
    shas = {str(k): e.manifest.files[FULL_CURVATURE_FILE].sha256 for k, e in engines.items()}
    if len(set(shas.values())) != 1:
        raise RuntimeError(f"the versions' full factors differ ({shas}): one reference each")
    log.info("exact reference: %.1f s", reference.seconds)
    kinds = [measure_kind(setting, engines[k], reference, config) for k in config.kinds]
    for engine in engines.values():
        engine.close()
    return {
        "benchmark": "rerank",
        "setting": config.setting,
        "model": str(setting.model_dir),
        "corpus": asdict(setting.corpus),
        "model_fact_accuracy": setting.fact_accuracy,
        "n_examples": first.info.n_examples,
        "n_queries": len(setting.queries),
        "n_with_gold": sum(bool(q.gold) for q in setting.queries),
        "engine_options": asdict(first.options),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "builds": builds,
        "full_curvature_sha256": shas,
        "exact_reference_seconds": reference.seconds,
        "config": asdict(config),
        "kinds": kinds,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, default="demo")
    parser.add_argument("--queries", type=int, help="queries (deterministic sample; default 48)")
    parser.add_argument("--depths", type=comma_ints, default=DEPTHS)
    parser.add_argument(
        "--engine-queries", type=int, help="answer only the first N through the engine"
    )
    parser.add_argument("--floor-queries", type=int, default=RunConfig.floor_queries)
    parser.add_argument("--kinds", default="cosine,influence")
    parser.add_argument("--work", type=Path, help="keep builds and exact scores here (reused)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    start_run(args.threads)
    config = RunConfig(
        setting=args.setting,
        n_queries=args.queries,
        depths=args.depths,
        engine_queries=args.engine_queries,
        floor_queries=args.floor_queries,
        kinds=tuple(ScoreKind(k) for k in args.kinds.split(",")),
    )
    with tempfile.TemporaryDirectory(prefix="rerank-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        emit(json_safe(run(config, work)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
