"""Tiered candidate retrieval: a compact code per example, scanned first.

A flat scan reads every stored byte (D bytes an example: 3.2 GB at 100k examples), and the
gradient vectors do not cluster, so an inverted file must scan most lists to find the flat
top-10. The compact code is a 1-bit code (RaBitQ: the signs of the vector less the corpus
mean, a scale per vector; the query in 4 bits) of the stored vector's randomized Hadamard
rotation, its first 16,384 dimensions by default (2 KB an example); a search scans the compact
codes for the top K″ and re-scores those on the stored 8-bit codes, read by row from the
memory-mapped index, so the scores it returns are the flat index's own. RaBitQ's error bound
assumes a random rotation: the stored coordinates' scales differ from module to module, and
their signs alone weigh a small coordinate as much as a large one. At 100k examples the code
of the stored vectors as they are kept 0.97 of the flat top-10 within K″ = 3,000 (ties
counted); rotated, all 32,768 dimensions kept 1.00 within 1,000 and the first 16,384 0.995
within 3,000, at half the bytes a scan reads; a random projection to 1,024 dimensions kept 0.58
within 1,000 (RESULTS.md, issue 14). A random projection (`Projection.RANDOM`, a seeded
orthonormal map `c = Vᵀ x`, `V [D, d]`, then any FAISS quantizer) is there on request;
format-8 versions built before random maps hold principal directions.

The code lives in the version as `retrieval.faiss`, a FAISS index (behind an
`IndexPreTransform` when projected) whose rows are the stored index's rows. Whether it pays
depends on the corpus and the queries, so the build measures it on its pseudo-queries
(`flat_top10_recall`) and keeps a code chosen by `auto` only where it holds
`RETRIEVAL_MIN_RECALL` of the flat top-10; elsewhere every stored code is scanned.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import faiss
import numpy as np

from indexer.config import CompactCode, Projection
from indexer.scan import CodeScan, device_searcher
from indexer.store import ADD_CHUNK_ROWS, decode_rows, new_index, open_index

SAMPLE_ROWS = 4096  # stored rows the code's quantizer is trained on
# K″, the compact code's candidates re-scored per search: at 100k examples the default code
# (HR16384,RaBitQ) kept 0.97 / 0.99 / 0.995 of the flat top-10 (ties counted) within 300 /
# 1,000 / 3,000, in 22 / 28 / 44 ms of one core; 3,000 keeps ≥ 0.95 at 1M even if the K″ a
# code needs grows as fast as the corpus (RESULTS.md, issue 14, stop 29).
RETRIEVAL_CANDIDATES = 3000
# What an `auto` code must keep of the flat top-10 on the build's pseudo-queries (issue 14's
# bar for a search that does not scan every code).
RETRIEVAL_MIN_RECALL = 0.95
# Pseudo-queries the build checks a code with: one query's share of its flat top-10 found
# varies (std ≈ 0.12 at 100k), so the mean of 32 has a standard error of ≈ 0.02, as wide as
# the margin the check decides; of 128, ≈ 0.01 (RESULTS.md, issue 14).
RETRIEVAL_CHECK_QUERIES = 128
TOP = 10  # the hits a check compares
# Rows below which a search is not split across threads: scanning a part must take far longer
# than handing it to a thread.
MIN_SPLIT_ROWS = 8192


def random_directions(dim: int, dims: int, seed: int) -> np.ndarray:
    """`dims` orthonormal columns `[dim, dims]` (float32) spanning a random subspace: the Q of a
    seeded Gaussian matrix's QR decomposition (the same for the same seed)."""
    gaussian = np.random.default_rng(seed).standard_normal((dim, dims))
    return np.linalg.qr(gaussian)[0].astype(np.float32)


def linear_transform(directions: np.ndarray) -> faiss.LinearTransform:
    """A FAISS linear map `x -> Vᵀ x` for `directions V [D, d]`."""
    dim, dims = directions.shape
    transform = faiss.LinearTransform(dim, dims, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(directions.T).ravel(), transform.A)
    transform.is_trained = True
    return transform


