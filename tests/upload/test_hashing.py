"""One sequential read gives the file's SHA-256 and every part's checksum (daemon/upload/hashing.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib

import pytest

from daemon.upload import hashing
from daemon.upload.hashing import Changed, PartDigests

KIND = "unit"

MiB = 1 << 20


@pytest.fixture
def data_fd(tmp_path):
    data = os.urandom(5 * MiB + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data, path
    os.close(fd)


async def test_one_read_gives_the_whole_file_digest_and_each_parts(data_fd) -> None:
    fd, data, _ = data_fd
    part = 2 * MiB
    hashed = PartDigests(fd, len(data), part, ("crc32", "md5"))
    hashed.start()
    parts = {}
    for n in range(1, hashed.count + 1):
        parts[n] = await hashed.part(n)
        hashed.sent(n)
    assert await hashed.sha256() == hashlib.sha256(data).hexdigest()
    assert hashed.count == 3
    for n, got in parts.items():
        piece = data[(n - 1) * part : n * part]
        assert got == {"crc32": zlib.crc32(piece).to_bytes(4, "big"), "md5": hashlib.md5(piece).digest()}


async def test_skipped_parts_count_in_the_file_digest_but_get_no_part_digest(data_fd) -> None:
    fd, data, _ = data_fd
    hashed = PartDigests(fd, len(data), 2 * MiB, ("crc32",), skip={1, 3})
    hashed.start()
    assert (await hashed.part(2))["crc32"] == zlib.crc32(data[2 * MiB : 4 * MiB]).to_bytes(4, "big")
    hashed.sent(2)
    assert await hashed.sha256() == hashlib.sha256(data).hexdigest()
    assert not hashed._parts[1].done() and not hashed._parts[3].done()


async def test_the_reader_waits_for_senders_beyond_its_window(data_fd, monkeypatch) -> None:
    fd, data, _ = data_fd
    monkeypatch.setattr(hashing, "AHEAD", 1)
    hashed = PartDigests(fd, len(data), 2 * MiB, ())
    hashed.start()
    await hashed.part(1)
    await asyncio.sleep(0.3)  # room to run ahead, if the window did not hold it
    assert not hashed._parts[2].done()
    hashed.sent(1)
    await asyncio.wait_for(hashed.part(2), 5)
    hashed.sent(2)
    await hashed.part(3)
    hashed.sent(3)
    assert await hashed.sha256() == hashlib.sha256(data).hexdigest()


async def test_a_file_that_shrank_fails_every_waiting_part_with_changed(data_fd) -> None:
    fd, data, path = data_fd
    os.truncate(path, 3 * MiB)
    hashed = PartDigests(fd, len(data), 2 * MiB, ("crc32",))
    hashed.start()
    await hashed.part(1)
    hashed.sent(1)
    with pytest.raises(Changed, match="shrank"):
        await hashed.part(2)
    with pytest.raises(Changed):
        await hashed.part(3)
    with pytest.raises(Changed):
        await hashed.sha256()


async def test_close_stops_a_reader_held_by_its_window_and_waits_for_it(data_fd, monkeypatch) -> None:
    fd, data, _ = data_fd
    monkeypatch.setattr(hashing, "AHEAD", 1)
    hashed = PartDigests(fd, len(data), 2 * MiB, ())
    hashed.start()
    await hashed.part(1)  # the reader now waits for a sender that will never come
    await asyncio.wait_for(hashed.close(), 5)
    assert hashed._task is not None and hashed._task.done()  # the descriptor may be closed now


async def test_a_read_error_reaches_the_senders_as_itself(tmp_path) -> None:
    path = tmp_path / "d"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY)  # reading a folder fails with EISDIR, like EIO on a bad disk
    try:
        hashed = PartDigests(fd, 10 * MiB, 5 * MiB, ("crc32",))
        hashed.start()
        with pytest.raises(IsADirectoryError):
            await hashed.part(1)
        await hashed.close()
    finally:
        os.close(fd)
