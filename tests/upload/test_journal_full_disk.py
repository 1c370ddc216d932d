"""The journal on a full disk (issue 10, defect 4, the daemon's own state): a real 1 MiB tmpfs,
filled to ENOSPC with a filler file. No write error reaches the callers of `record()`; the
records wait in memory, `not_ready()` says why, and `sync()` lands them once space is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from engines import counter, until
from structlog.testing import capture_logs

from daemon.upload import journal as journal_module
from daemon.upload.complete import Identity
from daemon.upload.journal import Journal, Multipart, Pinned, Stored

KIND = "integration"  # mounts a file system

FAILED = "journal write failed: records kept in memory, retrying"
ENOSPC = "journal not writable: ENOSPC (No space left on device)"


@dataclass
class Disk:
    """A 1 MiB file system, and the journals opened on it (closed before it is unmounted)."""

    mnt: Path
    opened: list[Journal] = field(default_factory=list)

    def journal(self) -> Journal:
        self.opened.append(Journal(str(self.mnt / "state" / "journal.jsonl")))
        return self.opened[-1]

    @property
    def path(self) -> Path:
        return self.mnt / "state" / "journal.jsonl"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Disk]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    disk = Disk(mnt)
    try:
        yield disk
    finally:
        for journal in disk.opened:  # a no-op for those a test closed; a failed test's must not pin the mount
            with contextlib.suppress(OSError):
                journal.close()
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)
            raise AssertionError(f"a descriptor on {mnt} was leaked")


def fill(disk: Path) -> Path:
    """Write a filler file until the file system refuses another byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler


def stored(i: int) -> Stored:
    return Stored(f"checkpoint-{i}/model.safetensors", Identity(64769, 1000 + i, 4096 * i, 10**18 + i), f"{i:064x}",
                  f"training_projects/p/jobs/j/rank-0/checkpoint-{i}/model.safetensors", f"etag-{i}")  # fmt: skip


@contextlib.asynccontextmanager
async def syncing(journal: Journal):
    """What the engine does: `sync()` every so often (0.2 s there)."""

    async def loop() -> None:
        while True:
            await journal.sync()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def open_paths(under: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [p for p in out if p.startswith(str(under))]


async def test_records_kept_while_the_disk_is_full_land_once_space_is_freed(small_disk: Disk):
    path, journal = small_disk.path, small_disk.journal()
    journal.open()
    for i in range(5):
        journal.record("stored", stored(i))
    await journal.sync()
    filler = fill(small_disk.mnt)
    before = counter("ckptd_state_write_errors_total", reason="ENOSPC")
    with capture_logs() as logs:
        for i in range(5, 120):  # the settle task, the upload workers, the publisher: none may die
            journal.record("stored", stored(i))
        journal.record("pinned", Pinned("checkpoint-200/a.bin", Identity(1, 2, 3, 4), "2-4-3"))
        journal.record("multipart", Multipart("checkpoint-200/b.bin", Identity(1, 5, 6, 7), "k/b", "up-1", 5 << 20))
        journal.record("unpinned", stage="2-4-3")
        assert journal.not_ready() == [ENOSPC] and journal.error == ENOSPC
        assert journal.unsaved > 100
        assert not path.read_bytes().endswith(b"\n")  # a short write left half a line in the file
        async with syncing(journal):  # still full: every retry fails, and the streak is logged once
            await until(lambda: counter("ckptd_state_write_errors_total", reason="ENOSPC") >= before + 3, 10, "retries")
            assert journal.not_ready() == [ENOSPC]
            filler.unlink()
            await until(lambda: journal.error is None, 10, "the journal to be writable again")
    assert [e["event"] for e in logs if e["event"] in (FAILED, "journal writable again")] == [
        FAILED,
        "journal writable again",
    ]
    assert journal.not_ready() == [] and journal.unsaved == 0
    assert path.read_bytes().endswith(b"\n")
    again = small_disk.journal()  # what a crash right now would leave for the next start
    assert again.open() == journal.state and again.set_aside is None
    assert len(again.state.stored) == 120 and list(again.state.multipart) == ["checkpoint-200/b.bin"]
    assert again.state.pinned == {}
    again.close()
    assert journal.close() is True


async def test_close_on_a_full_disk_reports_and_the_next_start_replays_what_landed(small_disk: Disk):
    journal = small_disk.journal()
    journal.open()
    for i in range(3):
        journal.record("stored", stored(i))
    filler = fill(small_disk.mnt)
    for i in range(3, 60):
        journal.record("stored", stored(i))
    with capture_logs() as logs:
        assert journal.close() is False  # reports, never raises: shutdown goes on
    assert "journal not saved at shutdown" in [e["event"] for e in logs]
    assert open_paths(small_disk.mnt) == []
    filler.unlink()
    with capture_logs() as logs:
        again = small_disk.journal()
        state = again.open()
    assert again.set_aside is None and [e for e in logs if e["log_level"] == "error"] == []  # the torn line: silent
    assert 3 <= len(state.stored) < 60
    assert all(journal.state.stored[r] == s for r, s in state.stored.items())  # a prefix of what was recorded
    again.close()


def test_a_start_on_a_full_disk_appends_to_the_old_journal_after_its_torn_line(small_disk: Disk):
    """Compaction needs room for a second copy; without it the start goes on with the old file.
    A torn last line from a crash is cut off first, or the next record would glue onto it."""
    path, journal = small_disk.path, small_disk.journal()
    journal.open()
    for i in range(3):
        journal.record("stored", stored(i))
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"op":"stored","relpath":"checkpoint-9/x')  # the crash
    filler = fill(small_disk.mnt)
    with capture_logs() as logs:
        journal = small_disk.journal()
        state = journal.open()
    assert "journal not compacted at start: appending to it" in [e["event"] for e in logs]
    assert len(state.stored) == 3 and journal.not_ready() == [] and journal.set_aside is None
    journal.record("stored", stored(3))  # fits in the file's last page, full disk or not
    assert journal.not_ready() == []
    assert journal.close() is True  # on disk and fsynced; only the compaction failed
    filler.unlink()
    again = small_disk.journal()
    assert sorted(again.open().stored) == sorted(stored(i).relpath for i in range(4))
    assert again.set_aside is None
    again.close()


async def test_a_record_made_while_the_retry_is_in_flight_is_written_too(small_disk: Disk, monkeypatch):
    """The retry's fsync runs in a thread; a record made meanwhile waits in memory and must still
    reach the file once the journal is healthy again, without another record to push it."""
    journal = small_disk.journal()
    journal.open()
    filler = fill(small_disk.mnt)
    for i in range(30):
        journal.record("stored", stored(i))
    assert journal.error == ENOSPC
    filler.unlink()
    entered, release = threading.Event(), threading.Event()
    real = journal_module._fsync_and_close

    def held_fsync(fd: int) -> None:
        entered.set()
        release.wait(10)
        real(fd)

    monkeypatch.setattr(journal_module, "_fsync_and_close", held_fsync)
    async with syncing(journal):
        await until(entered.is_set, 10, "the retry's fsync")
        journal.record("stored", stored(30))  # the journal is still failing as far as record() knows
        release.set()
        await until(lambda: journal.error is None and journal.unsaved == 0, 10, "every record on disk")
    again = small_disk.journal()
    assert len(again.open().stored) == 31
    again.close()
    journal.close()
