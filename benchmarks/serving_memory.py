"""Resident memory of a served index, memory-mapped as the server opens it (issue 9).

    python -m benchmarks.serving_memory --examples 200000 --threads 1 [--out F]

Writes the index a build writes above 50,000 examples (`default_factory`: IVF√N,SQ8 with a
direct map) over N random unit vectors of the demo's dimension, then, in a fresh process per
way of opening it, opens it (`open_index`: `IO_FLAG_MMAP_IFC`; and a plain `read_index` for
comparison), runs `--queries` searches at the default nprobe and reports the process's
resident memory (anonymous, and file pages, which replicas on one host share through the page
cache) against the file's size, and the search p50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.common import emit
from indexer.config import StoreConfig
from indexer.store import default_factory, open_index, set_nprobe, write_faiss

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


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(path: Path, mmap: bool, queries: int, threads: int) -> dict:
    """Open the index, search, and report this process's memory (run in a fresh process)."""
    faiss.omp_set_num_threads(threads)
    index = open_index(path) if mmap else faiss.read_index(str(path))
    set_nprobe(index, StoreConfig().nprobe)
    rows = RandomUnitRows(index.ntotal, index.d)
    picked = np.random.default_rng(1).choice(index.ntotal, queries, replace=False)
    search = rows[np.sort(picked)] + 0.01
    times = []
    for q in search:
        start = time.perf_counter()
        index.search(q[None], 10)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "mmap": mmap,
        "search_p50_ms": statistics.median(times),
        "rss_mib": status_mib("VmRSS"),
        "rss_anon_mib": status_mib("RssAnon"),
        "rss_file_mib": status_mib("RssFile"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's part
    parser.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.mmap, args.queries, args.threads)))
        return
    faiss.omp_set_num_threads(args.threads)
    factory = default_factory(args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        start = time.perf_counter()
        ids = np.arange(args.examples, dtype=np.int64)
        write_faiss(RandomUnitRows(args.examples, DIM), ids, factory, False, path)
        build_seconds = time.perf_counter() - start
        opened = []
        for mmap in (True, False):
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
            "nprobe": StoreConfig().nprobe,
            "index_mib": size_mib,
            "index_bytes_per_example": size_mib * 2**20 / args.examples,
            "write_seconds": build_seconds,
            "opened": opened,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
