"""Files the store lost (not pruned) are uploaded again while the daemon runs, and their checkpoint
commits in this run: nothing lost, no manifest listing a missing object.

Where a running daemon finds out: the store is checked before a checkpoint commits when this run
did not see all of its files stored (recovered from the journal, found by a scan, or pruned by
this run's retention: see test_retain). A checkpoint committed in this run and changed later is
not checked again (its objects were seen stored), so an object deleted by hand under a committed
checkpoint is not found there; the path tested as users run it is the first one: `ckptd watch`
restarted on a save the earlier run stored but could not commit (its marker not written yet), an
object of it deleted by hand after the start-up check, then the marker written.

The publisher's side in-process (the hook, its bound), then that path end to end on every backend.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from daemons import PREFIX, PROJECT, Daemon, base_env, manifests, s3_args, stored_objects, watch_args
from engines import config, stored_here
from structlog.testing import capture_logs

from daemon.catalog import layout
from daemon.catalog.manifest import StoredFile
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline
from daemon.upload.commit import CheckpointTracker
from daemon.upload.health import StoreHealth
from daemon.upload.publish import REUPLOADS, Publisher

KIND = "unit"  # the subprocess cases reach S3 servers: integration (conftest marks them)

P, J = "proj", "job-1"
LOST = "the store lost stored files of a checkpoint: uploading them again"
HELD = "checkpoint not committed: the store lost files of it"


# --- the publisher's hook, in-process against a real (local) store ---------------------------------


async def lost_checkpoint(tmp_path: Path) -> tuple[LocalStorage, CheckpointTracker, Publisher, StoredFile]:
    """A recovered checkpoint whose model object the store lost; the publisher's hook records calls."""
    store = LocalStorage(tmp_path / "store")
    tracker = CheckpointTracker(("trainer_state.json",), 60)
    model = await stored_here(tmp_path, store, tracker, "checkpoint-1/model.bin", b"weights")
    await stored_here(tmp_path, store, tracker, "checkpoint-1/trainer_state.json", b"{}")
    tracker.unproven("checkpoint-1")
    await store.delete(model.key)
    publisher = Publisher(
        config(tmp_path, f"file://{tmp_path}/unused"), store, tracker, Deadline.after(10), StoreHealth()
    )
    return store, tracker, publisher, model


async def test_lost_files_go_back_to_intake_and_the_checkpoint_commits_once_they_are_stored(tmp_path):
    store, tracker, publisher, model = await lost_checkpoint(tmp_path)
    handed: list[list[StoredFile]] = []

    async def again(lost: list[StoredFile]) -> None:  # what Intake.again leads to: noticed, then stored anew
        handed.append(lost)
        for f in lost:
            tracker.noticed(f.relpath, time.monotonic())

    publisher.on_lost = again
    with capture_logs() as logs:
        await publisher.commit_due(final=True)
    assert handed == [[model]]
    assert [(e["event"], e["checkpoint"], e["keys"], e["attempt"]) for e in logs] == [
        (LOST, "checkpoint-1", [model.key], 1)
    ]
    assert tracker.due(time.monotonic(), final=True) == []  # pending: waits for the upload
    assert tracker.uncommitted() == ["checkpoint-1"]
    etag = await store.put(model.key, b"weights")  # the upload again
    tracker.stored(StoredFile(model.relpath, model.size, model.sha256, model.key, etag), time.monotonic())
    with capture_logs() as logs:
        await publisher.commit_due(final=True)
    assert [e["event"] for e in logs] == ["checkpoint committed"]  # checked again: all there
    assert tracker.is_committed("checkpoint-1") and await store.head(layout.manifest_key(P, J, 0, "checkpoint-1"))


async def test_a_store_that_keeps_losing_them_is_held_after_the_bound(tmp_path):
    store, tracker, publisher, model = await lost_checkpoint(tmp_path)
    handed: list[list[StoredFile]] = []

    async def again(lost: list[StoredFile]) -> None:  # uploaded "again", and lost again at once
        handed.append(lost)

    publisher.on_lost = again
    with capture_logs() as logs:
        for _ in range(REUPLOADS + 2):
            await publisher.commit_due(final=True)
    assert handed == [[model]] * REUPLOADS
    assert [e["event"] for e in logs] == [LOST] * REUPLOADS + [HELD]  # then held: not checked again
    assert [e["attempt"] for e in logs[:-1]] == list(range(1, REUPLOADS + 1))
    assert tracker.uncommitted() == ["checkpoint-1"]  # the drain reports it; the next start uploads it
    assert await store.head(layout.manifest_key(P, J, 0, "checkpoint-1")) is None


async def test_without_the_hook_it_is_held_as_before(tmp_path):
    _, tracker, publisher, model = await lost_checkpoint(tmp_path)
    with capture_logs() as logs:
        await publisher.commit_due(final=True)
    assert [(e["event"], e["missing"]) for e in logs] == [(HELD, [model.key])]
    assert tracker.uncommitted() == ["checkpoint-1"]


