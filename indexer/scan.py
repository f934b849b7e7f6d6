"""Exhaustive inner-product search over a version's 8-bit codes with torch, on the device that
runs the query model, every query of a batch sharing one pass over the codes.

FAISS's flat 8-bit search decodes every code once per query, so concurrent queries each pay a
whole pass. `CodeScan` answers the same search with the scores FAISS gives through one integer
matrix product per chunk of codes for all the batch's queries: on the CPU over the codes where
they lie (memory-mapped, turned into int8 a chunk at a time), on a CUDA device over a copy held
there (CUDA hosts carry faiss-cpu: faiss-gpu wheels do not exist for every CUDA and Python).

A flat `IDMap,SQ8` index keeps a byte `c` per dimension and a trained range
(`vmin`, `vdiff`) per dimension, and decodes `x̂ = vmin + (c + 0.5) / 255 · vdiff` (faiss's
`Codec8bit` in the non-uniform `QuantizerTemplate`), so for a query `q`

    ⟨q, x̂⟩ = Σ_j q_j vmin_j + Σ_j w_j (c_j + 0.5),   w_j = q_j vdiff_j / 255.

The product reads the codes as int8 (`c - 128`), once per search, as an
integer matrix product (`torch._int_mm`, int32 sums): the weights `w` are split into `DIGITS`
int8 digits (`w ≈ s Σ_i d_i / BASE^i`), which keeps more precision than float32 while every
code is read as one byte (a float decode would read and write several bytes per code).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

DIGITS = 4  # int8 digits per weight: |error| <= s / 2 / BASE^3, below float32's rounding
BASE = 254  # a remainder of at most half a unit, times 254, is again a digit in [-127, 127]
# Each int32 sum adds D products |(c - 128) · d| <= 128 · 127: D must keep it below 2^31.
MAX_DIM = (2**31 - 1) // (128 * 127) // 8 * 8
ROW_ALIGN = 32  # CUDA's int8 matrix product needs over 16 rows (and columns a multiple of 8)
COL_ALIGN = 8
CHUNK_BYTES = 256 << 20  # a chunk's int32 sums and float64 scores stay under this
MAPPED_CHUNK_BYTES = 64 << 20  # on the CPU: a chunk's int8 copy and sums, near the caches
# On the CPU, rows gathered by id are copied a chunk at a time into a buffer that stays in the
# L3 cache (32 MiB here): one thread re-scored a query's 3,000 rows in 17 ms in 8 MiB chunks,
# against 28 ms copied at once (100k examples, D = 32,412; RESULTS.md, issue 14).
GATHER_CHUNK_BYTES = 8 << 20
LOAD_ROWS = 16_384  # codes copied to the device at a time
FREE_MEMORY_SHARE = 0.5  # of the device's free memory the codes may take; the rest is the model's
NO_SCORE = -np.finfo(np.float32).max  # what FAISS returns, with id -1, past the last result


class Searcher(Protocol):
    """What answers an engine's search: a FAISS index, a `CodeScan` of one, the compact code's
    tier (`indexer.retrieval.TieredSearcher`) or a Milvus collection."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class ResidentCodes:
    """Codes held on a device as int8 `c - 128`, `[≥N, ≥D]` padded to `ROW_ALIGN` x
    `COL_ALIGN` (CUDA's int8 product needs it; padding is never scored): N·D bytes there."""

    scan_bytes = gather_bytes = CHUNK_BYTES

    def __init__(self, codes: Tensor):
        self.codes = codes
        self.columns = codes.shape[1]

    def chunks(self, n: int, rows: int) -> Iterator[tuple[int, Tensor]]:
        """The first row and int8 codes `[≤rows, columns]` of each chunk of the first `n` rows."""
        for start in range(0, n, rows):
            yield start, self.codes[start : start + rows]

    def gathered(self, rows: np.ndarray, per_chunk: int) -> Iterator[Tensor]:
        """The int8 codes of `rows`, `per_chunk` at a time, `[≥len(chunk), columns]` each (zero
        rows up to `ROW_ALIGN`)."""
        for start in range(0, len(rows), per_chunk):
            part = rows[start : start + per_chunk]
            out = self.codes.new_zeros((_align(len(part), ROW_ALIGN), self.columns))
            out[: len(part)] = self.codes[torch.as_tensor(part, device=self.codes.device)]
            yield out


