"""The upload engine: detected → complete → pinned → queued → uploaded → recorded → committed.

Lifecycle as named awaitables: `startup()`, `serve(stop)`, `shutdown()`; `run(stop)` is the three.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from daemon import metrics, priority
from daemon.upload import diskpressure
from daemon.catalog import layout
from daemon.upload import recover
from daemon.upload import status as views
from daemon.upload import journal as jr
from daemon.upload.commit import CheckpointTracker, StoredFile
from daemon.upload.complete import Identity, is_marker
from daemon.config import Config
from daemon.upload.detect import Detector
from daemon.upload.scan import scan
from daemon.catalog.manifest import metrics_from_trainer_state
from daemon.upload.publish import Publisher
from daemon.upload.pin import Pin
from daemon.upload.queue import LARGE, SMALL, Job, UploadQueue
from daemon.upload.settle import Settler
from daemon.storage import Storage, StorageError
from daemon.upload.throttle import Throttle
from daemon.upload.transfer import Changed, Transfer

STATE_DIR = ".ckptd"  # inside the checkpoint folder: same file system, so staging can hard-link
log = structlog.get_logger()


@dataclass
class Report:
    """What a drain achieved; `ok` means every complete file is stored."""

    stored: int = 0
    not_stored: list[str] = field(default_factory=list)
    still_writing: list[str] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.not_stored


class Engine:
    def __init__(self, config: Config, storage: Storage) -> None:
        self.c, self.storage = config, storage
        self.root = config.checkpoint_dir
        self.staging = os.path.join(self.root, STATE_DIR, f"staging-rank-{config.node_rank}")
        self.journal = jr.Journal(os.path.join(self.root, STATE_DIR, f"journal-rank-{config.node_rank}.jsonl"))
        self.queue = UploadQueue(config.multipart_threshold)
        self.tracker = CheckpointTracker(config.markers, config.quiet_commit)
        self.settler = Settler(self.root, self.staging, config.settle_time, config.ignore_patterns,
                               self._noticed, self._complete, self._skip)  # fmt: skip
        self.transfer = Transfer(storage, self.journal, asyncio.Semaphore(config.parts_in_flight),
                                 Throttle(config.bandwidth_limit), config.multipart_threshold, config.part_size,
                                 lambda: self.drain_deadline, self.observe)  # fmt: skip
        self.failed: dict[str, tuple[Job, StorageError]] = {}
        self.permanent_error: StorageError | None = None
        self.storage_reachable: bool | None = None  # None until the first request
        self.recent_errors: deque[dict] = deque(maxlen=20)
        self.drain_deadline: float | None = None
        self.stored_count = 0
        self.detector: Detector | None = None
        self._tasks: list[asyncio.Task] = []
        self.publisher = Publisher(config, storage, self.tracker, lambda: self.drain_deadline, self.observe)

    def observe(self, error: StorageError | None) -> None:
        """Every storage request's outcome, for /readyz and /status."""
        if error is None:
            self.storage_reachable = True
            return
        self.storage_reachable = error.code != "NetworkError"
        self.recent_errors.append({"at": time.time(), "op": error.op, "key": error.key, "code": error.code,
                                   "message": error.message[:300], "transient": error.transient})  # fmt: skip

    def lower_priority(self) -> dict:
        """Lower this process's priority, except the detector's threads, which pin files that
        rotation may delete any moment (niceness is per thread on Linux)."""
        exempt = self.detector.thread_ids() if self.detector else set()
        return priority.apply(self.c.nice, self.c.io_priority, self.c.cpu_affinity, exempt=exempt)

    def key(self, relpath: str) -> str:
        return layout.file_key(self.c.project, self.c.job_id, self.c.node_rank, relpath)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> Report:
        await self.startup()
        await self.serve(stop)
        return await self.shutdown()

    async def startup(self) -> None:
        os.makedirs(self.staging, exist_ok=True)
        await asyncio.to_thread(self.journal.open)
        await recover.recover(self)
        spawn = self._spawn
        spawn(self.settler.run(), "settle")
        for lane, count in ((SMALL, max(1, self.c.upload_concurrency // 2)), (LARGE, self.c.upload_concurrency)):
            for i in range(count):
                spawn(self._worker(lane), f"upload-{lane}-{i}")
        spawn(self.publisher.run(), "commit")
        spawn(self._every(self.c.rescan_interval, self.rescan), "rescan")
        spawn(self._every(0.2, self._sync_journal), "journal")
        if self.c.min_free_bytes:
            spawn(self._every(1.0, self._relieve_disk_pressure), "disk-pressure")
        views.register_gauges(self)
        spawn(self._job_metadata("RUNNING", None), "job-metadata")
        loop = asyncio.get_running_loop()
        self.detector = Detector(self.root, loop, self.settler.notice, mode=self.c.watch_mode,
                                 skip_dir=lambda rel: rel.split("/", 1)[0] == STATE_DIR,
                                 pin=self.settler.pin_early)  # fmt: skip
        self.detector.start()
        await self.rescan()
        log.info("watching", folder=self.root, mode=self.detector.mode, storage=self.storage.url,
                 journal_files=len(self.journal.state.stored))  # fmt: skip

    async def serve(self, stop: asyncio.Event) -> None:
        await stop.wait()

    async def shutdown(self, exit_code: int | None = None, timeout: float | None = None) -> Report:
        """Final scan, drain until the deadline, commit, record, then cancel what is left.

        `exit_code` is the trainer's (None in sidecar mode): only a success commits checkpoints
        that have no marker, and it goes into the job metadata.
        """
        timeout = self.c.drain_timeout if timeout is None else timeout
        self.drain_deadline = time.monotonic() + timeout
        log.info("draining", deadline_seconds=timeout)
        if self.detector:
            # The writer is done (trainer exited, or the pod is stopping): the final scan is the
            # truth from here on, and late hints would only re-open files already judged.
            self.detector.stop()
        await self.rescan(retry_failed=True)
        while (self.settler.busy() or not self.queue.empty()) and time.monotonic() < self.drain_deadline:
            await asyncio.sleep(0.05)
        await self.publisher.commit_due(final=exit_code in (None, 0))
        # Taken before cancelling: a cancelled upload leaves the queue, not the list of what is missing.
        not_stored = {j.relpath for j in self.queue.jobs()} | set(self.failed) | set(self.settler.settling())
        await self._cancel_tasks("drain finished" if not not_stored else "drain deadline passed")
        report = Report(self.stored_count, sorted(not_stored), self.settler.still_writing(),
                        self.tracker.uncommitted())  # fmt: skip
        self.settler.release_all()
        await self._final_metadata(report, exit_code)
        await asyncio.to_thread(self.journal.close)
        log.info("drained", stored=report.stored, not_stored=report.not_stored[:20],
                 not_stored_count=len(report.not_stored), uncommitted=report.uncommitted[:20],
                 still_being_written=report.still_writing[:20])  # fmt: skip
        return report

    # -- flow --------------------------------------------------------------------------------

    def _noticed(self, relpath: str) -> None:
        """A new candidate: its checkpoint must not commit before it is stored or dropped."""
        self.tracker.noticed(relpath, time.monotonic())

    def _complete(self, pin: Pin) -> None:
        """Settler verdict COMPLETE: skip if this very version is stored, else queue it."""
        key = self.key(pin.relpath)
        known = self.journal.state.stored.get(pin.relpath)
        if known and known.identity == pin.identity and known.key == key:
            pin.release()
            metrics.FILES_SKIPPED.labels(reason="unchanged").inc()
            self.tracker.stored(StoredFile(known.relpath, known.identity.size, known.sha256, known.key, known.etag),
                                time.monotonic())  # fmt: skip
            return
        uploading = self.queue.uploading(pin.relpath)
        if uploading is not None and uploading.pin.identity == pin.identity:
            self._unpin(pin)  # this very version is on its way (noticed again, e.g. by polling)
            return
        self.tracker.noticed(pin.relpath, time.monotonic())
        if pin.stage:
            self.journal.record("pinned", jr.Pinned(pin.relpath, pin.identity, pin.stage))
        self.failed.pop(pin.relpath, None)
        replaced = self.queue.put(Job(pin, key))
        if replaced:
            self._unpin(replaced.pin)

    def _skip(self, relpath: str, reason: str) -> None:
        metrics.FILES_SKIPPED.labels(reason=reason).inc()
        if reason == "vanished":
            self.tracker.dropped(relpath, time.monotonic())

    def _unpin(self, pin: Pin) -> None:
        stage = pin.stage
        if pin.release():  # the link is gone only when no other job holds the same version
            self.journal.record("unpinned", stage=stage)

    async def _worker(self, lane: str) -> None:
        while True:
            job = await self.queue.get(lane)
            try:
                await self._upload(job)
            finally:
                self.queue.done(job)

    async def _upload(self, job: Job) -> None:
        started = time.monotonic()
        try:
            stored = await self.transfer.upload(job.pin, job.key)
        except StorageError as e:
            self._failed(job, e)
            return
        except (Changed, OSError) as e:
            if job.pin.current() == job.pin.identity and not isinstance(e, Changed):
                self._failed(job, StorageError("read", job.key, "ReadError", str(e), transient=False))
                return
            log.info("changed while uploading; the new version follows", path=job.relpath)
            self._unpin(job.pin)
            self.settler.notice(os.path.join(self.root, job.relpath), False)
            return
        self.journal.record("stored", stored)
        await self._stored(job, stored, time.monotonic() - started)

    async def _stored(self, job: Job, stored: jr.Stored, seconds: float) -> None:
        now = time.monotonic()
        metrics.UPLOAD_LAG.observe(now - job.complete_at)
        metrics.UPLOADED_FILES.inc()
        metrics.UPLOADED_BYTES.inc(job.size)
        self.stored_count += 1
        self.permanent_error = None
        checkpoint = layout.checkpoint_of(job.relpath)
        if is_marker(job.relpath, ("trainer_state.json",)):
            self.tracker.set_metrics(checkpoint, await asyncio.to_thread(_read_pinned, job.pin))
        self._unpin(job.pin)
        self.tracker.stored(StoredFile(job.relpath, job.size, stored.sha256, stored.key, stored.etag), now)
        self.publisher.wake()
        log.info("uploaded", path=job.relpath, key=job.key, bytes=job.size, seconds=round(seconds, 3),
                 mb_per_s=round(job.size / max(seconds, 1e-6) / 1e6, 1))  # fmt: skip

    def _failed(self, job: Job, e: StorageError) -> None:
        metrics.UPLOAD_FAILURES.labels(reason=e.code).inc()
        self.failed[job.relpath] = (job, e)
        if not e.transient:
            self.permanent_error = e
        log.error("upload failed", path=job.relpath, key=job.key, code=e.code, error=e.message,
                  transient=e.transient, retry="at next scan" if self.drain_deadline is None else "no")  # fmt: skip

    async def rescan(self, retry_failed: bool = True) -> None:
        """Reconcile with the folder: inotify is a hint, this is the truth."""
        found = await asyncio.to_thread(self._scan_changed)
        for path in found:
            try:
                relpath = layout.relpath_of(self.root, path)
            except layout.UnsafePath:
                self.settler.notice(path, False)  # it logs and counts the unstorable name
                continue
            if relpath in self.settler.candidates or self.queue.queued(relpath) or relpath in self.failed:
                continue
            metrics.RESCAN_FOUND.inc()
            self.settler.notice(path, False)
        if retry_failed:
            for relpath, (job, _) in list(self.failed.items()):
                if not self.queue.queued(relpath):
                    del self.failed[relpath]
                    self.queue.put(job)

    def _scan_changed(self) -> list[str]:
        """Files whose current version is not the stored one (runs in a thread)."""
        stored = self.journal.state.stored
        out = []
        for path in scan(self.root, skip_dir=lambda rel: rel.split("/", 1)[0] == STATE_DIR):
            rel = os.path.relpath(path, self.root)
            known = stored.get(rel)
            if known is None or Identity.stat(path) != known.identity:
                out.append(path)
        return out

    async def _final_metadata(self, report: Report, exit_code: int | None) -> None:
        # A short last chance, shorter still when the store is known to be unreachable.
        self.drain_deadline = min(self.drain_deadline or 0, time.monotonic()) + (10 if self.storage_reachable else 2)
        await self._job_metadata("FAILED" if exit_code not in (None, 0) else "COMPLETED", exit_code,
                                 sync_status="COMPLETED" if report.ok else "SYNCING", uncommitted=report.uncommitted,
                                 failed_files=len(report.not_stored))  # fmt: skip

    async def _job_metadata(self, status: str, exit_code: int | None, **extra: object) -> None:
        error = await self.publisher.job_status(status, exit_code, **extra)
        if error is not None and not error.transient:
            self.permanent_error = error

    # -- housekeeping -------------------------------------------------------------------------

    def _spawn(self, coro, name: str) -> None:  # noqa: ANN001
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _every(self, seconds: float, fn) -> None:  # noqa: ANN001
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except Exception:  # a periodic duty must outlive one bad round; cancellation still ends it
                log.exception("periodic task failed", task=fn.__name__)

    async def _sync_journal(self) -> None:
        fd = self.journal.flush()  # on the loop: records are only ever written from here
        if fd is not None:
            await asyncio.to_thread(os.fsync, fd)

    async def _relieve_disk_pressure(self) -> None:
        if views.free_bytes(self.root) < self.c.min_free_bytes:
            await asyncio.to_thread(diskpressure.relieve, self.root, self.c.min_free_bytes,
                                    lambda name: name == STATE_DIR, self.tracker.is_committed)  # fmt: skip

    async def _cancel_tasks(self, reason: str) -> None:
        busy = [j.relpath for j in self.queue.jobs()]
        for task in self._tasks:
            task.cancel(reason)
        _, stuck = await asyncio.wait(self._tasks, timeout=10)
        if stuck:  # never hang the exit on a task that will not end
            log.error("tasks did not stop", tasks=[t.get_name() for t in stuck])
        self._tasks.clear()
        if busy:
            log.warning("uploads cancelled", reason=reason, files=busy[:20], count=len(busy))


def _read_pinned(pin: Pin) -> dict:
    fd = pin.open()
    try:
        return metrics_from_trainer_state(os.pread(fd, 16 << 20, 0))
    finally:
        os.close(fd)
