"""Supervised background tasks: a task that dies is logged, counted, restarted and reported; only
cancellation ends one for good."""

from __future__ import annotations

import asyncio

from engines import counter, until

from daemon.upload import tasks as tasks_module
from daemon.upload.tasks import Tasks

KIND = "unit"


async def test_a_task_that_raises_is_restarted_counted_and_reported_until_cancelled(monkeypatch):
    monkeypatch.setattr(tasks_module, "BACKOFF", (0.01, 0.02))
    runs: list[int] = []
    ran_on = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise PermissionError(13, "Permission denied", "/ckpt/a.bin")
        ran_on.set()
        await asyncio.Event().wait()  # then runs for good

    before = counter("ckptd_task_restarts_total", task="flaky")
    tasks = Tasks()
    tasks.spawn(flaky, "flaky")
    await asyncio.wait_for(ran_on.wait(), 10)
    assert len(runs) == 3
    assert counter("ckptd_task_restarts_total", task="flaky") - before == 2
    [reason] = tasks.not_ready()
    assert "flaky" in reason and "PermissionError" in reason
    await tasks.cancel("test over")
    assert len(runs) == 3  # cancellation is not a failure: no restart


async def test_a_forever_task_that_returns_is_restarted_but_a_one_shot_task_is_not(monkeypatch):
    monkeypatch.setattr(tasks_module, "BACKOFF", (0.01, 0.02))
    forever: list[int] = []
    once: list[int] = []

    async def loop_that_returns() -> None:
        forever.append(1)

    async def one_shot() -> None:
        once.append(1)

    tasks = Tasks()
    tasks.spawn(loop_that_returns, "loop")
    tasks.spawn(one_shot, "metadata", once=True)
    await until(lambda: len(forever) >= 3, 10, "the loop to be restarted twice")
    assert once == [1]
    assert any("loop" in r and "ended unexpectedly" in r for r in tasks.not_ready())
    assert not any("metadata" in r for r in tasks.not_ready())
    await tasks.cancel("test over")


async def test_a_failure_stops_counting_against_readiness_once_the_task_runs_steadily(monkeypatch):
    monkeypatch.setattr(tasks_module, "BACKOFF", (0.01, 0.02))
    monkeypatch.setattr(tasks_module, "STEADY", 0.2)
    failed = asyncio.Event()

    async def fails_once() -> None:
        if not failed.is_set():
            failed.set()
            raise OSError(28, "No space left on device")
        await asyncio.Event().wait()

    tasks = Tasks()
    tasks.spawn(fails_once, "settle")
    await asyncio.wait_for(failed.wait(), 10)
    await until(lambda: tasks.not_ready() != [], 10, "the failure to be reported")
    await until(lambda: tasks.not_ready() == [], 10, "the failure to age out")
    await tasks.cancel("test over")
