"""Read-only views of the uploader: its part of GET /status and /readyz, and the scraped backlog.

Built from the components it reports on, passed in explicitly; the status server sees only the
small protocol it needs (`not_ready`, `status`), never the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from daemon.files import free_bytes
from daemon.metrics import Backlog
from daemon.storage.retry import Deadline
from daemon.upload.commit import CheckpointTracker
from daemon.upload.crossrank import CrossRank
from daemon.upload.detect import Detector
from daemon.upload.health import StoreHealth
from daemon.upload.journal import Journal
from daemon.upload.queue import UploadQueue
from daemon.upload.settle import Settler
from daemon.upload.tasks import Tasks
from daemon.upload.worker import Uploader

LISTED = 20  # a status page, not a dump


class UploadStatus:
    def __init__(
        self,
        *,
        root: str,
        storage_url: str,
        queue: UploadQueue,
        settler: Settler,
        tracker: CheckpointTracker,
        uploader: Uploader,
        health: StoreHealth,
        detector: Detector,
        deadline: Deadline,
        tasks: Tasks,
        journal: Journal,
        unlistable: Callable[[], dict[str, str]],
        crossrank: CrossRank | None = None,
    ) -> None:
        self.root, self.storage_url, self.queue, self.settler, self.tracker = root, storage_url, queue, settler, tracker
        self.uploader, self.health, self.detector, self.deadline = uploader, health, detector, deadline
        self.tasks, self.journal, self.unlistable = tasks, journal, unlistable
        self.crossrank = crossrank

    def backlog(self) -> Backlog:
        """Complete files not yet stored: queued, in flight, or failed and waiting for a retry."""
        jobs, now = self.queue.pending(), time.monotonic()
        try:
            free = free_bytes(self.root)
        except OSError:  # the folder is gone or unreadable: a scrape must still answer
            free = 0
        return Backlog(
            len(jobs),
            sum(j.size for j in jobs),
            max((now - j.complete_at for j in jobs), default=0.0),
            free,
        )

    def not_ready(self) -> list[str]:
        return [*self.health.not_ready(), *self.journal.not_ready(), *self.tasks.not_ready()]

    def status(self) -> dict[str, Any]:
        backlog, last = self.backlog(), self.tracker.last_commit
        return {
            "pending_files": backlog.files,
            "pending_bytes": backlog.bytes,
            "oldest_pending_age_seconds": backlog.oldest_age,
            "in_flight": sorted(self.queue.in_flight())[:LISTED],
            "failed": [
                {"path": job.relpath, "code": e.code, "message": e.message[:300]}
                for job, e in self.queue.failures()[:LISTED]
            ],
            "still_being_written": self.settler.still_writing()[:LISTED],
            "failing_files": dict(sorted({**self.settler.failures(), **self.unlistable()}.items())[:LISTED]),
            "uploaded_files": self.uploader.stored_count,
            "last_errors": list(self.health.recent),
            "last_commit": {"checkpoint": last.checkpoint, "reason": last.reason} if last else None,
            "uncommitted": self.tracker.uncommitted()[:LISTED],
            # Multi-node jobs: checkpoints whose parts on other ranks are missing, oldest first.
            "waiting_for_ranks": self.crossrank.status()[:LISTED] if self.crossrank else [],
            "unstorable": self.tracker.unstorable_files()[:LISTED],
            "watch_mode": self.detector.mode,
            "watch_degraded": self.detector.degraded_reason,
            "storage": self.storage_url,
            "storage_reachable": self.health.reachable,
            "draining": self.deadline.is_set,
            "journal": {
                "error": self.journal.error,
                "unsaved_records": self.journal.unsaved,
                "set_aside": self.journal.set_aside,
            },
        }
