"""Incremental rebuild against a full build of the same corpus (issue 9 target: ≤ 10 %).

    python -m benchmarks.incremental --documents 20000 --changed 0.01 --threads 1 [--out F]

A synthetic demo-style corpus (`benchmarks.common.synthetic_corpus`) is built in full with the
demo model through the real CLI (a subprocess each, timed from process start to exit); then a
fraction `--changed` of its documents changes (half edited, a quarter deleted, a quarter
replaced by new documents) and the same command builds again into the same root, which is an
incremental build (`--incremental`, so it fails rather than silently building in full).
Reported: both wall times and their phases, the ratio, and the reused/new/changed/deleted
counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.build_throughput import build_with_cli
from benchmarks.common import demo_artifacts, emit, synthetic_corpus


def change_documents(source: Path, target: Path, fraction: float) -> dict[str, int]:
    """Copy the corpus with `fraction` of its documents changed, spread evenly over it."""
    lines = source.read_text().splitlines()
    step = max(1, round(1 / fraction))
    counts = {"edited": 0, "deleted": 0, "added": 0}
    with target.open("w") as f:
        for i, line in enumerate(lines):
            record = json.loads(line)
            kind = ("edited", "edited", "deleted", "added")[(i // step) % 4]
            if i % step == 0:
                counts[kind] += 1
                if kind == "deleted":
                    continue
                if kind == "added":
                    record["id"] = f"new-{record['id']}"
                record["text"] += " Later that year the story changed again."
            f.write(json.dumps(record) + "\n")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of documents")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = demo_artifacts().model_dir
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "corpus.jsonl", args.documents)
        root = Path(tmp) / "root"
        options = ["--threads", str(args.threads)]

        def build(data: Path, extra: list[str]) -> tuple[dict, float]:
            return build_with_cli(
                model_dir, data, root, args.batch_size, args.threads, [*options, *extra]
            )

        full, full_wall = build(corpus, [])
        changed = Path(tmp) / "changed.jsonl"
        documents = change_documents(corpus, changed, args.changed)
        incremental, incremental_wall = build(changed, ["--incremental"])
    emit(
        {
            "benchmark": "incremental",
            "documents": args.documents,
            "documents_changed": documents,
            "torch_threads": args.threads,
            "full": {"wall_seconds": full_wall, "examples": full["n_examples"], **full},
            "incremental": {"wall_seconds": incremental_wall, **incremental},
            "ratio_incremental_vs_full_wall": incremental_wall / full_wall,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
