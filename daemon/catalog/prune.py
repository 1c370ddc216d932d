"""Deleting checkpoints from the store, in an order that never leaves a lie behind.

Per checkpoint: a pruning record per rank first (`jobs/{job}/pruning/rank-N/{checkpoint}.json`),
then, for a multi-node job, its global manifest (from here on restore no longer sees it), then on
every rank a tombstone and its manifest (from here on it is not "committed": restore and `ls` no
longer see it), then its files (`rank-N/{checkpoint}/`, the trailing '/' so that checkpoint-1
never matches checkpoint-10), then the records. A prune stopped anywhere (a crash, a store that
fails) leaves its records behind and the next prune finishes them first, so no file is orphaned
forever; when and how is daemon.catalog.prunerecords'.

The tombstone (`jobs/{job}/pruned/rank-N/{checkpoint}.json`) stays: what the manifest listed
(path, key, size, sha256), committed_at and pruned_at, so that a daemon restarted on the same
folder, whose journal says these files are stored, neither commits nor uploads them again.

Whole job: a job record (`pruning/job.json`), incomplete multipart uploads aborted, global
manifests deleted, then the ranks' manifests, then everything else under the job's prefix, the
record last.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from daemon import logs
from daemon.catalog import browse, jobview, layout
from daemon.catalog.browse import Checkpoint
from daemon.catalog.jsonio import json_bytes, read_object, utc_now
from daemon.catalog.manifest import read_manifest
from daemon.catalog.prunerecords import (
    DROP,
    FINISH,
    Action,
    Interrupted,
    job_record_key,
    record_key,
    records_prefix,
    resume_action,
    tombstone_key,
    was_being_deleted,
)
from daemon.catalog.retention import Decision
from daemon.storage import ObjectInfo, Storage, StorageError
from daemon.storage.retry import Deadline, retrying

CONCURRENCY = 16  # deletes in flight
_RANK_DIR = re.compile(r"rank-(0|[1-9][0-9]*)")
_RECORD = re.compile(r"rank-(0|[1-9][0-9]*)/(.+)\.json")
log = logs.get(__name__)


@dataclass
class Freed:
    """What deleting one checkpoint (or a job: checkpoint None) removed."""

    checkpoint: str | None
    ranks: list[int] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


class Pruner:
    """Deletes from one job of one store; StorageError (naming op and key) when the store fails
    past `deadline`. Cancellation passes through; what it interrupts, the records finish later."""

    def __init__(
        self,
        storage: Storage,
        project: str,
        job_id: str,
        *,
        deadline: Deadline,
        concurrency: int = CONCURRENCY,
        multi_node: bool = False,
    ) -> None:
        """`multi_node`: the job's checkpoints commit globally (jobview.JobView.multi_node)."""
        self.storage, self.project, self.job_id = storage, project, job_id
        self.deadline, self.concurrency, self.multi_node = deadline, concurrency, multi_node

    async def _retry(self, call: Any) -> Any:
        return await retrying(call, deadline=self.deadline, counter=None, context={"job_id": self.job_id})

    async def prune(self, checkpoint: str, committed: Mapping[int, str | None]) -> Freed | None:
        """Delete `checkpoint` on every rank of `committed` (rank -> its manifest's committed_at, as
        surveyed). None, deleting nothing, when a rank committed it again since the survey. For a
        multi-node job, its global manifest goes first (`_finish`)."""
        ranks = sorted(committed)
        for rank in ranks:
            record = {"checkpoint": checkpoint, "rank": rank, "committed_at": committed[rank], "started_at": utc_now()}
            key = record_key(self.project, self.job_id, rank, checkpoint)
            await self._retry(lambda key=key, record=record: self.storage.put(key, json_bytes(record)))
        # Checked after the records are written: a commit landing after this check meets a record
        # whose committed_at differs, so the next prune drops that record rather than finishing it.
        for rank in ranks:
            now = await self._committed_at(rank, checkpoint)
            if now is not None and now != committed[rank]:
                log.warning(
                    "checkpoint not pruned: it was committed again since the survey",
                    checkpoint=checkpoint,
                    rank=rank,
                )
                await self._drop(ranks, checkpoint)
                return None
        return await self._finish(checkpoint, ranks)

    async def _committed_at(self, rank: int, checkpoint: str) -> str | None:
        """The committed_at of the rank's manifest now; None when it has none (or a damaged one)."""
        key = layout.manifest_key(self.project, self.job_id, rank, checkpoint)
        try:
            manifest = await self._retry(lambda: read_manifest(self.storage, key))
        except StorageError as e:
            if not e.missing:
                raise
            return None
        except ValueError:
            return None
        stamp = manifest.get("committed_at")
        return stamp if isinstance(stamp, str) else None

    async def _drop(self, ranks: Iterable[int], checkpoint: str) -> None:
        for rank in ranks:
            key = record_key(self.project, self.job_id, rank, checkpoint)
            await self._retry(lambda key=key: self.storage.delete(key))

    async def _finish(self, checkpoint: str, ranks: list[int], written_at: datetime | None = None) -> Freed:
        """`written_at`: only files stored no later than this go (finishing an interrupted prune)."""
        if self.multi_node and checkpoint != layout.ROOT_CHECKPOINT:
            # Before any part: restore reads only the global manifest, which must never list a
            # deleted file. A prune stopped after this finishes from its records (`resume`).
            key = layout.global_key(self.project, self.job_id, checkpoint)
            await self._retry(lambda: self.storage.delete(key))
        for rank in ranks:  # first: from here on no reader takes it for a committed checkpoint
            key = layout.manifest_key(self.project, self.job_id, rank, checkpoint)
            await self._bury(rank, checkpoint, key)
            await self._retry(lambda key=key: self.storage.delete(key))
        freed = Freed(checkpoint, ranks)
        for rank in ranks:
            prefix = f"{layout.rank_prefix(self.project, self.job_id, rank)}{checkpoint}/"
            listing = self.storage.list(prefix)
            if written_at is not None:
                listing = _older(listing, written_at)
            files, size = await self._delete_all(listing)
            freed.files, freed.bytes = freed.files + files, freed.bytes + size
        await self._drop(ranks, checkpoint)
        return freed

    async def _bury(self, rank: int, checkpoint: str, manifest_key: str) -> None:
        """The tombstone of what the manifest lists, before it goes; none without a manifest (gone
        already: its tombstone was written then), nor for a damaged one."""
        try:
            manifest = await self._retry(lambda: read_manifest(self.storage, manifest_key))
        except StorageError as e:
            if not e.missing:
                raise
            return
        except ValueError as e:
            log.warning("damaged manifest pruned without a tombstone", key=manifest_key, error=str(e)[:200])
            return
        files = [{name: f[name] for name in ("path", "key", "size", "sha256")} for f in manifest["files"]]
        body = {"checkpoint": checkpoint, "rank": rank, "committed_at": manifest["committed_at"], "files": files}
        key = tombstone_key(self.project, self.job_id, rank, checkpoint)
        await self._retry(lambda: self.storage.put(key, json_bytes(body | {"pruned_at": utc_now()})))

    async def interrupted(self, ranks: Iterable[int] | None = None) -> list[Interrupted]:
        """The pruning records in the store (of `ranks` only, if given), by rank and name."""
        wanted = None if ranks is None else set(ranks)
        prefix = records_prefix(self.project, self.job_id)
        found: list[tuple[int, str, ObjectInfo]] = []
        async for info in self.storage.list(prefix):
            m = _RECORD.fullmatch(info.key[len(prefix) :])
            if m and layout.is_segment(m.group(2)) and (wanted is None or int(m.group(1)) in wanted):
                found.append((int(m.group(1)), m.group(2), info))
        records = await asyncio.gather(*(read_object(self.storage, info.key) for _, _, info in found))
        out = []
        for (rank, checkpoint, info), record in zip(found, records, strict=True):
            stamp = record.get("committed_at") if record is not None else None
            written = info.last_modified if record is not None else None
            out.append(Interrupted(rank, checkpoint, stamp if isinstance(stamp, str) else None, written))
        return sorted(out, key=lambda i: (i.rank, i.checkpoint))

    async def resume(self, record: Interrupted, committed_at: str | None) -> Freed | None:
        """Finish an interrupted prune, given the rank's manifest of the checkpoint now (its
        committed_at, None when it has none); see `resume_action`. None when only the record goes."""
        if resume_action(record.written_at is not None, committed_at, record.committed_at) == DROP:
            why = (
                "its record is unreadable" if record.written_at is None else "the checkpoint was committed again since"
            )
            log.warning(f"interrupted prune not finished: {why}", checkpoint=record.checkpoint, rank=record.rank)
            await self._drop([record.rank], record.checkpoint)
            return None
        return await self._finish(record.checkpoint, [record.rank], record.written_at)

    async def delete_job(self) -> Freed:
        """Delete everything of the job: uploads in progress, manifests first (global ones before the
        ranks' parts), then the rest."""
        record = job_record_key(self.project, self.job_id)
        prefix = layout.job_prefix(self.project, self.job_id)
        body = json_bytes({"job_id": self.job_id, "started_at": utc_now()})
        await self._retry(lambda: self.storage.put(record, body))
        for upload in await self._retry(lambda: self.storage.list_multipart_uploads(prefix)):
            await self._retry(lambda upload=upload: self.storage.abort_multipart(upload.key, upload.upload_id))
        freed = Freed(None)
        for part in (layout.global_prefix(self.project, self.job_id), prefix + "manifests/", prefix):
            files, size = await self._delete_all(self.storage.list(part), skip=record)
            freed.files, freed.bytes = freed.files + files, freed.bytes + size
        await self._retry(lambda: self.storage.delete(record))
        return freed

    async def _delete_all(self, listing: AsyncIterator[ObjectInfo], skip: str | None = None) -> tuple[int, int]:
        """Delete every listed object, `concurrency` at a time, as the listing pages in; (count,
        bytes). The first failure stops it (the deletes in flight finish) and is raised."""
        limit = asyncio.Semaphore(self.concurrency)
        failures: list[StorageError] = []
        done = [0, 0]
        tasks: set[asyncio.Task[None]] = set()

        async def one(info: ObjectInfo) -> None:
            try:
                await self._retry(lambda: self.storage.delete(info.key))
            except StorageError as e:
                failures.append(e)
            else:
                done[0], done[1] = done[0] + 1, done[1] + info.size
            finally:
                limit.release()

        try:
            async with contextlib.aclosing(listing):  # type: ignore[type-var]  # every backend's is a generator
                async for info in listing:
                    if failures:
                        break
                    if info.key != skip:
                        await limit.acquire()
                        task = asyncio.create_task(one(info))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)  # `one` raises nothing but cancellation
        except BaseException:  # a listing failure or a cancel: no delete outlives this call
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if failures:
            raise failures[0]
        return done[0], done[1]


