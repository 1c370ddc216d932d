"""A daemon restarted on a checkpoint folder whose journal outlived what the store holds: it never
writes a manifest listing an object it has not seen stored in this run. Pruned checkpoints (a
tombstone lists these very files) are forgotten; lost files are uploaded again, then committed.

The rule (`reconcile.decide`) as a table; the tombstone reader against hostile bytes; the HEAD
check and the publisher's gate in-process against real stores; and `ckptd run`, `ckptd prune`,
a hand-deleted object and `ckptd watch` on the same folder as users run them."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
from daemons import PREFIX, PROJECT, Daemon, base_env, manifests, s3_args, stored_objects, watch_args
from engines import config, stored_here
from structlog.testing import capture_logs

from daemon.catalog import layout, prune
from daemon.catalog.manifest import StoredFile
from daemon.storage import StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline
from daemon.upload import records
from daemon.upload.commit import CheckpointTracker
from daemon.upload.health import StoreHealth
from daemon.upload.publish import Publisher
from daemon.upload.reconcile import Outcome, absent, decide, parse_tombstone, read_tombstone, same_files

KIND = "unit"  # the store and subprocess cases are integration tests (conftest marks them)

P, J = "proj", "job-1"
TRAINER = str(Path(__file__).resolve().parent.parent / "trainers" / "eval_trainer.py")


# --- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("all_present", "pruned", "outcome"),
    [
        (True, False, Outcome.COMMIT),
        (True, True, Outcome.COMMIT),
        (False, True, Outcome.FORGET),
        (False, False, Outcome.REUPLOAD),
    ],
)
def test_decide(all_present, pruned, outcome):
    assert decide(all_present=all_present, pruned=pruned) is outcome


def file(relpath: str, data: bytes, etag: str = "e") -> StoredFile:
    return StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), layout.file_key(P, J, 0, relpath), etag)


A, B = file("checkpoint-1/a", b"a"), file("checkpoint-1/b", b"bb")


@pytest.mark.parametrize(
    ("tombstone", "files", "same"),
    [
        (None, [A, B], False),  # no tombstone: no evidence
        ({A.key: (1, A.sha256), B.key: (2, B.sha256)}, [A, B], True),
        ({A.key: (1, A.sha256), B.key: (2, B.sha256)}, [B, A], True),  # order does not matter
        ({A.key: (1, A.sha256), B.key: (2, B.sha256)}, [A, file("checkpoint-1/b", b"xy")], False),  # other bytes
        ({A.key: (1, A.sha256), B.key: (2, B.sha256)}, [A, file("checkpoint-1/b", b"bbb")], False),  # other size
        ({A.key: (1, A.sha256)}, [A, B], False),  # a file added since
        ({A.key: (1, A.sha256), B.key: (2, B.sha256)}, [A], False),  # a file fewer
        ({}, [], True),
    ],
)
def test_same_files(tombstone, files, same):
    assert same_files(tombstone, files) is same


GOOD = {"checkpoint": "checkpoint-1", "rank": 0, "files": [{"key": A.key, "size": 1, "sha256": A.sha256}]}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "Expecting property name"),
        (b"\xc3\x28{}", "decode"),
        (b"[1]", "not an object with a files list"),
        (json.dumps({**GOOD, "files": {}}).encode(), "not an object with a files list"),
        (json.dumps({**GOOD, "rank": 1}).encode(), "of another rank or checkpoint"),
        (json.dumps({**GOOD, "checkpoint": "checkpoint-10"}).encode(), "of another rank or checkpoint"),
        (json.dumps({**GOOD, "files": [1]}).encode(), "files[0] is not an object"),
        (json.dumps({**GOOD, "files": [{"size": 1, "sha256": A.sha256}]}).encode(), "files[0].key"),
        (json.dumps({**GOOD, "files": GOOD["files"] * 2}).encode(), "files[1].key"),
        (json.dumps({**GOOD, "files": [{**GOOD["files"][0], "size": 1 << 60}]}).encode(), "plausible size"),
        (json.dumps({**GOOD, "files": [{**GOOD["files"][0], "size": -1}]}).encode(), "plausible size"),
        (json.dumps({**GOOD, "files": [{**GOOD["files"][0], "size": True}]}).encode(), "plausible size"),
        (json.dumps({**GOOD, "files": [{**GOOD["files"][0], "sha256": "AB" * 32}]}).encode(), "64 hex"),
        (b"[" * 100_000 + b"]" * 100_000, "recursion"),
    ],
)
def test_a_damaged_tombstone_is_refused_saying_why(body, error):
    with pytest.raises((ValueError, RecursionError), match="(?i)" + re.escape(error)):
        parse_tombstone(body, 0, "checkpoint-1")


def test_a_good_tombstone_parses():
    assert parse_tombstone(json.dumps(GOOD).encode(), 0, "checkpoint-1") == {A.key: (1, A.sha256)}


async def test_read_tombstone_missing_damaged_and_failing(tmp_path):
    store = LocalStorage(tmp_path / "store")
    assert await read_tombstone(store, P, J, 0, "checkpoint-1") is None
    key = prune.tombstone_key(P, J, 0, "checkpoint-1")
    for damaged in (b"", b"{garbage", json.dumps({**GOOD, "rank": 3}).encode()):
        await store.put(key, damaged)
        with capture_logs() as logs:
            assert await read_tombstone(store, P, J, 0, "checkpoint-1") is None
        assert [(e["event"], e["key"]) for e in logs] == [("damaged tombstone: no evidence of a prune", key)]
    await store.put(key, json.dumps(GOOD).encode())
    assert await read_tombstone(store, P, J, 0, "checkpoint-1") == {A.key: (1, A.sha256)}

    class Failing(LocalStorage):
        async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
            raise StorageError("get", key, "AccessDenied", "denied", http_status=403)

    with pytest.raises(StorageError, match="AccessDenied"):  # a failing store is not "never pruned"
        await read_tombstone(Failing(tmp_path / "store"), P, J, 0, "checkpoint-1")


def test_the_journal_replays_unstored():
    identity = {"dev": 1, "ino": 2, "size": 1, "mtime_ns": 3}
    lines = [
        {
            "op": "stored",
            "relpath": "checkpoint-1/a",
            "identity": identity,
            "sha256": A.sha256,
            "key": A.key,
            "etag": "",
        },
        {
            "op": "stored",
            "relpath": "checkpoint-1/b",
            "identity": identity,
            "sha256": B.sha256,
            "key": B.key,
            "etag": "",
        },
        {"op": "unstored", "relpath": "checkpoint-1/a"},
        {"op": "unstored", "relpath": "checkpoint-9/never-stored"},
    ]
    state = records.replay(io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines)))
    assert list(state.stored) == ["checkpoint-1/b"]
    with pytest.raises(ValueError, match=r"unstored\.relpath"):
        records.parse({"op": "unstored", "relpath": "../escape"})


def test_a_held_checkpoint_waits_for_new_content_and_a_pruned_one_is_not_reported():
    tracker = CheckpointTracker(("trainer_state.json",), quiet_limit=0)
    marker = file("checkpoint-1/trainer_state.json", b"{}")
    for f in (A, marker):
        tracker.stored(f, 0.0)
    assert tracker.due(1.0) == [("checkpoint-1", "marker")]
    tracker.held("checkpoint-1", pruned=True)
    assert (tracker.due(1.0, final=True), tracker.uncommitted()) == ([], [])
    tracker.stored(A, 2.0)  # the same file reported again (a scan): still forgotten
    assert tracker.due(3.0, final=True) == []
    tracker.held("checkpoint-1", pruned=False)
    assert (tracker.due(3.0, final=True), tracker.uncommitted()) == ([], ["checkpoint-1"])
    tracker.stored(file("checkpoint-1/a", b"new bytes"), 4.0)  # new content: due again
    assert tracker.due(5.0) == [("checkpoint-1", "marker")]


# --- the HEAD check and the publisher's gate, in-process, on every backend ------------------------


async def test_absent_heads_every_key_and_compares_size_and_etag(store):
    files = []
    for name, data in (("same", b"same"), ("resized", b"12345"), ("retagged", b"x"), ("gone", b"g")):
        key = layout.file_key(P, J, 0, f"checkpoint-1/{name}")
        etag = await store.put(key, data)
        files.append(StoredFile(f"checkpoint-1/{name}", len(data), hashlib.sha256(data).hexdigest(), key, etag))
    await store.put(files[1].key, b"123")  # other size
    await store.put(files[2].key, b"y")  # same size, other bytes: another etag
    await store.delete(files[3].key)
    no_etag = StoredFile(files[0].relpath, 4, files[0].sha256, files[0].key, "")  # journals may lack one
    got = await absent(store, [*files, no_etag], deadline=Deadline.after(10))
    assert [f.relpath for f in got] == ["checkpoint-1/resized", "checkpoint-1/retagged", "checkpoint-1/gone"]


class CountingHeads(LocalStorage):
    def __init__(self, root) -> None:
        super().__init__(root)
        self.now = self.peak = 0

    async def head(self, key: str):
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            # One yield: every call the bound admits is counted before any of them ends; no timing.
            await asyncio.sleep(0)
            return await super().head(key)
        finally:
            self.now -= 1


async def test_absent_is_bounded_and_names_the_key_that_failed(tmp_path):
    store = CountingHeads(tmp_path / "store")
    files = [file(f"checkpoint-1/shard-{i}", b"x") for i in range(40)]
    assert len(await absent(store, files, deadline=Deadline.after(10), concurrency=4)) == 40
    assert store.peak == 4

    class Denying(LocalStorage):
        async def head(self, key: str):
            raise StorageError("head", key, "AccessDenied", "denied", http_status=403)

    with pytest.raises(StorageError, match=r"head '.*/checkpoint-1/shard-0'.*AccessDenied"):
        await absent(Denying(tmp_path / "store"), files[:1], deadline=Deadline.after(10))


@pytest.mark.parametrize("case", ["present", "pruned", "lost", "changed since the prune"])
async def test_the_publisher_checks_the_store_before_committing_a_recovered_checkpoint(tmp_path, store, case):
    tracker = CheckpointTracker(("trainer_state.json",), 60)
    model = await stored_here(tmp_path, store, tracker, "checkpoint-1/model.bin", b"weights")
    state = await stored_here(tmp_path, store, tracker, "checkpoint-1/trainer_state.json", b"{}")
    tracker.unproven("checkpoint-1")  # recovered from the journal
    files = [model, state]
    if case != "present":
        await store.delete(model.key)
    if case in ("pruned", "changed since the prune"):
        bury = {"checkpoint": "checkpoint-1", "rank": 0, "committed_at": "x", "pruned_at": "y"}
        if case == "changed since the prune":
            files = [file("checkpoint-1/model.bin", b"other"), state]
        bury["files"] = [{"path": f.relpath, "key": f.key, "size": f.size, "sha256": f.sha256} for f in files]
        await store.put(prune.tombstone_key(P, J, 0, "checkpoint-1"), json.dumps(bury).encode())
    c = config(tmp_path, f"file://{tmp_path}/unused")
    publisher = Publisher(c, store, tracker, Deadline.after(10), StoreHealth())
    with capture_logs() as logs:
        await publisher.commit_due(final=True)
    written = await store.head(layout.manifest_key(P, J, 0, "checkpoint-1"))
    events = [e["event"] for e in logs]
    if case == "present":
        assert written is not None and tracker.is_committed("checkpoint-1")
        assert "checkpoint committed" in events
        return
    assert written is None and not tracker.is_committed("checkpoint-1")
    if case == "pruned":
        assert events == ["pruned checkpoint not committed again"]
        assert tracker.uncommitted() == []  # forgotten: no drain failure, nothing reported
    else:
        assert events == ["checkpoint not committed: the store lost files of it"]
        assert logs[0]["missing"] == [model.key]
        assert tracker.uncommitted() == ["checkpoint-1"]
    with capture_logs() as again:  # held: not checked, nor logged, again
        await publisher.commit_due(final=True)
    assert again == []


# --- as users run it ----------------------------------------------------------------------------


def run_job(bucket, where: Path, job: str, steps: str, *extra: str) -> Daemon:
    """`ckptd run` of a trainer saving checkpoint-N for each step; the exited daemon."""
    args = ["run", *s3_args(bucket), "--project", PROJECT, "--job-id", job, "--checkpoint-dir", str(where / "ckpt")]
    args += ["--settle-time", "0.05", "--metrics-addr", "127.0.0.1:0", *extra, "--", sys.executable, TRAINER]
    env = {**base_env(), **bucket.server.env(), "TRAINER_STEPS": steps, "TRAINER_RECORD": str(where / "record.json")}
    env["TRAINER_LOSSES"] = ",".join("0.5" for _ in steps.split(","))
    daemon = Daemon(args, env, where / "run.log")
    try:
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()
    return daemon


def watch_again(bucket, where: Path, job: str) -> Daemon:
    """`ckptd watch` restarted on the same folder (its journal in .ckptd), told at once that the
    writer is done: it drains; the exited daemon."""
    (where / "done").touch()
    args = watch_args(bucket, where / "ckpt", where / "done")
    args[args.index("--job-id") + 1] = job
    daemon = Daemon(args, {**base_env(), **bucket.server.env()}, where / "watch.log")
    try:
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()
    return daemon


def cli(bucket, *args: str):
    import subprocess

    command = [sys.executable, "-m", "daemon", args[0], *s3_args(bucket), "--project", PROJECT, *args[1:]]
    env = {**base_env(), **bucket.server.env()}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def leave_a_pin(ckpt: Path, relpath: str) -> None:
    """What a run may leave behind: a staging link of a file it stored, journaled as pinned."""
    journal = ckpt / ".ckptd" / "journal-rank-0.jsonl"
    stored = [json.loads(line) for line in journal.read_text().splitlines()]
    identity = next(r["identity"] for r in stored if r["op"] == "stored" and r["relpath"] == relpath)
    stage = f"{identity['ino']}-{identity['mtime_ns']}-{identity['size']}"
    (ckpt / ".ckptd" / "staging-rank-0").mkdir(exist_ok=True)
    (ckpt / ".ckptd" / "staging-rank-0" / stage).hardlink_to(ckpt / relpath)
    record = {"op": "pinned", "relpath": relpath, "identity": identity, "stage": stage}
    with journal.open("a") as f:
        f.write(json.dumps(record) + "\n")


def every_listed_object_exists(bucket, job: str) -> None:
    """No manifest is torn: each object it lists is stored with the listed size."""
    client = bucket.client
    for manifest in manifests(bucket, job).values():
        for f in manifest["files"]:
            head = client.head_object(Bucket=bucket.name, Key=f"{PREFIX}/{f['key']}")
            assert head["ContentLength"] == f["size"], f["key"]


def test_a_cli_prune_then_a_restart_commits_nothing_pruned_and_uploads_nothing(s3_bucket, tmp_path):
    run_job(s3_bucket, tmp_path, "cli-pruned", "10,20,30,40")
    out = cli(s3_bucket, "prune", "--job", "cli-pruned", "--keep-last", "1", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(d["checkpoint"] for d in json.loads(out.stdout)["deleted"]) == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]
    leave_a_pin(tmp_path / "ckpt", "checkpoint-30/trainer_state.json")
    before = stored_objects(s3_bucket, "cli-pruned")
    daemon = watch_again(s3_bucket, tmp_path, "cli-pruned")
    assert sorted(manifests(s3_bucket, "cli-pruned")) == [".", "checkpoint-40"]
    assert stored_objects(s3_bucket, "cli-pruned") == before
    assert sorted(e["checkpoint"] for e in daemon.events("pruned checkpoint not committed again")) == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]
    assert not daemon.events("uploaded") and not daemon.events("checkpoint committed")  # the pin neither
    assert daemon.events("drained")[-1]["uncommitted"] == []
    assert not list((tmp_path / "ckpt" / ".ckptd" / "staging-rank-0").iterdir())  # released
    every_listed_object_exists(s3_bucket, "cli-pruned")


def test_a_file_lost_without_a_tombstone_is_uploaded_again_then_committed(s3_bucket, tmp_path):
    run_job(s3_bucket, tmp_path, "lost", "10,20")
    client, bucket = s3_bucket.client, s3_bucket.name
    job_prefix = f"{PREFIX}/training_projects/{PROJECT}/jobs/lost"
    listed = manifests(s3_bucket, "lost")["checkpoint-10"]
    # By hand: the manifest and one object gone, no prune (no tombstone): a crash before the
    # commit and a lost object look the same to the restarted daemon.
    client.delete_object(Bucket=bucket, Key=f"{job_prefix}/manifests/rank-0/checkpoint-10.json")
    client.delete_object(Bucket=bucket, Key=f"{job_prefix}/rank-0/checkpoint-10/optimizer.pt")
    daemon = watch_again(s3_bucket, tmp_path, "lost")
    lost = daemon.events("the store lost stored files: uploading them again")
    assert [(e["keys"], e["checkpoints"]) for e in lost] == [
        (["training_projects/proj/jobs/lost/rank-0/checkpoint-10/optimizer.pt"], ["checkpoint-10"])
    ]
    assert [e["path"] for e in daemon.events("uploaded")] == ["checkpoint-10/optimizer.pt"]
    assert [e["checkpoint"] for e in daemon.events("checkpoint committed")] == ["checkpoint-10"]
    again = manifests(s3_bucket, "lost")["checkpoint-10"]
    assert again["files"] == listed["files"]  # the same bytes: nothing lost
    written = json.loads((tmp_path / "record.json").read_text())
    assert (
        hashlib.sha256(stored_objects(s3_bucket, "lost")["checkpoint-10/optimizer.pt"]).hexdigest()
        == (written["checkpoint-10/optimizer.pt"])
    )
    every_listed_object_exists(s3_bucket, "lost")


def test_a_file_changed_after_the_prune_is_new_content_uploaded_and_committed(moto_bucket, tmp_path):
    run_job(moto_bucket, tmp_path, "changed", "10,20", "--prune", "--keep-last", "1")
    assert sorted(manifests(moto_bucket, "changed")) == [".", "checkpoint-20"]
    (tmp_path / "ckpt" / "checkpoint-10" / "optimizer.pt").write_bytes(b"other bytes")
    daemon = watch_again(moto_bucket, tmp_path, "changed")
    assert not daemon.events("pruned checkpoint not committed again")
    assert [e["checkpoint"] for e in daemon.events("checkpoint committed")] == ["checkpoint-10"]
    listed = {f["path"]: f["sha256"] for f in manifests(moto_bucket, "changed")["checkpoint-10"]["files"]}
    assert listed["checkpoint-10/optimizer.pt"] == hashlib.sha256(b"other bytes").hexdigest()
    assert set(listed) == {f"checkpoint-10/{n}" for n in ("model.safetensors", "optimizer.pt", "trainer_state.json")}
    every_listed_object_exists(moto_bucket, "changed")
