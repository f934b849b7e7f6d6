"""Operating the server (fake engine): probes under load, retries and pins of versions, bad
bytes, request ids, error details, metrics, JSON logs and connection ageing."""

from __future__ import annotations

import io
import itertools
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from indexer.publish import PINNED
from influence.v1 import influence_pb2 as pb
from influence.v1 import influence_pb2_grpc
from server import reload
from server.cli import build_parser
from server.client import InfluenceClient
from server.logs import JsonFormatter
from tests.server_fakes import (
    INFO,
    FakeOpener,
    after_checks,
    counted_checks,
    publish,
    running_server,
)

SERVICE = "/influence.v1.InfluenceService/"


def wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def detail(error: grpc.RpcError, kind: type) -> object:
    """The google.rpc detail of type `kind` carried by a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    for any_detail in status.details:
        if any_detail.Is(kind.DESCRIPTOR):
            message = kind()
            any_detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.__name__} among {status.details}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    publish(tmp_path, "v1")
    return tmp_path


@pytest.fixture
def stub(root: Path) -> Iterator[tuple[FakeOpener, influence_pb2_grpc.InfluenceServiceStub]]:
    opener = FakeOpener()
    with (
        running_server(root, opener) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield opener, influence_pb2_grpc.InfluenceServiceStub(channel)


def test_health_and_info_are_never_shed_by_the_query_limit(root: Path) -> None:
    gate = threading.Event()
    opener = FakeOpener(gate=gate)
    limits = {"max_concurrent_queries": 2, "max_batch_size": 1, "max_wait_ms": 0}
    with running_server(root, opener, **limits) as (server, client), ThreadPoolExecutor(32) as pool:
        held = [pool.submit(client.query, f"slow{i}", " a") for i in range(2)]
        assert opener.engines[0].busy.wait(30)
        # One held query in the engine, the other queued: both slots are taken.
        wait_for(lambda: server.metrics.registry.get_sample_value("influence_queue_depth") == 1)
        extra = [pool.submit(code_of, lambda i=i: client.query(f"q{i}", " a")) for i in range(8)]
        probes = [pool.submit(client.health) for _ in range(16)]
        infos = [pool.submit(client.info) for _ in range(16)]
        assert [p.result(30) for p in probes] == ["SERVING"] * 16
        assert all(i.result(30).serving for i in infos)
        assert {c.result(30) for c in extra} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        gate.set()
        assert all(h.result(30).influences for h in held)
        assert client.query("after", " a").influences  # the limit frees as queries end


def test_resource_exhausted_carries_retry_info(root: Path) -> None:
    gate = threading.Event()
    opener = FakeOpener(gate=gate)
    with running_server(root, opener, max_concurrent_queries=1, max_wait_ms=0) as (_, client):
        slow = threading.Thread(target=client.query, args=("slow", " a"))
        slow.start()
        assert opener.engines[0].busy.wait(30)
        error = rpc_error(lambda: client.query("q", " a"))
        gate.set()
        slow.join()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 query RPCs in progress" in error.details()
    retry = detail(error, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 100


def test_invalid_arguments_carry_field_violations(stub) -> None:
    _, service = stub
    top_k = rpc_error(lambda: service.Query(pb.QueryRequest(prompt="a", completion=" b")))
    batch = rpc_error(
        lambda: service.QueryBatch(
            pb.QueryBatchRequest(
                queries=[
                    pb.QueryRequest(prompt="a", completion=" b", top_k=3),
                    pb.QueryRequest(prompt="a", completion="", top_k=3),
                ]
            )
        )
    )
    violations = [detail(e, error_details_pb2.BadRequest).field_violations for e in (top_k, batch)]
    assert [(v[0].field, v[0].description) for v in violations] == [
        ("top_k", top_k.details()),
        ("queries[1]", batch.details()),
    ]
    assert batch.details().startswith("queries[1]: ")


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [
        ("Query", pb.QueryRequest(prompt="BAD", completion=" sat", top_k=3), "prompt"),
        (
            "QueryBatch",
            pb.QueryBatchRequest(
                queries=[
                    pb.QueryRequest(prompt="a", completion=" b", top_k=3),
                    pb.QueryRequest(prompt="a", completion=" BAD", top_k=3),
                ]
            ),
            "queries[1].completion",
        ),
        (
            "AttributeTokens",
            pb.AttributeTokensRequest(prompt="a", completion="BAD", example_ids=[1]),
            "completion",
        ),
    ],
)
def test_invalid_utf8_is_invalid_argument_naming_the_field(
    root: Path, caplog: pytest.LogCaptureFixture, method: str, request_message, field: str
) -> None:
    payload = request_message.SerializeToString().replace(b"BAD", b"\xff\xfe!")
    with (
        running_server(root, FakeOpener()) as (server, client),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        call = channel.unary_unary(SERVICE + method)  # bytes in, bytes out
        error = rpc_error(lambda: call(payload, timeout=5))
        assert client.query("still", " fine").influences
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"{field} is not valid UTF-8"
    (violation,) = detail(error, error_details_pb2.BadRequest).field_violations
    assert violation.field == field
    assert "Traceback" not in caplog.text and "deserializ" not in caplog.text


def test_malformed_bytes_are_invalid_argument(root: Path) -> None:
    with (
        running_server(root, FakeOpener()) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        error = rpc_error(lambda: channel.unary_unary(SERVICE + "Query")(b"\x0a\xff", timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid influence.v1.QueryRequest" in error.details()


def test_request_ids_are_returned_and_logged(stub) -> None:
    _, service = stub
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("server.servicer")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        request = pb.QueryRequest(prompt="a", completion=" b", top_k=2)
        _, given = service.Query.with_call(request, metadata=[("x-request-id", "abc-123")])
        _, generated = service.Query.with_call(request)
        failed = rpc_error(lambda: service.Query(pb.QueryRequest(completion=" b")))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    ids = [dict(call.trailing_metadata())["x-request-id"] for call in (given, generated, failed)]
    assert ids[0] == "abc-123"
    assert len(ids[1]) == 32 and len(ids[2]) == 32 and ids[1] != ids[2]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ids
    assert lines[0]["message"].startswith("Query OK") and lines[0]["level"] == "DEBUG"
    assert lines[2]["message"].startswith("Query INVALID_ARGUMENT")
    assert {"time", "logger"} <= set(lines[0])


def test_refused_version_is_retried_when_its_files_change(root: Path) -> None:
    opener = FakeOpener()
    with running_server(root, opener, metrics_port=0) as (server, client):
        publish(root, "v2", corrupt=True)
        wait_for(lambda: "v2" in client.info().last_reload_error)
        attempts = len(opener.engines)
        (root / "versions" / "v2" / "CORRUPT").unlink()  # the bad file, fixed
        wait_for(lambda: client.info().version == "v2")
        info = client.info()
        metrics = server.metrics.registry
    assert info.last_reload_error == "" and len(opener.engines) == attempts + 1
    assert metrics.get_sample_value("influence_reload_failures_total") >= 1
    assert metrics.get_sample_value("influence_reload_successes_total") == 2


def test_refused_version_is_retried_with_backoff(root: Path, caplog) -> None:
    calls: list[float] = []
    opener = FakeOpener()

    def flaky(root: Path, version: str, current):
        calls.append(time.monotonic())
        if version == "v2" and len(calls) < 5:
            raise OSError("transient read error")
        return opener(root, version, current)

    poll = 0.02
    with running_server(root, flaky, poll_seconds=poll) as (server, client):
        publish(root, "v2")
        wait_for(lambda: client.info().version == "v2")
        failures = server.metrics.registry.get_sample_value("influence_reload_failures_total")
    gaps = [b - a for a, b in itertools.pairwise(calls[1:])]
    assert failures == 3 and len(gaps) == 3
    # Retried without SIGHUP, one poll after the first failure, then twice as late each time.
    assert all(gap >= 0.95 * poll * 2**i for i, gap in enumerate(gaps)), gaps
    logged = [r for r in caplog.records if "transient read error" in r.getMessage()]
    assert len(logged) == 3 and not any(r.exc_info for r in logged)


def test_unreadable_root_is_reported_once_without_a_traceback(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server(root, FakeOpener()) as (server, client):

        def unreadable(*_args: object) -> str:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(reload, "read_pinned", unreadable)
        wait_for(lambda: "Permission denied" in client.info().last_reload_error)
        time.sleep(0.3)  # several polls
        info = client.info()
        failures = server.metrics.registry.get_sample_value("influence_reload_failures_total")
        monkeypatch.undo()
        wait_for(lambda: client.info().last_reload_error == "")
    assert info.last_reload_error == f"cannot read index root {root}: Permission denied"
    assert info.serving and info.version == "v1"
    assert failures >= 3
    assert caplog.text.count("Permission denied") == 1 and "Traceback" not in caplog.text


def test_pins_serve_exactly_their_version(root: Path, monkeypatch) -> None:
    checks = counted_checks(monkeypatch)
    publish(root, "v2")
    with running_server(root, FakeOpener(), pin_version="v1") as (_, client):
        after_checks(checks)
        assert client.info().version == "v1"
    with running_server(root, FakeOpener()) as (_, client):
        assert client.info().version == "v2"
        (root / PINNED).write_text("v1\n")
        wait_for(lambda: client.info().version == "v1")
        publish(root, "v3")
        after_checks(checks)
        assert client.info().version == "v1"
        (root / PINNED).unlink()
        wait_for(lambda: client.info().version == "v3")


def test_a_refused_pin_serves_nothing_else(root: Path) -> None:
    publish(root, "v2", corrupt=True)
    (root / "CURRENT").unlink()  # so that the fixture does not wait for a version
    with running_server(root, FakeOpener(), pin_version="v2") as (_, client):
        wait_for(lambda: client.info().last_reload_error != "")
        info = client.info()
        assert not info.serving and client.health() == "NOT_SERVING"
    assert info.last_reload_error.startswith("version v2 (--pin-version) refused: ")
    assert info.last_reload_error.endswith("; serving nothing")


def test_metrics_include_process_index_age_and_reloads(root: Path) -> None:
    with running_server(root, FakeOpener(), metrics_port=0) as (server, client):
        client.info()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert float(samples[name]) > 0
    assert any(name.startswith("python_info{") for name in samples)
    assert any(name.startswith("python_gc_objects_collected_total") for name in samples)
    assert float(samples["influence_reload_successes_total"]) == 1
    assert float(samples["influence_index_load_seconds"]) >= 0
    built = datetime.fromisoformat(INFO.build_time).timestamp()
    assert float(samples["influence_index_age_seconds"]) == pytest.approx(
        time.time() - built, abs=60
    )


def test_connections_are_closed_after_their_max_age(root: Path) -> None:
    with running_server(root, FakeOpener(), max_connection_age_s=0.2, grace_seconds=0.2) as (
        server,
        _,
    ):
        connected: list[grpc.ChannelConnectivity] = []
        with InfluenceClient(f"127.0.0.1:{server.port}") as client:
            client._channel.subscribe(connected.append)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert client.health() == "SERVING"
                time.sleep(0.05)
            client._channel.unsubscribe(connected.append)
    assert connected.count(grpc.ChannelConnectivity.READY) >= 3


def test_health_port_answers_readiness_and_liveness(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeOpener(), health_port=0) as (server, _):
        assert server.health_port not in (None, server.port)
        with InfluenceClient(f"127.0.0.1:{server.health_port}") as probe:
            assert probe.health("liveness") == "SERVING"
            assert probe.health() == probe.health("influence.v1.InfluenceService") == "NOT_SERVING"
            assert code_of(probe.info) == grpc.StatusCode.UNIMPLEMENTED
            publish(tmp_path, "v1")
            server.reload()
            assert server.wait_until_serving(5)
            assert probe.health() == "SERVING" and probe.health("liveness") == "SERVING"


def test_log_format_json_writes_one_object_per_line() -> None:
    for argv in (["--log-format", "json", "pin"], ["pin", "--log-format", "json"]):
        args = build_parser().parse_args([*argv, "--index", "ROOT", "--clear"])
        assert args.log_format == "json"
    code = (
        "import logging; from server.logs import configure_logging, request_scope; "
        "configure_logging('INFO', 'json'); log = logging.getLogger('probe'); log.info('plain'); "
        "scope = request_scope('rid-1'); scope.__enter__(); log.warning('in a request')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    plain, scoped = (json.loads(line) for line in run.stderr.splitlines())
    assert (plain["level"], plain["logger"], plain["message"]) == ("INFO", "probe", "plain")
    assert "request_id" not in plain and scoped["request_id"] == "rid-1"
    assert datetime.fromisoformat(plain["time"]).tzinfo is not None


def test_a_request_over_the_byte_limit_is_refused_before_it_is_parsed(root: Path) -> None:
    oversized = pb.QueryRequest(prompt="\xff" * 600, completion=" y", top_k=3).SerializeToString()
    invalid = oversized.replace("\xff".encode(), b"\xff\xfe")  # not UTF-8 either
    with (
        running_server(root, FakeOpener(), max_query_bytes=1024) as (server, client),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        error = rpc_error(lambda: channel.unary_unary(SERVICE + "Query")(invalid, timeout=5))
        stream = channel.unary_stream(SERVICE + "QueryStream")  # it was parsed up to 16 MiB
        streamed = rpc_error(lambda: list(stream(invalid, timeout=5)))
        batch = client.query_batch([("a", " b")] * 3)  # the batch limit is 1024 per query
    for refused in (error, streamed):
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"is {len(invalid)} bytes, more than the 1024" in refused.details()
        assert "--max-query-mb" in refused.details()
    assert len(batch.responses) == 3
