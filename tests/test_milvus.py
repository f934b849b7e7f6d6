"""The Milvus backend against Milvus Lite (embedded, a local file; no mocks): build, publish
and the alias; a server that searches the collection and follows the alias; incremental
builds; rollback and pin; failed builds; bad URIs and dimensions; and, on the demo with a
flat index, the same top-10 as FAISS for every demo query."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pymilvus import MilvusClient, MilvusException
from pymilvus.client.types import LoadState
from transformers import AutoTokenizer

from indexer.backend import open_pointers
from indexer.build import build_index
from indexer.config import Backend, BackendConfig, BuildConfig
from indexer.demo.train import DemoTrainingConfig, build_model
from indexer.engine import QueryEngine
from indexer.errors import IndexVerificationError, InvalidInputError
from indexer.manifest import INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from indexer.milvus import MilvusBackend
from indexer.publish import (
    CURRENT,
    PINNED,
    VERSIONS,
    new_version_id,
    read_current,
    read_manifest,
    rollback,
    version_dir,
)
from indexer.query import Query
from server.app import InfluenceServer, ServerConfig
from server.cli import main
from server.client import InfluenceClient
from server.reload import ReloadPolicy
from tests.conftest import write_jsonl
from tests.test_build import tiny_config

WAIT_S = 120.0


def wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def assert_same_hits(found: list, expected: list, engine: QueryEngine) -> None:
    """The same hits with the same scores, rank by rank; two examples with the same tokens
    (duplicate texts: the same stored vector) may trade places, a tie either engine breaks
    its own way."""
    assert [h.score for h in found] == pytest.approx([h.score for h in expected], rel=1e-4)
    records = engine.metadata.lookup([h.example_id for h in [*found, *expected]])
    tokens = [
        (records[a.example_id].token_ids, records[b.example_id].token_ids)
        for a, b in zip(found, expected, strict=True)
    ]
    assert all(mine == theirs for mine, theirs in tokens)


def lite(path: Path, prefix: str = "influence") -> BackendConfig:
    return BackendConfig(Backend.MILVUS, str(path), prefix)


def milvus_config(
    model: Path, corpus: Path, root: Path, backend: BackendConfig, **store
) -> BuildConfig:
    return replace(tiny_config(model, corpus, root, **store), backend=backend)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir, small_corpus) -> dict:
    """A Milvus Lite file, an index ROOT built into it, and the corpus it was built from."""
    work = tmp_path_factory.mktemp("milvus")
    corpus = write_jsonl(work / "corpus.jsonl", small_corpus)
    backend = lite(work / "milvus.db")
    root = work / "index"
    summary = build_index(milvus_config(tiny_model_dir, corpus, root, backend))
    return {"root": root, "backend": backend, "corpus": corpus, "first": summary}


@pytest.fixture(scope="module")
def milvus(tiny) -> MilvusBackend:
    return open_pointers(tiny["root"], tiny["backend"])


@pytest.fixture
def serve(tiny) -> Iterator[Callable[..., InfluenceClient]]:
    servers: list[tuple[InfluenceServer, InfluenceClient]] = []

    def start(**reload: object) -> InfluenceClient:
        config = ServerConfig(
            index_root=tiny["root"],
            port=0,
            reload=ReloadPolicy(poll_seconds=0.1, **reload),
            backend=tiny["backend"],
        )
        server = InfluenceServer(config)
        server.start()
        client = InfluenceClient(f"127.0.0.1:{server.port}", timeout_s=60)
        servers.append((server, client))
        return client

    yield start
    for server, client in servers:
        client.close()
        server.stop(grace_s=1)


def test_a_build_publishes_a_verified_collection_and_moves_the_alias(tiny, milvus) -> None:
    root, summary = tiny["root"], tiny["first"]
    manifest = read_manifest(version_dir(root, summary.version, milvus))
    assert summary.collection == milvus.collection(summary.version) == manifest.collection.name
    assert manifest.collection.rows == summary.n_examples == milvus.count(summary.collection)
    assert read_current(root, milvus) == summary.version
    assert not (root / CURRENT).exists()  # the alias is CURRENT, not a file of ROOT
    milvus.verify(manifest.collection, version_dir(root, summary.version))


def test_info_reads_the_alias_and_verifies_the_collection(tiny, capsys) -> None:
    root, version = tiny["root"], tiny["first"].version
    assert main(["info", "--index", str(root), *_flags(tiny), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["current"] == info["version"] == version
    assert info["manifest"]["collection"]["rows"] == tiny["first"].n_examples


def test_the_server_searches_milvus_and_answers_as_faiss_does(tiny, serve) -> None:
    """The same version answered through Milvus and through its FAISS index (which the
    build keeps for incremental builds): the same hits and scores."""
    root, version = tiny["root"], tiny["first"].version
    client = serve()
    wait_for(lambda: client.info().serving)
    faiss = QueryEngine.open(root, version=version)
    try:
        for prompt, completion in [("The market", " was busy"), ("A river", " flows")]:
            for depth in (0, 50):
                answer = client.query(prompt, completion, top_k=5, rerank_depth=depth)
                (expected,) = faiss.query([Query(prompt, completion, top_k=5, rerank_depth=depth)])
                assert answer.index_version == version
                assert_same_hits(list(answer.influences), expected.hits, faiss)
    finally:
        faiss.close()


def test_a_collection_milvus_released_is_loaded_again_on_the_next_query(
    tiny, serve, milvus
) -> None:
    """Milvus releases its collections when it restarts; the server kept failing every query
    (INTERNAL) until a new version was published."""
    client = serve()
    wait_for(lambda: client.info().serving)
    collection = milvus.collection(client.info().version)
    assert client.query("The market", " was busy", top_k=3, rerank_depth=0).influences
    milvus.client.release_collection(collection)
    assert client.query("The market", " was busy", top_k=3, rerank_depth=0).influences
    assert milvus.client.get_load_state(collection)["state"] == LoadState.Loaded


def test_a_milvus_outage_is_the_reload_status_not_a_traceback_a_poll(
    tiny, serve, monkeypatch, caplog
) -> None:
    client = serve()
    wait_for(lambda: client.info().serving)

    def down(*_args: object, **_kwargs: object) -> None:
        raise MilvusException(code=2, message="Fail connecting to server")

    monkeypatch.setattr(MilvusClient, "list_aliases", down)
    wait_for(lambda: "Fail connecting" in client.info().last_reload_error)
    time.sleep(0.5)  # several polls
    info = client.info()
    monkeypatch.undo()
    wait_for(lambda: client.info().last_reload_error == "")
    assert info.last_reload_error.startswith(f"Milvus at {tiny['backend'].milvus_uri}: ")
    assert info.serving
    assert caplog.text.count("Fail connecting") == 1 and "Traceback" not in caplog.text


def test_roots_sharing_a_milvus_prefix_never_take_each_others_collections(
    tiny, tiny_model_dir, milvus, tmp_path
) -> None:
    """Every root's builds dropped the others' collections as orphans of their own, and moved
    the same aliases."""
    root, before = tiny["root"], read_current(tiny["root"], milvus)
    (tmp_path / "other").mkdir()
    other = open_pointers(tmp_path / "other", tiny["backend"])
    foreign = new_version_id()
    other.write_collection(foreign, version_dir(root, before), 64, unit=True)
    assert milvus.drop_orphans() == []  # another root's, not an orphan of this one
    with pytest.raises(InvalidInputError, match="another index root"):
        build_index(milvus_config(tiny_model_dir, tiny["corpus"], other.root, tiny["backend"]))
    assert read_current(root, milvus) == before
    assert milvus.client.has_collection(milvus.collection(before))
    assert other.drop_orphans() == [other.collection(foreign)]


def test_the_server_reads_neither_the_faiss_index_nor_the_metadata(tiny, milvus) -> None:
    """Stateless: model, factors and Milvus. A version whose FAISS index and metadata files
    are gone opens and answers through Milvus (and FAISS refuses it)."""
    root, version = tiny["root"], tiny["first"].version
    path = version_dir(root, version)
    moved = {name: path / f".{name}.aside" for name in (INDEX_FILE, METADATA_FILE)}
    for name, aside in moved.items():
        (path / name).rename(aside)
    try:
        with pytest.raises(IndexVerificationError):
            QueryEngine.open(root, version=version)
        engine = QueryEngine.open(root, version=version, milvus=milvus)
        (result,) = engine.query([Query("The market", " was busy", top_k=3, include_text=True)])
        assert len(result.hits) == 3 and result.hits[0].text
        engine.close()
    finally:
        for name, aside in moved.items():
            aside.rename(path / name)


def test_incremental_build_writes_a_new_collection_and_the_server_follows_the_alias(
    tiny, small_corpus, tiny_model_dir, milvus, serve, tmp_path: Path
) -> None:
    root, first = tiny["root"], tiny["first"].version
    client = serve()
    wait_for(lambda: client.info().version == first)
    try:
        _follow_an_incremental_build(tiny, small_corpus, tiny_model_dir, milvus, client, tmp_path)
    finally:  # the module's other tests serve the first version
        milvus.clear(PINNED)
        rollback(root, first, milvus)


def _follow_an_incremental_build(
    tiny: dict,
    small_corpus: list[dict],
    tiny_model_dir: Path,
    milvus: MilvusBackend,
    client: InfluenceClient,
    tmp_path: Path,
) -> None:
    root, first = tiny["root"], tiny["first"].version
    documents = [dict(d) for d in small_corpus[1:]]  # one deleted
    documents[0]["text"] += " And then it rained."  # one changed
    documents.append({"id": "new-doc", "text": "A new document about the harbour."})
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    summary = build_index(milvus_config(tiny_model_dir, corpus, root, tiny["backend"]))
    assert summary.mode == "incremental" and summary.built_from == first
    assert (summary.new, summary.changed, summary.deleted) == (1, 1, 1)
    assert read_current(root, milvus) == summary.version
    assert milvus.count(summary.collection) == summary.n_examples
    assert milvus.client.has_collection(milvus.collection(first))  # kept for rollback
    wait_for(lambda: client.info().version == summary.version)
    hits = client.query("A new document", " about the harbour.", top_k=3).influences
    assert "new-doc" in {h.doc_id for h in hits}

    # rollback moves the alias back, and the server follows
    assert main(["rollback", "--index", str(root), *_flags(tiny), "--json"]) == 0
    assert read_current(root, milvus) == first
    wait_for(lambda: client.info().version == first)
    rollback(root, summary.version, milvus)
    wait_for(lambda: client.info().version == summary.version)

    # a pin moves the pinned alias, which every server serves until it is cleared
    assert main(["pin", "--index", str(root), *_flags(tiny), first]) == 0
    assert milvus.read(PINNED) == first
    wait_for(lambda: client.info().version == first)
    assert main(["pin", "--index", str(root), *_flags(tiny), "--clear"]) == 0
    assert milvus.read(PINNED) is None
    wait_for(lambda: client.info().version == summary.version)


def _flags(tiny: dict) -> list[str]:
    backend = tiny["backend"]
    return ["--backend", "milvus", "--milvus-uri", backend.milvus_uri]


def test_a_failed_build_leaves_the_alias_and_drops_its_collection(
    tiny, tiny_model_dir, milvus, monkeypatch
) -> None:
    root = tiny["root"]
    before, collections = read_current(root, milvus), set(milvus.client.list_collections())

    def fail(*_args: object) -> None:
        raise IndexVerificationError("the collection did not read back")

    monkeypatch.setattr(MilvusBackend, "verify", fail)
    config = milvus_config(tiny_model_dir, tiny["corpus"], root, tiny["backend"])
    with pytest.raises(IndexVerificationError):
        build_index(replace(config, incremental=replace(config.incremental, mode="off")))
    assert read_current(root, milvus) == before
    assert set(milvus.client.list_collections()) == collections


def test_a_killed_builds_collection_is_dropped_by_the_next_build(
    tiny, tiny_model_dir, milvus
) -> None:
    """A build killed while writing its collection never moved the alias; the next build
    drops the collection it left."""
    root = tiny["root"]
    current = read_current(root, milvus)
    orphan = new_version_id()
    milvus.write_collection(orphan, version_dir(root, current), 64, unit=True)
    assert read_current(root, milvus) == current
    assert milvus.drop_orphans() == [milvus.collection(orphan)]
    assert not milvus.client.has_collection(milvus.collection(orphan))


def test_bad_uri_and_dimension_are_one_line_errors(
    tiny_model_dir, small_corpus_path, tmp_path: Path, capsys
) -> None:
    base = ["build", "-q", "--model", str(tiny_model_dir), "--data", str(small_corpus_path)]
    base += ["--out", str(tmp_path / "index"), "--max-length", "64", "--rank-in", "8"]
    for uri, expected in [
        ("", "--backend milvus needs --milvus-uri"),
        (str(tmp_path / "index.txt"), "neither a Milvus Lite file"),
        (str(tmp_path / "missing" / "m.db"), "does not exist"),
    ]:
        assert main([*base, "--backend", "milvus", "--milvus-uri", uri]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    argv = ["--backend", "milvus", "--milvus-uri", str(tmp_path / "m.db")]
    assert main([*base, *argv, "--milvus-max-dimension", "100"]) == 2
    err = capsys.readouterr().err
    assert "over Milvus's limit of 100 (proxy.maxDimension)" in err and err.count("\n") == 1
    backend = lite(tmp_path / "m.db")
    assert read_current(tmp_path / "index", open_pointers(tmp_path / "index", backend)) is None
    with pytest.raises(InvalidInputError, match="--milvus-prefix"):
        MilvusBackend.connect(lite(tmp_path / "m.db", prefix="bad-prefix"), tmp_path)
    with pytest.raises(InvalidInputError, match="so the prefix at most 225"):
        MilvusBackend.connect(lite(tmp_path / "m.db", prefix="p" * 226), tmp_path)


def test_milvus_errors_are_retryable_only_when_a_retry_may_help() -> None:
    """Every Milvus error was UNAVAILABLE (retried by clients, exit 1), a refusal for good
    (a collection that does not exist) too."""
    from indexer.errors import BackendError, UnavailableError
    from indexer.milvus import _Client

    class Refusing:
        def __init__(self, code: int) -> None:
            self.code = code

        def list_aliases(self) -> None:
            raise MilvusException(code=self.code, message="refused")

    with pytest.raises(UnavailableError):
        _Client(Refusing(2), "uri").list_aliases()  # CONNECT_FAILED
    with pytest.raises(BackendError):
        _Client(Refusing(100), "uri").list_aliases()  # COLLECTION_NOT_FOUND


def test_a_milvus_that_cannot_be_reached_exits_1_worth_a_retry(tmp_path: Path, capsys) -> None:
    """Like an RPC the network may yet answer (README); it exited 2, as bad input does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    uri = f"http://127.0.0.1:{port}"
    argv = ["info", "--index", str(tmp_path), "--backend", "milvus", "--milvus-uri", uri]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach Milvus at {uri}: ") and err.count("\n") == 1


