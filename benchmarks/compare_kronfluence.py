"""kronfluence's EK-FAC pairwise scores vs this project's index, on the demo model and corpus.

kronfluence is an optional benchmark dependency, never a runtime one. Install it without its
torchvision requirement (which would pull a CUDA build of torch), then run:

    .venv/bin/pip install --no-deps kronfluence accelerate einops einconv opt_einsum
    .venv/bin/pip install psutil
    .venv/bin/python -m benchmarks.compare_kronfluence --out benchmarks/results/kronfluence.json
    .venv/bin/python -m benchmarks.compare_kronfluence --documents 10000 --no-exact \
        --out benchmarks/results/kronfluence-10k.json   # timing at a larger corpus

Both sides track the same modules (GPT-2's Conv1D become equivalent nn.Linear in a copy of the
model, since kronfluence tracks Linear/Conv2d only), use the same losses (summed NLL of every
token for training examples, summed NLL of the completion tokens for queries: the batches are
built by the indexer's own code), the true Fisher (labels sampled from the model), and the same
damping (0.1 x the mean eigenvalue per module, kronfluence's heuristic for damping_factor=None).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers.pytorch_utils import Conv1D

from benchmarks.common import demo_artifacts, emit, synthetic_corpus
from indexer import metrics
from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig
from indexer.corpus import Example
from indexer.engine import QueryEngine
from indexer.evaluate import matching_corpus, sketch_scores
from indexer.exact import ExactConfig, ExactScorer
from indexer.query import Query, TokenizedQuery, read_queries
from indexer.sketch import IGNORE, make_batch, summed_nll

log = logging.getLogger("compare_kronfluence")


@dataclass(frozen=True)
class CompareConfig:
    batch_size: int = 16
    k: int = 10
    with_exact: bool = True  # also exact EK-FAC (label seeds 0 and 1), to separate the gaps
    documents: int | None = None  # a synthetic corpus of this many documents (timing at scale)
    progress: bool = True


def linear_copy(model: nn.Module, names: list[str]) -> nn.Module:
    """A deep copy in which each named Conv1D is the equivalent nn.Linear (`W_linear = W_conv1dᵀ`),
    under the same name."""
    converted = copy.deepcopy(model)
    for name in names:
        module = converted.get_submodule(name)
        if not isinstance(module, Conv1D):
            continue
        d_in, d_out = module.weight.shape
        linear = nn.Linear(d_in, d_out, bias=module.bias is not None)
        linear.weight.data.copy_(module.weight.data.T)
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.data)
        parent, _, child = name.rpartition(".")
        setattr(converted.get_submodule(parent), child, linear)
    return converted


class SequenceDataset(Dataset):
    """Token sequences with the position from which each carries the loss."""

    def __init__(self, sequences: list[list[int]], loss_starts: list[int]):
        self.items = list(zip(sequences, loss_starts, strict=True))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.items[i]


def collate_with(pad_id: int):
    """Batches padded and masked exactly as the indexer pads them."""

    def collate(items: list[tuple[list[int], int]]) -> dict[str, Tensor]:
        batch = make_batch([s for s, _ in items], [t for _, t in items], pad_id, [0] * len(items))
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "targets": batch.targets,
        }

    return collate


class LanguageModelTask(Task):
    """Summed token NLL for training (sampled labels for the true Fisher); the query measurement
    is the summed NLL of the targets the batch carries (the completion tokens)."""

    def __init__(self, modules: list[str]):
        self.modules = modules

    def _logits(self, batch: dict[str, Tensor], model: nn.Module) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> Tensor:
        logits = self._logits(batch, model)
        targets = batch["targets"]
        if sample:
            targets = sampled_targets(logits, targets)
        return summed_nll(logits, targets).sum()

    def compute_measurement(self, batch: dict, model: nn.Module) -> Tensor:
        return summed_nll(self._logits(batch, model), batch["targets"]).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch: dict) -> Tensor:
        return batch["attention_mask"]


@torch.no_grad()
def sampled_targets(logits: Tensor, targets: Tensor) -> Tensor:
    """Targets drawn from the model's predictive distribution where the batch has a target."""
    sampled = targets.clone()
    probs = torch.softmax(logits[:, :-1].float(), dim=-1)
    draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:2])
    mask = targets[:, 1:] != IGNORE
    sampled[:, 1:][mask] = draws[mask]
    return sampled


@dataclass
class Timed:
    value: object
    seconds: float


def timed(fn, *args, **kwargs) -> Timed:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return Timed(value, time.perf_counter() - start)


