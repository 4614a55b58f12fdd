"""Small text and time helpers shared by the bench modules."""

from __future__ import annotations

from datetime import datetime, timezone


def first_line(text: object, limit: int | None = None) -> str:
    """The first non-empty line of ``text`` (stripped), cut to ``limit`` characters with
    ``...`` when longer; ``""`` for empty text."""
    lines = str(text or "").strip().splitlines()
    line = lines[0].strip() if lines else ""
    if limit is None or len(line) <= limit:
        return line
    return line[: limit - 3] + "..."


def utc_timestamp() -> str:
    """Now, in UTC, as an ISO 8601 string to the second (``2026-01-01T00:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
