"""`influence-index`: the one command-line layer, a subcommand per job.

Every subcommand's arguments and handler live here; defaults come from the library's and the
server's config dataclasses, so `--help` shows what a run would use. Global options
(`--log-level`, `--threads`, `-q`) go before or after the subcommand. Errors a person can act
on print as one line on stderr with exit code 2 (an RPC that failed otherwise: 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import wraps
from pathlib import Path

import grpc

from indexer import __version__
from indexer.config import (
    BuildConfig,
    CorpusConfig,
    CurvatureConfig,
    IncrementalConfig,
    IncrementalMode,
    ScoreKind,
    SketchConfig,
    StoreConfig,
    default_of,
    example_max_length,
)
from indexer.engine import EngineOptions
from indexer.errors import InfluenceIndexError, InvalidInputError
from indexer.evaluate import BASELINES, EvalConfig
from indexer.exact import ExactConfig
from indexer.query import Query
from server.app import ServerConfig
from server.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S
from server.logs import LOG_FORMATS, configure_logging

Handler = Callable[[argparse.Namespace], int]

_MIB = 1024 * 1024
_TOGGLES = {"auto": None, "on": True, "off": False}


def cli_errors(handler: Handler) -> Handler:
    """The one error handler: a library error or a failed RPC becomes one line on stderr."""

    @wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except InfluenceIndexError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return run


def _defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter


# --- build and exact: the corpus, the model and the curvature -------------------------------


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face model dir")
    parser.add_argument("--data", required=True, help="JSONL/Parquet/CSV file or glob")
    parser.add_argument(
        "--id-column", default=default_of(CorpusConfig, "id_column"), help="document id column"
    )
    parser.add_argument(
        "--text-column", default=default_of(CorpusConfig, "text_column"), help="text column"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        help="tokens per example; longer documents are chunked (default: the model's context, "
        "at most 512)",
    )
    parser.add_argument(
        "--prefix-token",
        action="append",
        dest="prefix_tokens",
        metavar="TOKEN",
        help="special token that starts every example and query, as in training (repeatable; "
        "default: the tokenizer's own, e.g. its BOS)",
    )
    parser.add_argument(
        "--suffix-token",
        action="append",
        dest="suffix_tokens",
        default=[],
        metavar="TOKEN",
        help="special token that ends every document, as in training (repeatable)",
    )
    parser.add_argument(
        "--modules", help="regex of module names to track (default: Linear/Conv1D in the blocks)"
    )
    parser.add_argument(
        "--damping",
        type=float,
        default=default_of(CurvatureConfig, "damping"),
        help="lambda = damping * mean(Λ), per module",
    )
    parser.add_argument(
        "--fit-examples",
        type=int,
        default=default_of(CurvatureConfig, "fit_examples"),
        help="EK-FAC fit subsample",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=default_of(SketchConfig, "seed"),
        help="projections and label sampling",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=default_of(BuildConfig, "batch_size"),
        help="examples per forward/backward pass",
    )
    parser.add_argument(
        "--device", default=default_of(BuildConfig, "device"), help="cpu, cuda, cuda:1, ..."
    )


def _corpus_config(args: argparse.Namespace) -> CorpusConfig:
    prefix = None if args.prefix_tokens is None else tuple(args.prefix_tokens)
    return CorpusConfig(
        args.data, args.id_column, args.text_column, args.max_length, prefix, args.suffix_tokens
    )


def _curvature_config(args: argparse.Namespace) -> CurvatureConfig:
    return CurvatureConfig(fit_examples=args.fit_examples, damping=args.damping, seed=args.seed)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    _add_corpus_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="index ROOT (versions + CURRENT)")
    parser.add_argument(
        "--rank-in", type=int, default=default_of(SketchConfig, "rank_in"), help="sketch rows of R"
    )
    parser.add_argument(
        "--rank-out",
        type=int,
        default=default_of(SketchConfig, "rank_out"),
        help="sketch rows of P",
    )
    parser.add_argument(
        "--score",
        type=ScoreKind,
        choices=list(ScoreKind),
        default=default_of(StoreConfig, "score"),
        help="what the index ranks by",
    )
    parser.add_argument(
        "--index-factory",
        help="FAISS factory string; the index is the only copy of the vectors, so it must "
        "reconstruct them (default: by corpus size, 8-bit codes for small corpora)",
    )
    parser.add_argument(
        "--nprobe",
        type=int,
        default=default_of(StoreConfig, "nprobe"),
        help="IVF lists scanned per query",
    )
    parser.add_argument(
        "--exact-rerank",
        choices=list(_TOGGLES),
        default="auto",
        help="store full-space EK-FAC factors so that answers can be re-ranked exactly "
        "(auto: when they fit in 8 GiB)",
    )
    parser.add_argument(
        "--lexical-index",
        choices=["on", "off"],
        default="on" if default_of(StoreConfig, "lexical_index") else "off",
        help="store a BM25 index of the texts, for lexical candidates",
    )
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=default_of(StoreConfig, "keep_versions"),
        help="published versions kept in ROOT (never CURRENT's or PINNED's; the rollback "
        "target while there is room)",
    )
    parser.add_argument(
        "--incremental",
        type=IncrementalMode,
        choices=list(IncrementalMode),
        nargs="?",
        const=IncrementalMode.ON,
        default=default_of(IncrementalConfig, "mode"),
        help="reuse CURRENT's curvature and the vectors of unchanged examples; auto: when "
        "CURRENT is compatible (else a full build, saying why); on (the bare flag): or exit 2",
    )
    parser.add_argument(
        "--refit-curvature",
        action="store_true",
        help="refit the curvature (a full build) even when CURRENT's could be reused",
    )
    parser.add_argument(
        "--refit-threshold",
        type=float,
        default=default_of(IncrementalConfig, "refit_threshold"),
        help="refit once the examples added, changed or deleted since the curvature's fit "
        "exceed this fraction of the corpus",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--metrics-textfile",
        type=Path,
        metavar="PATH",
        help="on success, atomically write the build's metrics (last-success time, duration, "
        "examples) here, for node-exporter's textfile collector (name it *.prom)",
    )
    parser.add_argument(
        "--pushgateway", metavar="URL", help="on success, push the same metrics to this Pushgateway"
    )


@cli_errors
def run_build(args: argparse.Namespace) -> int:
    from indexer.build import build_index

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
            keep_versions=args.keep_versions,
            exact_rerank=_TOGGLES[args.exact_rerank],
            lexical_index=_TOGGLES[args.lexical_index],
        ),
        incremental=IncrementalConfig(args.incremental, args.refit_curvature, args.refit_threshold),
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    start = time.monotonic()
    summary = build_index(config)
    duration = time.monotonic() - start
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports the build
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(
            f"published {summary.version} in {summary.root}: {summary.n_examples} examples "
            f"from {summary.n_documents} documents ({summary.n_empty_skipped} empty skipped), "
            f"dim {summary.dim}, {summary.index_factory}, "
            f"{summary.index_bytes_per_example:.0f} index bytes/example, "
            f"exact re-rank factors {summary.full_curvature_bytes / 2**20:.1f} MiB, "
            f"{summary.tokens_per_second:.0f} tokens/s"
        )
        if summary.built_from is not None:
            print(
                f"incremental from {summary.built_from}: {summary.reused} reused, "
                f"{summary.new} new, {summary.changed} changed, {summary.deleted} deleted"
            )
        else:
            print(f"full build: {summary.full_reason}")
    if args.metrics_textfile is not None or args.pushgateway is not None:
        from server.metrics import export_build_metrics

        export_build_metrics(
            summary.version,
            summary.n_examples,
            duration,
            textfile=args.metrics_textfile,
            pushgateway=args.pushgateway,
        )
    return 0


def add_exact_arguments(parser: argparse.ArgumentParser) -> None:
    _add_corpus_arguments(parser)
    parser.add_argument("--queries", type=Path, required=True, help="JSONL of prompt/completion")
    parser.add_argument(
        "-k", "--top-k", type=int, default=default_of(Query, "top_k"), help="hits shown"
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=default_of(ExactConfig, "memory_limit_bytes") / 2**30,
        help="refuse models whose full factors need more",
    )
    parser.add_argument("--json", action="store_true", help="print the hits as JSON")


@cli_errors
def run_exact(args: argparse.Namespace) -> int:
    from indexer.corpus import framing, load_corpus
    from indexer.exact import ExactScorer
    from indexer.model import load_model
    from indexer.query import read_queries, tokenize_query

    loaded = load_model(args.model, args.device)
    max_length = example_max_length(args.max_length, loaded.context_length)
    corpus_config = _corpus_config(args)
    corpus = load_corpus(corpus_config, loaded.tokenizer, max_length)
    prefix = framing(loaded.tokenizer, corpus_config).prefix
    config = ExactConfig(
        curvature=_curvature_config(args),
        modules=args.modules,
        batch_size=args.batch_size,
        memory_limit_bytes=int(args.memory_limit_gb * 2**30),
        progress=not args.quiet,
    )
    scorer = ExactScorer(loaded, corpus.examples, config)
    queries = read_queries(args.queries)
    tokenized = [
        tokenize_query(loaded.tokenizer, q.query, loaded.context_length, prefix=prefix)
        for q in queries
    ]
    scores = scorer.score(tokenized)
    report = []
    for labeled, row in zip(queries, scores, strict=True):
        top = row.argsort()[::-1][: args.top_k]
        hits = [
            {"example_id": corpus.examples[i].example_id, "doc_id": corpus.examples[i].doc_id,
             "chunk": corpus.examples[i].chunk, "score": float(row[i])}
            for i in top
        ]  # fmt: skip
        report.append({"id": labeled.id, "prompt": labeled.query.prompt, "hits": hits})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for entry in report:
            print(f"{entry['id']}: {entry['prompt']!r}")
            for rank, hit in enumerate(entry["hits"], 1):
                print(f"  {rank:>3}  {hit['score']:>12.4g}  {hit['doc_id']}#{hit['chunk']}")
    return 0


# --- info and eval: published versions --------------------------------------------------------


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index ROOT")
    parser.add_argument("--version", help="a version id (default: CURRENT)")
    parser.add_argument("--verify", action="store_true", help="check every file's sha256")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


@cli_errors
def run_info(args: argparse.Namespace) -> int:
    from indexer.publish import list_versions, read_current, read_manifest, verify_version
    from indexer.publish import version_dir as find_version

    path = find_version(args.index, args.version)
    manifest = verify_version(path) if args.verify else read_manifest(path)
    current = read_current(args.index)
    versions = list_versions(args.index)
    if args.json:
        info = {
            "current": current,
            "versions": versions,
            "version": path.name,
            "verified": args.verify,
            "manifest": json.loads(manifest.to_json()),
        }
        print(json.dumps(info, indent=2))
        return 0
    print(f"index {args.index}: CURRENT = {current}; versions: {len(versions)}")
    print(f"version   {path.name} (built {manifest.created})")
    print(f"model     {manifest.model.path} sha256 {manifest.model.weights_sha256[:16]}")
    print(f"examples  {manifest.counts.examples} from {manifest.counts.documents} documents")
    print(
        f"vectors   dim {manifest.dim}, {len(manifest.modules)} modules, ranks "
        f"{manifest.sketch.rank_out}x{manifest.sketch.rank_in}, "
        f"score {manifest.score}, faiss {manifest.index_factory}"
    )
    if args.verify:
        print(f"checksums ok ({len(manifest.files)} files)")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _baseline_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown baseline {unknown[0]!r} (choose from {', '.join(BASELINES)})"
        )
    return names


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index ROOT")
    parser.add_argument(
        "--queries", type=Path, required=True, help="JSONL: id, prompt, completion, gold"
    )
    parser.add_argument("--version", help="a version id (default: CURRENT)")
    parser.add_argument(
        "--exact", action="store_true", help="compare with exact EK-FAC (small models)"
    )
    parser.add_argument(
        "--baselines",
        type=_baseline_list,
        default=(),
        help="comma list of: " + ", ".join(BASELINES),
    )
    parser.add_argument(
        "-k",
        "--k",
        dest="ks",
        type=_int_list,
        default=default_of(EvalConfig, "ks"),
        help="fidelity ks",
    )
    parser.add_argument(
        "--fact-k",
        dest="fact_ks",
        type=_int_list,
        default=default_of(EvalConfig, "fact_ks"),
        help="fact-tracing ks",
    )
    parser.add_argument(
        "--rerank-depth",
        type=int,
        default=default_of(EvalConfig, "rerank_depth"),
        help="K′ of the re-ranked methods (0: evaluate the sketch only)",
    )
    parser.add_argument(
        "--lexical-candidates",
        type=int,
        default=default_of(EvalConfig, "lexical_candidates"),
        help="BM25 candidates of the index+lexical+rerank method",
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG figures into DIR")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--data", help="corpus path or glob, if it moved since the build")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=default_of(EvalConfig, "batch_size"),
        help="examples per pass batch",
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=default_of(EvalConfig, "memory_limit_bytes") / 2**30,
        help="refuse exact/gradient baselines needing more",
    )
    parser.add_argument("--device", default=default_of(EvalConfig, "device"), help="torch device")


@cli_errors
def run_eval(args: argparse.Namespace) -> int:
    from indexer.evaluate import evaluate, render_table, write_plots
    from indexer.query import read_queries

    config = EvalConfig(
        index=args.index,
        queries=tuple(read_queries(args.queries)),
        exact=args.exact,
        baselines=args.baselines,
        ks=args.ks,
        fact_ks=args.fact_ks,
        version=args.version,
        data=args.data,
        batch_size=args.batch_size,
        memory_limit_bytes=int(args.memory_limit_gb * 2**30),
        device=args.device,
        progress=not args.quiet,
        rerank_depth=args.rerank_depth,
        lexical_candidates=args.lexical_candidates,
    )
    report = evaluate(config)
    plots = write_plots(report, args.plot) if args.plot else []
    if args.json:
        print(json.dumps({**report.to_dict(), "plots": [str(p) for p in plots]}, indent=2))
    else:
        print(render_table(report))
        for path in plots:
            print(f"wrote {path}")
    return 0


# --- serve and query: the gRPC service ------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    def d(name: str) -> object:
        return default_of(ServerConfig, name)

    parser.add_argument(
        "--index", type=Path, required=True, metavar="ROOT", help="published index root"
    )
    parser.add_argument("--host", default=d("host"), help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=d("port"), help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--device", default=d("device"), help="torch device for the query model: cpu, cuda, ..."
    )
    parser.add_argument(
        "--model",
        type=Path,
        dest="model_dir",
        help="model directory overriding the manifest's (its sha256 must match)",
    )
    batching = parser.add_argument_group("batching and limits")
    batching.add_argument(
        "--max-batch-size",
        type=int,
        default=d("max_batch_size"),
        help="queries per forward/backward pass",
    )
    batching.add_argument(
        "--max-wait-ms",
        type=float,
        default=d("max_wait_ms"),
        help="longest a query waits for others to share its batch, in milliseconds",
    )
    batching.add_argument(
        "--max-queue",
        type=int,
        default=d("max_queue"),
        help="queued queries beyond which requests get RESOURCE_EXHAUSTED",
    )
    batching.add_argument(
        "--max-top-k", type=int, default=d("max_top_k"), help="largest top_k a query may ask"
    )
    batching.add_argument(
        "--max-queries-per-batch",
        type=int,
        default=d("max_queries_per_batch"),
        help="largest QueryBatch request",
    )
    batching.add_argument(
        "--max-attribution-examples",
        type=int,
        default=d("max_attribution_examples"),
        help="most example ids per AttributeTokens request",
    )
    batching.add_argument(
        "--workers",
        type=int,
        default=d("max_workers"),
        help="concurrent query RPCs (Query, QueryBatch, AttributeTokens); beyond them "
        "RESOURCE_EXHAUSTED. Health checks and GetIndexInfo have threads of their own",
    )
    batching.add_argument(
        "--max-query-mb",
        type=float,
        default=d("max_query_bytes") / _MIB,
        help="largest Query or AttributeTokens request, in MiB (QueryBatch: times "
        "--max-queries-per-batch); larger ones get INVALID_ARGUMENT before they are parsed",
    )
    batching.add_argument(
        "--max-message-mb",
        type=float,
        default=d("max_message_bytes") / _MIB,
        help="largest gRPC message, in MiB",
    )
    lifecycle = parser.add_argument_group("reload and shutdown")
    lifecycle.add_argument(
        "--poll-seconds",
        type=float,
        default=d("poll_seconds"),
        help="how often to check CURRENT for a new version (SIGHUP checks at once)",
    )
    lifecycle.add_argument(
        "--grace-seconds",
        type=float,
        default=d("grace_seconds"),
        help="time in-flight requests get to finish on SIGTERM/SIGINT (and on a connection "
        "closed for its age)",
    )
    lifecycle.add_argument(
        "--pin-version",
        metavar="VERSION",
        help="serve exactly this version, whatever CURRENT or ROOT/PINNED say",
    )
    lifecycle.add_argument(
        "--max-connection-age-seconds",
        type=float,
        dest="max_connection_age_s",
        help="close client connections after this age so that clients of a Kubernetes "
        "ClusterIP Service reconnect and rebalance over the pods (default: never)",
    )
    security = parser.add_argument_group("security (off by default)")
    security.add_argument(
        "--auth-token-file",
        type=Path,
        help="require 'authorization: Bearer <token>' with the token in this file",
    )
    security.add_argument(
        "--auth-token-env",
        metavar="VAR",
        help="as --auth-token-file, with the token in environment variable VAR",
    )
    security.add_argument(
        "--tls-cert", type=Path, help="server certificate chain (PEM); turns TLS on"
    )
    security.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        help="CA (PEM) that client certificates must be signed by: mutual TLS",
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port"
    )
    parser.add_argument(
        "--health-port",
        type=int,
        help="also serve grpc.health.v1.Health alone, in plaintext (even with TLS), on this "
        "port: service '' = ready (an index is loaded), 'liveness' = the process is up",
    )
    rerank = parser.add_argument_group("exact re-ranking")
    rerank.add_argument(
        "--rerank-depth",
        type=int,
        default=default_of(EngineOptions, "rerank_depth"),
        help="candidates re-ranked exactly when a query does not say (0: off)",
    )
    rerank.add_argument(
        "--max-rerank-tokens",
        type=int,
        default=default_of(EngineOptions, "max_rerank_tokens"),
        help="budget of one query's re-rank: depth x tokens per example",
    )


@cli_errors
def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful stop."""
    from server.app import InfluenceServer

    config = ServerConfig(
        index_root=args.index,
        host=args.host,
        port=args.port,
        device=args.device,
        model_dir=args.model_dir,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_top_k=args.max_top_k,
        max_queries_per_batch=args.max_queries_per_batch,
        max_attribution_examples=args.max_attribution_examples,
        max_workers=args.workers,
        poll_seconds=args.poll_seconds,
        grace_seconds=args.grace_seconds,
        auth_token_file=args.auth_token_file,
        auth_token_env=args.auth_token_env,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        max_connection_age_s=args.max_connection_age_s,
        pin_version=args.pin_version,
        max_message_bytes=int(args.max_message_mb * _MIB),
        max_query_bytes=int(args.max_query_mb * _MIB),
        engine=EngineOptions(
            rerank_depth=args.rerank_depth, max_rerank_tokens=args.max_rerank_tokens
        ),
    )
    InfluenceServer(config).serve_forever()
    return 0


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT", help="server")
    parser.add_argument("--prompt", default="", help="context whose tokens carry no loss")
    parser.add_argument("--completion", required=True, help="text whose probability is explained")
    parser.add_argument("-k", "--top-k", type=int, default=default_of(Query, "top_k"), help="hits")
    parser.add_argument(
        "--score-kind", type=ScoreKind, choices=list(ScoreKind), help="default: the index's"
    )
    parser.add_argument(
        "--rerank-depth",
        type=int,
        help="candidates re-ranked exactly (default: the server's; 0: off)",
    )
    parser.add_argument(
        "--lexical-candidates",
        type=int,
        default=default_of(Query, "lexical_candidates"),
        help="BM25 matches re-ranked with the index's candidates",
    )
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    parser.add_argument(
        "--tls-ca", type=Path, help="CA (PEM) of the server certificate; turns TLS on"
    )
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM), for mutual TLS")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")


