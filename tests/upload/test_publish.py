"""Publishing: commit manifests and job metadata written to a real store (a local directory), read
back from it, with the commit metrics and the store's health following what happened."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime
from pathlib import Path

import pytest
from engines import config, counter, until
from structlog.testing import capture_logs

from daemon import metrics
from daemon.catalog import jobmeta, layout
from daemon.catalog.jsonio import read_object
from daemon.catalog.manifest import StoredFile, parse_manifest
from daemon.storage import Body, StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline
from daemon.upload.commit import CheckpointTracker
from daemon.upload.health import StoreHealth
from daemon.upload.publish import Publisher

KIND = "unit"

COMMITTED = "ckptd_checkpoints_committed_total"


class RefusingStore(LocalStorage):
    """A real local store whose puts are refused for good, as a store denying writes would."""

    async def put(self, key: str, body: Body) -> str:
        raise StorageError("put", key, "AccessDenied", "writes denied", http_status=403, transient=False)


class GatedStore(LocalStorage):
    """A real local store whose manifest writes wait at a gate, so a test can act meanwhile."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def put(self, key: str, body: Body) -> str:
        if "/manifests/" in key:
            self.entered.set()
            await self.gate.wait()
        return await super().put(key, body)


async def store_file(store: LocalStorage, tracker: CheckpointTracker, relpath: str, data: bytes) -> StoredFile:
    """Upload a file to the store and tell the tracker, as the uploader does."""
    key = layout.file_key("proj", "job-1", 0, relpath)
    etag = await store.put(key, data)
    stored = StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, etag)
    tracker.noticed(relpath, time.monotonic())
    tracker.stored(stored, time.monotonic())
    return stored


def publisher_for(tmp_path: Path, store: LocalStorage, health: StoreHealth | None = None):
    c = config(tmp_path, f"file://{tmp_path / 'store'}")
    tracker = CheckpointTracker(c.markers, c.quiet_commit)
    return Publisher(c, store, tracker, Deadline.after(2), health or StoreHealth()), tracker


async def read_manifest(store: LocalStorage, checkpoint: str) -> dict:
    return parse_manifest(await store.get(layout.manifest_key("proj", "job-1", 0, checkpoint)))


async def test_a_due_checkpoint_gets_its_manifest_and_the_commit_metrics_move(tmp_path: Path):
    store = LocalStorage(tmp_path / "store")
    publisher, tracker = publisher_for(tmp_path, store)
    model = await store_file(store, tracker, "checkpoint-5/model.bin", b"weights")
    state = await store_file(store, tracker, "checkpoint-5/trainer_state.json", b'{"global_step": 5}')
    tracker.set_metrics("checkpoint-5", {"global_step": 5, "loss": 0.5})
    committed_before = counter(COMMITTED)
    started = time.time()
    await publisher.commit_due(final=False)
    manifest = await read_manifest(store, "checkpoint-5")
    assert [f["path"] for f in manifest["files"]] == [model.relpath, state.relpath]
    assert [f["sha256"] for f in manifest["files"]] == [model.sha256, state.sha256]
    assert (manifest["step"], manifest["reason"], manifest["metrics"]["loss"]) == (5, "marker", 0.5)
    assert tracker.is_committed("checkpoint-5") and tracker.uncommitted() == []
    assert counter(COMMITTED) == committed_before + 1
    assert metrics.REGISTRY.get_sample_value("ckptd_last_committed_step") == 5
    assert metrics.REGISTRY.get_sample_value("ckptd_last_commit_timestamp_seconds") >= started


async def test_a_permanently_failing_manifest_write_leaves_the_checkpoint_uncommitted(tmp_path: Path):
    health = StoreHealth()
    store = RefusingStore(tmp_path / "store")
    publisher, tracker = publisher_for(tmp_path, store, health)
    await store_file(LocalStorage(tmp_path / "store"), tracker, "checkpoint-5/trainer_state.json", b"{}")
    committed_before = counter(COMMITTED)
    with capture_logs() as logs:
        await publisher.commit_due(final=False)
    [failed] = [e for e in logs if e["event"] == "commit failed"]
    assert (failed["checkpoint"], failed["code"], failed["log_level"]) == ("checkpoint-5", "AccessDenied", "error")
    assert not tracker.is_committed("checkpoint-5") and tracker.uncommitted() == ["checkpoint-5"]
    assert tracker.last_commit is None
    assert counter(COMMITTED) == committed_before
    assert [e["code"] for e in health.recent] == ["AccessDenied"]  # refused once, not retried
    assert tracker.due(time.monotonic()) == [("checkpoint-5", "marker")]  # the next round tries again


