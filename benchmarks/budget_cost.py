"""Bytes per example at the default budget, across model shapes (issue 13; cost only).

For each shape `LAYERSxWIDTH` it saves a GPT-2 of that shape with random weights (the demo
generator's `build_model`, the demo tokenizer), builds an index of `--documents` synthetic
demo documents with the default sketch (`--dims` / `--allocation` defaults) through the real
CLI, and reports D, the allocation, the 8-bit code plus 64-bit id per example and the index
file per example (which adds the quantiser's ranges, 8·D bytes over the corpus), and the build's
phases. Random weights say nothing of fidelity (`benchmarks.fidelity_per_byte` measures that).

    .venv/bin/python -m benchmarks.budget_cost --shapes 3x128,4x256,12x768 --documents 200 \
        --out benchmarks/results/budget-cost.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from benchmarks.build_throughput import build_with_cli
from benchmarks.common import demo_artifacts, emit, synthetic_corpus
from indexer.demo.train import DemoTrainingConfig, build_model

HEAD_WIDTH = 64  # GPT-2's attention head width


def random_model(directory: Path, layers: int, width: int, tokenizer_dir: Path) -> int:
    """Save a GPT-2 with `layers` blocks of `width`, random weights (seed 0), as safetensors in
    `directory`; its parameter count."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config = DemoTrainingConfig(n_layer=layers, n_embd=width, n_head=max(width // HEAD_WIDTH, 1))
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def measure(shape: str, corpus: Path, work: Path, tokenizer_dir: Path, extra: list[str]) -> dict:
    """A default build over `corpus` with a random model of `shape` (`LAYERSxWIDTH`)."""
    layers, width = (int(v) for v in shape.split("x"))
    model = work / f"model-{shape}"
    parameters = random_model(model, layers, width, tokenizer_dir)
    summary, wall = build_with_cli(model, corpus, work / f"root-{shape}", 16, 1, extra)
    return {
        "shape": shape,
        "parameters": parameters,
        "dim": summary["dim"],
        "allocation": summary["allocation"],
        "code_bytes_per_example": summary["dim"] + 8,  # IDMap,SQ8: a byte per dim + the id
        "index_bytes_per_example": summary["index_bytes_per_example"],
        "index_factory": summary["index_factory"],
        "examples": summary["n_examples"],
        "build_seconds": summary["seconds"],
        "build_wall_seconds": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="3x128,4x256,12x768", help="LAYERSxWIDTH, ...")
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("build_args", nargs="*", help="extra `build` options, after --")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer_dir = demo_artifacts().model_dir
    with tempfile.TemporaryDirectory(prefix="budget-cost-") as tmp:
        work = Path(tmp)
        corpus = synthetic_corpus(work / "corpus.jsonl", args.documents)
        rows = [
            measure(shape, corpus, work, tokenizer_dir, args.build_args)
            for shape in args.shapes.split(",")
        ]
    emit({"benchmark": "budget_cost", "documents": args.documents, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
