"""Job metadata, written by several nodes at once without losing any node's update (SPEC §4).

Each rank owns one status object (`status/rank-N.json`) and only ever writes its own, so no write
can clobber another node's; the job object (`job.json`) carries nothing per node and is written once.
Readers combine them and derive the job's overall status.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from daemon import logs
from daemon.catalog import layout
from daemon.catalog.jsonio import json_bytes, read_object, utc_now
from daemon.storage import Storage

RUNNING, COMPLETED, FAILED, STOPPED = "RUNNING", "COMPLETED", "FAILED", "STOPPED"
SYNCING = "SYNCING"
STATUSES = (RUNNING, COMPLETED, FAILED, STOPPED)
SYNC_STATUSES = (SYNCING, COMPLETED)
_STATUS_NAME = re.compile(r"rank-(0|[1-9][0-9]*)\.json")


class JobNotFound(LookupError):
    def __init__(self, project: str, job_id: str) -> None:
        super().__init__(f"no metadata for job {job_id!r} in project {project!r}")


async def ensure_job(
    storage: Storage, project: str, job_id: str, group_size: int, created_at: datetime | str | None = None
) -> dict[str, Any]:
    """Write job.json unless it exists; return what is stored (the first writer's created_at wins).

    Read-then-put is not atomic, and needs not be: two nodes racing here write the same project,
    job and group size and creation times a moment apart, and neither carries per-node state, so
    whichever lands last loses nothing.
    """
    key = layout.job_metadata_key(project, job_id)
    existing = await read_job_record(storage, project, job_id)
    if existing is not None:
        return existing
    if isinstance(created_at, datetime):
        created_at = created_at.astimezone(UTC).isoformat()
    job = {"project": project, "job_id": job_id, "created_at": created_at or utc_now(), "group_size": group_size}
    if group_size > 1:  # its checkpoints commit across nodes (globalmanifest.py), unlike jobs before it
        job["global_commit"] = True
    await storage.put(key, json_bytes(job))
    return job


async def read_job_record(storage: Storage, project: str, job_id: str) -> dict[str, Any] | None:
    """job.json as stored (None when missing or damaged); `read_job` adds every rank's status."""
    return await read_object(storage, layout.job_metadata_key(project, job_id))


def rank_status(
    rank: int,
    *,
    status: str,
    sync_status: str = SYNCING,
    exit_code: int | None = None,
    hostname: str | None = None,
    last_commit: dict[str, Any] | None = None,
    uncommitted: Iterable[str] = (),
    pending_files: int = 0,
    failed_files: int = 0,
    updated_at: str | None = None,
) -> dict[str, Any]:
    """One rank's status object; ValueError for a status outside the contract's values.

    `last_commit`: {checkpoint, step, committed_at} of the rank's latest manifest, or None.
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
    if sync_status not in SYNC_STATUSES:
        raise ValueError(f"sync_status {sync_status!r}: expected one of {', '.join(SYNC_STATUSES)}")
    if last_commit is not None:
        last_commit = {k: last_commit.get(k) for k in ("checkpoint", "step", "committed_at")}
    return {
        "rank": rank,
        "status": status,
        "sync_status": sync_status,
        "exit_code": exit_code,
        "hostname": hostname or socket.gethostname(),
        "updated_at": updated_at or utc_now(),
        "last_commit": last_commit,
        "uncommitted": sorted(uncommitted),
        "pending_files": pending_files,
        "failed_files": failed_files,
    }


async def write_rank_status(storage: Storage, project: str, job_id: str, rank: int, **fields: Any) -> dict[str, Any]:
    """Replace this rank's status object with a complete one (see `rank_status` for the fields).

    A node holds its whole state, so it writes the whole object: no read-modify-write, nothing to
    merge. Writes from one node must be serialised by the caller, or an older one may land last.
    """
    status = rank_status(rank, **fields)
    await storage.put(layout.rank_status_key(project, job_id, rank), json_bytes(status))
    return status


def derive_status(statuses: Sequence[dict[str, Any]], group_size: int | None) -> tuple[str, str]:
    """The job's (current_status, checkpoint_sync_status) from its ranks' status objects.

    "all" means every reporting rank, and at least `group_size` of them (at least one when the
    group size is unknown): a rank that never reported is still starting, not done.

    | any FAILED | any STOPPED | all status COMPLETED | all sync COMPLETED | current_status | checkpoint_sync_status |
    |------------|-------------|----------------------|--------------------|----------------|------------------------|
    | yes        | any         | any                  | no                 | FAILED         | SYNCING                |
    | yes        | any         | any                  | yes                | FAILED         | COMPLETED              |
    | no         | yes         | no                   | any                | STOPPED        | (as sync says)         |
    | no         | no          | yes                  | yes                | COMPLETED      | COMPLETED              |
    | no         | no          | yes                  | no                 | COMPLETED      | SYNCING                |
    | no         | no          | no                   | yes                | RUNNING        | COMPLETED              |
    | no         | no          | no                   | no                 | RUNNING        | SYNCING                |

    STOPPED: a rank was told to stop (a stop signal, a pod deleted) before its trainer finished;
    a failure elsewhere is the bigger news.
    """
    everyone = len(statuses) >= max(group_size or 1, 1)
    if any(s["status"] == FAILED for s in statuses):
        current = FAILED
    elif any(s["status"] == STOPPED for s in statuses):
        current = STOPPED
    elif everyone and all(s["status"] == COMPLETED for s in statuses):
        current = COMPLETED
    else:
        current = RUNNING
    synced = everyone and all(s["sync_status"] == COMPLETED for s in statuses)
    return current, COMPLETED if synced else SYNCING


async def read_job(storage: Storage, project: str, job_id: str) -> dict[str, Any]:
    """job.json combined with every rank's status; JobNotFound when there is neither."""
    prefix = layout.job_prefix(project, job_id) + "status/"
    keys = {
        info.key: int(m.group(1))
        async for info in storage.list(prefix)
        if (m := _STATUS_NAME.fullmatch(info.key[len(prefix) :]))
    }
    job, *found = await asyncio.gather(
        read_job_record(storage, project, job_id), *(read_object(storage, k) for k in keys)
    )
    checked = (checked_status(key, rank, s) for (key, rank), s in zip(keys.items(), found, strict=True))
    ranks = sorted((s for s in checked if s is not None), key=lambda s: s["rank"])
    if job is None and not ranks:
        raise JobNotFound(project, job_id)
    job = job or {}
    group_size = job.get("group_size") if _count(job.get("group_size")) else None
    current, synced = derive_status(ranks, group_size)
    return {
        "project": project,
        "job_id": job_id,
        "created_at": job.get("created_at") if isinstance(job.get("created_at"), str) else None,
        "group_size": group_size,
        "current_status": current,
        "checkpoint_sync_status": synced,
        "updated_at": max((s["updated_at"] for s in ranks if s["updated_at"] is not None), default=None),
        "ranks": ranks,
    }


def _int(value: Any) -> bool:
    """A JSON integer: bool is an int in Python, but `"rank": false` is not rank 0."""
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _int(value) and value > 0


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


# Fields a reader may use as typed, each with its check; a wrong-typed one is dropped (its
# neutral value instead) so that one bad field does not hide the rest of the rank's report.
_FIELDS: dict[str, tuple[Any, Any]] = {  # name: (check, value when missing or wrong)
    "exit_code": (_optional(_int), None),
    "hostname": (_optional(lambda v: isinstance(v, str)), None),
    "updated_at": (_optional(lambda v: isinstance(v, str)), None),
    "last_commit": (_optional(lambda v: isinstance(v, dict)), None),
    "uncommitted": (_names, []),
    "pending_files": (_optional(lambda v: _int(v) and v >= 0), None),
    "failed_files": (_optional(lambda v: _int(v) and v >= 0), None),
}


def checked_status(key: str, rank: int, status: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rank's status object with every field of the contract typed, or None when unusable.

    Checked once here so readers need not: a status whose rank (an int, not a bool, and the one
    its name says), status or sync_status is wrong is skipped; any other wrong-typed field is
    replaced by its neutral value (`uncommitted` by []), with a warning either way.

    | rank in the object | status / sync_status | uncommitted    | result                         |
    |--------------------|----------------------|----------------|--------------------------------|
    | the file's rank    | contract values      | list of str    | kept as stored                 |
    | false, 0.0, "0"    | any                  | any            | None (skipped)                 |
    | the file's rank    | outside the contract | any            | None (skipped)                 |
    | the file's rank    | contract values      | 5, "abc", [1]  | kept, uncommitted []           |
    """
    if status is None:
        return None
    log = logs.get(__name__)
    core = (
        _int(status.get("rank"))
        and status["rank"] == rank
        and isinstance(status.get("status"), str)
        and status["status"] in STATUSES
        and isinstance(status.get("sync_status"), str)
        and status["sync_status"] in SYNC_STATUSES
    )
    if not core:
        log.warning("skipping malformed rank status", key=key)
        return None
    out = dict(status)
    for name, (check, neutral) in _FIELDS.items():
        if name not in out:
            out[name] = neutral
        elif not check(out[name]):
            log.warning("ignoring a wrong-typed field of a rank status", key=key, field=name)
            out[name] = neutral
    return out
