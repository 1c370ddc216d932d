"""What the uploader reports: the store's health, GET /status, and the scraped backlog gauges.
Real components (queue, tracker, settler, uploader, a local store), not stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest
from engines import config, until

from daemon import metrics
from daemon.storage import StorageError
from daemon.storage.local import LocalStorage
from daemon.upload.engine import Engine
from daemon.upload.health import RECENT_ERRORS, StoreHealth
from daemon.upload.queue import SMALL, Job

KIND = "unit"

NET = StorageError("put", "k", "NetworkError", "connection refused")
DENIED = StorageError("put", "k", "AccessDenied", "denied", http_status=403)
REFUSED = ["storage refuses requests: AccessDenied (put)"]
UNREACHABLE = ["storage not reachable"]


@pytest.mark.parametrize(
    "events, reachable, permanent, not_ready",
    [
        ([], None, None, []),  # no request yet
        ([("observe", None)], True, None, []),
        ([("observe", NET)], False, None, UNREACHABLE),
        ([("observe", NET), ("observe", None)], True, None, []),  # reachable again
        ([("observe", DENIED)], True, None, []),  # it answered; one refusal is not yet given up on
        ([("observe", DENIED), ("failed", DENIED)], True, "AccessDenied", REFUSED),
        ([("observe", NET), ("failed", NET)], False, None, UNREACHABLE),  # given up, but transient
        ([("observe", DENIED), ("failed", DENIED), ("observe", NET)], False, "AccessDenied", REFUSED),
        ([("observe", DENIED), ("failed", DENIED), ("stored",)], True, None, []),  # a stored file clears it
    ],
)
def test_store_health(events, reachable, permanent, not_ready):
    health = StoreHealth()
    for method, *args in events:
        getattr(health, method)(*args)
    assert health.reachable is reachable
    assert (health.permanent.code if health.permanent else None) == permanent
    assert health.not_ready() == not_ready


def test_store_health_keeps_the_recent_errors_bounded():
    health = StoreHealth()
    for i in range(RECENT_ERRORS + 5):
        health.observe(StorageError("get", f"k{i}", "SlowDown", "x" * 1000))
    assert len(health.recent) == RECENT_ERRORS
    assert health.recent[-1]["key"] == f"k{RECENT_ERRORS + 4}" and health.recent[0]["key"] == "k5"
    assert len(health.recent[-1]["message"]) == 300 and health.recent[-1]["transient"] is True


class Rig:
    """The engine's own components, wired by the engine itself, none of them started."""

    def __init__(self, tmp_path: Path) -> None:
        engine = Engine(
            config(tmp_path, f"file://{tmp_path / 'store'}", settle_time="0.1"), LocalStorage(tmp_path / "store")
        )
        self.root = Path(engine.root)
        self.root.mkdir()
        os.makedirs(engine.staging.folder)
        engine.journal.open()
        self.staging, self.journal, self.store, self.queue = (
            engine.staging,
            engine.journal,
            engine.storage,
            engine.queue,
        )
        self.tracker, self.health, self.deadline = engine.tracker, engine.health, engine.deadline
        self.uploader, self.status = engine.uploader, engine.status

    def job(self, relpath: str, size: int, age: float = 0.0) -> Job:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        pin = self.staging.pin(str(path), relpath)
        assert pin is not None
        return Job(pin, f"training_projects/proj/jobs/job-1/rank-0/{relpath}", time.monotonic() - age)


@pytest.fixture
def rig(tmp_path: Path):
    made = []

    def make() -> Rig:
        made.append(Rig(tmp_path))
        return made[-1]

    yield make
    for r in made:
        with contextlib.suppress(FileNotFoundError):  # a test may have removed the whole folder
            r.journal.close()


