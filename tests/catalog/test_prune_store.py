"""Deleting checkpoints from real stores (a local directory, moto, the JuiceFS gateway): manifests
before files, exact folders (checkpoint-1 is not checkpoint-10), bytes freed, bounded concurrency,
interrupted prunes finished by the next one, the tombstones a prune leaves, and whole jobs."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import servers
from faults import FaultProxy, Rule
from structlog.testing import capture_logs

from daemon.catalog import browse, layout, prune, retention
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.storage import S3Options, Storage, StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline
from daemon.storage.s3 import S3Storage

KIND = "unit"  # the S3 cases are integration tests (conftest marks them)

P, J = "proj", "job-1"
NAMES = ("checkpoint-1", "checkpoint-10", "checkpoint-2")


async def save(store: Storage, rank: int, checkpoint: str, *, commit: bool = True, size: int = 1000) -> int:
    """Store a checkpoint's files for one rank (and its manifest, if `commit`); its bytes."""
    files = []
    for name, data in (("model.bin", bytes([rank]) * size), ("trainer_state.json", b'{"global_step": 1}')):
        relpath = f"{checkpoint}/{name}"
        key = layout.file_key(P, J, rank, relpath)
        etag = await store.put(key, data)
        files.append(StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, etag))
    if commit:
        await write_manifest(store, build_manifest(P, J, rank, checkpoint, files, "marker", {"eval_loss": 0.5}))
    return sum(f.size for f in files)


async def keys(store: Storage, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(layout.job_prefix(P, J) + prefix)]


async def tombstone(store: Storage, rank: int, checkpoint: str) -> dict:
    return json.loads(await store.get(prune.tombstone_key(P, J, rank, checkpoint)))


def buried(manifest: dict) -> list[dict]:
    """What a tombstone lists of a manifest's files."""
    return [{k: f[k] for k in ("path", "key", "size", "sha256")} for f in manifest["files"]]


def pruner(store: Storage, seconds: float = 30, concurrency: int = prune.CONCURRENCY) -> prune.Pruner:
    return prune.Pruner(store, P, J, deadline=Deadline.after(seconds), concurrency=concurrency)


async def test_prune_deletes_manifests_and_exactly_its_folder_on_every_rank(store):
    sizes = {(r, n): await save(store, r, n, size=1000 + 10 * r) for r in (0, 1) for n in NAMES}
    await store.put(layout.file_key(P, J, 0, "tokenizer.json"), b"{}")  # the '.' pseudo-checkpoint
    found = browse.checkpoint_named(await browse.checkpoints(store, P, J), "checkpoint-1")
    freed = await pruner(store).prune("checkpoint-1", {r: m["committed_at"] for r, m in found.manifests.items()})
    assert (freed.checkpoint, freed.ranks, freed.files) == ("checkpoint-1", [0, 1], 4)
    assert freed.bytes == sizes[0, "checkpoint-1"] + sizes[1, "checkpoint-1"]
    left = await keys(store)
    alive = [k for k in left if "/pruned/" not in k]  # the tombstones are checked below
    assert not [k for k in alive if "/checkpoint-1/" in k or k.endswith("/checkpoint-1.json")]
    for rank in (0, 1):  # checkpoint-10 shares the name's beginning: untouched
        assert f"{layout.rank_prefix(P, J, rank)}checkpoint-10/model.bin" in left
        assert layout.manifest_key(P, J, rank, "checkpoint-10") in left
    assert layout.file_key(P, J, 0, "tokenizer.json") in left
    assert not [k for k in left if "/pruning/" in k]  # the records went last
    assert [c.name for c in await browse.checkpoints(store, P, J)] == ["checkpoint-10", "checkpoint-2"]
    # The tombstones stay, one per rank, listing what each manifest listed.
    assert await keys(store, "pruned/") == [prune.tombstone_key(P, J, r, "checkpoint-1") for r in (0, 1)]
    for rank, manifest in found.manifests.items():
        stone = await tombstone(store, rank, "checkpoint-1")
        assert (stone["checkpoint"], stone["rank"], stone["committed_at"]) == (
            "checkpoint-1",
            rank,
            manifest["committed_at"],
        )
        assert stone["files"] == buried(manifest) and len(stone["files"]) == 2
        assert stone["pruned_at"] >= manifest["committed_at"]


class FailingFileDeletes(LocalStorage):
    """A real local store that refuses, for good, deletes of checkpoint files (not of manifests)."""

    async def delete(self, key: str) -> None:
        if key.startswith(layout.rank_prefix(P, J, 1)):
            raise StorageError("delete", key, "AccessDenied", "denied", http_status=403, transient=False)
        await super().delete(key)


