"""Content hashes: file digests (weights, published files) and stable int63s (ids, seeds)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_BLOCK_BYTES = 1 << 20


def sha256_files(paths: Iterable[Path]) -> str:
    """Hex sha256 over the files' bytes, concatenated in the given order, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            for block in iter(lambda f=f: f.read(_BLOCK_BYTES), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def int63(*parts: object) -> int:
    """A non-negative int63 that depends only on `parts` (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
