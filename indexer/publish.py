"""Versioned publishing: stage a version, checksum it, rename it in, swap CURRENT atomically.

A reader only ever sees complete versions: the version directory appears by one rename after
every file and the manifest are written and fsynced, and CURRENT changes by one more rename.
A build that dies at any point leaves CURRENT and every published version untouched.

Verification starts from the version format, not from what the manifest claims: every file
the format requires must be listed and match its sha256, listed names stay inside the version
directory, nothing is a symlink, and the version's id is its directory's name.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from indexer.errors import IndexVerificationError, InvalidInputError, NotFoundError
from indexer.hashing import sha256_file
from indexer.manifest import MANIFEST_FILE, FileRecord, Manifest

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
PINNED = "PINNED"
VERSIONS = "versions"
STAGING_PREFIX = ".staging-"


class Pointers(Protocol):
    """Where CURRENT and PINNED live: files of ROOT (`FilePointers`, FAISS) or collection
    aliases (`indexer.milvus.MilvusBackend`). Either changes atomically."""

    def read(self, name: str) -> str | None: ...

    def write(self, name: str, version_id: str) -> None: ...

    def clear(self, name: str) -> None: ...

    def drop(self, version_id: str) -> None:
        """Release what a pruned version holds outside its directory."""


class FilePointers:
    """CURRENT and PINNED as files of ROOT, each replaced by one atomic rename."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def read(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text().strip() or None
        except FileNotFoundError:
            return None

    def write(self, name: str, version_id: str) -> None:
        # Processes of two containers sharing ROOT may both be pid 1: the name is random too.
        pointer = self.root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        with pointer.open("w") as f:
            f.write(version_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, self.root / name)
        _fsync_dir(self.root)

    def clear(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)
        _fsync_dir(self.root)

    def drop(self, version_id: str) -> None:
        """A FAISS version is all in its directory."""


def _pointers(root: Path, pointers: Pointers | None) -> Pointers:
    return FilePointers(root) if pointers is None else pointers


