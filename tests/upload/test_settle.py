"""Settling: candidate files are pinned, re-checked after the settle time and handed on once complete.

Real files in tmp_path, a real staging folder, `Settler.run()` as a task; callbacks collect what
the settler hands on or skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from engines import until
from structlog.testing import capture_logs
from unprivileged import REPO, as_nobody, give, open_folder

from daemon.config.schema import DEFAULT_IGNORE
from daemon.upload.complete import retry_delay
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


# -- links, FIFOs and the like: skipped once, never pinned (issue 10, defects 1 and 3) ---------------


def link_outside(rig: Rig) -> str:
    (rig.root.parent / "outside").mkdir(exist_ok=True)
    (rig.root.parent / "outside" / "secret").write_bytes(b"secret")
    os.symlink(rig.root.parent / "outside" / "secret", rig.root / "odd")
    return "odd"


def link_to_folder(rig: Rig) -> str:
    os.symlink("/etc", rig.root / "etc")
    return "etc/passwd"  # a path through the link, as a poller that stats would report it


def dangling(rig: Rig) -> str:
    os.symlink("nowhere", rig.root / "odd")
    return "odd"


def fifo(rig: Rig) -> str:
    os.mkfifo(rig.root / "odd")
    return "odd"


def unix_socket(rig: Rig) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(rig.root / "odd"))
    return "odd"


def char_device(rig: Rig) -> str:
    os.mknod(rig.root / "odd", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return "odd"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (link_outside, "symlink"),
        (link_to_folder, "symlink"),
        (dangling, "symlink"),
        (fifo, "not_regular"),
        (unix_socket, "not_regular"),
        (char_device, "not_regular"),
    ],
    ids=["link-to-file-outside", "path-through-folder-link", "dangling-link", "fifo", "socket", "char-device"],
)
async def test_links_and_special_files_are_skipped_once_and_never_pinned(rig: Rig, make, reason):
    relpath = make(rig)
    with capture_logs() as logs:
        async with running(rig.settler):
            for closed in (True, False, True):  # an event, a scan, another event
                rig.settler.notice(str(rig.root / relpath), closed=closed)
                rig.settler.notice(
                    str(rig.root / relpath), closed=closed, early=rig.settler.pin_early(str(rig.root / relpath))
                )
            # Skipped as it is noticed: no candidate is left for the settle loop to judge later.
            await until(lambda: rig.settler.candidates == {}, 5, "nothing left to settle")
    assert rig.seen.skipped == [(relpath, reason)]
    assert len([e for e in logs if e.get("path") == relpath]) == 1  # said once
    assert rig.seen.noticed == [] and rig.seen.complete == []
    assert rig.settler.candidates == {} and os.listdir(rig.staging) == []


async def test_a_file_replaced_by_a_link_before_it_is_pinned_is_not_followed(rig: Rig):
    path = rig.write("checkpoint-1/model.bin", b"weights")
    async with running(rig.settler):
        rig.settler.notice(path, closed=False)  # a scan found it: not pinned yet
        os.unlink(path)
        os.symlink("/etc/hostname", path)
        await until(lambda: len(rig.seen.skipped) == 2 and not rig.settler.candidates, 5, "the candidate to be dropped")
    assert sorted(rig.seen.skipped) == [("checkpoint-1/model.bin", "symlink"), ("checkpoint-1/model.bin", "vanished")]
    assert rig.seen.complete == [] and os.listdir(rig.staging) == []


# -- one file's error stays that file's (issue 10, defect 4) ------------------------------------------


async def test_an_unexpected_error_on_one_file_does_not_end_settling(rig: Rig):
    def complete(pin: Pin) -> None:
        if pin.relpath == "bad.bin":
            raise RuntimeError("a bug downstream")
        rig.seen.complete.append((pin, time.monotonic()))

    rig.settler.on_complete = complete
    rig.settler.notice(rig.write("bad.bin", b"b"), closed=True)
    task = asyncio.create_task(rig.settler.run())
    try:
        with capture_logs() as logs:
            await until(lambda: any(e["event"] == "settle check failed" for e in logs), 5, "the error to be logged")
            rig.settler.notice(rig.write("good.bin", b"g"), closed=True)
            await until(lambda: rig.seen.complete, 5, "the next file to complete")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert rig.seen.completed() == ["good.bin"]


# The settler as an unprivileged user, in its own process: root reads every file.
AS_NOBODY = r"""
import asyncio, json, os, sys, time
from daemon import metrics
from daemon.upload.pin import Staging
from daemon.upload.settle import Settler

