"""Exact EK-FAC influence, with no projection (P = R = I).

`ExactScorer` fits full EK-FAC factors on the same subsample and with the same sampled labels
as a build, then streams the corpus and scores a batch of queries against every example: the
ground truth for fidelity, practical for small models only. `ExactReranker` scores only a
query's retrieved candidates, with the full factors a build stored: the second stage of an
answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

from indexer.config import CurvatureConfig, ScoreKind, check_batch_size
from indexer.corpus import Example
from indexer.curvature import Curvature, fit_curvature, subsample
from indexer.errors import InvalidInputError, ResourceLimitError
from indexer.model import LoadedModel, module_shape, modules_named, tracked_modules
from indexer.passes import ExamplePass
from indexer.query import TokenizedQuery, query_vectors
from indexer.sketch import Capture, GradientSketcher, Projection, make_batch

DEFAULT_MEMORY_LIMIT = 8 << 30


@dataclass(frozen=True)
class ExactConfig:
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    modules: str | None = field(
        default=None,
        metadata={"help": "regex of module names to track (default: as build's default)"},
    )
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward pass"})
    memory_limit_bytes: int = field(
        default=DEFAULT_MEMORY_LIMIT,
        metadata={
            "help": "refuse models whose full factors need more",
            "flags": ("--memory-limit-gb",),
            "unit": 1 << 30,
        },
    )
    progress: bool = False

    def __post_init__(self) -> None:
        """Refuse, before any pass, what a build refuses too."""
        check_batch_size(self.batch_size)
        self.curvature.check()


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

    def __init__(
        self,
        loaded: LoadedModel,
        examples: list[Example],
        config: ExactConfig,
        curvature: Curvature | None = None,
    ):
        """`curvature`: full factors fitted already (e.g. a version's); default: fit them."""
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
        self._curvature = curvature

    @property
    def curvature(self) -> Curvature:
        """Full EK-FAC factors, fitted on first use."""
        if self._curvature is None:
            rows = subsample(
                (e.example_id for e in self.pass_.examples),
                self.config.curvature.fit_examples,
                self.config.curvature.seed,
            )
            self._curvature = fit_curvature(self.pass_, rows, self.config.curvature.damping).sketch
        return self._curvature

    def score(self, queries: list[TokenizedQuery], rows: list[int] | None = None) -> np.ndarray:
        """Influence `[n_queries, n_rows]` of each example row (default: all) on each query."""
        curvature = self.curvature
        q = query_vectors(self.sketcher, curvature, queries, self.loaded.tokenizer.pad_token_id)
        rows = list(range(len(self.pass_.examples))) if rows is None else rows
        column = {row: i for i, row in enumerate(rows)}
        scores = np.zeros((len(queries), len(rows)), dtype=np.float64)
        for batch_rows, capture in self.pass_.run(rows, "data", "exact scores"):
            block = (q @ curvature.vectors(capture).T).double().cpu().numpy()
            scores[:, [column[r] for r in batch_rows]] = block
        return scores


@dataclass(frozen=True)
class ExactScores:
    """Exact scores of one query's candidates, in the order given: `influence [n]`, and
    `cosine [n]` when the score kind asked for the candidates' preconditioned norms."""

    influence: np.ndarray
    cosine: np.ndarray | None = None

    @property
    def scores(self) -> np.ndarray:
        """Exact scores `[n]` in the index's kind: cosine where the kind asked for it."""
        return np.asarray(self.influence if self.cosine is None else self.cosine)


class ExactReranker:
    """Exact EK-FAC scores of retrieved candidates: one batched forward/backward over their
    tokens (training loss) with identity projections.

    Influence contracts every token with the query's preconditioned full-space gradient,
    `Σ_l Σ_t g_tᵀ M_l a_t` with `M_l = (H_l + λ)⁻¹ G_q,l`, and never forms a per-example
    gradient. Cosine divides that by the candidate's exact preconditioned norm, which does not
    depend on the query: the build stored it in the metadata.
    """

    def __init__(self, model: nn.Module, curvature: Curvature, pad_id: int, batch_size: int):
        modules = modules_named(model, curvature.modules)
        self.sketcher = GradientSketcher(model, modules, curvature.projections())
        self.curvature = curvature
        self.pad_id = pad_id
        self.batch_size = batch_size

    def targets(self, queries: Capture, *, rotated: bool = False) -> QueryTargets:
        """What the queries' candidates are scored against, from the unprojected capture of the
        queries' pass (`Capture.unprojected`): computed once, however many rounds score.
        `rotated`: in the form `Curvature.norms` scores with (the build's main pass), not the
        folded one `score` contracts."""
        per_module, squared = {}, 0
        for name, module in self.curvature.modules.items():
            # One module's preconditioned gradients `[Q, d_out * d_in]` at a time.
            vectors = module.precondition_tokens(queries.gradients[name], queries.activations[name])
            squared = squared + vectors.double().square().sum(dim=1)
            per_module[name] = module.rotated_targets(vectors) if rotated else module.fold(vectors)
        return QueryTargets(per_module, squared.sqrt().cpu().numpy(), rotated)

    def score(
        self,
        targets: QueryTargets,
        wanted: list[list[int]],
        tokens: dict[int, list[int]],
        norms: dict[int, float | None],
        kind: ScoreKind,
    ) -> list[ExactScores]:
        """`wanted[q]`: ids of the candidates of `targets`' query q; `tokens`: the token ids of
        every candidate to pass over (at least those wanted); `norms`: every candidate's exact
        preconditioned norm (a cosine index's metadata holds them; unused for influence)."""
        return exact_scores(self.dots(targets, tokens), wanted, targets.norms, norms, kind)

    def dots(self, targets: QueryTargets, tokens: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """Exact influence `[Q]` of each example of `tokens` (id: token ids) on each query."""
        dots = {}
        for chunk, capture in self._passes(list(tokens), tokens):
            dots.update(zip(chunk, self._influence_batch(capture, targets).T, strict=True))
        return dots

    def _passes(self, ids: list[int], tokens: dict[int, list[int]]):
        """`(ids of the batch, capture)` for `ids` in length order, `batch_size` at a time."""
        ordered = sorted(ids, key=lambda i: len(tokens[i]))
        for start in range(0, len(ordered), self.batch_size):
            chunk = ordered[start : start + self.batch_size]
            sequences = [tokens[i] for i in chunk]
            batch = make_batch(sequences, [1] * len(chunk), self.pad_id, [0] * len(chunk))
            yield chunk, self.sketcher.run(batch, "data")

    def _influence_batch(self, capture: Capture, targets: QueryTargets) -> np.ndarray:
        """Exact influence `[Q, batch]`: each token contracted with each query's `M_l`."""
        scores = self.curvature.example_scores(capture, targets.per_module)
        return scores.double().cpu().numpy()


def exact_scores(
    dots: dict[int, np.ndarray],
    wanted: list[list[int]],
    query_norms: np.ndarray,
    norms: dict[int, float | None],
    kind: ScoreKind,
) -> list[ExactScores]:
    """Per query q, the exact scores of its candidates `wanted[q]` from their influence on
    every query `dots[id] [Q]`: divided, for cosine, by the queries' exact preconditioned norms
    `query_norms [Q]` and the candidates' `norms`."""
    influence = [np.array([dots[i][q] for i in ids]) for q, ids in enumerate(wanted)]
    if kind != ScoreKind.COSINE:
        return [ExactScores(d) for d in influence]
    return [
        ExactScores(d, d / np.maximum(query_norms[q] * _norms_of(ids, norms), 1e-30))
        for q, (d, ids) in enumerate(zip(influence, wanted, strict=True))
    ]


def _norms_of(ids: list[int], norms: dict[int, float | None]) -> np.ndarray:
    return np.array([norms[i] for i in ids], dtype=np.float64)


@dataclass(frozen=True)
class QueryTargets:
    """What candidates are scored against: per module `M_l [Q, d_out, d_in]` (`rotated`: `q_l
    / sqrt(Λ+λ)` `[Q, d_out * d_in]`, see `ModuleCurvature.rotated_targets`), and the
    preconditioned query vectors' norms `[Q]`."""

    per_module: dict[str, Tensor]
    norms: np.ndarray
    rotated: bool = False

    def select(self, rows: list[int]) -> QueryTargets:
        """The targets of queries `rows` only, in that order."""
        chosen = {n: m[rows] for n, m in self.per_module.items()}
        return QueryTargets(chosen, self.norms[rows], self.rotated)


def exact_top_hits(
    loaded: LoadedModel,
    examples: list[Example],
    queries: list[TokenizedQuery],
    config: ExactConfig,
    top_k: int,
) -> list[list[dict[str, object]]]:
    """Each query's `top_k` examples by exact EK-FAC influence over all of `examples`, best
    first, as `{example_id, doc_id, chunk, score}` (what `influence-index exact` reports)."""
    check_top_k(top_k)
    scores = ExactScorer(loaded, examples, config).score(queries)
    return [
        [
            {
                "example_id": examples[i].example_id,
                "doc_id": examples[i].doc_id,
                "chunk": examples[i].chunk,
                "score": float(row[i]),
            }
            for i in row.argsort()[::-1][:top_k]
        ]
        for row in scores
    ]


def check_top_k(top_k: int) -> None:
    """InvalidInputError for a `top_k` under 1 (a negative one would slice from the end)."""
    if top_k < 1:
        raise InvalidInputError(f"-k must be at least 1, got {top_k}")
