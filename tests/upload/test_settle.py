"""Settling: candidate files are pinned, re-checked after the settle time and handed on once complete.

Real files in tmp_path, a real staging folder, `Settler.run()` as a task; callbacks collect what
the settler hands on or skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from engines import until
from structlog.testing import capture_logs

from daemon.config.schema import DEFAULT_IGNORE
from daemon.upload.pin import Pin, Staging
from daemon.upload.settle import Settler

KIND = "unit"

SETTLE = 0.15


@dataclass
class Seen:
    """What the settler told its callbacks, with when each completion came."""

    noticed: list[str] = field(default_factory=list)
    complete: list[tuple[Pin, float]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def completed(self) -> list[str]:
        return [pin.relpath for pin, _ in self.complete]


@dataclass
class Rig:
    root: Path
    staging: Path
    settler: Settler
    seen: Seen

    def write(self, relpath: str, data: bytes) -> str:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    root, staging = tmp_path / "ckpt", tmp_path / "staging"
    root.mkdir()
    staging.mkdir()
    seen = Seen()
    settler = Settler(
        str(root),
        Staging(str(staging)),
        SETTLE,
        DEFAULT_IGNORE,
        seen.noticed.append,
        lambda pin: seen.complete.append((pin, time.monotonic())),
        lambda relpath, reason: seen.skipped.append((relpath, reason)),
    )
    return Rig(root, staging, settler, seen)


@contextlib.asynccontextmanager
async def running(settler: Settler) -> AsyncIterator[None]:
    task = asyncio.create_task(settler.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def ignore(*_: object) -> None:
    pass


def content(pin: Pin) -> bytes:
    fd = pin.open()
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


async def test_a_closed_file_is_pinned_at_notice_and_handed_on_after_the_settle_time(rig: Rig):
    path = rig.write("checkpoint-1/model.bin", b"weights")
    async with running(rig.settler):
        noticed_at = time.monotonic()
        rig.settler.notice(path, closed=True)
        assert len(os.listdir(rig.staging)) == 1  # pinned at once, before any settling
        os.unlink(path)  # rotation deletes it the next moment: the pin keeps its content
        os.rmdir(rig.root / "checkpoint-1")
        await until(lambda: rig.seen.complete, 5, "the file to be judged complete")
    (pin, at), *_ = rig.seen.complete
    assert rig.seen.noticed == ["checkpoint-1/model.bin"]
    assert pin.relpath == "checkpoint-1/model.bin"
    assert at - noticed_at >= SETTLE
    assert content(pin) == b"weights"
    assert rig.seen.skipped == [] and rig.settler.candidates == {}


async def test_a_file_changed_while_settling_restarts_the_clock(rig: Rig):
    path = rig.write("checkpoint-1/model.bin", b"v1")
    async with running(rig.settler):
        rig.settler.notice(path, closed=True)
        await asyncio.sleep(SETTLE / 2)  # part of the settle time passes; then the writer appends
        with open(path, "ab") as f:
            f.write(b"+more")
        changed_at = time.monotonic()
        await until(lambda: rig.seen.complete, 5, "the changed file to be judged complete")
    [(pin, at)] = rig.seen.complete
    assert at - changed_at >= SETTLE  # a whole settle time after the change, not after the notice
    assert pin.identity.size == len(b"v1+more")
    assert content(pin) == b"v1+more"


async def test_a_file_that_vanished_before_being_pinned_is_skipped_as_vanished(rig: Rig):
    path = rig.write("checkpoint-1/model.bin", b"x")
    async with running(rig.settler):
        rig.settler.notice(path, closed=False)  # seen, not closed: not pinned yet
        os.unlink(path)
        await until(lambda: rig.seen.skipped, 5, "the vanished file to be skipped")
    assert rig.seen.skipped == [("checkpoint-1/model.bin", "vanished")]
    assert rig.seen.complete == []
    assert os.listdir(rig.staging) == []
    assert not rig.settler.busy()


async def test_an_ignored_name_is_skipped_once_not_at_every_notice(rig: Rig):
    path = rig.write("checkpoint-1/model.bin.tmp", b"x")
    for closed in (False, True, True):
        rig.settler.notice(path, closed=closed)
    assert rig.seen.skipped == [("checkpoint-1/model.bin.tmp", "ignored")]
    assert rig.seen.noticed == []
    assert rig.settler.candidates == {}
    assert os.listdir(rig.staging) == []


async def test_an_unsafe_name_is_logged_and_skipped_once(rig: Rig):
    path = os.fsdecode(os.path.join(os.fsencode(rig.root), b"bad-\xff.bin"))  # not valid UTF-8
    with open(os.fsencode(path), "wb") as f:
        f.write(b"x")
    with capture_logs() as logs:
        for closed in (True, False, True):
            rig.settler.notice(path, closed=closed)
    assert rig.seen.skipped == [(path, "unsafe_name")]
    assert [e["event"] for e in logs] == ["file name cannot be stored"]
    assert rig.settler.candidates == {}
    assert os.listdir(rig.staging) == []


async def test_a_file_replaced_by_a_rename_is_repinned_to_the_new_inode(rig: Rig):
    path = rig.write("checkpoint-1/model.bin", b"old")
    async with running(rig.settler):
        rig.settler.notice(path, closed=True)
        [old_link] = os.listdir(rig.staging)
        rig.write("checkpoint-1/model.bin.tmp", b"new version")
        os.rename(rig.root / "checkpoint-1" / "model.bin.tmp", path)
        new_ino = os.stat(path).st_ino
        await until(lambda: rig.seen.complete, 5, "the replaced file to be judged complete")
    [(pin, _)] = rig.seen.complete
    assert pin.identity.ino == new_ino
    assert content(pin) == b"new version"
    assert old_link not in os.listdir(rig.staging)  # the superseded version is let go
    assert os.listdir(rig.staging) == [pin.stage]


async def test_a_file_held_open_for_writing_is_still_writing_until_closed(rig: Rig):
    path = rig.write("checkpoint-1/model.bin", b"")
    writer = open(path, "wb")  # noqa: SIM115 - held open across the check on purpose
    try:
        writer.write(b"part one")
        writer.flush()
        async with running(rig.settler):
            rig.settler.notice(path, closed=False)
            await until(lambda: rig.settler.still_writing(), 5, "the open file to be seen as being written")
            assert rig.settler.still_writing() == ["checkpoint-1/model.bin"]
            assert rig.settler.settling() == [] and not rig.settler.busy()
            assert rig.seen.complete == []
            writer.close()
            await until(lambda: rig.seen.complete, 5, "the closed file to be judged complete")
    finally:
        writer.close()
    assert rig.seen.completed() == ["checkpoint-1/model.bin"]
    assert content(rig.seen.complete[0][0]) == b"part one"
    assert rig.settler.still_writing() == []


async def test_busy_and_settling_follow_the_candidates(rig: Rig):
    assert (rig.settler.busy(), rig.settler.settling(), rig.settler.still_writing()) == (False, [], [])
    a = rig.write("checkpoint-1/a.bin", b"a")
    b = rig.write("b.bin", b"b")
    async with running(rig.settler):
        rig.settler.notice(a, closed=True)
        rig.settler.notice(b, closed=False)
        assert rig.settler.busy()
        assert rig.settler.settling() == ["b.bin", "checkpoint-1/a.bin"]
        await until(lambda: len(rig.seen.complete) == 2, 5, "both files to be judged complete")
    assert (rig.settler.busy(), rig.settler.settling(), rig.settler.still_writing()) == (False, [], [])


async def test_release_all_removes_the_staging_links(rig: Rig):
    settler = Settler(str(rig.root), Staging(str(rig.staging)), 3600.0, (), ignore, ignore, ignore)
    for i in range(3):
        settler.notice(rig.write(f"checkpoint-{i}/model.bin", b"w" * i), closed=True)
    assert len(os.listdir(rig.staging)) == 3
    settler.release_all()
    assert os.listdir(rig.staging) == []
    assert settler.candidates == {} and not settler.busy()
