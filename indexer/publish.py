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
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from indexer.errors import IndexVerificationError, InvalidInputError, NotFoundError
from indexer.hashing import sha256_file
from indexer.manifest import MANIFEST_FILE, FileRecord, Manifest

CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING_PREFIX = ".staging-"


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
    """Record the sha256 of every file in `staging` and write manifest.json (all fsynced)."""
    files = sorted(p for p in staging.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    for path in files:
        with path.open("rb") as f:
            os.fsync(f.fileno())
    full = manifest.with_files(
        {p.name: FileRecord(sha256_file(p), p.stat().st_size) for p in files}
    )
    with (staging / MANIFEST_FILE).open("w") as f:
        f.write(full.to_json())
        f.flush()
        os.fsync(f.fileno())
    return full


def publish(root: Path, staging: Path, version_id: str, keep_versions: int) -> Path:
    """Rename the staged version in, then point CURRENT at it; prune old versions."""
    final = root / VERSIONS / version_id
    os.rename(staging, final)
    _fsync_dir(root / VERSIONS)
    pointer = root / f".{CURRENT}.{os.getpid()}.tmp"
    with pointer.open("w") as f:
        f.write(version_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / CURRENT)
    _fsync_dir(root)
    prune(root, keep_versions)
    return final


def prune(root: Path, keep_versions: int) -> list[str]:
    """Delete all but the newest `keep_versions` versions; never the one CURRENT names."""
    current = read_current(root)
    versions = sorted(list_versions(root), reverse=True)
    doomed = [v for v in versions[max(keep_versions, 1) :] if v != current]
    for version in doomed:
        shutil.rmtree(root / VERSIONS / version, ignore_errors=True)
    return doomed


def list_versions(root: Path) -> list[str]:
    base = root / VERSIONS
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_current(root: Path) -> str | None:
    """The published version id, or None when nothing is published yet."""
    try:
        return (Path(root) / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def version_dir(root: Path, version_id: str | None = None) -> Path:
    """The directory of `version_id` (default: CURRENT's)."""
    version_id = version_id or read_current(root)
    if version_id is None:
        raise NotFoundError(f"no published index in {root} (no CURRENT file)")
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


def verify_version(path: Path) -> Manifest:
    """Check the version against its format: the manifest is well formed, lists every file the
    format requires, and every listed file is a regular file inside `path` matching its sha256."""
    if path.is_symlink() or not path.is_dir():
        raise IndexVerificationError(f"{path.name}: not a version directory (or a symlink)")
    manifest = read_manifest(path)
    unlisted = [name for name in manifest.required_files() if name not in manifest.files]
    if unlisted:
        raise IndexVerificationError(
            f"{path.name}: manifest does not list {', '.join(unlisted)}, which the format requires"
        )
    for name, expected in manifest.files.items():
        file = _regular_file(path, name)
        if file.stat().st_size != expected.bytes or sha256_file(file) != expected.sha256:
            raise IndexVerificationError(f"{path.name}: {name} does not match its sha256")
    return manifest


def _regular_file(version: Path, name: str) -> Path:
    """`version/name`, refused unless `name` is a plain file name and the file is a regular,
    non-symlinked file."""
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise IndexVerificationError(f"{version.name}: file name {name!r} leaves the version")
    file = version / name
    try:
        mode = file.lstat().st_mode
    except FileNotFoundError:
        raise IndexVerificationError(f"{version.name}: {name} is missing") from None
    if not stat.S_ISREG(mode):
        raise IndexVerificationError(f"{version.name}: {name} is not a regular file (symlink?)")
    return file
