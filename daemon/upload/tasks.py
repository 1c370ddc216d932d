"""The engine's background tasks: started by name, periodic duties that outlive a bad round, and a
bounded cancel that says what it cancelled and never hangs the exit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger()
CANCEL_WAIT = 10.0  # seconds a cancelled task may take to clean up (abort its multipart upload)


class Tasks:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task] = []

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def every(self, seconds: float, duty: Callable[[], Awaitable[None]], name: str) -> None:
        self.spawn(_every(seconds, duty, name), name)

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
