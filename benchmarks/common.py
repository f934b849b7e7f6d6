"""Helpers shared by the benchmark scripts: the demo artefacts, synthetic corpora, RSS, JSON."""

from __future__ import annotations

import json
import logging
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import faiss
import torch

from indexer.demo.corpus import generate_corpus
from indexer.demo.train import DemoArtifacts, ensure_demo_model

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
T = TypeVar("T")


def demo_artifacts() -> DemoArtifacts:
    return ensure_demo_model(CACHE / "demo", progress=False)


def synthetic_corpus(path: Path, n_documents: int) -> Path:
    """`n_documents` demo-style documents from successive generator seeds, unique ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        written, seed = 0, 0
        while written < n_documents:
            for doc in generate_corpus(seed=seed).documents:
                if written == n_documents:
                    break
                f.write(json.dumps({"id": f"s{seed}-{doc['id']}", "text": doc["text"]}) + "\n")
                written += 1
            seed += 1
    return path


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident set size in MiB of this process (or of its waited-for children)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def status_mib(field: str, pid: int | str = "self") -> float:
    """A memory figure of a process (this one by default) from its /proc status, in MiB:
    e.g. `RssAnon` (private), `RssFile` (mapped files' pages), `VmHWM` (peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for descendants so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def comma_list(kind: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """An argparse type of comma-separated `kind` values: `"1,2"` -> `(1, 2)`, `""` -> `()`."""
    return lambda text: tuple(kind(v) for v in text.split(",") if v)


comma_ints = comma_list(int)
comma_floats = comma_list(float)


def start_run(threads: int) -> None:
    """What a benchmark sets before it measures: `threads` torch and FAISS threads, INFO logs."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def emit(result: dict, out: Path | None) -> None:
    """Print the result as JSON and, when asked, write it to a file too."""
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if out is not None:
        out.write_text(text + "\n")