def training_sample(stored: faiss.Index, seed: int) -> np.ndarray:
    """`SAMPLE_ROWS` decoded stored rows `[≤ SAMPLE_ROWS, D]` (float32), chosen by `seed`: what
    a compact code's quantizer is trained on."""
    n = stored.ntotal
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, SAMPLE_ROWS), replace=False))
    return decode_rows(stored, rows, None)


def encode_rows(stored: faiss.Index, compact: faiss.Index, sample: np.ndarray) -> faiss.Index:
    """`compact` (an empty index over `stored`'s dimensions), trained on `sample` and holding
    every row of `stored`, decoded a chunk at a time, in row order."""
    compact.train(sample)
    for start in range(0, stored.ntotal, ADD_CHUNK_ROWS):
        rows = np.arange(start, min(start + ADD_CHUNK_ROWS, stored.ntotal), dtype=np.int64)
        compact.add(decode_rows(stored, rows, None))
    return compact


def hadamard_rotation(dim: int, dims: int, seed: int) -> list[faiss.VectorTransform]:
    """FAISS's seeded randomized Hadamard rotation of `dim` dimensions (`rotated_dims(dim)`
    out: the vector is padded), then its first `dims` outputs when fewer."""
    rotation = faiss.HadamardRotation(dim, seed)
    if dims == rotation.d_out:
        return [rotation]
    return [rotation, faiss.RemapDimensionsTransform(rotation.d_out, dims, False)]


def pre_transformed(
    transforms: list[faiss.VectorTransform], index: faiss.Index
) -> faiss.IndexPreTransform:
    """`index` behind `transforms`, applied in their order."""
    combined = faiss.IndexPreTransform(transforms[-1], index)
    for transform in reversed(transforms[:-1]):
        combined.prepend_transform(transform)
    return combined


def code_transforms(code: CompactCode, dim: int, seed: int) -> list[faiss.VectorTransform]:
    """What `code` (its `dims` set, `CompactCode.over`) applies to a vector of `dim` dimensions
    before quantising it: nothing, a Hadamard rotation or a random projection; ValueError for a
    code that does not fit them or is not built any more (principal directions)."""
    if not code.fits(dim):
        raise ValueError(f"a compact code of {code.dims} dimensions is not smaller than {dim}")
    if code.projection == Projection.NONE:
        return []
    if code.projection == Projection.HADAMARD:
        return hadamard_rotation(dim, code.dims, seed)
    if code.projection == Projection.RANDOM:
        return [linear_transform(random_directions(dim, code.dims, seed))]
    raise ValueError(f"a build makes rotations and random projections, not {code.projection}")


def build_compact_index(stored: faiss.Index, code: CompactCode, seed: int = 0) -> faiss.Index:
    """The compact codes of every row of a flat `stored` index (`IDMap,…`), trained on a
    sample of its decoded rows: the rows themselves quantised again, or their Hadamard
    rotation or random projection quantised (`code_transforms`)."""
    code = code.over(stored.d)
    transforms = code_transforms(code, stored.d, seed)
    compact = new_index(code.dims, code.quantizer)
    if transforms:
        compact = pre_transformed(transforms, compact)
    return encode_rows(stored, compact, training_sample(stored, seed))


def write_compact_index(stored_path: Path, path: Path, code: CompactCode, seed: int = 0) -> None:
    """Write the compact codes of the stored index at `stored_path` (memory-mapped) to `path`."""
    faiss.write_index(build_compact_index(open_index(stored_path), code, seed), str(path))


