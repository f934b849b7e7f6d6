"""Incremental builds: unchanged examples keep their vectors, the answers are a full build's,
and what cannot be reused is said in one line (exit 2 when `--incremental` was explicit)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import pytest

import indexer.build
from indexer.build import BuildSummary, build_index
from indexer.config import Autocast, IncrementalConfig, IncrementalMode
from indexer.curvature import Curvature, FittedCurvature
from indexer.engine import QueryEngine
from indexer.errors import IndexVerificationError, InvalidInputError
from indexer.manifest import CURVATURE_FILE, FULL_CURVATURE_FILE, METADATA_FILE
from indexer.publish import read_current, verify_version, version_dir
from indexer.query import Query
from indexer.store import FLAT_FACTORY
from server.cli import main
from tests.conftest import write_jsonl
from tests.test_build import code_step, tiny_config
from tests.test_calibration import assert_bound_of_separate_passes


@dataclass
class Builds:
    root: Path  # a full build of the first corpus, then an incremental one of the second
    first: str
    second: BuildSummary
    full_root: Path  # a full build of the second corpus with the first build's curvature
    corpus: Path  # the second corpus


def _edited(documents: list[dict]) -> list[dict]:
    """Two documents changed, two deleted, two added (all short: one example each)."""
    short = [d for d in documents if len(d["text"]) < 100]
    changed = {short[0]["id"], short[1]["id"]}
    deleted = {short[2]["id"], short[3]["id"]}
    kept = [
        {**d, "text": d["text"] + " It was also raining."} if d["id"] in changed else d
        for d in documents
        if d["id"] not in deleted
    ]
    added = [{"id": f"new-{i}", "text": f"A new market opened in town number {i}."} for i in (1, 2)]
    return kept + added


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_model_dir, small_corpus_path, small_corpus) -> Builds:
    tmp = tmp_path_factory.mktemp("incremental")
    root = tmp / "root"
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root))
    first = read_current(root)
    corpus = write_jsonl(tmp / "edited.jsonl", _edited(small_corpus))
    second = build_index(tiny_config(tiny_model_dir, corpus, root))
    full_root = tmp / "full"
    previous = version_dir(root, first)
    same_curvature = FittedCurvature(
        Curvature.load(previous / CURVATURE_FILE), Curvature.load(previous / FULL_CURVATURE_FILE)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(indexer.build, "fit_curvature", lambda *args, **kwargs: same_curvature)
        build_index(tiny_config(tiny_model_dir, corpus, full_root))
    return Builds(root, first, second, full_root, corpus)


def _codes(engine: QueryEngine, rows: np.ndarray) -> np.ndarray:
    """The stored bytes `[len(rows), code_size]` of `rows` of an `IDMap` flat-code index."""
    inner = faiss.downcast_index(engine.index.index)
    codes = faiss.rev_swig_ptr(inner.codes.data(), inner.ntotal * inner.code_size)
    return codes.reshape(inner.ntotal, inner.code_size)[rows]


def _ranges(engine: QueryEngine) -> np.ndarray:
    """The scalar quantiser's trained `[2, D]`: vmin and vdiff per dimension."""
    sq = faiss.downcast_index(engine.index.index).sq
    return faiss.vector_to_array(sq.trained).reshape(2, -1)


def test_incremental_build_reuses_unchanged_vectors(builds):
    summary = builds.second
    assert summary.mode == "incremental" and summary.built_from == builds.first
    assert (summary.new, summary.changed, summary.deleted) == (2, 2, 2)
    assert summary.reused == summary.n_examples - 4
    before = QueryEngine.open(builds.root, version=builds.first)
    after = QueryEngine.open(builds.root)
    assert after.manifest.built_from == builds.first
    assert after.manifest.curvature_fit.changed_since == 6
    old, new = (
        engine.metadata._con.execute(
            'SELECT id, content_hash, norm FROM examples ORDER BY "row"'
        ).fetchnumpy()
        for engine in (before, after)
    )
    _, old_rows, new_rows = np.intersect1d(old["id"], new["id"], return_indices=True)
    unchanged = old["content_hash"][old_rows] == new["content_hash"][new_rows]
    assert unchanged.sum() == summary.reused
    old_rows, new_rows = old_rows[unchanged], new_rows[unchanged]
    # 8-bit codes (a byte a dimension), encoded again with the previous version's ranges: the
    # same bytes in every dimension whose range the new examples did not have to widen
    assert after.manifest.index_factory == FLAT_FACTORY == "IDMap,SQ8"
    kept = np.all(_ranges(before) == _ranges(after), axis=0)
    assert kept.mean() > 0.9, kept.mean()  # 0.98 here: 11 of 512 dimensions widened
    assert np.array_equal(_codes(before, old_rows)[:, kept], _codes(after, new_rows)[:, kept])
    assert np.array_equal(old["norm"][old_rows], new["norm"][new_rows])
    # the curvature is CURRENT's, shared by a hard link; the old version is untouched
    shared = version_dir(builds.root) / CURVATURE_FILE
    assert shared.stat().st_nlink == 2
    original = version_dir(builds.root, builds.first) / CURVATURE_FILE
    assert shared.stat().st_ino == original.stat().st_ino
    verify_version(version_dir(builds.root, builds.first))


