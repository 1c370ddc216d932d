"""Landing an object's bytes in a file as they arrive, verified on the way (download.py, fetch.py).

A ranged GET's body is streamed (`Storage.get_stream`) in batches of about BATCH bytes, each
written at its offset with one `pwritev` of the chunks as they came off the socket: no range is
ever joined or held whole in memory. Ranges land out of order (several are in flight), so the
SHA-256 follows the file's contiguous landed prefix (`PrefixHasher`): a batch that lands at the
prefix's end is hashed from the chunks in hand, one that lands beyond it is hashed later, read
back from the page cache, by whichever writer closes the gap. When the last byte lands the digest
is done, and the final check is a comparison, not a second pass over the file.

Writeback starts as the hashed prefix grows (`sync_file_range`, in long contiguous spans, which
the file system allocates and the disk writes best), so the fsync that makes the verified file
durable waits for the last few spans only, not for the whole file.

Every function here that touches a descriptor blocks: call it through `in_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from daemon.storage import Storage, StorageError

BATCH = 4 << 20  # bytes written per pwritev: few writes and thread hops, bounded memory per stream
MAX_BUFFERS = 512  # pwritev takes at most IOV_MAX (1024) buffers; a store sending tiny chunks gets smaller batches
HASH_READ = 4 << 20  # read-back size when hashing bytes that landed ahead of the prefix
WRITEBACK = 16 << 20  # start writing the verified prefix to disk in spans of this many bytes (0: never)


class Corrupt(Exception):
    """The stored object does not match its manifest entry."""


class PrefixHasher:
    """SHA-256 of a file written in pieces, in any order, by several threads.

    `landed` is told of each piece once its bytes are in the file. The digest covers [0, `done`),
    the longest prefix whose every byte has landed; one thread at a time extends it, the others
    only record their piece, which that thread then reads back before it lets go.
    """

    def __init__(self, fd: int) -> None:
        self.fd, self.done = fd, 0
        self._flushed = 0  # writeback started for [0, _flushed)
        self._digest = hashlib.sha256()
        self._ahead: dict[int, int] = {}  # start -> end of landed pieces beyond `done`
        self._lock = threading.Lock()
        self._busy = False  # a thread is extending the prefix

    def landed(self, start: int, chunks: Sequence[bytes]) -> None:
        end = start + sum(len(c) for c in chunks)
        with self._lock:
            if self._busy or start != self.done:
                # Read back later by the thread extending the prefix, or by the landing that reaches it.
                self._ahead[start] = end
                return
            self._busy = True
        try:
            for chunk in chunks:  # from memory: these bytes were just written
                self._digest.update(chunk)
            self.done = end
            self._catch_up()
        except BaseException:
            with self._lock:
                self._busy = False
            raise

    def _catch_up(self) -> None:
        while True:
            if WRITEBACK and self.done - self._flushed >= WRITEBACK:  # only the thread extending the prefix is here
                start_writeback(self.fd, self._flushed, self.done - self._flushed)
                self._flushed = self.done
            with self._lock:
                end = self._ahead.pop(self.done, None)
                if end is None:
                    self._busy = False
                    return
            pos = self.done
            while pos < end:  # from the page cache: these landed while the prefix was behind them
                chunk = os.pread(self.fd, min(HASH_READ, end - pos), pos)
                if not chunk:
                    raise Corrupt(f"the file ended at byte {pos} while being verified")
                self._digest.update(chunk)
                pos += len(chunk)
            self.done = end

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class Landing:
    """One download attempt of one file: its descriptor, its digest so far, its writeback.
    `verify` off (a file with no manifest): no digest is computed, the size alone is checked."""

    def __init__(self, fd: int, *, verify: bool = True) -> None:
        self.fd = fd
        self.hasher = PrefixHasher(fd) if verify else None
        # The file system serializes writes to one file anyway (ext4 takes the inode's lock); waiting
        # here sleeps, where waiting in the kernel spins a CPU that the downloads and hashing need.
        self._writing = threading.Lock()

    def write(self, offset: int, chunks: Sequence[bytes]) -> None:
        """Write the chunks back to back at `offset`, then hash what that completes."""
        size = sum(len(c) for c in chunks)
        with self._writing:
            written = os.pwritev(self.fd, chunks, offset)
            if written < size:  # short writes are rare (a signal, a full quota): finish them one buffer at a time
                _write_rest(self.fd, chunks, offset, written)
        if self.hasher is not None:
            self.hasher.landed(offset, chunks)

    def finish(self, size: int, sha256: str | None) -> None:
        """Corrupt unless the file holds exactly `size` bytes hashing to `sha256` (when given); then fsync."""
        found = os.fstat(self.fd).st_size
        if found != size:
            raise Corrupt(f"size {found}, expected {size}")
        if sha256 is not None:
            if self.hasher is None:
                raise ValueError("a digest to check, but none was computed: Landing(verify=False)")
            if self.hasher.done != size:  # every byte is written by a landing: this means a bug, never weather
                raise Corrupt(f"only {self.hasher.done} of {size} bytes were verified")
            if (got := self.hasher.hexdigest()) != sha256:
                raise Corrupt(f"sha256 {got}, manifest says {sha256}")
        os.fsync(self.fd)


def _write_rest(fd: int, chunks: Sequence[bytes], offset: int, done: int) -> None:
    """Write what a short pwritev left: the chunks' bytes after the first `done`."""
    for chunk in chunks:
        if done >= len(chunk):
            done -= len(chunk)
        else:
            view, pos, done = memoryview(chunk)[done:], offset + done, 0
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        offset += len(chunk)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:  # ctypes only when a download starts: it is no part of the CLI's start-up
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing the range to disk now, without waiting for it (ctypes
    releases the GIL). Durability is still the final fsync's: this only gives it less to do."""
    if (fn := _sync_file_range()) is not None:
        fn(fd, offset, size, 2)  # SYNC_FILE_RANGE_WRITE; a failure here is the fsync's to report


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


