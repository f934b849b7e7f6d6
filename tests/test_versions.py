"""Which version is served: prune by creation time, rollback and pins (library and CLI), a
real server reloading real versions (a copy under another id, fallback to the newest valid
version), and the build's exported metrics."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

import indexer.publish
from indexer.build import build_index
from indexer.engine import QueryEngine
from indexer.errors import IndexVerificationError
from indexer.manifest import INDEX_FILE, MANIFEST_FILE
from indexer.publish import (
    CURRENT,
    PINNED,
    VERSIONS,
    FilePointers,
    last_good,
    pin,
    prune,
    publish,
    read_current,
    read_pinned,
    rollback,
    version_dir,
)
from server.app import InfluenceServer, ServerConfig, open_engine
from server.cli import main
from server.client import InfluenceClient
from server.reload import EngineHolder, Reloader, ReloadPolicy
from tests.server_fakes import after_checks, configure, counted_checks
from tests.test_build import tiny_config


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, small_corpus_path) -> Path:
    """The directory of a real (tiny) published version, copied by the tests."""
    root = tmp_path_factory.mktemp("built")
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root))
    return version_dir(root)


def add_version(root: Path, source: Path, name: str, day: int, *, corrupt: bool = False) -> str:
    """Copy `source` as version `name`, created on 2026-01-`day`; `corrupt` flips a byte of
    its index (the manifest is not among the checksummed files, so editing it keeps a copy
    valid)."""
    target = root / VERSIONS / name
    shutil.copytree(source, target)
    data = json.loads((target / MANIFEST_FILE).read_text())
    data["created"] = f"2026-01-{day:02d}T00:00:00+00:00"
    (target / MANIFEST_FILE).write_text(json.dumps(data))
    if corrupt:
        with (target / INDEX_FILE).open("r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
    return name


def set_current(root: Path, version: str) -> None:
    (root / CURRENT).write_text(version + "\n")


def remaining(root: Path) -> set[str]:
    return {p.name for p in (root / VERSIONS).iterdir()}


def wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_prune_goes_by_creation_time_and_spares_current_pinned_and_last_good(
    tmp_path: Path, built: Path
) -> None:
    days = {"v-z": 1, "v-c": 2, "v-b": 3, "v-a": 4, "v-e": 5}
    for name, day in days.items():
        add_version(tmp_path, built, name, day)
    add_version(tmp_path, built, "v-y", 6, corrupt=True)
    set_current(tmp_path, "v-e")
    (tmp_path / PINNED).write_text("v-b\n")
    assert last_good(tmp_path) == "v-a"
    assert prune(tmp_path, 5) == ["v-y"]  # the invalid copy goes first, although the newest
    assert prune(tmp_path, 3) == ["v-z", "v-c"]  # then the oldest by creation, not by name
    assert remaining(tmp_path) == {"v-e", "v-b", "v-a"}
    assert prune(tmp_path, 1) == ["v-a"]  # CURRENT and PINNED stay whatever the count
    assert remaining(tmp_path) == {"v-e", "v-b"}


def test_rollback_goes_to_the_newest_valid_older_version(
    tmp_path: Path, built: Path, capsys: pytest.CaptureFixture
) -> None:
    add_version(tmp_path, built, "old", 1)
    add_version(tmp_path, built, "broken", 2, corrupt=True)
    add_version(tmp_path, built, "served", 3)
    add_version(tmp_path, built, "newer", 4)
    set_current(tmp_path, "served")
    root = str(tmp_path)
    assert main(["rollback", "--index", root]) == 0
    assert capsys.readouterr().out == f"CURRENT of {root}: served -> old\n"
    assert main(["rollback", "--index", root, "--to", "broken"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: broken: ") and "sha256" in err and err.count("\n") == 1
    assert read_current(tmp_path) == "old"
    assert main(["rollback", "--index", root, "--to", "newer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "previous": "old",
        "current": "newer",
        "pinned": None,
    }
    with pytest.raises(IndexVerificationError):
        rollback(tmp_path, "broken")


def test_a_rollback_and_a_publish_at_once_never_leave_current_on_a_deleted_version(
    tmp_path: Path, built: Path, monkeypatch
) -> None:
    """`rollback --to old` verifies `old`; a build then publishes and prunes to one version.
    Without a lock between them, the prune deleted `old` and the rollback pointed CURRENT at it."""
    add_version(tmp_path, built, "old", 1)
    add_version(tmp_path, built, "served", 2)
    set_current(tmp_path, "served")
    staged = tmp_path / VERSIONS / ".staging-new"
    shutil.copytree(built, staged)
    build = threading.Thread(target=publish, args=(tmp_path, staged, "new", 1))
    verify = indexer.publish.verify_version

    def verify_then_publish(path: Path, skip=()):
        manifest = verify(path, skip)
        if path.name == "old" and threading.current_thread() is threading.main_thread():
            build.start()
            build.join(timeout=2)  # done by now unless it waits for the rollback
        return manifest

    monkeypatch.setattr(indexer.publish, "verify_version", verify_then_publish)
    rollback(tmp_path, "old")
    build.join()
    assert (tmp_path / VERSIONS / read_current(tmp_path)).is_dir()


def test_pin_verifies_and_clear_removes(
    tmp_path: Path, built: Path, capsys: pytest.CaptureFixture
) -> None:
    add_version(tmp_path, built, "good", 1)
    add_version(tmp_path, built, "broken", 2, corrupt=True)
    root = str(tmp_path)
    assert main(["pin", "--index", root, "good"]) == 0
    assert "pinned" in capsys.readouterr().out and read_pinned(tmp_path) == "good"
    assert main(["pin", "--index", root, "broken"]) == 2
    assert "sha256" in capsys.readouterr().err and read_pinned(tmp_path) == "good"
    assert main(["pin", "--index", root, "--clear", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pinned": None, "previous_pin": "good"}
    assert read_pinned(tmp_path) is None
    with pytest.raises(IndexVerificationError):
        pin(tmp_path, "broken")


class CountingOpener:
    """The server's real opener, counting the versions it is asked to open."""

    def __init__(self) -> None:
        config = ServerConfig(index_root=Path())
        self._open = partial(
            open_engine, device=config.device, model_dir=config.model_dir, options=config.engine
        )
        self.opened: list[str] = []

    def __call__(self, root: Path, version: str, current: QueryEngine | None) -> QueryEngine:
        self.opened.append(version)
        return self._open(root, version, current)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[InfluenceClient, CountingOpener]]]:
    stack: list[tuple[InfluenceServer, InfluenceClient]] = []

    def start(**overrides: object) -> tuple[InfluenceClient, CountingOpener]:
        opener = CountingOpener()
        config = ServerConfig(index_root=tmp_path, port=0, reload=ReloadPolicy(poll_seconds=0.05))
        server = InfluenceServer(configure(config, **overrides), opener=opener)
        server.start()
        client = InfluenceClient(f"127.0.0.1:{server.port}", timeout_s=30)
        stack.append((server, client))
        return client, opener

    yield start
    for server, client in stack:
        client.close()
        server.stop(grace_s=1)


