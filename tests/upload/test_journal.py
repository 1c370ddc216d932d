"""The journal: records survive a restart, a torn last line is ignored, compaction keeps state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from pathlib import Path

from engines import until

from daemon.upload import journal as journal_module
from daemon.upload.complete import Identity
from daemon.upload.journal import Journal, Multipart, Pinned, Stored

KIND = "unit"

ID = Identity(1, 2, 3, 4)


async def test_replay_after_restart_and_torn_line(tmp_path):
    path = str(tmp_path / "state" / "journal.jsonl")
    j = Journal(path)
    j.open()
    j.record("stored", Stored("ckpt-1/a.bin", ID, "ab" * 32, "k/a", "etag"))
    j.record("multipart", Multipart("ckpt-1/big.bin", ID, "k/big", "upload-1", 16 << 20))
    j.record("pinned", Pinned("ckpt-1/c.bin", ID, "2-4-3"))
    j.record("multipart_done", relpath="ckpt-1/big.bin")
    j.record("multipart", Multipart("ckpt-2/big.bin", ID, "k/big2", "upload-2", 16 << 20))
    await j.sync()
    with open(path, "a") as f:
        f.write('{"op":"stored","relpath":"torn')  # a crash in the middle of a line

    again = Journal(path)  # the next run, while `j` is as a crashed run left it
    state = again.open()
    assert state.stored["ckpt-1/a.bin"] == Stored("ckpt-1/a.bin", ID, "ab" * 32, "k/a", "etag")
    assert list(state.multipart) == ["ckpt-2/big.bin"]
    assert state.pinned["2-4-3"].relpath == "ckpt-1/c.bin"
    again.close()
    j.close()


def test_close_compacts(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    j = Journal(path)
    j.open()
    for i in range(50):
        j.record("pinned", Pinned(f"f{i}", ID, f"s{i}"))
        j.record("unpinned", stage=f"s{i}")
    j.record("stored", Stored("kept", ID, "0" * 64, "k", "e"))
    j.close()
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 1 and '"kept"' in lines[0]
    assert os.listdir(tmp_path) == ["journal.jsonl"]  # no temporary file left behind


async def test_sync_returns_only_once_its_own_records_are_fsynced(tmp_path, monkeypatch):
    """A sync racing one already in flight must not return on the strength of that one: it began
    before this caller's record was written (a multipart upload must be durable before its parts)."""
    j = Journal(str(tmp_path / "journal.jsonl"))
    j.open()
    release_first = threading.Event()
    done: list[int] = []  # records written when each completed fsync began
    calls = []
    real = journal_module._fsync_and_close

    def fsync(fd: int) -> None:
        began_with = len(Path(j.path).read_text().splitlines())  # records the OS has at this fsync
        calls.append(began_with)
        if len(calls) == 1:
            release_first.wait(10)
        real(fd)
        done.append(began_with)

    monkeypatch.setattr(journal_module, "_fsync_and_close", fsync)
    j.record("unpinned", stage="a")
    j.record("unpinned", stage="b")  # e.g. the multipart upload that is about to send its parts
    first = asyncio.ensure_future(j.sync())  # the periodic group commit, held in its thread
    await until(lambda: len(calls) == 1, 5, "the first fsync to be under way")
    await asyncio.wait_for(j.sync(), 5)  # the multipart upload's own
    assert 2 in done  # an fsync that began with record "b" written had completed
    release_first.set()
    await first
    j.close()


def test_close_writes_the_journal_anew_when_its_folder_was_removed_and_releases_the_file(tmp_path):
    """Someone removed the state folder under a running daemon: its records are still true, so
    close writes them to a new journal, never raises, and leaks no descriptor to the deleted one."""
    folder = tmp_path / "state"
    j = Journal(str(folder / "journal.jsonl"))
    j.open()
    j.record("stored", Stored("ckpt-1/a.bin", ID, "ab" * 32, "k/a", "etag"))
    shutil.rmtree(folder)
    assert j.close() is True
    assert not [p for p in open_paths() if p.startswith(str(folder))]
    assert j.close() is True  # and a second close is a no-op
    again = Journal(str(folder / "journal.jsonl"))
    assert list(again.open().stored) == ["ckpt-1/a.bin"]
    again.close()


def open_paths() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor is gone by now
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out
