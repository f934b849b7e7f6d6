"""Chaos benchmark on the Milvus backend: CURRENT's alias switched under load, against Milvus
Lite.

    python -m benchmarks.milvus_chaos [--switches 6] [--out benchmarks/results/milvus_chaos.json]

Runs `milvus-lite server` (a private data directory, over http, as a cluster would be reached)
and `influence-index serve --backend milvus` in subprocesses; makes versions of the demo index
(hard links of its files), each with its own collection written from them, as a build writes
it; and, under 8 real gRPC clients (`benchmarks.chaos.Load`):

- switches: moves the CURRENT alias between two versions `--switches` times, then rolls back,
  pins a version and clears the pin (the library calls `influence-index rollback` / `pin`
  make), each time until the server answers from the version the alias names;
- a bad collection: the alias moved (by the Milvus client itself: `publish`, `pin` and
  `rollback` refuse such a target) to a version whose collection lost a row: the server must
  refuse it (row count), say so in GetIndexInfo and keep serving;
- kill -9 of the influence server and a restart: seconds until it serves again.

Failed queries are counted per phase: the switches must lose none. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.chaos import WAIT_S, Load, Server, edit_manifest, info, served, wait_for
from benchmarks.common import CACHE, REPO, demo_artifacts, emit
from benchmarks.server_latency import free_port
from indexer.config import Backend, BackendConfig, ScoreKind
from indexer.demo.index import ensure_demo_index
from indexer.errors import InvalidInputError
from indexer.milvus import MilvusBackend
from indexer.publish import CURRENT, VERSIONS, clear_pin, pin, read_manifest, rollback
from indexer.query import LabeledQuery, read_queries

PREFIX = "chaos"


class MilvusLite:
    """`milvus-lite server` in a subprocess, on a free port."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.uri = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir)]
        argv += ["--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1]]
        with log.open("a") as out:
            self._process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=out)

    def connect(self, root: Path) -> MilvusBackend:
        """The backend of `root` in this Milvus, once it listens."""
        config = BackendConfig(Backend.MILVUS, self.uri, PREFIX)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                return MilvusBackend.connect(config, root)
            except InvalidInputError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


@dataclass
class Versions:
    """Versions of a private ROOT, made from the demo version by hard links, each with its
    collection."""

    root: Path
    source: Path
    milvus: MilvusBackend
    made: list[str] = field(default_factory=list)

    def add(self, label: str) -> str:
        name = f"v{len(self.made):02d}-{label}"
        target = self.root / VERSIONS / name
        shutil.copytree(self.source, target, copy_function=os.link)
        manifest = read_manifest(target)
        unit = manifest.score == ScoreKind.COSINE
        record = self.milvus.write_collection(name, target, manifest.max_length, unit=unit)
        now = datetime.now(timezone.utc).isoformat()
        edit_manifest(target, lambda m: m.update(created=now, collection=asdict(record)))
        self.made.append(name)
        return name


def switches(server: Server, versions: Versions, queries: list[LabeledQuery], times: int) -> dict:
    """The alias moved between two versions `times` times, then a rollback, a pin and its
    clear, under 8 clients; seconds until each was served, and the queries that failed."""
    root, milvus = versions.root, versions.milvus
    first, second = versions.made[:2]
    seconds: dict[str, list[float]] = {"switch": [], "rollback": [], "pin": [], "clear_pin": []}
    with Load(server.target, queries, 8) as load:
        wait_for(load.running)
        for k in range(times):
            target = second if k % 2 == 0 else first
            milvus.write(CURRENT, target)
            seconds["switch"].append(wait_for(lambda t=target: served(server.target, t)))
        done = rollback(root, first if target == second else second, milvus)
        seconds["rollback"].append(wait_for(lambda: served(server.target, done.current)))
        pin(root, done.previous, milvus)
        seconds["pin"].append(wait_for(lambda: served(server.target, done.previous)))
        clear_pin(root, milvus)
        seconds["clear_pin"].append(wait_for(lambda: served(server.target, done.current)))
        time.sleep(1.0)  # more queries on the last version
    outcomes = load.all()
    return {
        "clients": 8,
        "alias_moves": times + 3,
        "queries": len(outcomes),
        "failed_queries": sum(o.code != "OK" for o in outcomes),
        "versions_answering": sorted({o.version for o in outcomes if o.code == "OK"}),
        "served_after_s": {kind: [round(s, 3) for s in v] for kind, v in seconds.items()},
    }


