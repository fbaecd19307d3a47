"""Path and query parameters shared by the admin routers, bounded so no value reaches the database
that its integer columns cannot hold (an out-of-range id is a clear 422, never a driver error)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

# Ids are INTEGER columns: 32-bit signed on PostgreSQL, the narrowest of the supported databases.
MAX_ROW_ID = 2**31 - 1

RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="The row's id")]
Version = Annotated[
    int | None, Query(ge=0, le=MAX_ROW_ID, description="Apply only if this is the current policy version")
]
