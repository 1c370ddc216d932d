"""Signals: what each stop signal means (the table), and real signals delivered to a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon.commands.signals import HURRIED_DRAIN, Action, Signals, meaning
from daemon.storage.retry import Deadline

KIND = "integration"
REPO = Path(__file__).resolve().parents[2]

TERM, INT, HUP, USR1, USR2 = signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2


@pytest.mark.unit
@pytest.mark.parametrize(
    "sig, stops_before, action",
    [
        # SIGTERM or SIGINT | 0          | STOP
        (TERM, 0, Action.STOP),
        (INT, 0, Action.STOP),
        # SIGTERM or SIGINT | 1          | HURRY
        (TERM, 1, Action.HURRY),
        (INT, 1, Action.HURRY),
        # SIGTERM or SIGINT | 2 or more  | EXIT
        (TERM, 2, Action.EXIT),
        (INT, 2, Action.EXIT),
        (TERM, 7, Action.EXIT),
        # SIGHUP, SIGUSR1/2 | any        | FORWARD
        (HUP, 0, Action.FORWARD),
        (USR1, 1, Action.FORWARD),
        (USR2, 2, Action.FORWARD),
        (HUP, 9, Action.FORWARD),
    ],
)
def test_meaning_table(sig: signal.Signals, stops_before: int, action: Action):
    assert meaning(sig, stops_before) is action


async def next_action(signals: Signals) -> tuple[Action, signal.Signals]:
    return await asyncio.wait_for(signals.actions.get(), 5)


async def test_real_signals_forward_then_stop_then_hurry_the_drain():
    deadline = Deadline()  # unset: the drain has not started yet
    signals = Signals(deadline, exit_code=lambda sig: 99)
    async with signals.installed((USR1, TERM)):
        os.kill(os.getpid(), USR1)
        assert await next_action(signals) == (Action.FORWARD, USR1)
        assert not signals.stopping.is_set() and signals.stops == 0

        os.kill(os.getpid(), TERM)
        assert await next_action(signals) == (Action.STOP, TERM)
        assert signals.stopping.is_set() and signals.first_stop is TERM
        assert not deadline.is_set  # a first stop leaves the drain its full time

        os.kill(os.getpid(), TERM)
        hurried = time.monotonic()
        assert await next_action(signals) == (Action.HURRY, TERM)
        assert signals.stops == 2
    assert not deadline.is_set
    deadline.start(300)  # the drain starts later: it is capped by the hurry that came first
    assert deadline.at is not None and deadline.at <= hurried + HURRIED_DRAIN + 1
    assert deadline.at - time.monotonic() <= HURRIED_DRAIN


async def test_a_second_stop_shortens_a_drain_already_under_way():
    deadline = Deadline()
    deadline.start(300)
    signals = Signals(deadline, exit_code=lambda sig: 99)
    async with signals.installed((TERM,)):
        os.kill(os.getpid(), TERM)
        assert await next_action(signals) == (Action.STOP, TERM)
        assert deadline.at - time.monotonic() > 200  # untouched by the first
        os.kill(os.getpid(), TERM)
        assert await next_action(signals) == (Action.HURRY, TERM)
        assert deadline.at - time.monotonic() <= HURRIED_DRAIN


THIRD_STOP = textwrap.dedent(
    """
    import asyncio, os, signal
    from daemon.commands.signals import Signals
    from daemon.storage.retry import Deadline

    async def main():
        signals = Signals(Deadline(), exit_code=lambda sig: 42)
        async with signals.installed((signal.SIGTERM,)):
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGTERM)
                action, _ = await signals.actions.get()
                print("action:", action.value, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.Event().wait()  # the third stop exits from the signal task
        print("action: none, still running", flush=True)

    asyncio.run(main())
    """
)


def test_a_third_stop_exits_at_once_with_the_exit_code():
    done = subprocess.run(
        [sys.executable, "-c", THIRD_STOP], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 42, done.stderr
    actions = [line.split(":", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("action:")]
    assert actions == ["stop", "hurry"]  # (structlog writes its own lines to stdout too)
