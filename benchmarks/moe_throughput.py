"""Build throughput and bytes per example: a tiny Mixtral next to a dense Llama of the same
active parameters, side by side at the same --dims.

    python -m benchmarks.moe_throughput --documents 2000 --dims 4096 [--out results.json]

Both models are random (nothing downloaded), `--width` wide, 2 blocks, with one BPE tokenizer
trained on the corpus. The Mixtral has `--experts` experts of inner width `--inner`, `--top-k`
per token; the Llama's MLP is `top_k · inner` wide, so a token passes through as many
parameters in both (the router's `experts x width` aside). Each build runs `--repeats` times,
alternating the models, and the fastest counts. Ratio = MoE build seconds / dense (target
<= 1.5); bytes per example from the index file (target: within ±10% of the dense model's).
Beside them, each model's own forward/backward over the corpus with parameter gradients
(`benchmarks.build_throughput`): what training it costs, as a baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.build_throughput import bare_forward_backward_seconds
from benchmarks.common import emit, start_run, synthetic_corpus
from indexer.build import BuildSummary, build_index
from indexer.config import BuildConfig, CorpusConfig, SketchConfig
from indexer.demo.train import train_tokenizer
from indexer.model import tracked_modules


def save_models(args: argparse.Namespace, corpus: Path, root: Path) -> dict[str, Path]:
    """The two random models, with one tokenizer trained on the corpus, as safetensors."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:2000]]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab, max_length=args.max_length)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": args.width,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": args.max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    configs = {
        "mixtral": AutoConfig.for_model(
            "mixtral",
            intermediate_size=args.inner,
            num_local_experts=args.experts,
            num_experts_per_tok=args.top_k,
            **common,
        ),
        "llama": AutoConfig.for_model("llama", intermediate_size=args.top_k * args.inner, **common),
    }
    directories = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        directories[name] = root / name
        AutoModelForCausalLM.from_config(config).save_pretrained(directories[name])
        tokenizer.save_pretrained(directories[name])
    return directories


def active_parameters(model_dir: Path, top_k: int) -> dict[str, int]:
    """The blocks' parameters, and those a token passes through (`top_k` experts of each MoE
    block; every block parameter of a dense model)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    block = {n: p.numel() for n, p in model.named_parameters() if ".layers." in n}
    experts = getattr(model.config, "num_local_experts", 1)
    active = sum(size * top_k // experts if ".experts." in n else size for n, size in block.items())
    return {
        "block_parameters": sum(block.values()),
        "active_block_parameters": active,
        "tracked_modules": len(tracked_modules(model)),
    }


def build_once(args: argparse.Namespace, model_dir: Path, corpus: Path, out: Path) -> BuildSummary:
    config = BuildConfig(
        model=model_dir,
        out=out,
        corpus=CorpusConfig(str(corpus), max_length=args.max_length),
        sketch=SketchConfig(dims=args.dims),
        batch_size=args.batch_size,
        progress=False,
    )
    return build_index(config)


def measure(args: argparse.Namespace, models: dict[str, Path], corpus: Path, root: Path) -> dict:
    """Each model built `--repeats` times, alternating; the fastest build of each."""
    best: dict[str, tuple[float, BuildSummary]] = {}
    for repeat in range(args.repeats):
        for name, model_dir in models.items():
            start = time.perf_counter()
            summary = build_once(args, model_dir, corpus, root / f"{name}-{repeat}")
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, summary)
    return {
        name: {
            **active_parameters(models[name], args.top_k),
            "bare_forward_backward": bare_forward_backward_seconds(
                models[name], corpus, args.batch_size
            ),
            "build_seconds": seconds,
            "phase_seconds": summary.seconds,
            "sketch_tokens_per_second": summary.tokens_per_second,
            "dim": summary.dim,
            "allocation": summary.allocation,
            "index_bytes_per_example": summary.index_bytes_per_example,
            "coverage": summary.coverage.share,
            "skipped": list(summary.coverage.skipped),
        }
        for name, (seconds, summary) in best.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=4096)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--inner", type=int, default=256, help="each expert's inner width")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    start_run(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "corpus.jsonl", args.documents)
        models = save_models(args, corpus, Path(tmp))
        results = measure(args, models, corpus, Path(tmp))
    moe, dense = results["mixtral"], results["llama"]
    emit(
        {
            "benchmark": "moe_throughput",
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "models": results,
            "ratio_build_seconds_moe_vs_dense": moe["build_seconds"] / dense["build_seconds"],
            "ratio_bare_seconds_moe_vs_dense": (
                moe["bare_forward_backward"]["seconds"] / dense["bare_forward_backward"]["seconds"]
            ),
            "ratio_sketch_throughput_dense_vs_moe": (
                dense["sketch_tokens_per_second"] / moe["sketch_tokens_per_second"]
            ),
            "ratio_bytes_per_example_moe_vs_dense": (
                moe["index_bytes_per_example"] / dense["index_bytes_per_example"]
            ),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
