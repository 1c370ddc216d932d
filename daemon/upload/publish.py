"""Publishing what others read: commit manifests (restore's source of truth) and job metadata.

Writes are serialised: the committer loop and the drain must not write one manifest twice, and
an old RUNNING status must never land after the final one.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable

import structlog

from daemon import metrics
from daemon.catalog import jobmeta, layout
from daemon.catalog.layout import ROOT_CHECKPOINT
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.config import Config
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying
from daemon.upload import reconcile
from daemon.upload.commit import CheckpointTracker
from daemon.upload.complete import Identity, is_ignored
from daemon.upload.health import StoreHealth
from daemon.upload.scan import walk
from daemon.upload.statedir import is_state

REUPLOADS = 3  # times one checkpoint's lost files are uploaded again in a run before it is held
log = structlog.get_logger()


class Publisher:
    def __init__(
        self, config: Config, storage: Storage, tracker: CheckpointTracker, deadline: Deadline, health: StoreHealth
    ) -> None:
        self.c, self.storage, self.tracker, self.deadline, self.health = config, storage, tracker, deadline, health
        self._wake = asyncio.Event()
        # Held while a manifest is written or deleted; retention holds it while it deletes a
        # checkpoint, so that no manifest lands between the prune's and the files' deletions.
        self.commit_lock = asyncio.Lock()
        self._metadata_lock = asyncio.Lock()
        self._unprovable: set[str] = set()  # warned about once
        self._reuploads: dict[str, int] = {}  # checkpoint -> times its lost files went back to intake
        self.on_commit: Callable[[str], None] | None = None  # told each checkpoint committed (retention)
        self.on_part: Callable[[], None] | None = None  # told each manifest written (crossrank.py)
        # Given the stored files the store lost (not pruned): drops their stored records and
        # queues them again (Intake.again). Without it they wait for the next start.
        self.on_lost: Callable[[list[StoredFile]], Awaitable[None]] | None = None

    def wake(self) -> None:
        """A file was stored: a checkpoint may be complete."""
        self._wake.set()

    async def run(self) -> None:
        """Commit whatever is due, on every stored file and at least once a second (quiet commits)."""
        while True:
            try:
                # Not wait_for: on Python 3.11 it can swallow a cancel that lands as the event fires.
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.commit_due(final=False)

    async def commit_due(self, final: bool) -> None:
        async with self.commit_lock:
            for checkpoint, reason in self.tracker.due(time.monotonic(), final=final):
                if self.tracker.is_unproven(checkpoint) and not await self._prove(checkpoint):
                    continue
                await self._commit(checkpoint, reason)

    async def _prove(self, checkpoint: str) -> bool:
        """Whether the checkpoint's local folder holds exactly the files stored for it (same paths,
        same sizes), and the store still holds them all: only then may a checkpoint whose files
        were not all seen arriving commit. A folder rotated away while ckptd was down can never be
        proven: stored, never committed."""
        stored = {f.relpath: f.size for f in self.tracker.files(checkpoint)}
        local = await asyncio.to_thread(local_files, self.c.checkpoint_dir, checkpoint, self.c.ignore_patterns)
        if local != stored:
            if checkpoint not in self._unprovable:
                self._unprovable.add(checkpoint)
                log.warning(
                    "checkpoint not committed: its folder does not hold exactly what is stored",
                    checkpoint=checkpoint,
                    missing_locally=sorted(set(stored) - set(local or {}))[:20],
                    not_stored=sorted(set(local or {}) - set(stored))[:20],
                )
            return False
        if not await self._in_store(checkpoint):
            return False
        self.tracker.proven(checkpoint)
        return True

    async def _in_store(self, checkpoint: str) -> bool:
        """Whether the store holds every file the manifest would list (an earlier run stored
        them; a prune, or a person, may have deleted them since): see daemon.upload.reconcile."""
        c, files, until, observe = self.c, self.tracker.files(checkpoint), self.deadline, self.health.observe
        try:
            if checkpoint == ROOT_CHECKPOINT:  # never pruned: reconcile.check would ask for its tombstone
                missing = await reconcile.absent(self.storage, files, deadline=until, observe=observe)
                outcome = reconcile.decide(all_present=not missing, pruned=False)
            else:
                outcome, missing = await reconcile.check(
                    self.storage, c.project, c.job_id, c.node_rank, checkpoint, files, deadline=until, observe=observe
                )
        except StorageError as e:
            log.error(
                "checkpoint not committed: its stored files could not be checked",
                checkpoint=checkpoint,
                op=e.op,
                key=e.key,
                code=e.code,
                error=e.message,
            )
            return False
        if outcome is reconcile.Outcome.COMMIT:
            return True
        if outcome is reconcile.Outcome.REUPLOAD and await self._reupload(checkpoint, missing):
            return False
        self.tracker.held(checkpoint, pruned=outcome is reconcile.Outcome.FORGET)
        if outcome is reconcile.Outcome.FORGET:
            log.info("pruned checkpoint not committed again", checkpoint=checkpoint, files=len(files))
        else:  # the next start uploads them again (daemon.upload.recover)
            log.error(
                "checkpoint not committed: the store lost files of it",
                checkpoint=checkpoint,
                missing=[f.key for f in missing][:20],
                count=len(missing),
            )
        return False

    async def _reupload(self, checkpoint: str, missing: list[StoredFile]) -> bool:
        """Hand the lost files back to intake, so that the checkpoint commits in this run once they
        are stored again (and the store checked again); False when there is no hook, or this
        checkpoint used up its REUPLOADS (a store that keeps losing them): then it is held."""
        tries = self._reuploads.get(checkpoint, 0)
        if self.on_lost is None or tries >= REUPLOADS:
            return False
        self._reuploads[checkpoint] = tries + 1
        log.warning(
            "the store lost stored files of a checkpoint: uploading them again",
            checkpoint=checkpoint,
            keys=[f.key for f in missing][:20],
            count=len(missing),
            attempt=tries + 1,
        )
        await self.on_lost(missing)
        return True

    async def _commit(self, checkpoint: str, reason: str) -> None:
        c, files = self.c, self.tracker.files(checkpoint)
        manifest = build_manifest(
            c.project, c.job_id, c.node_rank, checkpoint, files, reason, self.tracker.metrics(checkpoint)
        )
        try:
            stored = await self._retrying(lambda: write_manifest(self.storage, manifest))
        except StorageError as e:
            log.error("commit failed", checkpoint=checkpoint, code=e.code, error=e.message)
            return
        step, committed_at = stored["step"], stored["committed_at"]
        if not self.tracker.committed(checkpoint, time.monotonic(), step=step, committed_at=committed_at):
            return  # a file changed while the manifest was written: it comes due again
        self._reuploads.pop(checkpoint, None)
        if self.on_part is not None:
            self.on_part()
        if c.group_size > 1 and checkpoint != ROOT_CHECKPOINT:  # a share: crossrank.py commits the whole
            log.info(
                "checkpoint part stored",
                checkpoint=checkpoint,
                reason=reason,
                files=len(files),
                bytes=manifest["total_bytes"],
            )
            return
        metrics.COMMITTED.inc()
        metrics.LAST_COMMIT_TIME.set(time.time())
        if step is not None:
            metrics.LAST_COMMITTED_STEP.set(step)
        if self.on_commit is not None:
            self.on_commit(checkpoint)
        log.info(
            "checkpoint committed",
            checkpoint=checkpoint,
            reason=reason,
            files=len(files),
            bytes=manifest["total_bytes"],
            step=step,
        )

    async def withdraw(self, relpath: str) -> None:
        """Delete the manifest naming `relpath` before its object is overwritten by a new version,
        so that no committed manifest ever names bytes it does not describe: "latest" falls back
        to the previous checkpoint until this one commits again. Raises StorageError, and then
        the overwrite must not happen either."""
        c, checkpoint = self.c, layout.checkpoint_of(relpath)
        async with self.commit_lock:  # not while the same manifest is being written
            if not self.tracker.listed(relpath):
                return
            key = layout.manifest_key(c.project, c.job_id, c.node_rank, checkpoint)
            if c.group_size > 1 and checkpoint != ROOT_CHECKPOINT:  # the global one lists it too, first
                whole = layout.global_key(c.project, c.job_id, checkpoint)
                await self._retrying(lambda: self.storage.delete(whole))
            await self._retrying(lambda: self.storage.delete(key))
            self.tracker.withdrawn(checkpoint)
        log.info("manifest withdrawn until the changed file is stored", checkpoint=checkpoint, path=relpath)

    async def job_status(self, status: str, exit_code: int | None, **extra: object) -> None:
        """Write job metadata and this rank's status; a failure is logged and told to the store's health."""
        c, last = self.c, self.tracker.last_commit
        last_commit = (
            None
            if last is None
            else {
                "checkpoint": last.checkpoint,
                "step": last.step,
                "committed_at": last.committed_at,
            }
        )
        async with self._metadata_lock:
            try:
                await self._retrying(lambda: jobmeta.ensure_job(self.storage, c.project, c.job_id, c.group_size))
                await self._retrying(
                    lambda: jobmeta.write_rank_status(
                        self.storage,
                        c.project,
                        c.job_id,
                        c.node_rank,
                        status=status,
                        exit_code=exit_code,
                        last_commit=last_commit,
                        **extra,
                    )
                )
            except StorageError as e:
                log.error("job metadata not written", code=e.code, error=e.message, status=status)
                self.health.failed(e)

    async def _retrying(self, call):
        return await retrying(call, deadline=self.deadline, observe=self.health.observe)


def local_files(root: str, checkpoint: str, ignore: tuple[str, ...]) -> dict[str, int] | None:
    """relpath -> size of every storable file of `checkpoint` in the checkpoint folder now, or None
    if its folder is gone (blocking). Links and special files are not files of it."""
    folder = root if checkpoint == ROOT_CHECKPOINT else os.path.join(root, checkpoint)
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
    except OSError:
        return None
    paths = walk(root, folder, is_state) if checkpoint != ROOT_CHECKPOINT else _top_files(root)
    found = {}
    for path in paths:
        relpath = os.path.relpath(path, root)
        if layout.checkpoint_of(relpath) != checkpoint or is_ignored(relpath, ignore):
            continue
        identity = Identity.stat(path)
        if identity is not None:
            found[relpath] = identity.size
    return found


def _top_files(root: str) -> list[str]:
    with os.scandir(root) as it:
        return [e.path for e in it if e.is_file(follow_symlinks=False)]
