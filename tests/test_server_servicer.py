"""The gRPC layer over a fake engine: a real server on a free port, the real client."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer.config import ScoreKind
from indexer.errors import InvalidInputError
from indexer.query import Query, TokenizedQuery
from influence.v1 import influence_pb2 as pb
from server.app import InfluenceServer, ServerConfig
from server.client import InfluenceClient, format_query_table, format_token_attribution
from server.dispatch import Dispatcher, QueryWork, ServedQuery
from server.metrics import ServerMetrics
from server.reload import EngineHolder
from tests.server_fakes import (
    EXPLODE,
    MAX_LENGTH,
    FakeEngine,
    FakeOpener,
    configure,
    publish,
    running_server,
)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    publish(tmp_path, "v1")
    return tmp_path


def test_query_returns_ranked_influences_with_text_only_when_asked(root: Path) -> None:
    with running_server(root, FakeOpener()) as (_, client):
        response = client.query("The cat", " sat", top_k=5, include_layer_scores=True)
        bare = client.query("The cat", " sat", top_k=3, include_text=False)
    assert response.index_version == "v1"
    assert len(response.influences) == 5
    assert [i.score for i in response.influences] == sorted(
        (i.score for i in response.influences), reverse=True
    )
    assert all(i.text.startswith("text of example") for i in response.influences)
    assert all(i.layer_scores for i in response.influences)
    assert response.n_completion_tokens == 4
    assert response.score_kind == pb.SCORE_KIND_INFLUENCE
    assert response.timings.gradient_us == 2
    assert response.timings.total_us >= response.timings.queue_us
    assert [i.example_id for i in bare.influences] == [
        i.example_id for i in response.influences[:3]
    ]
    assert all(i.text == "" and not i.layer_scores for i in bare.influences)
    table = format_query_table(response)
    assert "doc-" in table and "text of example" in table


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k must be between 1 and 50"),
        ({"top_k": 51}, "--max-top-k"),
        ({"completion": ""}, "completion is empty"),
        ({"completion": "x" * (MAX_LENGTH + 1)}, f"context of {MAX_LENGTH} tokens"),
        ({"score_kind": "cosine"}, "ranks by influence"),
    ],
)
def test_bad_queries_are_invalid_argument(root: Path, kwargs: dict, message: str) -> None:
    query = {"prompt": "The cat", "completion": " sat", "top_k": 5} | kwargs
    with running_server(root, FakeOpener(), max_top_k=50) as (_, client):
        error = rpc_error(lambda: client.query(**query))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_query_batch_matches_single_queries_in_one_engine_pass(root: Path) -> None:
    opener = FakeOpener()
    pairs = [("The cat", " sat"), ("A dog", " ran"), ("", "hello")]
    with running_server(root, opener) as (_, client):
        singles = [client.query(p, c, top_k=4) for p, c in pairs]
        passes_before = len(opener.engines[0].batches)
        batch = client.query_batch(pairs, top_k=4)
        assert opener.engines[0].batches[passes_before:] == [3]
    for single, batched in zip(singles, batch.responses, strict=True):
        assert list(batched.influences) == list(single.influences)
        assert batched.index_version == single.index_version


def test_query_batch_errors_name_the_query_and_the_limit(root: Path) -> None:
    with running_server(root, FakeOpener(), max_queries_per_batch=2) as (_, client):
        bad = rpc_error(lambda: client.query_batch([("a", " b"), ("c", "")]))
        too_many = rpc_error(lambda: client.query_batch([("a", " b")] * 3))
        empty = rpc_error(lambda: client.query_batch([]))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.details().startswith("queries[1]: ")
    assert too_many.code() == empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 to 2 queries" in too_many.details()


def test_attribute_tokens_and_unknown_ids(root: Path) -> None:
    with running_server(root, FakeOpener(), max_attribution_examples=3) as (_, client):
        response = client.attribute_tokens("The cat", " sat", [4, 2])
        unknown = rpc_error(lambda: client.attribute_tokens("The cat", " sat", [4, 1000]))
        too_many = rpc_error(lambda: client.attribute_tokens("The cat", " sat", [1, 2, 3, 4]))
    assert [a.example_id for a in response.attributions] == [4, 2]
    assert list(response.attributions[0].tokens) == ["The", " cat", " sat"]
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "1000" in unknown.details()
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT
    plain = format_token_attribution(response.attributions[0])
    assert "[The +0.5]" in plain and "[cat -0.25]" in plain and " [sat +1]" in plain
    assert "\x1b[" in format_token_attribution(response.attributions[0], color=True)


def test_engine_bug_is_internal_without_traceback_and_spares_other_jobs(root: Path) -> None:
    with running_server(root, FakeOpener()) as (_, client):
        error = rpc_error(lambda: client.query("The cat", EXPLODE))
        assert client.query("The cat", " sat").influences
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in error.details() and "simulated" not in error.details()


def test_a_query_that_breaks_the_engine_fails_alone_in_its_batch(root: Path) -> None:
    """Another client's query in the same forward/backward pass got INTERNAL too."""
    gate = threading.Event()
    opener = FakeOpener(gate=gate)
    with running_server(root, opener) as (server, client), ThreadPoolExecutor(3) as pool:
        held = pool.submit(client.query, "hold", " a")
        assert wait_until(opener.engines[0].busy.is_set)
        bad = pool.submit(_code_of, lambda: client.query("The cat", EXPLODE))
        good = pool.submit(_code_of, lambda: client.query("The cat", " sat"))
        assert wait_until(lambda: server._batcher.depth == 2)  # both behind the held batch
        gate.set()
        outcomes = held.result(), bad.result(30), good.result(30)
    assert outcomes[1:] == (grpc.StatusCode.INTERNAL, grpc.StatusCode.OK)
    assert 2 in opener.engines[0].batches  # they were answered together first


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_batch_is_not_answered_again_query_by_query_for_nothing() -> None:
    """After a failed batch each query was answered again alone: also when the failure was the
    service's (Milvus down: N+1 calls, each as slow), and for queries no client waited for."""
    from indexer.errors import UnavailableError
    from server.dispatch import _answer

    class Failing:
        version = "v1"

        def __init__(self, error: Exception) -> None:
            self.error, self.calls = error, 0

        def prepared(self, query: TokenizedQuery) -> TokenizedQuery:
            return query

        def answer(self, queries, **_options) -> None:
            self.calls += 1
            raise self.error

    query = TokenizedQuery(Query("a", " b"), [1, 2], 1, "v1")
    down = Failing(UnavailableError("Milvus at uri: down"))
    assert all(isinstance(o, UnavailableError) for o in _answer(down, [QueryWork(query)] * 3, 0))
    assert down.calls == 1
    bug = Failing(RuntimeError("one query breaks the engine"))
    expired = QueryWork(query, deadline=time.monotonic() - 1)
    _answer(bug, [QueryWork(query), expired, QueryWork(query)], 0)
    assert bug.calls == 1 + 2  # the batch, then the two live queries alone


