"""Supervising the user's start commands: launch, forward signals, stop with a deadline, report.

Each command runs in its own session and process group (so a signal reaches torchrun and all its
workers, and a terminal's Ctrl-C reaches ckptd first), at normal priority, with stdout and stderr
passed through untouched.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import Mapping, Sequence

import structlog

from daemon import exits
from daemon.config import Config

log = structlog.get_logger()


def trainer_env(c: Config, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of SPEC §3: where to write, where restored checkpoints are, who we are."""
    return {
        **base,
        "BT_CHECKPOINT_DIR": c.checkpoint_dir,
        "BT_LOAD_CHECKPOINT_DIR": c.restore_dir,
        "BT_NODE_RANK": str(c.node_rank),
        "BT_GROUP_SIZE": str(c.group_size),
        "BT_TRAINING_JOB_ID": c.job_id,
        "BT_TRAINING_PROJECT_NAME": c.project,
    }


def commands_of(c: Config, argv: Sequence[str]) -> list[list[str]]:
    """CMD after `--` runs as given; otherwise each start command through /bin/sh -c."""
    if argv:
        return [list(argv)]
    return [["/bin/sh", "-c", command] for command in c.start_commands]


class Trainer:
    def __init__(self, commands: list[list[str]], env: Mapping[str, str], stop_timeout: float) -> None:
        self.commands, self.env, self.stop_timeout = commands, dict(env), stop_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self._killer: asyncio.TimerHandle | None = None
        self.started = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def run(self) -> int:
        """Run the commands in order, stopping at the first failure or a stop signal."""
        status = exits.OK
        for argv in self.commands:
            if self.stopping:
                break
            try:
                self.proc = await asyncio.create_subprocess_exec(*argv, env=self.env, start_new_session=True)
            except OSError as e:
                log.error("start command could not be started", command=argv, error=e.strerror)
                return exits.NOT_FOUND if e.errno == errno.ENOENT else exits.NOT_EXECUTABLE
            self.started.set()
            log.info("trainer started", pid=self.proc.pid, command=argv)
            status = exits.of_process(await self.proc.wait())
            log.info("trainer exited", pid=self.proc.pid, exit_code=status)
            if status != exits.OK:
                break
        self._cancel_killer()
        return status

    def forward(self, sig: signal.Signals, *, stop: bool) -> None:
        """Pass a signal to the running command's whole process group; a stop signal also starts
        the --stop-timeout clock, after which the group is killed."""
        if stop:
            self.stopping = True
            if self._killer is None:
                self._killer = asyncio.get_running_loop().call_later(self.stop_timeout, self.kill, "stop timeout")
        self._signal_group(sig)

    def kill(self, reason: str) -> None:
        self.stopping = True
        log.warning("killing the trainer", reason=reason)
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _cancel_killer(self) -> None:
        if self._killer is not None:
            self._killer.cancel()
            self._killer = None
