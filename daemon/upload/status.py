"""Read-only views of a running engine: GET /status, and the gauges computed when scraped."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from daemon import metrics

if TYPE_CHECKING:
    from daemon.upload.engine import Engine


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def pending(engine: Engine) -> dict:
    """Complete files not yet stored: queued, in flight, or failed and waiting for a retry."""
    jobs = [*engine.queue.jobs(), *(job for job, _ in engine.failed.values())]
    now = time.monotonic()
    return {"pending_files": len(jobs), "pending_bytes": sum(j.size for j in jobs),
            "oldest_pending_age_seconds": max((now - j.complete_at for j in jobs), default=0.0)}  # fmt: skip


def register_gauges(engine: Engine) -> None:
    # Computed when scraped, from the queue itself: nothing to keep in step, nothing to drift.
    metrics.PENDING_FILES.set_function(lambda: pending(engine)["pending_files"])
    metrics.PENDING_BYTES.set_function(lambda: pending(engine)["pending_bytes"])
    metrics.OLDEST_PENDING_AGE.set_function(lambda: pending(engine)["oldest_pending_age_seconds"])
    metrics.CHECKPOINT_DIR_FREE.set_function(lambda: free_bytes(engine.root))


def status(engine: Engine) -> dict:
    """The engine's part of GET /status (lists bounded: a status page, not a dump)."""
    last = engine.tracker.last_commit
    detector = engine.detector
    return {
        **pending(engine),
        "in_flight": sorted(engine.queue.in_flight())[:20],
        "failed": [{"path": p, "code": e.code, "message": e.message[:300]}
                   for p, (_, e) in list(engine.failed.items())[:20]],  # fmt: skip
        "still_being_written": engine.settler.still_writing()[:20],
        "uploaded_files": engine.stored_count,
        "last_errors": list(engine.recent_errors),
        "last_commit": {"checkpoint": last.checkpoint, "reason": last.reason} if last else None,
        "uncommitted": engine.tracker.uncommitted()[:20],
        "watch_mode": detector.mode if detector else None,
        "watch_degraded": detector.degraded_reason if detector else None,
        "storage": engine.storage.url,
        "storage_reachable": engine.storage_reachable,
        "draining": engine.drain_deadline is not None,
    }