class RowSplitSearcher:
    """`search` of a flat-coded FAISS index (its ids are its rows), with the rows split into
    one range per thread when a batch has fewer queries than FAISS has threads. FAISS spreads a
    flat search over its queries only, so one query would scan every code on one core: at 1M
    examples the 1-bit code's scan of one query took 271 ms on one thread, 178 in two ranges
    (RESULTS.md, issue 14). The scores are the index's own; ties may come in another order.
    Indexes whose search ignores a range of rows (PQ, fast-scan codes) are searched whole.
    Safe to call from several threads."""

    def __init__(self, index: faiss.Index):
        self.index = index
        self.splits = _searches_a_range(index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows `[n_queries, k]`, best first (row -1 past the last)."""
        n, threads = self.index.ntotal, faiss.omp_get_max_threads()
        parts = min(threads // max(1, len(queries)), n // MIN_SPLIT_ROWS)
        if not self.splits or parts < 2 or k >= n:
            return self.index.search(queries, k)
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        found = list(
            _split_pool().map(
                lambda start, stop: self._search_range(queries, k, int(start), int(stop)),
                bounds[:-1],
                bounds[1:],
            )
        )
        scores = np.concatenate([s for s, _ in found], axis=1)
        rows = np.concatenate([r for _, r in found], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)

    def _search_range(
        self, queries: np.ndarray, k: int, start: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return search_range(self.index, queries, k, start, stop)


def search_range(
    index: faiss.Index, queries: np.ndarray, k: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` over its rows `[start, stop)` only (an index that honours a range
    selector: `_searches_a_range`): scores and rows `[n_queries, ≤ k]`."""
    # Each SWIG object stays referenced here until the search returns: the parameters hold
    # raw pointers to the selector and to each other.
    selector = faiss.IDSelectorRange(start, stop, True)
    in_range = faiss.SearchParameters(sel=selector)
    params = in_range
    if isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform(index_params=in_range)
    return index.search(queries, min(k, stop - start), params=params)


def _searches_a_range(index: faiss.Index) -> bool:
    """Whether `index` (inner products, its rows coded flat, behind a transform or not) honours
    a range selector: FAISS refuses one for PQ and fast-scan codes."""
    coded = index.index if isinstance(index, faiss.IndexPreTransform) else index
    flat_kinds = (faiss.IndexRaBitQ, faiss.IndexScalarQuantizer, faiss.IndexFlat)
    return index.metric_type == faiss.METRIC_INNER_PRODUCT and isinstance(
        faiss.downcast_index(coded), flat_kinds
    )


@cache
def _split_pool() -> ThreadPoolExecutor:
    """The threads split searches run their ranges on, one per core, shared by every index."""
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="split-search")


class TieredSearcher:
    """`search` as the flat stored index answers it (the same scores, from the same codes), over
    the top `candidates` (K″) of the compact codes only. A batch's candidates are re-scored
    together, each stored row read once (`CodeScan.search_rows`). Safe to call from several
    threads."""

    def __init__(self, compact: faiss.Index, stored: faiss.IndexIDMap, candidates: int):
        """`compact`: the rows of `stored` (`IDMap,SQ8`, flat 8-bit codes) in their compact
        code; ValueError when `stored` is not such an index."""
        self.candidates = candidates
        self._compact = RowSplitSearcher(compact)
        self._stored = CodeScan.from_index(stored, "cpu")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and example ids `[n_queries, k]`, best first (id -1 past the last)."""
        n = self._stored.n
        k = min(k, n)
        rows = self._compact.search(queries, max(k, min(self.candidates, n)))[1]
        return self._stored.search_rows(queries, rows, k)


def flat_top10_recall(
    stored: faiss.Index, compact: faiss.Index, queries: np.ndarray, candidates: int
) -> float:
    """Share of the flat `stored` index's top-10 for `queries [Q, D]` that the tiered search
    (`compact`'s top `candidates`, re-scored on `stored`) returns in its top-10. A tiered score
    is a stored row's own, so a hit scoring at least the flat 10th is one of the flat top-10
    or tied with it (repeated texts have equal vectors and any order): it counts as found."""
    k = min(TOP, stored.ntotal)
    flat = device_searcher(stored, "cpu").search(queries, k)[0]
    tiered = TieredSearcher(compact, stored, candidates).search(queries, k)[0]
    tolerance = 1e-5 * np.abs(flat).max(initial=1.0)
    return float(np.mean(tiered >= flat[:, -1:] - tolerance))