@cli_errors
def run_query(args: argparse.Namespace) -> int:
    """Print the top influences as a table or JSON."""
    from google.protobuf import json_format

    from server.auth import load_token
    from server.client import InfluenceClient, format_query_table

    client = InfluenceClient(
        args.target,
        token=load_token(args.token_file),
        tls_ca_file=args.tls_ca,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        timeout_s=args.timeout,
    )
    with client:
        response = client.query(
            args.prompt,
            args.completion,
            top_k=args.top_k,
            score_kind=args.score_kind,
            rerank_depth=args.rerank_depth,
            lexical_candidates=args.lexical_candidates,
        )
    if args.json:
        payload = json_format.MessageToDict(
            response,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        )
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(format_query_table(response))
    return 0


# --- demo: the embedded default ----------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    cache_dir: Path = Path(".cache")
    top_k: int = 5
    n_queries: int = 3
    load_timeout_s: float = 120.0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_of(DemoOptions, "cache_dir"),
        help="where the demo model and index are kept",
    )
    parser.add_argument(
        "-k", "--top-k", type=int, default=default_of(DemoOptions, "top_k"), help="hits shown"
    )
    parser.add_argument("--rebuild", action="store_true", help="build a new index version")
    parser.add_argument("--json", action="store_true", help="print the answers as JSON")


