"""Every metric of SPEC §6, declared once against one registry.

Label values are bounded: error classes and S3 error codes, never paths or keys.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# Sub-second (small files on a fast store) to an hour (a store down for a while).
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

INFO = Gauge("ckptd_info", "ckptd build and identity; always 1", ["version", "project", "job_id", "rank"],
             registry=REGISTRY)  # fmt: skip
UPLOAD_LAG = Histogram("ckptd_upload_lag_seconds", "Time from a file being complete to it being durably stored",
                       buckets=LAG_BUCKETS, registry=REGISTRY)  # fmt: skip
OLDEST_PENDING_AGE = Gauge("ckptd_oldest_pending_age_seconds",
                           "Age of the oldest complete file not yet stored (0 when none)", registry=REGISTRY)
PENDING_FILES = Gauge("ckptd_pending_files", "Complete files not yet stored", registry=REGISTRY)
PENDING_BYTES = Gauge("ckptd_pending_bytes", "Bytes of complete files not yet stored", registry=REGISTRY)
UPLOADED_FILES = Counter("ckptd_uploaded_files", "Files stored", registry=REGISTRY)
UPLOADED_BYTES = Counter("ckptd_uploaded_bytes", "Bytes stored", registry=REGISTRY)
UPLOAD_RETRIES = Counter("ckptd_upload_retries", "Storage requests retried, by error code", ["reason"],
                         registry=REGISTRY)  # fmt: skip
UPLOAD_FAILURES = Counter("ckptd_upload_failures", "Uploads given up, by error code", ["reason"],
                          registry=REGISTRY)  # fmt: skip
FILES_SKIPPED = Counter("ckptd_files_skipped", "Files not uploaded: ignored, unchanged, vanished, ...", ["reason"],
                        registry=REGISTRY)  # fmt: skip
RESCAN_FOUND = Counter("ckptd_rescan_found_files", "Files found by a scan, not by an event", registry=REGISTRY)
COMMITTED = Counter("ckptd_checkpoints_committed", "Checkpoints committed", registry=REGISTRY)
LAST_COMMIT_TIME = Gauge("ckptd_last_commit_timestamp_seconds", "Unix time of the last commit", registry=REGISTRY)
LAST_COMMITTED_STEP = Gauge("ckptd_last_committed_step", "Step of the last committed checkpoint",
                            registry=REGISTRY)  # fmt: skip
RESTORE_BYTES = Counter("ckptd_restore_bytes", "Bytes restored", registry=REGISTRY)
RESTORE_FILES = Counter("ckptd_restore_files", "Files restored", registry=REGISTRY)
RESTORE_DURATION = Gauge("ckptd_restore_duration_seconds", "Duration of the last restore", registry=REGISTRY)
CHECKPOINT_DIR_FREE = Gauge("ckptd_checkpoint_dir_free_bytes", "Free bytes where checkpoints are written",
                            registry=REGISTRY)  # fmt: skip
TRAINER_RUNNING = Gauge("ckptd_trainer_running", "1 while the start commands run", registry=REGISTRY)