class Range:
    """Bytes [start, end) of one object, landing at the same offsets of one file. `pull` may be
    called again after a failure (by a retry loop): it resumes at the first byte not yet written."""

    def __init__(self, storage: Storage, key: str, landing: Landing, start: int, end: int) -> None:
        self.storage, self.key, self.landing = storage, key, landing
        self.start, self.pos, self.end = start, start, end

    async def pull(self, advance: Callable[[int], None]) -> None:
        """Stream the rest of the range into the file; `advance(n)` as each batch lands. Corrupt
        when the store's bytes are not exactly the range's length."""
        batch: list[bytes] = []
        size = 0
        try:
            async with contextlib.aclosing(self.storage.get_stream(self.key, self.pos, self.end)) as chunks:
                async for chunk in chunks:
                    if self.pos + size + len(chunk) > self.end:
                        raise Corrupt(f"bytes [{self.start}, {self.end}) of the object came back longer")
                    batch.append(chunk)
                    size += len(chunk)
                    if size >= BATCH or len(batch) >= MAX_BUFFERS:
                        await self._land(batch, size, advance)
                        batch, size = [], 0
        except StorageError as exc:
            if exc.code != "InvalidRange":  # S3's answer to a range past the object's end
                raise  # a half-received batch is dropped: the retry fetches it again
            raise Corrupt(f"the object ends before byte {self.pos + size}") from None
        if batch:
            await self._land(batch, size, advance)
        if self.pos != self.end:
            got = self.pos - self.start
            raise Corrupt(f"bytes [{self.start}, {self.end}) of the object came back as {got} bytes")

    async def _land(self, batch: list[bytes], size: int, advance: Callable[[int], None]) -> None:
        await in_thread(self.landing.write, self.pos, batch)
        self.pos += size
        advance(size)