@cli_errors
def run_demo(args: argparse.Namespace) -> int:
    """Train (or reuse) the demo model, build (or reuse) its index, serve it on a free local
    port, ask fact queries through the real client, and show the top hit's token attribution."""
    from google.protobuf.json_format import MessageToDict

    from indexer.demo.index import ensure_demo_index
    from indexer.demo.train import ensure_demo_model
    from indexer.query import read_queries
    from server.app import InfluenceServer
    from server.client import InfluenceClient, format_query_table, format_token_attribution

    options = replace(DemoOptions(), cache_dir=args.cache_dir, top_k=args.top_k)
    artifacts = ensure_demo_model(options.cache_dir / "demo", progress=not args.quiet)
    root = options.cache_dir / "demo-index"
    ensure_demo_index(artifacts, root, args.rebuild, progress=not args.quiet)
    queries = read_queries(artifacts.queries_path)[: options.n_queries]
    with InfluenceServer(ServerConfig(index_root=root, port=0)) as server:
        if not server.wait_until_serving(timeout_s=options.load_timeout_s):
            raise InvalidInputError(f"the demo server did not load its index from {root}")
        with InfluenceClient(f"127.0.0.1:{server.port}") as client:
            responses = [
                client.query(q.query.prompt, q.query.completion, top_k=options.top_k)
                for q in queries
            ]
            first = queries[0].query
            attribution = client.attribute_tokens(
                first.prompt, first.completion, [responses[0].influences[0].example_id]
            ).attributions[0]
    gold_ranks = [
        [rank for rank, hit in enumerate(r.influences, 1) if hit.doc_id in q.gold]
        for q, r in zip(queries, responses, strict=True)
    ]
    if args.json:
        report = {
            "fact_accuracy": artifacts.fact_accuracy,
            "queries": [
                {
                    "id": q.id,
                    "prompt": q.query.prompt,
                    "completion": q.query.completion,
                    "gold": q.gold,
                    "gold_ranks": ranks,
                    "response": MessageToDict(r, preserving_proto_field_name=True),
                }
                for q, r, ranks in zip(queries, responses, gold_ranks, strict=True)
            ],
            "top_attribution": MessageToDict(attribution, preserving_proto_field_name=True),
        }
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"demo model: {artifacts.model_dir} (completes {artifacts.fact_accuracy:.0%} of the "
        f"corpus's fact prompts correctly)\n"
    )
    for labeled, response, ranks in zip(queries, responses, gold_ranks, strict=True):
        print(f"query: {labeled.query.prompt!r} -> {labeled.query.completion!r}")
        print(format_query_table(response))
        found = ", ".join(map(str, ranks)) or "none"
        print(f"documents stating this fact (gold) at ranks: {found}\n")
    print("token-level influence of the top result on the first query:")
    print(format_token_attribution(attribution, color=sys.stdout.isatty()))
    return 0


