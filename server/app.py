"""The influence server process: gRPC service, health, reflection, reload, metrics, signals."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from indexer.backend import open_pointers
from indexer.config import Backend, BackendConfig
from indexer.engine import EngineOptions, QueryEngine
from indexer.errors import InvalidInputError
from influence.v1 import influence_pb2
from server.auth import BearerTokenInterceptor, SecurityConfig, TlsFiles, server_credentials
from server.batching import BatcherConfig, MicroBatcher
from server.dispatch import Dispatcher, WorkItem
from server.metrics import ServerMetrics
from server.reflection import enable_reflection
from server.reload import EngineHolder, EngineOpener, Reloader, ReloadPolicy
from server.rpc import service_handler
from server.servicer import InfluenceServicer, Served, ServiceLimits

if TYPE_CHECKING:
    from indexer.milvus import MilvusBackend

log = logging.getLogger(__name__)

SERVICE = influence_pb2.DESCRIPTOR.services_by_name["InfluenceService"]
SERVICE_NAME = SERVICE.full_name
LIVENESS = "liveness"
"""Health service name that is SERVING while the process runs; "" and SERVICE_NAME are SERVING
only while an index version is loaded (readiness)."""

# Threads beyond the query limit, so that health checks, GetIndexInfo, reflection and the
# immediate RESOURCE_EXHAUSTED answers always find one while queries hold the rest.
_SPARE_THREADS = 8
_HEALTH_PORT_THREADS = 2
_SIGNAL_CHECK_SECONDS = 0.2
"""Longest delay between a signal reaching another thread and serve_forever acting on it."""


@dataclass
class ServerConfig:
    """Everything `influence-index serve` can set (its options are generated from these fields).
    Times in seconds unless named _ms."""

    index_root: Path = field(
        metadata={"help": "published index root", "flags": ("--index",), "metavar": "ROOT"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: all)"})
    port: int = field(
        default=50051, metadata={"help": "gRPC port; 0 picks a free one", "min": 0, "max": 65535}
    )
    device: str = field(
        default="cpu", metadata={"help": "torch device for the query model: cpu, cuda, ..."}
    )
    model_dir: Path | None = field(
        default=None,
        metadata={
            "help": "model directory overriding the manifest's (its sha256 must match)",
            "flags": ("--model",),
        },
    )
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus metrics over HTTP on this port",
            "min": 0,
            "max": 65535,
        },
    )
    health_port: int | None = field(
        default=None,
        metadata={
            "help": "also serve grpc.health.v1.Health alone, in plaintext (even with TLS), on "
            "this port: service '' = ready (an index is loaded), 'liveness' = the process is up",
            "min": 0,
            "max": 65535,
        },
    )
    batching: BatcherConfig = field(
        default_factory=BatcherConfig, metadata={"group": "batching and limits"}
    )
    limits: ServiceLimits = field(
        default_factory=ServiceLimits, metadata={"group": "batching and limits"}
    )
    # 1 MiB holds ~250k tokens of text.
    max_query_bytes: int = field(
        default=1 << 20,
        metadata={
            "help": "largest Query or AttributeTokens request, in MiB (QueryBatch: times "
            "--max-queries-per-batch); larger ones get INVALID_ARGUMENT before they are parsed",
            "flags": ("--max-query-mb",),
            "unit": 1 << 20,
            "group": "batching and limits",
        },
    )
    max_message_bytes: int = field(
        default=16 << 20,
        metadata={
            "help": "largest gRPC message, in MiB",
            "flags": ("--max-message-mb",),
            "unit": 1 << 20,
            "group": "batching and limits",
        },
    )
    reload: ReloadPolicy = field(
        default_factory=ReloadPolicy, metadata={"group": "reload and shutdown"}
    )
    grace_seconds: float = field(
        default=10.0,
        metadata={
            "help": "time in-flight requests get to finish on SIGTERM/SIGINT (and on a "
            "connection closed for its age)",
            "group": "reload and shutdown",
        },
    )
    max_connection_age_s: float | None = field(
        default=None,
        metadata={
            "help": "close client connections after this age so that clients of a Kubernetes "
            "ClusterIP Service reconnect and rebalance over the pods (default: never)",
            "flags": ("--max-connection-age-seconds",),
            "group": "reload and shutdown",
        },
    )
    security: SecurityConfig = field(
        default_factory=SecurityConfig, metadata={"group": "security (off by default)"}
    )
    engine: EngineOptions = field(
        default_factory=EngineOptions, metadata={"group": "exact re-ranking"}
    )
    backend: BackendConfig = field(
        default_factory=BackendConfig, metadata={"group": "vector engine"}
    )

    def __post_init__(self) -> None:
        # A QueryBatch queues all its queries at once: a larger one than the queue holds would
        # get RESOURCE_EXHAUSTED, a retryable error, however long its client retried.
        batch, queue = self.limits.max_queries_per_batch, self.batching.max_queue
        if batch > queue:
            raise InvalidInputError(
                f"--max-queries-per-batch {batch} is over --max-queue {queue}: such a batch "
                "could never be queued"
            )


def open_engine(
    root: Path,
    version: str,
    current: QueryEngine | None,
    *,
    device: str,
    model_dir: Path | None,
    options: EngineOptions,
    milvus: MilvusBackend | None = None,
) -> QueryEngine:
    """The default EngineOpener: QueryEngine.open, reusing the served model when it matches;
    with `milvus`, searching the version's collection. The engine answers one query of its own
    (`QueryEngine.warm_up`) before it is served."""
    engine = QueryEngine.open(
        root,
        version=version,
        device=device,
        model_dir=model_dir,
        reuse_model_from=current,
        options=options,
        milvus=milvus,
    )
    try:
        engine.warm_up()
    except BaseException:
        engine.close()
        raise
    return engine


class InfluenceServer:
    """One server. start() returns at once; the index loads in the background."""

    def __init__(self, config: ServerConfig, *, opener: EngineOpener | None = None) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self._opener = opener  # None: `open_engine`, once start() has connected to the backend
        self._holder = EngineHolder()
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._serving = threading.Event()
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._health_server: grpc.Server | None = None
        self._batcher: MicroBatcher[WorkItem, Served] | None = None
        self._reloader: Reloader | None = None
        self._port: int | None = None
        self._health_port: int | None = None
        self._metrics_port: int | None = None
        self._milvus: MilvusBackend | None = None

    @property
    def port(self) -> int:
        """The bound gRPC port (the real one when the config asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_port

    @property
    def health_port(self) -> int | None:
        return self._health_port

    def start(self) -> None:
        config = self.config
        tls = config.security.tls()
        token = config.security.token()
        if not config.index_root.is_dir():
            raise InvalidInputError(f"index root {config.index_root} is not a directory")
        pointers = open_pointers(config.index_root, config.backend)
        milvus = pointers if config.backend.backend == Backend.MILVUS else None
        self._milvus = milvus
        opener = self._opener or partial(
            open_engine,
            device=config.device,
            model_dir=config.model_dir,
            options=config.engine,
            milvus=milvus,
        )
        batcher: MicroBatcher[WorkItem, Served] = MicroBatcher(
            Dispatcher(self._holder, self.metrics),
            config.batching,
            name="query-batcher",
        )
        reloader = Reloader(
            config.index_root,
            self._holder,
            opener,
            config.reload,
            on_swap=self._on_swap,
            on_failure=self.metrics.reload_failed,
            pointers=pointers,
        )
        server = self._grpc_server(token, batcher, reloader)
        health_server = self._health_only_server() if config.health_port is not None else None
        listening: list[grpc.Server] = []
        try:
            if config.metrics_port is not None:
                self._metrics_port = self._serve_metrics(config.metrics_port)
            self._port = self._bind(server, config.port, tls)
            listening.append(server)
            if health_server is not None:
                self._health_port = self._bind(health_server, config.health_port, None)
        except InvalidInputError:
            # gRPC listens on a port from the moment it is added until the server has started
            # and stopped: only then is the port given back.
            for bound in listening:
                bound.start()
                bound.stop(None).wait()
            self.metrics.stop_http()
            batcher.close()
            raise
        self.metrics.track_queue_depth(lambda: batcher.depth)
        self.metrics.track_index_age(self._served_build_time)
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        server.start()
        if health_server is not None:
            health_server.start()
        self._server, self._health_server = server, health_server
        self._batcher, self._reloader = batcher, reloader
        log.info(
            "listening on %s:%d (tls=%s, auth=%s, health port=%s, metrics port=%s); loading %s",
            config.host,
            self._port,
            tls is not None,
            token is not None,
            self._health_port,
            self._metrics_port,
            config.index_root,
        )
        reloader.start()

    def __enter__(self) -> InfluenceServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def wait_until_serving(self, timeout_s: float | None = None) -> bool:
        """Block until an index version is loaded (seconds); False on timeout."""
        return self._serving.wait(timeout_s)

    def reload(self) -> None:
        """Check the published version now (what SIGHUP does)."""
        if self._reloader is not None:
            self._reloader.request_reload()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting RPCs, let in-flight ones finish within grace_s, release everything.
        The grace is one budget for the whole stop: a load or a batch still running when it is
        spent is left to end on its own (its engine is closed when it does)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        grace = self.config.grace_seconds if grace_s is None else grace_s
        until = time.monotonic() + grace
        self._health.enter_graceful_shutdown()
        if self._reloader is not None:
            self._reloader.stop(timeout_s=0)  # no new version loads while the queries drain
        server.stop(grace).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        if self._reloader is not None:
            self._reloader.stop(timeout_s=max(0.0, until - time.monotonic()))
        if self._batcher is not None:
            self._batcher.close(timeout_s=max(0.0, until - time.monotonic()))
        self._holder.swap(None)
        self._serving.clear()
        if self._milvus is not None:
            self._milvus.close()
        self.metrics.stop_http()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop gracefully. SIGHUP reloads.

        Must run in the main thread (Python delivers signals there).
        """
        handlers = {
            signal.SIGTERM: self._request_stop,
            signal.SIGINT: self._request_stop,
            signal.SIGHUP: self._request_reload,
        }
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            self.start()
            # A timed wait, because the kernel may hand a process signal to any thread: Python
            # then runs its handler only when the main thread next wakes, which an untimed wait
            # would postpone for ever.
            while not self._stop_requested.wait(_SIGNAL_CHECK_SECONDS):
                pass
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def request_stop(self) -> None:
        """Make `serve_forever` stop gracefully, as SIGTERM does; safe from any thread."""
        self._stop_requested.set()

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info(
            "%s: stopping (grace %.1f s)", signal.Signals(signum).name, self.config.grace_seconds
        )
        self.request_stop()

    def _request_reload(self, _signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP: checking for a new index version")
        self.reload()

    def _on_swap(self, version: str, load_seconds: float) -> None:
        self.metrics.reload_succeeded(version, load_seconds)
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._serving.set()

    def _grpc_server(
        self, token: str | None, batcher: MicroBatcher[WorkItem, Served], reloader: Reloader
    ) -> grpc.Server:
        config = self.config
        interceptors = []
        if token is not None:
            interceptors.append(BearerTokenInterceptor(token, on_denied=self.metrics.count_denied))
        # No maximum_concurrent_rpcs: it would shed health checks and GetIndexInfo along with
        # queries. The servicer bounds the query RPCs instead and answers the rest at once.
        server = grpc.server(
            ThreadPoolExecutor(
                config.limits.max_concurrent_queries + _SPARE_THREADS, thread_name_prefix="grpc"
            ),
            interceptors=interceptors,
            options=self._channel_options(),
        )
        servicer = InfluenceServicer(
            self._holder,
            batcher,
            reloader,
            config.limits,
            self.metrics,
        )
        query_bytes = config.max_query_bytes
        max_request_bytes = {
            "Query": query_bytes,
            "QueryStream": query_bytes,
            "AttributeTokens": query_bytes,
            "QueryBatch": query_bytes * config.limits.max_queries_per_batch,
        }
        server.add_generic_rpc_handlers((service_handler(SERVICE, servicer, max_request_bytes),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
        return server

    def _channel_options(self) -> list[tuple[str, int]]:
        config = self.config
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Without this a second server on the same port would silently share its traffic.
            ("grpc.so_reuseport", 0),
        ]
        if config.max_connection_age_s is not None:
            # Clients of a ClusterIP Service stick to one pod per connection; closing
            # connections after this age (GOAWAY, then `grace` for in-flight calls) makes them
            # reconnect and spread over the pods again.
            options += [
                ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
            ]
        return options

    def _health_only_server(self) -> grpc.Server:
        """The --health-port server: plaintext, Health only, its own threads, so that probes
        need no TLS client and never wait behind queries."""
        server = grpc.server(
            ThreadPoolExecutor(_HEALTH_PORT_THREADS, thread_name_prefix="health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        return server

    def _served_build_time(self) -> str | None:
        engine = self._holder.current
        return engine.info.build_time if engine is not None else None

    def _serve_metrics(self, port: int) -> int:
        """Serve /metrics on the configured host and `port`; returns the bound port."""
        try:
            return self.metrics.serve_http(self.config.host, port)
        except OSError as exc:
            address = f"{self.config.host}:{port}"
            raise InvalidInputError(
                f"cannot serve metrics on {address}: {exc.strerror or exc}"
            ) from exc

    def _bind(self, server: grpc.Server, port: int, tls: TlsFiles | None) -> int:
        address = f"{self.config.host}:{port}"
        try:
            if tls is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, server_credentials(tls))
        except RuntimeError as exc:
            raise InvalidInputError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise InvalidInputError(f"cannot listen on {address}")
        return port
