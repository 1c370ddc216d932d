"""Downloading, verified: each file of a checkpoint into its staging folder (stage.py), in
parallel (ranged GETs for big ones, streamed to the file as they arrive: landing.py), checked
against the manifest's size and SHA-256 (hashed while downloading) and fsynced, so that only
verified bytes are ever put in place.

The store is not trusted: a big object whose size differs from its manifest's is refused before
its first byte is fetched, and the files are written at their declared offsets (nothing is
preallocated), so a lying size costs one HEAD, not a disk's worth of zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from daemon import metrics
from daemon.restore import safefs
from daemon.restore.landing import Corrupt, Landing, Range, in_thread
from daemon.restore.plan import Item
from daemon.restore.stage import Staging
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying

__all__ = ["ATTEMPTS", "Corrupt", "Downloader", "RestoreFailed", "Tally", "all_or_cancel", "in_thread"]
ATTEMPTS = 3  # downloads of one file whose bytes do not match its manifest before giving up
log = structlog.get_logger()
T = TypeVar("T")


class RestoreFailed(Exception):
    """The restore cannot complete; training must not start (exit 3)."""


def _create(staging: Staging, relpath: str, opened: list[int]) -> None:
    # The descriptor goes into `opened` at once, so the caller closes it even if it was cancelled.
    with staging.slot(relpath) as (folder, name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=folder)  # a failed attempt's bytes
        opened.append(safefs.create_file(folder, name))


async def all_or_cancel(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all; on the first failure cancel the rest, let them clean up, and raise that failure."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Tally:
    """What a download did: all the files it was to land, and how many were fetched or kept."""

    files: int
    bytes: int
    downloaded_files: int
    downloaded_bytes: int
    kept_files: int
    seconds: float


class Downloader:
    """Parallel downloads: at most `concurrency` files and `concurrency` ranges of `chunk_size`
    bytes in flight, each holding at most a batch (landing.BATCH) in memory."""

    def __init__(
        self,
        storage: Storage,
        concurrency: int,
        chunk_size: int,
        total: int,
        progress: Callable[[int, int], None] | None,
        retry_window: float,
    ) -> None:
        self.storage, self.concurrency, self.chunk_size = storage, concurrency, chunk_size
        self.files, self.chunks = asyncio.Semaphore(concurrency), asyncio.Semaphore(concurrency)
        self.total, self.done, self.progress, self.retry_window = total, 0, progress, retry_window
        self.downloaded_files = self.downloaded_bytes = self.kept_files = 0
        self.landed: dict[str, int] = {}  # bytes of the current attempt, by target

    def _advance(self, n: int, target: str | None = None) -> None:
        if target is not None:
            self.landed[target] = self.landed.get(target, 0) + n
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def keep(self, item: Item) -> None:
        """`item` is already in place with the right bytes."""
        self.kept_files += 1
        self._advance(item.size)

    async def run(self, items: Sequence[Item], staging: Staging) -> None:
        """Download and verify every item into `staging`; RestoreFailed naming the key if one fails."""
        await all_or_cancel(self._one(item, staging) for item in items)

    async def _one(self, item: Item, staging: Staging) -> None:
        async with self.files:
            try:
                await self._download(item, staging)
            except StorageError as exc:
                raise RestoreFailed(f"cannot download {item.key}: {exc}") from exc
            except safefs.Refused as exc:
                raise RestoreFailed(f"cannot restore {item.key}: {exc}") from None
            except OSError as exc:
                raise RestoreFailed(f"cannot write {item.target} (key {item.key}): {exc}") from exc
        self.landed.pop(item.target, None)
        self.downloaded_files += 1
        self.downloaded_bytes += item.size
        metrics.RESTORE_FILES.inc()
        metrics.RESTORE_BYTES.inc(item.size)

    async def _check_size(self, item: Item) -> None:
        head = functools.partial(self.storage.head, item.key)
        deadline = Deadline.after(self.retry_window)
        info = await retrying(head, deadline=deadline, context={"file": item.target}, counter=None)
        if info is None:
            raise RestoreFailed(f"cannot download {item.key}: no such object")
        if info.size != item.size:
            raise RestoreFailed(f"{item.key} is {info.size} bytes, its manifest says {item.size}")

    async def _download(self, item: Item, staging: Staging) -> None:
        if item.size > self.chunk_size:  # one cheap request before several big ones
            await self._check_size(item)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await self._attempt(item, staging)
                return
            except Corrupt as exc:
                self._advance(-self.landed.pop(item.target, 0))  # the bar goes back: fetched again
                log.warning("restored file does not match its manifest", key=item.key, attempt=attempt, error=str(exc))
                if attempt == ATTEMPTS:
                    raise RestoreFailed(f"checksum mismatch for {item.key} after {ATTEMPTS} downloads: {exc}") from None

    async def _attempt(self, item: Item, staging: Staging) -> None:
        """Download into the staging folder, verify, fsync; Corrupt on a mismatch."""
        opened: list[int] = []
        try:
            await in_thread(_create, staging, item.relpath, opened)
            landing = Landing(opened[0])
            await self._fetch(item, landing)
            await in_thread(landing.finish, item.size, item.sha256)
        finally:
            for fd in opened:  # every writer thread has ended: _fetch waits for them all
                os.close(fd)

    async def _fetch(self, item: Item, landing: Landing) -> None:
        offsets = iter(range(0, item.size, self.chunk_size))  # shared: each range is taken by one worker

        async def worker() -> None:
            for start in offsets:
                await self._range(item, landing, start, min(start + self.chunk_size, item.size))

        count = -(-item.size // self.chunk_size)
        await all_or_cancel(worker() for _ in range(min(self.concurrency, count)))

    async def _range(self, item: Item, landing: Landing, start: int, end: int) -> None:
        async with self.chunks:
            part = Range(self.storage, item.key, landing, start, end)
            pull = functools.partial(part.pull, functools.partial(self._advance, target=item.target))
            deadline = Deadline.after(self.retry_window)
            await retrying(pull, deadline=deadline, context={"file": item.target}, counter=None)
