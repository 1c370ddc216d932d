"""Landing a stored object in a file while it downloads (daemon/restore/landing.py): the SHA-256
follows the landed prefix whatever order the pieces come in, a range streams in batches and
resumes where it stopped, and the store's bytes are refused unless they are exactly the range."""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import os
import random
from pathlib import Path

import pytest

from daemon.restore import landing
from daemon.restore.landing import BATCH, Corrupt, Landing, PrefixHasher, Range
from daemon.storage import StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline, retrying

KIND = "unit"
DATA = random.Random(3).randbytes(3 * BATCH + 12345)


@pytest.fixture
def fd(tmp_path: Path):
    fd = os.open(tmp_path / "landed.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    yield fd
    os.close(fd)


def pieces(data: bytes, seed: int) -> list[tuple[int, list[bytes]]]:
    """`data` cut at random points into pieces of one to three chunks, shuffled."""
    rng, out, pos = random.Random(seed), [], 0
    while pos < len(data):
        end = min(pos + rng.randint(1, 200_000), len(data))
        bounds = [pos, *sorted(rng.randint(pos, end) for _ in range(2)), end]
        out.append((pos, [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]))
        pos = end
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_prefix_hasher_gets_the_digest_whatever_the_order_and_threads(fd, seed):
    hasher = PrefixHasher(fd)

    def land(piece: tuple[int, list[bytes]]) -> None:
        start, chunks = piece
        os.pwritev(fd, chunks, start)
        hasher.landed(start, chunks)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(land, pieces(DATA, seed)))
    assert hasher.done == len(DATA)
    assert hasher.hexdigest() == hashlib.sha256(DATA).hexdigest()


def test_bytes_beyond_the_prefix_are_hashed_as_they_are_in_the_file(fd):
    """A piece that lands ahead is read back when the prefix reaches it: what is verified is the
    file, so bytes changed in the file after they were written are caught."""
    hasher = PrefixHasher(fd)
    os.pwrite(fd, DATA[100:200], 100)
    hasher.landed(100, [DATA[100:200]])
    os.pwrite(fd, b"X", 150)  # the file changes under the writer
    os.pwrite(fd, DATA[:100], 0)
    hasher.landed(0, [DATA[:100]])
    assert hasher.done == 200
    assert hasher.hexdigest() == hashlib.sha256(DATA[:150] + b"X" + DATA[151:200]).hexdigest()


def test_finish_compares_size_and_digest_then_syncs(fd):
    good = Landing(fd)
    good.write(0, [DATA[:1000], DATA[1000:5000]])
    with pytest.raises(Corrupt, match="size 5000, expected 5001"):
        good.finish(5001, hashlib.sha256(DATA[:5000]).hexdigest())
    with pytest.raises(Corrupt, match=r"sha256 \w+, manifest says 0+$"):
        good.finish(5000, "0" * 64)
    good.finish(5000, hashlib.sha256(DATA[:5000]).hexdigest())
    Landing(fd, verify=False).finish(5000, None)  # size only: a file with no manifest


def test_a_hole_is_never_verified(fd):
    """Bytes that never landed (a gap) leave the digest short of the size: refused, never zeros."""
    hole = Landing(fd)
    hole.write(0, [DATA[:100]])
    hole.write(200, [DATA[200:300]])
    with pytest.raises(Corrupt, match="only 100 of 300 bytes were verified"):
        hole.finish(300, hashlib.sha256(DATA[:300]).hexdigest())


class Store(LocalStorage):
    """A real file:// store whose streams can come in tiny chunks, fail once mid-body or send a
    wrong length; every stream's (start, end) is recorded."""

    def __init__(self, root: Path, chunk: int = 65536, fail_after: int | None = None, extra: bytes = b"") -> None:
        super().__init__(root)
        self.chunk, self.fail_after, self.extra, self.streams = chunk, fail_after, extra, []

    async def get_stream(self, key, start, end):
        self.streams.append((start, end))
        sent = 0
        async for piece in super().get_stream(key, start, end):
            for i in range(0, len(piece), self.chunk):
                if self.fail_after is not None and sent >= self.fail_after:
                    self.fail_after = None  # once
                    raise StorageError("get", key, "NetworkError", "connection reset", transient=True)
                yield piece[i : i + self.chunk]
                sent += len(piece[i : i + self.chunk])
        if self.extra:
            yield self.extra


async def pull(store: Store, fd: int, start: int, end: int) -> list[int]:
    part, landed = Range(store, "obj", Landing(fd), start, end), []
    await retrying(lambda: part.pull(landed.append), deadline=Deadline.after(5), counter=None)
    return landed


async def test_a_range_lands_in_batches_at_its_offset(tmp_path, fd):
    async with Store(tmp_path / "store") as store:
        await store.put("obj", DATA)
        landed = await pull(store, fd, 1000, len(DATA))
        assert os.pread(fd, len(DATA), 1000) == DATA[1000:]
        assert sum(landed) == len(DATA) - 1000 and max(landed) <= BATCH + 65536
        assert len(landed) >= (len(DATA) - 1000) // (BATCH + 65536)  # never the whole range at once


async def test_a_stream_cut_mid_body_resumes_at_the_first_byte_not_written(tmp_path, fd):
    async with Store(tmp_path / "store", fail_after=BATCH + 3 * 65536) as store:
        await store.put("obj", DATA)
        lander = Landing(fd)
        part = Range(store, "obj", lander, 0, len(DATA))
        await retrying(lambda: part.pull(lambda n: None), deadline=Deadline.after(5), counter=None)
        # The first batch was written; the chunks after it were dropped and fetched again.
        assert store.streams == [(0, len(DATA)), (BATCH, len(DATA))]
        lander.finish(len(DATA), hashlib.sha256(DATA).hexdigest())


async def test_tiny_chunks_are_written_in_bounded_batches(tmp_path, fd, monkeypatch):
    monkeypatch.setattr(landing, "MAX_BUFFERS", 16)  # pwritev's buffer count stays bounded
    async with Store(tmp_path / "store", chunk=7) as store:
        await store.put("obj", DATA[:5000])
        landed = await pull(store, fd, 0, 5000)
        assert os.pread(fd, 6000, 0) == DATA[:5000] and max(landed) <= 16 * 7


@pytest.mark.parametrize(
    "size, extra, error",
    [
        (4000, b"", r"bytes \[0, 5000\) of the object came back as 4000 bytes"),  # short
        (5000, b"!", r"bytes \[0, 5000\) of the object came back longer"),  # long
    ],
)
async def test_a_body_of_the_wrong_length_is_corrupt(tmp_path, fd, size, extra, error):
    async with Store(tmp_path / "store", extra=extra) as store:
        await store.put("obj", DATA[:size])
        with pytest.raises(Corrupt, match=error):
            await pull(store, fd, 0, 5000)


async def test_a_range_past_the_end_is_corrupt(tmp_path, fd):
    async with Store(tmp_path / "store") as store:
        await store.put("obj", DATA[:100])
        with pytest.raises(Corrupt, match="the object ends before byte 200"):
            await pull(store, fd, 200, 300)


def test_writeback_of_a_written_range_is_harmless(fd):
    os.pwrite(fd, DATA[:8192], 0)
    landing.start_writeback(fd, 0, 8192)
    landing.start_writeback(fd, 0, 1 << 40)  # past the end: nothing to write, no error
    assert os.pread(fd, 8192, 0) == DATA[:8192]
