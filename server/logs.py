"""Log output (text or one JSON object per line) and the request id that log lines carry.

The servicer runs each RPC inside `request_scope`, so every line logged on that request's
thread names its request id: the caller's `x-request-id` metadata, or a generated one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone

REQUEST_ID_KEY = "x-request-id"
LOG_FORMATS = ("text", "json")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A caller's id is logged verbatim, so it may not carry spaces, quotes or line breaks.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


@contextmanager
def request_scope(offered: str | bytes | None) -> Iterator[str]:
    """Bind a request id for the body: `offered` when it is a safe token, else a new one."""
    if isinstance(offered, bytes):
        offered = offered.decode("ascii", "replace")
    request_id = offered if offered and _SAFE_ID.fullmatch(offered) else uuid.uuid4().hex
    token = _request_id.set(request_id)
    try:
        yield request_id
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


class TextFormatter(logging.Formatter):
    """The classic one-line format, plus ` request_id=...` inside a request."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = _request_id.get()
        return f"{line} request_id={request_id}" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, request_id
    (inside a request) and exception (a traceback, when one is logged)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _request_id.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level` in `log_format` ('text' or 'json'). The handler holds the level
    too: libraries that set their own logger's level lower (bm25s sets DEBUG) stay quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler])