def new_version_id() -> str:
    """Sortable by time: `20261128T010203123456Z-1a2b3c`."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable(root: Path) -> None:
    """Fail early, with the path in the message, if ROOT cannot hold a new version."""
    try:
        (root / VERSIONS).mkdir(parents=True, exist_ok=True)
        probe = root / VERSIONS / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InvalidInputError(f"output directory is not writable: {root} ({e.strerror})") from e


@contextmanager
def pointer_lock(root: Path) -> Iterator[None]:
    """Serialise what reads the versions and then moves a pointer or deletes versions
    (publish's swap and prune, rollback, pin), so that none of them points CURRENT or
    PINNED at a version another is deleting. Held for milliseconds; waits its turn."""
    if not Path(root).is_dir():
        raise NotFoundError(f"no index root at {root}")
    try:
        lock = (Path(root) / ".pointers.lock").open("w")
    except OSError as e:
        raise InvalidInputError(f"cannot lock {root} to move its pointers ({e.strerror})") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """One build per ROOT at a time; stale staging dirs of dead builds are removed."""
    with (root / ".build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise InvalidInputError(f"another build is running in {root}") from e
        for stale in (root / VERSIONS).glob(STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def staging_dir(root: Path, version_id: str) -> Path:
    path = root / VERSIONS / (STAGING_PREFIX + version_id)
    path.mkdir()
    return path


def write_manifest(staging: Path, manifest: Manifest) -> Manifest:
    """Record the sha256 of every file in `staging` and write manifest.json (all fsynced, the
    directories' entries too, so that a crash after the rename cannot lose a file)."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    for path in files:
        with path.open("rb") as f:
            os.fsync(f.fileno())
    full = manifest.with_files(
        {
            p.relative_to(staging).as_posix(): FileRecord(sha256_file(p), p.stat().st_size)
            for p in files
        }
    )
    with (staging / MANIFEST_FILE).open("w") as f:
        f.write(full.to_json())
        f.flush()
        os.fsync(f.fileno())
    for directory in [*(p for p in staging.rglob("*") if p.is_dir()), staging]:
        _fsync_dir(directory)
    return full


def publish(
    root: Path,
    staging: Path,
    version_id: str,
    keep_versions: int,
    pointers: Pointers | None = None,
) -> Path:
    """Rename the staged version in, then point CURRENT at it; prune old versions (a failure
    there is a warning: the version is published)."""
    final = root / VERSIONS / version_id
    os.rename(staging, final)
    _fsync_dir(root / VERSIONS)
    pointers = _pointers(root, pointers)
    with pointer_lock(root):
        pointers.write(CURRENT, version_id)
        try:
            prune(root, keep_versions, pointers)
        except Exception as e:
            log.warning("published %s, but pruning old versions failed: %s", version_id, e)
    return final


def discard_unpublished(
    root: Path, staging: Path, version_id: str, pointers: Pointers | None = None
) -> bool:
    """After a failed build: remove its staged or renamed-in version unless CURRENT names it.
    Returns whether it was removed (False: published, or CURRENT unreadable, so kept)."""
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        return True
    try:
        if _pointers(root, pointers).read(CURRENT) == version_id:
            return False
    except Exception:
        return False
    shutil.rmtree(root / VERSIONS / version_id, ignore_errors=True)
    return True


def prune(root: Path, keep_versions: int, pointers: Pointers | None = None) -> list[str]:
    """Delete versions until at most `keep_versions` remain; returns the deleted ids.

    Never deletes CURRENT's or PINNED's version. The others keep their places in this order:
    the last-good version (the rollback target; so it survives whenever `keep_versions` >= 2),
    then the other valid versions by manifest creation time, newest first (not by name);
    invalid versions (which servers refuse too) are deleted before any valid one. Verifies the
    candidates' checksums, so it reads every version once when there are too many.
    """
    entries = version_entries(root)
    keep = max(keep_versions, 1)
    if len(entries) <= keep:
        return []
    pointers = _pointers(root, pointers)
    fixed = {pointers.read(CURRENT), pointers.read(PINNED)} & {e.id for e in entries}
    good = last_good(root, pointers)
    ranked = [good] if good is not None and good not in fixed else []
    ranked += [e.id for e in entries if e.id not in fixed | {good} and _is_valid(root, e)]
    kept = fixed | set(ranked[: max(keep - len(fixed), 0)])
    doomed = [e.id for e in reversed(entries) if e.id not in kept]
    for version in doomed:
        shutil.rmtree(root / VERSIONS / version, ignore_errors=True)
        pointers.drop(version)
    return doomed


def list_versions(root: Path) -> list[str]:
    base = root / VERSIONS
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_current(root: Path, pointers: Pointers | None = None) -> str | None:
    """The published version id, or None when nothing is published yet."""
    return _pointers(root, pointers).read(CURRENT)


def read_pinned(root: Path, pointers: Pointers | None = None) -> str | None:
    """The version PINNED makes every server serve, or None when nothing is pinned."""
    return _pointers(root, pointers).read(PINNED)


def pin(root: Path, version_id: str, pointers: Pointers | None = None) -> Manifest:
    """Verify the version, then make every server of ROOT serve it (PINNED)."""
    with pointer_lock(root):
        manifest = verify_version(version_dir(root, version_id))
        _pointers(root, pointers).write(PINNED, version_id)
    return manifest


def clear_pin(root: Path, pointers: Pointers | None = None) -> str | None:
    """Remove PINNED (servers follow CURRENT again); returns the version it pinned."""
    pointers = _pointers(root, pointers)
    with pointer_lock(root):
        pinned = pointers.read(PINNED)
        pointers.clear(PINNED)
    return pinned


@dataclass(frozen=True)
class VersionEntry:
    """A version directory and its manifest's creation time (None: unreadable manifest)."""

    id: str
    created: datetime | None


def version_entries(root: Path) -> list[VersionEntry]:
    """Every version in ROOT, newest first by manifest creation time; unreadable ones last."""
    entries = []
    for version in list_versions(root):
        try:
            created = datetime.fromisoformat(read_manifest(root / VERSIONS / version).created)
        except (IndexVerificationError, ValueError):
            entries.append(VersionEntry(version, None))
            continue
        # A naive time would not compare with aware ones; the builder writes UTC.
        entries.append(
            VersionEntry(version, created.replace(tzinfo=created.tzinfo or timezone.utc))
        )
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(entries, key=lambda e: (e.created or epoch, e.id), reverse=True)


def last_good(root: Path, pointers: Pointers | None = None) -> str | None:
    """The newest valid version created before CURRENT's (any other, when CURRENT's manifest
    is unreadable): what `rollback` goes back to and `prune` keeps."""
    current = read_current(root, pointers)
    entries = version_entries(root)
    mine = next((e.created for e in entries if e.id == current), None)
    older = [e for e in entries if e.id != current and (mine is None or _before(e, mine))]
    return next((e.id for e in older if _is_valid(root, e)), None)


@dataclass(frozen=True)
class Rollback:
    previous: str | None  # what CURRENT named before
    current: str
    pinned: str | None  # a pin overrides CURRENT on every server


def rollback(root: Path, to: str | None = None, pointers: Pointers | None = None) -> Rollback:
    """Point CURRENT at `to` (verified first) or at the last-good version, atomically."""
    with pointer_lock(root):
        return _rollback(root, to, _pointers(root, pointers))


def _rollback(root: Path, to: str | None, pointers: Pointers) -> Rollback:
    previous = pointers.read(CURRENT)
    if to is None:
        to = last_good(root, pointers)
        if to is None:
            older = f" older than CURRENT's ({previous})" if previous else ""
            raise NotFoundError(f"no valid version in {root}{older} to roll back to")
    else:
        verify_version(version_dir(root, to))
    if to == previous:
        raise InvalidInputError(f"CURRENT already names {to}")
    pointers.write(CURRENT, to)
    return Rollback(previous, to, pointers.read(PINNED))


def _before(entry: VersionEntry, when: datetime) -> bool:
    return entry.created is not None and entry.created < when


def _is_valid(root: Path, entry: VersionEntry) -> bool:
    if entry.created is None:
        return False
    try:
        verify_version(root / VERSIONS / entry.id)
    except (IndexVerificationError, OSError):
        return False
    return True


def version_dir(
    root: Path, version_id: str | None = None, pointers: Pointers | None = None
) -> Path:
    """The directory of `version_id` (default: CURRENT's)."""
    version_id = version_id or read_current(root, pointers)
    if version_id is None:
        raise NotFoundError(f"no published index in {root} (no CURRENT)")
    if Path(version_id).name != version_id or version_id.startswith("."):
        raise NotFoundError(f"{version_id!r} is not a version id")
    path = Path(root) / VERSIONS / version_id
    if not path.is_dir():
        raise NotFoundError(f"version {version_id} not found in {root}")
    return path


def read_manifest(path: Path) -> Manifest:
    """The manifest of the version in `path`, checked for form (not against the files)."""
    try:
        text = _regular_file(path, MANIFEST_FILE).read_text()
    except OSError as e:
        raise IndexVerificationError(f"{path.name}: unreadable manifest ({e})") from e
    try:
        return Manifest.from_json(text)
    except IndexVerificationError as e:
        raise IndexVerificationError(f"{path.name}: {e}") from e


def verify_version(path: Path, skip: Collection[str] = ()) -> Manifest:
    """Check the version against its format: the manifest is well formed, lists every file the
    format requires, and every listed file is a regular file inside `path` matching its sha256
    (but those named in `skip`: a reader that does not open them need not read them)."""
    if path.is_symlink() or not path.is_dir():
        raise IndexVerificationError(f"{path.name}: not a version directory (or a symlink)")
    manifest = read_manifest(path)
    unlisted = [name for name in manifest.required_files() if name not in manifest.files]
    if unlisted:
        raise IndexVerificationError(
            f"{path.name}: manifest does not list {', '.join(unlisted)}, which the format requires"
        )
    for name, expected in manifest.files.items():
        if name in skip:
            continue
        file = _regular_file(path, name)
        if file.stat().st_size != expected.bytes or sha256_file(file) != expected.sha256:
            raise IndexVerificationError(f"{path.name}: {name} does not match its sha256")
    return manifest


def _regular_file(version: Path, name: str) -> Path:
    """`version/name`, refused unless `name` is a plain file name (or `dir/name`, one level of
    plain names) and every part of it is a real directory or regular file, never a symlink."""
    parts = name.split("/")
    if len(parts) > 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise IndexVerificationError(f"{version.name}: file name {name!r} leaves the version")
    path = version
    for depth, part in enumerate(parts, start=1):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise IndexVerificationError(f"{version.name}: {name} is missing") from None
        expected = stat.S_ISREG(mode) if depth == len(parts) else stat.S_ISDIR(mode)
        if not expected:
            raise IndexVerificationError(f"{version.name}: {name} is not a regular file (symlink?)")
    return path
