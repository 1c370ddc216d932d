"""The engine in-process, where its counters can be read: missed events, polling, new pods, disk
pressure. Real inotify, real files, a real store (local directory, moto, JuiceFS)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from pathlib import Path

import pytest
from engines import config, counter, s3_flags, until
from watchdog.observers.inotify_c import InotifyFD

from daemon.catalog import layout
from daemon.commands.common import storage_for
from daemon.upload.engine import Engine

KIND = "integration"

MiB = 1 << 20
QUEUE_LIMIT = "/proc/sys/fs/inotify/max_queued_events"  # machine-wide, not per user namespace: never written


def write_files(folder: Path, count: int, size: int = 100) -> None:
    for i in range(count):
        (folder / f"d{i % 10}").mkdir(parents=True, exist_ok=True)
        (folder / f"d{i % 10}" / f"f{i:05}.bin").write_bytes(os.urandom(size))


async def stored_keys(storage, prefix: str) -> set[str]:
    return {o.key[len(prefix) :] async for o in storage.list(prefix)}


class ReaderGate:
    """Holds watchdog's inotify reader thread between two reads, as a stalled reader would be: the
    kernel keeps queueing events for it, up to the machine's own max_queued_events, then overflows.
    Counts the IN_Q_OVERFLOW events the reader then gets."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.flowing = threading.Event()
        self.flowing.set()
        self.parked = threading.Event()
        self.overflows = 0
        read_events = InotifyFD.read_events

        def gated(fd: InotifyFD, **kwargs: object) -> list:
            if not self.flowing.is_set():
                self.parked.set()
                self.flowing.wait()
            events = read_events(fd, **kwargs)
            self.overflows += sum(e.is_queue_overflow for e in events)
            return events

        monkeypatch.setattr(InotifyFD, "read_events", gated)

    def close(self, nudge: Path) -> None:
        """Park the reader: it is woken by an event on `nudge`, then waits before its next read."""
        self.parked.clear()
        self.flowing.clear()
        os.utime(nudge)
        assert self.parked.wait(10), "the inotify reader did not park"

    def open(self) -> None:
        self.flowing.set()


async def test_overflowed_inotify_queue_is_caught_by_the_reconciliation_scan(tmp_path, s3_bucket, monkeypatch):
    ckpt = tmp_path / "ckpt"
    folders = [ckpt / f"d{i}" for i in range(10)]  # made now and watched from the start: no new watch later
    for folder in folders:
        folder.mkdir(parents=True)
    queue_limit = int(Path(QUEUE_LIMIT).read_text())  # read only: the machine's setting is left alone
    gate = ReaderGate(monkeypatch)
    c = config(tmp_path, **s3_flags(s3_bucket), watch_mode="inotify", rescan_interval="1")
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        found_before, stored_before = counter("ckptd_rescan_found_files_total"), counter("ckptd_uploaded_files_total")
        try:
            await asyncio.to_thread(gate.close, ckpt)
            # Fill the queue with events that name no file (each utime queues one for the folder and
            # one for its parent, never twice the same in a row, which the kernel would merge)...
            await asyncio.to_thread(lambda: [os.utime(folders[i % 10]) for i in range(queue_limit + 100)])
            # ...so every event of the files written now is dropped, and one IN_Q_OVERFLOW queued.
            await asyncio.to_thread(write_files, ckpt, 2000)
        finally:
            gate.open()
        await until(lambda: gate.overflows > 0, 30, "the reader to get the kernel's IN_Q_OVERFLOW")
        await until(lambda: counter("ckptd_uploaded_files_total") - stored_before >= 2000, 120, "2000 files stored")
        # Found before the final scan, by the periodic one, each of them: no event told of any.
        assert counter("ckptd_rescan_found_files_total") - found_before >= 2000
        report = await engine.shutdown()
    assert report.ok and report.stored == 2000
    async with storage_for(c) as storage:
        assert len(await stored_keys(storage, layout.rank_prefix("proj", "job-1", 0))) == 2000