def test_incremental_answers_equal_a_full_build_with_the_same_curvature(builds):
    incremental, full = QueryEngine.open(builds.root), QueryEngine.open(builds.full_root)
    previous = QueryEngine.open(builds.root, version=builds.first)
    assert full.manifest.built_from is None
    expected, found = full.vectors.preconditioned[:], incremental.vectors.preconditioned[:]
    # Each index has its own 8-bit ranges (the full build's fitted on the edited corpus) and
    # rounds a value by half a code step at most: one step apart. Where the incremental build
    # widened the previous range, its reused codes were rounded once more: 1.5 steps.
    widened = np.any(_ranges(previous) != _ranges(incremental), axis=0)
    step = np.maximum(code_step(full), code_step(incremental)) * np.where(widened, 1.5, 1.0)
    assert np.allclose(found, expected, rtol=2e-3, atol=step + 2e-3 * np.abs(expected).max())
    queries = [
        Query("The market", " was busy", top_k=5, rerank_depth=0),
        Query("A new market opened in", " town", top_k=5),  # re-ranked exactly
    ]
    for a, b in zip(incremental.query(queries), full.query(queries), strict=True):
        assert [h.example_id for h in a.hits] == [h.example_id for h in b.hits]
        assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits], rel=1e-3)


def test_an_incremental_calibration_passes_over_the_reused_candidates(builds):
    """The main pass scored the new and changed examples exactly for the calibration; the
    reused candidates are scored apart: the bound is the one passes over them all fit."""
    assert_bound_of_separate_passes(builds.root)


def test_a_refit_is_a_full_build_saying_why(builds, tiny_model_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(builds.root, root)
    refit = IncrementalConfig(refit_threshold=0.01)
    config = replace(tiny_config(tiny_model_dir, builds.corpus, root), incremental=refit)
    summary = build_index(config)  # 6 changes since the fit: over 1 % of the corpus
    assert summary.mode == "full" and summary.built_from is None
    assert "--refit-threshold 0.01" in summary.full_reason
    manifest = verify_version(version_dir(root))
    assert manifest.curvature_fit.changed_since == 0
    assert manifest.curvature_fit.examples == summary.n_examples


def test_vectors_of_another_precision_are_not_reused(builds, tiny_model_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(builds.root, root)
    config = replace(tiny_config(tiny_model_dir, builds.corpus, root), autocast=Autocast.BF16)
    summary = build_index(config)
    assert summary.mode == "full" and "autocast" in summary.full_reason
    assert verify_version(version_dir(root)).autocast == Autocast.BF16


def test_explicit_incremental_against_an_unusable_current_exits_2(
    builds, tiny_model_dir, tmp_path, capsys
):
    root = tmp_path / "root"
    shutil.copytree(builds.root, root)
    base = ["--quiet", "build", "--model", str(tiny_model_dir), "--data", str(builds.corpus),
            "--out", str(root), "--max-length", "64", "--rank-in", "8", "--rank-out", "8",
            "--incremental"]  # fmt: skip
    before = read_current(root)
    cases = {
        "was built with other curvature settings": ["--damping", "0.2"],
        "was built with other sketch settings": ["--seed", "3"],
        "was built with other score kind": ["--score", "influence"],
    }
    for message, override in cases.items():
        assert main([*base, *override]) == 2, message
        err = capsys.readouterr().err.strip()
        assert "cannot build incrementally" in err and message in err, err
        assert len(err.splitlines()) == 1
    with (version_dir(root) / METADATA_FILE).open("r+b") as f:
        f.seek(100)
        f.write(b"corrupt")
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "CURRENT does not verify" in err and len(err.splitlines()) == 1, err
    assert read_current(root) == before


def test_a_model_config_change_is_a_full_build_and_the_old_version_refuses_it(
    builds, tiny_model_dir, tmp_path
):
    """The same weights under another config.json (here another activation) give other
    gradients: nothing is reused, and a version built before the change will not serve it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config_file = model / "config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "activation_function": "relu"})
    )
    with pytest.raises(IndexVerificationError, match="model config"):
        QueryEngine.open(builds.root, model_dir=model)
    root = tmp_path / "root"
    shutil.copytree(builds.root, root)
    summary = build_index(tiny_config(model, builds.corpus, root))
    assert summary.mode == "full" and "model config" in summary.full_reason


def test_auto_incremental_against_a_current_naming_no_version_is_a_full_build(
    builds, tiny_model_dir, tmp_path
):
    root = tmp_path / "root"
    shutil.copytree(builds.root, root)
    shutil.rmtree(version_dir(root))
    summary = build_index(tiny_config(tiny_model_dir, builds.corpus, root))
    assert summary.mode == "full" and "CURRENT does not verify" in summary.full_reason
    assert read_current(root) == summary.version


def test_explicit_incremental_with_nothing_published_is_refused(tiny_model_dir, tmp_path, builds):
    config = tiny_config(tiny_model_dir, builds.corpus, tmp_path / "root")
    on = replace(config, incremental=IncrementalConfig(IncrementalMode.ON))
    with pytest.raises(InvalidInputError, match="nothing published yet"):
        build_index(on)
    assert read_current(tmp_path / "root") is None
