"""Per-process build throughput under torchrun against one process (issue 9 item 2).

    python -m benchmarks.distributed_throughput --documents 4000 --repeats 2 [--out F]

Builds the same corpus (demo model and generator) in one process and under `torchrun
--standalone --nproc-per-node N` (gloo, CPU), alternately, `--repeats` times each, every
process with one torch thread, each into a fresh ROOT. Per-process throughput = the examples
rank 0 sketched (row k goes to rank k mod N) / its sketch phase seconds, from the `--json`
summary (rank 0's). Goal: torchrun's >= 0.8x one process's. The 1-minute load average is
recorded around every run: on a shared machine the ratio is only as good as the load was even;
the CPU seconds of all the build's processes (whole build, not only the sketch) are recorded
too, since contention stretches wall time but hardly the work done.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.build_throughput import build_with_cli
from benchmarks.common import children_cpu_seconds, demo_artifacts, emit, synthetic_corpus

# Pinned, so that the result does not move with the defaults: sketching is what is measured.
BUILD_ARGS = ["--rank-in", "32", "--rank-out", "32", "--index-factory", "IDMap,SQ8",
              "--exact-rerank", "off", "--lexical-index", "off",
              "--incremental", "off"]  # fmt: skip


def launcher(nproc: int) -> tuple[str, ...]:
    """Interpreter arguments before `-m server.cli`: none for one process, torchrun otherwise."""
    if nproc == 1:
        return ()
    return ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc))


def run_once(model_dir: Path, corpus: Path, root: Path, nproc: int, batch_size: int) -> dict:
    """One build with `nproc` processes of one thread; rank 0's sketch rate in examples/s."""
    load_before, cpu_before = os.getloadavg(), children_cpu_seconds()
    summary, wall = build_with_cli(
        model_dir, corpus, root, batch_size, 1, BUILD_ARGS, launcher(nproc)
    )
    load_after, cpu = os.getloadavg(), children_cpu_seconds() - cpu_before
    sketched = len(range(0, summary["n_examples"], nproc))  # rank 0's rows
    phases = summary["seconds"]
    return {
        "nproc": nproc,
        "examples": summary["n_examples"],
        "rank0_examples": sketched,
        "phase_seconds": phases,
        "per_process_examples_per_second": sketched / phases["sketch"],
        "examples_per_second": summary["n_examples"] / phases["sketch"],
        "wall_seconds": wall,
        "build_cpu_seconds": cpu,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = demo_artifacts().model_dir
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "corpus.jsonl", args.documents)
        for i in range(2 * args.repeats):  # interleaved: contention drifts over minutes
            nproc = 1 if i % 2 == 0 else args.nproc
            root = Path(tmp) / f"root{i}"
            runs.append(run_once(model_dir, corpus, root, nproc, args.batch_size))
    rates = {
        n: [r["per_process_examples_per_second"] for r in runs if r["nproc"] == n]
        for n in (1, args.nproc)
    }
    emit(
        {
            "benchmark": "distributed_throughput",
            "documents": args.documents,
            "build_args": BUILD_ARGS,
            "runs": runs,
            "median_per_process_examples_per_second": {
                n: statistics.median(found) for n, found in rates.items()
            },
            "ratio_per_process": statistics.median(rates[args.nproc]) / statistics.median(rates[1]),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