async def test_a_prune_stopped_after_the_manifests_is_finished_by_the_next(tmp_path):
    failing = FailingFileDeletes(tmp_path / "store")
    for rank in (0, 1):
        for name in NAMES:
            await save(failing, rank, name)
    found = browse.checkpoint_named(await browse.checkpoints(failing, P, J), "checkpoint-2")
    committed = {r: m["committed_at"] for r, m in found.manifests.items()}
    with pytest.raises(StorageError, match=r"delete '.*/rank-1/checkpoint-2/model.bin'.*AccessDenied"):
        await pruner(failing).prune("checkpoint-2", committed)
    # Not committed any more on either rank, rank 1's files still there, its record left behind.
    assert "checkpoint-2" not in [c.name for c in await browse.checkpoints(failing, P, J)]
    assert await keys(failing, "rank-1/checkpoint-2/")
    assert await keys(failing, "pruning/") == [prune.record_key(P, J, r, "checkpoint-2") for r in (0, 1)]
    stones = {r: await tombstone(failing, r, "checkpoint-2") for r in (0, 1)}  # before the manifests went
    assert {r: t["files"] for r, t in stones.items()} == {r: buried(m) for r, m in found.manifests.items()}

    store = LocalStorage(tmp_path / "store")  # the store works again
    survey = await prune.survey(store, P, J)
    assert [(i.rank, i.checkpoint, now) for i, now in survey.interrupted] == [
        (0, "checkpoint-2", None),
        (1, "checkpoint-2", None),
    ]
    assert [i.committed_at for i, _ in survey.interrupted] == [committed[0], committed[1]]
    decisions = retention.plan(survey.checkpoints, retention.Rules(keep_last=5), stored_ranks=survey.stored_ranks)
    assert {d.name: d.reasons for d in decisions}["checkpoint-2"] == (retention.UNCOMMITTED,)
    freed = await prune.execute(pruner(store), survey, decisions)
    assert [(f.checkpoint, f.ranks) for f in freed] == [("checkpoint-2", [0]), ("checkpoint-2", [1])]
    assert not await keys(store, "rank-1/checkpoint-2/")
    assert not await keys(store, "pruning/")
    assert await keys(store, "rank-1/checkpoint-10/")
    assert {r: await tombstone(store, r, "checkpoint-2") for r in (0, 1)} == stones  # kept as written


async def test_a_record_left_before_the_manifests_went_is_finished_too(store):
    for name in NAMES:
        await save(store, 0, name)
    manifest = (await browse.checkpoints(store, P, J))[0].manifests[0]
    record = {"checkpoint": "checkpoint-1", "rank": 0, "committed_at": manifest["committed_at"]}
    await store.put(prune.record_key(P, J, 0, "checkpoint-1"), prune.json_bytes(record))
    survey = await prune.survey(store, P, J)  # a manifest being deleted is not committed any more
    assert [c.name for c in survey.checkpoints] == ["checkpoint-10", "checkpoint-2"]
    await prune.execute(pruner(store), survey, [])
    assert not await keys(store, "rank-0/checkpoint-1/")
    assert not await keys(store, "manifests/rank-0/checkpoint-1.json")
    assert not await keys(store, "pruning/")
    assert (await tombstone(store, 0, "checkpoint-1"))["files"] == buried(manifest)  # finishing buries it


async def test_a_checkpoint_committed_again_since_its_record_is_left_alone(store):
    await save(store, 0, "checkpoint-1")
    stale = {"checkpoint": "checkpoint-1", "rank": 0, "committed_at": "2020-01-01T00:00:00+00:00"}
    await store.put(prune.record_key(P, J, 0, "checkpoint-1"), prune.json_bytes(stale))
    survey = await prune.survey(store, P, J)
    assert [c.name for c in survey.checkpoints] == ["checkpoint-1"]
    assert await prune.execute(pruner(store), survey, []) == []
    assert len(await keys(store, "rank-0/checkpoint-1/")) == 2
    assert not await keys(store, "pruning/")
    assert not await keys(store, "pruned/")  # alive: no tombstone


async def test_garbage_records_finish_nothing_committed(store):
    await save(store, 0, "checkpoint-1")
    await store.put(prune.record_key(P, J, 0, "checkpoint-1"), b"\x00not json")
    for odd in ("rank-0/nested/x.json", "rank-01/checkpoint-1.json", "rank-0/checkpoint-1.txt"):  # not records
        await store.put(prune.records_prefix(P, J) + odd, b"{}")
    survey = await prune.survey(store, P, J)
    assert [(i.checkpoint, i.committed_at) for i, _ in survey.interrupted] == [("checkpoint-1", None)]
    await prune.execute(pruner(store), survey, [])
    assert len(await keys(store, "rank-0/checkpoint-1/")) == 2  # committed: not deleted


async def test_stored_ranks_lists_folders_committed_or_not(store):
    await save(store, 0, "checkpoint-1")
    await save(store, 3, "checkpoint-1", commit=False)
    await save(store, 3, "checkpoint-2", commit=False)
    assert await prune.stored_ranks(store, P, J) == {"checkpoint-1": {0, 3}, "checkpoint-2": {3}}
    assert await prune.stored_ranks(store, P, J, [0]) == {"checkpoint-1": {0}}


