"""Build throughput next to a bare forward/backward pass over the same data.

    python -m benchmarks.build_throughput --documents 20000 [--out results.json]
    python -m benchmarks.build_throughput --setting mid [--out results.json]

The bare pass is what training costs: the model with parameter gradients, summed-NLL loss,
backward, same batches (length-sorted within the build's windows, batch size, float32), over
every example and, apart, over the curvature fit's subsample (the fit passes over it twice).
The build runs as a subprocess of the real CLI so its peak RSS is its own. Settings:
`synthetic` (the demo model over `--documents` demo-generator documents) or `mid` / `large`
(`benchmarks.rerank`'s models and corpora, framed as in training). Ratios (issue 13's targets):

- main pass: bare seconds / the build's `sketch` phase (≥ 0.8); the exact norms a cosine
  index stores are computed in the same pass and reported as their own phase (with the
  calibration's exact scores, when the main pass computes them from the same rotations);
- whole build: build seconds / (bare + 2 × bare over the fit subsample) (≤ 2), and the same
  with the calibration's exact pass counted as a fit pass too (its bare cost taken as that of
  `min(N, queries × depth)` examples: the most it scores).

Wall seconds move with the machine's load, which changes between the parts of a run on a
shared machine: the whole-build ratio is also given in CPU seconds (the bare passes' own, the
build process's from `getrusage`), with the load average before and after each part.
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

from benchmarks.common import (
    children_cpu_seconds,
    demo_artifacts,
    emit,
    peak_rss_mib,
    synthetic_corpus,
)
from benchmarks.rerank import load_setting
from indexer.config import (
    Autocast,
    CalibrationConfig,
    CorpusConfig,
    CurvatureConfig,
    example_max_length,
)
from indexer.corpus import load_corpus
from indexer.curvature import subsample
from indexer.model import load_model
from indexer.passes import WINDOW_ROWS
from indexer.sketch import AUTOCAST_DTYPES, make_batch, summed_nll


def bare_forward_backward_seconds(
    model_dir: Path,
    corpus: CorpusConfig,
    batch_size: int,
    device: str = "cpu",
    autocast: Autocast = Autocast.OFF,
    fit_examples: int | None = None,
) -> dict:
    """A training step without the optimizer over every example, on `device`, the forward
    under `autocast` as the build's passes run it; after one untimed batch on a GPU (its
    kernels' first launch). `fit_examples`: only the curvature fit's subsample of that size
    (the build's default seed)."""
    loaded = load_model(model_dir, device)
    model = loaded.model.requires_grad_(True)
    max_length = example_max_length(corpus.max_length, loaded.context_length)
    examples = load_corpus(corpus, loaded.tokenizer, max_length).examples
    if fit_examples is not None:
        rows = subsample((e.example_id for e in examples), fit_examples, CurvatureConfig().seed)
        examples = [examples[r] for r in rows]
    # Length-sorted within the build's windows, as its passes batch them (`indexer.passes`).
    ordered = [
        e
        for start in range(0, len(examples), WINDOW_ROWS)
        for e in sorted(examples[start : start + WINDOW_ROWS], key=lambda e: len(e.token_ids))
    ]
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
    load, start, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    for i in range(0, len(ordered), batch_size):
        step(ordered[i : i + batch_size])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(e.token_ids) for e in examples)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_average_before_after": [load, os.getloadavg()[0]],
        "tokens": tokens,
        "tokens_per_second": tokens / seconds,
    }


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


def corpus_options(corpus: CorpusConfig) -> list[str]:
    """The `build` options that frame `corpus`'s examples as its config does."""
    framing = [("--prefix-token", t) for t in corpus.prefix_tokens or ()]
    framing += [("--suffix-token", t) for t in corpus.suffix_tokens]
    return [value for option in framing for value in option]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("synthetic", "mid", "large"), default="synthetic")
    parser.add_argument("--documents", type=int, default=20000, help="synthetic setting only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("build_args", nargs="*", help="extra `build` options, after --")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fit_examples = CurvatureConfig().fit_examples
    with tempfile.TemporaryDirectory() as tmp:
        if args.setting == "synthetic":
            model_dir = demo_artifacts().model_dir
            corpus = CorpusConfig(str(synthetic_corpus(Path(tmp) / "corpus.jsonl", args.documents)))
        else:
            setting = load_setting(args.setting, None)
            model_dir, corpus = setting.model_dir, setting.corpus
        bare = bare_forward_backward_seconds(model_dir, corpus, args.batch_size)
        bare_fit = bare_forward_backward_seconds(
            model_dir, corpus, args.batch_size, fit_examples=fit_examples
        )
        build_load, build_cpu = os.getloadavg()[0], children_cpu_seconds()
        summary, wall = build_with_cli(
            model_dir,
            Path(corpus.data),
            Path(tmp) / "root",
            args.batch_size,
            args.threads,
            [*corpus_options(corpus), *args.build_args],
        )
    build_load, build_cpu = [build_load, os.getloadavg()[0]], children_cpu_seconds() - build_cpu
    phases = summary["seconds"]
    build_seconds = sum(phases.values())
    fit_allowance = bare["seconds"] + 2 * bare_fit["seconds"]
    fit_allowance_cpu = bare["cpu_seconds"] + 2 * bare_fit["cpu_seconds"]
    # The calibration scores at most `queries × depth` examples exactly, whatever the corpus.
    calibration = CalibrationConfig()
    calibrated = min(summary["n_examples"], calibration.queries * calibration.depth)
    calibration_allowance = bare["seconds"] * calibrated / summary["n_examples"]
    emit(
        {
            "benchmark": "build_throughput",
            "setting": args.setting,
            "documents": summary["n_documents"],
            "examples": summary["n_examples"],
            "tokens": summary["n_tokens"],
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "build_args": args.build_args,
            "bare_forward_backward": bare,
            "bare_forward_backward_fit_subsample": bare_fit,
            "build_phase_seconds": phases,
            "build_seconds": build_seconds,
            "build_wall_seconds_with_process_start": wall,
            "build_cpu_seconds_with_process_start": build_cpu,
            "build_load_average_before_after": build_load,
            "build_tokens_per_second": summary["n_tokens"] / build_seconds,
            "ratio_main_pass_vs_bare": bare["seconds"] / phases["sketch"],
            "ratio_main_pass_with_exact_norms_vs_bare": bare["seconds"]
            / (phases["sketch"] + phases.get("exact_norms", 0.0)),
            "ratio_build_vs_bare": bare["seconds"] / build_seconds,
            "ratio_build_vs_bare_plus_fit_passes": build_seconds / fit_allowance,
            "ratio_build_vs_bare_plus_fit_and_calibration_passes": build_seconds
            / (fit_allowance + calibration_allowance),
            "cpu_ratio_build_vs_bare_plus_fit_passes": build_cpu / fit_allowance_cpu,
            "dim": summary["dim"],
            "index_factory": summary["index_factory"],
            "index_bytes_per_example": summary["index_bytes_per_example"],
            "build_peak_rss_mib": peak_rss_mib(children=True),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
