"""A file range is sent from the page cache without a thread, and from a thread when the read
would wait for the disk (daemon/storage/payload.py); what arrives is the range, byte for byte."""

from __future__ import annotations

import asyncio
import os

import pytest
from engines import until

from daemon.storage import FileRange
from daemon.storage import payload as payload_module
from daemon.storage.bodies import RangeReader
from daemon.storage.payload import RangePayload

KIND = "unit"

MiB = 1 << 20


class Collect:
    """aiohttp's writer as far as a payload sees it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, chunk) -> None:
        self.chunks.append(bytes(chunk))


@pytest.fixture
def ranged(tmp_path):
    data = os.urandom(3 * MiB + 7)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


async def test_cached_bytes_are_read_on_the_loop_in_whole_chunks(ranged, monkeypatch) -> None:
    fd, data = ranged
    threads = []
    real = asyncio.to_thread
    monkeypatch.setattr(payload_module.asyncio, "to_thread", lambda *a: threads.append(a) or real(*a))
    sent = RangePayload(RangeReader(FileRange(fd, 100, 2 * MiB + 5)))
    assert sent.size == 2 * MiB + 5
    out = Collect()
    await sent.write(out)
    assert b"".join(out.chunks) == data[100 : 100 + 2 * MiB + 5]
    assert [len(c) for c in out.chunks] == [MiB, MiB, 5]
    assert threads == []  # written moments ago: every byte came from the cache


async def test_uncached_bytes_are_read_in_a_thread(tmp_path, monkeypatch) -> None:
    data = os.urandom(2 * MiB)
    path = tmp_path / "cold.bin"
    path.write_bytes(data)
    threads = []
    real = asyncio.to_thread
    monkeypatch.setattr(payload_module.asyncio, "to_thread", lambda *a: threads.append(a) or real(*a))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)

    async def sent_uncached() -> bool:
        # DONTNEED drops clean pages, but not those still on another CPU's LRU batch or under
        # writeback: ask again until a send finds the disk, not the cache, behind the range.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = Collect()
        await RangePayload(RangeReader(FileRange(fd, 0, 2 * MiB))).write(out)
        assert b"".join(out.chunks) == data
        return bool(threads)

    try:
        await until(sent_uncached, 30, "a send that found the pages uncached")
    finally:
        os.close(fd)


async def test_a_resend_starts_the_range_again_and_a_length_limit_holds(ranged) -> None:
    fd, data = ranged
    sent = RangePayload(RangeReader(FileRange(fd, 0, 3 * MiB)))
    first = Collect()
    await sent.write_with_length(first, MiB + 1)
    assert b"".join(first.chunks) == data[: MiB + 1]
    again = Collect()
    await sent.write(again)  # a retry on a fresh connection
    assert b"".join(again.chunks) == data[: 3 * MiB]


async def test_a_file_that_shrank_while_sending_fails(ranged, tmp_path) -> None:
    fd, _ = ranged
    os.truncate(tmp_path / "f.bin", MiB)
    with pytest.raises(OSError, match="shrank"):
        await RangePayload(RangeReader(FileRange(fd, 0, 3 * MiB))).write(Collect())
