"""Signals, one design for `run` and `watch`: handlers only record the signal; a task on the event
loop decides what it means, whatever phase the command is in (restore, training, drain).

A first stop signal starts the stop, a second shortens the drain, a third exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
from collections.abc import AsyncIterator, Callable

import structlog

from daemon.storage.retry import Deadline

STOPPING = (signal.SIGTERM, signal.SIGINT)
FORWARDED = (*STOPPING, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)  # what `run` passes to the trainer
HURRIED_DRAIN = 5.0  # seconds of drain left after a second stop signal
log = structlog.get_logger()


class Action(enum.Enum):
    STOP = "stop"  # stop what runs, then drain
    HURRY = "hurry"  # kill what runs, cut the drain short (state is still recorded)
    EXIT = "exit"  # exit now, nothing drained or recorded
    FORWARD = "forward"  # not a stop: only the trainer hears of it


def meaning(sig: signal.Signals, stops_before: int) -> Action:
    """What a signal means, given how many stop signals came before it.

    | signal                 | stops before | action  |
    |------------------------|--------------|---------|
    | SIGTERM or SIGINT      | 0            | STOP    |
    | SIGTERM or SIGINT      | 1            | HURRY   |
    | SIGTERM or SIGINT      | 2 or more    | EXIT    |
    | SIGHUP, SIGUSR1/2      | any          | FORWARD |
    """
    if sig not in STOPPING:
        return Action.FORWARD
    return (Action.STOP, Action.HURRY)[stops_before] if stops_before < 2 else Action.EXIT


class Signals:
    """Records signals and acts on their meaning: sets `stopping`, shortens `deadline` (the drain's),
    exits with `exit_code(sig)` on the third stop. Actions are also queued in `actions` for a
    command that has more to do with them (`run` forwards them to its trainer)."""

    def __init__(self, deadline: Deadline, exit_code: Callable[[signal.Signals], int]) -> None:
        self.deadline, self.exit_code = deadline, exit_code
        self.stopping = asyncio.Event()
        self.actions: asyncio.Queue[tuple[Action, signal.Signals]] = asyncio.Queue()
        self.stops = 0
        self.first_stop: signal.Signals | None = None
        self._received: asyncio.Queue[signal.Signals] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def installed(self, signals: tuple[signal.Signals, ...]) -> AsyncIterator[Signals]:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._received.put_nowait, sig)
        deciding = asyncio.create_task(self._decide(), name="signals")
        try:
            yield self
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            deciding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deciding

    async def _decide(self) -> None:
        while True:
            sig = await self._received.get()
            action = meaning(sig, self.stops)
            self.stops += action is not Action.FORWARD
            log.info("signal received", signal=sig.name, action=action.value, count=self.stops)
            if action is Action.EXIT:
                log.error("third stop signal: exiting without draining")
                os._exit(self.exit_code(sig))
            if action is Action.HURRY:
                self.deadline.shorten(HURRIED_DRAIN)
            if action is not Action.FORWARD:
                self.first_stop = self.first_stop or sig
                self.stopping.set()
            self.actions.put_nowait((action, sig))