class MappedCodes:
    """Codes read where they lie, uint8 `[N, D]` (an index's memory-mapped codes: no copy),
    turned into int8 `c - 128` a chunk at a time in a buffer of each searching thread's own."""

    scan_bytes, gather_bytes = MAPPED_CHUNK_BYTES, GATHER_CHUNK_BYTES

    def __init__(self, codes: np.ndarray, owner: object):
        """`owner`: what keeps `codes`' memory alive (the FAISS index they belong to)."""
        self.codes, self._owner = codes, owner
        self.columns = codes.shape[1]
        self._buffers = threading.local()

    def _buffer(self, rows: int) -> np.ndarray:
        """This thread's int8 copy `[rows, columns]` (uint8), kept from one search to the next
        (at most `MAPPED_CHUNK_BYTES` a thread): a fresh one of tens of MiB is new pages each
        time, which the kernel faults in and zeroes (the demo's scan took 11-12 ms a query with
        the buffer kept against 15-16 ms without, one thread; RESULTS.md, issue 14)."""
        buffer = getattr(self._buffers, "array", None)
        if buffer is None or len(buffer) < rows:
            buffer = self._buffers.array = np.empty((rows, self.columns), dtype=np.uint8)
        return buffer[:rows]

    def chunks(self, n: int, rows: int) -> Iterator[tuple[int, Tensor]]:
        """As `ResidentCodes.chunks`, on the CPU; each chunk is overwritten by the next."""
        buffer = self._buffer(min(rows, n))
        for start in range(0, n, rows):
            block = buffer[: min(rows, n - start)]
            np.bitwise_xor(self.codes[start : start + rows], 128, out=block)
            yield start, torch.from_numpy(block).view(torch.int8)

    def gathered(self, rows: np.ndarray, per_chunk: int) -> Iterator[Tensor]:
        """As `ResidentCodes.gathered`, read in the order given, `[len(chunk), columns]` each;
        each chunk is overwritten by the next."""
        buffer = self._buffer(min(per_chunk, len(rows)))
        for start in range(0, len(rows), per_chunk):
            part = rows[start : start + per_chunk]
            block = buffer[: len(part)]
            np.take(self.codes, part, axis=0, out=block, mode="clip")  # "raise" copies twice
            np.bitwise_xor(block, 128, out=block)
            yield torch.from_numpy(block).view(torch.int8)


