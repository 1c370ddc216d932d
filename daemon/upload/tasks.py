"""The engine's background tasks: started by name, supervised, cancelled with a bound.

A task that ends unexpectedly (an exception, or a loop that returns) is logged with its traceback,
counted, and restarted after a backoff: the upload pipeline must never silently lose a stage. While
a task keeps failing, `not_ready()` says so, which turns /readyz to 503. Cancellation is the only
way a task ends for good, and it is never logged as an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from daemon import metrics

log = structlog.get_logger()
CANCEL_WAIT = 10.0  # seconds a cancelled task may take to clean up (abort its multipart upload)
BACKOFF = (0.5, 30.0)  # seconds before the first restart, and the longest wait between restarts
STEADY = 60.0  # seconds a restarted task must run before its failure counts as over
Start = Callable[[], Coroutine[Any, Any, None]]


class Tasks:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task] = []
        self._failing: dict[str, tuple[float, str]] = {}  # task -> (monotonic time, error) of its last failure

    def spawn(self, start: Start, name: str, *, once: bool = False) -> None:
        """Run `start()` as a supervised task; `once`: it may finish (else finishing is a failure too)."""
        self._tasks.append(asyncio.create_task(self._supervise(start, name, once), name=name))

    def every(self, seconds: float, duty: Callable[[], Awaitable[None]], name: str) -> None:
        self.spawn(lambda: _every(seconds, duty, name), name)

    def not_ready(self) -> list[str]:
        now = time.monotonic()
        return [
            f"task {name} failed and is being restarted: {error}"
            for name, (at, error) in sorted(self._failing.items())
            if now - at < STEADY
        ]

    async def _supervise(self, start: Start, name: str, once: bool) -> None:
        delay = BACKOFF[0]
        while True:
            began, failure = time.monotonic(), None
            try:
                await start()
                error = None if once else "ended unexpectedly"
            except Exception as e:
                error, failure = f"{type(e).__name__}: {e}"[:300], e
            if error is None:
                return
            if time.monotonic() - began >= STEADY:
                delay = BACKOFF[0]  # it ran fine for a while: a new failure, not the same one again
            log.error("task failed; restarting it", task=name, error=error, restart_in_seconds=delay, exc_info=failure)
            metrics.TASK_RESTARTS.labels(task=name).inc()
            self._failing[name] = (time.monotonic(), error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])

    async def cancel(self, reason: str) -> None:
        for task in self._tasks:
            task.cancel(reason)
        _, stuck = await asyncio.wait(self._tasks, timeout=CANCEL_WAIT) if self._tasks else (set(), set())
        if stuck:
            log.error("tasks did not stop", tasks=sorted(t.get_name() for t in stuck), reason=reason)
        self._tasks.clear()


async def _every(seconds: float, duty: Callable[[], Awaitable[None]], name: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await duty()
        except Exception:  # a periodic duty must outlive one bad round; cancellation still ends it
            log.exception("periodic task failed", task=name)