def kronfluence_scores(
    engine: QueryEngine,
    examples: list[Example],
    encoded: list[TokenizedQuery],
    work: Path,
    config: CompareConfig,
) -> dict:
    """Fit kronfluence's EK-FAC on the corpus, then a pairwise pass for all queries (scores
    `[Q, N]`) and one for a single query; their times."""
    loaded = engine.loaded
    names = [m.name for m in engine.manifest.modules]
    fit_examples = engine.manifest.curvature.fit_examples
    task = LanguageModelTask(names)
    model = prepare_model(linear_copy(loaded.model, names), task)
    analyzer = Analyzer(
        "demo", model, task, cpu=True, disable_tqdm=not config.progress, output_dir=str(work)
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_with(engine.pad_id)))
    rows = [e.token_ids for e in examples]
    train = SequenceDataset(rows, [1] * len(rows))
    queries = SequenceDataset([q.token_ids for q in encoded], [q.loss_start for q in encoded])
    factor_args = FactorArguments(
        strategy="ekfac",
        covariance_max_examples=fit_examples,
        lambda_max_examples=fit_examples,
    )
    fit = timed(
        analyzer.fit_all_factors,
        factors_name="ekfac",
        dataset=train,
        per_device_batch_size=config.batch_size,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )

    def pairwise(name: str, query_indices: list[int]) -> Timed:
        return timed(
            analyzer.compute_pairwise_scores,
            scores_name=name,
            factors_name="ekfac",
            query_dataset=queries,
            train_dataset=train,
            per_device_query_batch_size=len(query_indices),
            per_device_train_batch_size=config.batch_size,
            query_indices=query_indices,
            score_args=ScoreArguments(damping_factor=None),  # 0.1 x mean eigenvalue, as ours
            overwrite_output_dir=True,
        )

    every = pairwise("pairwise", list(range(len(encoded))))
    one = pairwise("pairwise-one", [0])
    return {
        "scores": analyzer.load_pairwise_scores("pairwise")["all_modules"].double().numpy(),
        "fit_seconds": fit.seconds,
        "pairwise_seconds": every.seconds,
        "pairwise_one_query_seconds": one.seconds,
    }


def exact_scores(
    engine: QueryEngine,
    examples: list[Example],
    encoded: list[TokenizedQuery],
    seed: int,
    config: CompareConfig,
) -> np.ndarray:
    """Exact EK-FAC scores `[Q, N]` with the index's curvature settings and this label seed."""
    curvature = replace(engine.manifest.curvature, seed=seed)
    exact_config = ExactConfig(curvature, batch_size=config.batch_size, progress=config.progress)
    return ExactScorer(engine.loaded, examples, exact_config).score(encoded)


def agreement(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, float]:
    """Mean Spearman over all examples and mean overlap of the top-k, `a, b [Q, N]`."""
    return {
        "spearman": metrics.mean(metrics.spearman(x, y) for x, y in zip(a, b, strict=True)),
        f"top{k}_agreement": metrics.mean(
            metrics.top_k_recall(y, metrics.top_k(x, k), k) for x, y in zip(a, b, strict=True)
        ),
    }


def query_latency(engine: QueryEngine, queries: list[Query]) -> list[float]:
    """Seconds per query through the service path, one query at a time, after a warm-up."""
    engine.query(queries[:1])
    return [timed(engine.query, [q]).seconds for q in queries]


def run(config: CompareConfig) -> dict:
    artifacts = demo_artifacts()
    queries = read_queries(artifacts.queries_path)
    inputs = [replace(q.query, top_k=config.k) for q in queries]
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp:
        work = Path(tmp)
        corpus = artifacts.corpus_path
        if config.documents:
            corpus = synthetic_corpus(work / "corpus.jsonl", config.documents)
        build = timed(
            build_index,
            BuildConfig(
                model=artifacts.model_dir,
                out=work / "index",
                corpus=CorpusConfig(str(corpus)),
                batch_size=config.batch_size,
                progress=config.progress,
            ),
        )
        engine = QueryEngine.open(work / "index")
        examples = matching_corpus(engine, None)
        encoded = [engine.prepare(q) for q in inputs]
        latency = query_latency(engine, inputs)
        q = engine.query_vectors(encoded)
        index_scores = sketch_scores(engine.vectors.preconditioned, q).dots
        kron = kronfluence_scores(engine, examples, encoded, work / "kronfluence", config)
        seed = engine.manifest.curvature.seed
        exact = [
            timed(exact_scores, engine, examples, encoded, s, config)
            for s in ((seed, seed + 1) if config.with_exact else ())
        ]
        engine.close()
    per_query = float(np.mean(latency))
    result = {
        "n_examples": len(examples),
        "n_queries": len(queries),
        "modules": len(engine.manifest.modules),
        "index": {
            "build_seconds": build.seconds,
            "build_phases": build.value.seconds,
            "query_seconds_mean": per_query,
            "query_seconds_median": float(np.median(latency)),
            "dim": build.value.dim,
            "rank": f"{engine.info.rank_out}x{engine.info.rank_in}",
        },
        "kronfluence": {
            "fit_factors_seconds": kron["fit_seconds"],
            "pairwise_pass_seconds": kron["pairwise_seconds"],
            "pairwise_pass_one_query_seconds": kron["pairwise_one_query_seconds"],
        },
        # One query through the index vs one kronfluence pairwise pass over the corpus, for one
        # query and for all queries at once.
        "speedup_vs_one_query_pass": kron["pairwise_one_query_seconds"] / per_query,
        "speedup_vs_all_queries_pass": kron["pairwise_seconds"] / per_query,
        "index_vs_kronfluence": agreement(index_scores, kron["scores"], config.k),
    }
    if exact:
        result["exact_seconds"] = exact[0].seconds
        result["exact_vs_kronfluence"] = agreement(exact[0].value, kron["scores"], config.k)
        result["index_vs_exact"] = agreement(index_scores, exact[0].value, config.k)
        # The reference's own Monte Carlo noise: the same EK-FAC fit with other sampled labels.
        result["exact_vs_exact_other_seed"] = agreement(exact[1].value, exact[0].value, config.k)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact reference scorer")
    parser.add_argument("--documents", type=int, help="synthetic corpus size (default: demo's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = CompareConfig(
        with_exact=not args.no_exact, documents=args.documents, progress=not args.quiet
    )
    emit(run(config), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