class CodeScan:
    """`search` as a flat inner-product 8-bit FAISS index answers it, over its codes on a torch
    device (`ResidentCodes`) or where they lie in the CPU's memory (`MappedCodes`)."""

    def __init__(
        self, codes: ResidentCodes | MappedCodes, n: int, vmin: Tensor, vdiff: Tensor, ids: Tensor
    ):
        """`codes` of N rows, `vmin`, `vdiff` `[D]` float64, `ids [N]` int64, all on one device:
        see `from_blocks` and `from_index`."""
        self.codes, self.n = codes, n
        self.vmin, self.vdiff, self.ids = vmin, vdiff, ids
        self.device = vmin.device

    @classmethod
    def from_blocks(
        cls,
        blocks: Iterable[np.ndarray | Tensor],
        vmin: np.ndarray,
        vdiff: np.ndarray,
        ids: np.ndarray,
        device: str | torch.device,
    ) -> CodeScan:
        """The scan of codes `[N, D]` (uint8) given as consecutive blocks of rows (read from an
        index, or drawn at random on the device), with the ranges `vmin`, `vdiff` `[D]` and the
        ids `[N]` of the rows. Memory: the codes, once, on `device`."""
        n, dim = len(ids), len(vmin)
        shape = (_align(max(n, 1), ROW_ALIGN), _align(dim, COL_ALIGN))
        codes = torch.zeros(shape, dtype=torch.int8, device=device)
        start = 0
        for block in blocks:
            block = torch.as_tensor(block).to(device)
            codes[start : start + len(block), :dim] = (block ^ 128).view(torch.int8)
            start += len(block)
        if start != n:
            raise ValueError(f"{start} rows of codes for {n} ids")
        return cls._on(ResidentCodes(codes), vmin, vdiff, ids, device)

    @classmethod
    def from_index(cls, index: faiss.Index, device: str | torch.device) -> CodeScan:
        """The scan of a flat 8-bit inner-product index (`IDMap,SQ8` or a bare `SQ8`: ids are
        then rows): on the CPU over its codes where they lie, on another device over a copy;
        ValueError says why another index cannot be scanned (`unsupported`)."""
        reason = unsupported(index)
        if reason:
            raise ValueError(f"cannot scan this index on {device}: {reason}")
        inner, ids = _flat(index)
        vmin, vdiff = faiss.vector_to_array(inner.sq.trained).reshape(2, -1)
        n, size = inner.ntotal, inner.code_size
        codes = faiss.rev_swig_ptr(inner.codes.data(), n * size).reshape(n, size) if n else []
        if torch.device(device).type == "cpu":
            mapped = MappedCodes(np.asarray(codes, dtype=np.uint8).reshape(n, size), index)
            return cls._on(mapped, vmin, vdiff, ids, device)
        blocks = (codes[start : start + LOAD_ROWS] for start in range(0, n, LOAD_ROWS))
        return cls.from_blocks(blocks, vmin, vdiff, ids, device)

    @classmethod
    def _on(
        cls,
        codes: ResidentCodes | MappedCodes,
        vmin: np.ndarray,
        vdiff: np.ndarray,
        ids: np.ndarray,
        device: str | torch.device,
    ) -> CodeScan:
        def tensor(values: np.ndarray, dtype: torch.dtype) -> Tensor:
            return torch.as_tensor(values, dtype=dtype, device=device)

        vectors = tensor(vmin, torch.float64), tensor(vdiff, torch.float64)
        return cls(codes, len(ids), *vectors, tensor(ids, torch.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores `[Q, k]` (float32, best first) and ids `[Q, k]` (int64) of the `k` best inner
        products of each query `[Q, D]`, as `faiss.Index.search` gives them (-FLT_MAX and -1
        past the last row). Scanned a chunk of rows at a time for all queries, the top k merged."""
        weights = self._weights(queries)
        columns = weights.digits.shape[1]
        per_chunk = _chunk_rows(len(queries), columns, self.codes, self.codes.scan_bytes)
        top = (weights.bias.new_empty((len(queries), 0)), self.ids.new_empty((len(queries), 0)))
        for start, chunk in self.codes.chunks(self.n, per_chunk):
            top = _merge(top, self._scores(chunk, weights, self.n - start), start, k)
        return self._results(*top, k)

    def search_rows(
        self, queries: np.ndarray, rows: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `search`, each query `q` over its own rows `rows[q]` only (`[Q, R]`, -1 for none,
        as a compact code's search returns its candidates): the union of the batch's rows is
        read once, in row order, and scored for every query in one product per chunk (the
        batch's queries share candidates: 32 fact queries at 100k, 29k rows of their 96k)."""
        weights, union = self._weights(queries), np.unique(rows[rows >= 0])
        if not len(union):
            none = (len(rows), 0)
            return self._results(weights.bias.new_empty(none), self.ids.new_empty(none), k)
        columns = weights.digits.shape[1]
        per_chunk = _chunk_rows(len(queries), columns, self.codes, self.codes.gather_bytes)
        scores = [weights.bias.new_empty((len(queries), 0))]
        for start, chunk in zip(
            range(0, len(union), per_chunk), self.codes.gathered(union, per_chunk), strict=True
        ):
            scores.append(self._scores(chunk, weights, min(per_chunk, len(union) - start)))
        in_union = torch.as_tensor(np.searchsorted(union, rows), device=self.device)
        own = torch.cat(scores, dim=1).gather(1, in_union.clamp(max=len(union) - 1))
        own[torch.as_tensor(rows < 0, device=self.device)] = -torch.inf
        best = torch.topk(own, min(k, own.shape[1]), dim=1)
        chosen = torch.as_tensor(rows, device=self.device).gather(1, best.indices)
        return self._results(best.values, chosen, k)

    def _weights(self, queries: np.ndarray) -> _Weights:
        q = torch.as_tensor(np.asarray(queries), device=self.device).double()
        weights = q * self.vdiff / 255
        bias = q @ self.vmin + 128.5 * weights.sum(dim=1)  # codes are c - 128; decoded c + 0.5
        return _Weights(*_digits(weights, self.codes.columns), bias)

    def _scores(self, chunk: Tensor, weights: _Weights, valid: int) -> Tensor:
        """Scores `[Q, ≤valid]` of the first `valid` rows of an int8 `chunk [rows, columns]`."""
        n_queries = len(weights.bias)
        sums = torch._int_mm(chunk, weights.digits)[:valid, : n_queries * DIGITS]
        per_digit = sums.double().unflatten(1, (n_queries, -1))
        return torch.einsum("rqi,qi->qr", per_digit, weights.scales) + weights.bias[:, None]

    def _results(self, scores: Tensor, rows: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top scores and rows `[Q, ≤k]` as FAISS's `[Q, k]` scores and ids (a score of
        -inf: no row)."""
        out_scores = np.full((len(scores), k), NO_SCORE, dtype=np.float32)
        out_ids = np.full((len(scores), k), -1, dtype=np.int64)
        found = scores.shape[1]
        valid = torch.isfinite(scores)
        out_scores[:, :found] = torch.where(valid, scores, NO_SCORE).float().cpu().numpy()
        out_ids[:, :found] = torch.where(valid, self.ids[rows.clamp(min=0)], -1).cpu().numpy()
        return out_scores, out_ids


@dataclass(frozen=True)
class _Weights:
    """A batch's queries as the scan multiplies them: int8 `digits [columns, ≥Q·DIGITS]`
    (see `_digits`), their `scales [Q, DIGITS]` and each query's constant term `bias [Q]`."""

    digits: Tensor
    scales: Tensor
    bias: Tensor


def unsupported(index: faiss.Index) -> str:
    """Why `CodeScan` cannot search `index` ("" when it can)."""
    inner = _flat(index)[0]
    if not isinstance(inner, faiss.IndexScalarQuantizer):
        return "not a flat scalar-quantised index (e.g. IVF)"
    if inner.sq.qtype != faiss.ScalarQuantizer.QT_8bit:
        return "its codes are not 8 bits with a range per dimension"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "not an inner-product index"
    if index.d > MAX_DIM:
        return f"{index.d} dimensions, over the {MAX_DIM} whose int32 sums cannot overflow"
    return ""


def device_searcher(index: faiss.Index, device: str | torch.device) -> Searcher:
    """What searches `index` for an engine on `device`: a `CodeScan` of it when the scan
    supports it, on the CPU over the codes where they lie; on a CUDA device when its codes take
    at most `FREE_MEMORY_SHARE` of the device's free memory and it answers two random queries
    as FAISS does (torch's int8 product has had wrong results on some CUDA versions). The FAISS
    index itself otherwise (an IVF index; searching on the CPU), saying why on CUDA."""
    device = torch.device(device)
    if device.type == "cpu" and not unsupported(index):
        return CodeScan.from_index(index, device)
    if device.type != "cuda":
        return index
    reason = unsupported(index) or _too_large(index, device)
    scan = None if reason else CodeScan.from_index(index, device)
    reason = reason or _disagreement(scan, index)
    if reason:
        log.warning("searching with FAISS on the CPU, not on %s: %s", device, reason)
        return index
    return scan


def _too_large(index: faiss.Index, device: torch.device) -> str:
    """Why the index's codes would take too much of the device's free memory ("" if not)."""
    if index.ntotal * index.d <= FREE_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]:
        return ""
    return f"its codes ({index.ntotal * index.d / 2**30:.1f} GiB) would not fit"


def _disagreement(scan: CodeScan, index: faiss.Index) -> str:
    """Why the scan's top scores of two random queries are not FAISS's ("" when they are,
    within float32 rounding: sorted scores, so ties in any order agree)."""
    queries = np.random.default_rng(0).standard_normal((2, index.d)).astype(np.float32)
    k = min(10, index.ntotal)
    if not k:
        return ""
    expected = index.search(queries, k)[0]
    try:
        found = scan.search(queries, k)[0]
    except RuntimeError as e:
        return f"the scan failed: {str(e).splitlines()[0]}"
    if not np.allclose(found, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()):
        return "the scan's scores differ from FAISS's"
    return ""


def _flat(index: faiss.Index) -> tuple[faiss.Index, np.ndarray]:
    """The index that holds the codes (an `IDMap`'s inner one) and the ids `[N]` of its rows."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index), faiss.vector_to_array(index.id_map)
    return faiss.downcast_index(index), np.arange(index.ntotal, dtype=np.int64)


def _digits(weights: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """`weights [Q, D]` (float64) as int8 digits `[rows, cols]` (column `q·DIGITS + i` holds
    digit i of query q; zero past D and past Q·DIGITS columns, `cols` a multiple of COL_ALIGN)
    and their scales `[Q, DIGITS]`: `weights[q, j] ≈ Σ_i scales[q, i] · digits[j, q·DIGITS + i]`
    within `scales[q, -1] / 2`. Column-major, the layout torch's int8 matrix product is used
    with most (a transposed weight)."""
    n_queries, dim = weights.shape
    largest = weights.abs().amax(dim=1)
    unit = torch.where(largest > 0, largest, 1.0) / 127
    rest, parts = weights / unit[:, None], []
    for _ in range(DIGITS):
        digit = rest.round()
        parts.append(digit)
        rest = (rest - digit) * BASE
    columns = _align(n_queries * DIGITS, COL_ALIGN)
    digits = torch.zeros((columns, rows), dtype=torch.int8, device=weights.device)
    digits[: n_queries * DIGITS, :dim] = torch.stack(parts, dim=1).flatten(0, 1)
    powers = float(BASE) ** -torch.arange(DIGITS, dtype=torch.float64, device=weights.device)
    return digits.T, unit[:, None] * powers


def _chunk_rows(
    n_queries: int, columns: int, codes: ResidentCodes | MappedCodes, budget: int
) -> int:
    """Rows scored at a time: their int32 sums `[rows, columns]`, float64 digit sums and scores
    (and mapped codes' int8 copy) within `budget` bytes; a multiple of ROW_ALIGN."""
    per_row = 4 * columns + 8 * n_queries * (DIGITS + 1)
    if isinstance(codes, MappedCodes):
        per_row += codes.columns
    return max(ROW_ALIGN, budget // per_row // ROW_ALIGN * ROW_ALIGN)


def _merge(top: tuple[Tensor, Tensor], scores: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """The best `k` of the running top (scores, rows) `[Q, ≤k]` and a chunk's `scores [Q,
    rows]` (rows from `start`)."""
    best = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    merged = torch.cat([top[0], best.values], dim=1)
    rows = torch.cat([top[1], best.indices + start], dim=1)
    keep = torch.topk(merged, min(k, merged.shape[1]), dim=1)
    return keep.values, rows.gather(1, keep.indices)


def _align(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