async def test_polling_mode_stores_everything(tmp_path, s3_bucket):
    c = config(tmp_path, **s3_flags(s3_bucket), watch_mode="poll")
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        assert engine.detector.mode == "poll"
        await asyncio.to_thread(write_files, tmp_path / "ckpt", 200)
        await until(lambda: engine.uploader.stored_count >= 200, 60, "200 files stored")
        report = await engine.shutdown()
        assert report.ok and report.stored == 200


async def test_new_pod_of_the_same_job_does_not_upload_committed_files_again(tmp_path):
    c = config(tmp_path, f"file://{tmp_path}/store")
    ckpt = tmp_path / "ckpt" / "checkpoint-7"
    ckpt.mkdir(parents=True)
    (ckpt / "model.bin").write_bytes(os.urandom(MiB))
    (ckpt / "trainer_state.json").write_text('{"global_step": 7}')
    async with storage_for(c) as storage:
        first = Engine(c, storage)
        await first.startup()
        await until(lambda: first.uploader.stored_count == 2, 30, "first upload")
        assert (await first.shutdown()).ok
    subprocess.run(["rm", "-rf", str(tmp_path / "ckpt" / ".ckptd")], check=True)  # a new pod: no journal
    async with storage_for(c) as storage:
        second = Engine(c, storage)
        await second.startup()
        report = await second.shutdown()
    assert report.ok and report.stored == 0 and report.uncommitted == []


async def test_disk_pressure_removes_only_older_committed_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(ckpt)], check=True)
    try:
        c = config(tmp_path, f"file://{tmp_path}/store", min_free_bytes="20MiB")
        async with storage_for(c) as storage:
            engine = Engine(c, storage)
            await engine.startup()
            for step in (1, 2, 3):
                folder = ckpt / f"checkpoint-{step}"
                folder.mkdir()
                (folder / "model.bin").write_bytes(os.urandom(10 * MiB))
                (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
            # An interrupted save: the marker Hugging Face writes last never came.
            (ckpt / "checkpoint-0").mkdir()
            (ckpt / "checkpoint-0" / "training_args.bin").write_bytes(os.urandom(MiB))
            await until(lambda: not (ckpt / "checkpoint-1").exists(), 30, "checkpoint-1 removed")
            report = await engine.shutdown()
        left = sorted(p.name for p in ckpt.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(ckpt)], check=True)
    assert report.ok
    assert "checkpoint-3" in left and "checkpoint-0" in left  # never the newest, never uncommitted
    assert engine.tracker.is_committed("checkpoint-1") and "checkpoint-0" in report.uncommitted
    assert (tmp_path / "store" / layout.file_key("proj", "job-1", 0, "checkpoint-1/model.bin")).exists()


async def test_links_and_fifos_present_before_start_are_counted_once_and_never_read(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not a checkpoint")
    (ckpt / "etc").symlink_to(outside)
    (ckpt / "secret-link.txt").symlink_to(outside / "secret.txt")
    os.mkfifo(ckpt / "pipe")
    (ckpt / "model.bin").write_bytes(b"weights")
    c = config(tmp_path, f"file://{tmp_path}/store")
    links, specials = (
        counter("ckptd_files_skipped_total", reason="symlink"),
        counter("ckptd_files_skipped_total", reason="not_regular"),
    )
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        await until(lambda: engine.uploader.stored_count == 1, 30, "model.bin stored")
        await engine.intake.rescan()
        await engine.intake.rescan()  # rescans see them again: still counted once
        report = await engine.shutdown()
    assert report.ok and report.stored == 1
    assert counter("ckptd_files_skipped_total", reason="symlink") - links == 2
    assert counter("ckptd_files_skipped_total", reason="not_regular") - specials == 1
    stored = [p.name for p in (tmp_path / "store").rglob("*") if p.is_file() and "rank-0" in p.parts]
    assert stored == ["model.bin"]
