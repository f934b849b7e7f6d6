"""Resident memory of a served index, memory-mapped as the server opens it (issue 9).

    python -m benchmarks.serving_memory --examples 200000 --threads 1 [--out F]

Writes the index a build wrote above 50,000 examples until issue 14 (IVF√N,SQ8 with a direct
map; builds now keep flat codes and add a compact code, `indexer.retrieval`) over N random
unit vectors of the demo's dimension, then, in a fresh process per way of opening it, opens it
(`open_index`: `IO_FLAG_MMAP_IFC`; and a plain `read_index` for
comparison), runs `--queries` searches at the default nprobe, twice (the second pass finds
their lists in the page cache), and reports the process's resident memory (anonymous, and file
pages, which replicas on one host share through the page cache) against the file's size, the
search p50 of each pass and the major page faults (reads from disk) during it.

`--shard-rows K` writes the same file without holding all codes (1M examples at D = 12,288:
12.4 GB), for a machine without that much memory to spare: see `write_ivf_in_shards`.
`--no-plain-read` leaves out the plain `read_index`, which does load the whole index.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.common import emit, peak_rss_mib, status_mib
from indexer.config import StoreConfig
from indexer.store import (
    ADD_CHUNK_ROWS,
    TRAIN_ROWS_PER_LIST,
    new_index,
    open_index,
    set_nprobe,
    write_faiss,
)

DIM = 12_288  # the demo's: 12 modules at 32×32


class RandomUnitRows:
    """`[n, dim]` random unit vectors, row r always the same (seeded by r): an array-like that
    `write_faiss` reads a slice or a set of rows at a time, never the whole matrix."""

    def __init__(self, n: int, dim: int):
        self.shape = (n, dim)

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        rows = np.arange(*key.indices(self.shape[0])) if isinstance(key, slice) else key
        block = np.stack(
            [np.random.default_rng(int(r)).standard_normal(self.shape[1], np.float32) for r in rows]
        )
        return block / np.linalg.norm(block, axis=1, keepdims=True)


def write_ivf_in_shards(rows: RandomUnitRows, factory: str, path: Path, shard_rows: int) -> None:
    """What `write_faiss(rows, 0..N-1, factory, path)` writes for an IVF factory (same
    training sample and seed, rows added in order, a hashtable direct map), holding one shard's
    codes at a time: each shard of `shard_rows` rows is added to the trained index and its
    lists appended to one scratch file per list; FAISS then writes the header (quantizer, direct
    map, scalar quantizer) of the index with empty lists, and the lists replace that empty tail
    in FAISS's own layout, one at a time, each scratch file deleted once copied (disk: one copy)."""
    n, dim = rows.shape
    index = new_index(dim, factory)
    ivf = faiss.extract_index_ivf(index)
    sample = min(n, max(TRAIN_ROWS_PER_LIST * ivf.nlist, 10_000))
    index.train(rows[np.sort(np.random.default_rng(0).choice(n, size=sample, replace=False))])
    scratch = path.with_name(path.name + ".lists")
    scratch.mkdir()
    ids: list[list[np.ndarray]] = [[] for _ in range(ivf.nlist)]
    for first in range(0, n, shard_rows):
        index.reset()
        for start in range(first, min(n, first + shard_rows), ADD_CHUNK_ROWS):
            stop = min(n, first + shard_rows, start + ADD_CHUNK_ROWS)
            index.add_with_ids(rows[start:stop], np.arange(start, stop, dtype=np.int64))
        _append_lists(ivf.invlists, scratch, ids)
    index.reset()
    lists = [np.concatenate(found) if found else np.zeros(0, np.int64) for found in ids]
    _fill_direct_map(ivf, lists)
    header = faiss.serialize_index(index)
    empty_tail = b"ilar" + struct.pack("<QQ", ivf.nlist, ivf.code_size) + b"sprs" + bytes(8)
    assert header[-len(empty_tail) :].tobytes() == empty_tail  # FAISS's layout, checked
    sizes = np.array([len(found) for found in lists], np.uint64)
    assert np.count_nonzero(sizes) > ivf.nlist // 2  # else FAISS writes the sparse layout
    with path.open("wb") as out:
        out.write(header[: -len(empty_tail)].tobytes())
        out.write(b"ilar" + struct.pack("<QQ", ivf.nlist, ivf.code_size) + b"full")
        out.write(struct.pack("<Q", ivf.nlist) + sizes.tobytes())
        for number, found in enumerate(lists):  # FAISS's order: a list's codes, then its ids
            if len(found):
                with (scratch / str(number)).open("rb") as codes:
                    shutil.copyfileobj(codes, out, 2**24)
                (scratch / str(number)).unlink()
                out.write(found.tobytes())
    scratch.rmdir()


