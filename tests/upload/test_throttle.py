"""Bandwidth cap: a token bucket checked in virtual time (sleeping advances an injected clock), so no
test depends on the speed of the machine, and only the test of the real defaults waits for real (50 ms)."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest

from daemon.upload.throttle import Throttle, delay_for

KIND = "unit"

MB = 1_000_000
DEADLINE_S = 10.0  # real seconds; every wait below is on a condition, this only bounds a hang
CLOCK_SLACK_S = 0.001  # asyncio may wake a timer up to its clock resolution early


class VirtualTime:
    """A clock that only moves when someone sleeps on it. With `hold`, sleepers wait to be released."""

    def __init__(self, hold: bool = False) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.sleeping = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping.set()
        await self.release.wait()
        self.now += seconds
        await asyncio.sleep(0)  # a real suspension point, as asyncio.sleep would be

    def throttle(self, rate: int, burst: int | None = None) -> Throttle:
        return Throttle(rate, burst, clock=self.clock, sleep=self.sleep)


async def never_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds}s")


@pytest.mark.parametrize(
    ("tokens", "n", "rate", "delay"),
    [
        (123.0, 10, 0, 0.0),
        (10.0, 5, 1, 0.0),
        (10.0, 10, 1, 0.0),
        (0.0, 10, 5, 2.0),
        (4.0, 10, 2, 3.0),
        (-5.0, 5, 5, 2.0),
        (0.0, 0, 5, 0.0),
    ],
)
def test_delay_for(tokens: float, n: int, rate: int, delay: float):
    assert delay_for(tokens, n, rate) == pytest.approx(delay)


async def test_ten_megabytes_at_one_megabyte_per_second_take_ten_seconds():
    vt = VirtualTime()
    throttle = vt.throttle(MB, burst=64 * 1024)
    start = vt.now
    for _ in range(10 * MB // (256 * 1024) + 1):
        await throttle.take(256 * 1024)
    sent = (10 * MB // (256 * 1024) + 1) * 256 * 1024
    assert sent >= 10 * MB
    assert vt.now - start == pytest.approx(sent / MB, rel=0.05)


async def test_burst_is_free_then_the_rate_applies():
    vt = VirtualTime()
    throttle = vt.throttle(1000, burst=5000)
    await throttle.take(5000)
    assert vt.sleeps == []
    await throttle.take(1000)
    assert vt.sleeps == [pytest.approx(1.0)]


async def test_idle_time_refills_only_up_to_the_burst():
    vt = VirtualTime()
    throttle = vt.throttle(1000, burst=2000)
    await throttle.take(2000)
    vt.now += 3600
    await throttle.take(2000)
    assert vt.sleeps == []
    await throttle.take(500)
    assert vt.sleeps == [pytest.approx(0.5)]


async def test_default_burst_is_one_second_of_traffic():
    vt = VirtualTime()
    throttle = vt.throttle(MB)
    assert throttle.burst == MB
    await throttle.take(MB)
    assert vt.sleeps == []


async def test_a_take_larger_than_the_burst_waits_proportionally():
    vt = VirtualTime()
    throttle = vt.throttle(1000, burst=100)
    await asyncio.wait_for(throttle.take(10_000), DEADLINE_S)
    assert vt.now - 1000.0 == pytest.approx(9.9)
    await throttle.take(1000)
    assert vt.now - 1000.0 == pytest.approx(10.9)


@pytest.mark.parametrize("n", [0, 1, 10 * MB, 10**12])
async def test_unlimited_never_sleeps(n: int):
    throttle = Throttle(0, clock=lambda: 0.0, sleep=never_sleep)
    assert throttle.unlimited
    await throttle.take(n)


async def test_concurrent_takers_are_all_served_in_turn_at_the_rate():
    vt = VirtualTime()
    throttle = vt.throttle(MB, burst=100_000)
    await throttle.take(100_000)  # empty the bucket: every grant below waits for the rate
    start = vt.now
    grants: list[tuple[int, float]] = []  # (sender, virtual seconds since start) of every take returned

    async def sender(who: int) -> None:
        for _ in range(10):
            await throttle.take(100_000)
            grants.append((who, vt.now - start))

    await asyncio.wait_for(asyncio.gather(*(sender(i) for i in range(8))), DEADLINE_S)
    # In turn: the senders queue in arrival order 0..7, and each queues again behind the others
    # after every grant, so no sender is served twice while another waits.
    assert [who for who, _ in grants] == list(range(8)) * 10
    # At the rate: each 100 kB grant comes 0.1 s after the one before, none early and none late.
    assert [t for _, t in grants] == pytest.approx([(k + 1) * 100_000 / MB for k in range(80)])


async def test_cancelled_waiter_gives_back_what_it_did_not_get():
    vt = VirtualTime(hold=True)
    throttle = vt.throttle(1000, burst=1000)
    await throttle.take(1000)  # bucket empty now, no sleep needed
    waiting = asyncio.create_task(throttle.take(5000))
    await asyncio.wait_for(vt.sleeping.wait(), DEADLINE_S)
    queued = asyncio.create_task(throttle.take(1000))  # behind the lock, holds nothing yet
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, DEADLINE_S)
    vt.release.set()
    await asyncio.wait_for(queued, DEADLINE_S)
    # The queued take waited for its own 1000 bytes only, not the cancelled 5000.
    assert vt.sleeps == [pytest.approx(5.0), pytest.approx(1.0)]
    assert vt.now - 1000.0 == pytest.approx(1.0)
    await throttle.take(500)
    assert vt.sleeps[-1] == pytest.approx(0.5)


async def test_cancelled_while_queued_holds_nothing():
    vt = VirtualTime(hold=True)
    throttle = vt.throttle(1000, burst=1000)
    await throttle.take(1000)
    first = asyncio.create_task(throttle.take(1000))
    await asyncio.wait_for(vt.sleeping.wait(), DEADLINE_S)
    second = asyncio.create_task(throttle.take(3000))
    await asyncio.sleep(0)  # one turn of the loop: it runs up to the lock and queues there
    second.cancel()
    vt.release.set()
    await asyncio.wait_for(first, DEADLINE_S)
    with pytest.raises(asyncio.CancelledError):
        await second
    await throttle.take(1000)
    assert vt.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]


@pytest.mark.parametrize(("rate", "burst", "message"), [(-1, None, "rate"), (10, 0, "burst"), (10, -5, "burst")])
def test_invalid_settings(rate: int, burst: int | None, message: str):
    with pytest.raises(ValueError, match=message):
        Throttle(rate, burst)


async def test_negative_take_is_refused():
    with pytest.raises(ValueError, match="negative"):
        await Throttle(1000).take(-1)


async def test_real_clock_and_sleep_are_the_defaults():
    defaults = inspect.signature(Throttle).parameters
    assert defaults["clock"].default is time.monotonic and defaults["sleep"].default is asyncio.sleep
    # Built without them, a take beyond the burst really waits (50 ms here), and waits on the event
    # loop: the take is suspended while this test goes on, it does not block the loop.
    throttle = Throttle(1000, burst=100)
    await asyncio.wait_for(throttle.take(100), DEADLINE_S)  # the burst: no wait
    started = time.monotonic()
    waiting = asyncio.create_task(throttle.take(50))
    await asyncio.sleep(0)
    assert not waiting.done()
    await asyncio.wait_for(waiting, DEADLINE_S)
    assert time.monotonic() - started >= 0.05 - CLOCK_SLACK_S  # never early; how late is not checked


async def test_debit_never_waits_but_delays_the_next_take():
    vt = VirtualTime()
    t = vt.throttle(MB)
    start = vt.now
    t.debit(3 * MB)  # a burst of small files: sent at once
    assert vt.now == start and vt.sleeps == []
    await t.take(MB)
    assert vt.now - start == pytest.approx(3.0)  # the debt (2 MB beyond the full bucket) plus this 1 MB
