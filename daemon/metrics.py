"""Every metric of SPEC §6, declared once against one registry.

Label values are bounded: error classes and S3 error codes, never paths or keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# Sub-second (small files on a fast store) to an hour (a store down for a while).
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

INFO = Gauge(
    "ckptd_info", "ckptd build and identity; always 1", ["version", "project", "job_id", "rank"], registry=REGISTRY
)
UPLOAD_LAG = Histogram(
    "ckptd_upload_lag_seconds",
    "Time from a file being complete to it being durably stored",
    buckets=LAG_BUCKETS,
    registry=REGISTRY,
)
UPLOADED_FILES = Counter("ckptd_uploaded_files", "Files stored", registry=REGISTRY)
UPLOADED_BYTES = Counter("ckptd_uploaded_bytes", "Bytes stored", registry=REGISTRY)
UPLOAD_RETRIES = Counter(
    "ckptd_upload_retries", "Storage requests retried, by error code", ["reason"], registry=REGISTRY
)
UPLOAD_FAILURES = Counter("ckptd_upload_failures", "Uploads given up, by error code", ["reason"], registry=REGISTRY)
FILES_SKIPPED = Counter(
    "ckptd_files_skipped", "Files not uploaded: ignored, unchanged, vanished, ...", ["reason"], registry=REGISTRY
)
PIN_FALLBACKS = Counter(
    "ckptd_pin_fallbacks",
    "Files pinned without a staging hard link (another file system): copied, or held by descriptor",
    ["how"],
    registry=REGISTRY,
)
STATE_WRITE_ERRORS = Counter(
    "ckptd_state_write_errors",
    "Failed writes of the daemon's own journal, by errno name",
    ["reason"],
    registry=REGISTRY,
)
TASK_RESTARTS = Counter(
    "ckptd_task_restarts", "Background tasks restarted after ending unexpectedly", ["task"], registry=REGISTRY
)
RESCAN_FOUND = Counter("ckptd_rescan_found_files", "Files found by a scan, not by an event", registry=REGISTRY)
COMMITTED = Counter("ckptd_checkpoints_committed", "Checkpoints committed", registry=REGISTRY)
LAST_COMMIT_TIME = Gauge("ckptd_last_commit_timestamp_seconds", "Unix time of the last commit", registry=REGISTRY)
LAST_COMMITTED_STEP = Gauge("ckptd_last_committed_step", "Step of the last committed checkpoint", registry=REGISTRY)
GLOBAL_COMMITTED = Counter(
    "ckptd_global_commits",
    "Checkpoints of a multi-node job committed globally (every rank's part stored) that this node took part in",
    registry=REGISTRY,
)
GLOBAL_WAITING = Gauge(
    "ckptd_checkpoints_waiting_for_ranks",
    "Checkpoints of a multi-node job with parts stored that wait for other ranks' parts",
    registry=REGISTRY,
)
GLOBAL_OLDEST_WAITING = Gauge(
    "ckptd_oldest_waiting_for_ranks_age_seconds",
    "Age of the oldest checkpoint waiting for other ranks' parts, since its first part (0 when none)",
    registry=REGISTRY,
)
RANK_LAG_THRESHOLD = Gauge(
    "ckptd_rank_lag_threshold_seconds",
    "upload.rank_lag_alert of a multi-node job (0 otherwise): CkptdRankLagging fires when "
    "ckptd_oldest_waiting_for_ranks_age_seconds passes it",
    registry=REGISTRY,
)
RESTORE_BYTES = Counter("ckptd_restore_bytes", "Bytes restored", registry=REGISTRY)
RESTORE_FILES = Counter("ckptd_restore_files", "Files restored", registry=REGISTRY)
RESTORE_DURATION = Gauge("ckptd_restore_duration_seconds", "Duration of the last restore", registry=REGISTRY)
PRUNED_CHECKPOINTS = Counter(
    "ckptd_pruned_checkpoints", "Checkpoints deleted from storage by the retention policy", registry=REGISTRY
)
PRUNED_BYTES = Counter("ckptd_pruned_bytes", "Bytes deleted from storage by the retention policy", registry=REGISTRY)
TRAINER_RUNNING = Gauge("ckptd_trainer_running", "1 while the start commands run", registry=REGISTRY)


@dataclass(frozen=True)
class Backlog:
    """What the uploader has not stored yet, and the room left to write checkpoints."""

    files: int = 0
    bytes: int = 0
    oldest_age: float = 0.0  # seconds since the oldest of them was complete
    free_bytes: int = 0


class BacklogCollector(Collector):
    """Gauges computed when scraped, from the upload queue itself: nothing to keep in step, nothing
    to drift. Zeros until the upload engine attaches its source."""

    _GAUGES = (
        ("ckptd_pending_files", "Complete files not yet stored", "files"),
        ("ckptd_pending_bytes", "Bytes of complete files not yet stored", "bytes"),
        (
            "ckptd_oldest_pending_age_seconds",
            "Age of the oldest complete file not yet stored (0 when none)",
            "oldest_age",
        ),
        ("ckptd_checkpoint_dir_free_bytes", "Free bytes where checkpoints are written", "free_bytes"),
    )

    def __init__(self) -> None:
        self.source: Callable[[], Backlog] | None = None

    def attach(self, source: Callable[[], Backlog] | None) -> None:
        self.source = source

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, help_text, _ in self._GAUGES:
            yield GaugeMetricFamily(name, help_text)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        backlog = self.source() if self.source is not None else Backlog()
        for name, help_text, field in self._GAUGES:
            yield GaugeMetricFamily(name, help_text, value=float(getattr(backlog, field)))


BACKLOG = BacklogCollector()
REGISTRY.register(BACKLOG)
