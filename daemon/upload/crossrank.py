"""The cross-rank commit of a multi-node job (group size > 1): a checkpoint that several nodes saved,
each into its own folder, commits globally once every rank's share of it is stored (issue 14).

Each node commits its own share as a per-rank manifest (a "part", publish.py); any node may then
finish the commit, writing the global manifest (daemon.catalog.globalmanifest). Every node checks
right after writing a part of its own, and polls while checkpoints wait: with a store that lists
what was written before (S3 is strongly consistent), the node that writes the last part always
sees every part, so a complete checkpoint never waits for a poll. Two nodes finishing together
write the same bytes (globalmanifest.write_global).

A node holding no file of a checkpoint another rank holds the marker of says so with an `empty`
part, once quiet for `upload.quiet_commit`: without it, a job where only rank 0 saves would
never commit, and a global commit could not tell "nothing to store" from "not stored yet".
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from daemon import metrics
from daemon.catalog import layout, shards
from daemon.catalog.globalmanifest import EMPTY, PART, build_global, write_global
from daemon.catalog.manifest import build_manifest, read_manifest, write_manifest
from daemon.config import Config
from daemon.storage import ObjectInfo, Storage, StorageError
from daemon.storage.retry import Deadline, retrying
from daemon.upload.commit import is_marker
from daemon.upload.health import StoreHealth

POLL, IDLE_POLL = 2.0, 10.0  # seconds between looks at the other ranks' parts: while some wait, else
log = structlog.get_logger()


def global_ready(
    group_size: int,
    parts: Mapping[int, set[str]],
    marker_in: set[int],
    awaits_marker: bool,
    named: set[str] | None,
) -> tuple[str | None, list[str]]:
    """Whether a checkpoint commits globally now: (reason, []) or (None, what is missing).

    `parts`: rank -> the relative paths its part lists as stored; `marker_in`: the ranks whose
    part holds a completion marker; `awaits_marker`: a part holds files of a writer that writes a
    marker, but not the marker (reason `part`); `named`: the files the checkpoint's DCP
    `.metadata` files name (None when no part holds one).

    | every rank has a part | a marker in a part | awaits_marker | named | named all stored | result          |
    |-----------------------|--------------------|---------------|-------|------------------|-----------------|
    | no                    | any                | any           | any   | any              | None: the ranks |
    | yes                   | no                 | yes           | any   | any              | None: a marker  |
    | yes                   | yes, or none waits | any           | None  | -                | "ranks"         |
    | yes                   | yes                | any           | a set | no               | None: the files |
    | yes                   | yes                | any           | a set | yes              | "shards"        |

    Each rank speaks for its own share (its part), and the marker for the save as a whole. A DCP
    shard-only share is a part as soon as its shards are stored (commit.should_commit): the
    coordinator's `.metadata`, written after every rank's shards, names them all, so a share
    missing one cannot commit. A node with no file of the checkpoint says so (an `empty` part).
    """
    absent = [f"rank-{r}" for r in range(group_size) if r not in parts]
    if absent:
        return None, absent
    if awaits_marker and not marker_in:
        return None, ["the completion marker"]
    if named is None:
        return "ranks", []
    missing = sorted(named - set().union(*parts.values()))
    return ("shards", []) if not missing else (None, missing)


@dataclass
class Waiting:
    since: float  # unix time of its first part: how long the other ranks are lagging
    missing: list[str]
    ranks: list[int]
    step: int | None = None
    warned: bool = False  # the lag warning (upload.rank_lag_alert) is logged once per checkpoint


class CrossRank:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        deadline: Deadline,
        health: StoreHealth,
        has_files: Callable[[str], bool],
    ) -> None:
        self.c, self.storage, self.deadline, self.health = config, storage, deadline, health
        self.has_files = has_files  # whether this node holds (or is storing) files of a checkpoint
        self.waiting: dict[str, Waiting] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._parts: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (etag, manifest)
        self._named: dict[str, set[str] | None] = {}  # sha256 of a `.metadata` -> what it names
        self._settled: dict[str, tuple[str, ...]] = {}  # checkpoint -> etags its global was checked at
        self._absent_since: dict[str, float] = {}  # checkpoints this node has no file of (monotonic)
        metrics.RANK_LAG_THRESHOLD.set(config.rank_lag_alert)

    def wake(self) -> None:
        """A part of this node was written: another rank's may already be there."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(POLL if self.waiting else IDLE_POLL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.check()
            except StorageError as e:  # told to the store's health; the next poll tries again
                log.warning("cannot check the other ranks' parts", code=e.code, error=e.message)

    async def check(self) -> None:
        """Commit globally every checkpoint whose parts are complete; note what the others wait for."""
        async with self._lock:  # the drain's last check may come while the loop's is running
            await self._check()

    async def _check(self) -> None:
        parts, globals_ = await self._retrying(lambda: self._listing())
        for checkpoint in sorted(parts):
            infos, done = parts[checkpoint], globals_.get(checkpoint)
            seen = (tuple(sorted((r, i.etag) for r, i in infos.items())), done.etag if done else "")
            if self._settled.get(checkpoint) == seen:
                continue  # committed, and nothing changed since
            if done is not None and all(i.last_modified < done.last_modified for i in infos.values()):
                self._settled[checkpoint] = seen  # written after every part it could list
                if (waited := self.waiting.pop(checkpoint, None)) is not None:
                    _count_commit(waited.step)  # another node finished what this one waited for
                continue
            await self._one(checkpoint, {r: i.etag for r, i in infos.items()}, done is not None, seen)
        for checkpoint in set(self.waiting) - set(parts):
            del self.waiting[checkpoint]  # its parts were deleted (a prune)
        now = time.time()
        for checkpoint, w in sorted(self.waiting.items()):
            if not w.warned and now - w.since > self.c.rank_lag_alert:
                w.warned = True
                log.warning(
                    "a rank lags: a checkpoint waits for other ranks' files",
                    checkpoint=checkpoint,
                    waiting_seconds=round(now - w.since, 1),
                    missing=w.missing[:20],
                    parts=w.ranks,
                )
        metrics.GLOBAL_WAITING.set(len(self.waiting))
        metrics.GLOBAL_OLDEST_WAITING.set(max((now - w.since for w in self.waiting.values()), default=0.0))

    async def _listing(self) -> tuple[dict[str, dict[int, ObjectInfo]], dict[str, ObjectInfo]]:
        """(checkpoint -> rank -> its part, checkpoint -> its global manifest), as listed."""
        c = self.c
        prefix = layout.job_prefix(c.project, c.job_id) + "manifests/"
        parts: dict[str, dict[int, ObjectInfo]] = {}
        globals_: dict[str, ObjectInfo] = {}
        async for info in self.storage.list(prefix):
            folder, _, name = info.key[len(prefix) :].partition("/")
            checkpoint = name.removesuffix(".json")
            if not name.endswith(".json") or not layout.is_segment(checkpoint):
                continue  # '.json' is the root files' own: they never commit globally
            if folder == "global":
                globals_[checkpoint] = info
            elif folder.startswith("rank-") and folder[5:].isdigit() and int(folder[5:]) < c.group_size:
                parts.setdefault(checkpoint, {})[int(folder[5:])] = info
        return parts, globals_

    async def _one(self, checkpoint: str, etags: dict[int, str], committed: bool, seen: tuple) -> None:
        c = self.c
        parts = {rank: await self._part(checkpoint, rank, etag) for rank, etag in etags.items()}
        parts = {rank: p for rank, p in parts.items() if p is not None}
        if not parts:
            return
        others_hold_files = any(p["files"] for r, p in parts.items() if r != c.node_rank)
        if c.node_rank not in parts and not committed and others_hold_files and await self._say_empty(checkpoint):
            return  # the empty part is written: the next check (woken now) sees it
        stored = {rank: {f["path"] for f in p["files"]} for rank, p in parts.items()}
        marker_in = {rank for rank, paths in stored.items() if any(is_marker(f, c.markers) for f in paths)}
        awaits = any(p["reason"] == PART for p in parts.values())
        named = await self._named_by(parts)
        reason, missing = global_ready(c.group_size, stored, marker_in, awaits, named)
        if reason is None:
            first = min(datetime.fromisoformat(p["committed_at"]) for p in parts.values()).timestamp()
            if checkpoint not in self.waiting:
                log.info("checkpoint waits for other ranks", checkpoint=checkpoint, missing=missing[:20])
            warned = checkpoint in self.waiting and self.waiting[checkpoint].warned
            step = next((p["step"] for p in parts.values() if p["step"] is not None), None)
            self.waiting[checkpoint] = Waiting(first, missing, sorted(parts), step, warned)
            return
        manifest = build_global(c.project, c.job_id, checkpoint, c.group_size, parts, reason)
        wrote = await self._retrying(lambda: write_global(self.storage, manifest))
        if self.waiting.pop(checkpoint, None) is not None or wrote:
            _count_commit(manifest["step"])
        self._settled[checkpoint] = seen  # one more look once the listing shows the global written
        if wrote:
            log.info(
                "checkpoint committed globally",
                checkpoint=checkpoint,
                step=manifest["step"],
                reason=reason,
                ranks=sorted(parts),
                files=manifest["file_count"],
                bytes=manifest["total_bytes"],
                updated=committed,
            )

    async def _part(self, checkpoint: str, rank: int, etag: str) -> dict[str, Any] | None:
        key = layout.manifest_key(self.c.project, self.c.job_id, rank, checkpoint)
        cached = self._parts.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        try:
            part = await self._retrying(lambda: read_manifest(self.storage, key))
        except ValueError as e:  # a damaged part is no part: its rank stays missing
            log.warning("unreadable part of a checkpoint", key=key, error=str(e)[:300])
            return None
        except StorageError as e:
            if e.missing:
                return None
            raise
        self._parts[key] = (etag, part)
        return part

    async def _named_by(self, parts: Mapping[int, dict[str, Any]]) -> set[str] | None:
        """The files the checkpoint's DCP `.metadata` files name, each relative to the checkpoint
        folder (a save may hold several: HF FSDP writes one per state); None when there is none.
        One that cannot be read names a file that is never stored: the checkpoint waits."""
        entries = {f["sha256"]: f for p in parts.values() for f in p["files"] if shards.is_metadata(f["path"])}
        if not entries:
            return None
        named: set[str] = set()
        for sha, entry in sorted(entries.items()):
            if sha not in self._named:
                self._named[sha] = await self._read_metadata(entry)
            folder = entry["path"].rpartition("/")[0]
            found = self._named[sha]
            named |= {f"{folder}/{name}" for name in found} if found is not None else {f"a readable {entry['path']}"}
        return named

    async def _read_metadata(self, entry: dict[str, Any]) -> set[str] | None:
        if not 0 < entry["size"] <= shards.MAX_METADATA_BYTES:  # an empty one: S3 refuses any range of it
            data = b""
        else:
            # Ranged: the object may be bigger than its part says; the checksum then refuses it.
            data = await self._retrying(lambda: self.storage.get(entry["key"], 0, entry["size"] + 1))
        try:
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError("its bytes are not those its part lists")
            return shards.shard_files(data)
        except ValueError as e:
            log.warning("DCP metadata unreadable: the checkpoint cannot commit", key=entry["key"], error=str(e))
            return None

    async def _say_empty(self, checkpoint: str) -> bool:
        """Write this rank's `empty` part once it has held no file of the checkpoint for the quiet
        time; True if written. Files of it stored by an earlier run (their part never written) are
        not nothing: then the checkpoint waits for a part only that run's files could make."""
        c, now = self.c, time.monotonic()
        if self.has_files(checkpoint):
            self._absent_since.pop(checkpoint, None)
            return False
        since = self._absent_since.setdefault(checkpoint, now)
        if now - since < c.quiet_commit:
            return False
        prefix = layout.rank_prefix(c.project, c.job_id, c.node_rank) + checkpoint + "/"
        if await self._retrying(lambda: self.storage.has_any(prefix)):
            return False
        manifest = build_manifest(c.project, c.job_id, c.node_rank, checkpoint, [], EMPTY, {})
        await self._retrying(lambda: write_manifest(self.storage, manifest))
        log.info("empty part written: this node holds no file of the checkpoint", checkpoint=checkpoint)
        self.wake()
        return True

    def status(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC).timestamp()
        return [
            {"checkpoint": cp, "waiting_seconds": round(now - w.since, 3), "parts": w.ranks, "missing": w.missing[:20]}
            for cp, w in sorted(self.waiting.items(), key=lambda kv: kv[1].since)
        ]

    async def _retrying(self, call):
        return await retrying(call, deadline=self.deadline, observe=self.health.observe)


def _count_commit(step: int | None) -> None:
    """A checkpoint this node holds a part of (or completed) is committed: in a multi-node job,
    these are the commit metrics (publish.py leaves them to this module)."""
    metrics.GLOBAL_COMMITTED.inc()
    metrics.COMMITTED.inc()
    metrics.LAST_COMMIT_TIME.set(time.time())
    if step is not None:
        metrics.LAST_COMMITTED_STEP.set(step)
