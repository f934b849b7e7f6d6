"""The page's first answer against the service's own, for the same queries (issue 16).

    python -m benchmarks.ui_latency [--queries 24] [--threads 1] [--out results.json]

Serves the demo index (`.cache/demo-index`, built once as `influence-index demo` builds it)
with `influence-index serve` (the server's default exact re-rank) and the page over it with
`influence-index ui`, each in its own process. For each demo query in turn it measures, in
milliseconds: the time from submitting the page's form in headless Chromium to the page
showing the first (sketch) answer and the final one (the page's own `performance.now()`
marks), and the time from calling QueryStream through the project's client to its first and
last message, with the service's own `total_us` of its first message. The two paths alternate
query by query so that they share the machine's load. Needs /usr/bin/chromium and playwright.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, demo_artifacts, emit, start_run
from benchmarks.server_latency import free_port, wait_until_serving
from indexer.demo.index import ensure_demo_index
from indexer.query import LabeledQuery, read_queries
from server.client import InfluenceClient
from tests.browser import ask, chromium_page, missing, open_page, wait_for_answer

log = logging.getLogger("ui_latency")
WARM_UP = 2


@contextmanager
def process(*argv: str, threads: int) -> Iterator[subprocess.Popen]:
    """`influence-index ARGV` in a child process, terminated after."""
    command = [sys.executable, "-m", "server.cli", "--threads", str(threads), *argv]
    child = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    try:
        yield child
    finally:
        child.terminate()
        child.wait(timeout=60)


def client_ms(client: InfluenceClient, query: LabeledQuery) -> tuple[float, float, float]:
    """(first message, last message, the service's total_us of the first) in ms."""
    start = time.perf_counter()
    stream = client.query_stream(query.query.prompt, query.query.completion, top_k=10)
    first = next(stream)
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in stream:
        pass
    return first_ms, (time.perf_counter() - start) * 1e3, first.timings.total_us / 1e3


def page_ms(page, query: LabeledQuery) -> tuple[float, float]:
    """(first answer shown, final answer shown) in ms after submit, as the page measured."""
    ask(page, query.query.prompt, query.query.completion, top_k=10)
    first = wait_for_answer(page, "first")
    final = wait_for_answer(page, "final")
    page.wait_for_load_state("networkidle")  # the heatmaps' request, before the next query
    return first, final


def measure(queries: list[LabeledQuery], threads: int) -> dict:
    root = CACHE / "demo-index"
    ensure_demo_index(demo_artifacts(), root, rebuild=False, progress=False)
    grpc_port, page_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    serve = ("serve", "--index", str(root), "--port", str(grpc_port))
    ui = ("ui", "--target", target, "--port", str(page_port))
    with (
        process(*serve, threads=threads) as server,
        InfluenceClient(target) as client,
    ):
        wait_until_serving(client, server)
        info = client.info()
        with process(*ui, threads=threads), chromium_page() as page:
            _open_when_up(page, f"http://127.0.0.1:{page_port}/")
            rows = []
            for i, query in enumerate([*queries[:WARM_UP], *queries]):
                pair = (page_ms(page, query), client_ms(client, query))
                if i >= WARM_UP:
                    rows.append(pair)
                    log.info("query %d: page %s, client %s", i - WARM_UP, *pair)
    page_first, page_final = (np.array(v) for v in zip(*(p for p, _ in rows), strict=True))
    grpc_first, grpc_final, service_first = (
        np.array(v) for v in zip(*(c for _, c in rows), strict=True)
    )
    return {
        "benchmark": "ui_latency",
        "queries": len(rows),
        "index_version": info.version,
        "examples": info.n_examples,
        "server_rerank_depth": info.rerank_depth,
        "threads": threads,
        "page_first_answer_ms_p50": p50(page_first),
        "client_first_answer_ms_p50": p50(grpc_first),
        "service_first_answer_total_ms_p50": p50(service_first),
        "page_final_answer_ms_p50": p50(page_final),
        "client_final_answer_ms_p50": p50(grpc_final),
        "first_answer_ratio_p50": p50(page_first) / p50(grpc_first),
        "first_answer_over_service_p50": p50(page_first) / p50(service_first),
        "first_answer_ratio_per_query_p50": p50(page_first / grpc_first),
        "first_answer_ratio_per_query_max": float(np.max(page_first / grpc_first)),
        "final_answer_ratio_p50": p50(page_final) / p50(grpc_final),
    }


def p50(values: np.ndarray) -> float:
    return float(np.median(values))


def _open_when_up(page, url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            open_page(page, url)
            return
        except Exception:  # the page server is not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=24, help="demo queries measured")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if missing():
        parser.error(missing())
    start_run(args.threads)
    queries = read_queries(demo_artifacts().queries_path)[: args.queries]
    emit(measure(queries, args.threads), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
