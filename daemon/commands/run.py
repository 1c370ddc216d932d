"""`ckptd run`: restore → launch the start commands → upload alongside → drain → exit.

Signals (see `signals`): a first stop signal is forwarded to the trainer, which is killed if still
running after --stop-timeout; a second kills it at once and shortens the drain (state is still
recorded); a third kills it and exits at once. Other signals are forwarded to the trainer.

The drain starts once everything the trainer started is gone (see `supervise`): nothing writes
while the last files are judged. Only the trainer's exit 0, with nothing of it left running, is
evidence that its last save finished.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import structlog

from daemon import exits, metrics, priority
from daemon.commands.common import serving, storage_for
from daemon.commands.restore import restore_phase
from daemon.commands.signals import FORWARDED, Action, Signals
from daemon.config import Config
from daemon.storage.retry import Deadline
from daemon.supervise import Trainer, become_subreaper, commands_of, trainer_env
from daemon.upload.engine import Engine, Report

log = structlog.get_logger()


async def first(awaitable: asyncio.Future, event: asyncio.Event) -> bool:
    """Wait for `awaitable` or `event`, whichever comes first; True when the event won."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({awaitable, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return awaitable not in done


async def supervise(c: Config, trainer: Trainer, signals: Signals, engine: Engine | None) -> int:
    """Run the trainer to its end, passing on what signals mean; return its exit status."""
    early = [signals.actions.get_nowait() for _ in range(signals.actions.qsize())]
    for what, sig in early:  # a SIGHUP or SIGUSR before training was meant for nobody; a stop still counts
        if what is Action.FORWARD:
            log.info("signal before training not forwarded", signal=sig.name)
        else:
            signals.actions.put_nowait((what, sig))
    task = asyncio.create_task(trainer.run())
    await first(task, trainer.started)
    if trainer.started.is_set():
        metrics.TRAINER_RUNNING.set(1)
        lowered = engine.lower_priority() if engine else priority.apply(c.nice, c.io_priority, c.cpu_affinity)
        log.info("priority lowered", **lowered)
    while not task.done():
        action = asyncio.ensure_future(signals.actions.get())
        done, _ = await asyncio.wait({task, action}, return_when=asyncio.FIRST_COMPLETED)
        if action not in done:
            action.cancel()
            break
        what, sig = action.result()
        if what is Action.HURRY:
            trainer.kill("second stop signal")
        else:
            trainer.forward(sig, stop=what is Action.STOP)
    metrics.TRAINER_RUNNING.set(0)
    return task.result()


async def run(c: Config, argv: list[str]) -> int:
    deadline = Deadline()  # the drain's: a second stop signal shortens it, whenever it comes
    async with serving(c, "run") as health:
        if health is None:
            return exits.CONFIG
        signals = Signals(deadline, exit_code=exits.signalled)
        async with storage_for(c) as storage, signals.installed(FORWARDED):
            restoring = asyncio.create_task(restore_phase(c, storage))
            if await first(restoring, signals.stopping) or signals.stopping.is_set():
                restoring.cancel()
                log.warning("stopped before training started", signal=signals.first_stop.name)
                return exits.signalled(signals.first_stop)
            if (code := restoring.result()) is not None:
                return code
            health.restore_done = True
            engine = Engine(c, storage, deadline) if c.checkpointing_enabled else None
            if engine:
                health.uploads = engine.status
                await engine.startup()
            trainer = Trainer(
                commands_of(c, argv), trainer_env(c, os.environ), c.stop_timeout, adopts=become_subreaper()
            )
            signals.before_exit = trainer.kill_at_once  # a third stop signal leaves nothing of it running
            health.trainer_running = lambda: trainer.running
            status = await supervise(c, trainer, signals, engine)  # returns once all it started is gone
            finished = status == exits.OK and not trainer.left_running
            log.info("training finished", exit_code=status, succeeded=status == exits.OK)
            if status == exits.OK and not finished:
                log.warning("the trainer exited 0 but left processes running: no final commit without a marker")
            stopped = signals.first_stop is not None
            report = await engine.shutdown(status, success=finished, stopped=stopped) if engine else Report()
    code = exits.of_run(status, report.ok)
    if code != status:
        log.error(
            "training succeeded but not every checkpoint file was stored",
            exit_code=code,
            not_stored=report.not_stored[:20],
            count=len(report.not_stored),
        )
    return code


def main(c: Config, args: argparse.Namespace) -> int:
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv and not c.start_commands:
        log.error("nothing to run: give start_commands in the config file or CMD after --")
        return exits.CONFIG
    import uvloop

    return uvloop.run(run(c, argv))