def test_a_batch_larger_than_the_queue_is_refused_at_start() -> None:
    """Such a QueryBatch got RESOURCE_EXHAUSTED, which its client retries, forever."""
    with pytest.raises(InvalidInputError, match="could never be queued"):
        ServerConfig(index_root=Path("/srv"), **_limits(max_queue=8))


def _limits(**batching: int) -> dict:
    from server.batching import BatcherConfig

    return {"batching": BatcherConfig(**batching)}


def test_stop_asks_the_reloader_to_stop_before_the_drain(root: Path) -> None:
    """A version published while in-flight queries drained was loaded (model, warm-up) beside
    them, then closed unused."""
    gate = threading.Event()
    opener = FakeOpener(gate=gate)
    with running_server(root, opener) as (server, client), ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.query, "a", " b")
        assert wait_until(opener.engines[0].busy.is_set)
        stopping = threading.Thread(target=server.stop, kwargs={"grace_s": 5})
        stopping.start()
        publish(root, "v2")
        time.sleep(0.5)  # many reload polls (0.05 s)
        gate.set()
        stopping.join()
        assert in_flight.result(30).influences
    assert [e.version for e in opener.engines] == ["v1"]


def test_concurrent_queries_share_forward_backward_passes(root: Path) -> None:
    opener = FakeOpener(delay_s=0.02)
    with running_server(root, opener, max_wait_ms=20) as (_, client), ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: client.query(f"q{i}", " a", top_k=2), range(32)))
    assert all(r.influences for r in responses)
    batches = opener.engines[0].batches
    assert sum(batches) == 32 and max(batches) > 1


