"""Prometheus metrics: one server's, in its own registry, optionally exposed over HTTP; and
a build's, written for node-exporter's textfile collector or pushed to a Pushgateway."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    push_to_gateway,
    start_http_server,
    write_to_textfile,
)

from indexer.errors import InvalidInputError

# Seconds; from a cached small-model query (sub-millisecond stages) to a slow batch on CPU.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Request, stage, batch, queue, version and reload metrics, and the standard process_*
    and python_* ones."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._requests = Counter(
            "influence_requests",
            "RPCs answered, by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "influence_request_seconds",
            "RPC latency in seconds, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stages = Histogram(
            "influence_stage_seconds",
            "Per-query time in seconds spent in each stage.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batch_size = Histogram(
            "influence_batch_size",
            "Items per engine batch.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self._queue_depth = Gauge(
            "influence_queue_depth", "Queries waiting for a batch.", registry=self.registry
        )
        self._reload_failures = Counter(
            "influence_reload_failures",
            "Failed attempts to load the wanted version (refused, or the index root unreadable).",
            registry=self.registry,
        )
        self._reload_successes = Counter(
            "influence_reload_successes",
            "Index versions loaded and swapped in.",
            registry=self.registry,
        )
        self._load_seconds = Gauge(
            "influence_index_load_seconds",
            "Seconds the last successful load (verify and open) took.",
            registry=self.registry,
        )
        self._index_age = Gauge(
            "influence_index_age_seconds",
            "Seconds since the served version was built (its manifest's `created`); NaN while "
            "none is served.",
            registry=self.registry,
        )
        self._index = Info("influence_index", "The index version served.", registry=self.registry)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self._requests.labels(method, code).inc()
        self._latency.labels(method).observe(seconds)

    def observe_stages(self, stage_us: dict[str, int]) -> None:
        """Record one query's stage times, given in microseconds, keyed by stage name."""
        for stage, us in stage_us.items():
            self._stages.labels(stage).observe(us / 1e6)

    def count_denied(self, full_method: str) -> None:
        """Count a call refused by authentication; `full_method` is '/package.Service/Method'."""
        self._requests.labels(full_method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()

    def observe_batch(self, size: int) -> None:
        self._batch_size.observe(size)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        self._queue_depth.set_function(depth)

    def track_index_age(self, build_time: Callable[[], str | None]) -> None:
        """`build_time()`: the served version's ISO 8601 creation time, None if none."""
        self._index_age.set_function(lambda: _age_seconds(build_time()))

    def reload_failed(self) -> None:
        self._reload_failures.inc()

    def reload_succeeded(self, version: str, load_seconds: float) -> None:
        self._reload_successes.inc()
        self._load_seconds.set(load_seconds)
        self._index.info({"version": version})

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0 picks a free port); returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        if self._http_thread is not None:
            self._http_thread.join()
        self._http = None


def _age_seconds(iso_time: str | None) -> float:
    if not iso_time:
        return float("nan")
    try:
        return time.time() - datetime.fromisoformat(iso_time).timestamp()
    except ValueError:
        return float("nan")


def check_build_metric_targets(textfile: Path | None, pushgateway: str | None) -> None:
    """Refuse, before a build starts, where its metrics could not go: a textfile in a missing
    or unwritable directory, or a Pushgateway address that is not an http(s) URL. A build
    that fails only after publishing would read as a failed build to its scheduler."""
    if textfile is not None:
        directory = Path(textfile).resolve().parent
        if not (directory.is_dir() and os.access(directory, os.W_OK)):
            raise InvalidInputError(f"--metrics-textfile: {directory} is not a writable directory")
    if pushgateway is not None:
        try:
            url = urlsplit(pushgateway if "://" in pushgateway else f"http://{pushgateway}")
            valid = url.scheme in ("http", "https") and bool(url.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise InvalidInputError(f"--pushgateway: {pushgateway!r} is not an http(s) address")


def export_build_metrics(
    version: str,
    examples: int,
    duration_s: float,
    *,
    textfile: Path | None = None,
    pushgateway: str | None = None,
) -> None:
    """Record a successful build (`duration_s`: seconds) so that a build that stops succeeding
    is noticed: atomically replace `textfile` (for node-exporter's textfile collector) and/or
    push to the Pushgateway at `pushgateway` (job `influence_index_build`)."""
    registry = CollectorRegistry()
    Gauge(
        "influence_index_build_last_success_timestamp_seconds",
        "Unix time at which the last build published a version.",
        registry=registry,
    ).set_to_current_time()
    Gauge(
        "influence_index_build_duration_seconds",
        "Wall time of the last successful build.",
        registry=registry,
    ).set(duration_s)
    Gauge(
        "influence_index_build_examples",
        "Examples in the last published version.",
        registry=registry,
    ).set(examples)
    Info("influence_index_build", "The last published version.", registry=registry).info(
        {"version": version}
    )
    if textfile is not None:
        try:
            write_to_textfile(str(textfile), registry)
        except OSError as exc:
            raise InvalidInputError(f"cannot write the metrics file {textfile}: {exc}") from exc
    if pushgateway is not None:
        try:
            push_to_gateway(pushgateway, job="influence_index_build", registry=registry)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot push metrics to {pushgateway}: {exc}") from exc