def _append_lists(invlists: faiss.InvertedLists, scratch: Path, ids: list[list]) -> None:
    """Append each inverted list's codes to `scratch/<list>` and its ids to `ids[list]`."""
    for number in range(invlists.nlist):
        size = invlists.list_size(number)
        if size:
            codes = faiss.rev_swig_ptr(invlists.get_codes(number), size * invlists.code_size)
            with (scratch / str(number)).open("ab") as f:
                f.write(codes.tobytes())
            ids[number].append(faiss.rev_swig_ptr(invlists.get_ids(number), size).copy())


def _fill_direct_map(ivf: faiss.IndexIVF, lists: list[np.ndarray]) -> None:
    """Give the (empty) `ivf` the hashtable direct map and count of an index whose list l
    holds the ids `lists[l]`, as `add` and `set_direct_map_type` would have."""
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    every = np.ascontiguousarray(np.concatenate(lists))
    adding = faiss.DirectMapAdd(ivf.direct_map, len(every), faiss.swig_ptr(every))
    position = 0
    for number, found in enumerate(lists):
        for offset in range(len(found)):
            adding.add(position, number, offset)
            position += 1
    del adding  # its destructor inserts the entries
    ivf.ntotal = len(every)


def timed_searches(index: faiss.Index, queries: np.ndarray) -> tuple[float, int]:
    """Median milliseconds of a top-10 search per row of `queries [n, D]`, and the major page
    faults meanwhile (mapped codes read from disk: not, or no longer, in the page cache)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], 10)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults


def measure(path: Path, mmap: bool, queries: int, threads: int) -> dict:
    """Open the index, search the same queries twice (the second time their lists are in the
    page cache, unless evicted), and report this process's memory (run in a fresh process)."""
    faiss.omp_set_num_threads(threads)
    index = open_index(path) if mmap else faiss.read_index(str(path))
    set_nprobe(index, StoreConfig().nprobe)
    rows = RandomUnitRows(index.ntotal, index.d)
    picked = np.random.default_rng(1).choice(index.ntotal, queries, replace=False)
    search = rows[np.sort(picked)] + 0.01
    p50, faults = timed_searches(index, search)
    p50_again, faults_again = timed_searches(index, search)
    return {
        "mmap": mmap,
        "search_p50_ms": p50,
        "major_faults": faults,
        "search_p50_again_ms": p50_again,
        "major_faults_again": faults_again,
        "rss_mib": status_mib("VmRSS"),
        "rss_anon_mib": status_mib("RssAnon"),
        "rss_file_mib": status_mib("RssFile"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard-rows", type=int, default=0, help="0: write_faiss, all in RAM")
    parser.add_argument("--plain-read", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's part
    parser.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.mmap, args.queries, args.threads)))
        return
    faiss.omp_set_num_threads(args.threads)
    factory = f"IVF{int(min(65536, max(64, math.sqrt(args.examples))))},SQ8"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        start = time.perf_counter()
        rows = RandomUnitRows(args.examples, DIM)
        if args.shard_rows:
            write_ivf_in_shards(rows, factory, path, args.shard_rows)
        else:
            write_faiss(rows, np.arange(args.examples, dtype=np.int64), factory, path)
        build_seconds = time.perf_counter() - start
        opened = []
        for mmap in (True, False) if args.plain_read else (True,):
            child = [sys.executable, "-m", "benchmarks.serving_memory", "--measure", str(path),
                     "--queries", str(args.queries), "--threads", str(args.threads),
                     *(["--mmap"] if mmap else [])]  # fmt: skip
            done = subprocess.run(child, check=True, capture_output=True, text=True)
            opened.append(json.loads(done.stdout))
        size_mib = path.stat().st_size / 2**20
    emit(
        {
            "benchmark": "serving_memory",
            "examples": args.examples,
            "dim": DIM,
            "factory": factory,
            "writer": f"shards of {args.shard_rows} rows" if args.shard_rows else "write_faiss",
            "nprobe": StoreConfig().nprobe,
            "index_mib": size_mib,
            "index_bytes_per_example": size_mib * 2**20 / args.examples,
            "write_seconds": build_seconds,
            "write_peak_rss_mib": peak_rss_mib(),  # this process: the writing, not the opening
            "opened": opened,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