def bad_collection(server: Server, versions: Versions, queries: list[LabeledQuery]) -> dict:
    """The alias moved to a version whose collection lost a row: refused, named in
    GetIndexInfo, never served, no query failed."""
    milvus = versions.milvus
    good = info(server.target).version
    bad = versions.add("missing-row")
    collection = milvus.collection(bad)
    one = milvus.client.query(collection, filter="", output_fields=["id"], limit=1)[0]["id"]
    milvus.client.delete(collection, ids=[one])
    milvus.client.flush(collection)
    seen = set()
    with Load(server.target, queries, 8) as load:
        wait_for(load.running)
        milvus.client.alter_alias(collection, f"{PREFIX}_{CURRENT.lower()}")
        reported_s = wait_for(lambda: bad in info(server.target).last_reload_error)
        error = info(server.target).last_reload_error
        time.sleep(1.0)  # a few more polls: is the bad version swapped in late?
        seen.add(info(server.target).version)
        milvus.write(CURRENT, good)
    outcomes = load.all()
    seen |= {o.version for o in outcomes if o.code == "OK"}
    return {
        "queries": len(outcomes),
        "failed_queries": sum(o.code != "OK" for o in outcomes),
        "bad_version_served": bad in seen,
        "reported_s": reported_s,
        "error": error,
    }


def kill_restart(server: Server, queries: list[LabeledQuery]) -> dict:
    """kill -9 under load and a restart: seconds until the alias's version is served again."""
    version = info(server.target).version
    with Load(server.target, queries, 8) as load:
        wait_for(load.running)
        killed = time.monotonic()
        server.kill()
        server.start()
        restart_s = wait_for(lambda: served(server.target, version))
    failed = sum(o.code != "OK" for o in load.all() if o.end > killed)
    return {"restart_s": restart_s, "failed_queries_while_down": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=6, help="alias moves between 2 versions")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="the server's poll")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    artifacts = demo_artifacts()
    source_root = CACHE / "demo-index"
    source = source_root / VERSIONS / ensure_demo_index(artifacts, source_root, False, False)
    queries = read_queries(artifacts.queries_path)
    work = Path(tempfile.mkdtemp(prefix="milvus-chaos-", dir=CACHE))
    root = work / "index"
    (root / VERSIONS).mkdir(parents=True)
    lite = MilvusLite(work / "milvus", work / "milvus.log")
    server = None
    report: dict = {"benchmark": "milvus_chaos", "poll_seconds": args.poll_seconds}
    try:
        milvus = lite.connect(root)
        versions = Versions(root, source, milvus)
        start = time.monotonic()
        first = versions.add("first")
        versions.add("second")
        report["collection_write_s"] = round((time.monotonic() - start) / 2, 1)
        milvus.write(CURRENT, first)
        backend = ["--backend", "milvus", "--milvus-uri", lite.uri, "--milvus-prefix", PREFIX]
        server = Server(root, work, args.poll_seconds, 0, backend)
        server.start()
        report["first_start_s"] = wait_for(lambda: served(server.target, first))
        report["switches"] = switches(server, versions, queries, args.switches)
        report["bad_collection"] = bad_collection(server, versions, queries)
        report["kill_restart"] = kill_restart(server, queries)
    finally:
        if server is not None:
            server.stop()
        lite.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["load_average"] = os.getloadavg()
    report["targets"] = {
        "switches_lose_no_query": report["switches"]["failed_queries"] == 0,
        "bad_collection_never_served": not report["bad_collection"]["bad_version_served"],
        "bad_collection_no_failed_query": report["bad_collection"]["failed_queries"] == 0,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