async def _older(listing: AsyncIterator[ObjectInfo], written_at: datetime) -> AsyncIterator[ObjectInfo]:
    """The listed objects an interrupted prune was deleting (see `was_being_deleted`)."""
    async with contextlib.aclosing(listing):  # type: ignore[type-var]  # every backend's is a generator
        async for info in listing:
            if was_being_deleted(info.last_modified, written_at):
                yield info


@dataclass
class Survey:
    """What a prune decides on: the job's committed checkpoints (less the ranks an interrupted
    prune was deleting), which ranks store files of which checkpoint, and the interrupted prunes
    with the commit time of the rank's manifest now (None: it has none).

    For a multi-node job the committed checkpoints are the globally committed ones (jobview): one
    with parts but no global manifest is committed on no rank, as a save that stopped short is."""

    checkpoints: list[Checkpoint]
    stored_ranks: dict[str, set[int]]
    interrupted: list[tuple[Interrupted, str | None]]
    being_deleted: bool  # a whole-job delete was interrupted
    # (rank, checkpoint) of each interrupted prune -> the bytes finishing it deletes (0 when dropped)
    interrupted_bytes: dict[tuple[int, str], int] = field(default_factory=dict)
    multi_node: bool = False

    def action(self, record: Interrupted, committed_now: str | None) -> Action:
        return resume_action(record.written_at is not None, committed_now, record.committed_at)