def test_a_copy_under_another_id_is_served_under_its_own_and_loaded_once(
    tmp_path: Path, built: Path, serve, monkeypatch
) -> None:
    checks = counted_checks(monkeypatch)
    set_current(tmp_path, add_version(tmp_path, built, "copied", 1))
    client, opener = serve()
    wait_for(lambda: client.info().serving)
    after_checks(checks, 10)
    assert client.info().version == "copied" and opener.opened == ["copied"]
    assert client.query("The market", " was busy", top_k=2).index_version == "copied"


def test_start_falls_back_to_the_newest_valid_version_and_recovers(
    tmp_path: Path, built: Path, serve
) -> None:
    add_version(tmp_path, built, "oldest", 1)
    add_version(tmp_path, built, "older", 2)
    add_version(tmp_path, built, "broken", 3, corrupt=True)
    set_current(tmp_path, "missing")
    client, _ = serve()
    wait_for(lambda: client.info().serving)
    info = client.info()
    assert info.version == "older"
    assert info.last_reload_error.startswith("version missing (CURRENT) refused: ")
    assert "not found" in info.last_reload_error and info.last_reload_error.endswith("older")
    add_version(tmp_path, built, "missing", 4)  # restored: served at its next poll
    wait_for(lambda: client.info().version == "missing", timeout_s=60)
    wait_for(lambda: client.info().last_reload_error == "", timeout_s=10)


