"""Retention while training: the retain module in-process against real stores (its log lines and
counters read where they are made), and `ckptd run --prune --keep-last 2` end to end."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import pytest
from daemons import JOB, PREFIX, PROJECT, Daemon, base_env, manifests, s3_args, stored_objects, watch_args
from engines import config, counter, until
from structlog.testing import capture_logs

from daemon.catalog import browse, layout, prune
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.storage import Storage, StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline
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
    await r.apply(Deadline.after(10))  # 4 is best and latest; without the metric, 1..3 cannot be ranked
    assert await names(store) == ["checkpoint-4"]


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