async def survey(storage: Storage, project: str, job_id: str, ranks: Iterable[int] | None = None) -> Survey:
    """Look at the job (every rank, or only `ranks`): manifests, checkpoint folders, records.

    Only ranks' manifests when `ranks` are given: retention while training prunes one rank, which
    config.loader refuses for a multi-node job (each node would delete its share alone)."""
    wanted = None if ranks is None else sorted(set(ranks))
    pruner = Pruner(storage, project, job_id, deadline=Deadline())
    job, stored, records, job_record = await asyncio.gather(
        _view(storage, project, job_id, wanted),
        stored_ranks(storage, project, job_id, wanted),
        pruner.interrupted(wanted),
        storage.head(job_record_key(project, job_id)),
    )
    by_name = {c.name: c for c in job.committed}
    interrupted = []
    for record in records:
        holder = job.parts.get(record.checkpoint) or by_name.get(record.checkpoint)
        manifest = holder.manifests.get(record.rank) if holder is not None else None
        now = manifest["committed_at"] if manifest is not None else None
        interrupted.append((record, now))
        if job.multi_node:  # finishing it deletes the global manifest: not committed any more
            if resume_action(record.written_at is not None, now, record.committed_at) == FINISH:
                by_name.pop(record.checkpoint, None)
        elif now is not None and now == record.committed_at:  # being deleted: not committed there any more
            by_name[record.checkpoint] = _without(by_name[record.checkpoint], record.rank)
    checkpoints = [c for _, c in sorted(by_name.items()) if c.manifests or c.whole is not None]
    found_survey = Survey(checkpoints, stored, interrupted, job_record is not None, multi_node=job.multi_node)
    for record, now in interrupted:  # what finishing them deletes, counted as `resume` selects it
        size = 0
        if found_survey.action(record, now) == FINISH and record.written_at is not None:
            prefix = f"{layout.rank_prefix(project, job_id, record.rank)}{record.checkpoint}/"
            size = sum([info.size async for info in _older(storage.list(prefix), record.written_at)])
        found_survey.interrupted_bytes[record.rank, record.checkpoint] = size
    return found_survey


