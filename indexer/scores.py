"""Scores: the space a query is scored in (`ScoreSpace`), and how far the sketch's score may be
from the exact one (`RerankBound`): the bound that lets the exact stage stop early, fitted per
version by the build on pseudo-queries' candidates.

The bound compares scores in cosine units: a candidate's sketch cosine `x` against its exact score
divided by its scale (1 for a cosine index; the sketch norms `‖q‖·‖v‖` for influence, so that
one bound serves queries and examples of any size). A candidate at sketch rank r then scores
exactly at most `(slope·x + intercept + residual(r)) · scale`, with the calibrated probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from indexer.config import ScoreKind

# Bands of sketch ranks with a residual each: the error is larger at the top of a ranking.
DEFAULT_RANK_EDGES = (0, 16, 32, 64, 128)


@dataclass(frozen=True)
class ScoreSpace:
    """Where the index scores one query: its score kind, the vector it is searched with `[D]`
    (the query's preconditioned vector, unit-normalised for cosine) and the query's norm. An
    index score (`search · stored vector`) and the example's norm give both scores."""

    kind: ScoreKind
    search: np.ndarray
    norm: float

    @classmethod
    def of(cls, kind: ScoreKind, vector: np.ndarray) -> ScoreSpace:
        """The space of a preconditioned query vector `[D]`."""
        norm = float(np.linalg.norm(vector))
        return cls(kind, vector / max(norm, 1e-30) if kind == ScoreKind.COSINE else vector, norm)

    def both(self, scores: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(influence, cosine)` of index scores `[n, ...]` of examples whose norms `[n, ...]`
        broadcast with them. Where the example or the query has no gradient (norm 0) both are
        0: its stored code decodes to quantisation noise, not to a score."""
        scale = self.norm * norms
        live = scale > 0
        if self.kind == ScoreKind.COSINE:
            cosine = np.where(live, scores, 0.0)
            return cosine * scale, cosine
        influence = np.where(live, scores, 0.0)
        return influence, influence / np.where(live, scale, 1.0)

    def cosine_units(self, scores: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Scores of this kind `[n]` (sketch or exact) divided by `cosine_scale(norms)`: the
        units the re-rank bound compares them in; 0 where the scale is 0."""
        return self.both(scores, norms)[1]

    def cosine_scale(self, norms: np.ndarray) -> np.ndarray:
        """What divides scores of this kind of examples with sketch norms `norms [n]` to put
        them in cosine units `[n]`: 1 for a cosine index, `‖q‖·‖v_n‖` for influence (exact
        scores too: the bound compares both in these units)."""
        if self.kind == ScoreKind.COSINE:
            return np.ones_like(norms, dtype=np.float64)
        return self.norm * norms


@dataclass(frozen=True)
class CorpusNoise:
    """How an example's sketch cosine `x` tracks its exact score `y` (cosine units) away from
    the top of a ranking, per query: `x − x̄ = (y − ȳ) / scale + noise` with noise of
    `variance`, and `y ≈ scale·x + offset` on average. An influence sketch's cosine units
    are not exact influence's (its norms are the sketch's), hence the scale."""

    scale: float
    offset: float
    variance: float


@dataclass(frozen=True)
class RerankBound:
    """How much higher than its calibrated sketch estimate a candidate's exact score may be.

    `rank_edges[b]` starts band b of sketch ranks (0-based; the last band is open-ended);
    `residuals[b]` is the `quantile` of `exact − (slope·x + intercept)` (cosine units) over
    the calibration pairs in that band: errors are larger at the top of a ranking, where the
    scores are. The line is fitted on candidates, the top of rankings; the rest of the corpus
    has a noise model of its own (`CorpusNoise`'s fields, None in versions built before it
    was measured)."""

    slope: float
    intercept: float
    rank_edges: tuple[int, ...]
    residuals: tuple[float, ...]
    quantile: float
    n_queries: int
    n_pairs: int
    corpus_scale: float | None = None
    corpus_offset: float | None = None
    noise_variance: float | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the manifest hashable and comparable.
        object.__setattr__(self, "rank_edges", tuple(self.rank_edges))
        object.__setattr__(self, "residuals", tuple(self.residuals))

    def __str__(self) -> str:
        bands = ", ".join(
            f"ranks {start}+: {residual:+.3g}"
            for start, residual in zip(self.rank_edges, self.residuals, strict=True)
        )
        corpus = self.corpus_noise
        noise = (
            ""
            if corpus is None
            else f"; elsewhere: exact ≈ {corpus.scale:.3g}·cosine {corpus.offset:+.3g}, its "
            f"noise σ² {corpus.variance:.3g}"
        )
        return (
            f"exact (cosine units) ≤ {self.slope:.3g}·cosine {self.intercept:+.3g} + ({bands}) "
            f"with probability {self.quantile} ({self.n_pairs} pairs of {self.n_queries} "
            f"pseudo-queries{noise})"
        )

    def estimate(self, cosines: np.ndarray) -> np.ndarray:
        """Calibrated estimates `[n]` of exact scores in cosine units."""
        return self.slope * cosines + self.intercept

    def corpus_estimates(self, cosines: np.ndarray) -> np.ndarray:
        """Estimates `[Q, N]` of the exact scores (cosine units) of a whole corpus from each
        query's sketch cosines on it `[Q, N]`: shrunk towards the query's mean cosine by the
        share of their variance that is not the sketch's noise, then scaled by
        `CorpusNoise`'s line, the least-squares estimate under the corpus's noise model (the
        candidates' line overstates the many small scores). Without one, the line."""
        corpus = self.corpus_noise
        if corpus is None:
            return self.estimate(cosines)
        mean = cosines.mean(axis=1, keepdims=True)
        spread = np.maximum(cosines.var(axis=1, keepdims=True), 1e-30)
        signal_share = np.clip(1.0 - corpus.variance / spread, 0.0, 1.0)
        return corpus.scale * (mean + signal_share * (cosines - mean)) + corpus.offset

    @property
    def corpus_noise(self) -> CorpusNoise | None:
        fields = (self.corpus_scale, self.corpus_offset, self.noise_variance)
        return None if None in fields else CorpusNoise(*fields)

    def upper(self, cosines: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Upper bounds `[n]` (cosine units) of the exact scores of candidates with sketch
        cosines `cosines [n]` at sketch ranks `ranks [n]`."""
        bands = np.searchsorted(np.asarray(self.rank_edges), ranks, side="right") - 1
        return self.estimate(cosines) + np.asarray(self.residuals)[bands]


def fit_rerank_bound(
    cosines: Sequence[np.ndarray],
    exact: Sequence[np.ndarray],
    quantile: float,
    rank_edges: Sequence[int] = DEFAULT_RANK_EDGES,
    corpus: CorpusNoise | None = None,
) -> RerankBound:
    """Fit the bound on pseudo-queries: `cosines[q] [n_q]` are query q's candidates' sketch
    cosines in sketch order (rank 0 first), `exact[q] [n_q]` their exact scores in cosine
    units. A band no pair reaches takes the residual of the band above it. `corpus`: the
    corpus's noise model (`fit_corpus_noise`), recorded as it is."""
    x = np.concatenate(cosines).astype(np.float64)
    y = np.concatenate(exact).astype(np.float64)
    if x.size < 2:
        raise ValueError("calibrating the re-rank bound needs at least two candidate pairs")
    slope, intercept = np.polyfit(x, y, 1)
    ranks = np.concatenate([np.arange(len(c)) for c in cosines])
    residual = y - (slope * x + intercept)
    bands = np.searchsorted(np.asarray(rank_edges), ranks, side="right") - 1
    residuals: list[float] = []
    for band in range(len(rank_edges)):
        inside = residual[bands == band]
        residuals.append(float(np.quantile(inside, quantile)) if inside.size else residuals[-1])
    return RerankBound(
        slope=float(slope),
        intercept=float(intercept),
        rank_edges=tuple(rank_edges),
        residuals=tuple(residuals),
        quantile=quantile,
        n_queries=len(cosines),
        n_pairs=int(x.size),
        corpus_scale=None if corpus is None else corpus.scale,
        corpus_offset=None if corpus is None else corpus.offset,
        noise_variance=None if corpus is None else corpus.variance,
    )


def fit_corpus_noise(
    sketch: Sequence[np.ndarray], exact: Sequence[np.ndarray]
) -> CorpusNoise | None:
    """The noise model of pseudo-queries' sketch cosines `sketch[q] [n_q]` against their exact
    scores `exact[q] [n_q]` (cosine units) on examples drawn uniformly: each query's sketch
    cosines, centred, regressed on its exact scores, centred, all queries pooled, for the
    scale and the noise; the offset over the pairs as they are. None without a positive
    relation."""
    pairs = [(x, y) for x, y in zip(sketch, exact, strict=True) if x.size]
    if not pairs:
        return None
    x, y = (np.concatenate(side) for side in zip(*pairs, strict=True))
    x_centred = np.concatenate([xs - xs.mean() for xs, _ in pairs])
    y_centred = np.concatenate([ys - ys.mean() for _, ys in pairs])
    slope = float(x_centred @ y_centred) / max(float(y_centred @ y_centred), 1e-300)
    if not (np.isfinite(slope) and slope > 0):
        return None
    variance = float(np.mean((x_centred - slope * y_centred) ** 2))
    return CorpusNoise(scale=1.0 / slope, offset=float(np.mean(y - x / slope)), variance=variance)
