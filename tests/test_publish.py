"""A published version is verified from its format, not from what its manifest claims."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from indexer.build import build_index
from indexer.engine import QueryEngine
from indexer.errors import IndexVerificationError, ResourceLimitError
from indexer.hashing import sha256_file
from indexer.manifest import FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, Manifest
from indexer.publish import (
    CURRENT,
    VERSIONS,
    FilePointers,
    read_current,
    read_manifest,
    verify_version,
    write_manifest,
)
from tests.test_build import tiny_config


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir, small_corpus_path) -> Path:
    root = tmp_path_factory.mktemp("index")
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root))
    return root


@pytest.fixture
def copy(published: Path, tmp_path: Path) -> Path:
    """A private copy of the published version, under another name."""
    target = tmp_path / VERSIONS / "copied-version"
    shutil.copytree(published / VERSIONS / read_current(published), target)
    (tmp_path / CURRENT).write_text("copied-version\n")
    return target


def _edit_manifest(version: Path, edit) -> None:
    data = json.loads((version / MANIFEST_FILE).read_text())
    edit(data)
    (version / MANIFEST_FILE).write_text(json.dumps(data))


def test_manifest_round_trips_through_json(published: Path) -> None:
    manifest = read_manifest(published / VERSIONS / read_current(published))
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert set(manifest.required_files()) <= set(manifest.files)


def test_the_version_id_is_the_directory_name(copy: Path) -> None:
    engine = QueryEngine.open(copy.parent.parent)
    assert engine.version == engine.info.version == "copied-version"
    engine.close()


def test_a_required_file_left_out_of_the_manifest_is_refused(copy: Path) -> None:
    _edit_manifest(copy, lambda data: data["files"].pop(INDEX_FILE))
    with (copy / INDEX_FILE).open("r+b") as f:
        f.write(b"corrupt")
    with pytest.raises(IndexVerificationError, match=r"does not list index\.faiss"):
        verify_version(copy)


def test_names_that_leave_the_version_are_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    record = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}
    _edit_manifest(copy, lambda data: data["files"].update({"../../outside.txt": record}))
    with pytest.raises(IndexVerificationError, match="leaves the version"):
        verify_version(copy)


def test_symlinked_files_are_refused(copy: Path, tmp_path: Path) -> None:
    moved = tmp_path / "index-elsewhere.faiss"
    shutil.move(copy / INDEX_FILE, moved)
    os.symlink(moved, copy / INDEX_FILE)
    with pytest.raises(IndexVerificationError, match="not a regular file"):
        verify_version(copy)


def test_a_manifest_of_another_format_is_refused(copy: Path) -> None:
    old = FORMAT_VERSION - 1
    _edit_manifest(copy, lambda data: data.update({"format_version": old}))
    with pytest.raises(IndexVerificationError, match=f"format version {old}"):
        verify_version(copy)
    _edit_manifest(
        copy, lambda data: data.update({"format_version": FORMAT_VERSION}) or data.pop("model")
    )
    with pytest.raises(IndexVerificationError, match="lacks model"):
        verify_version(copy)


def test_subdirectory_names_stay_inside_the_version(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    record = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}
    _edit_manifest(copy, lambda data: data["files"].update({"lexical/../../outside.txt": record}))
    with pytest.raises(IndexVerificationError, match="leaves the version"):
        verify_version(copy)


def test_every_directory_of_a_staged_version_is_fsynced(
    copy: Path, tmp_path: Path, monkeypatch
) -> None:
    """Its files alone are not enough: a crash after the rename could lose a directory entry."""
    staging = tmp_path / "staging"
    shutil.copytree(copy, staging)
    synced: set[Path] = set()
    fsync = os.fsync

    def record(fd: int) -> None:
        synced.add(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_manifest(staging, read_manifest(copy))
    directories = {staging, *(p for p in staging.rglob("*") if p.is_dir())}
    assert len(directories) > 1  # the lexical index is a directory of its own
    assert directories <= synced


def _failing_build(published: Path, tmp_path: Path, tiny_model_dir, small_corpus_path):
    """A copy of the published root, its state, and a build of it to call."""
    root = tmp_path / "root"
    shutil.copytree(published, root)
    state = (sorted(os.listdir(root / VERSIONS)), read_current(root))
    return root, state, lambda: build_index(tiny_config(tiny_model_dir, small_corpus_path, root))


def test_a_full_disk_when_current_moves_removes_the_new_version(
    published: Path, tmp_path: Path, tiny_model_dir, small_corpus_path, monkeypatch
) -> None:
    """The version is renamed in before CURRENT is written: a failure between the two used to
    leave it among the versions while the error said its files were removed."""
    root, before, build = _failing_build(published, tmp_path, tiny_model_dir, small_corpus_path)
    write = FilePointers.write

    def full_disk(self: FilePointers, name: str, version_id: str) -> None:
        if name == CURRENT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, name, version_id)

    monkeypatch.setattr(FilePointers, "write", full_disk)
    with pytest.raises(ResourceLimitError, match="its files are removed, CURRENT is unchanged"):
        build()
    assert (sorted(os.listdir(root / VERSIONS)), read_current(root)) == before


def test_a_failure_pruning_old_versions_leaves_the_build_published(
    published: Path, tmp_path: Path, tiny_model_dir, small_corpus_path, monkeypatch, caplog
) -> None:
    root, before, build = _failing_build(published, tmp_path, tiny_model_dir, small_corpus_path)

    def prune(*_args) -> list[str]:
        raise OSError(errno.EACCES, "permission denied")

    monkeypatch.setattr("indexer.publish.prune", prune)
    with caplog.at_level(logging.WARNING, logger="indexer.publish"):
        summary = build()
    assert read_current(root) == summary.version != before[1]
    verify_version(root / VERSIONS / summary.version)
    assert "pruning old versions failed" in caplog.text