async def _view(storage: Storage, project: str, job_id: str, ranks: list[int] | None) -> jobview.JobView:
    if ranks is not None:
        return jobview.JobView(await browse.checkpoints(storage, project, job_id, ranks=ranks))
    return await jobview.view(storage, project, job_id)


def _without(checkpoint: Checkpoint, rank: int) -> Checkpoint:
    return Checkpoint(checkpoint.name, {r: m for r, m in checkpoint.manifests.items() if r != rank})


async def stored_ranks(
    storage: Storage, project: str, job_id: str, ranks: Iterable[int] | None = None
) -> dict[str, set[int]]:
    """checkpoint -> the ranks storing files in its folder: one folder listing per rank."""
    if ranks is None:
        names = await storage.list_dirs(layout.job_prefix(project, job_id))
        ranks = [int(m.group(1)) for n in names if (m := _RANK_DIR.fullmatch(n))]
    ranks = sorted(set(ranks))
    listed = await asyncio.gather(*(storage.list_dirs(layout.rank_prefix(project, job_id, r)) for r in ranks))
    out: dict[str, set[int]] = {}
    for rank, names in zip(ranks, listed, strict=True):
        for name in names:
            if layout.is_segment(name):
                out.setdefault(name, set()).add(rank)
    return out


async def execute(
    pruner: Pruner,
    found: Survey,
    decisions: Iterable[Decision],
    done: Callable[[Freed, Decision | None], None] = lambda freed, decision: None,
) -> list[Freed]:
    """Finish the interrupted prunes, then delete what the plan deletes, one checkpoint at a time;
    `done` hears of each (decision None: an interrupted one). Stops at the first StorageError."""
    freed = []
    for record, committed_at in found.interrupted:
        result = await pruner.resume(record, committed_at)
        if result is not None:
            freed.append(result)
            done(result, None)
    for decision in decisions:
        if decision.delete and decision.checkpoint is not None:
            c = decision.checkpoint  # every rank of it: with a manifest, or (multi-node) files the global lists
            committed = {rank: m["committed_at"] if (m := c.manifests.get(rank)) else None for rank in c.ranks}
            result = await pruner.prune(decision.name, committed)
            if result is not None:  # None: committed again since the survey, left alone
                freed.append(result)
                done(result, decision)
    return freed


def describe_record(record: Interrupted, action: Action | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"checkpoint": record.checkpoint, "rank": record.rank, "committed_at": record.committed_at}
    if action is not None:
        out["action"] = action
    return out
