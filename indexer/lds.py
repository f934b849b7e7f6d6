"""The linear datamodeling score (LDS, Park et al. 2023, TRAK): truth against retraining.

M random subsets of the corpus's documents; the model retrained on each (`benchmarks/lds.py`)
gives every query's completion loss `L[m, q]`. A method's scores `τ[q, n]` predict that the
model trained on subset `S_m` has a *lower* loss the larger `Σ_{n ∈ S_m} τ[q, n]` (a positive
score means up-weighting n raises log p(completion | prompt)), so

    LDS = mean_q Spearman_m( Σ_{n ∈ S_m} τ[q, n],  −L[m, q] ).

The retrainings live in one JSON file (`RetrainCache`), keyed by the hashes of the corpus, the
training recipe, the subsets, the queries and the weights of the model trained on the whole
corpus (the one whose scores are judged), with a checksum over all of it: a corrupt file or one
made for something else is refused in one line, never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from indexer.corpus import Document
from indexer.errors import InvalidInputError
from indexer.metrics import spearman
from indexer.query import LabeledQuery

CACHE_FORMAT = "influence-index-lds/1"
# How every cache file starts (`RetrainCache.to_json`): a truncated one still does.
CACHE_HEADER = json.dumps({"format": CACHE_FORMAT})[:-1]
BOOTSTRAP_RESAMPLES = 2000
MIN_SUBSETS = 10
CONFIDENCE = 0.95


def json_sha256(value: object) -> str:
    """sha256 (hex) of `value`'s canonical JSON."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def corpus_sha256(documents: Iterable[Document]) -> str:
    """sha256 over the documents' ids and texts, in corpus order."""
    return json_sha256([[d.doc_id, d.text] for d in documents])


def queries_sha256(queries: Sequence[LabeledQuery]) -> str:
    """sha256 over the queries' ids, prompts and completions, in order."""
    return json_sha256([list(_query_record(q).values()) for q in queries])


def _query_record(query: LabeledQuery) -> dict[str, str]:
    return {"id": query.id, "prompt": query.query.prompt, "completion": query.query.completion}


def random_subsets(n_documents: int, n_subsets: int, fraction: float, seed: int) -> list[list[int]]:
    """`n_subsets` sorted lists of `round(fraction · n_documents)` distinct document indices,
    drawn without replacement from one seeded generator."""
    if not 0 < fraction < 1:
        raise InvalidInputError(f"subset fraction must lie in (0, 1), got {fraction}")
    size = round(fraction * n_documents)
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n_documents, size, replace=False).tolist()) for _ in range(n_subsets)]


@dataclass(frozen=True)
class RetrainKey:
    """What the retrainings were made for (hex sha256 each)."""

    corpus: str  # `corpus_sha256` of the documents
    recipe: str  # the training settings, the retraining code's version included
    subsets: str  # the document ids and each subset's members
    queries: str  # `queries_sha256`
    model: str  # weights of the model trained on the whole corpus: the one scored


