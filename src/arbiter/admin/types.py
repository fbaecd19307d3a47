"""The admin API's one timestamp format: RFC 3339, UTC, millisecond precision, ``Z`` suffix.

``2026-12-02T10:00:00.123Z``, always three fractional digits, as the audit log writes its records
(``audit.record.iso_ms``), so one parser and one regex fit every timestamp the API returns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import PlainSerializer, WithJsonSchema

UTC_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"


def utc_text(moment: datetime) -> str:
    """``moment`` in the API's format. Naive datetimes are UTC: SQLite returns them without a zone."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.strftime("%Y-%m-%dT%H:%M:%S.") + f"{aware.microsecond // 1000:03d}Z"


UtcDateTime = Annotated[
    datetime,
    PlainSerializer(utc_text, return_type=str, when_used="always"),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "pattern": UTC_PATTERN,
            "examples": ["2026-12-02T10:00:00.123Z"],
        },
        mode="serialization",
    ),
]
