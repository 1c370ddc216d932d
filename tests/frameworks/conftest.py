"""Fixtures of the framework tests: `ckptd_job` starts `ckptd run` nodes (see fwkit.start_job)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest
from daemons import Daemon
from fwkit import Job, start_job


@pytest.fixture
def ckptd_job(tmp_path) -> Iterator[Callable[..., Job]]:
    started: list[Daemon] = []

    def start(*args, **kwargs) -> Job:
        return start_job(tmp_path, started, *args, **kwargs)

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            # A failed test left it running: two stop signals kill its trainer (its own process
            # group, which a SIGKILL of ckptd alone would leave behind) and hurry the drain.
            for timeout in (2, 15):
                daemon.signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.proc.wait(timeout)
                    break
        daemon.kill()