class CountingStore(LocalStorage):
    def __init__(self, root) -> None:
        super().__init__(root)
        self.now = self.peak = 0

    async def delete(self, key: str) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            # One yield: every call the bound admits is counted before any of them ends; no timing.
            await asyncio.sleep(0)
            await super().delete(key)
        finally:
            self.now -= 1


async def test_deletes_are_bounded(tmp_path):
    store = CountingStore(tmp_path / "store")
    for i in range(60):
        await store.put(layout.file_key(P, J, 0, f"checkpoint-1/shard-{i}.bin"), b"x")
    freed = await pruner(store, concurrency=4).prune("checkpoint-1", {0: None})
    assert (freed.files, freed.bytes) == (60, 60)
    assert store.peak == 4
    assert not await keys(store, "pruned/")  # no manifest, nothing it vouched for: no tombstone


async def test_a_damaged_manifest_goes_without_a_tombstone(store):
    await save(store, 0, "checkpoint-1")
    await store.put(layout.manifest_key(P, J, 0, "checkpoint-1"), b"{not json")
    await store.put(prune.record_key(P, J, 0, "checkpoint-1"), prune.json_bytes({"checkpoint": "checkpoint-1"}))
    with capture_logs() as logs:
        await prune.execute(pruner(store), await prune.survey(store, P, J), [])
    assert await keys(store) == []
    assert [e["key"] for e in logs if e["event"] == "damaged manifest pruned without a tombstone"] == [
        layout.manifest_key(P, J, 0, "checkpoint-1")
    ]


async def test_delete_job_leaves_nothing_under_its_prefix(store):
    for rank in (0, 1):
        await save(store, rank, "checkpoint-1")
        await save(store, rank, "checkpoint-2")
    found = browse.checkpoint_named(await browse.checkpoints(store, P, J), "checkpoint-2")
    await pruner(store).prune("checkpoint-2", {r: m["committed_at"] for r, m in found.manifests.items()})  # tombstones
    assert len(await keys(store, "pruned/")) == 2
    await store.put(layout.job_metadata_key(P, J), b"{}")
    upload = await store.create_multipart(layout.file_key(P, J, 0, "checkpoint-9/big.bin"))
    other = layout.file_key(P, "job-10", 0, "checkpoint-1/model.bin")  # a job whose id starts alike
    await store.put(other, b"keep")
    freed = await pruner(store).delete_job()
    assert freed.files == 2 * 2 + 2 + 2 + 1  # files, manifests, tombstones, job.json
    assert await keys(store) == []
    assert await store.list_multipart_uploads(layout.job_prefix(P, J)) == []
    assert await store.get(other) == b"keep"
    await store.abort_multipart(layout.file_key(P, J, 0, "checkpoint-9/big.bin"), upload)


async def test_an_s3_store_failing_mid_prune_leaves_records_the_next_prune_finishes(moto_bucket):
    for rank in (0, 1):
        async with moto_bucket.storage() as direct:
            for name in NAMES:
                await save(direct, rank, name)
    server = moto_bucket.server
    fail = Rule("error500", ops=("DeleteObject",), key="*/rank-1/checkpoint-10/*")
    with FaultProxy(int(server.endpoint_url.rsplit(":", 1)[1]), [fail]) as proxy:
        options = S3Options(endpoint_url=proxy.endpoint, region=server.region, addressing_style="path")
        async with S3Storage(moto_bucket.name, servers.S3_PREFIX, options) as through:
            found = browse.checkpoint_named(await browse.checkpoints(through, P, J), "checkpoint-10")
            committed = {r: m["committed_at"] for r, m in found.manifests.items()}
            with pytest.raises(StorageError, match="rank-1/checkpoint-10/"):
                await pruner(through, seconds=0.5).prune("checkpoint-10", committed)
        assert proxy.injected["error500"] >= 1
    async with moto_bucket.storage() as direct:
        assert await keys(direct, "rank-1/checkpoint-10/")
        survey = await prune.survey(direct, P, J)
        assert {(i.rank, i.checkpoint) for i, _ in survey.interrupted} == {(0, "checkpoint-10"), (1, "checkpoint-10")}
        await prune.execute(pruner(direct), survey, [])
        left = await keys(direct)
    alive = [k for k in left if "/pruned/" not in k]
    assert not [k for k in alive if "/checkpoint-10/" in k or "/pruning/" in k or k.endswith("checkpoint-10.json")]
    assert [k for k in left if k.endswith("checkpoint-10.json")] == [
        prune.tombstone_key(P, J, r, "checkpoint-10") for r in (0, 1)
    ]
    assert len([k for k in left if "/checkpoint-1/" in k]) == 4