async def test_a_checkpoint_changed_while_its_manifest_is_written_comes_due_again(tmp_path: Path):
    store = GatedStore(tmp_path / "store")
    publisher, tracker = publisher_for(tmp_path, store)
    await store_file(store, tracker, "checkpoint-5/model.bin", b"v1")
    await store_file(store, tracker, "checkpoint-5/trainer_state.json", b"{}")
    committed_before = counter(COMMITTED)
    committing = asyncio.create_task(publisher.commit_due(final=False))
    await until(store.entered.is_set, 5, "the manifest write to start")
    newer = await store_file(store, tracker, "checkpoint-5/model.bin", b"v2")  # stored meanwhile
    store.gate.set()
    await committing
    assert not tracker.is_committed("checkpoint-5")
    assert tracker.last_commit is None and counter(COMMITTED) == committed_before
    assert tracker.due(time.monotonic()) == [("checkpoint-5", "marker")]
    await publisher.commit_due(final=False)
    assert tracker.is_committed("checkpoint-5") and counter(COMMITTED) == committed_before + 1
    manifest = await read_manifest(store, "checkpoint-5")
    assert {f["path"]: f["sha256"] for f in manifest["files"]}["checkpoint-5/model.bin"] == newer.sha256


async def test_job_status_writes_job_metadata_and_the_last_commit_of_this_rank(tmp_path: Path):
    store = LocalStorage(tmp_path / "store")
    publisher, tracker = publisher_for(tmp_path, store)
    await publisher.job_status("RUNNING", None)
    status_key = layout.rank_status_key("proj", "job-1", 0)
    first = await read_object(store, status_key)
    assert (first["status"], first["exit_code"], first["last_commit"]) == ("RUNNING", None, None)
    await store_file(store, tracker, "checkpoint-7/trainer_state.json", b"{}")
    await publisher.commit_due(final=False)
    manifest = await read_manifest(store, "checkpoint-7")
    await publisher.job_status("COMPLETED", 0, sync_status="COMPLETED")
    job = await jobmeta.read_job_record(store, "proj", "job-1")
    assert (job["project"], job["job_id"], job["group_size"]) == ("proj", "job-1", 1)
    datetime.fromisoformat(job["created_at"])
    status = await read_object(store, status_key)
    assert (status["status"], status["sync_status"], status["exit_code"]) == ("COMPLETED", "COMPLETED", 0)
    assert status["last_commit"] == {
        "checkpoint": "checkpoint-7",
        "step": 7,
        "committed_at": manifest["committed_at"],
    }


async def test_a_permanent_job_metadata_failure_is_told_to_the_store_health(tmp_path: Path):
    not_a_folder = tmp_path / "store-is-a-file"
    not_a_folder.write_bytes(b"")
    health = StoreHealth()
    publisher, _ = publisher_for(tmp_path, LocalStorage(not_a_folder), health)
    with capture_logs() as logs:
        await publisher.job_status("RUNNING", None)
    assert health.permanent is not None and health.permanent.code == "KeyConflict"
    assert health.not_ready() == ["storage refuses requests: KeyConflict (put)"]
    assert [e["code"] for e in logs if e["event"] == "job metadata not written"] == ["KeyConflict"]


@pytest.mark.parametrize("final, reason", [(False, None), (True, "final")])
async def test_a_checkpoint_without_a_marker_commits_only_as_final(tmp_path: Path, final: bool, reason: str | None):
    store = LocalStorage(tmp_path / "store")
    publisher, tracker = publisher_for(tmp_path, store)
    await store_file(store, tracker, "step-3/weights.bin", b"w")  # no marker, quiet_commit not yet reached
    await publisher.commit_due(final=final)
    assert tracker.is_committed("step-3") is (reason is not None)
    if reason is not None:
        assert (await read_manifest(store, "step-3"))["reason"] == reason
    else:
        assert await store.head(layout.manifest_key("proj", "job-1", 0, "step-3")) is None
