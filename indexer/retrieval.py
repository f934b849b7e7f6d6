"""Tiered candidate retrieval: a compact code per example, scanned first.

A flat scan reads every stored byte (D bytes an example: 3.3 GB at 100k examples), and the
gradient vectors do not cluster, so an inverted file must scan most lists to find the flat
top-10. The compact code is the stored vector under a seeded random orthonormal map,
`c = Vᵀ x` (`V [D, d]`, `VᵀV = I`), quantised (4-bit fast-scan PQ by default: d/4 bytes an
example); a search scans the compact codes for the top K″ and re-scores those on the stored
8-bit codes, read by row from the memory-mapped index, so the scores it returns are the flat
index's own. A random map keeps every direction's inner products alike (Johnson-Lindenstrauss:
`(D/d)·⟨Vᵀq, Vᵀx⟩ ≈ ⟨q, x⟩`, error ≈ ‖q‖‖x‖/√d); principal directions keep the corpus's
common directions and drop its rare ones, which are what single out an example for a
specific query: at 100k examples they kept 0.44 of exact EK-FAC's top-10 within the exact
stage's candidates, the random map 0.57, both 0.996 at 21k (RESULTS.md, issue 14).

The code lives in the version as `retrieval.faiss`, a FAISS `IndexPreTransform` (the projection,
then the code's index) whose rows are the stored index's rows. Whether it pays depends on the
corpus (0.996 of the flat top-10 at 21k examples, 0.58 at 100k), so the build measures it on
its pseudo-queries (`flat_top10_recall`) and keeps a code chosen by `auto` only where it holds
`RETRIEVAL_MIN_RECALL` of the flat top-10; elsewhere every stored code is scanned.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from indexer.config import CompactCode, Projection
from indexer.scan import CodeScan, device_searcher
from indexer.store import ADD_CHUNK_ROWS, decode_rows, new_index, open_index

SAMPLE_ROWS = 4096  # stored rows the code's quantizer is trained on
# K″, the compact code's candidates re-scored per search: at 21k examples 1,000 kept 0.996 of the
# exact top-10 within the exact stage's 200 candidates, 200 only 0.971 (RESULTS.md, issue 14).
RETRIEVAL_CANDIDATES = 1000
# What an `auto` code must keep of the flat top-10 on the build's pseudo-queries (issue 14's
# bar for a search that does not scan every code).
RETRIEVAL_MIN_RECALL = 0.95
TOP = 10  # the hits a check compares


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


def project_and_quantize(
    stored: faiss.Index, directions: np.ndarray, quantizer: str, sample: np.ndarray
) -> faiss.Index:
    """The compact codes of every row of `stored` under `directions [D, d]`: an
    `IndexPreTransform` whose `quantizer` index is trained on `sample`'s projections."""
    compact = faiss.IndexPreTransform(
        linear_transform(directions), new_index(directions.shape[1], quantizer)
    )
    compact.train(sample)
    for start in range(0, stored.ntotal, ADD_CHUNK_ROWS):
        rows = np.arange(start, min(start + ADD_CHUNK_ROWS, stored.ntotal), dtype=np.int64)
        compact.add(decode_rows(stored, rows, None))
    return compact


def build_compact_index(stored: faiss.Index, code: CompactCode, seed: int = 0) -> faiss.Index:
    """The compact codes of every row of a flat `stored` index (`IDMap,…`): the random
    projection, then the code trained on a sample of the decoded rows' projections."""
    if code.dims >= stored.d:
        raise ValueError(f"a compact code of {code.dims} dimensions is not smaller than {stored.d}")
    if code.projection != Projection.RANDOM:
        raise ValueError(f"a build makes random projections, not {code.projection}")
    directions = random_directions(stored.d, code.dims, seed)
    return project_and_quantize(stored, directions, code.quantizer, training_sample(stored, seed))


def write_compact_index(stored_path: Path, path: Path, code: CompactCode, seed: int = 0) -> None:
    """Write the compact codes of the stored index at `stored_path` (memory-mapped) to `path`."""
    faiss.write_index(build_compact_index(open_index(stored_path), code, seed), str(path))


class TieredSearcher:
    """`search` as the flat stored index answers it (the same scores, from the same codes), over
    the top `candidates` (K″) of the compact codes only. A batch's candidates are re-scored
    together, each stored row read once (`CodeScan.search_rows`). Safe to call from several
    threads."""

    def __init__(self, compact: faiss.Index, stored: faiss.IndexIDMap, candidates: int):
        """`compact`: the rows of `stored` (`IDMap,SQ8`, flat 8-bit codes) in their compact
        code; ValueError when `stored` is not such an index."""
        self.candidates = candidates
        self._compact, self._stored = compact, CodeScan.from_index(stored, "cpu")

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
