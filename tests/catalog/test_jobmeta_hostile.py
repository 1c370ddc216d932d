"""Job metadata written by something other than ckptd (by hand, an old or broken writer): every
field a reader uses comes out of read_job typed, or is left out, never passed on as found."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from daemon.catalog import jobmeta, layout
from daemon.storage.local import LocalStorage

KIND = "unit"

P, J = "proj", "job"
GOOD = {"rank": 0, "status": "FAILED", "sync_status": "SYNCING"}


@pytest.fixture
async def local(tmp_path) -> AsyncIterator[LocalStorage]:
    async with LocalStorage(tmp_path / "store") as storage:
        yield storage


async def put(storage: LocalStorage, key: str, obj: Any) -> None:
    await storage.put(key, json.dumps(obj).encode())


@pytest.mark.parametrize(
    "fields, kept",
    [
        ({}, True),
        ({"rank": False}, False),  # a bool is no rank, though False == 0
        ({"rank": 0.0}, False),
        ({"rank": "0"}, False),
        ({"rank": 1}, False),  # not the rank its name says
        ({"status": ["FAILED"]}, False),
        ({"sync_status": None}, False),
    ],
)
async def test_a_status_with_a_wrong_rank_or_status_is_skipped(local, fields, kept) -> None:
    await put(local, layout.rank_status_key(P, J, 0), {**GOOD, **fields})
    await put(local, layout.job_metadata_key(P, J), {"group_size": 1})
    ranks = (await jobmeta.read_job(local, P, J))["ranks"]
    assert [s["rank"] for s in ranks] == ([0] if kept else [])


@pytest.mark.parametrize(
    "field, value, read",
    [
        ("uncommitted", 5, []),
        ("uncommitted", "abc", []),  # a string is not three checkpoint names
        ("uncommitted", ["checkpoint-1", 2], []),
        ("uncommitted", ["checkpoint-1"], ["checkpoint-1"]),
        ("exit_code", "1", None),
        ("exit_code", True, None),
        ("exit_code", 3, 3),
        ("updated_at", 7, None),
        ("hostname", {"a": 1}, None),
        ("last_commit", "checkpoint-1", None),
        ("pending_files", -1, None),
    ],
)
async def test_a_wrong_typed_field_reads_as_its_neutral_value(local, field, value, read) -> None:
    await put(local, layout.rank_status_key(P, J, 0), {**GOOD, field: value})
    (status,) = (await jobmeta.read_job(local, P, J))["ranks"]
    assert status[field] == read


async def test_missing_fields_read_as_neutral_values(local) -> None:
    await put(local, layout.rank_status_key(P, J, 0), GOOD)
    (status,) = (await jobmeta.read_job(local, P, J))["ranks"]
    assert (status["uncommitted"], status["exit_code"], status["updated_at"]) == ([], None, None)


@pytest.mark.parametrize(
    "group_size, read",
    [(2, 2), (True, None), (-5, None), (0, None), (2.0, None), ("2", None)],
)
async def test_group_size_is_a_positive_int_or_none(local, group_size, read) -> None:
    await put(local, layout.job_metadata_key(P, J), {"group_size": group_size, "created_at": 5})
    job = await jobmeta.read_job(local, P, J)
    assert (job["group_size"], job["created_at"]) == (read, None)