def test_full_queue_is_resource_exhausted(root: Path) -> None:
    opener = FakeOpener(delay_s=0.3)
    limits = {"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 2, "max_queries_per_batch": 2}
    with running_server(root, opener, **limits) as (_, client), ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: _code_of(lambda: client.query(f"q{i}", " a")), range(8)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes
    assert grpc.StatusCode.OK in outcomes
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_deadline_passed_while_queued_is_not_computed(root: Path) -> None:
    opener = FakeOpener(delay_s=0.4)
    with running_server(root, opener, max_batch_size=1, max_wait_ms=0) as (_, client):
        engine = opener.engines[0]
        slow = threading.Thread(target=lambda: client.query("first", " a"))
        slow.start()
        assert engine.busy.wait(5)
        error = rpc_error(lambda: client.query("second", " b", timeout_s=0.1))
        slow.join()
        time.sleep(0.1)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert engine.batches == [1]


def test_query_stream_sends_the_sketch_answer_first_then_the_exact_one(root: Path) -> None:
    opener = FakeOpener(delay_s=0.3)
    with running_server(root, opener) as (_, client):
        started = time.monotonic()
        arrivals = []
        for response in client.query_stream("The cat", " sat", top_k=3, rerank_depth=20):
            arrivals.append((time.monotonic() - started, response))
        plain = list(client.query_stream("The cat", " sat", top_k=3, rerank_depth=0))
    (first_s, first), (last_s, last) = arrivals
    assert not first.final and not any(i.exact for i in first.influences)
    assert last.final and all(i.exact for i in last.influences) and last.candidates_reranked == 20
    assert first_s < 0.3 <= last_s  # the first did not wait for the exact stage
    assert [i.example_id for i in first.influences] == [i.example_id for i in last.influences]
    assert len(plain) == 1 and plain[0].final


def test_the_rpc_deadline_bounds_the_exact_stage_with_room_to_answer(root: Path) -> None:
    opener = FakeOpener()
    with running_server(root, opener) as (_, client):
        sent = time.monotonic()
        client.query("The cat", " sat", rerank_depth=20, timeout_s=5)
    (deadline,) = opener.engines[-1].deadlines
    assert sent + 4 < deadline < sent + 5


def test_no_index_is_unavailable_until_one_is_published(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeOpener()) as (server, client):
        wait_for(lambda: client.info().last_reload_error != "")
        assert client.health() == "NOT_SERVING"
        error = rpc_error(lambda: client.query("The cat", " sat"))
        info = client.info()
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert not info.serving and "CURRENT" in info.last_reload_error
        publish(tmp_path, "v1")
        server.reload()
        assert server.wait_until_serving(5)
        assert client.health() == "SERVING"
        assert client.health("influence.v1.InfluenceService") == "SERVING"
        info = client.info()
    assert info.serving and info.version == "v1" and info.last_reload_error == ""
    assert info.max_length == MAX_LENGTH and list(info.tracked_modules)


def test_hot_reload_under_load_switches_version_without_failures(root: Path) -> None:
    opener = FakeOpener(delay_s=0.005)
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(8)]
    failures: list[BaseException] = []

    def hammer(client: InfluenceClient, log: list[str]) -> None:
        while not stop.is_set():
            try:
                log.append(client.query("The cat", " sat", top_k=3).index_version)
            except grpc.RpcError as exc:
                failures.append(exc)

    with running_server(root, opener) as (_, client):
        threads = [threading.Thread(target=hammer, args=(client, log)) for log in seen]
        for thread in threads:
            thread.start()
        wait_for(lambda: all(len(log) >= 3 for log in seen))
        publish(root, "v2")
        wait_for(lambda: all(log and log[-1] == "v2" for log in seen))
        stop.set()
        for thread in threads:
            thread.join()
        wait_for(lambda: opener.engines[0].closed)
    assert failures == []
    for log in seen:
        switch = log.index("v2")
        assert set(log[:switch]) == {"v1"} and set(log[switch:]) == {"v2"}


