"""Retention while training (opt-in, `--prune` / `retention.enabled`): after commits, the job's
retention rules are applied to THIS rank's stored checkpoints, as `ckptd prune` would.

Never deleted here: what `retention.plan` protects (the latest, '.', anything not committed), any
checkpoint with files pending or in flight in this daemon, and the checkpoints committed since the
last pass. A pass runs after commits, one at a time; a failure (the store, a metric no checkpoint
records yet) is logged and the pass runs again at the next commit: uploads never fail because of
it. Each deletion is one log line and counted in ckptd_pruned_checkpoints_total and
ckptd_pruned_bytes_total.

Each checkpoint is deleted holding the publisher's commit lock, so that no manifest of it lands
between the deletion of its manifest and that of its files (commits and manifest withdrawals wait
for that one checkpoint), and is then told to the tracker (`CheckpointTracker.pruned`): its stored
objects are gone, so a file of it rewritten later never commits a manifest listing them unchecked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import structlog

from daemon import metrics
from daemon.catalog import browse, prune, retention
from daemon.config import Config
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline

T = TypeVar("T")
PASS_RETRY = 30.0  # seconds a pass retries transient store errors before it waits for the next commit
log = structlog.get_logger()


def rules_of(c: Config) -> retention.Rules:
    return retention.Rules(c.keep_last, c.keep_best, c.metric, c.mode, c.keep_every_steps)


class Retainer:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        busy: Callable[[], Iterable[str]],
        *,
        lock: asyncio.Lock | None = None,
        gone: Callable[[str], None] = lambda checkpoint: None,
    ) -> None:
        """`busy()`: the checkpoints with files this daemon has not stored or committed yet.
        `lock`: held while a checkpoint is deleted (the publisher's commit lock). `gone(name)`:
        told of each checkpoint deleted, or maybe partly deleted (a prune that failed)."""
        self.c, self.storage, self.busy = config, storage, busy
        self.lock, self.gone = lock or asyncio.Lock(), gone
        self.rules = rules_of(config)
        self._due = asyncio.Event()
        self._lock = asyncio.Lock()
        self._fresh: set[str] = set()  # committed since the last pass
        self._spared = False  # the last pass spared what had just committed

    def committed(self, checkpoint: str) -> None:
        """The publisher's hook: a manifest was written."""
        self._fresh.add(checkpoint)
        self._due.set()

    async def run(self) -> None:
        while True:
            await self._due.wait()
            await self.apply(Deadline.after(PASS_RETRY))

    async def final(self, drain: Deadline) -> None:
        """One last pass at the drain if anything committed since the last one, or the last one
        spared what had just committed, within the drain's deadline (and PASS_RETRY). Nothing
        commits after it, so it spares none: uploads finish out of order, and a checkpoint
        committed after a later one must not outlive the rules for that."""
        if self._due.is_set() or self._spared:
            self._fresh.clear()
            at = time.monotonic() + PASS_RETRY
            await self.apply(Deadline(at if drain.at is None else min(at, drain.at)))

    async def apply(self, deadline: Deadline) -> list[prune.Freed]:
        """One pass; what it deleted. Failures are logged, never raised (cancellation is)."""
        async with self._lock:
            self._due.clear()
            fresh, self._fresh = self._fresh, set()
            self._spared = bool(fresh)
            try:
                return await self._pass(fresh, deadline)
            except (StorageError, browse.MissingMetric) as e:
                log.error("retention pass failed; it runs again at the next commit", error=str(e))
                return []

    async def _pass(self, fresh: set[str], deadline: Deadline) -> list[prune.Freed]:
        c = self.c
        found = await prune.survey(self.storage, c.project, c.job_id, [c.node_rank])
        if found.being_deleted:
            log.warning("retention pass skipped: the job is being deleted (prune --all)")
            return []
        busy = set(self.busy()) | fresh
        found.interrupted = [(r, now) for r, now in found.interrupted if r.checkpoint not in busy]
        # The metric may be recorded by one rank only (an HF Trainer's evals are rank 0's): rank by
        # every rank's manifests, so that each rank keeps the same checkpoints.
        judged = None
        if self.rules.keep_best is not None:
            judged = await browse.checkpoints(self.storage, c.project, c.job_id)
        decisions = retention.plan(
            found.checkpoints, self.rules, stored_ranks=found.stored_ranks, in_progress=busy, ranked_by=judged
        )
        pruner = _Guarded(self.storage, c.project, c.job_id, deadline=deadline, lock=self.lock, gone=self.gone)
        return await prune.execute(pruner, found, decisions, self._pruned)

    def _pruned(self, freed: prune.Freed, decision: retention.Decision | None) -> None:
        metrics.PRUNED_CHECKPOINTS.inc()
        metrics.PRUNED_BYTES.inc(freed.bytes)
        step = decision.checkpoint.step if decision is not None and decision.checkpoint is not None else None
        why = self.rules.not_kept() if decision is not None else ["finished an interrupted prune"]
        log.info(
            "checkpoint pruned",
            checkpoint=freed.checkpoint,
            step=step,
            bytes=freed.bytes,
            files=freed.files,
            reasons=why,
        )


class _Guarded(prune.Pruner):
    """A Pruner that deletes each checkpoint holding `lock` and tells `gone` of it afterwards:
    when something was deleted, and when the prune failed (it may have deleted any part)."""

    def __init__(
        self,
        storage: Storage,
        project: str,
        job_id: str,
        *,
        deadline: Deadline,
        lock: asyncio.Lock,
        gone: Callable[[str], None],
    ) -> None:
        super().__init__(storage, project, job_id, deadline=deadline)
        self.lock, self.gone = lock, gone

    async def prune(self, checkpoint: str, committed: Mapping[int, str | None]) -> prune.Freed | None:
        return await self._guarded(checkpoint, lambda: super(_Guarded, self).prune(checkpoint, committed))

    async def resume(self, record: prune.Interrupted, committed_at: str | None) -> prune.Freed | None:
        return await self._guarded(record.checkpoint, lambda: super(_Guarded, self).resume(record, committed_at))

    async def _guarded(self, checkpoint: str, call: Callable[[], Awaitable[T]]) -> T:
        async with self.lock:
            try:
                freed = await call()
            except BaseException:
                self.gone(checkpoint)
                raise
            if freed is not None:  # None: committed again since, only the record went
                self.gone(checkpoint)
            return freed
