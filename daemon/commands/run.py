"""`ckptd run`: restore → launch the start commands → upload alongside → drain → exit.

Signal handlers only put the signal in a queue; the main coroutine decides. The first SIGTERM or
SIGINT is forwarded to the trainer, which is killed if still running after --stop-timeout; a
second kills it at once and shortens the drain (state is still recorded); a third exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import structlog

from daemon import metrics, priority
from daemon.commands.common import EXIT_CONFIG, serving, storage_for
from daemon.commands.restore import restore_phase
from daemon.config import Config
from daemon.upload.engine import Engine, Report
from daemon.supervise import FORWARDED, STOPPING, Trainer, commands_of, trainer_env

EXIT_NOT_DRAINED = 4
HURRIED_DRAIN = 5.0  # seconds of drain left after a second stop signal
log = structlog.get_logger()


def final_exit(trainer_status: int, drained: bool) -> int:
    """ckptd's exit code from the trainer's and the drain's outcome (SPEC §5).

    | trainer status | drained | exit | why                                          |
    |----------------|---------|------|----------------------------------------------|
    | 0              | yes     | 0    | all good                                     |
    | 0              | no      | 4    | training worked, its checkpoints are not safe |
    | 3              | yes     | 3    | the trainer's own failure                    |
    | 3              | no      | 3    | the trainer's failure is the first news      |
    | 137            | any     | 137  | killed by signal 9                           |
    """
    return EXIT_NOT_DRAINED if trainer_status == 0 and not drained else trainer_status


class Signals:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self.stops = 0
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self.queue.put_nowait, sig)

    async def next(self) -> signal.Signals:
        sig = await self.queue.get()
        self.stops += sig in STOPPING
        log.info("signal received", signal=sig.name)
        if self.stops >= 3:
            log.error("third stop signal: exiting without draining")
            os._exit(128 + sig)
        return sig


async def first(awaitable: asyncio.Task, signals: Signals) -> signal.Signals | None:
    """Wait for `awaitable` or a signal, whichever comes first; None means it finished."""
    waiter = asyncio.ensure_future(signals.next())
    done, _ = await asyncio.wait({awaitable, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        return waiter.result()
    waiter.cancel()
    return None


async def supervise(c: Config, trainer: Trainer, signals: Signals, engine: Engine | None) -> tuple[int, bool]:
    """Run the trainer to its end, forwarding signals; return its exit status and whether to hurry."""
    task = asyncio.create_task(trainer.run())
    started = asyncio.create_task(trainer.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if trainer.started.is_set():
        metrics.TRAINER_RUNNING.set(1)
        lowered = engine.lower_priority() if engine else priority.apply(c.nice, c.io_priority, c.cpu_affinity)
        log.info("priority lowered", **lowered)
    started.cancel()
    hurry = False
    while (sig := await first(task, signals)) is not None:
        if sig in STOPPING and signals.stops >= 2:
            trainer.kill("second stop signal")
            hurry = True
        else:
            trainer.forward(sig)
    metrics.TRAINER_RUNNING.set(0)
    return task.result(), hurry


async def run(c: Config, argv: list[str]) -> int:
    async with serving(c, "run") as health:
        if health is None:
            return EXIT_CONFIG
        signals = Signals()
        async with storage_for(c) as storage:
            restoring = asyncio.create_task(restore_phase(c, storage))
            if (sig := await first(restoring, signals)) is not None:
                restoring.cancel()
                log.warning("stopped before training started", signal=sig.name)
                return 128 + sig
            if (code := restoring.result()) is not None:
                return code
            health.restore_done = True
            engine = health.engine = Engine(c, storage) if c.checkpointing_enabled else None
            if engine:
                await engine.startup()
            trainer = Trainer(commands_of(c, argv), trainer_env(c, os.environ), c.stop_timeout)
            health.trainer_running = lambda: trainer.running
            status, hurry = await supervise(c, trainer, signals, engine)
            log.info("training finished", exit_code=status, succeeded=status == 0)
            report = await engine.shutdown(status, HURRIED_DRAIN if hurry else None) if engine else Report()
    code = final_exit(status, report.ok)
    if code != status:
        log.error("training succeeded but not every checkpoint file was stored", exit_code=code,
                  not_stored=report.not_stored[:20], count=len(report.not_stored))  # fmt: skip
    return code


def main(c: Config, args: argparse.Namespace) -> int:
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv and not c.start_commands:
        log.error("nothing to run: give start_commands in the config file or CMD after --")
        return 2
    import uvloop

    return uvloop.run(run(c, argv))