def test_corrupt_version_is_refused_and_the_old_keeps_serving(root: Path) -> None:
    with running_server(root, FakeOpener()) as (_, client):
        publish(root, "v2", corrupt=True)
        wait_for(lambda: client.info().last_reload_error != "")
        info = client.info()
        assert info.version == "v1" and "v2" in info.last_reload_error
        assert "sha256" in info.last_reload_error
        assert client.query("The cat", " sat").index_version == "v1"
        publish(root, "v3")
        wait_for(lambda: client.info().version == "v3")
        assert client.info().last_reload_error == ""


def test_stop_drains_in_flight_requests_and_reports_not_serving(root: Path) -> None:
    opener = FakeOpener(delay_s=0.3)
    with (
        running_server(root, opener, max_wait_ms=0) as (server, client),
        ThreadPoolExecutor(5) as pool,
    ):
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = [pool.submit(client.query, f"q{i}", " a") for i in range(4)]
        assert opener.engines[0].busy.wait(5)
        time.sleep(0.05)
        stopping = pool.submit(server.stop, grace_s=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # An open Watch stream is in flight too: end it so that stop() need not wait it out.
        watch.cancel()
        stopping.result(5)
        assert all(f.result(5).index_version == "v1" for f in in_flight)
        assert _code_of(lambda: client.query("late", " a")) == grpc.StatusCode.UNAVAILABLE
        channel.close()
    assert opener.engines[0].closed


def test_metrics_endpoint(root: Path) -> None:
    with running_server(root, FakeOpener(), metrics_port=0) as (server, client):
        client.query("The cat", " sat")
        rpc_error(lambda: client.query("The cat", ""))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    assert 'influence_requests_total{code="OK",method="Query"} 1.0' in text
    assert 'influence_requests_total{code="INVALID_ARGUMENT",method="Query"} 1.0' in text
    assert 'influence_stage_seconds_count{stage="gradient"} 1.0' in text
    assert 'influence_index_info{version="v1"} 1.0' in text
    assert "influence_queue_depth 0.0" in text
    assert "influence_batch_size_count" in text


def _code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_query_the_new_version_refuses_fails_alone() -> None:
    """A batch's queries prepared by a version replaced since are prepared again by the new
    one; the one it refuses fails alone, the others are answered."""
    holder = EngineHolder()
    holder.swap(FakeEngine("v2"))
    good = QueryWork(FakeEngine("v1").prepare(Query("The", " cat")))
    refused = QueryWork(TokenizedQuery(Query("The", " cat", score_kind=ScoreKind.COSINE), [1], 1))
    answered, failed = Dispatcher(holder, ServerMetrics())([good, refused])
    assert isinstance(answered, ServedQuery) and answered.version == "v2"
    assert isinstance(failed, InvalidInputError)


@pytest.mark.parametrize(
    ("port_field", "message"),
    [("metrics_port", "cannot serve metrics on"), ("health_port", "cannot listen on")],
)
def test_a_busy_port_is_one_clear_error_and_leaves_no_port_listening(
    root: Path, port_field: str, message: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = configure(ServerConfig(index_root=root, port=0), **{port_field: port})
        server = InfluenceServer(config, opener=FakeOpener())
        with pytest.raises(InvalidInputError, match=f"{message} .*:{port}"):
            server.start()
    assert not _grpc_port_open(server)
    assert not server.wait_until_serving(0.5)  # and no version was loaded


def _grpc_port_open(server: InfluenceServer) -> bool:
    try:
        port = server.port
    except RuntimeError:
        return False  # never bound
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_version_loading_when_the_server_stops_is_closed_not_served(root: Path) -> None:
    entered, release = threading.Event(), threading.Event()
    opener = FakeOpener()

    def slow_opener(root: Path, version: str, current: FakeEngine | None) -> FakeEngine:
        entered.set()
        release.wait(30)
        return opener(root, version, current)

    server = InfluenceServer(ServerConfig(index_root=root, port=0), opener=slow_opener)
    server.start()
    assert entered.wait(30)
    server.stop(grace_s=0.1)
    release.set()
    wait_for(lambda: bool(opener.engines) and opener.engines[0].closed)
    assert not server.wait_until_serving(0.2)


def test_a_load_that_ends_as_the_server_stops_is_never_served_after(root: Path) -> None:
    """The reloader checked that the server was not stopping, then swapped the version in: a
    stop between the two left it served after stop() returned, and never closed."""
    opener = FakeOpener()
    server = InfluenceServer(ServerConfig(index_root=root, port=0), opener=opener)
    swapping, stopped = threading.Event(), threading.Event()
    swap = server._holder.swap

    def slow_swap(engine: FakeEngine | None) -> None:
        if engine is not None and threading.current_thread().name == "index-reloader":
            swapping.set()
            stopped.wait(1)  # the reloader is descheduled between its check and its swap
        swap(engine)

    server._holder.swap = slow_swap
    server.start()
    assert swapping.wait(30)
    server.stop(grace_s=0)
    stopped.set()
    wait_for(lambda: opener.engines[0].closed)
    assert server._holder.current is None and not server.wait_until_serving(0.2)


def test_a_stream_the_client_cancels_is_counted(root: Path) -> None:
    with running_server(root, FakeOpener(delay_s=0.5), metrics_port=0) as (server, client):
        stream = client.query_stream("The cat", " sat", rerank_depth=20)
        first = next(iter(stream))
        assert not first.final
        stream.cancel()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"

        def counted() -> bool:
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
            return 'influence_requests_total{code="CANCELLED",method="QueryStream"} 1.0' in text

        wait_for(counted)


def test_the_exact_stage_learns_when_its_rpc_has_ended(root: Path) -> None:
    opener = FakeOpener(delay_s=0.5)
    with running_server(root, opener) as (_, client):
        stream = client.query_stream("The cat", " sat", rerank_depth=20)
        next(iter(stream))
        (abandoned,) = opener.engines[-1].abandoned
        assert not abandoned()  # the client still waits
        stream.cancel()
        wait_for(abandoned)


def test_a_stop_takes_one_grace_in_all(root: Path) -> None:
    """A batch still running and a load still in progress when the grace is spent do not
    each get a grace of their own."""
    gate, loading = threading.Event(), threading.Event()
    opener = FakeOpener(gate=gate)

    def opener_that_hangs_on_v2(root: Path, version: str, current: FakeEngine | None):
        if version == "v2":
            loading.set()
            gate.wait(30)
        return opener(root, version, current)

    server = InfluenceServer(
        configure(ServerConfig(index_root=root, port=0), poll_seconds=0.05, max_wait_ms=0),
        opener=opener_that_hangs_on_v2,
    )
    server.start()
    try:
        assert server.wait_until_serving(30)
        with (
            InfluenceClient(f"127.0.0.1:{server.port}", timeout_s=30) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            pool.submit(_code_of, lambda: client.query("held", " a"))
            assert opener.engines[0].busy.wait(30)
            publish(root, "v2")
            assert loading.wait(30)
            started = time.monotonic()
            server.stop(grace_s=1.0)
            took = time.monotonic() - started
    finally:
        gate.set()
    assert 1.0 <= took < 2.5  # it took 3 graces: the RPC's, then the load's and the batch's
