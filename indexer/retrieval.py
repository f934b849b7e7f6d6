"""Tiered candidate retrieval: a compact code per example, scanned first.

A flat scan reads every stored byte (D bytes an example: 3.3 GB at 100k examples), and the
gradient vectors do not cluster, so an inverted file must scan most lists to find the flat
top-10. The stored vectors' energy does concentrate in a few directions: the top 1,024
principal directions of the uncentered second moment held three quarters of it at 21k
examples. The compact code is the stored vector projected onto them, `c = Vᵀ x` (`V [D, d]`),
quantised (4-bit fast-scan PQ by default: d/4 bytes an example); a search scans the compact
codes for the top K″ and re-scores those on the stored 8-bit codes, read by row from the
memory-mapped index, so the scores it returns are the flat index's own. `⟨Vᵀq, Vᵀx⟩ = ⟨q, x⟩`
minus the part of both outside the top directions.

The code lives in the version as `retrieval.faiss`, a FAISS `IndexPreTransform` (the projection,
then the code's index) whose rows are the stored index's rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import torch

from indexer.config import CompactCode
from indexer.store import ADD_CHUNK_ROWS, decode_rows, new_index, open_index

SAMPLE_ROWS = 4096  # stored rows the projection is fitted on (at least 4x its dimensions)
# K″, the compact code's candidates re-scored per search: at 21k examples 1,000 kept 0.996 of the
# exact top-10 within the exact stage's 200 candidates, 200 only 0.971 (RESULTS.md, issue 14).
RETRIEVAL_CANDIDATES = 1000


def principal_directions(sample: np.ndarray, dims: int) -> np.ndarray:
    """The top `dims` right singular vectors `[D, dims]` (float32) of `sample [n, D]`,
    uncentered (a centred projection would shift each example's score by its mean's share, which
    changes rankings): exact and deterministic, from the eigenvectors of the smaller of the
    second-moment matrix `[D, D]` and the Gram matrix `[n, n]`."""
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    if x.shape[1] <= x.shape[0]:
        return _top_eigenvectors((x.T @ x).double(), dims).float().numpy()
    eigvecs = _top_eigenvectors((x @ x.T).double(), dims)  # x = U S Vᵀ: V = xᵀ U S⁻¹
    directions = x.T.double() @ eigvecs
    return (directions / directions.norm(dim=0).clamp_min(1e-30)).float().numpy()


def _top_eigenvectors(symmetric: torch.Tensor, count: int) -> torch.Tensor:
    """The eigenvectors `[m, count]` of the `count` largest eigenvalues of `symmetric [m, m]`."""
    eigvals, eigvecs = torch.linalg.eigh(symmetric)
    return eigvecs[:, torch.argsort(eigvals, descending=True)[:count]]


def linear_transform(directions: np.ndarray) -> faiss.LinearTransform:
    """A FAISS linear map `x -> Vᵀ x` for `directions V [D, d]`."""
    dim, dims = directions.shape
    transform = faiss.LinearTransform(dim, dims, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(directions.T).ravel(), transform.A)
    transform.is_trained = True
    return transform


def _sample_rows(n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, SAMPLE_ROWS), replace=False))


def _blocks(stored: faiss.Index) -> Iterator[np.ndarray]:
    """The stored vectors `[≤ ADD_CHUNK_ROWS, D]` (float32), in row order."""
    for start in range(0, stored.ntotal, ADD_CHUNK_ROWS):
        rows = np.arange(start, min(start + ADD_CHUNK_ROWS, stored.ntotal), dtype=np.int64)
        yield decode_rows(stored, rows, None)


def build_compact_index(stored: faiss.Index, code: CompactCode, seed: int = 0) -> faiss.Index:
    """The compact codes of every row of a flat `stored` index (`IDMap,…`): the projection fitted
    on a sample of its decoded rows, the code trained on their projections."""
    if code.dims >= stored.d:
        raise ValueError(f"a compact code of {code.dims} dimensions is not smaller than {stored.d}")
    sample = decode_rows(stored, _sample_rows(stored.ntotal, seed), None)
    directions = principal_directions(sample, min(code.dims, len(sample)))
    inner = new_index(directions.shape[1], code.quantizer)
    compact = faiss.IndexPreTransform(linear_transform(directions), inner)
    compact.train(sample)
    for block in _blocks(stored):
        compact.add(block)
    return compact


def write_compact_index(stored_path: Path, path: Path, code: CompactCode, seed: int = 0) -> None:
    """Write the compact codes of the stored index at `stored_path` (memory-mapped) to `path`."""
    faiss.write_index(build_compact_index(open_index(stored_path), code, seed), str(path))


class TieredSearcher:
    """`search` as the flat stored index answers it (the same scores, from the same codes), over
    the top `candidates` (K″) of the compact codes only. Safe to call from several threads."""

    def __init__(self, compact: faiss.Index, stored: faiss.IndexIDMap, candidates: int):
        """`compact`: the rows of `stored` (an `IDMap` over flat codes) in their compact code."""
        self.candidates = candidates
        self._refine = faiss.IndexRefine(compact, faiss.downcast_index(stored.index))
        self._ids = faiss.vector_to_array(stored.id_map)
        self._compact, self._stored = compact, stored  # the refine index does not own them

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and example ids `[n_queries, k]`, best first (id -1 past the last)."""
        k = min(k, self._stored.ntotal)
        params = faiss.IndexRefineSearchParameters(k_factor=max(1.0, self.candidates / k))
        scores, rows = self._refine.search(queries, k, params=params)
        return scores, np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