async def test_an_idle_uploader_reports_nothing_pending(rig):
    r = rig()
    backlog = r.status.backlog()
    assert (backlog.files, backlog.bytes, backlog.oldest_age) == (0, 0, 0.0)
    assert backlog.free_bytes > 0
    s = r.status.status()
    assert (s["pending_files"], s["pending_bytes"], s["oldest_pending_age_seconds"]) == (0, 0, 0.0)
    assert (s["in_flight"], s["failed"], s["still_being_written"], s["last_errors"]) == ([], [], [], [])
    assert (s["uploaded_files"], s["last_commit"], s["uncommitted"]) == (0, None, [])
    assert (s["watch_mode"], s["watch_degraded"], s["storage"]) == ("auto", None, r.store.url)
    assert (s["storage_reachable"], s["draining"]) == (None, False)


async def test_status_counts_queued_in_flight_and_failed_files_and_the_last_commit(rig):
    r = rig()
    # One real upload and commit first: the uploaded count and the last commit come from them.
    r.queue.put(r.job("checkpoint-1/trainer_state.json", 5))
    uploading = asyncio.create_task(r.uploader.run(SMALL))
    try:
        await until(lambda: r.uploader.stored_count == 1, 5, "the upload")
    finally:
        uploading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await uploading
    assert r.tracker.due(time.monotonic()) == [("checkpoint-1", "marker")]
    assert r.tracker.committed("checkpoint-1", time.monotonic())
    # Then: one in flight, one failed, one queued (the oldest).
    r.queue.put(r.job("checkpoint-2/b.bin", 20))
    r.queue.put(r.job("checkpoint-2/c.bin", 30))
    in_flight = await r.queue.get(SMALL)
    failed = await r.queue.get(SMALL)
    r.queue.fail(failed, StorageError("put", failed.key, "SlowDown", "slow down", http_status=503))
    r.queue.done(failed)
    r.queue.put(r.job("checkpoint-2/a.bin", 10, age=5.0))
    r.health.observe(NET)

    backlog = r.status.backlog()
    assert (backlog.files, backlog.bytes) == (3, 60)
    assert backlog.oldest_age >= 5.0
    s = r.status.status()
    assert (s["pending_files"], s["pending_bytes"]) == (3, 60)
    assert s["oldest_pending_age_seconds"] >= 5.0
    assert s["in_flight"] == [in_flight.relpath] == ["checkpoint-2/b.bin"]
    assert s["failed"] == [{"path": "checkpoint-2/c.bin", "code": "SlowDown", "message": "slow down"}]
    assert s["uploaded_files"] == 1
    assert s["last_commit"] == {"checkpoint": "checkpoint-1", "reason": "marker"}
    assert (s["storage_reachable"], [e["code"] for e in s["last_errors"]]) == (False, ["NetworkError"])
    assert s["draining"] is False
    r.deadline.start(60)
    assert r.status.status()["draining"] is True


async def test_the_backlog_gauges_report_the_attached_source(rig):
    r = rig()
    r.queue.put(r.job("checkpoint-1/a.bin", 10, age=3.0))
    r.queue.put(r.job("checkpoint-1/b.bin", 32))
    value = metrics.REGISTRY.get_sample_value
    metrics.BACKLOG.attach(r.status.backlog)
    try:
        assert value("ckptd_pending_files") == 2
        assert value("ckptd_pending_bytes") == 42
        assert value("ckptd_oldest_pending_age_seconds") >= 3.0
        assert value("ckptd_checkpoint_dir_free_bytes") > 0
    finally:
        metrics.BACKLOG.attach(None)
    assert (value("ckptd_pending_files"), value("ckptd_pending_bytes")) == (0, 0)
    assert value("ckptd_checkpoint_dir_free_bytes") == 0


async def test_a_scrape_survives_the_checkpoint_folder_vanishing(rig):
    """A trainer may remove and re-create its output folder; /metrics and /status must still answer."""
    r = rig()
    r.queue.put(r.job("checkpoint-1/a.bin", 10))
    shutil.rmtree(r.root)
    backlog = r.status.backlog()
    assert (backlog.files, backlog.bytes) == (1, 10)
    assert r.status.status()["pending_files"] == 1
