"""Log lines: JSON objects (``arbiter serve``) or readable text (``arbiter demo``), with the trace id.

Every line has the time (UTC, ISO 8601), level, logger and message, and the current trace and span ids
when a span is current (traces on; the tracing step makes the request's SERVER span current). Arbiter
never logs credentials; as a safety net for what a library might put in a message (an exception naming a
header, say), bearer values, JWTs and Arbiter API keys are masked in every line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Literal

from opentelemetry.trace import get_current_span

LogFormat = Literal["json", "text"]

# Credentials shaped as Arbiter writes or receives them: masked wherever they appear in a line.
_SECRETS = re.compile(
    r"(?i:\b(?:bearer|basic)[ \t]+)[A-Za-z0-9._~+/=-]{8,}"  # an Authorization value
    r"|\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # a JWT (header.payload.signature)
    r"|\barb_[A-Za-z0-9_-]{8,}"  # an Arbiter API key (auth/apikeys.py)
)
_MASK = "[REDACTED]"
_HANDLER_NAME = "arbiter"  # the handler configure_logging installs (and replaces when called again)


def scrub(text: str) -> str:
    """``text`` with credential-shaped values masked."""
    return _SECRETS.sub(_MASK, text)


def _trace_ids() -> tuple[str, str] | None:
    context = get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def _timestamp(record: logging.LogRecord) -> str:
    return (
        datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``message``, then ``trace_id``/``span_id``
    and ``exception`` when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        ids = _trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> [trace=<id> span=<id>]``, for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        ids = _trace_ids()
        if ids is not None:
            text += f" [trace={ids[0]} span={ids[1]}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return scrub(text)


def configure_logging(fmt: LogFormat, level: str | int, stream: IO[str] | None = None) -> logging.Handler:
    """Send every logger's lines (uvicorn's too, when it is given ``log_config=None``) through one handler
    on the root logger in ``fmt``; calling it again replaces that handler. Returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
