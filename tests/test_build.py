"""Build -> publish -> reload round trips, determinism, bad input, and a build killed mid-way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.build import _disk_full, build_index
from indexer.config import BuildConfig, CorpusConfig, SketchConfig, StoreConfig
from indexer.engine import QueryEngine
from indexer.errors import InvalidInputError
from indexer.manifest import (
    FULL_CURVATURE_FILE,
    INDEX_FILE,
    LEXICAL_FILES,
    METADATA_FILE,
)
from indexer.publish import VERSIONS, read_current, verify_version, version_dir
from indexer.query import Query, read_queries
from indexer.store import MetadataReader
from server.cli import main
from tests.conftest import write_jsonl


def tiny_config(model_dir: Path, corpus: Path, out: Path, **store) -> BuildConfig:
    return BuildConfig(
        model=model_dir,
        out=out,
        corpus=CorpusConfig(str(corpus), max_length=64),
        sketch=SketchConfig(rank_in=8, rank_out=8),
        store=StoreConfig(**store),
        progress=False,
    )


def code_step(engine: QueryEngine) -> np.ndarray:
    """One step of the 8-bit codes `[N, D]` of `engine.vectors.preconditioned[:]`: its
    dimension's trained range / 255, times the example's norm in a cosine index (whose codes
    are unit vectors)."""
    sq = faiss.downcast_index(engine.index.index).sq
    assert sq.qtype == faiss.ScalarQuantizer.QT_8bit
    step = faiss.vector_to_array(sq.trained).reshape(2, -1)[1] / 255  # [vmin; vdiff] per dim
    n = len(engine.vectors)
    norms = engine.metadata.ids_and_norms(np.arange(n))[1]
    scale = norms if engine.vectors.unit else np.ones(n)
    return scale[:, None] * step[None, :]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir, small_corpus_path) -> Path:
    root = tmp_path_factory.mktemp("index")
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root, score="influence"))
    return root


def test_round_trip_search_and_metadata(published, small_corpus):
    path = version_dir(published)
    manifest = verify_version(path)
    assert set(manifest.files) == {
        "curvature.safetensors",
        FULL_CURVATURE_FILE,
        INDEX_FILE,
        METADATA_FILE,
        *LEXICAL_FILES,
    }  # no vectors.f16: the index is the only copy of the vectors
    engine = QueryEngine.open(published)
    n = manifest.counts.examples
    assert n > len(small_corpus) == manifest.counts.documents  # the long doc was chunked
    assert engine.index.ntotal == engine.metadata.count() == n
    first = small_corpus[0]
    words = first["text"].split()
    query = Query(" ".join(words[:4]), " " + words[4], top_k=5, rerank_depth=0)  # the sketch
    result = engine.query([query])[0]
    assert len(result.hits) == 5
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    # the index's score is the inner product of the stored vectors
    record = engine.metadata.lookup([result.hits[0].example_id])[result.hits[0].example_id]
    q = engine.query_vectors([engine.prepare(query)])[0]
    stored = np.asarray(engine.vectors[record.row], dtype=np.float32)
    assert result.hits[0].score == pytest.approx(float(q @ stored), rel=1e-4)
    assert record.norm == pytest.approx(float(np.linalg.norm(stored)), rel=1e-2)


def test_served_vectors_are_decoded_from_the_memory_mapped_index(published):
    engine = QueryEngine.open(published)
    index_path = str(engine.path / INDEX_FILE)
    assert index_path in Path("/proc/self/maps").read_text()  # mapped, not read into RAM
    vectors = engine.vectors
    n, dim = vectors.shape
    assert (n, dim) == (engine.index.ntotal, engine.info.dim)
    block = vectors[0:n]
    assert block.dtype == np.float32 and block.shape == (n, dim)
    rows = [n - 1, 0, 3]
    assert np.array_equal(vectors[rows], block[rows])
    assert np.array_equal(vectors[2], block[2])
    with pytest.raises(IndexError):
        vectors[[n]]


def test_a_cosine_ivf_index_gives_back_the_same_vectors(
    tmp_path, published, tiny_model_dir, small_corpus_path
):
    """A cosine index stores unit vectors (`preconditioned` scales them back by the stored
    norms); an IVF index decodes through its direct map. Same curvature as `published`, so the
    same vectors up to 8-bit quantisation."""
    config = tiny_config(tiny_model_dir, small_corpus_path, tmp_path, index_factory="IVF2,SQ8")
    build_index(config)
    flat, ivf = QueryEngine.open(published), QueryEngine.open(tmp_path)
    assert ivf.info.score_kind == "cosine" and ivf.info.faiss_factory == "IVF2,SQ8"
    expected, decoded = flat.vectors[:], ivf.vectors.preconditioned[:]
    error = np.linalg.norm(decoded - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert error.max() < 0.05
    rows = [7, 1]
    assert np.array_equal(ivf.vectors.preconditioned[rows], decoded[rows])


def test_token_attribution_sums_to_the_score(published):
    engine = QueryEngine.open(published)
    query = engine.prepare(
        Query("The market", " was busy", top_k=3, include_layer_scores=True, rerank_depth=0)
    )
    hits = engine.answer([query])[0].hits
    attributions = engine.attribute_tokens(query, [h.example_id for h in hits])
    for hit, attribution in zip(hits, attributions, strict=True):
        assert len(attribution.tokens) == len(attribution.scores)
        assert attribution.total == pytest.approx(hit.influence, rel=2e-2, abs=1e-3)
        assert sum(hit.layer_scores.values()) == pytest.approx(hit.influence, rel=2e-2, abs=1e-3)


def test_builds_are_deterministic(tmp_path, published, tiny_model_dir, small_corpus_path):
    again = tmp_path / "again"
    build_index(tiny_config(tiny_model_dir, small_corpus_path, again, score="influence"))
    roots = [published, again]
    manifests = [verify_version(version_dir(r)) for r in roots]
    for name in ("curvature.safetensors", INDEX_FILE):
        assert manifests[0].files[name] == manifests[1].files[name], name
    rows = [
        MetadataReader(version_dir(r) / METADATA_FILE)
        ._con.execute('SELECT id, doc_id, chunk, norm, loss FROM examples ORDER BY "row"')
        .fetchall()
        for r in roots
    ]
    assert rows[0] == rows[1]


def test_cosine_index_and_retention(tmp_path, tiny_model_dir, small_corpus_path):
    root = tmp_path / "root"
    for _ in range(2):
        build_index(tiny_config(tiny_model_dir, small_corpus_path, root, score="cosine",
                                keep_versions=1))  # fmt: skip
    versions = sorted(p.name for p in (root / VERSIONS).iterdir())
    assert len(versions) == 1 and read_current(root) == versions[0]
    engine = QueryEngine.open(root)
    hits = engine.query([Query("The market", " was busy", top_k=4)])[0].hits
    assert all(-1.0 - 1e-3 <= h.score <= 1.0 + 1e-3 and h.score == h.cosine for h in hits)


def _snapshot(root: Path) -> tuple[str | None, dict]:
    current = read_current(root)
    return current, verify_version(version_dir(root)).files


def _bad_inputs(tmp: Path, model: Path, corpus: Path) -> dict[str, list[str]]:
    pickled = tmp / "pickled-model"
    pickled.mkdir()
    (pickled / "config.json").write_text((model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not safetensors")
    not_a_dir = tmp / "file"
    not_a_dir.write_text("")
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    dupes = write_jsonl(tmp / "dupes.jsonl", [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])
    wordless = [{"id": i, "text": text} for i, text in enumerate(["the a an of", "!!! ???"] * 3)]
    stopwords = write_jsonl(tmp / "stopwords.jsonl", wordless)
    return {
        "model directory not found": ["--model", str(tmp / "missing")],
        "no .safetensors weights": ["--model", str(pickled)],
        "no Linear/Conv1D modules, routers or experts matching": ["--modules", "^nothing$"],
        "matches no files": ["--data", str(tmp / "nothing-*.jsonl")],
        "no column 'body'": ["--text-column", "body"],
        "corpus is empty": ["--data", str(empty)],
        "duplicate document id": ["--data", str(dupes)],
        "exceed module": ["--rank-in", "4096"],
        "not writable": ["--out", str(not_a_dir / "root")],
        "invalid FAISS factory": ["--index-factory", "Bogus42"],
        "--retrieval-quantizer: invalid FAISS factory": ["--retrieval-quantizer", "Bogus7"],
        "--retrieval-code on needs the flat index IDMap,SQ8": [
            "--index-factory",
            "IDMap,Flat",
            "--retrieval-code",
            "on",
        ],
        "--retrieval-dims of a random projection must be under ": [
            "--retrieval-code",
            "on",
            "--retrieval-projection",
            "random",
            "--retrieval-dims",
            "10240",
        ],
        "--retrieval-projection random needs --retrieval-dims N > 0": [
            "--retrieval-projection",
            "random",
        ],
        "--retrieval-projection pca is not built any more": ["--retrieval-projection", "pca"],
        "--retrieval-dims must be 0 (every dimension) or positive": ["--retrieval-dims", "-1"],
        "--max-length 4096": ["--max-length", "4096"],
        "--damping must be a positive number": ["--damping", "inf"],
        "--max-length 0 must be between 2": ["--max-length", "0"],
        "--fit-examples must be at least 1": ["--fit-examples", "0"],
        "--refit-threshold must be at least 0": ["--refit-threshold", "nan"],
        "--nprobe must be at least 1": ["--index-factory", "IVF2,SQ8", "--nprobe", "0"],
        "--calibration-depth must be at least 1": ["--calibration-depth", "0"],
        "--calibration-quantile must be in (0, 1]": ["--calibration-quantile", "2"],
        "--calibration-queries must be 0 (none) or positive": ["--calibration-queries", "-1"],
        "unknown device 'bogus'": ["--device", "bogus"],
        "factory 'Flat' keeps no example ids": ["--index-factory", "Flat"],
        "more than the": ["--index-factory", "IVF4096,SQ8"],
        "take no IDMap": ["--retrieval-code", "on", "--retrieval-quantizer", "IDMap,Flat"],
        "no word a lexical index could match": ["--data", str(stopwords)],
        "is not a writable directory": ["--metrics-textfile", str(tmp / "missing" / "x.prom")],
        "--pushgateway: 'http://[bad' is not": ["--pushgateway", "http://[bad"],
    }


def test_bad_input_is_one_line_and_publishes_nothing(
    tmp_path, published, tiny_model_dir, small_corpus_path, capsys
):
    before = _snapshot(published)
    base = ["build", "--model", str(tiny_model_dir), "--data", str(small_corpus_path),
            "--out", str(published), "--rank-in", "4", "--rank-out", "4"]  # fmt: skip
    for message, override in _bad_inputs(tmp_path, tiny_model_dir, small_corpus_path).items():
        code = main(["--quiet", *base, *override])
        err = capsys.readouterr().err.strip()
        assert code == 2, message
        assert message in err and len(err.splitlines()) == 1, (message, err)
    assert _snapshot(published) == before
    assert not list((published / VERSIONS).glob(".staging-*"))


def test_killed_build_leaves_current_serving(tmp_path, tiny_model_dir, small_corpus_path):
    root = tmp_path / "root"
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root))
    before = _snapshot(root)
    big = write_jsonl(tmp_path / "big.jsonl", [
        {"id": f"{i}", "text": f"Document {i} repeats the market story. " * 8} for i in range(3000)
    ])  # fmt: skip
    command = [sys.executable, "-m", "server.cli", "--quiet", "build", "--model",
               str(tiny_model_dir), "--data", str(big), "--out", str(root), "--max-length", "64",
               "--rank-in", "8", "--rank-out", "8"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((root / VERSIONS).glob(".staging-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    assert list((root / VERSIONS).glob(".staging-*")), "the build never staged a version"
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert _snapshot(root) == before
    engine = QueryEngine.open(root)
    assert engine.version == before[0]
    assert engine.query([Query("The market", " was busy", top_k=2)])[0].hits
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root))
    assert read_current(root) != before[0]
    assert not list((root / VERSIONS).glob(".staging-*"))


def test_info_on_a_manifest_without_the_index_file_is_one_line(tmp_path, published, capsys):
    root = tmp_path / "root"
    shutil.copytree(published, root)
    manifest = version_dir(root) / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["files"]["index.faiss"]
    manifest.write_text(json.dumps(data))
    assert main(["info", "--index", str(root)]) == 2
    err = capsys.readouterr().err
    assert "lists no index.faiss" in err and err.count("\n") == 1, err


def test_a_queries_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_bytes(b'\xff\xfe{"id": 1}\n')
    with pytest.raises(InvalidInputError, match=f"queries file {path} is not UTF-8"):
        read_queries(path)


def test_every_file_of_a_version_has_the_usual_mode(published):
    """A server may run as another user than the build: every file gets the mode `open` gives
    (0666 less the umask; safetensors alone would leave the curvature 0600)."""
    modes = {
        p.relative_to(version_dir(published)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in version_dir(published).rglob("*")
        if p.is_file()
    }
    assert len(set(modes.values())) == 1, modes


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(["--threads", "0", "info", "--index", str(tmp_path)]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_a_huge_query_is_refused_before_tokenization(published, monkeypatch):
    engine = QueryEngine.open(published)
    calls = []
    tokenizer = engine.loaded.tokenizer
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(1))
    with pytest.raises(InvalidInputError, match="characters, surely more than"):
        engine.prepare(Query("word " * 3_000_000, " x"))
    assert calls == []


def test_queries_are_framed_like_the_examples(tmp_path, tiny_model_dir, small_corpus_path):
    config = tiny_config(tiny_model_dir, small_corpus_path, tmp_path)
    framed = replace(config.corpus, prefix_tokens=("<|pad|>",))
    build_index(replace(config, corpus=framed))
    engine = QueryEngine.open(tmp_path)
    pad = engine.loaded.tokenizer.pad_token_id
    tokenized = engine.prepare(Query("The market", " was busy"))
    prompt = engine.loaded.tokenizer("The market", add_special_tokens=False)["input_ids"]
    assert tokenized.token_ids[: tokenized.loss_start] == [pad, *prompt]
    example = engine.metadata.lookup(
        [engine.query([Query("The market", " was busy")])[0].hits[0].example_id]
    )
    assert all(record.token_ids[0] == pad for record in example.values())
    assert engine.manifest.corpus.prefix_tokens == ("<|pad|>",)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root may mount one; skipped where it may not)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_current_serving(
    small_disk, tiny_model_dir, small_corpus_path, capsys
):
    root = small_disk / "root"
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root))
    before = _snapshot(root)
    base = ["--quiet", "build", "--model", str(tiny_model_dir), "--data", str(small_corpus_path),
            "--out", str(root), "--max-length", "64", "--rank-in", "8", "--rank-out", "8",
            "--incremental", "off"]  # fmt: skip
    scratch = before[1][INDEX_FILE].bytes  # about the scratch matrix of a full build
    ballast = small_disk / "ballast"
    # too little room for the scratch vectors, then for the index written after them
    for room in (scratch // 2, scratch + scratch // 2):
        ballast.unlink(missing_ok=True)
        disk = os.statvfs(small_disk)
        with ballast.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, disk.f_bavail * disk.f_frsize - room)
        assert main(base) == 2
        err = capsys.readouterr().err.strip()
        assert "disk full" in err and len(err.splitlines()) == 1, err
        assert not list((root / VERSIONS).glob(".staging-*"))
        assert _snapshot(root) == before


def test_an_error_chain_that_loops_is_not_taken_for_a_full_disk() -> None:
    """pymilvus raises its errors `from` themselves: following the chain never ended, and a
    build that met any Milvus error hung at 100 % CPU, holding ROOT's build lock."""
    error = RuntimeError("Milvus refused the insert")
    error.__cause__ = error
    answer: list[bool] = []
    checker = threading.Thread(target=lambda: answer.append(_disk_full(error)), daemon=True)
    checker.start()
    checker.join(timeout=10)
    assert answer == [False]


