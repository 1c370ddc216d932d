"""Publishing what others read: commit manifests (restore's source of truth) and job metadata.

Writes are serialised: the committer loop and the drain must not write one manifest twice, and
an old RUNNING status must never land after the final one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from daemon import metrics
from daemon.catalog import jobmeta
from daemon.upload.commit import CheckpointTracker
from daemon.config import Config
from daemon.catalog.manifest import build_manifest, write_manifest
from daemon.storage.retry import retrying
from daemon.storage import Storage, StorageError

log = structlog.get_logger()


class Publisher:
    def __init__(self, config: Config, storage: Storage, tracker: CheckpointTracker,
                 deadline: Callable[[], float | None],
                 observe: Callable[[StorageError | None], None] | None = None) -> None:  # fmt: skip
        self.c, self.storage, self.tracker, self.deadline, self.observe = config, storage, tracker, deadline, observe
        self._wake = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._metadata_lock = asyncio.Lock()

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
        async with self._commit_lock:
            for checkpoint, reason in self.tracker.due(time.monotonic(), final=final):
                await self._commit(checkpoint, reason)

    async def _commit(self, checkpoint: str, reason: str) -> None:
        files = self.tracker.files(checkpoint)
        manifest = build_manifest(self.c.project, self.c.job_id, self.c.node_rank, checkpoint, files, reason,
                                  self.tracker.metrics(checkpoint))  # fmt: skip
        try:
            await retrying(lambda: write_manifest(self.storage, manifest), deadline=self.deadline,
                           observe=self.observe)
        except StorageError as e:
            log.error("commit failed", checkpoint=checkpoint, code=e.code, error=e.message)
            return
        if not self.tracker.committed(checkpoint, time.monotonic()):
            return  # a file changed while the manifest was written: it comes due again
        metrics.COMMITTED.inc()
        metrics.LAST_COMMIT_TIME.set(time.time())
        if manifest.get("step") is not None:
            metrics.LAST_COMMITTED_STEP.set(manifest["step"])
        log.info("checkpoint committed", checkpoint=checkpoint, reason=reason, files=len(files),
                 bytes=manifest["total_bytes"], step=manifest.get("step"))  # fmt: skip

    async def job_status(self, status: str, exit_code: int | None, **extra: object) -> StorageError | None:
        """Write job metadata and this rank's status; return the error if it could not be written."""
        c = self.c
        last = self.tracker.last_commit
        async with self._metadata_lock:
            try:
                await retrying(lambda: jobmeta.ensure_job(self.storage, c.project, c.job_id, c.group_size),
                               deadline=self.deadline, observe=self.observe)  # fmt: skip
                await retrying(lambda: jobmeta.write_rank_status(
                    self.storage, c.project, c.job_id, c.node_rank, status=status, exit_code=exit_code,
                    last_commit={"checkpoint": last.checkpoint, "reason": last.reason} if last else None, **extra,
                ), deadline=self.deadline, observe=self.observe)  # fmt: skip
            except StorageError as e:
                log.error("job metadata not written", code=e.code, error=e.message, status=status)
                return e
        return None