def test_a_deleted_served_version_falls_back_to_the_newest_valid_one(
    tmp_path: Path, built: Path, serve
) -> None:
    add_version(tmp_path, built, "older", 1)
    set_current(tmp_path, add_version(tmp_path, built, "served", 2))
    client, _ = serve()
    wait_for(lambda: client.info().version == "served")
    shutil.rmtree(tmp_path / VERSIONS / "served")
    wait_for(lambda: client.info().version == "older", timeout_s=60)
    assert "served" in client.info().last_reload_error


def test_a_fallback_is_served_together_with_the_status_saying_why(
    tmp_path: Path, built: Path
) -> None:
    """Whoever sees the fallback version served (here: the swap callback, which runs right
    after the swap) also sees why; the status used to follow the swap a moment later."""
    add_version(tmp_path, built, "older", 1)
    set_current(tmp_path, add_version(tmp_path, built, "served", 2))
    holder = EngineHolder()
    seen: list[tuple[str, str]] = []

    def opener(root: Path, version: str, current: QueryEngine | None) -> QueryEngine:
        return QueryEngine.open(root, version=version, reuse_model_from=current)

    def on_swap(version: str, _seconds: float) -> None:
        seen.append((holder.current.version, reloader.status().last_error))

    reloader = Reloader(tmp_path, holder, opener, ReloadPolicy(poll_seconds=60), on_swap=on_swap)
    reloader.check_once()
    shutil.rmtree(tmp_path / VERSIONS / "served")
    reloader.check_once()
    holder.swap(None)
    assert seen[0] == ("served", "")
    assert seen[1][0] == "older"
    assert "version served (CURRENT) was deleted from disk" in seen[1][1]
    assert seen[1][1].endswith("serving older")


class _Pushgateway(BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[str, str]]] = []

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append((self.path, self.rfile.read(length).decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def test_build_exports_its_last_success(
    tmp_path: Path, tiny_model_dir: Path, small_corpus_path: Path
) -> None:
    gateway = HTTPServer(("127.0.0.1", 0), _Pushgateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    textfile = tmp_path / "influence_index.prom"
    argv = ["build", "-q", "--model", str(tiny_model_dir), "--data", str(small_corpus_path)]
    argv += ["--out", str(tmp_path / "root"), "--max-length", "64"]
    argv += ["--rank-in", "8", "--rank-out", "8", "--metrics-textfile", str(textfile)]
    try:
        started = time.time()
        assert main([*argv, "--pushgateway", f"http://127.0.0.1:{gateway.server_port}"]) == 0
    finally:
        gateway.shutdown()
        gateway.server_close()
    (path, pushed) = _Pushgateway.bodies[-1]
    assert path == "/metrics/job/influence_index_build"
    written = textfile.read_text()
    samples = dict(line.rsplit(" ", 1) for line in written.splitlines() if line and line[0] != "#")
    stamp = float(samples["influence_index_build_last_success_timestamp_seconds"])
    assert started <= stamp <= time.time()
    assert float(samples["influence_index_build_duration_seconds"]) > 0
    assert float(samples["influence_index_build_examples"]) > 100
    assert "influence_index_build_examples" in pushed
    assert not list(tmp_path.glob("influence_index.prom.*"))  # written by rename, no leftovers


def test_two_writers_with_the_same_pid_do_not_share_a_pointer_file(tmp_path, monkeypatch):
    """Containers sharing ROOT may each run their writer as pid 1."""
    monkeypatch.setattr("os.getpid", lambda: 1)
    staged = []
    real_replace = os.replace

    def replace(source, target):
        staged.append(Path(source).name)
        real_replace(source, target)

    monkeypatch.setattr("os.replace", replace)
    FilePointers(tmp_path).write("CURRENT", "a")
    FilePointers(tmp_path).write("CURRENT", "b")
    assert len(set(staged)) == 2 and read_current(tmp_path) == "b"
