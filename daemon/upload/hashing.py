"""Hashed: one read of a file feeds every digest, the manifest's SHA-256 of the whole file and,
part by part, the checksum the store verifies for each request.

Parts are sent in parallel but SHA-256 is sequential, so one thread reads the file once, in
order, and hands each part's checksum to its sender the moment the part has been read; the
sender then streams the part from the page cache the read has just filled. Separate passes for
the file's digest and for each part's cost a second read and a second hash of every byte (about
0.4 CPU-s per GB with CRC32), and a pass that falls behind the senders re-reads from disk what
they had already dropped from the cache.

The reader stays at most AHEAD parts ahead of the last part sent, so the pages it pulls in are
still cached when their sender wants them, and memory does not grow with the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Collection

from daemon.storage import Digests
from daemon.storage.bodies import new_hasher

CHUNK = 1 << 20
AHEAD = 8  # parts hashed but not yet sent; the page cache holds them meanwhile


class Changed(Exception):
    """The file changed while it was read: the upload is void, the new version comes next."""


class PartDigests:
    """The whole file's SHA-256 and each part's digests, from one sequential read in a thread.

    Start with `start()`; senders `await part(n)` and call `sent(n)`; `await sha256()` gives the
    file's digest; `await close()` ends the read early (a failed or cancelled upload) and returns
    once the thread is done with the file descriptor, which the caller may then close.
    """

    def __init__(
        self, fd: int, size: int, part_size: int, algorithms: tuple[str, ...], skip: Collection[int] = ()
    ) -> None:
        self.fd, self.size, self.part_size, self.algorithms, self.skip = fd, size, part_size, algorithms, set(skip)
        self.count = -(-size // part_size)
        self._loop = asyncio.get_running_loop()
        self._parts = {n: self._loop.create_future() for n in range(1, self.count + 1)}
        self._window = threading.Semaphore(AHEAD)
        self._stopped = threading.Event()
        self._task: asyncio.Future[str] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(asyncio.to_thread(self._read))

    async def part(self, number: int) -> Digests:
        """Part `number`'s digests, once the reader has passed it; the reader's error if it failed."""
        assert self._task is not None
        future = self._parts[number]
        if not future.done():
            await asyncio.wait([future, self._task], return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        self._task.result()  # raises why the reader ended
        raise Changed(f"the read ended before part {number}")

    def sent(self, number: int) -> None:
        """Part `number` is in the store: the reader may run one part further ahead."""
        self._window.release()

    async def sha256(self) -> str:
        assert self._task is not None
        return await self._task

    async def close(self) -> None:
        self._stopped.set()
        if self._task is not None:
            await asyncio.wait([self._task])
            if not self._task.cancelled():
                self._task.exception()  # retrieved: the upload reports its own failure

    def _read(self) -> str:
        whole = hashlib.sha256()
        buffer = bytearray(CHUNK)
        for number in range(1, self.count + 1):
            if number not in self.skip:
                while not self._window.acquire(timeout=0.2):
                    if self._stopped.is_set():
                        raise Changed("stopped")
            hashers = {name: new_hasher(name) for name in self.algorithms} if number not in self.skip else {}
            start = (number - 1) * self.part_size
            for view in self._chunks(buffer, start, min(start + self.part_size, self.size)):
                whole.update(view)
                for hasher in hashers.values():
                    hasher.update(view)
            if number not in self.skip:
                digests = {name: h.digest() for name, h in hashers.items()}
                self._loop.call_soon_threadsafe(self._parts[number].set_result, digests)
        return whole.hexdigest()

    def _chunks(self, buffer: bytearray, start: int, end: int):
        view = memoryview(buffer)
        while start < end:
            if self._stopped.is_set():
                raise Changed("stopped")
            n = os.preadv(self.fd, [view[: min(CHUNK, end - start)]], start)
            if n == 0:
                raise Changed(f"file shrank while hashing: it ends before byte {start} of {self.size}")
            yield view[:n]
            start += n