@dataclass
class RetrainCache:
    """Retrained models' completion losses: `losses[(m, seed)] [Q]` (summed NLL, nats) of the
    model trained with `seed` on documents `subsets[m]` (indices into `doc_ids`)."""

    key: RetrainKey
    doc_ids: list[str]
    queries: list[dict[str, str]]  # id, prompt, completion
    subsets: list[list[int]]
    recipe: dict
    losses: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    seconds: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)  # wall, cpu

    def missing(self, seeds: Sequence[int]) -> list[tuple[int, int]]:
        """The (subset, seed) retrainings still to run, subset by subset within each seed."""
        return [
            (m, s) for s in seeds for m in range(len(self.subsets)) if (m, s) not in self.losses
        ]

    def usable(self) -> tuple[list[int], list[int]]:
        """What an LDS can use so far: the subsets retrained with the first seed (all of them
        once it is complete: the subsets are random, so any of them are a random sample), and
        the seeds that retrained every one of those subsets."""
        seeds = sorted({s for _, s in self.losses})
        if not seeds:
            return [], []
        subsets = [m for m in range(len(self.subsets)) if (m, seeds[0]) in self.losses]
        return subsets, [s for s in seeds if all((m, s) in self.losses for m in subsets)]

    def loss_matrix(self, subsets: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        """Losses `[len(subsets), Q]` of the given subsets, averaged over `seeds`;
        InvalidInputError below `MIN_SUBSETS` subsets (a Spearman over so few says nothing)."""
        if len(subsets) < MIN_SUBSETS:
            raise InvalidInputError(
                f"LDS cache holds {len(subsets)} retrained subsets, under the {MIN_SUBSETS} an "
                "LDS needs: retrain more with benchmarks/lds.py"
            )
        return np.mean([[self.losses[(m, s)] for m in subsets] for s in seeds], axis=0)

    def to_json(self) -> str:
        body = {
            "key": asdict(self.key),
            "doc_ids": self.doc_ids,
            "queries": self.queries,
            "subsets": self.subsets,
            "recipe": self.recipe,
            "retrains": [
                {"subset": m, "seed": s, "losses": losses, **self.seconds.get((m, s), {})}
                for (m, s), losses in sorted(self.losses.items())
            ],
        }
        return json.dumps({"format": CACHE_FORMAT, "sha256": json_sha256(body), "body": body})


def new_cache(
    documents: Sequence[Document],
    queries: Sequence[LabeledQuery],
    subsets: list[list[int]],
    recipe: dict,
    model_sha256: str,
) -> RetrainCache:
    """An empty cache for retraining on `subsets` of `documents` with `recipe`, judging the
    model (weights' sha256) trained on all of them, on `queries`."""
    doc_ids = [d.doc_id for d in documents]
    key = RetrainKey(
        corpus=corpus_sha256(documents),
        recipe=json_sha256(recipe),
        subsets=json_sha256({"doc_ids": doc_ids, "subsets": subsets}),
        queries=queries_sha256(queries),
        model=model_sha256,
    )
    return RetrainCache(key, doc_ids, [_query_record(q) for q in queries], subsets, recipe)


def write_cache(cache: RetrainCache, path: Path) -> None:
    """Replace `path` by the cache atomically (temporary file, fsync, rename): a kill leaves the
    previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(cache.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_cache(path: Path) -> RetrainCache:
    """The cache in `path`; InvalidInputError (one line) when it is unreadable, not a cache
    (some other file), or a corrupt cache."""
    try:
        text = Path(path).read_text(errors="replace")  # a binary file is no cache either
    except OSError as e:
        raise InvalidInputError(f"cannot read LDS cache {path}: {e.strerror}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        if text.startswith(CACHE_HEADER):
            raise _corrupt(path, f"not JSON: {e}") from e
        data = None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        # Not a file to delete: the path is likely a mistake (e.g. the corpus).
        raise InvalidInputError(
            f"{path} is not an LDS cache ({CACHE_FORMAT} JSON, as benchmarks/lds.py writes)"
        )
    body = data.get("body")
    try:
        checksum_ok = data.get("sha256") == json_sha256(body)
    except (TypeError, ValueError):  # NaN or a non-JSON value cannot be the written body
        checksum_ok = False
    if not checksum_ok:
        raise _corrupt(path, "checksum mismatch")
    try:
        return _from_body(body)
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, f"malformed ({type(e).__name__}: {e})") from e


def _corrupt(path: Path, why: str) -> InvalidInputError:
    return InvalidInputError(f"LDS cache {path} is corrupt ({why}): delete it and retrain")


def _from_body(body: dict) -> RetrainCache:
    key = RetrainKey(**{f.name: str(body["key"][f.name]) for f in fields(RetrainKey)})
    doc_ids = [str(d) for d in body["doc_ids"]]
    queries = [{k: str(q[k]) for k in ("id", "prompt", "completion")} for q in body["queries"]]
    subsets = [[int(i) for i in s] for s in body["subsets"]]
    if any(not 0 <= i < len(doc_ids) for s in subsets for i in s):
        raise ValueError("a subset names a document outside the corpus")
    cache = RetrainCache(key, doc_ids, queries, subsets, dict(body["recipe"]))
    for entry in body["retrains"]:
        where = (int(entry["subset"]), int(entry["seed"]))
        losses = [float(v) for v in entry["losses"]]
        if not 0 <= where[0] < len(subsets) or len(losses) != len(queries):
            raise ValueError(f"retraining {where} does not fit the subsets and queries")
        cache.losses[where] = losses
        cache.seconds[where] = {k: float(entry[k]) for k in ("wall", "cpu") if k in entry}
    return cache


def check_key(cache: RetrainCache, expected: RetrainKey, path: Path) -> None:
    """InvalidInputError naming every field of the key that differs from `expected`."""
    differ = [
        f.name
        for f in fields(RetrainKey)
        if getattr(cache.key, f.name) != getattr(expected, f.name)
    ]
    if differ:
        raise InvalidInputError(
            f"LDS cache {path} was made for another {', '.join(differ)}: delete it, or pass "
            "the cache made for this one"
        )


def membership(
    subsets: Sequence[Sequence[int]], doc_ids: Sequence[str], row_docs: Sequence[str]
) -> np.ndarray:
    """Boolean `[M, N]`: whether corpus row n's document lies in subset m.

    `row_docs [N]` is each scored row's document id (a chunked document has several rows);
    InvalidInputError when a row's document is not one of the cache's. A cache's document
    may have no rows: an empty text has no examples, so it adds nothing to any sum (that the
    corpus is the cache's is `RetrainKey.corpus`'s to check).
    """
    index = {d: i for i, d in enumerate(doc_ids)}
    unknown = sorted(set(row_docs) - index.keys())
    if unknown:
        raise InvalidInputError(
            f"the scored corpus and the LDS cache differ in {len(unknown)} documents "
            f"(e.g. {unknown[0]!r})"
        )
    in_subset = np.zeros((len(subsets), len(doc_ids)), dtype=bool)
    for m, members in enumerate(subsets):
        in_subset[m, members] = True
    return in_subset[:, [index[d] for d in row_docs]]


def subset_sums(scores: np.ndarray, in_subset: np.ndarray) -> np.ndarray:
    """Predicted effects `[Q, M]`: each query's scores `[Q, N]` summed over each subset's rows
    (`in_subset [M, N]`)."""
    return scores @ in_subset.T.astype(scores.dtype)


def lds_per_query(scores: np.ndarray, in_subset: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per-query LDS `[Q]`: Spearman over the M subsets between the summed scores (`scores
    [Q, N]`, `in_subset [M, N]`) and the negated retrained losses `losses [M, Q]`. NaN where a
    side is constant (e.g. a method that scores nothing for that query)."""
    predicted = subset_sums(scores, in_subset)
    return np.array([spearman(predicted[q], -losses[:, q]) for q in range(scores.shape[0])])


@dataclass(frozen=True)
class Estimate:
    """A mean over queries and its percentile bootstrap interval (queries resampled with
    replacement; NaN queries left out)."""

    mean: float
    low: float
    high: float
    n: int


def bootstrap_mean(
    values: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Mean of `values [Q]` (NaN ignored) with a percentile interval over `resamples` resamplings
    of the queries. The interval covers which queries were asked, not retraining noise."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[~np.isnan(finite)]
    if not len(finite):
        return Estimate(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, len(finite), (resamples, len(finite)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(float(finite.mean()), float(low), float(high), len(finite))
