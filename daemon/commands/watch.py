"""`ckptd watch`: the sidecar. Upload until SIGTERM/SIGINT or `--exit-when PATH`, drain, exit 0 or 4.

Signal handlers only record the signal; the main coroutine decides. A second signal cuts the
drain short (state is still recorded); a third exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import structlog

from daemon.commands.common import EXIT_CONFIG, serving, storage_for
from daemon.config import Config
from daemon.upload.engine import Engine

EXIT_OK, EXIT_NOT_DRAINED = 0, 4
log = structlog.get_logger()


class Stopper:
    """Turns signals and the --exit-when file into one `stop` event, and counts repeats."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
        self.stop = asyncio.Event()
        self.engine = engine
        self.count = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)

    def _signalled(self, sig: signal.Signals) -> None:
        self.count += 1
        log.info("signal received", signal=sig.name, count=self.count)
        if self.count == 2 and self.engine.drain_deadline is not None:
            self.engine.drain_deadline = 0.0  # finish now, but still record state
        elif self.count >= 3:
            os._exit(EXIT_NOT_DRAINED)
        self.stop.set()

    async def watch_file(self, path: str) -> None:
        while not os.path.exists(path):
            await asyncio.sleep(0.25)
        log.info("exit file found", path=path)
        self.stop.set()


async def watch(c: Config, exit_when: str | None) -> int:
    async with serving(c, "watch") as health:
        if health is None:
            return EXIT_CONFIG
        health.restore_done = True  # nothing to restore in sidecar mode: the init container did it
        async with storage_for(c) as storage:
            engine = health.engine = Engine(c, storage)
            stopper = Stopper(asyncio.get_running_loop(), engine)
            waiter = asyncio.create_task(stopper.watch_file(exit_when)) if exit_when else None
            await engine.startup()
            log.info("priority lowered", **engine.lower_priority())
            await engine.serve(stopper.stop)
            report = await engine.shutdown()
            if waiter:
                waiter.cancel()
    if not report.ok:
        log.error("not everything was stored", files=report.not_stored[:50], count=len(report.not_stored))
    return EXIT_OK if report.ok else EXIT_NOT_DRAINED


def main(c: Config, args: argparse.Namespace) -> int:
    import uvloop

    return uvloop.run(watch(c, args.exit_when))
