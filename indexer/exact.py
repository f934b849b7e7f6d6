"""The exact reference scorer: EK-FAC influence with no projection (P = R = I).

It fits full EK-FAC factors on the same subsample and with the same sampled labels as a build,
then streams the corpus and scores a batch of queries against every example. It is the ground
truth for fidelity and the engine of optional exact re-ranking; practical for small models only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from indexer.config import CurvatureConfig
from indexer.corpus import Example
from indexer.curvature import Curvature, fit_curvature, subsample
from indexer.errors import ResourceLimitError
from indexer.model import LoadedModel, module_shape, tracked_modules
from indexer.passes import ExamplePass
from indexer.query import TokenizedQuery, query_vectors
from indexer.sketch import GradientSketcher, Projection

DEFAULT_MEMORY_LIMIT = 8 << 30


@dataclass(frozen=True)
class ExactConfig:
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    modules: str | None = None
    batch_size: int = 8
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT
    progress: bool = False


def required_bytes(modules: dict, batch_size: int, n_queries: int) -> int:
    """float32 bytes for full factors, a batch of per-example gradients (x3 in flight), queries."""
    total = 0
    for module in modules.values():
        s = module_shape(module)
        gradient = s.d_out * s.d_in
        total += s.d_in**2 * 2 + s.d_out**2 * 2 + gradient  # float64 covariances, Λ
        total += gradient * (3 * batch_size + n_queries)
    return 4 * total


def full_gradient_sketcher(
    loaded: LoadedModel, pattern: str | None, batch_size: int, limit_bytes: int, what: str
) -> GradientSketcher:
    """A sketcher with identity projections, whose sketches are the full per-example gradients
    `G`; ResourceLimitError (naming `what`) when those and full factors would not fit."""
    modules = tracked_modules(loaded.model, pattern)
    need = required_bytes(modules, batch_size, n_queries=64)
    if need > limit_bytes:
        raise ResourceLimitError(
            f"{what} needs ~{need / 2**30:.1f} GiB for full gradients and factors, over the "
            f"limit of {limit_bytes / 2**30:.1f} GiB: it is for small models (use the index, or "
            "fewer modules with --modules)"
        )
    return GradientSketcher(loaded.model, modules, {n: Projection(None, None) for n in modules})


class ExactScorer:
    """Full-space EK-FAC influence of queries on every example of a corpus."""

    def __init__(self, loaded: LoadedModel, examples: list[Example], config: ExactConfig):
        self.loaded = loaded
        self.config = config
        self.sketcher = full_gradient_sketcher(
            loaded, config.modules, config.batch_size, config.memory_limit_bytes, "exact EK-FAC"
        )
        self.pass_ = ExamplePass(
            self.sketcher,
            examples,
            loaded.tokenizer.pad_token_id,
            config.batch_size,
            config.curvature.seed,
            config.progress,
        )
        self._curvature: Curvature | None = None

    @property
    def curvature(self) -> Curvature:
        """Full EK-FAC factors, fitted on first use."""
        if self._curvature is None:
            rows = subsample(
                len(self.pass_.examples),
                self.config.curvature.fit_examples,
                self.config.curvature.seed,
            )
            self._curvature = fit_curvature(self.pass_, rows, self.config.curvature.damping)
        return self._curvature

    def score(self, queries: list[TokenizedQuery], rows: list[int] | None = None) -> np.ndarray:
        """Influence `[n_queries, n_rows]` of each example row (default: all) on each query."""
        curvature = self.curvature
        q = query_vectors(self.sketcher, curvature, queries, self.loaded.tokenizer.pad_token_id)
        rows = list(range(len(self.pass_.examples))) if rows is None else rows
        column = {row: i for i, row in enumerate(rows)}
        scores = np.zeros((len(queries), len(rows)), dtype=np.float64)
        for batch_rows, capture in self.pass_.run(rows, "data", "exact scores"):
            block = (q @ curvature.vectors(capture).T).double().numpy()
            scores[:, [column[r] for r in batch_rows]] = block
        return scores
