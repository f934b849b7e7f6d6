"""`query` command output and exit codes; signals of a served process (fake engine)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from server.app import InfluenceServer, ServerConfig
from server.batching import BatcherConfig
from server.cli import main
from server.cli.serving import add_serve_arguments
from server.client import InfluenceClient
from server.reload import ReloadPolicy
from tests.server_fakes import LOAD_TIMEOUT_S, FakeOpener, publish, running_server

REPO = Path(__file__).resolve().parents[1]

# The child serves a fake engine whose passes take 1 s, polling CURRENT only every minute
# so that a version switch can only come from SIGHUP.
CHILD = """
import logging
import sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from server.app import InfluenceServer, ServerConfig
from server.batching import BatcherConfig
from server.reload import ReloadPolicy
from tests.server_fakes import FakeOpener
config = ServerConfig(
    Path(sys.argv[1]),
    port=int(sys.argv[2]),
    reload=ReloadPolicy(poll_seconds=60),
    batching=BatcherConfig(max_wait_ms=0),
)
InfluenceServer(config, opener=FakeOpener(delay_s=1.0)).serve_forever()
"""


def query(*argv: str) -> int:
    return main(["query", *argv])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    publish(tmp_path, "v1")
    return tmp_path


def test_query_command_prints_a_table_or_json(root: Path, capsys: pytest.CaptureFixture) -> None:
    with running_server(root, FakeOpener()) as (server, _):
        target = f"127.0.0.1:{server.port}"
        assert query("--target", target, "--completion", " sat", "-k", "3") == 0
        table = capsys.readouterr().out
        assert query("--target", target, "--completion", " sat", "--json") == 0
        payload = json.loads(capsys.readouterr().out)
        assert query("--target", target, "--completion", "", "-k", "3") == 2
        captured = capsys.readouterr()
    # Header, column names, 3 hits; a blank line, the top hit's token attribution (2 lines).
    assert "index v1" in table and len(table.splitlines()) == 2 + 3 + 3
    assert payload["index_version"] == "v1" and len(payload["influences"]) == 10
    assert isinstance(payload["influences"][0]["example_id"], int)
    assert captured.out == ""
    assert captured.err.startswith("error: INVALID_ARGUMENT: ") and captured.err.count("\n") == 1


def test_query_command_without_a_server_fails_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert (
        query("--target", f"127.0.0.1:{free_port()}", "--completion", " a", "--timeout", "2") == 1
    )
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-k", "-1"], "argument -k/--top-k: must be at least 1 and at most 4294967295, got -1"),
        (["--rerank-depth", "-1"], "argument --rerank-depth: must be at least 0"),
        (["--lexical-candidates", "4294967296"], "must be at least 0 and at most 4294967295"),
        (["--completion", "caf\udcff"], "argument --completion: not valid UTF-8 text"),
    ],
)
def test_a_bad_count_or_text_is_a_usage_error_not_a_traceback(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    """They reached the request's uint32 fields (ValueError) or its UTF-8 encoding."""
    with pytest.raises(SystemExit) as exit_info:
        query("--target", "127.0.0.1:1", "--completion", " a", *argv)
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1"])
@pytest.mark.parametrize("command", [["serve", "--index", "/srv/index"], ["ui"]])
def test_a_port_out_of_range_is_a_usage_error(
    command: list[str], port: str, capsys: pytest.CaptureFixture
) -> None:
    """gRPC took 70000 as 4464 and -1 as 65535, and said it listened there; the page's socket
    raised OverflowError."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--port", port])
    assert exit_info.value.code == 2
    assert f"--port: must be at least 0 and at most 65535, got {port}" in capsys.readouterr().err


def test_a_client_certificate_turns_tls_on(root: Path, tmp_path: Path, capsys) -> None:
    """Without --tls-ca, --tls-cert and --tls-key were ignored: the query went in plaintext."""
    pem = tmp_path / "client.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with running_server(root, FakeOpener()) as (server, _):
        target = ["--target", f"127.0.0.1:{server.port}", "--completion", " sat", "--timeout", "5"]
        assert query(*target, "--tls-cert", str(pem), "--tls-key", str(pem)) == 1
        err = capsys.readouterr().err
        assert query(*target, "--tls-cert", str(pem)) == 2
        alone = capsys.readouterr().err
        assert query(*target, "--tls-ca", str(REPO / "README.md")) == 2
        not_pem = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ")  # a TLS handshake with a plaintext server
    assert alone == "error: mutual TLS needs both a client certificate and its key\n"
    assert not_pem.endswith("README.md is not PEM (no -----BEGIN line)\n")


def test_what_the_user_can_fix_exits_2_what_may_pass_exits_1(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-at-least-sixteen\n")
    with running_server(root, FakeOpener(), auth_token_file=token) as (server, _):
        argv = ["--target", f"127.0.0.1:{server.port}", "--completion", " sat"]
        assert query(*argv) == 2
        unauthenticated = capsys.readouterr().err
    assert unauthenticated.startswith("error: UNAUTHENTICATED: ")


def test_a_file_where_the_index_root_should_be_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """NotADirectoryError and IsADirectoryError were tracebacks with exit 1."""
    afile = tmp_path / "corpus.jsonl"
    afile.write_text("{}\n")
    (tmp_path / "root" / "CURRENT").mkdir(parents=True)
    for index in (afile, tmp_path / "root"):
        assert main(["info", "--index", str(index)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(index) in err


def test_an_excerpt_shows_line_breaks_and_odd_spaces_as_spaces() -> None:
    from server.client import _excerpt

    assert _excerpt("line one\r\nline\xa0two\u2028three", 72) == "line one line two three"


def test_text_from_the_index_cannot_drive_the_terminal() -> None:
    from influence.v1 import influence_pb2 as pb
    from server.client import format_query_table

    hit = pb.Influence(example_id=1, doc_id="d\x1b[2J", text="hello \x1b[31mFAKE\x07", score=1.0)
    table = format_query_table(pb.QueryResponse(index_version="v", influences=[hit]))
    assert "\x1b" not in table and "\x07" not in table
    assert "d\\x1b[2J#0" in table and "hello \\x1b[31mFAKE\\x07" in table


def test_serve_arguments_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--index", "/srv/index"])
    assert (args.host, args.port, args.metrics_port, args.auth_token_file) == (
        "127.0.0.1",
        50051,
        None,
        None,
    )


def test_sighup_reloads_and_sigterm_drains_then_exits_zero(root: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(port)], cwd=REPO, env=env)
    try:
        with InfluenceClient(f"127.0.0.1:{port}", timeout_s=10) as client:
            _wait_serving(client, child)
            publish(root, "v2")
            child.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while client.info().version != "v2":
                assert time.monotonic() < deadline, "SIGHUP did not load v2"
                time.sleep(0.05)
            with ThreadPoolExecutor(4) as pool:
                in_flight = [pool.submit(client.query, f"q{i}", " a") for i in range(4)]
                # Long enough for the RPCs to reach a loaded server, well inside the first pass.
                time.sleep(0.5)
                child.send_signal(signal.SIGTERM)
                assert [f.result().index_version for f in in_flight] == ["v2"] * 4
        assert child.wait(timeout=LOAD_TIMEOUT_S) == 0
    finally:
        if child.poll() is None:
            child.kill()


def _wait_serving(client: InfluenceClient, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        assert child.poll() is None, "server process exited"
        with contextlib.suppress(grpc.RpcError):
            if client.health(timeout_s=1) == "SERVING":
                return
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)


def test_signals_delivered_to_another_thread_still_reload_and_stop(root: Path) -> None:
    """The kernel may hand SIGHUP or SIGTERM to any of the server's threads (CI saw a SIGHUP
    never acted on); serve_forever, blocked in the main thread, must still act on both."""
    config = ServerConfig(
        root,
        port=free_port(),
        reload=ReloadPolicy(poll_seconds=60),
        batching=BatcherConfig(max_wait_ms=0),
    )
    server = InfluenceServer(config, opener=FakeOpener())
    seen: list[str] = []
    stopped = threading.Event()

    def signal_this_thread() -> None:
        me = threading.get_ident()
        try:
            server.wait_until_serving(20)
            publish(root, "v2")
            signal.pthread_kill(me, signal.SIGHUP)
            with InfluenceClient(f"127.0.0.1:{config.port}", timeout_s=10) as client:
                deadline = time.monotonic() + 10
                while client.info().version != "v2" and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen.append(client.info().version)
            signal.pthread_kill(me, signal.SIGTERM)
            if not stopped.wait(5):
                seen.append("SIGTERM ignored")
        finally:
            if not stopped.is_set():  # stop serve_forever: the test fails instead of hanging
                server.request_stop()

    worker = threading.Thread(target=signal_this_thread)
    worker.start()
    server.serve_forever()
    stopped.set()
    worker.join()
    assert seen == ["v2"]
