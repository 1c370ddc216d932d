"""How aiohttp sends a RangeReader: from the event loop while the page cache holds the bytes.

aiohttp sends any file-like body by hopping to a thread for every 256 KiB read, about 4,000
hops per GB, each costing more CPU than the read itself. A part about to be sent was read
moments ago to hash it, so its pages are cached: a non-blocking read (`RWF_NOWAIT`, which fails
with EAGAIN rather than wait for the disk) gets them without a thread, and only a read that would
block, such as a part resumed after a restart, goes to a thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from aiohttp import payload

from daemon.storage.bodies import RangeReader

SEND_CHUNK = 1 << 20
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def read_nowait(reader: RangeReader, size: int) -> bytearray | memoryview | None:
    """Up to `size` bytes from the reader's position if the page cache has some; None if a read
    would wait for the disk (or the kernel cannot say). A new buffer each time: the transport may
    hold on to it until the socket takes it."""
    if not _NOWAIT:
        return None
    buffer = bytearray(min(size, len(reader) - reader.tell()))
    try:
        got = reader.readinto_flags(buffer, _NOWAIT)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return buffer if got == len(buffer) else memoryview(buffer)[:got]


class RangePayload(payload.Payload):
    """A RangeReader body (possibly behind aiobotocore's proxy), sent in 1 MiB writes."""

    _start: int | None = None

    def __init__(self, value: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(value, *args, **kwargs)
        self._size = len(value) - value.tell()

    @property
    def size(self) -> int:
        return self._size

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file range is sent as bytes, never decoded")

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        reader = self._value
        if self._start is None:
            self._start = reader.tell()
        else:  # a resend on a new connection starts the range again
            reader.seek(self._start)
        remaining = self._size if content_length is None else min(content_length, self._size)
        while remaining > 0:
            want = min(SEND_CHUNK, remaining)
            chunk = read_nowait(reader, want)
            if not chunk:
                chunk = await asyncio.to_thread(reader.read, want)
            if not chunk:
                raise OSError(f"file shrank while uploading: {reader.tell()} of {len(reader)} bytes")
            await writer.write(chunk)
            remaining -= len(chunk)


payload.register_payload(RangePayload, RangeReader, order=payload.Order.try_first)
