"""Optional upload bandwidth cap: one token bucket shared by every transfer of the process.

Create one `Throttle` and hand it to every uploader; each calls `take(n)` before sending n bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def delay_for(tokens: float, n: int, rate: int) -> float:
    """Seconds to wait before n bytes may be sent, with `tokens` bytes in the bucket at `rate` bytes/s.

    Tokens may be negative (a debt still being paid off); rate 0 means unlimited.

    | tokens | n  | rate | delay | why                             |
    |--------|----|------|-------|---------------------------------|
    | any    | 10 | 0    | 0     | unlimited                       |
    | 10     | 5  | 1    | 0     | enough in the bucket            |
    | 10     | 10 | 1    | 0     | exactly enough                  |
    | 0      | 10 | 5    | 2     | all of it at the rate           |
    | 4      | 10 | 2    | 3     | the missing 6 at the rate       |
    | -5     | 5  | 5    | 2     | the debt first, then n          |
    | 0      | 0  | 5    | 0     | nothing to send                 |
    """
    if rate <= 0 or n <= tokens:
        return 0.0
    return (n - tokens) / rate


class Throttle:
    """Token bucket: `rate` bytes/s on average, bursts of up to `burst` bytes (default: one second's worth).

    The bucket starts full. A take larger than the burst is allowed: it waits for the part the bucket
    cannot hold, so throughput stays at the rate whatever the chunk size. Takers are served one at a
    time in arrival order (a FIFO asyncio.Lock held while waiting), so a small take queued behind a
    large one waits for it: take per part or chunk, not per file.

    Cancelling a take releases everything it asked for: while it waits for the lock it holds nothing,
    and while it sleeps its reservation is refunded, so the next taker is served as if it never came.
    A take that returned is spent, whether or not the caller then sends the bytes.
    """

    def __init__(
        self,
        rate: int,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0 bytes/s (0 is unlimited), got {rate}")
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be > 0 bytes, got {burst}")
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = asyncio.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    async def take(self, n: int) -> None:
        """Wait until n more bytes may be sent; returns at once when unlimited or n is 0."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of bytes ({n})")
        if self.unlimited or n == 0:
            return
        async with self._lock:
            self._refill()
            delay = delay_for(self._tokens, n, self.rate)
            self._tokens -= n
            if delay > 0:
                try:
                    await self._sleep(delay)
                except asyncio.CancelledError:
                    # Time that passed still refills the bucket; only the reservation is undone.
                    self._tokens += n
                    raise

    def debit(self, n: int) -> None:
        """Count n bytes sent without waiting: for small files, which must never queue behind big
        parts. The debt delays the next `take`, so the average rate still holds."""
        if not self.unlimited and n > 0:
            self._refill()
            self._tokens -= n

    def _refill(self) -> None:
        now = self._clock()
        # max(): a clock that steps back must not drain the bucket.
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
