"""Job metadata: the status derivation table, and several nodes writing at once on every backend."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from daemon.catalog import jobmeta, layout
from daemon.catalog.jobmeta import COMPLETED, FAILED, RUNNING, STOPPED, SYNCING, JobNotFound
from daemon.storage import Storage
from daemon.storage.local import LocalStorage
from daemon.storage.s3 import S3Storage

KIND = "unit"

WRITES_PER_NODE = 15


@contextlib.asynccontextmanager
async def another_node(store: Storage) -> AsyncIterator[Storage]:
    """A second, independent client of the same store, as another node would have."""
    if isinstance(store, LocalStorage):
        twin: Storage = LocalStorage(store.root)
    else:
        assert isinstance(store, S3Storage)
        twin = S3Storage(store.bucket, store.prefix, store.options)
    async with twin:
        yield twin


def status(rank: int, st: str, sync: str) -> dict:
    return jobmeta.rank_status(rank, status=st, sync_status=sync, hostname="h", updated_at="t")


@pytest.mark.parametrize(
    "ranks, group_size, expected",
    [
        ([], 2, (RUNNING, SYNCING)),
        ([], None, (RUNNING, SYNCING)),
        ([(FAILED, SYNCING), (COMPLETED, COMPLETED)], 2, (FAILED, SYNCING)),
        ([(FAILED, COMPLETED)], 2, (FAILED, SYNCING)),  # rank 1 never reported: its sync is unknown
        ([(FAILED, COMPLETED), (RUNNING, COMPLETED)], 2, (FAILED, COMPLETED)),
        ([(COMPLETED, COMPLETED), (COMPLETED, COMPLETED)], 2, (COMPLETED, COMPLETED)),
        ([(COMPLETED, COMPLETED), (COMPLETED, SYNCING)], 2, (COMPLETED, SYNCING)),
        ([(COMPLETED, COMPLETED)], 2, (RUNNING, SYNCING)),
        ([(COMPLETED, COMPLETED)], None, (COMPLETED, COMPLETED)),
        ([(RUNNING, COMPLETED), (COMPLETED, COMPLETED)], 2, (RUNNING, COMPLETED)),
        ([(RUNNING, SYNCING)], 1, (RUNNING, SYNCING)),
        ([(STOPPED, COMPLETED), (COMPLETED, COMPLETED)], 2, (STOPPED, COMPLETED)),
        ([(STOPPED, SYNCING), (RUNNING, COMPLETED)], 2, (STOPPED, SYNCING)),
        ([(STOPPED, COMPLETED), (FAILED, COMPLETED)], 2, (FAILED, COMPLETED)),
    ],
)
def test_derive_status(ranks, group_size, expected):
    statuses = [status(rank, st, sync) for rank, (st, sync) in enumerate(ranks)]
    assert jobmeta.derive_status(statuses, group_size) == expected


@pytest.mark.parametrize(
    "fields", [{"status": "DONE", "sync_status": SYNCING}, {"status": RUNNING, "sync_status": "X"}]
)
def test_rank_status_refuses_values_outside_the_contract(fields):
    with pytest.raises(ValueError, match="expected one of"):
        jobmeta.rank_status(0, **fields)


def test_rank_status_fills_defaults():
    s = jobmeta.rank_status(
        3,
        status=RUNNING,
        sync_status=SYNCING,
        uncommitted={"b", "a"},
        last_commit={"checkpoint": "c-1", "step": 1, "committed_at": "t", "extra": 1},
    )
    assert s["hostname"] and datetime.fromisoformat(s["updated_at"]).utcoffset().total_seconds() == 0
    assert (s["exit_code"], s["uncommitted"], s["pending_files"], s["failed_files"]) == (None, ["a", "b"], 0, 0)
    assert s["last_commit"] == {"checkpoint": "c-1", "step": 1, "committed_at": "t"}
    assert jobmeta.rank_status(0, status=RUNNING)["sync_status"] == SYNCING


async def test_job_object_is_written_once(store):
    first = await jobmeta.ensure_job(store, "proj", "job", 2, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    again = await jobmeta.ensure_job(store, "proj", "job", 2)
    assert (
        first
        == again
        == {
            "project": "proj",
            "job_id": "job",
            "created_at": "2026-01-01T00:00:00+00:00",
            "group_size": 2,
            "global_commit": True,
        }
    )


async def test_nodes_writing_at_once_lose_no_update(store):
    async def node(storage: Storage, rank: int) -> None:
        await jobmeta.ensure_job(storage, "proj", "job", 2)
        for i in range(WRITES_PER_NODE):
            last = i == WRITES_PER_NODE - 1
            await jobmeta.write_rank_status(
                storage,
                "proj",
                "job",
                rank,
                status=COMPLETED if last else RUNNING,
                sync_status=COMPLETED if last else SYNCING,
                exit_code=0 if last else None,
                pending_files=WRITES_PER_NODE - 1 - i,
                hostname=f"node-{rank}",
            )
            await asyncio.sleep(0)  # let the other node's write interleave

    async with another_node(store) as other:
        # Midway, a reader sees a consistent (if partial) job.
        reader = asyncio.create_task(_read_while_running(store))
        await asyncio.gather(node(store, 0), node(other, 1))
        await reader
    job = await jobmeta.read_job(store, "proj", "job")
    assert (job["current_status"], job["checkpoint_sync_status"], job["group_size"]) == (COMPLETED, COMPLETED, 2)
    assert [(s["rank"], s["hostname"], s["pending_files"], s["exit_code"]) for s in job["ranks"]] == [
        (0, "node-0", 0, 0),
        (1, "node-1", 0, 0),
    ]
    assert job["updated_at"] == max(s["updated_at"] for s in job["ranks"])


async def _read_while_running(store: Storage) -> None:
    for _ in range(3):
        with contextlib.suppress(JobNotFound):
            job = await jobmeta.read_job(store, "proj", "job")
            assert job["current_status"] in (RUNNING, COMPLETED)
        await asyncio.sleep(0)


async def test_a_failed_rank_fails_the_job(store):
    await jobmeta.ensure_job(store, "proj", "job", 2)
    await jobmeta.write_rank_status(store, "proj", "job", 0, status=RUNNING, sync_status=SYNCING)
    await jobmeta.write_rank_status(store, "proj", "job", 1, status=FAILED, sync_status=COMPLETED, exit_code=137)
    job = await jobmeta.read_job(store, "proj", "job")
    assert (job["current_status"], job["checkpoint_sync_status"]) == (FAILED, SYNCING)
    assert job["ranks"][1]["exit_code"] == 137


async def test_missing_or_damaged_metadata(store):
    with pytest.raises(JobNotFound):
        await jobmeta.read_job(store, "proj", "nothing")
    # Status without job.json (its write failed, say) is still a job; damaged objects are skipped.
    await jobmeta.write_rank_status(store, "proj", "job", 0, status=COMPLETED, sync_status=COMPLETED)
    await store.put(layout.job_metadata_key("proj", "job"), b"{trunc")
    await store.put(layout.rank_status_key("proj", "job", 1), b'{"rank": 5, "status": "RUNNING"}')
    await store.put(layout.job_prefix("proj", "job") + "status/README", b"not a status")
    job = await jobmeta.read_job(store, "proj", "job")
    assert (job["created_at"], job["group_size"], [s["rank"] for s in job["ranks"]]) == (None, None, [0])
    assert job["current_status"] == COMPLETED
    # A damaged job.json is rewritten by the next node to start.
    assert (await jobmeta.ensure_job(store, "proj", "job", 1))["group_size"] == 1
    assert (await jobmeta.read_job(store, "proj", "job"))["group_size"] == 1
