"""Subcommands that measure: eval (an index against exact influence) and exact (the reference)."""

from __future__ import annotations

import argparse
from pathlib import Path

from indexer.config import BuildConfig, CorpusConfig, checked_max_length, default_of
from indexer.evaluate import EvalConfig
from indexer.exact import ExactConfig
from indexer.query import Query, read_queries
from server.cli.options import add_options, from_args


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EvalConfig)
    parser.add_argument(
        "--queries", type=Path, required=True, help="JSONL: id, prompt, completion, gold"
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG figures into DIR")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_eval(args: argparse.Namespace) -> tuple[object, str]:
    from indexer.evaluate import evaluate, make_plot_directory, render_table, write_plots

    queries = tuple(read_queries(args.queries))
    if args.plot:  # a bad path is refused now, not after the evaluation
        make_plot_directory(args.plot)
    report = evaluate(from_args(EvalConfig, args, queries=queries, progress=not args.quiet))
    plots = write_plots(report, args.plot) if args.plot else []
    text = "\n".join([render_table(report), *(f"wrote {path}" for path in plots)])
    return {**report.to_dict(), "plots": [str(p) for p in plots]}, text


def add_exact_arguments(parser: argparse.ArgumentParser) -> None:
    # A build's model, corpus, batch size and device, so that both read the same examples.
    add_options(parser, BuildConfig, only=("model", "corpus", "batch_size", "device"))
    add_options(parser, ExactConfig)
    parser.add_argument("--queries", type=Path, required=True, help="JSONL of prompt/completion")
    parser.add_argument(
        "-k", "--top-k", type=int, default=default_of(Query, "top_k"), help="hits shown"
    )
    parser.add_argument("--json", action="store_true", help="print the hits as JSON")


def run_exact(args: argparse.Namespace) -> tuple[object, str]:
    from indexer.corpus import framing, load_corpus
    from indexer.exact import check_top_k, exact_top_hits
    from indexer.model import load_model
    from indexer.query import tokenize_query

    # Bad settings are refused before the model and the corpus load.
    config = from_args(ExactConfig, args, progress=not args.quiet)
    check_top_k(args.top_k)
    loaded = load_model(args.model, args.device)
    corpus_config = from_args(CorpusConfig, args)
    max_length = checked_max_length(corpus_config.max_length, loaded.context_length)
    examples = load_corpus(corpus_config, loaded.tokenizer, max_length).examples
    prefix = framing(loaded.tokenizer, corpus_config).prefix
    queries = read_queries(args.queries)
    tokenized = [
        tokenize_query(loaded.tokenizer, q.query, loaded.context_length, prefix=prefix)
        for q in queries
    ]
    hits = exact_top_hits(loaded, examples, tokenized, config, args.top_k)
    report = [
        {"id": q.id, "prompt": q.query.prompt, "hits": h}
        for q, h in zip(queries, hits, strict=True)
    ]
    lines = []
    for entry in report:
        lines.append(f"{entry['id']}: {entry['prompt']!r}")
        for rank, hit in enumerate(entry["hits"], 1):
            lines.append(f"  {rank:>3}  {hit['score']:>12.4g}  {hit['doc_id']}#{hit['chunk']}")
    return report, "\n".join(lines)
