"""`influence-index`: one console script, a subcommand per job.

Errors a person can act on print as one line on stderr with exit code 2; nothing else is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from indexer.errors import InfluenceIndexError

Handler = Callable[[argparse.Namespace], int]


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face model dir")
    parser.add_argument("--data", required=True, help="JSONL/Parquet/CSV file or glob")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--max-length", type=int, help="tokens per example (longer docs chunk)")
    parser.add_argument("--modules", help="regex of module names to track (default: all blocks)")
    parser.add_argument("--damping", type=float, default=0.1, help="lambda = damping * mean(Λ)")
    parser.add_argument("--fit-examples", type=int, default=2000, help="EK-FAC fit subsample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    _add_corpus_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="index ROOT (versions + CURRENT)")
    parser.add_argument("--rank-in", type=int, default=32)
    parser.add_argument("--rank-out", type=int, default=32)
    parser.add_argument("--score", choices=["influence", "cosine"], default="cosine")
    parser.add_argument("--index-factory", help="FAISS factory (default: by corpus size)")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists scanned per query")
    parser.add_argument("--no-vectors", action="store_true", help="do not keep vectors.f16")
    parser.add_argument("--keep-versions", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _corpus_config(args: argparse.Namespace):
    from indexer.config import CorpusConfig

    return CorpusConfig(args.data, args.id_column, args.text_column, args.max_length)


def _curvature_config(args: argparse.Namespace):
    from indexer.config import CurvatureConfig

    return CurvatureConfig(fit_examples=args.fit_examples, damping=args.damping, seed=args.seed)


def _run_build(args: argparse.Namespace) -> int:
    from indexer.build import build_index
    from indexer.config import BuildConfig, SketchConfig, StoreConfig

    config = BuildConfig(
        model=args.model,
        out=args.out,
        corpus=_corpus_config(args),
        sketch=SketchConfig(args.rank_in, args.rank_out, args.seed, args.modules),
        curvature=_curvature_config(args),
        store=StoreConfig(
            score=args.score,
            index_factory=args.index_factory,
            nprobe=args.nprobe,
            keep_vectors=not args.no_vectors,
            keep_versions=args.keep_versions,
        ),
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    summary = build_index(config)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(
            f"published {summary.version} in {summary.root}: {summary.n_examples} examples "
            f"from {summary.n_documents} documents ({summary.n_empty_skipped} empty skipped), "
            f"dim {summary.dim}, {summary.index_factory}, "
            f"{summary.index_bytes_per_example:.0f} index bytes/example, "
            f"{summary.tokens_per_second:.0f} tokens/s"
        )
    return 0


def _add_exact_arguments(parser: argparse.ArgumentParser) -> None:
    _add_corpus_arguments(parser)
    parser.add_argument("--queries", type=Path, required=True, help="JSONL of prompt/completion")
    parser.add_argument("-k", "--top-k", type=int, default=10)
    parser.add_argument("--memory-limit-gb", type=float, default=8.0)
    parser.add_argument("--json", action="store_true")


def _run_exact(args: argparse.Namespace) -> int:
    from indexer.corpus import load_corpus
    from indexer.evaluate import read_queries
    from indexer.exact import ExactConfig, ExactScorer
    from indexer.model import DEFAULT_MAX_LENGTH, load_model
    from indexer.query import encode_query

    loaded = load_model(args.model, args.device)
    max_length = args.max_length or min(loaded.context_length, DEFAULT_MAX_LENGTH)
    corpus = load_corpus(_corpus_config(args), loaded.tokenizer, max_length)
    config = ExactConfig(
        curvature=_curvature_config(args),
        modules=args.modules,
        batch_size=args.batch_size,
        memory_limit_bytes=int(args.memory_limit_gb * 2**30),
        progress=not args.quiet,
    )
    scorer = ExactScorer(loaded, corpus.examples, config)
    queries = read_queries(args.queries)
    encoded = [
        encode_query(loaded.tokenizer, q.prompt, q.completion, loaded.context_length)
        for q in queries
    ]
    scores = scorer.score(encoded)
    report = []
    for query, row in zip(queries, scores, strict=True):
        top = row.argsort()[::-1][: args.top_k]
        hits = [
            {"example_id": corpus.examples[i].example_id, "doc_id": corpus.examples[i].doc_id,
             "chunk": corpus.examples[i].chunk, "score": float(row[i])}
            for i in top
        ]  # fmt: skip
        report.append({"id": query.id, "prompt": query.prompt, "hits": hits})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for entry in report:
            print(f"{entry['id']}: {entry['prompt']!r}")
            for rank, hit in enumerate(entry["hits"], 1):
                print(f"  {rank:>3}  {hit['score']:>12.4g}  {hit['doc_id']}#{hit['chunk']}")
    return 0


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index ROOT")
    parser.add_argument("--version", help="a version id (default: CURRENT)")
    parser.add_argument("--verify", action="store_true", help="check every file's sha256")
    parser.add_argument("--json", action="store_true")


def _run_info(args: argparse.Namespace) -> int:
    from indexer.publish import list_versions, read_current, read_manifest, verify_version
    from indexer.publish import version_dir as find_version

    path = find_version(args.index, args.version)
    manifest = verify_version(path) if args.verify else read_manifest(path)
    info = {
        "current": read_current(args.index),
        "versions": list_versions(args.index),
        "verified": args.verify,
        "manifest": manifest,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    counts = manifest["counts"]
    print(f"index {args.index}: CURRENT = {info['current']}; versions: {len(info['versions'])}")
    print(f"version   {manifest['version']} (built {manifest['created']})")
    print(
        f"model     {manifest['model']['path']} sha256 {manifest['model']['weights_sha256'][:16]}"
    )
    print(f"examples  {counts['examples']} from {counts['documents']} documents")
    print(
        f"vectors   dim {manifest['dim']}, {len(manifest['modules'])} modules, ranks "
        f"{manifest['sketch']['rank_out']}x{manifest['sketch']['rank_in']}, "
        f"score {manifest['score']}, faiss {manifest['index_factory']}"
    )
    if args.verify:
        print(f"checksums ok ({len(manifest['files'])} files)")
    return 0


def _commands() -> dict[str, tuple[str, Callable, Handler]]:
    from indexer.evaluate import add_eval_arguments, run_eval
    from server.commands import (
        add_query_arguments,
        add_serve_arguments,
        run_query,
        run_serve,
    )
    from server.demo import add_demo_arguments, run_demo

    return {
        "demo": ("build, serve and query the bundled demo", add_demo_arguments, run_demo),
        "build": ("build and publish an index version", _add_build_arguments, _run_build),
        "serve": ("serve a published index over gRPC", add_serve_arguments, run_serve),
        "query": ("query a running server", add_query_arguments, run_query),
        "info": ("describe a published index", _add_info_arguments, _run_info),
        "eval": ("measure an index against exact influence", add_eval_arguments, run_eval),
        "exact": ("exact EK-FAC scores (small models)", _add_exact_arguments, _run_exact),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influence-index", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ...")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 on a small machine shared with others)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, handler) in _commands().items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads is not None:
        if args.threads < 1:
            print("influence-index: error: --threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.handler(args)
    except InfluenceIndexError as e:
        print(f"influence-index {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"influence-index {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
