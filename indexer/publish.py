"""Versioned publishing: stage a version, checksum it, rename it in, swap CURRENT atomically.

A reader only ever sees complete versions: the version directory appears by one rename after
every file and the manifest are written and fsynced, and CURRENT changes by one more rename.
A build that dies at any point leaves CURRENT and every published version untouched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from indexer.errors import IndexVerificationError, InvalidInputError, NotFoundError
from indexer.store import MANIFEST_FILE

FORMAT_VERSION = 1
CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING_PREFIX = ".staging-"
REQUIRED_MANIFEST_KEYS = (
    "format_version", "version", "created", "model", "modules", "sketch", "curvature", "corpus",
    "score", "index_factory", "nprobe", "dim", "vectors_stored", "counts", "files",
)  # fmt: skip


def new_version_id() -> str:
    """Sortable by time: `20261128T010203123456Z-1a2b3c`."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def write_manifest(staging: Path, manifest: dict) -> dict:
    """Add the sha256 of every file in `staging` and write manifest.json (fsynced)."""
    files = sorted(p for p in staging.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    for path in files:
        with path.open("rb") as f:
            os.fsync(f.fileno())
    full = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    target = staging / MANIFEST_FILE
    with target.open("w") as f:
        json.dump(full, f, indent=2, sort_keys=True)
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
    path = Path(root) / VERSIONS / version_id
    if not path.is_dir():
        raise NotFoundError(f"version {version_id} not found in {root}")
    return path


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as e:
        raise IndexVerificationError(f"{path.name}: unreadable manifest ({e})") from e
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise IndexVerificationError(f"{path.name}: manifest lacks {', '.join(missing)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexVerificationError(
            f"{path.name}: format version {manifest.get('format_version')} is not "
            f"{FORMAT_VERSION}, which this code reads"
        )
    return manifest


def verify_version(path: Path) -> dict:
    """Check every file against the manifest's sha256; return the manifest."""
    started = time.monotonic()
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise IndexVerificationError(f"{path.name}: {name} is missing")
        if sha256_file(file) != expected["sha256"]:
            raise IndexVerificationError(f"{path.name}: {name} does not match its sha256")
    manifest["verify_seconds"] = time.monotonic() - started
    return manifest
