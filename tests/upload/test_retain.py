"""Retention while training: the retain module in-process against real stores (its log lines and
counters read where they are made), and `ckptd run --prune --keep-last 2` end to end."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from daemons import (
    JOB,
    PREFIX,
    PROJECT,
    Daemon,
    base_env,
    manifests,
    s3_args,
    sha256,
    stored_objects,
    wait_for,
    watch_args,
)
from engines import config, counter, until
from structlog.testing import capture_logs

from daemon.catalog import browse, layout, prune
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.storage import Storage, StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline
from daemon.upload.commit import CheckpointTracker
from daemon.upload.retain import Retainer

KIND = "unit"

P, J = "proj", "job-1"
TRAINER = str(Path(__file__).resolve().parent.parent / "trainers" / "eval_trainer.py")
PRUNED, PRUNED_BYTES = "ckptd_pruned_checkpoints_total", "ckptd_pruned_bytes_total"


async def save(store: Storage, rank: int, step: int, loss: float | None = None, size: int = 500) -> int:
    checkpoint, files = f"checkpoint-{step}", []
    for name, data in (("model.bin", bytes([step % 256]) * size), ("trainer_state.json", b"{}")):
        key = layout.file_key(P, J, rank, f"{checkpoint}/{name}")
        etag = await store.put(key, data)
        files.append(StoredFile(f"{checkpoint}/{name}", len(data), hashlib.sha256(data).hexdigest(), key, etag))
    metrics = {} if loss is None else {"eval_loss": loss}
    await write_manifest(store, build_manifest(P, J, rank, checkpoint, files, "marker", metrics))
    return sum(f.size for f in files)


async def names(store: Storage, rank: int = 0) -> list[str]:
    return [c.name for c in await browse.checkpoints(store, P, J, ranks=[rank])]


async def folders(store: Storage, rank: int = 0) -> list[str]:
    return await store.list_dirs(layout.rank_prefix(P, J, rank))


def retainer(tmp_path, store: Storage, busy=(), **rules: str) -> Retainer:
    c = config(tmp_path, f"file://{tmp_path}/unused", prune_enabled="true", **rules)
    return Retainer(c, store, lambda: set(busy))


async def test_a_pass_deletes_this_ranks_checkpoints_logs_and_counts_each(tmp_path, store):
    sizes = {step: await save(store, 0, step) for step in (1, 2, 3, 4)}
    for step in (1, 2):
        await save(store, 1, step)  # another rank's: never this daemon's to delete
    r = retainer(tmp_path, store, keep_last="2")
    before, before_bytes = counter(PRUNED), counter(PRUNED_BYTES)
    r.committed("checkpoint-4")
    with capture_logs() as logs:
        freed = await r.apply(Deadline.after(10))
    assert sorted(f.checkpoint for f in freed) == ["checkpoint-1", "checkpoint-2"]
    assert await names(store) == await folders(store) == ["checkpoint-3", "checkpoint-4"]
    assert await names(store, 1) == await folders(store, 1) == ["checkpoint-1", "checkpoint-2"]
    assert counter(PRUNED) - before == 2
    assert counter(PRUNED_BYTES) - before_bytes == sizes[1] + sizes[2]
    lines = sorted(
        (e["checkpoint"], e["step"], e["bytes"], tuple(e["reasons"])) for e in logs if e["event"] == "checkpoint pruned"
    )
    assert lines == [
        ("checkpoint-1", 1, sizes[1], ("not among the last 2",)),
        ("checkpoint-2", 2, sizes[2], ("not among the last 2",)),
    ]


async def test_busy_and_just_committed_checkpoints_are_left_alone(tmp_path, store):
    for step in (1, 2, 3, 4):
        await save(store, 0, step)
    r = retainer(tmp_path, store, busy={"checkpoint-1"}, keep_last="1")
    r.committed("checkpoint-2")  # e.g. committed again after a file of it changed
    await r.apply(Deadline.after(10))
    assert await names(store) == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
    r.committed("checkpoint-4")  # the next commit: checkpoint-2 is not fresh any more
    await r.apply(Deadline.after(10))
    assert await names(store) == await folders(store) == ["checkpoint-1", "checkpoint-4"]


async def test_the_final_pass_spares_nothing_just_committed(tmp_path, store):
    for step in (1, 2, 3):
        await save(store, 0, step)
    r = retainer(tmp_path, store, keep_last="1")
    r.committed("checkpoint-3")
    r.committed("checkpoint-2")  # uploads finish out of order: 2 commits after 3
    await r.apply(Deadline.after(10))
    assert await names(store) == ["checkpoint-2", "checkpoint-3"]  # spared: just committed
    await r.final(Deadline.after(10))  # the drain: nothing commits after it
    assert await names(store) == await folders(store) == ["checkpoint-3"]


async def test_a_missing_metric_fails_the_pass_and_deletes_nothing_until_recorded(tmp_path, store):
    for step in (1, 2, 3):
        await save(store, 0, step)
    r = retainer(tmp_path, store, keep_best="1", metric="eval_loss")
    r.committed("checkpoint-3")
    with capture_logs() as logs:
        assert await r.apply(Deadline.after(10)) == []
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "retention pass failed; it runs again at the next commit"
    ]
    assert "'eval_loss'" in logs[-1]["error"]
    assert await names(store) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    await save(store, 0, 4, loss=0.2)
    r.committed("checkpoint-4")
    await r.apply(Deadline.after(10))  # 4 is best and latest; without the metric, 1..3 cannot be judged
    assert await names(store) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    await save(store, 0, 5, loss=0.5)
    r.committed("checkpoint-5")
    await r.apply(Deadline.after(10))  # 5 is the latest, 4 the best; 1..3 still cannot be judged
    assert await names(store) == await folders(store) == [f"checkpoint-{s}" for s in (1, 2, 3, 4, 5)]
    await save(store, 0, 6, loss=0.1)
    r.committed("checkpoint-6")
    await r.apply(Deadline.after(10))
    assert await names(store) == await folders(store) == [f"checkpoint-{s}" for s in (1, 2, 3, 6)]


class DenyingDeletes(LocalStorage):
    deny = True

    async def delete(self, key: str) -> None:
        if self.deny and "/rank-0/checkpoint-1/" in key:
            raise StorageError("delete", key, "AccessDenied", "denied", http_status=403, transient=False)
        await super().delete(key)


async def test_a_store_failure_is_logged_and_the_next_pass_finishes(tmp_path):
    store = DenyingDeletes(tmp_path / "store")
    for step in (1, 2, 3):
        await save(store, 0, step)
    r = retainer(tmp_path, store, keep_last="1")
    r.committed("checkpoint-3")
    with capture_logs() as logs:
        await r.apply(Deadline.after(10))
    assert any("rank-0/checkpoint-1/" in e.get("error", "") for e in logs if e["log_level"] == "error")
    assert "checkpoint-1" in await folders(store)  # its files stay until the next pass
    store.deny = False
    r.committed("checkpoint-3")
    await r.apply(Deadline.after(10))
    assert await names(store) == await folders(store) == ["checkpoint-3"]
    assert await store.list_dirs(layout.job_prefix(P, J)) == ["manifests", "pruned", "rank-0"]  # no record left
    assert [i.key async for i in store.list(layout.job_prefix(P, J) + "pruned/")] == [
        prune.tombstone_key(P, J, 0, f"checkpoint-{step}") for step in (1, 2)
    ]


async def test_the_loop_runs_a_pass_after_each_commit(tmp_path, store):
    for step in (1, 2):
        await save(store, 0, step)
    r = retainer(tmp_path, store, keep_last="1")
    task = asyncio.create_task(r.run())
    try:
        before = counter(PRUNED)
        r.committed("checkpoint-2")
        await until(lambda: counter(PRUNED) > before, 10, "a pass after the commit")
        await save(store, 0, 3)
        r.committed("checkpoint-3")
        await until(lambda: counter(PRUNED) > before + 1, 10, "a pass after the next commit")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await names(store) == ["checkpoint-3"]


def run_pruned(bucket, tmp_path: Path, job: str = "pruned") -> Daemon:
    """`ckptd run --prune --keep-last 2` of a trainer saving checkpoint-10..50; the exited daemon."""
    args = ["run", *s3_args(bucket), "--project", PROJECT, "--job-id", job, "--checkpoint-dir"]
    args += [str(tmp_path / "rank-0" / "ckpt"), "--settle-time", "0.05", "--metrics-addr", "127.0.0.1:0"]
    args += ["--prune", "--keep-last", "2", "--", sys.executable, TRAINER]
    env = {**base_env(), **bucket.server.env()}
    env |= {"TRAINER_STEPS": "10,20,30,40,50", "TRAINER_LOSSES": "0.5,0.4,0.3,0.2,0.1"}
    env |= {"TRAINER_RECORD": str(tmp_path / "record.json")}
    daemon = Daemon(args, env, tmp_path / "ckptd.log")
    try:
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()
    return daemon


def test_run_with_prune_keeps_the_two_latest(moto_bucket, tmp_path):
    daemon = run_pruned(moto_bucket, tmp_path)
    assert sorted(manifests(moto_bucket, "pruned")) == [".", "checkpoint-40", "checkpoint-50"]
    stored = {k.split("/")[0] for k in stored_objects(moto_bucket, "pruned") if "/" in k}
    assert stored == {"checkpoint-40", "checkpoint-50"}
    assert {k for k in stored_objects(moto_bucket, "pruned") if "/" not in k} == {
        "tokenizer.json",
        "tokenizer_config.json",
    }
    pruned = daemon.events("checkpoint pruned")
    assert sorted((e["checkpoint"], e["step"]) for e in pruned) == [
        ("checkpoint-10", 10),
        ("checkpoint-20", 20),
        ("checkpoint-30", 30),
    ]
    assert all(e["bytes"] > 40_000 and e["reasons"] == ["not among the last 2"] for e in pruned)
    listing = moto_bucket.client.list_objects_v2(Bucket=moto_bucket.name, Prefix=f"{PREFIX}/")
    assert not [o["Key"] for o in listing.get("Contents", []) if "/pruning/" in o["Key"]]


def test_a_restarted_watch_never_commits_a_pruned_checkpoint_again(moto_bucket, tmp_path):
    """The journal in .ckptd says checkpoint-10..30 are stored and their folders still hold them;
    the store's tombstones say they were pruned: the restart forgets them, uploads nothing."""
    run_pruned(moto_bucket, tmp_path)
    before = stored_objects(moto_bucket, "pruned")
    exit_file = tmp_path / "done"
    exit_file.touch()
    args = [*watch_args(moto_bucket, tmp_path / "rank-0" / "ckpt", exit_file)]
    args[args.index(JOB)] = "pruned"
    daemon = Daemon(args, {**base_env(), **moto_bucket.server.env()}, tmp_path / "watch.log")
    try:
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()
    assert sorted(manifests(moto_bucket, "pruned")) == [".", "checkpoint-40", "checkpoint-50"]
    assert stored_objects(moto_bucket, "pruned") == before  # nothing uploaded again
    forgotten = daemon.events("pruned checkpoint not committed again")
    assert sorted(e["checkpoint"] for e in forgotten) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert not daemon.events("checkpoint committed")
    drained = daemon.events("drained")[-1]
    assert (drained["uncommitted"], drained["not_stored"]) == ([], [])