# --- pin and rollback: which version servers serve ---------------------------------------------


def add_pin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, metavar="ROOT", help="index root")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("version", nargs="?", help="the version every server must serve")
    target.add_argument(
        "--clear", action="store_true", help="remove the pin: servers follow CURRENT again"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@cli_errors
def run_pin(args: argparse.Namespace) -> int:
    """Write (after verifying the version) or remove ROOT/PINNED."""
    from indexer.publish import clear_pin, pin

    if args.clear:
        previous = clear_pin(args.index)
        result = {"pinned": None, "previous_pin": previous}
        line = f"unpinned {args.index} (was {previous}): servers follow CURRENT"
    else:
        pin(args.index, args.version)
        result = {"pinned": args.version}
        line = f"pinned {args.index} to {args.version}: every server serves it until --clear"
    print(json.dumps(result) if args.json else line)
    return 0


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, metavar="ROOT", help="index root")
    parser.add_argument(
        "--to",
        metavar="VERSION",
        help="the version to serve (default: the newest valid one built before CURRENT's)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@cli_errors
def run_rollback(args: argparse.Namespace) -> int:
    """Point CURRENT at a verified earlier version, atomically."""
    from indexer.publish import rollback

    done = rollback(args.index, args.to)
    if args.json:
        print(
            json.dumps({"previous": done.previous, "current": done.current, "pinned": done.pinned})
        )
        return 0
    note = (
        f"; note: ROOT/PINNED pins {done.pinned}, which servers serve instead"
        if done.pinned
        else ""
    )
    print(f"CURRENT of {args.index}: {done.previous} -> {done.current}{note}")
    return 0


# --- the parser ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler
    log_level: str = "WARNING"  # when --log-level is not given


COMMANDS = {
    "demo": Command("build, serve and query the bundled demo", add_demo_arguments, run_demo),
    "build": Command("build and publish an index version", add_build_arguments, run_build),
    "serve": Command(
        "serve a published index over gRPC", add_serve_arguments, run_serve, log_level="INFO"
    ),
    "query": Command("query a running server", add_query_arguments, run_query),
    "info": Command("describe a published index", add_info_arguments, run_info),
    "eval": Command("measure an index against exact influence", add_eval_arguments, run_eval),
    "exact": Command("exact EK-FAC scores (small models)", add_exact_arguments, run_exact),
    "pin": Command("make every server serve one version", add_pin_arguments, run_pin),
    "rollback": Command(
        "point CURRENT back at an earlier version", add_rollback_arguments, run_rollback
    ),
}


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """Options every subcommand accepts. On the subcommands their defaults are suppressed, so
    that an option given before the subcommand is not reset by the subcommand's parser."""
    parser = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=default(None),
        help="log level (default: INFO for serve, WARNING otherwise)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default("text"),
        help="log lines as text or as one JSON object each (default: text)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default(False), help="no progress bars"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default(None),
        help="torch CPU threads (1 on a small machine shared with others)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence-index",
        description=__doc__.splitlines()[0],
        parents=[_global_options(False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        subparser = sub.add_parser(
            name, help=command.help, description=command.help, parents=[_global_options(True)]
        )
        _defaults(subparser)
        command.add_arguments(subparser)
        subparser.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or COMMANDS[args.command].log_level
    configure_logging(level, args.log_format)
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
