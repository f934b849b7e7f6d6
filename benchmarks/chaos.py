"""Chaos benchmark: a served demo index under bad versions, a flood, a huge prompt and faults.

    python -m benchmarks.chaos [--out benchmarks/results/chaos.json]

Serves a private copy of the demo index (`influence-index serve` in a subprocess on
127.0.0.1; run as root, without the capabilities that bypass file permissions, so that an
unreadable ROOT is unreadable) and, with real gRPC clients, measures:

- bad versions: under 8 clients, publishes in turn a good, a corrupt, an omitted-file, a
  path-escaping and an incompatible version; counts failed queries, checks that no bad
  version is ever served and that GetIndexInfo names each refusal;
- flood: 128 clients; the share of health checks (main port and --health-port) answered
  SERVING, and how soon a query succeeds once the flood ends;
- huge prompt: a 16 MB prompt's INVALID_ARGUMENT latency and the p99 shift of 8 other clients;
- faults: kill -9 and restart under load, the served version deleted (while running, and
  then across a restart), ROOT unreadable, a missing file restored: seconds until the newest
  valid version is served (or the error is reported / cleared).

Every wait is bounded, so the run ends by itself (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import REPO, demo_artifacts, emit
from benchmarks.server_latency import free_port
from indexer.demo.index import ensure_demo_index
from indexer.hashing import sha256_file
from indexer.manifest import INDEX_FILE, MANIFEST_FILE
from indexer.publish import CURRENT, VERSIONS, read_current
from indexer.query import LabeledQuery, read_queries
from influence.v1 import influence_pb2 as pb
from server.client import InfluenceClient

HOST = "127.0.0.1"
# Root reads everything; without these capabilities it obeys file modes like anyone else.
_OBEY_FILE_MODES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
HUGE_PROMPT_CHARS = 16_000_000
WAIT_S = 120.0  # the longest any single step may take before the run gives up on it


@dataclass
class Outcome:
    """One finished query: when it started and ended (time.monotonic seconds), its status
    code and the version that answered it."""

    start: float
    end: float
    code: str
    version: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass
class Versions:
    """Versions of a private index root, made from the demo version by hard links (a damaged
    file is rewritten, so the demo's own files are never touched)."""

    root: Path
    source: Path
    made: list[str] = field(default_factory=list)

    def add(self, label: str, damage: Callable[[Path], None] | None = None) -> str:
        name = f"v{len(self.made):02d}-{label}"
        target = self.root / VERSIONS / name
        shutil.copytree(self.source, target, copy_function=os.link)
        edit_manifest(target, lambda m: m.update(created=datetime.now(timezone.utc).isoformat()))
        if damage is not None:
            damage(target)
        self.made.append(name)
        return name

    def publish(self, name: str) -> None:
        pointer = self.root / f".{CURRENT}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, self.root / CURRENT)


def edit_manifest(version: Path, edit: Callable[[dict], object]) -> None:
    path = version / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.unlink()  # a hard link: write a file of this version's own
    path.write_text(json.dumps(data, indent=2))


def corrupt(version: Path) -> None:
    """Flip the last byte of the index (a private copy of the file, not the linked one)."""
    data = bytearray((version / INDEX_FILE).read_bytes())
    data[-1] ^= 0xFF
    (version / INDEX_FILE).unlink()
    (version / INDEX_FILE).write_bytes(bytes(data))


def omit_and_corrupt(version: Path) -> None:
    """Leave the index out of the manifest, then corrupt it: trusting the manifest serves it."""
    edit_manifest(version, lambda m: m["files"].pop(INDEX_FILE))
    corrupt(version)


def escape(version: Path) -> None:
    """List a file outside the version (with its right sha256) among the version's files."""
    outside = Path("/etc/passwd")
    name = os.path.relpath(outside, version)
    record = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}
    edit_manifest(version, lambda m: m["files"].update({name: record}))


def incompatible(version: Path) -> None:
    """Claim other model weights than the ones the server can load."""
    edit_manifest(version, lambda m: m["model"].update(weights_sha256="0" * 64))


