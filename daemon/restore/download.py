"""Downloading, verified: each file of a checkpoint into its staging folder (stage.py), in
parallel (ranged GETs for big ones), checked against the manifest's size and SHA-256 and fsynced,
so that only verified bytes are ever put in place.

The store is not trusted: a big object whose size differs from its manifest's is refused before
its first byte is fetched, and the files are written at their declared offsets (nothing is
preallocated), so a lying size costs one HEAD, not a disk's worth of zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from daemon import metrics
from daemon.files import sha256_of
from daemon.restore import safefs
from daemon.restore.plan import Item
from daemon.restore.stage import Staging
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying

ATTEMPTS = 3  # downloads of one file whose bytes do not match its manifest before giving up
log = structlog.get_logger()
T = TypeVar("T")


class RestoreFailed(Exception):
    """The restore cannot complete; training must not start (exit 3)."""


class Corrupt(Exception):
    """The stored object does not match its manifest entry."""


def _create(staging: Staging, relpath: str, opened: list[int]) -> None:
    # The descriptor goes into `opened` at once, so the caller closes it even if it was cancelled.
    with staging.slot(relpath) as (folder, name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=folder)  # a failed attempt's bytes
        opened.append(safefs.create_file(folder, name))


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _finish(fd: int, item: Item) -> None:
    """Verify the staged file against the manifest and make it durable."""
    size = os.fstat(fd).st_size
    if size != item.size:
        raise Corrupt(f"size {size}, manifest says {item.size}")
    got = sha256_of(fd)
    if got != item.sha256:
        raise Corrupt(f"sha256 {got}, manifest says {item.sha256}")
    os.fsync(fd)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a thread. A cancelled caller still waits for it to end, so that no write lands
    in a temporary file after the file was discarded (or recreated by the next attempt)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    finally:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: a cancelled caller reports its cancellation, not this


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
    """Parallel downloads: at most `concurrency` files and `concurrency` chunks (memory) at once."""

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
            await self._fetch(item, opened[0])
            await in_thread(_finish, opened[0], item)
        finally:
            for fd in opened:  # every writer thread has ended: _fetch waits for them all
                os.close(fd)

    async def _fetch(self, item: Item, fd: int) -> None:
        offsets = iter(range(0, item.size, self.chunk_size))  # shared: each chunk is taken by one worker

        async def worker() -> None:
            for start in offsets:
                await self._chunk(item, fd, start, min(start + self.chunk_size, item.size))

        count = -(-item.size // self.chunk_size)
        await all_or_cancel(worker() for _ in range(min(self.concurrency, count)))

    async def _chunk(self, item: Item, fd: int, start: int, end: int) -> None:
        async with self.chunks:
            get = functools.partial(self.storage.get, item.key, start, end)
            deadline = Deadline.after(self.retry_window)
            n = await land_range(lambda: retrying(get, deadline=deadline, context={"file": item.target}, counter=None),
                                 fd, start, end)  # fmt: skip
        self._advance(n, item.target)


async def land_range(get: Callable[[], Awaitable[bytes]], fd: int, start: int, end: int) -> int:
    """Bytes [start, end) of an object, fetched by `get` and written at `start` of `fd`; their
    count. Corrupt when the store returns anything but exactly those bytes' length."""
    try:
        data = await get()
    except StorageError as exc:
        if exc.code != "InvalidRange":  # S3's answer to a range past the object's end
            raise
        raise Corrupt(f"the object ends before byte {start}") from None
    if len(data) != end - start:
        raise Corrupt(f"bytes [{start}, {end}) of the object came back as {len(data)} bytes")
    await in_thread(_write_at, fd, data, start)
    return len(data)
