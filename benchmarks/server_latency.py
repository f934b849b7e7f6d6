"""Query latency and throughput over gRPC on a large index, next to the bare model work.

    python -m benchmarks.server_latency --documents 100000 [--out results.json]

Builds (or reuses, under .cache/bench-index-N) an index of a synthetic demo-style corpus with
the demo model, starts `influence-index serve` as a subprocess, and measures from real gRPC
clients on localhost: single-client latency (p50, p99) and throughput with each count of
concurrent clients in `--clients` (1, 8 and 32 by default; `--index ROOT` serves an index
already built, e.g. `benchmarks.tiers`'s 100k version with its compact code). In the same run
it measures the floor a server cannot beat: the bare forward/backward
of the same queries (batch of one, same model, parameter gradients as in training) plus the
search of their vectors, one at a time, by the engine's searcher (the flat scan or the tier).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch

from benchmarks.common import (
    CACHE,
    comma_ints,
    demo_artifacts,
    emit,
    status_mib,
    synthetic_corpus,
)
from indexer.engine import QueryEngine
from indexer.publish import read_current
from indexer.query import LabeledQuery, read_queries
from indexer.sketch import summed_nll
from server.client import InfluenceClient


def ensure_index(documents: int, batch_size: int) -> Path:
    root = CACHE / f"bench-index-{documents}"
    if read_current(root) is None:
        corpus = synthetic_corpus(CACHE / f"bench-corpus-{documents}.jsonl", documents)
        command = [sys.executable, "-m", "server.cli", "build", "--model",
                   str(demo_artifacts().model_dir), "--data", str(corpus), "--out", str(root),
                   "--batch-size", str(batch_size)]  # fmt: skip
        subprocess.run(command, check=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_floor_ms(root: Path, queries: list[LabeledQuery]) -> dict:
    """Per query: forward/backward with parameter gradients, and the engine's search alone."""
    engine = QueryEngine.open(root)
    model = engine.loaded.model
    model.requires_grad_(True)
    gradient_ms, search_ms = [], []
    for query in queries:
        encoded = engine.prepare(query.query)
        ids = torch.tensor([encoded.token_ids])
        targets = torch.full_like(ids, -100)
        targets[0, encoded.loss_start :] = ids[0, encoded.loss_start :]
        start = time.perf_counter()
        summed_nll(model(input_ids=ids).logits, targets).sum().backward()
        gradient_ms.append((time.perf_counter() - start) * 1e3)
        model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    vectors = engine.query_vectors([engine.prepare(q.query) for q in queries])
    for row in vectors:
        start = time.perf_counter()
        engine.searcher.search(row[None, :], 10)
        search_ms.append((time.perf_counter() - start) * 1e3)
    return {
        "forward_backward_ms_p50": float(np.median(gradient_ms)),
        "search_ms_p50": float(np.median(search_ms)),
        "floor_ms_p50": float(np.median(np.add(gradient_ms, search_ms))),
    }


def timed_queries(target: str, queries: list[LabeledQuery], n: int, offset: int) -> list[float]:
    with InfluenceClient(target) as client:
        latencies = []
        for i in range(n):
            q = queries[(offset + i) % len(queries)]
            start = time.perf_counter()
            client.query(q.query.prompt, q.query.completion, top_k=10, include_text=False)
            latencies.append((time.perf_counter() - start) * 1e3)
    return latencies


def concurrent_rate(
    target: str, queries: list[LabeledQuery], clients: int, per_client: int
) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda c: timed_queries(target, queries, per_client, c * 7),
                             range(clients)))  # fmt: skip
    seconds = time.perf_counter() - start
    latencies = [x for run in runs for x in run]
    return {
        "clients": clients,
        "queries": len(latencies),
        "queries_per_second": len(latencies) / seconds,
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p99": float(np.percentile(latencies, 99)),
    }


def wait_until_serving(client: InfluenceClient, server: subprocess.Popen) -> None:
    while True:
        if server.poll() is not None:
            raise SystemExit("server exited before serving")
        try:
            if client.health(timeout_s=2) == "SERVING":
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--index", type=Path, help="serve this index ROOT instead of building")
    parser.add_argument("--clients", type=comma_ints, default=(1, 8, 32))
    parser.add_argument(
        "--rerank-depth",
        type=int,
        default=0,
        help="the server's default depth (0: the search path alone, the work the floor times)",
    )
    parser.add_argument("--single", type=int, default=200, help="sequential single-client queries")
    parser.add_argument("--per-client", type=int, default=60, help="queries per concurrent client")
    parser.add_argument("--build-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, server and floor")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.index or ensure_index(args.documents, args.build_batch_size)
    queries = read_queries(demo_artifacts().queries_path)
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--index", str(root),
               "--port", str(port)]  # fmt: skip
    command += ["--rerank-depth", str(args.rerank_depth)]
    server = subprocess.Popen(
        command,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    target = f"127.0.0.1:{port}"
    try:
        with InfluenceClient(target) as client:
            wait_until_serving(client, server)
            info = client.info()
        timed_queries(target, queries, 20, 0)  # warm-up
        single = timed_queries(target, queries, args.single, 0)
        rates = [concurrent_rate(target, queries, c, args.per_client) for c in args.clients]
        rss = {f: status_mib(f, server.pid) for f in ("VmHWM", "RssAnon", "RssFile")}
    finally:
        server.terminate()
        server.wait(timeout=60)
    floor = bare_floor_ms(root, queries)
    p50 = float(np.percentile(single, 50))
    emit(
        {
            "benchmark": "server_latency",
            "torch_threads": args.threads,
            "examples": info.n_examples,
            "index_factory": info.faiss_factory,
            "dim": info.dim,
            "single_client": {
                "queries": len(single),
                "latency_ms_p50": p50,
                "latency_ms_p99": float(np.percentile(single, 99)),
            },
            "retrieval_code": info.retrieval_code,
            "rerank_depth": info.rerank_depth,
            "concurrent": rates,
            "throughput_gain_over_first": [
                r["queries_per_second"] / rates[0]["queries_per_second"] for r in rates
            ],
            "load_average": os.getloadavg(),
            "bare": floor,
            "p50_over_floor": p50 / floor["floor_ms_p50"],
            "server_peak_rss_mib": rss["VmHWM"],
            # private memory, and the mapped index's pages (shared through the page cache)
            "server_rss_anon_mib": rss["RssAnon"],
            "server_rss_file_mib": rss["RssFile"],
        },
        args.out,
    )


if __name__ == "__main__":
    main()
