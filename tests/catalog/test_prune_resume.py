"""Finishing interrupted prunes only where the record vouches for what it was deleting: a damaged
record deletes nothing, files stored after a record are a re-save and stay, and a checkpoint
committed again between the survey and the delete is left alone."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from daemon.catalog import browse, layout, prune, retention
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline

KIND = "unit"

P, J = "proj", "job-1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
EARLIER, LATER = 1_700_000_000, 1_800_000_000  # seconds since the epoch, far apart: no clock race


@pytest.mark.parametrize(
    ("readable", "now", "recorded", "action"),
    [
        (False, None, None, prune.DROP),
        (False, "t1", None, prune.DROP),
        (False, "t1", "t1", prune.DROP),
        (True, None, None, prune.FINISH),
        (True, None, "t1", prune.FINISH),
        (True, "t1", "t1", prune.FINISH),
        (True, "t2", "t1", prune.DROP),
        (True, "t1", None, prune.DROP),
    ],
)
def test_resume_action_truth_table(readable, now, recorded, action):
    assert prune.resume_action(readable, now, recorded) == action


@pytest.mark.parametrize(
    ("file_modified", "being_deleted"),
    [(T0 - timedelta(seconds=1), True), (T0, True), (T0 + timedelta(seconds=1), False)],
)
def test_was_being_deleted_truth_table(file_modified, being_deleted):
    assert prune.was_being_deleted(file_modified, T0) is being_deleted


def pruner(store) -> prune.Pruner:
    return prune.Pruner(store, P, J, deadline=Deadline.after(30))


async def put_files(store: LocalStorage, rank: int, checkpoint: str, names, *, at: int) -> list[StoredFile]:
    """Store files of a checkpoint whose last-modified is `at` (set on the file: no waiting)."""
    files = []
    for name in names:
        key = layout.file_key(P, J, rank, f"{checkpoint}/{name}")
        etag = await store.put(key, b"x" * 100)
        os.utime(store.root / key, (at, at))
        files.append(StoredFile(f"{checkpoint}/{name}", 100, "0" * 64, key, etag))
    return files


async def put_record(store: LocalStorage, checkpoint: str, body: bytes, *, at: int) -> None:
    key = prune.record_key(P, J, 0, checkpoint)
    await store.put(key, body)
    os.utime(store.root / key, (at, at))


async def keys(store, prefix: str) -> list[str]:
    return sorted([info.key async for info in store.list(layout.job_prefix(P, J) + prefix)])


async def plan_and_run(store):
    """The survey, the dry run's view of the interrupted prunes, then what --yes does."""
    found = await prune.survey(store, P, J)
    planned = [
        (i.checkpoint, found.action(i, now), found.interrupted_bytes[i.rank, i.checkpoint])
        for i, now in found.interrupted
    ]
    decisions = retention.plan(found.checkpoints, retention.Rules(keep_last=1), stored_ranks=found.stored_ranks)
    freed = await prune.execute(pruner(store), found, decisions)
    return found, decisions, planned, freed


async def test_a_resaved_uncommitted_checkpoint_is_kept_and_its_old_record_dropped(tmp_path):
    store = LocalStorage(tmp_path / "store")
    files = await put_files(store, 0, "checkpoint-30", ["model.bin"], at=EARLIER)
    await write_manifest(store, build_manifest(P, J, 0, "checkpoint-30", files, "m", {}))
    # A prune recorded checkpoint-40 and withdrew its manifest, then died; the trainer saved it again.
    record = {"checkpoint": "checkpoint-40", "rank": 0, "committed_at": "2026-01-01T00:00:00+00:00"}
    await put_record(store, "checkpoint-40", prune.json_bytes(record), at=EARLIER)
    await put_files(store, 0, "checkpoint-40", ["model.bin", "optimizer.pt"], at=LATER)
    _, decisions, planned, freed = await plan_and_run(store)
    assert {d.name: d.reasons for d in decisions}["checkpoint-40"] == (retention.UNCOMMITTED,)
    assert planned == [("checkpoint-40", prune.FINISH, 0)]  # nothing of it would go: the plan says so
    assert [(f.checkpoint, f.files, f.bytes) for f in freed] == [("checkpoint-40", 0, 0)]
    assert len(await keys(store, "rank-0/checkpoint-40/")) == 2
    assert await keys(store, "pruning/") == []


async def test_finishing_deletes_only_the_files_stored_before_the_record(tmp_path):
    store = LocalStorage(tmp_path / "store")
    await put_files(store, 0, "checkpoint-40", ["old-shard.bin"], at=EARLIER)  # left by the stopped prune
    await put_record(store, "checkpoint-40", prune.json_bytes({"checkpoint": "checkpoint-40", "rank": 0}), at=EARLIER)
    await put_files(store, 0, "checkpoint-40", ["model.bin"], at=LATER)  # the re-save
    _, _, planned, freed = await plan_and_run(store)
    assert planned == [("checkpoint-40", prune.FINISH, 100)]
    assert [(f.files, f.bytes) for f in freed] == [(1, 100)]  # --yes frees what the plan counted
    assert await keys(store, "rank-0/checkpoint-40/") == [layout.file_key(P, J, 0, "checkpoint-40/model.bin")]


@pytest.mark.parametrize("body", [b"not json", b"", b"[1,2]", b'"x"'])
async def test_an_unreadable_record_deletes_nothing_and_goes(tmp_path, body):
    store = LocalStorage(tmp_path / "store")
    await put_files(store, 0, "checkpoint-40", ["model.bin"], at=EARLIER)
    await put_record(store, "checkpoint-40", body, at=LATER)
    _, _, planned, freed = await plan_and_run(store)
    assert planned == [("checkpoint-40", prune.DROP, 0)]
    assert freed == []
    assert len(await keys(store, "rank-0/checkpoint-40/")) == 1
    assert await keys(store, "pruning/") == []


async def test_a_checkpoint_committed_again_after_the_survey_is_not_pruned(tmp_path):
    store = LocalStorage(tmp_path / "store")
    for name in ("checkpoint-10", "checkpoint-20"):
        files = await put_files(store, 0, name, ["model.bin"], at=EARLIER)
        await write_manifest(store, build_manifest(P, J, 0, name, files, "m", {}))
    found = await prune.survey(store, P, J)
    decisions = retention.plan(found.checkpoints, retention.Rules(keep_last=1), stored_ranks=found.stored_ranks)
    assert [d.name for d in decisions if d.delete] == ["checkpoint-10"]
    old = browse.checkpoint_named(found.checkpoints, "checkpoint-10").manifests[0]["committed_at"]
    files = await put_files(store, 0, "checkpoint-10", ["model.bin"], at=LATER)  # committed again meanwhile
    manifest = build_manifest(P, J, 0, "checkpoint-10", files, "m", {}) | {"committed_at": "2099-01-01T00:00:00+00:00"}
    await store.put(layout.manifest_key(P, J, 0, "checkpoint-10"), prune.json_bytes(manifest))
    assert manifest["committed_at"] != old
    with capture_logs() as logged:
        freed = await prune.execute(pruner(store), found, decisions)
    assert freed == []
    assert [e["checkpoint"] for e in logged if e["event"].startswith("checkpoint not pruned")] == ["checkpoint-10"]
    assert await keys(store, "rank-0/checkpoint-10/") == [layout.file_key(P, J, 0, "checkpoint-10/model.bin")]
    assert await keys(store, "manifests/rank-0/checkpoint-10.json")
    assert await keys(store, "pruning/") == [] and await keys(store, "pruned/") == []
