"""Uploaded → recorded: workers take jobs off the queue, transfer them, record what was stored.

One summary line per upload. A storage failure parks the job in the queue's failed set (the next
scan retries it); a file that changed while it was read goes back to the settler as new.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import structlog

from daemon import metrics
from daemon.catalog.layout import checkpoint_of
from daemon.catalog.manifest import StoredFile, is_trainer_state, metrics_from_trainer_state
from daemon.storage import StorageError
from daemon.storage.retry import Deadline
from daemon.upload import journal as jr
from daemon.upload.commit import CheckpointTracker
from daemon.upload.health import StoreHealth
from daemon.upload.pin import Pin
from daemon.upload.queue import Job, UploadQueue
from daemon.upload.transfer import Changed, Transfer

log = structlog.get_logger()
TRAINER_STATE_LIMIT = 16 << 20  # bytes of trainer_state.json read for metrics


class Uploader:
    def __init__(
        self,
        *,
        queue: UploadQueue,
        transfer: Transfer,
        journal: jr.Journal,
        tracker: CheckpointTracker,
        health: StoreHealth,
        deadline: Deadline,
        committed: Callable[[], None],
        renotice: Callable[[str], None],
        withdraw: Callable[[str], Awaitable[None]],
    ) -> None:
        """`committed` wakes the publisher; `renotice(relpath)` hands a changed file back to settling;
        `withdraw(relpath)` deletes a committed manifest naming the file before it is overwritten."""
        self.queue, self.transfer, self.journal, self.tracker = queue, transfer, journal, tracker
        self.health, self.deadline, self.wake_publisher, self.renotice = health, deadline, committed, renotice
        self.withdraw = withdraw
        self.stored_count = 0

    async def run(self, lane: str) -> None:
        while True:
            job = await self.queue.get(lane)
            try:
                await self._upload(job)
            except Exception as e:  # a bug or a local failure: this file fails, the worker goes on
                log.exception("upload failed unexpectedly", path=job.relpath, key=job.key)
                self._failed(job, StorageError("upload", job.key, "LocalError", repr(e)[:300], transient=True))
            finally:
                self.queue.done(job)

    async def _upload(self, job: Job) -> None:
        started = time.monotonic()
        try:
            await self.withdraw(job.relpath)
            stored = await self.transfer.upload(job.pin, job.key)
        except StorageError as e:
            self._failed(job, e)
            return
        except (Changed, OSError) as e:
            if job.pin.current() == job.pin.identity and not isinstance(e, Changed):
                self._failed(job, StorageError("read", job.key, "ReadError", str(e), transient=False))
                return
            log.info("changed while uploading; the new version follows", path=job.relpath)
            jr.release(self.journal, job.pin)
            self.renotice(job.relpath)
            return
        self.journal.record("stored", stored)
        await self._stored(job, stored, time.monotonic() - started)

    async def _stored(self, job: Job, stored: jr.Stored, seconds: float) -> None:
        now = time.monotonic()
        metrics.UPLOAD_LAG.observe(now - job.complete_at)
        metrics.UPLOADED_FILES.inc()
        metrics.UPLOADED_BYTES.inc(job.size)
        self.stored_count += 1
        self.health.stored()
        if is_trainer_state(job.relpath):
            self.tracker.set_metrics(checkpoint_of(job.relpath), await asyncio.to_thread(_read_metrics, job.pin))
        jr.release(self.journal, job.pin)
        self.tracker.stored(StoredFile(job.relpath, job.size, stored.sha256, stored.key, stored.etag), now)
        self.wake_publisher()
        log.info(
            "uploaded",
            path=job.relpath,
            key=job.key,
            bytes=job.size,
            seconds=round(seconds, 3),
            mb_per_s=round(job.size / max(seconds, 1e-6) / 1e6, 1),
        )

    def _failed(self, job: Job, e: StorageError) -> None:
        metrics.UPLOAD_FAILURES.labels(reason=e.code).inc()
        self.queue.fail(job, e)
        self.health.failed(e)
        log.error(
            "upload failed",
            path=job.relpath,
            key=job.key,
            code=e.code,
            error=e.message,
            transient=e.transient,
            retry="no" if self.deadline.is_set else "at next scan",
        )


def _read_metrics(pin: Pin) -> dict:
    fd = pin.open()
    try:
        return metrics_from_trainer_state(os.pread(fd, TRAINER_STATE_LIMIT, 0))
    finally:
        os.close(fd)