class Server:
    """`influence-index serve` in a subprocess, restartable on the same ports."""

    def __init__(
        self,
        root: Path,
        work: Path,
        poll_seconds: float,
        rerank_depth: int,
        extra: Sequence[str] = (),
    ) -> None:
        """`extra`: more `serve` options (e.g. the Milvus backend's)."""
        self.port, self.health_port = free_port(), free_port()
        self.target = f"{HOST}:{self.port}"
        self.health_target = f"{HOST}:{self.health_port}"
        privileged = os.geteuid() == 0
        self._argv = [
            *(_OBEY_FILE_MODES if privileged else []),
            sys.executable, "-m", "server.cli", "--threads", "1", "serve", "--index", str(root),
            "--port", str(self.port), "--health-port", str(self.health_port),
            "--poll-seconds", str(poll_seconds), "--rerank-depth", str(rerank_depth), *extra,
        ]  # fmt: skip
        self.log = work / "server.log"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log.open("a") as log:
            self._process = subprocess.Popen(self._argv, cwd=REPO, env=env, stdout=log, stderr=log)

    def kill(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        self._process.wait()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None


class Load:
    """`clients` threads querying in a loop over `channels` channels until stopped."""

    def __init__(
        self, target: str, queries: list[LabeledQuery], clients: int, channels: int = 8
    ) -> None:
        self._clients = [
            InfluenceClient(target, timeout_s=30) for _ in range(min(channels, clients))
        ]
        self._queries = queries
        self._stop = threading.Event()
        self.outcomes: list[list[Outcome]] = [[] for _ in range(clients)]
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        for client in self._clients:
            client.close()

    def all(self) -> list[Outcome]:
        return [o for log in self.outcomes for o in log]

    def running(self, at_least: int = 2) -> bool:
        return all(len(log) >= at_least for log in self.outcomes)

    def _run(self, i: int) -> None:
        client = self._clients[i % len(self._clients)]
        n = i
        while not self._stop.is_set():
            query = self._queries[n % len(self._queries)].query
            n += 1
            start = time.monotonic()
            try:
                response = client.query(query.prompt, query.completion, top_k=10)
                outcome = Outcome(start, time.monotonic(), "OK", response.index_version)
            except grpc.RpcError as exc:
                outcome = Outcome(start, time.monotonic(), exc.code().name)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    time.sleep(0.01)  # as RetryInfo asks, briefly
                elif exc.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.05)  # server down: do not spin
            self.outcomes[i].append(outcome)


def wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> float:
    """Seconds until `condition()` held; raises TimeoutError past `timeout_s`."""
    start = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except grpc.RpcError:
            pass  # not listening (yet)
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not reached in {timeout_s} s")
        time.sleep(0.02)


def info(target: str) -> object:
    with InfluenceClient(target, timeout_s=5) as client:
        return client.info()


def served(target: str, version: str) -> bool:
    current = info(target)
    return current.serving and current.version == version


# --- phases ----------------------------------------------------------------------------------


def bad_versions(server: Server, versions: Versions, queries: list[LabeledQuery]) -> dict:
    bad = {
        "corrupt": corrupt,
        "omitted_file": omit_and_corrupt,
        "path_escaping": escape,
        "incompatible": incompatible,
    }
    refusals, seen_versions = {}, set()
    with Load(server.target, queries, 8) as load:
        wait_for(load.running)
        good = versions.add("good")
        versions.publish(good)
        switch_s = wait_for(lambda: served(server.target, good))
        for label, damage in bad.items():
            name = versions.add(label, damage)
            versions.publish(name)
            seconds = wait_for(lambda n=name: n in info(server.target).last_reload_error)
            now = info(server.target)
            seen_versions.add(now.version)
            refusals[label] = {
                "version": name,
                "reported_s": seconds,
                "error": now.last_reload_error,
            }
        time.sleep(1.0)  # a few more polls: is any bad version swapped in late?
        seen_versions.add(info(server.target).version)
    versions.publish(good)  # leave the index healthy for the next phase
    outcomes = load.all()
    seen_versions |= {o.version for o in outcomes if o.code == "OK"}
    bad_names = {r["version"] for r in refusals.values()}
    return {
        "clients": 8,
        "queries": len(outcomes),
        "failed_queries": sum(o.code != "OK" for o in outcomes),
        "good_version_served_after_s": switch_s,
        "bad_versions_served": sorted(seen_versions & bad_names),
        "refusals": refusals,
        "every_refusal_named": all(r["version"] in r["error"] for r in refusals.values()),
    }


