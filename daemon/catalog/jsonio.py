"""JSON objects in the store, one way for every writer and reader: stable bytes, one timestamp
format, and reading that tells "missing" and "damaged" apart from a failing store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from daemon import logs
from daemon.storage import Storage, StorageError


def utc_now() -> str:
    """The one timestamp format of stored metadata: ISO 8601, UTC, '+00:00'."""
    return datetime.now(UTC).isoformat()


def json_bytes(obj: Any) -> bytes:
    """Stable JSON for the store: sorted keys, UTF-8, no NaN (other tools reject it)."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode()


async def read_object(storage: Storage, key: str) -> dict[str, Any] | None:
    """The JSON object at `key`; None when it is missing or damaged (logged).

    A failing store raises StorageError: a transient failure must not read as "not there".
    """
    try:
        data = await storage.get(key)
    except StorageError as exc:
        if exc.missing:
            return None
        raise
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        obj = exc
    if not isinstance(obj, dict):
        logs.get(__name__).warning("skipping unreadable JSON object", key=key, error=str(obj)[:200])
        return None
    return obj