def test_auto_stores_exact_factors_for_a_gpt2_small_shape(tmp_path, monkeypatch) -> None:
    """GPT-2 small's 48 tracked modules need 1.53 GiB of exact-stage factors: stored by default
    where the disk has room (they used to be refused for "needing 17.9 GiB" of memory)."""
    from collections import namedtuple

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from indexer.build import exact_factors_bytes, store_exact_factors
    from indexer.model import tracked_modules

    with torch.device("meta"):  # shapes only: no weights are allocated
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12))
    modules = tracked_modules(model)
    # Per block: c_attn 769 -> 2304, attn c_proj 769 -> 768, c_fc 769 -> 3072, mlp c_proj
    # 3073 -> 768 (d_in counts the bias); U_A, U_B and Λ of each in float32.
    per_block = sum(i * i + o * o + o * i for i, o in [(769, 2304), (769, 768), (769, 3072)])
    per_block += 3073**2 + 768**2 + 768 * 3073
    assert len(modules) == 48 and exact_factors_bytes(modules) == 4 * 12 * per_block
    config = BuildConfig(model=tmp_path, out=tmp_path / "root", corpus=CorpusConfig("x"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("indexer.build.shutil.disk_usage", lambda _: usage(0, 0, 64 << 30))
    assert store_exact_factors(config, modules)
    monkeypatch.setattr("indexer.build.shutil.disk_usage", lambda _: usage(0, 0, 2 << 30))
    assert not store_exact_factors(config, modules)
    off = replace(config, store=StoreConfig(exact_rerank=False))
    assert not store_exact_factors(off, modules)