def flood(server: Server, queries: list[LabeledQuery], seconds: float) -> dict:
    probes: dict[str, list[str]] = {"health": [], "health_port": [], "index_info": []}

    def probe_until(stop: threading.Event) -> None:
        with (
            InfluenceClient(server.target, timeout_s=2) as main,
            InfluenceClient(server.health_target, timeout_s=2) as side,
        ):
            calls = {
                "health": main.health,
                "health_port": side.health,
                "index_info": lambda: "SERVING" if main.info().serving else "NOT_SERVING",
            }
            while not stop.is_set():
                for name, call in calls.items():
                    try:
                        probes[name].append(call())
                    except grpc.RpcError as exc:
                        probes[name].append(exc.code().name)
                time.sleep(0.1)

    stop = threading.Event()
    with Load(server.target, queries, 128, channels=16) as load:
        time.sleep(1.0)  # let the flood build up
        prober = threading.Thread(target=probe_until, args=(stop,))
        prober.start()
        time.sleep(seconds)
        stop.set()
        prober.join()
    ended = time.monotonic()
    with InfluenceClient(server.target, timeout_s=30) as client:
        query = queries[0].query
        client.query(query.prompt, query.completion)
    codes = Counter(o.code for o in load.all())
    return {
        "clients": 128,
        "seconds": seconds,
        "query_codes": dict(codes),
        **{
            f"{name}_checks": {"n": len(v), "serving_pct": 100 * v.count("SERVING") / len(v)}
            for name, v in probes.items()
        },
        "first_query_after_flood_s": time.monotonic() - ended,
    }


# A gRPC server that takes any message and does nothing: sending the 16 MB request to it
# measures what moving the bytes costs on this machine, apart from what the server does.
BARE_SERVER = """
import sys, grpc
from concurrent.futures import ThreadPoolExecutor
server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 1 << 25)])
handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("B", {"C": handler}),))
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
server.wait_for_termination()
"""


def huge_prompt(server: Server, queries: list[LabeledQuery], sends: int) -> dict:
    """A 16 MB prompt sent `sends` times to the server, then to a bare gRPC server (the
    control), while 8 clients query. The request is serialized once, beforehand: the 45 ms a
    client spends encoding 16 MB are not the server's."""
    request = pb.QueryRequest(prompt="x" * HUGE_PROMPT_CHARS, completion=" y", top_k=10)
    payload = request.SerializeToString()
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port)])
    try:
        with Load(server.target, queries, 8) as load:
            wait_for(load.running)
            baseline = (time.monotonic(), time.monotonic() + 5.0)
            time.sleep(5.0)
            rpc = "/influence.v1.InfluenceService/Query"
            served = _send(server.target, rpc, payload, sends)
            control = _send(f"{HOST}:{bare_port}", "/B/C", payload, sends)
            time.sleep(0.5)
    finally:
        bare.terminate()
        bare.wait(timeout=30)
    outcomes = [o for o in load.all() if o.code == "OK"]
    windows = {"before": baseline, "during": served.window, "control": control.window}
    p99 = {
        name: float(np.percentile([o.latency_ms for o in outcomes if _overlaps(o, w)], 99))
        for name, w in windows.items()
    }
    return {
        "request_bytes": len(payload),
        "sends": sends,
        "codes": dict(served.codes),
        "latency_ms_p50": float(np.percentile(served.latencies_ms, 50)),
        "latency_ms_max": float(max(served.latencies_ms)),
        "bare_server_latency_ms_p50": float(np.percentile(control.latencies_ms, 50)),
        "other_clients": 8,
        "others_p99_ms_before": p99["before"],
        "others_p99_ms_during": p99["during"],
        "others_p99_ms_during_bare_sends": p99["control"],
        "others_p99_shift_ms": p99["during"] - p99["before"],
        "others_failed": sum(o.code != "OK" for o in load.all()),
    }


@dataclass
class _Sends:
    latencies_ms: list[float]
    codes: Counter
    window: tuple[float, float]  # time.monotonic() seconds