async def test_a_lost_root_file_is_handed_back_too(tmp_path):
    """'.' (files at the top of the folder) is never pruned and has no tombstone to read."""
    store = LocalStorage(tmp_path / "store")
    tracker = CheckpointTracker(("trainer_state.json",), 0)
    tokenizer = await stored_here(tmp_path, store, tracker, "tokenizer.json", b'{"model": "bpe"}')
    tracker.unproven(".")
    await store.delete(tokenizer.key)
    publisher = Publisher(
        config(tmp_path, f"file://{tmp_path}/unused"), store, tracker, Deadline.after(10), StoreHealth()
    )
    handed: list[list[StoredFile]] = []

    async def again(lost: list[StoredFile]) -> None:
        handed.append(lost)

    publisher.on_lost = again
    await publisher.commit_due(final=True)
    assert handed == [[tokenizer]]


# --- `ckptd watch` as users run it ----------------------------------------------------------------


def save(ckpt: Path, checkpoint: str, names: tuple[str, ...]) -> None:
    folder = ckpt / checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(os.urandom(3000) if name.endswith(".bin") else b'{"global_step": 10}')


def local(ckpt: Path, checkpoint: str) -> dict[str, str]:
    return {
        p.relative_to(ckpt).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (ckpt / checkpoint).rglob("*")
        if p.is_file()
    }


def watch(bucket, ckpt: Path, exit_file: Path, log: Path, job: str) -> Daemon:
    args = watch_args(bucket, ckpt, exit_file)
    args[args.index("--job-id") + 1] = job
    return Daemon(args, {**base_env(), **bucket.server.env()}, log)


def restore(bucket, job: str, checkpoint: str, out: Path) -> dict[str, str]:
    """`ckptd restore` of one checkpoint, as the next job runs it; relpath -> sha256 of what landed."""
    command = [sys.executable, "-m", "daemon", "restore", *s3_args(bucket), "--project", PROJECT, "--job-id", "next"]
    command += ["--restore-dir", str(out), "--load", f"job={job},checkpoint={checkpoint},required"]
    done = subprocess.run(
        command, env={**base_env(), **bucket.server.env()}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rank = out / "rank-0"
    return {
        p.relative_to(rank).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in rank.rglob("*")
        if p.is_file()
    }


def every_listed_object_exists(bucket, job: str) -> None:
    for manifest in manifests(bucket, job).values():
        for f in manifest["files"]:
            head = bucket.client.head_object(Bucket=bucket.name, Key=f"{PREFIX}/{f['key']}")
            assert head["ContentLength"] == f["size"], f["key"]


def test_a_running_watch_uploads_an_object_lost_after_its_start_again_and_commits(s3_bucket, tmp_path):
    job, ckpt = "lost-running", tmp_path / "ckpt"
    # An earlier run stored a Hugging Face style save whose marker was not written yet.
    save(ckpt, "checkpoint-10", ("training_args.bin", "model.bin", "optimizer.bin"))
    (tmp_path / "first-done").touch()
    first = watch(s3_bucket, ckpt, tmp_path / "first-done", tmp_path / "first.log", job)
    try:
        assert first.wait(120) == 0, first.tail()
    finally:
        first.kill()
    assert first.events("drained")[-1]["uncommitted"] == ["checkpoint-10"]
    assert manifests(s3_bucket, job) == {}

    daemon = watch(s3_bucket, ckpt, tmp_path / "done", tmp_path / "watch.log", job)
    try:
        daemon.wait_event("watching")  # recovered, checked at start: everything is there
        key = f"training_projects/{PROJECT}/jobs/{job}/rank-0/checkpoint-10/model.bin"
        s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=f"{PREFIX}/{key}")  # by hand, while it runs
        save(ckpt, "checkpoint-10", ("trainer_state.json",))  # the marker: the save is complete
        daemon.wait_event("checkpoint committed", 60)
        (tmp_path / "done").touch()
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()

    assert [(e["checkpoint"], e["keys"]) for e in daemon.events(LOST)] == [("checkpoint-10", [key])]
    assert not daemon.events(HELD)
    assert sorted(e["path"] for e in daemon.events("uploaded")) == [
        "checkpoint-10/model.bin",
        "checkpoint-10/trainer_state.json",
    ]
    assert daemon.events("drained")[-1]["uncommitted"] == []
    listed = {f["path"]: f["sha256"] for f in manifests(s3_bucket, job)["checkpoint-10"]["files"]}
    assert listed == local(ckpt, "checkpoint-10")  # nothing lost
    every_listed_object_exists(s3_bucket, job)
    assert set(stored_objects(s3_bucket, job)) == set(listed)
    assert restore(s3_bucket, job, "checkpoint-10", tmp_path / "restored") == listed
