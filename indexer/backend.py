"""Which store holds a root's published versions: FAISS files (the default) or Milvus.

Kept apart from `indexer.publish`, which only knows the `Pointers` protocol, so that neither
module imports the other and pymilvus is imported only when the Milvus backend is asked for.
"""

from __future__ import annotations

from pathlib import Path

from indexer.config import Backend, BackendConfig
from indexer.publish import FilePointers, Pointers


def open_pointers(root: Path, backend: BackendConfig | None = None) -> Pointers:
    """The pointers of ROOT under `backend` (default: FAISS's files); connects to Milvus."""
    if backend is None or backend.backend == Backend.FAISS:
        return FilePointers(root)
    from indexer.milvus import MilvusBackend

    return MilvusBackend.connect(backend, root)
