"""JSON objects in the store, one way for every writer and reader: stable bytes, one timestamp
format, and reading that tells "missing" and "damaged" apart from a failing store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from daemon import logs
from daemon.storage import Storage, StorageError

# The records read here (job.json, statuses, pruning records) are a few KiB. Anything near this
# is damage or malice, and reading it whole would cost its size in memory for every `ckptd ls`.
MAX_OBJECT_BYTES = 4 << 20


def utc_now() -> str:
    """The one timestamp format of stored metadata: ISO 8601, UTC, '+00:00'."""
    return datetime.now(UTC).isoformat()


def json_bytes(obj: Any) -> bytes:
    """Stable JSON for the store: sorted keys, UTF-8, no NaN (other tools reject it)."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode()


async def read_object(storage: Storage, key: str) -> dict[str, Any] | None:
    """The JSON object at `key`; None when it is missing or damaged (logged): malformed, or larger
    than MAX_OBJECT_BYTES.

    A failing store raises StorageError: a transient failure must not read as "not there".
    """
    data = await _read_bounded(storage, key)
    if data is None:
        return None
    if len(data) > MAX_OBJECT_BYTES:
        error = f"larger than {MAX_OBJECT_BYTES} bytes"
        logs.get(__name__).warning("skipping unreadable JSON object", key=key, error=error)
        return None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        obj = exc
    if not isinstance(obj, dict):
        logs.get(__name__).warning("skipping unreadable JSON object", key=key, error=str(obj)[:200])
        return None
    return obj


async def _read_bounded(storage: Storage, key: str) -> bytes | None:
    """At most MAX_OBJECT_BYTES + 1 bytes of the object (one more tells "too large"); None if missing.

    One ranged get, not head then get: nothing can grow between the two.
    """
    try:
        return await storage.get(key, 0, MAX_OBJECT_BYTES + 1)
    except StorageError as exc:
        if exc.missing:
            return None
        if exc.code == "InvalidRange":
            return b""  # S3 finds no byte range satisfiable in an empty object
        raise
