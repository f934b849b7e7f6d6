"""`influence-index ui`: a page over a running InfluenceService (Starlette, served by uvicorn).

Every answer comes from the service through `server.client.InfluenceClient` (the same auth and
TLS options as `query`): the page's JSON API is a thin translation of its calls.

- `GET /api/info`: GetIndexInfo.
- `POST /api/query` (JSON form fields): QueryStream as NDJSON, one line per message,
  `{"response": ..., "groups": [[hit indices with identical texts], ...]}`: the sketch answer
  as soon as the service sent it, then the exact one. An error before the first message is an
  HTTP error, one after it a line `{"error": ...}`; an error is always
  `{"error": {"code": "INVALID_ARGUMENT", "message": "<the service's message>"}}`.
- `POST /api/attribute` (`prompt`, `completion`, `example_ids`): AttributeTokens.

int64 fields (example ids) travel as JSON strings, as protobuf's JSON mapping has them, so
that a browser does not round them to a double.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from indexer.config import ScoreKind
from indexer.errors import InvalidInputError
from indexer.query import check_unicode
from server.client import InfluenceClient, group_identical

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
_THREAD_TIMEOUT_S = 10.0  # to start, and to stop
# The service's status -> the page server's HTTP status; any other failure is 502.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_MAX_UINT32 = 2**32 - 1  # top_k, rerank_depth, lexical_candidates in the request
_INT64 = range(-(2**63), 2**63)  # example ids


@dataclass(frozen=True)
class UiOptions:
    """Where the page is served."""

    host: str = field(
        default="127.0.0.1", metadata={"help": "address to serve the page on (all: 0.0.0.0)"}
    )
    port: int = field(
        default=8080,
        metadata={"help": "HTTP port of the page (0: any free one)", "min": 0, "max": 65535},
    )


class FormError(ValueError):
    """A form field the page server cannot turn into a request (not a number, ...)."""


@dataclass(frozen=True)
class PageQuery:
    """The query form's fields; `rerank_depth` None: the service's default."""

    prompt: str
    completion: str
    top_k: int
    score_kind: ScoreKind | None
    rerank_depth: int | None
    lexical_candidates: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PageQuery:
        kind = body.get("score_kind") or None
        # Not text (a list, ...) is no score kind either, and not hashable for `in set(...)`.
        if kind is not None and (not isinstance(kind, str) or kind not in set(ScoreKind)):
            raise FormError(f"score kind must be one of {', '.join(ScoreKind)}, got {kind!r}")
        depth = body.get("rerank_depth")
        return cls(
            prompt=_text(body, "prompt"),
            completion=_text(body, "completion"),
            top_k=_count(body.get("top_k"), "k"),
            score_kind=None if kind is None else ScoreKind(kind),
            rerank_depth=None if depth in (None, "") else _count(depth, "re-rank depth"),
            lexical_candidates=_count(body.get("lexical_candidates", 0), "lexical candidates"),
        )

    def options(self) -> dict[str, object]:
        """Keywords of `InfluenceClient.query_stream`."""
        return {
            "top_k": self.top_k,
            "score_kind": self.score_kind,
            "include_text": True,
            "include_layer_scores": True,
            "rerank_depth": self.rerank_depth,
            "lexical_candidates": self.lexical_candidates,
        }


def create_app(client: InfluenceClient) -> Starlette:
    """The page and its JSON API over `client` (which the caller closes)."""

    async def page(_: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def info(_: Request) -> Response:
        try:
            return JSONResponse(_as_dict(await run_in_threadpool(client.info)))
        except grpc.RpcError as exc:
            return _rpc_error(exc)

    async def query(request: Request) -> Response:
        try:
            form = PageQuery.from_json(await _json_object(request))
            stream = client.query_stream(form.prompt, form.completion, **form.options())
            first = await run_in_threadpool(next, stream)
        except FormError as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        except grpc.RpcError as exc:
            return _rpc_error(exc)
        return StreamingResponse(_ndjson(first, stream), media_type="application/x-ndjson")

    async def attribute(request: Request) -> Response:
        try:
            body = await _json_object(request)
            ids = _example_ids(body.get("example_ids", []))
            answer = await run_in_threadpool(
                client.attribute_tokens, _text(body, "prompt"), _text(body, "completion"), ids
            )
        except FormError as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        except grpc.RpcError as exc:
            return _rpc_error(exc)
        return JSONResponse(_as_dict(answer))

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/query", query, methods=["POST"]),
        Route("/api/attribute", attribute, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


class PageServer:
    """The page's HTTP server: in the foreground (`serve_forever`) or on a thread (`start`,
    `stop`). Its socket is bound at construction, so `port` is known at once."""

    def __init__(self, client: InfluenceClient, options: UiOptions) -> None:
        try:
            self._socket = socket.create_server((options.host, options.port))
        except OSError as exc:  # the port is taken, the host unknown or not this machine's, ...
            # create_server appends "(while attempting to bind on address ...)": said below.
            reason = (exc.strerror or str(exc)).partition(" (while attempting")[0]
            raise InvalidInputError(
                f"cannot serve the page on {options.host}:{options.port}: {reason}"
            ) from exc
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(create_app(client), log_config=None, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (when on the main thread) or `stop`."""
        log.info("page at http://%s:%d/", *self._socket.getsockname()[:2])
        self._server.run(sockets=[self._socket])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="ui", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _THREAD_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the page server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_THREAD_TIMEOUT_S)
        self._socket.close()


def _ndjson(first: Message, rest: Iterator[Message]) -> Iterator[str]:
    """The stream's messages as JSON lines; a failure after the first is a last line."""
    yield _answer_line(first)
    try:
        for response in rest:
            yield _answer_line(response)
    except grpc.RpcError as exc:
        log.info("query stream failed: %s: %s", exc.code().name, exc.details())
        yield json.dumps(_error_body(exc.code().name, exc.details())) + "\n"


def _answer_line(response: Message) -> str:
    groups = group_identical(response.influences)
    return json.dumps({"response": _as_dict(response), "groups": groups}) + "\n"


def _as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise FormError("the request body is not JSON") from exc
    if not isinstance(body, dict):
        raise FormError("the request body is not a JSON object")
    return body


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise FormError(f"{name} must be text")
    try:
        check_unicode(name, value)
    except InvalidInputError as e:
        raise FormError(str(e)) from None
    return value


def _count(value: object, name: str) -> int:
    """A whole number 0 .. 2**32-1 (the request's uint32) from a form field (a JSON number or
    its text); the service checks its own, lower limits."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise FormError(f"{name} must be a whole number, got {value!r}") from None
    if number < 0:
        raise FormError(f"{name} must not be negative, got {number}")
    if number > _MAX_UINT32:
        raise FormError(f"{name} must be at most {_MAX_UINT32}, got {number}")
    return number


def _example_ids(value: object) -> list[int]:
    """The request's int64 example ids from a JSON list of numbers or their text."""
    # A string is iterable too: its characters would pass for ids.
    if not isinstance(value, list):
        raise FormError(f"example_ids must be a list, got {value!r}")
    return [_example_id(i) for i in value]


def _example_id(value: object) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise FormError(f"example ids must be integers, got {value!r}") from None
    if number not in _INT64:
        raise FormError(f"example ids must be 64-bit integers, got {value!r}")
    return number


def _rpc_error(exc: grpc.RpcError) -> Response:
    code = exc.code()
    log.info("%s: %s", code.name, exc.details())
    return _error(_HTTP_STATUS.get(code, 502), code.name, exc.details() or code.name)


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse(_error_body(code, message), status_code=status)


def _error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}