# --- this run's own prunes: the tracker hears of them ---------------------------------------------


def tracked(relpath: str, data: bytes) -> StoredFile:
    key = layout.file_key(P, J, 0, relpath)
    return StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, hashlib.md5(data).hexdigest())


MODEL, STATE = tracked("checkpoint-1/model.bin", b"weights"), tracked("checkpoint-1/trainer_state.json", b"{}")


@pytest.mark.parametrize(
    ("when_pruned", "after", "due", "uncommitted"),
    [
        ("committed", "nothing", [], []),  # forgotten: no store check, not reported
        ("committed", "the same version noticed again", [], []),
        ("committed", "a file stored anew", [("checkpoint-1", "marker")], ["checkpoint-1"]),
        ("changed since", "nothing", [("checkpoint-1", "marker")], ["checkpoint-1"]),
        ("changed since", "a file still pending", [], ["checkpoint-1"]),
    ],
)
def test_a_checkpoint_pruned_by_this_run_is_checked_before_any_new_commit(when_pruned, after, due, uncommitted):
    """CheckpointTracker.pruned's table: whatever comes due is unproven, so the publisher checks
    the store (reconcile.decide) before a manifest lists the pruned objects again."""
    tracker = CheckpointTracker(("trainer_state.json",), quiet_limit=60)
    for f in (MODEL, STATE):
        tracker.stored(f, 0.0)
    assert tracker.due(1.0) == [("checkpoint-1", "marker")]
    assert tracker.committed("checkpoint-1", 1.0)
    if when_pruned == "changed since":
        tracker.stored(tracked("checkpoint-1/model.bin", b"new weights"), 2.0)
    tracker.pruned("checkpoint-1")
    if after == "the same version noticed again":
        tracker.noticed(MODEL.relpath, 3.0)
        tracker.stored(MODEL, 3.0)
    elif after == "a file stored anew":
        tracker.noticed(MODEL.relpath, 3.0)
        tracker.stored(tracked("checkpoint-1/model.bin", b"rewritten"), 3.0)
    elif after == "a file still pending":
        tracker.noticed(MODEL.relpath, 3.0)
    assert tracker.due(4.0, final=True) == due
    assert tracker.uncommitted() == uncommitted
    assert tracker.is_unproven("checkpoint-1") and not tracker.is_committed("checkpoint-1")
    assert tracker.listed(STATE.relpath)  # an overwrite still withdraws the manifest first


