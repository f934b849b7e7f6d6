"""`influence-index`: the one command-line layer, a subcommand per job.

Options are generated from the library's and the server's config dataclasses (`options`), so
`--help` shows what a run would use. A subcommand's handler returns what it reports, (data,
text), printed as JSON with --json and as text otherwise. Global options (`--log-level`,
`--threads`, `-q`) go before or after the subcommand. Errors a person can act on print as one
line on stderr with exit code 2 (an RPC that failed otherwise: 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps

import grpc

from indexer import __version__
from indexer.errors import InfluenceIndexError, UnavailableError
from server.cli import evaluation, index, serving
from server.logs import LOG_FORMATS, configure_logging

Handler = Callable[[argparse.Namespace], tuple[object, str] | None]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler
    log_level: str = "WARNING"  # when --log-level is not given


COMMANDS = {
    "demo": Command(
        "build, serve and query the bundled demo", serving.add_demo_arguments, serving.run_demo
    ),
    "build": Command(
        "build and publish an index version", index.add_build_arguments, index.run_build
    ),
    "serve": Command(
        "serve a published index over gRPC",
        serving.add_serve_arguments,
        serving.run_serve,
        log_level="INFO",
    ),
    "query": Command("query a running server", serving.add_query_arguments, serving.run_query),
    "ui": Command(
        "a web page over a running server",
        serving.add_ui_arguments,
        serving.run_ui,
        log_level="INFO",
    ),
    "info": Command("describe a published index", index.add_info_arguments, index.run_info),
    "eval": Command(
        "measure an index against exact influence",
        evaluation.add_eval_arguments,
        evaluation.run_eval,
    ),
    "exact": Command(
        "exact EK-FAC scores (small models)", evaluation.add_exact_arguments, evaluation.run_exact
    ),
    "pin": Command("make every server serve one version", index.add_pin_arguments, index.run_pin),
    "rollback": Command(
        "point CURRENT back at an earlier version",
        index.add_rollback_arguments,
        index.run_rollback,
    ),
}


# A failed RPC whose cause the user can fix (the request, the token, the index) exits 2, like
# bad input; one the server or the network may get over (UNAVAILABLE, DEADLINE_EXCEEDED,
# RESOURCE_EXHAUSTED, INTERNAL) exits 1: worth a retry.
_YOURS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default:" in text else super()._get_help_string(action)


def cli_errors(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Run `handler` and print its report; the one error handler: a library error, a path
    the system refuses or a failed RPC becomes one line on stderr."""

    @wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            report = handler(args)
        except (UnavailableError, TimeoutError, ConnectionError) as exc:  # worth a retry
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except InfluenceIndexError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a path that is not what it should be: a file for a directory
            where = f": {exc.filename}" if exc.filename else ""
            print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2 if exc.code() in _YOURS else 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        if report is not None:
            data, text = report
            print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text)
        return 0

    return run


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """Options every subcommand accepts. On the subcommands their defaults are suppressed, so
    that an option given before the subcommand is not reset by the subcommand's parser."""
    parser = argparse.ArgumentParser(
        add_help=False, argument_default=argparse.SUPPRESS if suppress else None
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: INFO for serve, WARNING otherwise)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as text or as one JSON object each (default: text)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 on a small machine shared with others)"
    )
    if not suppress:
        parser.set_defaults(log_format="text")
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
            name,
            help=command.help,
            description=command.help,
            parents=[_global_options(True)],
            formatter_class=_HelpFormatter,
        )
        command.add_arguments(subparser)
        subparser.set_defaults(handler=cli_errors(command.run))
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
