"""The upload queue: completed, pinned files waiting for a worker, in flight, or failed.

Two lanes so small files are never stuck behind a large one; one entry per path (a newer version
replaces a queued older one); never two uploads of the same path at once, so an older version can
never land after a newer one. Failed jobs wait here for the next scan to queue them again: the
queue holds every complete file not yet stored.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from daemon.storage import StorageError
from daemon.upload.pin import Pin

SMALL, LARGE = "small", "large"


@dataclass
class Job:
    pin: Pin
    key: str
    complete_at: float = field(default_factory=time.monotonic)  # for the upload-lag histogram

    @property
    def relpath(self) -> str:
        return self.pin.relpath

    @property
    def size(self) -> int:
        return self.pin.identity.size


class UploadQueue:
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._lanes: dict[str, dict[str, Job]] = {SMALL: {}, LARGE: {}}
        self._in_flight: dict[str, Job] = {}
        self._failed: dict[str, tuple[Job, StorageError]] = {}
        self._changed = asyncio.Event()

    def lane_of(self, job: Job) -> str:
        return SMALL if job.size < self.threshold else LARGE

    def put(self, job: Job) -> Job | None:
        """Queue a job; return the older queued or failed version of the same path it replaced."""
        failed = self._failed.pop(job.relpath, None)
        replaced = failed[0] if failed else None
        for lane in self._lanes.values():
            replaced = lane.pop(job.relpath, None) or replaced
        self._lanes[self.lane_of(job)][job.relpath] = job
        self._changed.set()
        return replaced

    async def get(self, lane: str) -> Job:
        """The oldest job of the lane whose path is not being uploaded right now."""
        while True:
            for relpath, job in self._lanes[lane].items():
                if relpath not in self._in_flight:
                    del self._lanes[lane][relpath]
                    self._in_flight[relpath] = job
                    return job
            self._changed.clear()
            await self._changed.wait()

    def done(self, job: Job) -> None:
        self._in_flight.pop(job.relpath, None)
        self._changed.set()

    def fail(self, job: Job, error: StorageError) -> None:
        """Park a job whose upload was given up on, until `retry_failed` (a later scan)."""
        self._failed[job.relpath] = (job, error)

    def retry_failed(self) -> int:
        """Queue every failed job again (unless a newer version is queued); return how many."""
        again = [job for job, _ in self._failed.values() if not self.queued(job.relpath)]
        for job in again:
            self.put(job)
        return len(again)

    def failures(self) -> list[tuple[Job, StorageError]]:
        return list(self._failed.values())

    def known(self, relpath: str) -> bool:
        """Queued, in flight or failed: a scan need not report it again."""
        return self.queued(relpath) or relpath in self._failed

    def queued(self, relpath: str) -> bool:
        return relpath in self._in_flight or any(relpath in lane for lane in self._lanes.values())

    def uploading(self, relpath: str) -> Job | None:
        return self._in_flight.get(relpath)

    def in_flight(self) -> list[str]:
        return list(self._in_flight)

    def jobs(self) -> list[Job]:
        """Jobs queued or in flight."""
        return [*self._in_flight.values(), *(j for lane in self._lanes.values() for j in lane.values())]

    def pending(self) -> list[Job]:
        """Every complete file not yet stored: queued, in flight, or failed and waiting for a retry."""
        return [*self.jobs(), *(job for job, _ in self._failed.values())]

    def empty(self) -> bool:
        return not self._in_flight and not any(self._lanes.values())
