"""Baselines an influence index must beat or explain: BM25 and plain gradient cosine.

Both score every example of the corpus for a batch of queries and return `[n_queries, N]`
arrays in corpus row order, like the exact reference scorer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from indexer.corpus import Example
from indexer.exact import DEFAULT_MEMORY_LIMIT, full_gradient_sketcher
from indexer.model import LoadedModel
from indexer.passes import ExamplePass
from indexer.query import TokenizedQuery, query_capture
from indexer.sketch import Capture

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercase word tokens (letters, digits, underscore), the BM25 vocabulary."""
    return _WORD.findall(text.lower())


class BM25Scorer:
    """Okapi BM25 over the examples' texts (one chunk = one BM25 document)."""

    def __init__(self, texts: Sequence[str]):
        from rank_bm25 import BM25Okapi  # the `eval` extra; the serving install leaves it out

        self._bm25 = BM25Okapi([words(t) for t in texts])

    def score(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 scores `[n_queries, N]`."""
        return np.stack([self._bm25.get_scores(words(q)) for q in queries])


@dataclass
class StreamedScores:
    """Inner products `[n_queries, N]` of query vectors with every example's vector, and the
    examples' vector norms `[N]` (for cosine), both by corpus row."""

    dots: np.ndarray
    norms: np.ndarray

    def cosine(self, query_norms: np.ndarray) -> np.ndarray:
        """Cosine similarities `[n_queries, N]` given the query norms `[n_queries]`."""
        scale = np.outer(query_norms, self.norms)
        return self.dots / np.maximum(scale, 1e-30)


@dataclass(frozen=True)
class ScoreTarget:
    """How to turn a batch's capture into example vectors `[batch, D]`, and the queries
    `[Q, D]` to score them against."""

    vectorize: Callable[[Capture], Tensor]
    queries: Tensor


def stream_scores(
    example_pass: ExamplePass, targets: dict[str, ScoreTarget], desc: str
) -> dict[str, StreamedScores]:
    """One pass over the corpus scoring every target: per batch, each target vectorizes the
    capture and takes inner products with its queries.

    Only one batch of example vectors exists at a time, never an `[N, D]` matrix.
    """
    n = len(example_pass.examples)
    queries = {name: t.queries.double() for name, t in targets.items()}
    out = {
        name: StreamedScores(np.zeros((q.shape[0], n)), np.zeros(n)) for name, q in queries.items()
    }
    for rows, capture in example_pass.run(list(range(n)), "data", desc):
        for name, target in targets.items():
            vectors = target.vectorize(capture).double()
            out[name].dots[:, rows] = (queries[name] @ vectors.T).cpu().numpy()
            out[name].norms[rows] = vectors.norm(dim=1).cpu().numpy()
    return out


def flat_gradients(capture: Capture, names: Sequence[str]) -> Tensor:
    """Per-example weight gradients of the named modules, flattened in that order:
    `[batch, D_full]`. With identity projections a capture's sketches are the gradients `G`."""
    sketches = capture.sketches()
    return torch.cat([sketches[name].flatten(1) for name in names], dim=1)


@dataclass(frozen=True)
class GradientCosineConfig:
    modules: str | None = None  # the index's module pattern, so both track the same weights
    batch_size: int = 32
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT
    progress: bool = False


class GradientCosine:
    """Cosine of full, unpreconditioned per-example gradients with the query's gradient.

    The query gradient is that of the completion-only loss; the training gradients are those of
    the summed sequence NLL, as in the index.
    """

    def __init__(self, loaded: LoadedModel, examples: list[Example], config: GradientCosineConfig):
        self.sketcher = full_gradient_sketcher(
            loaded, config.modules, config.batch_size, config.memory_limit_bytes, "gradient cosine"
        )
        self.pad_id = loaded.tokenizer.pad_token_id
        no_sampling = 0  # the pass uses the data's labels, so the label-sampling seed is unused
        self.pass_ = ExamplePass(
            self.sketcher, examples, self.pad_id, config.batch_size, no_sampling, config.progress
        )

    def score(self, queries: list[TokenizedQuery]) -> np.ndarray:
        """Cosine similarities `[n_queries, N]`."""
        names = list(self.sketcher.modules)
        q = flat_gradients(query_capture(self.sketcher, queries, self.pad_id), names)
        target = ScoreTarget(partial(flat_gradients, names=names), q)
        streamed = stream_scores(self.pass_, {"cosine": target}, "gradient cosine")["cosine"]
        return streamed.cosine(q.double().norm(dim=1).cpu().numpy())
