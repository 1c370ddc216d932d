"""Downloading, verified: each file into a temporary name, in parallel (ranged GETs for big ones),
checked against the manifest's size and SHA-256, fsynced and only then renamed into place, so a
corrupt or partial file never sits at a path the trainer reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import structlog

from daemon import metrics
from daemon.files import sha256_of
from daemon.restore.plan import Item
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying

PART_SUFFIX = ".ckptd-part"  # '.ckptd*' is ignored by the uploader, should restore_dir be watched
ATTEMPTS = 3  # downloads of one file whose bytes do not match its manifest before giving up
log = structlog.get_logger()
T = TypeVar("T")


class RestoreFailed(Exception):
    """The restore cannot complete; training must not start (exit 3)."""


class _Corrupt(Exception):
    """The stored object does not match its manifest entry."""


def _matches(path: str, size: int, sha256: str) -> bool:
    """Whether a regular file with exactly these bytes is already at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and st.st_size == size and sha256_of(fd) == sha256
    finally:
        os.close(fd)


def _part_path(target: str) -> str:
    head, name = os.path.split(target)
    return os.path.join(head, f".{name}{PART_SUFFIX}")


# The file operations below take paths, not a shared descriptor: a descriptor closed by one task
# while a thread of another still writes through it could be reused by an unrelated file.
def _prepare(tmp: str) -> None:
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))


def _write_at(tmp: str, data: bytes, offset: int) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)


def _finish(tmp: str, item: Item) -> None:
    """Verify the temporary file against the manifest, make it durable, rename it into place."""
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size != item.size:
            raise _Corrupt(f"size {size}, manifest says {item.size}")
        got = sha256_of(fd)
        if got != item.sha256:
            raise _Corrupt(f"sha256 {got}, manifest says {item.sha256}")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, item.target)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
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

    async def run(self, items: Sequence[Item]) -> None:
        await all_or_cancel(self._one(item) for item in items)

    async def _one(self, item: Item) -> None:
        async with self.files:
            if await asyncio.to_thread(_matches, item.target, item.size, item.sha256):
                self.kept_files += 1
                self._advance(item.size)
                return
            try:
                await self._download(item)
            except StorageError as exc:
                raise RestoreFailed(f"cannot download {item.key}: {exc}") from exc
            except OSError as exc:
                raise RestoreFailed(f"cannot write {item.target} (key {item.key}): {exc}") from exc
        self.landed.pop(item.target, None)
        self.downloaded_files += 1
        self.downloaded_bytes += item.size
        metrics.RESTORE_FILES.inc()
        metrics.RESTORE_BYTES.inc(item.size)

    async def _download(self, item: Item) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await self._attempt(item)
                return
            except _Corrupt as exc:
                self._advance(-self.landed.pop(item.target, 0))  # the bar goes back: fetched again
                log.warning("restored file does not match its manifest", key=item.key, attempt=attempt, error=str(exc))
                if attempt == ATTEMPTS:
                    raise RestoreFailed(f"checksum mismatch for {item.key} after {ATTEMPTS} downloads: {exc}") from None

    async def _attempt(self, item: Item) -> None:
        """Download into a temporary name, verify, fsync, rename into place; _Corrupt on a mismatch."""
        tmp = _part_path(item.target)
        try:
            await _in_thread(_prepare, tmp)
            await self._fetch(item, tmp)
            await _in_thread(_finish, tmp, item)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # synchronous: it must happen even while the task is being cancelled
            raise

    async def _fetch(self, item: Item, tmp: str) -> None:
        offsets = iter(range(0, item.size, self.chunk_size))  # shared: each chunk is taken by one worker

        async def worker() -> None:
            for start in offsets:
                await self._chunk(item, tmp, start, min(start + self.chunk_size, item.size))

        count = -(-item.size // self.chunk_size)
        await all_or_cancel(worker() for _ in range(min(self.concurrency, count)))

    async def _chunk(self, item: Item, tmp: str, start: int, end: int) -> None:
        async with self.chunks:
            get = functools.partial(self.storage.get, item.key, start, end)
            try:
                data = await retrying(
                    get, deadline=Deadline.after(self.retry_window), context={"file": item.target}, counter=None
                )
            except StorageError as exc:
                if exc.code != "InvalidRange":
                    raise
                raise _Corrupt(f"the object ends before byte {start}") from None
            if len(data) != end - start:
                raise _Corrupt(f"bytes [{start}, {end}) of the object came back as {len(data)} bytes")
            await _in_thread(_write_at, tmp, data, start)
        self._advance(len(data), item.target)
