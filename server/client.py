"""Python client of InfluenceService, and renderers of its answers for a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer.config import ScoreKind
from indexer.errors import InvalidInputError
from indexer.query import Query
from influence.v1 import influence_pb2 as pb
from influence.v1 import influence_pb2_grpc
from server.auth import load_token, read_pem
from server.messages import query_request

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_TARGET = "127.0.0.1:50051"

# Without colour, tokens whose |score| reaches this fraction of the largest are bracketed.
_VISIBLE = 0.2
# ANSI 256-colour backgrounds, faint to strong, for |score| / largest |score| in
# [0.1, 0.3), [0.3, 0.5), [0.5, 0.7), [0.7, 0.9), [0.9, 1]; fainter tokens are not shaded.
_SHADE_STEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
_GREENS = (194, 157, 120, 83, 46)  # raise the completion's probability
_REDS = (224, 217, 210, 203, 196)  # lower it
_ANSI_RESET = "\x1b[0m"


@dataclass(frozen=True)
class ClientOptions:
    """How a command-line client reaches a server."""

    target: str = field(default=DEFAULT_TARGET, metadata={"help": "server", "metavar": "HOST:PORT"})
    token_file: Path | None = field(
        default=None, metadata={"help": "file holding the server's bearer token"}
    )
    tls_ca_file: Path | None = field(
        default=None,
        metadata={
            "help": "CA (PEM) of the server certificate; turns TLS on (so does --tls-cert, "
            "with the system's CAs)",
            "flags": ("--tls-ca",),
        },
    )
    tls_cert_file: Path | None = field(
        default=None,
        metadata={"help": "client certificate (PEM), for mutual TLS", "flags": ("--tls-cert",)},
    )
    tls_key_file: Path | None = field(
        default=None,
        metadata={"help": "client private key (PEM), for mutual TLS", "flags": ("--tls-key",)},
    )
    timeout_s: float = field(
        default=DEFAULT_TIMEOUT_S, metadata={"help": "seconds", "flags": ("--timeout",)}
    )

    def connect(self) -> InfluenceClient:
        return InfluenceClient(
            self.target,
            token=load_token(self.token_file),
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            timeout_s=self.timeout_s,
        )


class InfluenceClient:
    """A channel to one server. Errors surface as grpc.RpcError (see .code(), .details()).

    TLS when a CA or a client certificate is given (without a CA, the system's roots check the
    server); mutual TLS when a client certificate and key are given.
    `tls_server_name` overrides the name checked against the server certificate.
    Timeouts are in seconds.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca_file: Path | None = None,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        tls_server_name: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if (tls_cert_file is None) != (tls_key_file is None):
            raise InvalidInputError("mutual TLS needs both a client certificate and its key")
        if tls_ca_file is None and tls_cert_file is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if tls_server_name is not None:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_pem(tls_ca_file) if tls_ca_file else None,
                private_key=read_pem(tls_key_file) if tls_key_file else None,
                certificate_chain=read_pem(tls_cert_file) if tls_cert_file else None,
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = influence_pb2_grpc.InfluenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout_s = timeout_s

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def query(
        self, prompt: str, completion: str, *, timeout_s: float | None = None, **options: object
    ) -> pb.QueryResponse:
        """The top influences (`options`: see `request`)."""
        request = self.request(prompt, completion, **options)
        return self._stub.Query(request, **self._call_options(timeout_s))

    def query_stream(
        self, prompt: str, completion: str, *, timeout_s: float | None = None, **options: object
    ) -> Iterator[pb.QueryResponse]:
        """QueryStream: a re-ranked query's sketch answer first (`final` False) as soon as the
        server searched its index, then the final, exact one (`options`: see `request`)."""
        request = self.request(prompt, completion, **options)
        return self._stub.QueryStream(request, **self._call_options(timeout_s))

    @staticmethod
    def request(
        prompt: str,
        completion: str,
        *,
        top_k: int = 10,
        score_kind: ScoreKind | str | None = None,
        include_text: bool = True,
        include_layer_scores: bool = False,
        rerank_depth: int | None = None,
        lexical_candidates: int = 0,
    ) -> pb.QueryRequest:
        """`rerank_depth`: at most this many candidates re-ranked exactly (None: the server's
        default; 0: off); `lexical_candidates`: BM25 matches re-ranked with them."""
        query = Query(
            prompt,
            completion,
            top_k,
            _score_kind(score_kind),
            include_text,
            include_layer_scores,
            rerank_depth,
            lexical_candidates,
        )
        return query_request(query)

    def query_batch(
        self,
        queries: Sequence[tuple[str, str]],
        *,
        top_k: int = 10,
        score_kind: ScoreKind | str | None = None,
        include_text: bool = True,
        include_layer_scores: bool = False,
        rerank_depth: int | None = None,
        timeout_s: float | None = None,
    ) -> pb.QueryBatchResponse:
        """(prompt, completion) pairs, all with the same options; answers in the same order."""
        requests = [
            self.request(
                p,
                c,
                top_k=top_k,
                score_kind=score_kind,
                include_text=include_text,
                include_layer_scores=include_layer_scores,
                rerank_depth=rerank_depth,
            )
            for p, c in queries
        ]
        return self._stub.QueryBatch(
            pb.QueryBatchRequest(queries=requests), **self._call_options(timeout_s)
        )

    def attribute_tokens(
        self,
        prompt: str,
        completion: str,
        example_ids: Sequence[int],
        *,
        timeout_s: float | None = None,
    ) -> pb.AttributeTokensResponse:
        request = pb.AttributeTokensRequest(
            prompt=prompt, completion=completion, example_ids=list(example_ids)
        )
        return self._stub.AttributeTokens(request, **self._call_options(timeout_s))

    def info(self, *, timeout_s: float | None = None) -> pb.GetIndexInfoResponse:
        return self._stub.GetIndexInfo(pb.GetIndexInfoRequest(), **self._call_options(timeout_s))

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... for the server ('') or one service name."""
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), **self._call_options(timeout_s)
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _call_options(self, timeout_s: float | None) -> dict[str, object]:
        return {
            "timeout": timeout_s if timeout_s is not None else self._timeout_s,
            "metadata": self._metadata,
        }


def _score_kind(kind: ScoreKind | str | None) -> ScoreKind | None:
    return None if kind is None else ScoreKind(kind)


def group_identical(hits: Sequence[pb.Influence]) -> list[list[int]]:
    """Indices of `hits` grouped by identical text, in order of first appearance; a hit
    without text is a group of its own."""
    groups: dict[str | int, list[int]] = {}
    for i, hit in enumerate(hits):
        groups.setdefault(hit.text or i, []).append(i)
    return list(groups.values())


def format_query_table(response: pb.QueryResponse, *, excerpt_chars: int = 72) -> str:
    """Rank, score, doc id (#chunk) and a one-line text excerpt per influence; hits with
    identical texts are one row (the first's), followed by their count and ranks."""
    t = response.timings
    lines = [
        f"index {response.index_version}: {len(response.influences)} influences, "
        f"{response.n_completion_tokens} completion tokens, {t.total_us / 1000:.1f} ms "
        f"(gradient {t.gradient_us / 1000:.1f} ms, search {t.search_us / 1000:.1f} ms)"
    ]
    if response.candidates_reranked:
        stop = pb.RerankStop.Name(response.rerank_stop).removeprefix("RERANK_STOP_").lower()
        lines[0] = lines[0][:-1] + (
            f", exact re-rank of {response.candidates_reranked} candidates "
            f"{t.rerank_us / 1000:.1f} ms, stopped: {stop})"
        )
    hits = response.influences
    groups = group_identical(hits)
    docs = [f"{printable(hits[g[0]].doc_id)}#{hits[g[0]].chunk}" for g in groups]
    doc_width = max([len("doc id"), *map(len, docs)])
    lines.append(f"{'rank':>4}  {'score':>10}  {'doc id':<{doc_width}}  text")
    for group, doc in zip(groups, docs, strict=True):
        hit = hits[group[0]]
        excerpt = _excerpt(hit.text, excerpt_chars)
        if len(group) > 1:
            ranks = ", ".join(str(i + 1) for i in group)
            excerpt += f"  (×{len(group)} identical, ranks {ranks})"
        mark = "*" if hit.exact else " "
        row = f"{group[0] + 1:>4}  {hit.score:>10.4g}{mark} {doc:<{doc_width}}  {excerpt}"
        lines.append(row.rstrip())
    if any(hit.exact for hit in hits):
        lines.append("* exact EK-FAC score (re-ranked); others are sketch estimates")
    return "\n".join(lines)


def use_color() -> bool:
    """Whether stdout takes ANSI colours: a terminal, and NO_COLOR (no-color.org) unset."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def format_token_attribution(attribution: pb.TokenAttribution, *, color: bool = False) -> str:
    """The training example's text with its influential tokens marked.

    With colour, every token whose |score| reaches 10% of the largest gets an ANSI 256-colour
    background, the deeper the stronger (green raises the completion's probability, red
    lowers it); without, tokens reaching 20% are bracketed with their score.
    """
    header = (
        f"example {attribution.example_id} (doc {printable(attribution.doc_id)}), "
        f"influence {attribution.total:+.4g} (sum over its tokens)"
    )
    peak = max((abs(s) for s in attribution.scores), default=0.0)
    mark = _shade if color else _bracket
    pieces = [
        mark(printable(token), score / peak if peak else 0.0, score)
        for token, score in zip(attribution.tokens, attribution.scores, strict=True)
    ]
    return f"{header}\n{''.join(pieces)}"


def _shade(token: str, relative: float, _score: float) -> str:
    step = sum(abs(relative) >= s for s in _SHADE_STEPS)
    if step == 0:
        return token
    background = (_GREENS if relative > 0 else _REDS)[step - 1]
    return f"\x1b[48;5;{background};38;5;16m{token}{_ANSI_RESET}"


def _bracket(token: str, relative: float, score: float) -> str:
    if abs(relative) < _VISIBLE:
        return token
    # Leading whitespace stays outside the mark so that words stay separated.
    word = token.lstrip()
    space = token[: len(token) - len(word)]
    return f"{space}[{word} {score:+.2g}]"


def _excerpt(text: str, limit: int) -> str:
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def printable(text: str) -> str:
    """`text` with control characters (ESC, BEL, ...) shown as escapes: text from the index must
    not drive the terminal."""
    return "".join(
        c if c.isprintable() or c in "\t\n" else c.encode("unicode_escape").decode() for c in text
    )