def test_what_milvus_cannot_hold_is_refused_before_the_passes(
    tiny, tiny_model_dir, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A doc id over Milvus's 65,535-byte text field, and more tokens per example than its
    4,096 array elements: one line and exit 2 before the curvature (it came after the whole
    build, as a traceback, and the build then hung; the model here has 5,000 positions)."""
    from indexer import build

    def no_passes(*_args: object) -> None:
        raise AssertionError("the passes ran")

    monkeypatch.setattr(build, "_curvature", no_passes)
    long_model = tmp_path / "long-model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = DemoTrainingConfig(n_embd=32, n_layer=2, n_head=2, n_positions=5000)
    build_model(config, tokenizer).save_pretrained(long_model, safe_serialization=True)
    tokenizer.save_pretrained(long_model)
    corpus = write_jsonl(tmp_path / "long-id.jsonl", [{"id": "x" * 70_000, "text": "A river"}])
    backend = ["--backend", "milvus", "--milvus-uri", str(tmp_path / "m.db")]
    base = ["build", "-q", "--out", str(tmp_path / "index"), "--rank-in", "8", *backend]
    for model, data, length, expected in [
        (tiny_model_dir, corpus, 64, "a doc_id of 70000 bytes is over Milvus's 65535-byte"),
        (long_model, tiny["corpus"], 5000, "5000 tokens per example are over Milvus's 4096"),
    ]:
        argv = ["--model", str(model), "--data", str(data), "--max-length", str(length)]
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


def test_demo_top_10_equals_faiss_for_every_demo_query(
    tmp_path: Path, demo_index_root: Path, demo_queries
) -> None:
    """On the demo with its flat index (`IDMap,SQ8`, searched exhaustively), published to
    Milvus: Milvus holds the vectors the FAISS index scores (decoded from it), so both return
    the same top-10, sketch alone and exactly re-ranked (duplicate texts aside, which may trade
    places)."""
    source = version_dir(demo_index_root)
    assert read_manifest(source).index_factory == "IDMap,SQ8"
    root = tmp_path / "index"
    version = root / VERSIONS / source.name
    shutil.copytree(source, version, copy_function=os.link)
    milvus = MilvusBackend.connect(lite(tmp_path / "milvus.db"), root)
    manifest = read_manifest(version)
    record = milvus.write_collection(version.name, version, manifest.max_length, unit=True)
    (version / MANIFEST_FILE).unlink()  # a hard link to the session's index: write our own
    (version / MANIFEST_FILE).write_text(replace(manifest, collection=record).to_json())
    engines = [
        QueryEngine.open(root, version=version.name),
        QueryEngine.open(root, version=version.name, milvus=milvus),
    ]
    queries = [Query(q["prompt"], q["completion"], top_k=10) for q in demo_queries]
    try:
        for depth in (0, None):
            asked = [replace(q, rerank_depth=depth) for q in queries]
            faiss, ours = (engine.query(asked) for engine in engines)
            for expected, found in zip(faiss, ours, strict=True):
                assert len(found.hits) == 10
                assert_same_hits(found.hits, expected.hits, engines[0])
    finally:
        for engine in engines:
            engine.close()


def test_only_the_served_and_the_previous_versions_stay_loaded(
    tiny, tiny_model_dir, tmp_path
) -> None:
    """Every build loaded its collection and none was released: Milvus held every kept
    version in its query nodes' memory, not the two the deploy files size them for."""
    root, backend = tmp_path / "index", lite(tmp_path / "milvus.db")
    config = milvus_config(tiny_model_dir, tiny["corpus"], root, backend)
    config = replace(config, incremental=replace(config.incremental, mode="off"))
    versions = [build_index(config).version for _ in range(3)]
    milvus = open_pointers(root, backend)
    try:
        loaded = {
            v: milvus.client.get_load_state(milvus.collection(v))["state"] == LoadState.Loaded
            for v in versions
        }
    finally:
        milvus.close()
    assert loaded == {versions[0]: False, versions[1]: True, versions[2]: True}


def test_pruned_versions_drop_their_collections(tiny, tiny_model_dir, tmp_path) -> None:
    """On a Milvus Lite file of its own: it prunes every version but the last."""
    root, backend = tmp_path / "index", lite(tmp_path / "milvus.db")
    build_index(milvus_config(tiny_model_dir, tiny["corpus"], root, backend))
    config = milvus_config(tiny_model_dir, tiny["corpus"], root, backend, keep_versions=1)
    summary = build_index(config)
    milvus = open_pointers(root, backend)
    try:
        ours = [c for c in milvus.client.list_collections() if c.startswith("influence_")]
    finally:
        milvus.close()
    assert ours == [summary.collection]
    assert [v.name for v in (root / VERSIONS).iterdir()] == [summary.version]
