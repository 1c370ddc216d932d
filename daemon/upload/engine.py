"""The upload engine: wires detect → settle → pin → queue → transfer → journal → commit together.

Lifecycle as named awaitables: `startup()` recovers and starts every step, the caller waits for
its stop condition, `shutdown()` drains until the deadline and reports. Each step owns its state;
the engine only builds them and passes each its collaborators.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from daemon import exits, metrics, priority
from daemon.catalog import layout
from daemon.config import Config
from daemon.files import free_bytes
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline
from daemon.upload import diskpressure, recover, statedir
from daemon.upload import journal as jr
from daemon.upload.commit import CheckpointTracker
from daemon.upload.crossrank import CrossRank
from daemon.upload.detect import Detector
from daemon.upload.health import StoreHealth
from daemon.upload.intake import Intake
from daemon.upload.pin import Staging
from daemon.upload.publish import Publisher
from daemon.upload.queue import LARGE, SMALL, Job, UploadQueue
from daemon.upload.retain import Retainer
from daemon.upload.statedir import is_state, journal_path, staging_dir
from daemon.upload.status import UploadStatus
from daemon.upload.tasks import Tasks
from daemon.upload.throttle import Throttle
from daemon.upload.transfer import Transfer
from daemon.upload.worker import Uploader

DRAIN_POLL = 0.05  # seconds between looks at whether the drain is done
JOURNAL_SYNC = 0.2  # seconds between group fsyncs of the journal
DISK_CHECK = 1.0  # seconds between free-space checks, when disk pressure relief is on
FINAL_METADATA = (10.0, 2.0)  # seconds for the last status write: store reachable, or not
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
    def __init__(self, config: Config, storage: Storage, deadline: Deadline | None = None) -> None:
        """`deadline` is the drain deadline, shared with whoever may shorten it (a second signal)."""
        c, root = config, config.checkpoint_dir
        self.c, self.storage, self.root = c, storage, root
        self.deadline = deadline or Deadline()
        self.health = StoreHealth()
        self.staging = Staging(staging_dir(root, c.node_rank))
        self.journal = jr.Journal(journal_path(root, c.node_rank))
        self.queue = UploadQueue(c.multipart_threshold)
        self.tracker = CheckpointTracker(c.markers, c.quiet_commit, shared=c.group_size > 1)
        self.publisher = Publisher(c, storage, self.tracker, self.deadline, self.health)
        self.crossrank = None
        if c.group_size > 1:  # checkpoints commit globally once every rank's part is stored
            self.crossrank = CrossRank(c, storage, self.deadline, self.health, self._has_files)
            self.publisher.on_part = self.crossrank.wake
        self.retainer = None
        if c.prune_enabled:  # deletes under the commit lock; the tracker hears what it deleted
            lock, gone = self.publisher.commit_lock, self.tracker.pruned
            self.retainer = Retainer(c, storage, self._busy, lock=lock, gone=gone)
            self.publisher.on_commit = self.retainer.committed
        self.intake = Intake(
            root=root,
            staging=self.staging,
            journal=self.journal,
            queue=self.queue,
            tracker=self.tracker,
            settle=c.settle_time,
            ignore=c.ignore_patterns,
            key_of=self.key,
        )
        transfer = Transfer(
            storage,
            self.journal,
            asyncio.Semaphore(c.parts_in_flight),
            Throttle(c.bandwidth_limit),
            c.multipart_threshold,
            c.part_size,
            self.deadline,
            self.health,
        )
        self.uploader = Uploader(
            queue=self.queue,
            transfer=transfer,
            journal=self.journal,
            tracker=self.tracker,
            health=self.health,
            deadline=self.deadline,
            committed=self.publisher.wake,
            renotice=self.intake.renotice,
            withdraw=self.publisher.withdraw,
        )
        self.publisher.on_lost = self.intake.again  # lost from the store, not pruned: uploaded again
        settler = self.intake.settler
        self.detector = Detector(
            root,
            asyncio.get_running_loop(),
            settler.notice,
            mode=c.watch_mode,
            skip_dir=is_state,
            pin=settler.pin_early,
        )
        self.tasks = Tasks()
        self.status = UploadStatus(
            root=root,
            storage_url=storage.url,
            queue=self.queue,
            settler=settler,
            tracker=self.tracker,
            uploader=self.uploader,
            health=self.health,
            detector=self.detector,
            deadline=self.deadline,
            tasks=self.tasks,
            journal=self.journal,
            unlistable=lambda: self.intake.unlistable,
            crossrank=self.crossrank,
        )

    def key(self, relpath: str) -> str:
        return layout.file_key(self.c.project, self.c.job_id, self.c.node_rank, relpath)

    def _busy(self) -> set[str]:
        """Checkpoints with a file not yet stored (settling, queued, in flight, failed) or not committed."""
        files = [*self.intake.settler.settling(), *(j.relpath for j in self.queue.pending())]
        return {layout.checkpoint_of(relpath) for relpath in files} | set(self.tracker.uncommitted())

    def _has_files(self, checkpoint: str) -> bool:
        """Whether this node holds files of `checkpoint`: stored, or on their way (crossrank.py)."""
        return bool(self.tracker.files(checkpoint)) or checkpoint in self._busy()

    def lower_priority(self) -> dict:
        """Lower this process's priority, except the detector's threads, which pin files that
        rotation may delete any moment (niceness is per thread on Linux)."""
        return priority.apply(self.c.nice, self.c.io_priority, self.c.cpu_affinity, exempt=self.detector.thread_ids())

    async def startup(self) -> None:
        c = self.c
        try:
            # Not makedirs: through a `.ckptd` that is a link it would create files where that points.
            await asyncio.to_thread(statedir.prepare, self.root, c.node_rank)
        except OSError as e:  # the journal then reports itself not ready, and retries
            log.error("state folder not usable", folder=self.root, error=str(e))
        await asyncio.to_thread(self.journal.open)
        await self._recover()
        self.tasks.spawn(self.intake.settler.run, "settle")
        # Small files cost the store a round trip each: twice the workers (their memory is bounded
        # by the transfer's `parts` slots, not by the worker count).
        for lane, count in ((SMALL, 2 * c.upload_concurrency), (LARGE, c.upload_concurrency)):
            for i in range(count):
                self.tasks.spawn(lambda lane=lane: self.uploader.run(lane), f"upload-{lane}-{i}")
        self.tasks.spawn(self.publisher.run, "commit")
        if self.crossrank is not None:
            self.tasks.spawn(self.crossrank.run, "cross-rank-commit")
        if self.retainer is not None:
            self.tasks.spawn(self.retainer.run, "retain")
        self.tasks.every(c.rescan_interval, self.intake.rescan, "rescan")
        self.tasks.every(JOURNAL_SYNC, self.journal.sync, "journal")
        if c.min_free_bytes:
            self.tasks.every(DISK_CHECK, self._relieve_disk_pressure, "disk-pressure")
        metrics.BACKLOG.attach(self.status.backlog)
        self.tasks.spawn(lambda: self.publisher.job_status("RUNNING", None), "job-metadata", once=True)
        self.detector.start()
        await self.intake.rescan()
        log.info(
            "watching",
            folder=self.root,
            mode=self.detector.mode,
            storage=self.storage.url,
            journal_files=len(self.journal.state.stored),
        )

    async def _recover(self) -> None:
        rank = recover.Rank(self.c.project, self.c.job_id, self.c.node_rank)
        found = await recover.recover(
            root=self.root,
            journal=self.journal,
            staging=self.staging,
            storage=self.storage,
            health=self.health,
            rank=rank,
        )
        now = time.monotonic()
        for s in self.journal.state.stored.values():
            if s.key == self.key(s.relpath):  # not a record of another job that used this folder
                self.tracker.stored(s.file(), now)
        # What an earlier run stored or pinned of a checkpoint it did not commit: files of it may
        # have been written and deleted while no ckptd watched, so it must prove itself first.
        touched = {layout.checkpoint_of(r) for r in self.journal.state.stored} | {
            layout.checkpoint_of(p.relpath) for p in found.pins
        }
        for checkpoint in touched - set(found.committed):
            self.tracker.unproven(checkpoint)
        for checkpoint in found.committed:
            self.tracker.already_committed(checkpoint)
        for checkpoint, relpaths in found.listed.items():
            self.tracker.found_in_store(checkpoint, relpaths)
        for pin in found.pins:
            self.tracker.noticed(pin.relpath, now)
            self.queue.put(Job(pin, self.key(pin.relpath)))

    async def shutdown(self, exit_code: int | None = None, *, success: bool = False, stopped: bool = False) -> Report:
        """Final scan, drain until the deadline, commit, record, then cancel what is left.

        `exit_code` is the trainer's (None in sidecar mode) and goes into the job metadata.
        `success` is positive evidence that the writer finished (the trainer's exit 0, the
        `--exit-when` file): only then do checkpoints without a marker commit. A stop signal is
        no such evidence: a save it interrupted must not become "latest" (SPEC §4). `stopped`: the
        trainer was told to stop (a stop signal), so the job's status is STOPPED unless it succeeded.
        """
        self.deadline.start(self.c.drain_timeout)
        log.info("draining", deadline_seconds=round(self.deadline.at - time.monotonic(), 3))
        # The writer is done (trainer exited, or the pod is stopping): the final scan is the truth
        # from here on, and late hints would only re-open files already judged.
        await asyncio.to_thread(self.detector.stop)  # bounded, but seconds when a watcher thread is stuck
        await self.intake.rescan(retry_failed=True)
        settler = self.intake.settler
        settler.recheck()
        # Polled: "nothing settling and nothing queued" spans two owners, and 50 ms is nothing to a drain.
        while (settler.busy() or not self.queue.empty()) and not self.deadline.passed():  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        succeeded = exit_code in (None, exits.OK)
        await self.publisher.commit_due(final=success)
        await self._last_cross_rank_check()
        if self.retainer is not None:  # the last commits' retention, before the tasks are cancelled
            await self.retainer.final(self.deadline)
        # Taken before cancelling: a cancelled upload leaves the queue, not the list of what is missing.
        not_stored = {j.relpath for j in self.queue.pending()} | set(settler.settling())
        not_stored |= set(self.tracker.unstorable_files())  # never stored: their checkpoints stay uncommitted
        not_stored |= set(self.intake.unlistable)  # folders whose files could not even be seen
        in_flight = [j.relpath for j in self.queue.jobs()]
        await self.tasks.cancel("drain finished" if not not_stored else "drain deadline passed")
        if in_flight:
            log.warning("uploads cancelled", files=in_flight[:20], count=len(in_flight))
        report = Report(
            self.uploader.stored_count, sorted(not_stored), settler.still_writing(), self.tracker.uncommitted()
        )
        settler.release_all()
        await self._final_metadata(report, exit_code, "COMPLETED" if succeeded else "STOPPED" if stopped else "FAILED")
        await asyncio.to_thread(self.journal.close)
        metrics.BACKLOG.attach(None)  # the queue it reads is gone
        log.info(
            "drained",
            stored=report.stored,
            not_stored=report.not_stored[:20],
            not_stored_count=len(report.not_stored),
            uncommitted=report.uncommitted[:20],
            still_being_written=report.still_writing[:20],
        )
        return report

    async def _last_cross_rank_check(self) -> None:
        """This node's last parts may complete a checkpoint: the last node to write one commits it."""
        if self.crossrank is None:
            return
        try:
            await self.crossrank.check()
        except StorageError as e:
            log.error("checkpoints not committed globally: the store failed", code=e.code, error=e.message)

    async def _final_metadata(self, report: Report, exit_code: int | None, status: str) -> None:
        # A short last chance, shorter still when the store is known to be unreachable.
        self.deadline.grace(FINAL_METADATA[0] if self.health.reachable else FINAL_METADATA[1])
        await self.publisher.job_status(
            status,
            exit_code,
            sync_status="COMPLETED" if report.ok else "SYNCING",
            uncommitted=report.uncommitted,
            failed_files=len(report.not_stored),
        )

    async def _relieve_disk_pressure(self) -> None:
        if free_bytes(self.root) < self.c.min_free_bytes:
            await asyncio.to_thread(diskpressure.relieve, self.root, self.c.min_free_bytes, self.tracker.is_committed)
