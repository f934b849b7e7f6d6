"""Build throughput next to a bare forward/backward pass over the same data.

    python -m benchmarks.build_throughput --documents 20000 [--out results.json]

The bare pass is what training costs: the demo model with parameter gradients, summed-NLL
loss, backward, same batches (same length-sorted order, batch size, float32). The build runs
as a subprocess of the real CLI so its peak RSS is its own. Ratio = bare seconds / build
seconds for the same tokens (goal >= 0.7).
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

import torch

from benchmarks.common import demo_artifacts, emit, peak_rss_mib, synthetic_corpus
from indexer.config import Autocast, CorpusConfig
from indexer.corpus import load_corpus
from indexer.model import load_model
from indexer.sketch import AUTOCAST_DTYPES, make_batch, summed_nll


def bare_forward_backward_seconds(
    model_dir: Path,
    corpus: Path,
    batch_size: int,
    device: str = "cpu",
    autocast: Autocast = Autocast.OFF,
) -> dict:
    """A training step without the optimizer over every example, on `device`, the forward
    under `autocast` as the build's passes run it; after one untimed batch on a GPU (its
    kernels' first launch)."""
    loaded = load_model(model_dir, device)
    model = loaded.model.requires_grad_(True)
    examples = load_corpus(CorpusConfig(str(corpus)), loaded.tokenizer, 128).examples
    ordered = sorted(examples, key=lambda e: len(e.token_ids))
    pad, dtype = loaded.tokenizer.pad_token_id, AUTOCAST_DTYPES.get(autocast)

    def step(chunk: list) -> None:
        batch = make_batch([e.token_ids for e in chunk], [1] * len(chunk), pad, [0] * len(chunk))
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            logits = model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
            ).logits
        summed_nll(logits, batch.targets.to(device)).sum().backward()
        model.zero_grad(set_to_none=True)

    if torch.device(device).type == "cuda":
        step(ordered[:batch_size])
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(ordered), batch_size):
        step(ordered[i : i + batch_size])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.token_ids) for e in examples)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}


def build_with_cli(
    model_dir: Path,
    corpus: Path,
    out: Path,
    batch_size: int,
    threads: int,
    extra: list[str],
    launcher: tuple[str, ...] = (),
):
    """The CLI build's `--json` summary and wall seconds; `launcher` goes between the
    interpreter and `-m server.cli` (e.g. `-m torch.distributed.run ...`), `threads` per process."""
    command = [sys.executable, *launcher, "-m", "server.cli", "--quiet", "build",
               "--model", str(model_dir), "--data", str(corpus), "--out", str(out),
               "--batch-size", str(batch_size), "--json", *extra]  # fmt: skip
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the same threads as the bare pass
    completed = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    return json.loads(completed.stdout), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("build_args", nargs="*", help="extra `build` options, after --")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    artifacts = demo_artifacts()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "corpus.jsonl", args.documents)
        bare = bare_forward_backward_seconds(artifacts.model_dir, corpus, args.batch_size)
        summary, wall = build_with_cli(
            artifacts.model_dir,
            corpus,
            Path(tmp) / "root",
            args.batch_size,
            args.threads,
            args.build_args,
        )
    phases = summary["seconds"]
    build_seconds = sum(phases.values())
    emit(
        {
            "benchmark": "build_throughput",
            "documents": args.documents,
            "examples": summary["n_examples"],
            "tokens": summary["n_tokens"],
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "bare_forward_backward": bare,
            "build_phase_seconds": phases,
            "build_seconds": build_seconds,
            "build_wall_seconds_with_process_start": wall,
            "build_tokens_per_second": summary["n_tokens"] / build_seconds,
            "ratio_build_vs_bare": bare["seconds"] / build_seconds,
            "ratio_main_pass_vs_bare": bare["seconds"] / phases["sketch"],
            "dim": summary["dim"],
            "index_factory": summary["index_factory"],
            "index_bytes_per_example": summary["index_bytes_per_example"],
            "build_peak_rss_mib": peak_rss_mib(children=True),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
