"""Prometheus metrics of one server, in its own registry, optionally exposed over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

# Seconds; from a cached small-model query (sub-millisecond stages) to a slow batch on CPU.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Request, stage, batch, queue and version metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
            "influence_reload_failures", "Published versions refused.", registry=self.registry
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

    def reload_failed(self) -> None:
        self._reload_failures.inc()

    def set_version(self, version: str) -> None:
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
