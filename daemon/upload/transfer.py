"""Upload one pinned file: a single PUT below the multipart threshold, parallel parts above it.

One sequential read hashes the file (the manifest's SHA-256 and every part's checksum, see
hashing.py); each part is then streamed from the page cache with positional reads (no whole-part
copies) and dropped from the cache behind us. The file's identity is checked after reading, so a
torn mix of two versions is never recorded as stored. A failed multipart upload is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from daemon.storage import DIGEST_MISMATCH, Body, Digests, FileRange, Part, Storage, StorageError
from daemon.storage.bodies import digests, digests_sync
from daemon.storage.retry import Deadline, retrying
from daemon.upload import journal as jr
from daemon.upload.hashing import Changed, PartDigests
from daemon.upload.health import StoreHealth
from daemon.upload.pin import Pin
from daemon.upload.throttle import Throttle

MiB = 1 << 20
DEFAULT_PART = 16 * MiB
MIN_PART = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
IN_MEMORY = 8 * MiB  # single PUTs up to this size are read into memory once
HELD = 1 * MiB  # an in-memory body above this size holds one of the `parts` slots, which bound memory
log = structlog.get_logger()
T = TypeVar("T")


def part_size_for(size: int, configured: int | None = None) -> int:
    """Part size for a file: the configured or default size, grown so no file needs > 10,000 parts.

    | size     | configured | part                                  |
    |----------|------------|---------------------------------------|
    | 100 MiB  | None       | 16 MiB                                |
    | 100 MiB  | 64 MiB     | 64 MiB                                |
    | 1 TiB    | None       | 105 MiB (1 TiB / 10,000, rounded up to whole MiB) |
    | 1 TiB    | 8 MiB      | 105 MiB                               |
    """
    needed = -(-size // MAX_PARTS)
    needed = -(-needed // MiB) * MiB
    return max(configured or DEFAULT_PART, needed, MIN_PART)


@dataclass
class Transfer:
    storage: Storage
    journal: jr.Journal
    parts: asyncio.Semaphore  # bounds parts in flight across all files, and so memory
    throttle: Throttle
    threshold: int
    part_size: int | None
    deadline: Deadline
    health: StoreHealth

    async def upload(self, pin: Pin, key: str) -> jr.Stored:
        fd = pin.open()
        try:
            if pin.identity.size < self.threshold:
                return await self._single(pin, key, fd)
            return await self._multipart(pin, key, fd)
        finally:
            # Off the loop and off the upload's path: dropping dirty pages (a file fresh from the
            # trainer) starts their writeback first, ~0.6 s per GiB here.
            try:
                asyncio.get_running_loop().run_in_executor(None, _release, fd)
            except RuntimeError:  # the executor is shutting down
                _release(fd)

    async def _single(self, pin: Pin, key: str, fd: int) -> jr.Stored:
        size = pin.identity.size
        earlier = self.journal.state.multipart.get(pin.relpath)
        if earlier:  # an earlier run's multipart upload of this path (another version, or threshold)
            await self._abort(earlier.key, earlier.upload_id, pin, None)
        if size <= IN_MEMORY:
            # Many small files go at once (the small lane has the most workers); a few big ones.
            async with self.parts if size > HELD else contextlib.nullcontext():
                return await self._in_memory(pin, key, fd)
        # Streamed: one pass gives the manifest's SHA-256 and the checksum the store verifies, so a
        # store that checks it refuses a body that differs from the hashed bytes.
        body = FileRange(fd, 0, size)
        hashed = await asyncio.to_thread(_digests, fd, size, ("sha256", *self.storage.verifies))
        return await self._put(pin, key, fd, body, hashed)

    async def _in_memory(self, pin: Pin, key: str, fd: int) -> jr.Stored:
        # Read once: the bytes sent are the bytes hashed, so a rewrite in place mid-send cannot
        # tear the object on any store, whether or not it checks what it is sent.
        body = await asyncio.to_thread(_read, fd, pin.identity.size)
        _check_unchanged(fd, pin)  # else the bytes read may mix two versions: send none of them
        hashed = await digests(body, ("sha256", *self.storage.verifies))
        return await self._put(pin, key, fd, body, hashed)

    async def _put(self, pin: Pin, key: str, fd: int, body: Body, hashed: Digests) -> jr.Stored:
        self.throttle.debit(pin.identity.size)
        try:
            etag = await self._retrying(lambda: self.storage.put(key, body, hashed), pin)
        except StorageError as e:
            if e.code in DIGEST_MISMATCH:
                raise Changed(f"{pin.relpath} changed while uploading: the store refused the body ({e.code})") from e
            raise
        _check_unchanged(fd, pin)
        return jr.Stored(pin.relpath, pin.identity, hashed["sha256"].hex(), key, etag)

    async def _multipart(self, pin: Pin, key: str, fd: int) -> jr.Stored:
        size = pin.identity.size
        upload_id, done = await self._start_or_resume(pin, key)
        part_size = self.journal.state.multipart[pin.relpath].part_size
        hashed = PartDigests(fd, size, part_size, self.storage.verifies, skip=done)
        hashed.start()
        try:
            todo = [n for n in range(1, hashed.count + 1) if n not in done]
            sent = await asyncio.gather(*(self._part(fd, key, upload_id, n, hashed, pin) for n in todo))
            parts = sorted([*done.values(), *sent], key=lambda p: p.number)
            sha = await hashed.sha256()
            _check_unchanged(fd, pin)
            etag = await self._retrying(lambda: self.storage.complete_multipart(key, upload_id, parts), pin)
        except BaseException as e:
            await hashed.close()
            await self._abort(key, upload_id, pin, e)
            raise
        self.journal.record("multipart_done", relpath=pin.relpath)
        return jr.Stored(pin.relpath, pin.identity, sha, key, etag)

    async def _retrying(self, call: Callable[[], Awaitable[T]], pin: Pin, **context: object) -> T:
        """A storage request, retried until the drain deadline; its outcomes feed the store's health."""
        return await retrying(
            call, deadline=self.deadline, observe=self.health.observe, context={"path": pin.relpath, **context}
        )

    async def _start_or_resume(self, pin: Pin, key: str) -> tuple[str, dict[int, Part]]:
        """Reuse the parts of an upload a crashed run left, if it was of this very file version."""
        earlier = self.journal.state.multipart.get(pin.relpath)
        if earlier and earlier.identity == pin.identity and earlier.key == key:
            try:
                listed = await self.storage.list_parts(key, earlier.upload_id)
            except StorageError as e:
                log.info("multipart upload not resumable", path=pin.relpath, code=e.code)
            else:
                full = {
                    p.number: p
                    for p in listed
                    if p.size == min(earlier.part_size, pin.identity.size - (p.number - 1) * earlier.part_size)
                }
                log.info("multipart upload resumed", path=pin.relpath, key=key, parts_reused=len(full))
                return earlier.upload_id, full
        if earlier:
            await self._abort(earlier.key, earlier.upload_id, pin, None)
        upload_id = await self._retrying(lambda: self.storage.create_multipart(key), pin)
        part_size = part_size_for(pin.identity.size, self.part_size)
        self.journal.record("multipart", jr.Multipart(pin.relpath, pin.identity, key, upload_id, part_size))
        await self.journal.sync()  # a crash from here on must find this upload to resume or abort it
        await self._abort_strays(key, upload_id, pin)
        return upload_id, {}

    async def _abort_strays(self, key: str, upload_id: str, pin: Pin) -> None:
        """A create whose answer was lost (a reset after the store made the upload) was retried and
        made a second one: only one upload of a path runs at a time, so any other is a stray."""
        try:
            found = await self.storage.list_multipart_uploads(key)
        except StorageError as e:  # the next start aborts whatever the journal does not know
            log.info("stray multipart uploads not checked", path=pin.relpath, code=e.code)
            return
        for upload in found:
            if upload.key == key and upload.upload_id != upload_id:
                await self._abort(key, upload.upload_id, pin, None, journaled=False)

    async def _part(self, fd: int, key: str, upload_id: str, number: int, hashed: PartDigests, pin: Pin) -> Part:
        offset = (number - 1) * hashed.part_size
        body = FileRange(fd, offset, min(hashed.part_size, hashed.size - offset))
        async with self.parts:
            checksums = await hashed.part(number)
            await self.throttle.take(body.size)
            send = lambda: self.storage.upload_part(key, upload_id, number, body, checksums)  # noqa: E731
            part = await self._retrying(send, pin, part=number)
        hashed.sent(number)
        await asyncio.to_thread(_drop_cache, fd, offset, body.size)
        return part

    async def _abort(
        self, key: str, upload_id: str, pin: Pin, cause: BaseException | None, *, journaled: bool = True
    ) -> None:
        try:
            # Shielded: an abort interrupted by the same cancellation would leave the parts behind.
            await asyncio.shield(asyncio.wait_for(self.storage.abort_multipart(key, upload_id), 30))
        except (StorageError, TimeoutError) as e:
            # The journal keeps the upload: the next start aborts or resumes it.
            log.warning("multipart abort failed", path=pin.relpath, key=key, code=getattr(e, "code", "Timeout"))
            return
        if journaled:
            self.journal.record("multipart_done", relpath=pin.relpath)
        if cause is not None and not isinstance(cause, asyncio.CancelledError | Changed):
            log.info("multipart upload aborted", path=pin.relpath, key=key, cause=type(cause).__name__)


def _read(fd: int, size: int) -> bytes:
    data = os.pread(fd, size, 0)
    while len(data) < size:  # pread may return less on some file systems
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            raise Changed(f"file shrank while reading: {len(data)} of {size} bytes")
        data += more
    return data


def _digests(fd: int, size: int, algorithms: tuple[str, ...]) -> Digests:
    try:
        return digests_sync(FileRange(fd, 0, size), algorithms)
    except OSError as e:
        if e.errno is not None:  # a read error (EIO): the worker reports it
            raise
        raise Changed(f"file shrank while hashing: {e}") from None


def _check_unchanged(fd: int, pin: Pin) -> None:
    now = pin.identity_of(fd)
    if now != pin.identity:
        raise Changed(f"{pin.relpath} changed while uploading")


def _release(fd: int) -> None:
    _drop_cache(fd, 0, 0)
    with contextlib.suppress(OSError):  # nobody awaits this: an error here would go unseen anyway
        os.close(fd)


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Checkpoint bytes are read once: keep them from evicting the trainer's page cache."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
