"""`influence-index serve` and `influence-index query`: arguments and entry points."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from indexer.errors import InfluenceIndexError
from server.app import InfluenceServer, ServerConfig
from server.auth import load_token
from server.client import InfluenceClient, format_query_table

_DEFAULTS = ServerConfig(index_root=Path("."))
_MIB = 1024 * 1024


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument(
        "--index",
        type=Path,
        required=True,
        metavar="ROOT",
        help="published index root (holds CURRENT)",
    )
    parser.add_argument(
        "--host", default=d.host, help="address to listen on (0.0.0.0: all interfaces)"
    )
    parser.add_argument("--port", type=int, default=d.port, help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--device",
        default=d.device,
        help="torch device for the query model: cpu, cuda, cuda:1, ...",
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
        default=d.max_batch_size,
        help="queries per forward/backward pass",
    )
    batching.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="longest a query waits for others to share its batch, in milliseconds",
    )
    batching.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="queued queries beyond which requests get RESOURCE_EXHAUSTED",
    )
    batching.add_argument("--max-top-k", type=int, default=d.max_top_k)
    batching.add_argument(
        "--max-queries-per-batch",
        type=int,
        default=d.max_queries_per_batch,
        help="largest QueryBatch request",
    )
    batching.add_argument(
        "--max-attribution-examples",
        type=int,
        default=d.max_attribution_examples,
        help="most example ids per AttributeTokens request",
    )
    batching.add_argument(
        "--workers",
        type=int,
        default=d.max_workers,
        help="gRPC threads, also the limit on concurrent RPCs",
    )
    batching.add_argument(
        "--max-message-mb",
        type=float,
        default=d.max_message_bytes / _MIB,
        help="largest gRPC message, in MiB",
    )
    lifecycle = parser.add_argument_group("reload and shutdown")
    lifecycle.add_argument(
        "--poll-seconds",
        type=float,
        default=d.poll_seconds,
        help="how often to check CURRENT for a new version (SIGHUP checks at once)",
    )
    lifecycle.add_argument(
        "--grace-seconds",
        type=float,
        default=d.grace_seconds,
        help="time in-flight requests get to finish on SIGTERM/SIGINT",
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
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug logs one line per request with its timings",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful stop, 2 on a configuration error."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
        max_message_bytes=int(args.max_message_mb * _MIB),
    )
    try:
        InfluenceServer(config).serve_forever()
    except InfluenceIndexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT")
    parser.add_argument("--prompt", default="", help="context whose tokens carry no loss")
    parser.add_argument("--completion", required=True, help="text whose probability is explained")
    parser.add_argument("-k", "--top-k", type=int, default=10)
    parser.add_argument(
        "--score-kind", choices=["influence", "cosine"], help="default: the index's"
    )
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    parser.add_argument(
        "--tls-ca", type=Path, help="CA (PEM) of the server certificate; turns TLS on"
    )
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM), for mutual TLS")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")


def run_query(args: argparse.Namespace) -> int:
    """Print the top influences as a table or JSON; 1 on an RPC error, 2 on bad input."""
    try:
        client = InfluenceClient(
            args.target,
            token=load_token(args.token_file),
            tls_ca_file=args.tls_ca,
            tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key,
            timeout_s=args.timeout,
        )
    except InfluenceIndexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            response = client.query(
                args.prompt, args.completion, top_k=args.top_k, score_kind=args.score_kind
            )
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
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