class GatedDeletes(LocalStorage):
    """A real local store whose deletes wait at a gate, so a test can look meanwhile."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def delete(self, key: str) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().delete(key)


async def test_each_prune_holds_the_commit_lock_and_the_tracker_hears_of_it(tmp_path):
    store = GatedDeletes(tmp_path / "store")
    for step in (1, 2, 3):
        await save(store, 0, step)
    lock, gone = asyncio.Lock(), []
    c = config(tmp_path, f"file://{tmp_path}/unused", prune_enabled="true", keep_last="1")
    r = Retainer(c, store, lambda: set(), lock=lock, gone=gone.append)
    r.committed("checkpoint-3")
    task = asyncio.create_task(r.apply(Deadline.after(10)))
    await asyncio.wait_for(store.entered.wait(), 10)
    assert lock.locked() and gone == []  # deleting: no manifest may be written meanwhile
    store.gate.set()
    assert sorted(f.checkpoint for f in await task) == ["checkpoint-1", "checkpoint-2"]
    assert gone == ["checkpoint-1", "checkpoint-2"] and not lock.locked()


async def test_a_failed_prune_is_told_too_a_prune_committed_again_since_is_not(tmp_path):
    store = DenyingDeletes(tmp_path / "store")
    for step in (1, 2, 3):
        await save(store, 0, step)
    gone: list[str] = []
    c = config(tmp_path, f"file://{tmp_path}/unused", prune_enabled="true", keep_last="1")
    r = Retainer(c, store, lambda: set(), gone=gone.append)
    r.committed("checkpoint-3")
    await r.apply(Deadline.after(10))
    assert gone == ["checkpoint-1"]  # its manifest went, its files did not: stopped midway
    # Committed again since the interrupted prune: the next pass drops only the record.
    await save(store, 0, 1)
    store.deny, gone[:] = False, []
    c = config(tmp_path, f"file://{tmp_path}/unused", prune_enabled="true", keep_last="3")
    r = Retainer(c, store, lambda: set(), gone=gone.append)
    r.committed("checkpoint-3")
    with capture_logs() as logs:
        assert await r.apply(Deadline.after(10)) == []
    assert gone == []
    assert [e["event"] for e in logs] == ["interrupted prune not finished: the checkpoint was committed again since"]
    assert await names(store) == await folders(store) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


REWRITER = """
import json, os, sys, time
from pathlib import Path

