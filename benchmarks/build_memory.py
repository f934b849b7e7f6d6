"""Peak resident memory of a build at several corpus sizes (issue 9: bounded memory).

    python -m benchmarks.build_memory --documents 5000,20000 --threads 1 [--out F] \
        [-- extra build options, e.g. --lexical-index off]

Each size is a synthetic demo-style corpus (`benchmarks.common.synthetic_corpus`) built with
the demo model by its own `influence-index build` subprocess; its peak RSS (VmHWM, which counts
mapped file pages too) is read from that child alone (`os.wait4`). The slope between sizes is
what the build holds per example.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import demo_artifacts, emit, synthetic_corpus


def build_peak_rss(command: list[str], threads: int) -> tuple[dict, float, float]:
    """Run a build; its summary, peak RSS in MiB and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"build failed: {err.read()}")
        out.seek(0)
        return json.loads(out.read()), usage.ru_maxrss / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", default="5000,20000", help="comma-separated sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("build_args", nargs="*", help="extra `build` options, after --")
    args = parser.parse_args()
    model_dir = demo_artifacts().model_dir
    runs = []
    for documents in (int(n) for n in args.documents.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            corpus = synthetic_corpus(Path(tmp) / "corpus.jsonl", documents)
            command = [sys.executable, "-m", "server.cli", "--quiet", "--threads",
                       str(args.threads), "build", "--model", str(model_dir), "--data",
                       str(corpus), "--out", str(Path(tmp) / "root"), "--json",
                       *args.build_args]  # fmt: skip
            summary, peak, wall = build_peak_rss(command, args.threads)
        runs.append(
            {
                "documents": documents,
                "examples": summary["n_examples"],
                "peak_rss_mib": peak,
                "wall_seconds": wall,
                "phase_seconds": summary["seconds"],
            }
        )
    first, last = runs[0], runs[-1]
    slope = (last["peak_rss_mib"] - first["peak_rss_mib"]) / (last["examples"] - first["examples"])
    emit(
        {
            "benchmark": "build_memory",
            "build_args": args.build_args,
            "torch_threads": args.threads,
            "runs": runs,
            "peak_rss_kib_per_example": slope * 1024,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
