"""Signals, one design for `run` and `watch`: signals are only counted where they arrive; a task on
the event loop decides what they mean, whatever phase the command is in (restore, training, drain).

A first stop signal starts the stop, a second shortens the drain, a third exits at once.

How a signal gets here: Python's C-level handler writes the signal's number to the wakeup fd
(`signal.set_wakeup_fd`), from whichever thread the kernel interrupted, and a listener thread reads
it. Not `loop.add_signal_handler`: its handlers run on the loop, so anything that blocks the loop
(a thread join, a write to a full log pipe) would keep every signal from working. The listener
needs neither the loop nor the main thread: it counts, exits on a third stop signal by itself, and
hands every other signal to the loop with `call_soon_threadsafe`. One byte per delivery, so no
signal handled is lost; the kernel still merges a signal sent while the same one is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import json
import os
import select
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator

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
    command that has more to do with them (`run` forwards them to its trainer).

    `before_exit`, if set, runs on the listener thread just before a third stop signal exits
    (`run` kills its trainer there): it must not need the event loop."""

    def __init__(self, deadline: Deadline, exit_code: Callable[[signal.Signals], int]) -> None:
        self.deadline, self.exit_code = deadline, exit_code
        self.stopping = asyncio.Event()
        self.actions: asyncio.Queue[tuple[Action, signal.Signals]] = asyncio.Queue()
        self.stops = 0  # as the loop has decided them
        self.first_stop: signal.Signals | None = None
        self.before_exit: Callable[[], None] | None = None
        self._heard_stops = 0  # as the listener has counted them, loop or no loop

    @contextlib.asynccontextmanager
    async def installed(self, signals: tuple[signal.Signals, ...]) -> AsyncIterator[Signals]:
        loop = asyncio.get_running_loop()
        context = structlog.contextvars.get_contextvars()  # the listener thread has none of its own

        def heard(sig: signal.Signals) -> None:  # on the listener thread
            if sig in STOPPING:
                self._heard_stops += 1
                if meaning(sig, self._heard_stops - 1) is Action.EXIT:
                    self._exit_now(sig, context)
            loop.call_soon_threadsafe(self._decide, sig)

        with listening(signals, heard):
            yield self

    def _decide(self, sig: signal.Signals) -> None:
        action = meaning(sig, self.stops)
        self.stops += action is not Action.FORWARD
        log.info("signal received", signal=sig.name, action=action.value, count=self.stops)
        if action is Action.HURRY:
            self.deadline.shorten(HURRIED_DRAIN)
        if action is not Action.FORWARD:
            self.first_stop = self.first_stop or sig
            self.stopping.set()
        self.actions.put_nowait((action, sig))

    def _exit_now(self, sig: signal.Signals, context: dict) -> None:
        code = self.exit_code(sig)
        if self.before_exit is not None:
            try:
                self.before_exit()
            except Exception as e:  # exiting is what matters now
                last_words("could not clean up before exiting", context, error=repr(e))
        last_words("third stop signal: exiting without draining", context, signal=sig.name, exit_code=code)
        os._exit(code)


@contextlib.contextmanager
def listening(signals: tuple[signal.Signals, ...], heard: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call `heard(sig)` on a thread of its own for each delivery of one of `signals` (main thread only)."""
    watched = {int(s) for s in signals}
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C-level handler must never block

    def listen() -> None:
        while data := os.read(read_end, 64):  # b"" once the write end is closed: uninstalled
            for signum in data:
                if signum in watched:
                    heard(signal.Signals(signum))

    listener = threading.Thread(target=listen, name="signals", daemon=True)
    listener.start()
    # The wakeup fd is ours before the first handler is and until the last one is gone: no signal
    # handled in between goes to someone else's fd.
    old_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, _noted)
            signal.siginterrupt(sig, False)  # restart interrupted system calls, as the loop's own handlers do
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_fd)
        os.close(write_end)
        listener.join(1.0)  # reads what is left, then sees the end
        os.close(read_end)


def _noted(signum: int, frame: object) -> None:
    """The Python-level handler: nothing to do, the listener heard it through the wakeup fd."""


def last_words(event: str, context: dict, **fields: object) -> None:
    """One JSON log line written straight to stderr, without structlog: the main thread may hold
    its lock, blocked on a full pipe. Skipped rather than written if stderr cannot take it now."""
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")  # as structlog writes it
    line = json.dumps({**context, **fields, "event": event, "level": "error", "timestamp": now}, default=str)
    try:
        fd = sys.stderr.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        ready = poller.poll(0)
        if ready and ready[0][1] & select.POLLOUT:  # a line under PIPE_BUF is written whole once there is room
            os.write(fd, (line + "\n").encode())
    except (OSError, ValueError):
        pass
