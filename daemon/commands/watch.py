"""`ckptd watch`: the sidecar. Upload until SIGTERM/SIGINT or `--exit-when PATH`, drain, exit 0 or 4.

Only the `--exit-when` file says the writer finished: then checkpoints without a marker commit at
the drain. After a stop signal they commit only if they were quiet long enough already.

Signals (see `signals`): the first starts the drain, a second cuts it short (state is still
recorded), a third exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import structlog

from daemon import exits
from daemon.commands.common import serving, storage_for
from daemon.commands.signals import STOPPING, Signals
from daemon.config import Config
from daemon.storage.retry import Deadline
from daemon.upload.engine import Engine

EXIT_FILE_POLL = 0.25  # seconds between looks for the --exit-when file
log = structlog.get_logger()


async def exit_file(path: str) -> None:
    # No event says a file appeared anywhere (it may be on another container's mount): look.
    while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - one stat per poll
        await asyncio.sleep(EXIT_FILE_POLL)
    log.info("exit file found", path=path)


async def writer_finished(signals: Signals, exit_when: str | None) -> bool:
    """Wait for a stop signal or the --exit-when file; True only when the file said the writer
    finished. A stop signal is no evidence that the last save is complete (SPEC §4)."""
    waiters = [asyncio.ensure_future(signals.stopping.wait())]
    if exit_when:
        waiters.append(asyncio.ensure_future(exit_file(exit_when)))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return len(waiters) > 1 and waiters[1] in done


async def watch(c: Config, exit_when: str | None) -> int:
    deadline = Deadline()  # the drain's: a second stop signal shortens it
    async with serving(c, "watch") as health:
        if health is None:
            return exits.CONFIG
        health.restore_done = True  # nothing to restore in sidecar mode: the init container did it
        signals = Signals(deadline, exit_code=lambda sig: exits.NOT_STORED)
        async with storage_for(c) as storage, signals.installed(STOPPING):
            engine = Engine(c, storage, deadline)
            health.uploads = engine.status
            await engine.startup()
            log.info("priority lowered", **engine.lower_priority())
            finished = await writer_finished(signals, exit_when)
            report = await engine.shutdown(success=finished)
    if not report.ok:
        log.error("not everything was stored", files=report.not_stored[:50], count=len(report.not_stored))
    return exits.of_watch(report.ok)


def main(c: Config, args: argparse.Namespace) -> int:
    import uvloop

    return uvloop.run(watch(c, args.exit_when))
