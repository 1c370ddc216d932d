"""The store as the uploader has seen it: one owner, fed by every request, read by /readyz and /status.

Transfer, publisher and recovery hand it each request's outcome (`observe`) and each final failure
(`failed`); a stored file clears a permanent refusal, since the store evidently accepts us again.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from daemon.storage import StorageError

RECENT_ERRORS = 20


class StoreHealth:
    def __init__(self) -> None:
        self.reachable: bool | None = None  # None until the first request
        self.permanent: StorageError | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)

    def observe(self, error: StorageError | None) -> None:
        """Every storage request's outcome (None for success)."""
        if error is None:
            self.reachable = True
            return
        self.reachable = error.code != "NetworkError"
        self.recent.append(
            {
                "at": time.time(),
                "op": error.op,
                "key": error.key,
                "code": error.code,
                "message": error.message[:300],
                "transient": error.transient,
            }
        )

    def failed(self, error: StorageError) -> None:
        """A request given up on: a permanent refusal makes the daemon not ready until a file is stored."""
        if not error.transient:
            self.permanent = error

    def stored(self) -> None:
        self.permanent = None

    def not_ready(self) -> list[str]:
        if self.permanent is not None:
            return [f"storage refuses requests: {self.permanent.code} ({self.permanent.op})"]
        if self.reachable is False:
            return ["storage not reachable"]
        return []
