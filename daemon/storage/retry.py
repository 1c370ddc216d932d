"""Retry or give up: transient storage errors are retried with backoff and jitter until a deadline.

Permanent errors (access denied, no such bucket, bad credentials) are raised at once: retrying
them in a loop only hides the problem and hammers the store.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from prometheus_client import Counter

from daemon import metrics
from daemon.storage import StorageError

T = TypeVar("T")
BASE_DELAY = 0.2
MAX_DELAY = 20.0
log = structlog.get_logger()


def backoff(attempt: int, rand: float, base: float = BASE_DELAY, cap: float = MAX_DELAY) -> float:
    """Delay before retry number `attempt` (1-based): "equal jitter" exponential backoff.

    | attempt | rand | delay (base 0.2, cap 20)          |
    |---------|------|-----------------------------------|
    | 1       | 0.0  | 0.1   (half of 0.2)               |
    | 1       | 1.0  | 0.2                               |
    | 3       | 0.5  | 0.6   (0.8/2 + 0.5 * 0.8/2)       |
    | 20      | 0.0  | 10.0  (capped at 20, half of it)  |
    | 20      | 1.0  | 20.0                              |

    Half of the delay is fixed so retries never hammer; half is random so many ranks that failed
    together do not retry together.
    """
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return ceiling / 2 + rand * ceiling / 2


class Deadline:
    """When retrying must stop: unset (retry forever) until someone sets it.

    One object per process phase, owned by whoever decides (the drain, a restore's retry window)
    and read by every retry loop at each failure, so a change applies to requests already waiting.
    """

    def __init__(self, at: float | None = None) -> None:
        self._at = at
        self._cap: float | None = None  # an upper bound asked for before the deadline was set

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @property
    def at(self) -> float | None:
        """The time.monotonic() value after which no retry starts; None while unset."""
        return self._at

    @property
    def is_set(self) -> bool:
        return self._at is not None

    def start(self, seconds: float) -> None:
        """Set it `seconds` from now, or sooner if `shorten` asked for that before."""
        at = time.monotonic() + _finite(seconds)
        self._at = at if self._cap is None else min(at, self._cap)

    def shorten(self, seconds: float) -> None:
        """At most `seconds` from now, whether or not it is set yet (a second stop signal)."""
        at = time.monotonic() + _finite(seconds)
        self._cap = at if self._cap is None else min(self._cap, at)
        if self._at is not None:
            self._at = min(self._at, at)

    def grace(self, seconds: float) -> None:
        """A last short window after the drain: `seconds` past the deadline or past now, whichever is earlier."""
        self._at = min(self._at if self._at is not None else time.monotonic(), time.monotonic()) + _finite(seconds)

    def passed(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at


def _finite(seconds: float) -> float:
    # NaN compares false with everything: a deadline of NaN would never pass, and a drain never end.
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a deadline needs a finite, non-negative number of seconds, not {seconds!r}")
    return seconds


def should_retry(error: StorageError, attempt_delay: float, now: float, deadline: float | None) -> bool:
    """Retry when the error is transient and the next attempt starts before the deadline.

    | transient | deadline      | now + delay < deadline | retry |
    |-----------|---------------|------------------------|-------|
    | no        | any           | any                    | no    |
    | yes       | None (none)   | -                      | yes   |
    | yes       | set           | yes                    | yes   |
    | yes       | set           | no                     | no    |
    """
    if not error.transient:
        return False
    return deadline is None or now + attempt_delay < deadline


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    deadline: Deadline,
    context: dict | None = None,
    counter: Counter | None = metrics.UPLOAD_RETRIES,
    observe: Callable[[StorageError | None], None] | None = None,
) -> T:
    """Run `call` until it succeeds, a permanent error, or the deadline (read at each failure,
    since a drain can set it while we wait). Retries are counted in `counter` by error code;
    `observe` hears every outcome (None for success), for health reporting."""
    attempt = 0
    while True:
        try:
            result = await call()
        except StorageError as e:
            if observe is not None:
                observe(e)
            attempt += 1
            delay = backoff(attempt, random.random())
            if not should_retry(e, delay, time.monotonic(), deadline.at):
                raise
            if counter is not None:
                counter.labels(reason=e.code).inc()
            log.info(
                "retrying", op=e.op, key=e.key, code=e.code, attempt=attempt, delay=round(delay, 2), **(context or {})
            )
            await asyncio.sleep(delay)
        else:
            if observe is not None:
                observe(None)
            return result
