"""The Storage contract, run against every backend: local directory, moto and the JuiceFS gateway."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from daemon.storage import DIGEST_MISMATCH, FileRange, Storage, StorageError
from daemon.storage.bodies import digests_sync
from daemon.storage.local import LocalStorage

KIND = "unit"

MiB = 1 << 20


@pytest.fixture
def data_file(tmp_path: Path):
    """Write bytes to a file and return an open read-only fd (closed after the test)."""
    fds: list[int] = []

    def make(data: bytes) -> int:
        path = tmp_path / f"src-{len(fds)}.bin"
        path.write_bytes(data)
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


async def keys(store: Storage, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def test_put_head_get_roundtrip(store: Storage) -> None:
    etag = await store.put("job/rank-0/a.bin", b"hello world")
    info = await store.head("job/rank-0/a.bin")
    assert info is not None
    assert (info.key, info.size, info.etag) == ("job/rank-0/a.bin", 11, etag)
    assert info.last_modified.tzinfo is not None
    assert await store.get("job/rank-0/a.bin") == b"hello world"


async def test_put_overwrites_and_accepts_empty_and_file_range(store: Storage, data_file) -> None:
    await store.put("k", b"old contents")
    await store.put("k", b"")
    assert await store.get("k") == b""
    fd = data_file(b"0123456789")
    await store.put("k", FileRange(fd, 2, 5))
    assert await store.get("k") == b"23456"
    assert (await store.head("k")).size == 5


async def test_ranged_get(store: Storage) -> None:
    await store.put("r", bytes(range(256)))
    assert await store.get("r", 10, 20) == bytes(range(10, 20))
    assert await store.get("r", 250) == bytes(range(250, 256))
    assert await store.get("r", 0, 1) == b"\x00"
    assert await store.get("r", 200, 1000) == bytes(range(200, 256))  # end past the object: clipped


async def test_missing_objects(store: Storage) -> None:
    assert await store.head("nope/missing") is None
    with pytest.raises(StorageError) as err:
        await store.get("nope/missing")
    assert (err.value.code, err.value.transient) == ("NoSuchKey", False)
    await store.delete("nope/missing")  # deleting a missing object is not an error


async def test_delete(store: Storage) -> None:
    await store.put("d/one", b"1")
    await store.put("d/two", b"2")
    await store.delete("d/one")
    assert await store.head("d/one") is None
    assert await keys(store, "d/") == ["d/two"]


async def test_list_prefix_and_order(store: Storage) -> None:
    names = ["p/b", "p/a/2", "p/a/1", "p/a-z", "q/x", "p2/y", "top"]
    await asyncio.gather(*(store.put(name, name.encode()) for name in names))
    assert await keys(store, "p/") == ["p/a-z", "p/a/1", "p/a/2", "p/b"]
    assert await keys(store, "p") == ["p/a-z", "p/a/1", "p/a/2", "p/b", "p2/y"]
    assert await keys(store, "p/a/") == ["p/a/1", "p/a/2"]
    assert await keys(store, "none/") == []
    assert await keys(store) == sorted(names)
    sizes = {info.key: info.size async for info in store.list("")}
    assert sizes["p/a-z"] == 5


async def test_list_dirs(store: Storage) -> None:
    for name in ("jobs/run-1/rank-0/f", "jobs/run-2/x", "jobs/run-10/rank-1/g", "jobs/file", "other/z"):
        await store.put(name, b".")
    assert sorted(await store.list_dirs("jobs/")) == ["run-1", "run-10", "run-2"]
    assert sorted(await store.list_dirs("jobs/run-1")) == ["run-1", "run-10"]
    assert sorted(await store.list_dirs("")) == ["jobs", "other"]
    assert await store.list_dirs("jobs/run-10/rank-1/") == []
    assert await store.list_dirs("absent/") == []


async def test_list_paginates_past_1000_keys(store: Storage) -> None:
    limit = asyncio.Semaphore(32)

    async def put(i: int) -> None:
        async with limit:
            await store.put(f"many/{i:05d}", b"x")

    await asyncio.gather(*(put(i) for i in range(1100)))
    await store.put("manz", b"outside the prefix")
    listed = await keys(store, "many/")
    assert listed == [f"many/{i:05d}" for i in range(1100)]


async def test_multipart_bytes_and_file_range(store: Storage, data_file) -> None:
    first, second = os.urandom(5 * MiB), os.urandom(MiB + 17)
    fd = data_file(b"junk" + second + b"junk")
    upload = await store.create_multipart("mp/obj")
    part2 = await store.upload_part("mp/obj", upload, 2, FileRange(fd, 4, len(second)))
    part1 = await store.upload_part("mp/obj", upload, 1, first)
    assert (part1.size, part2.size) == (len(first), len(second))
    listed = await store.list_parts("mp/obj", upload)
    assert [(p.number, p.etag, p.size) for p in listed] == [
        (1, part1.etag, len(first)),
        (2, part2.etag, len(second)),
    ]
    assert [u.upload_id for u in await store.list_multipart_uploads("mp/")] == [upload]
    etag = await store.complete_multipart("mp/obj", upload, [part2, part1])
    assert (await store.head("mp/obj")).etag == etag
    assert await store.get("mp/obj") == first + second
    assert await store.list_multipart_uploads("mp/") == []


async def test_abort_and_list_multipart_uploads(store: Storage) -> None:
    a = await store.create_multipart("up/a")
    b = await store.create_multipart("up/b")
    other = await store.create_multipart("elsewhere/c")
    await store.upload_part("up/a", a, 1, b"some bytes")
    pending = await store.list_multipart_uploads("up/")
    assert sorted((u.key, u.upload_id) for u in pending) == [("up/a", a), ("up/b", b)]
    assert all(u.initiated.tzinfo is not None for u in pending)
    await store.abort_multipart("up/a", a)
    await store.abort_multipart("up/a", a)  # aborting twice is fine
    assert [u.key for u in await store.list_multipart_uploads("up/")] == ["up/b"]
    assert await store.head("up/a") is None
    for key, upload in (("up/b", b), ("elsewhere/c", other)):
        await store.abort_multipart(key, upload)
    assert await store.list_multipart_uploads("") == []


async def test_64_mib_multipart_roundtrip_is_byte_identical(store: Storage, data_file) -> None:
    """The acceptance point: a big file, uploaded as concurrent parts read straight from disk."""
    data = os.urandom(64 * MiB)
    fd = data_file(data)
    part_size = 16 * MiB
    upload = await store.create_multipart("big/model.safetensors")
    parts = await asyncio.gather(
        *(
            store.upload_part("big/model.safetensors", upload, n + 1, FileRange(fd, n * part_size, part_size))
            for n in range(4)
        )
    )
    await store.complete_multipart("big/model.safetensors", upload, list(parts))
    assert (await store.head("big/model.safetensors")).size == len(data)
    stored = await store.get("big/model.safetensors")
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    tail = await store.get("big/model.safetensors", 64 * MiB - 100)
    assert tail == data[-100:]


async def test_presign_get_is_fetchable(store: Storage) -> None:
    await store.put("share/file name.txt", b"shared bytes")
    url = await store.presign_get("share/file name.txt", 600)
    if url.startswith("file://"):
        assert Path(unquote(urlsplit(url).path)).read_bytes() == b"shared bytes"
        return
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert body == b"shared bytes"


@pytest.fixture(params=["local", "juicefs-md5"])
async def verifying_store(request: pytest.FixtureRequest, tmp_path, aws_env) -> AsyncIterator[Storage]:
    """Backends that verify what they are sent. Moto checks no checksums, and the JuiceFS gateway
    (an older MinIO) ignores flexible ones (crc32, sha256) while it checks Content-MD5; AWS S3
    checks all three. Where the store checks nothing, the uploader's identity check after the
    send and the manifest withdrawal before it are what keep a torn body out of a commit."""
    if request.param == "local":
        async with LocalStorage(tmp_path / "store") as local:
            yield local
        return
    bucket = request.getfixturevalue("juicefs_bucket")
    async with bucket.storage(checksum=request.param.split("-")[1]) as s3:
        yield s3


async def test_a_body_that_differs_from_its_digests_is_refused_and_the_old_object_kept(
    verifying_store: Storage, data_file
) -> None:
    """A file rewritten in place between hashing and sending: the store refuses the body instead of
    replacing a good object with bytes nobody hashed."""
    store = verifying_store
    await store.put("k", b"version one, committed")
    hashed = digests_sync(b"version two, as hashed", ("sha256", *store.verifies))
    fd = data_file(b"version 2!, as it reads")  # same length, other bytes: a torn rewrite
    with pytest.raises(StorageError) as refused:
        await store.put("k", FileRange(fd, 0, os.fstat(fd).st_size), hashed)
    assert refused.value.code in DIGEST_MISMATCH, refused.value
    assert await store.get("k") == b"version one, committed"
    # The same digests with the bytes they describe are accepted.
    fd = data_file(b"version two, as hashed")
    await store.put("k", FileRange(fd, 0, os.fstat(fd).st_size), hashed)
    assert await store.get("k") == b"version two, as hashed"