root, steps = Path(os.environ["BT_CHECKPOINT_DIR"]), Path(os.environ["TRAINER_STEPS_DIR"])

def wait(name):  # the test says when to go on
    deadline = time.monotonic() + 60
    while not (steps / name).exists():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {name}")
        time.sleep(0.02)

def save(step):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(50_000))
    (folder / "optimizer.pt").write_bytes(os.urandom(2048))
    state = {"global_step": step, "log_history": [{"step": step, "eval_loss": 1 / step}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))  # the marker, last

save(10)
wait("saved-10")
save(20)
save(30)
wait("pruned-10")
(root / "checkpoint-10" / "optimizer.pt").write_bytes(b"rewritten after the prune " * 100)
wait("finish")
"""


def commits(daemon: Daemon, checkpoint: str) -> int:
    return sum(e["checkpoint"] == checkpoint for e in daemon.events("checkpoint committed"))


def restored(bucket, job: str, checkpoint: str, out: Path) -> dict[str, str]:
    """`ckptd restore` of one checkpoint, as the next job runs it; relpath -> sha256 of what landed."""
    command = [sys.executable, "-m", "daemon", "restore", *s3_args(bucket), "--project", PROJECT, "--job-id", "next"]
    command += ["--restore-dir", str(out), "--load", f"job={job},checkpoint={checkpoint},required"]
    env = {**base_env(), **bucket.server.env()}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rank = out / "rank-0"
    return {p.relative_to(rank).as_posix(): sha256(p.read_bytes()) for p in rank.rglob("*") if p.is_file()}


def test_a_file_rewritten_after_this_runs_prune_never_commits_a_torn_manifest(s3_bucket, tmp_path):
    """`ckptd run --prune --keep-last 2`: checkpoint-10 is pruned, then the trainer rewrites one file
    of it. The store is checked first: the objects the prune deleted are uploaded again, so the
    manifest written lists only objects that exist, and a restore of it works; the drain's
    pass prunes it again (not among the last 2), leaving nothing of it behind."""
    job, ckpt, steps = "rewritten", tmp_path / "ckpt", tmp_path / "steps"
    steps.mkdir()
    trainer = tmp_path / "trainer.py"
    trainer.write_text(REWRITER)
    args = ["run", *s3_args(s3_bucket), "--project", PROJECT, "--job-id", job, "--checkpoint-dir", str(ckpt)]
    args += ["--settle-time", "0.05", "--metrics-addr", "127.0.0.1:0", "--prune", "--keep-last", "2"]
    env = {**base_env(), **s3_bucket.server.env(), "TRAINER_STEPS_DIR": str(steps)}
    daemon = Daemon([*args, "--", sys.executable, str(trainer)], env, tmp_path / "ckptd.log")
    try:
        daemon.wait_event("checkpoint committed", 60, lambda e: e["checkpoint"] == "checkpoint-10")
        (steps / "saved-10").touch()
        daemon.wait_event("checkpoint pruned", 60, lambda e: e["checkpoint"] == "checkpoint-10")
        (steps / "pruned-10").touch()
        wait_for(lambda: commits(daemon, "checkpoint-10") == 2, 60, "checkpoint-10 committed again")
        # Committed again, spared by the pass after its commit: what it lists exists, and restores.
        manifest = manifests(s3_bucket, job)["checkpoint-10"]
        listed = {f["path"]: f["sha256"] for f in manifest["files"]}
        here = {p.relative_to(ckpt).as_posix(): sha256(p.read_bytes()) for p in (ckpt / "checkpoint-10").iterdir()}
        assert listed == here
        for f in manifest["files"]:
            head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=f"{PREFIX}/{f['key']}")
            assert head["ContentLength"] == f["size"], f["key"]
        assert restored(s3_bucket, job, "checkpoint-10", tmp_path / "restored") == here
        (steps / "finish").touch()
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()

    lost = daemon.events("the store lost stored files of a checkpoint: uploading them again")
    assert [(e["checkpoint"], sorted(k.rsplit("/", 1)[1] for k in e["keys"])) for e in lost] == [
        ("checkpoint-10", ["model.safetensors", "trainer_state.json"])
    ]
    assert sorted(e["checkpoint"] for e in daemon.events("checkpoint pruned")) == ["checkpoint-10"] * 2
    assert sorted(manifests(s3_bucket, job)) == ["checkpoint-20", "checkpoint-30"]
    assert {k.split("/")[0] for k in stored_objects(s3_bucket, job)} == {"checkpoint-20", "checkpoint-30"}
    drained = daemon.events("drained")[-1]
    assert (drained["uncommitted"], drained["not_stored"]) == ([], [])
