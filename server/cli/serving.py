"""Subcommands of the gRPC service: serve, query, ui (a page over it), and demo (which serves
and queries)."""

from __future__ import annotations

import argparse

from google.protobuf.json_format import MessageToDict

from indexer.config import ScoreKind, default_of
from indexer.errors import InvalidInputError
from indexer.query import Query, check_unicode
from influence.v1 import influence_pb2 as pb
from server.app import InfluenceServer, ServerConfig
from server.cli.options import add_options, bounded, from_args
from server.client import (
    ClientOptions,
    InfluenceClient,
    format_query_table,
    format_token_attribution,
    use_color,
)
from server.demo import DemoOptions, ask_demo
from server.ui import PageServer, UiOptions


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ServerConfig)


def run_serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT; exit 0 after a graceful stop."""
    InfluenceServer(from_args(ServerConfig, args)).serve_forever()


# What a QueryRequest's uint32 fields hold.
_COUNT = bounded(int, 0, 2**32 - 1)


def _text(value: str) -> str:
    """An argparse type: text that is valid Unicode (gRPC sends UTF-8; a byte that is not
    UTF-8 reaches Python as a lone surrogate)."""
    try:
        check_unicode("text", value)
    except InvalidInputError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text: {value!r}") from None
    return value


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ClientOptions)
    parser.add_argument(
        "--prompt", type=_text, default="", help="context whose tokens carry no loss"
    )
    parser.add_argument(
        "--completion", type=_text, required=True, help="text whose probability is explained"
    )
    parser.add_argument(
        "-k", "--top-k", type=bounded(int, 1, 2**32 - 1), default=default_of(Query, "top_k"),
        help="hits",
    )  # fmt: skip
    parser.add_argument(
        "--score-kind", type=ScoreKind, choices=list(ScoreKind), help="default: the index's"
    )
    parser.add_argument(
        "--rerank-depth",
        type=_COUNT,
        help="most candidates re-ranked exactly (default: the server's; 0: off)",
    )
    parser.add_argument(
        "--lexical-candidates",
        type=_COUNT,
        default=default_of(Query, "lexical_candidates"),
        help="BM25 matches re-ranked with the index's candidates",
    )
    parser.add_argument("--stream", action="store_true", help="show the sketch answer first")
    parser.add_argument(
        "--attribute",
        type=_COUNT,
        default=1,
        metavar="RANK",
        help="show the token attribution of the hit at this rank (0: none; not with --json)",
    )
    parser.add_argument("--json", action="store_true", help="print the response as JSON")


def run_query(args: argparse.Namespace) -> tuple[object, str]:
    """The top influences, as a table (identical texts grouped) with the token attribution of
    one hit; with --stream the sketch's first, as soon as it came."""
    options = {"top_k": args.top_k, "score_kind": args.score_kind}
    options |= {"rerank_depth": args.rerank_depth, "lexical_candidates": args.lexical_candidates}
    with from_args(ClientOptions, args).connect() as client:
        if not args.stream:
            response = client.query(args.prompt, args.completion, **options)
            data: object = _as_dict(response)
        else:
            responses = []
            for response in client.query_stream(args.prompt, args.completion, **options):
                responses.append(response)
                if not response.final and not args.json:
                    print(f"sketch answer:\n{format_query_table(response)}\n", flush=True)
            data = [_as_dict(r) for r in responses]
        text = format_query_table(response)
        if not args.json and 1 <= args.attribute <= len(response.influences):
            text += "\n" + _attribution(client, args, response.influences[args.attribute - 1])
    return data, text


def _attribution(client: InfluenceClient, args: argparse.Namespace, hit: pb.Influence) -> str:
    """The token attribution of `hit`, shaded where the terminal takes colour."""
    answer = client.attribute_tokens(args.prompt, args.completion, [hit.example_id])
    shown = format_token_attribution(answer.attributions[0], color=use_color())
    return f"\ntoken attribution of rank {args.attribute}: {shown}"


def _as_dict(response: object) -> dict:
    return MessageToDict(
        response,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, UiOptions)
    add_options(parser, ClientOptions)


def run_ui(args: argparse.Namespace) -> None:
    """Serve the page over the service at --target until SIGINT/SIGTERM."""
    with from_args(ClientOptions, args).connect() as client:
        PageServer(client, from_args(UiOptions, args)).serve_forever()


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DemoOptions)
    parser.add_argument("--rebuild", action="store_true", help="build a new index version")
    parser.add_argument("--json", action="store_true", help="print the answers as JSON")


def run_demo(args: argparse.Namespace) -> tuple[object, str]:
    """The demo's answers (`server.demo`)."""
    demo = ask_demo(from_args(DemoOptions, args), rebuild=args.rebuild, progress=not args.quiet)
    lines = [
        f"demo model: {demo.artifacts.model_dir} (completes {demo.artifacts.fact_accuracy:.0%} "
        "of the corpus's fact prompts correctly)\n"
    ]
    for q, response, ranks in zip(demo.queries, demo.responses, demo.gold_ranks(), strict=True):
        lines.append(f"query: {q.query.prompt!r} -> {q.query.completion!r}")
        lines.append(format_query_table(response))
        found = ", ".join(map(str, ranks)) or "none"
        lines.append(f"documents stating this fact (gold) at ranks: {found}\n")
    lines.append("token-level influence of the top result on the first query:")
    lines.append(format_token_attribution(demo.attribution, color=use_color()))
    return demo.to_dict(), "\n".join(lines)