def _send(target: str, method: str, payload: bytes, times: int) -> _Sends:
    """Send `payload` (already serialized) `times` times, one after the other."""
    latencies, codes = [], Counter()
    options = [("grpc.max_send_message_length", len(payload) + 1024)]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        grpc.channel_ready_future(channel).result(timeout=WAIT_S)
        start_all = time.monotonic()
        for _ in range(times):
            start = time.monotonic()
            try:
                call(payload, timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
            latencies.append((time.monotonic() - start) * 1e3)
    return _Sends(latencies, codes, (start_all, time.monotonic()))


def _overlaps(outcome: Outcome, window: tuple[float, float]) -> bool:
    return outcome.end > window[0] and outcome.start < window[1]


def faults(server: Server, versions: Versions, queries: list[LabeledQuery]) -> dict:
    """Seconds until the newest valid version is served (or an error reported/cleared)."""
    result = {}
    good = read_current(versions.root)
    with Load(server.target, queries, 8) as load:
        wait_for(load.running)
        killed = time.monotonic()
        server.kill()
        server.start()
        wait_for(lambda: served(server.target, good))
        result["kill9_restart_s"] = time.monotonic() - killed
        failed = sum(o.code != "OK" for o in load.all() if o.end > killed)
        result["kill9_failed_queries_while_down"] = failed

        older = versions.made[0]  # newest valid besides `good`: the bad ones sit in between
        shutil.rmtree(versions.root / VERSIONS / good)
        result["deleted_served_version_s"] = wait_for(lambda: served(server.target, older))
        result["deleted_served_version_error"] = info(server.target).last_reload_error

        killed = time.monotonic()
        server.kill()
        server.start()
        wait_for(lambda: served(server.target, older))
        result["restart_with_current_deleted_s"] = time.monotonic() - killed
        result["restart_with_current_deleted_error"] = info(server.target).last_reload_error

        with unreadable(versions.root):
            result["unreadable_root_reported_s"] = wait_for(
                lambda: "cannot read index root" in info(server.target).last_reload_error
            )
            result["unreadable_root_error"] = info(server.target).last_reload_error
            result["unreadable_root_still_serving"] = info(server.target).serving
        result["unreadable_root_cleared_s"] = wait_for(
            lambda: "cannot read" not in info(server.target).last_reload_error
        )

        stash = versions.root / "stash.faiss"
        missing = versions.add("restored", lambda v: os.rename(v / INDEX_FILE, stash))
        versions.publish(missing)
        wait_for(lambda: missing in info(server.target).last_reload_error)
        restored = time.monotonic()
        os.rename(stash, versions.root / VERSIONS / missing / INDEX_FILE)
        wait_for(lambda: served(server.target, missing))
        result["restored_file_s"] = time.monotonic() - restored
    return result


@contextmanager
def unreadable(root: Path) -> Iterator[None]:
    """ROOT without any permission (binding on the server, which obeys file modes)."""
    mode = root.stat().st_mode
    root.chmod(0)
    try:
        yield
    finally:
        root.chmod(mode)


# --- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="the server's poll")
    parser.add_argument("--flood-seconds", type=float, default=8.0)
    parser.add_argument("--huge-sends", type=int, default=30, help="16 MB prompts sent")
    parser.add_argument(
        "--rerank-depth",
        type=int,
        default=0,
        help="the server's exact re-rank depth; 0 keeps queries cheap, since what is measured "
        "here is the service around them",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    artifacts = demo_artifacts()
    source_root = REPO / ".cache" / "demo-index"
    source = source_root / VERSIONS / ensure_demo_index(artifacts, source_root, False, False)
    queries = read_queries(artifacts.queries_path)
    work = Path(tempfile.mkdtemp(prefix="chaos-", dir=REPO / ".cache"))
    root = work / "index"
    (root / VERSIONS).mkdir(parents=True)
    versions = Versions(root, source)
    versions.publish(versions.add("initial"))
    server = Server(root, work, args.poll_seconds, args.rerank_depth)
    report: dict = {
        "benchmark": "chaos",
        "poll_seconds": args.poll_seconds,
        "rerank_depth": args.rerank_depth,
    }
    phases: dict[str, Callable[[], object]] = {
        "first_start_s": lambda: wait_for(lambda: info(server.target).serving),
        "bad_versions": lambda: bad_versions(server, versions, queries),
        "flood": lambda: flood(server, queries, args.flood_seconds),
        "huge_prompt": lambda: huge_prompt(server, queries, args.huge_sends),
        "faults": lambda: faults(server, versions, queries),
    }
    try:
        server.start()
        for name, phase in phases.items():
            try:
                report[name] = phase()
            except TimeoutError as exc:  # recorded, and the run goes on: it ends by itself
                report[name] = {"error": f"{name}: {exc}"}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = targets(report)
    emit(report, args.out)


def targets(report: dict) -> dict:
    """Each target of issue 10, met or not (False when its phase did not finish)."""
    try:
        return _targets(report["bad_versions"], report["flood"], report["huge_prompt"])
    except KeyError:
        return {"error": "a phase did not finish; see its entry"}


def _targets(bad: dict, flood_: dict, huge: dict) -> dict:
    return {
        "bad_versions_0_failed_queries": bad["failed_queries"] == 0,
        "bad_versions_never_served": not bad["bad_versions_served"],
        "each_refusal_named": bad["every_refusal_named"],
        "flood_100pct_health_serving": flood_["health_checks"]["serving_pct"] == 100.0
        and flood_["health_port_checks"]["serving_pct"] == 100.0,
        "huge_prompt_invalid_argument_within_50ms": set(huge["codes"]) == {"INVALID_ARGUMENT"}
        and huge["latency_ms_max"] <= 50.0,
        "others_p99_shift_below_50ms": huge["others_p99_shift_ms"] < 50.0,
    }


if __name__ == "__main__":
    main()