root, staging = sys.argv[1], sys.argv[2]
done, skipped = [], []


def count(reason):
    return metrics.REGISTRY.get_sample_value("ckptd_upload_failures_total", {"reason": reason}) or 0


async def until(cond, what):
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def state(settler, task, c):
    return {
        "complete": sorted(p.relpath for p in done),
        "failures": settler.failures(),
        "settling": settler.settling(),
        "busy": settler.busy(),
        "eacces": count("EACCES"),
        "looks": c.failed if c else None,
        "running": not task.done(),
    }


async def main():
    settler = Settler(root, Staging(staging), 0.05, (), lambda r: None, done.append, lambda r, w: skipped.append(r))
    task = asyncio.create_task(settler.run())
    for rel, closed in (("ok.bin", True), ("locked.bin", True), ("sealed/inner.bin", False), ("later.bin", False)):
        settler.notice(os.path.join(root, rel), closed)
    await until(lambda: "ok.bin" in [p.relpath for p in done], "ok.bin to complete")
    c = settler.candidates.get("locked.bin")
    await until(lambda: c.failed >= 3 and "sealed/inner.bin" in settler.failures(), "retries")
    print("RESULT", json.dumps(state(settler, task, c)), flush=True)
    os.chmod(os.path.join(root, "locked.bin"), 0o644)  # readable again, as an owner may fix it
    os.chmod(os.path.join(root, "sealed"), 0o755)
    await until(lambda: len(done) == 4, "every file to complete")
    print("RESULT", json.dumps(state(settler, task, None)), flush=True)
    task.cancel()


asyncio.run(main())
"""


def test_an_unreadable_file_fails_alone_is_retried_and_reported(tmp_path: Path):
    with open_folder("ckptd-settle-") as base:
        root, staging = base / "ckpt", base / "staging"
        root.mkdir()
        staging.mkdir()
        for name, mode in (("ok.bin", 0o644), ("locked.bin", 0o000), ("later.bin", 0o644)):
            (root / name).write_bytes(name.encode())
            (root / name).chmod(mode)
        (root / "sealed").mkdir()
        (root / "sealed" / "inner.bin").write_bytes(b"inner")
        (root / "sealed").chmod(0o000)  # its file cannot even be looked at
        give(root, staging, root / "ok.bin", root / "locked.bin", root / "later.bin", root / "sealed")
        out = subprocess.run(
            as_nobody([sys.executable, "-c", AS_NOBODY, str(root), str(staging)]),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd="/",
            check=False,
        )
    assert out.returncode == 0, out.stdout + out.stderr
    failing, fixed = (json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT "))
    said = [line for line in out.stdout.splitlines() if "cannot read file" in line]
    assert len(said) == 2 and all("errno=EACCES" in line for line in said)  # once per file, not per retry
    assert failing["failures"] == {
        "locked.bin": "pin: EACCES (Permission denied)",
        "sealed/inner.bin": "stat: EACCES (Permission denied)",
    }
    assert failing["complete"] == ["later.bin", "ok.bin"]  # the others went on
    assert failing["settling"] == ["locked.bin", "sealed/inner.bin"]  # a drain reports them not stored
    assert failing["eacces"] == 2  # once per file, not per retry
    assert failing["looks"] >= 3 and failing["busy"] is False and failing["running"] is True
    assert fixed["complete"] == ["later.bin", "locked.bin", "ok.bin", "sealed/inner.bin"]
    assert fixed["failures"] == {} and fixed["settling"] == [] and fixed["running"] is True


def test_retry_delays_double_up_to_the_cap():
    assert [retry_delay(n) for n in (1, 2, 3, 4, 7, 8, 100)] == [0.5, 1.0, 2.0, 4.0, 30.0, 30.0, 30.0]
