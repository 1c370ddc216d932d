"""`put_if_absent`, create-only-if-absent, against every backend: a local directory, moto and the
JuiceFS gateway, all real.

What the stores do with `If-None-Match: *` on PutObject (measured, and asserted below by
`test_moto_honours_if_none_match_juicefs_ignores_it`):
- moto honours it: 412 PreconditionFailed when the key exists, and of concurrent writers one wins.
- the JuiceFS gateway (JuiceFS 1.4, an older MinIO) ignores it: 200 and the object is overwritten,
  every concurrent writer "wins". Its tests assert the degraded behaviour `Storage.put_if_absent`
  documents (True every time, the last write stays, `conditional_writes` never learns), not skip.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
import servers
from botocore.exceptions import ClientError
from servers import S3Bucket
from structlog.testing import capture_logs
from test_storage_s3 import CHECKSUM_HEADER, expected_checksum, record_requests

from daemon.storage import DIGEST_MISMATCH, Storage, StorageError
from daemon.storage import s3 as s3_module
from daemon.storage.local import LocalStorage
from daemon.storage.s3 import S3Storage

KIND = "unit"

# Which backends of the `store` fixture honour conditional writes (see the module docstring).
HONOURS = {"local": True, "moto": True, "juicefs": False}
WRITERS = 8


def backend(request: pytest.FixtureRequest) -> str:
    return request.node.callspec.params["store"]


async def test_first_call_creates_a_second_finds_it(store: Storage, request: pytest.FixtureRequest) -> None:
    assert await store.put_if_absent("job/manifest.json", b"first") is True
    assert await store.get("job/manifest.json") == b"first"
    assert (await store.head("job/manifest.json")).size == 5
    second = await store.put_if_absent("job/manifest.json", b"second, other bytes")
    if HONOURS[backend(request)]:
        assert second is False
        assert await store.get("job/manifest.json") == b"first"
        assert store.conditional_writes is True
    else:  # degraded: a plain put, which the caller cannot tell from a create
        assert second is True
        assert await store.get("job/manifest.json") == b"second, other bytes"
        assert store.conditional_writes is None
    assert [info.key async for info in store.list("job/")] == ["job/manifest.json"]  # no temporary debris


async def test_concurrent_creates_have_one_winner(store: Storage, request: pytest.FixtureRequest) -> None:
    bodies = [f"writer {i}".encode() for i in range(WRITERS)]
    for round_ in range(3):  # a race lost once by luck is not proof
        key = f"race/{round_}"
        won = await asyncio.gather(*(store.put_if_absent(key, body) for body in bodies))
        stored = await store.get(key)
        if HONOURS[backend(request)]:
            assert won.count(True) == 1, won
            assert stored == bodies[won.index(True)]  # the winner's bytes, never replaced by a loser's
        else:  # every writer "created" it; one of them is what stays
            assert won == [True] * WRITERS
            assert stored in bodies


async def test_an_empty_body_and_a_nested_new_folder(store: Storage) -> None:
    assert await store.put_if_absent("deep/new/folders/empty", b"") is True
    assert await store.get("deep/new/folders/empty") == b""
    assert await store.list_dirs("deep/new/") == ["folders"]


async def test_a_missing_key_after_delete_can_be_created_again(store: Storage) -> None:
    assert await store.put_if_absent("again", b"one") is True
    await store.delete("again")
    assert await store.put_if_absent("again", b"two") is True
    assert await store.get("again") == b"two"


# -- S3 -----------------------------------------------------------------------------------------


async def test_moto_honours_if_none_match_juicefs_ignores_it(moto_bucket: S3Bucket, juicefs_bucket: S3Bucket) -> None:
    """The servers' own behaviour, with a plain boto3 client: the evidence behind HONOURS. If a
    JuiceFS upgrade starts honouring the header, this fails and HONOURS should change with it."""
    moto, jfs = moto_bucket, juicefs_bucket
    moto.client.put_object(Bucket=moto.name, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        moto.client.put_object(Bucket=moto.name, Key="k", Body=b"second", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert moto.client.get_object(Bucket=moto.name, Key="k")["Body"].read() == b"first"

    jfs.client.put_object(Bucket=jfs.name, Key="k", Body=b"first", IfNoneMatch="*")
    again = jfs.client.put_object(Bucket=jfs.name, Key="k", Body=b"second", IfNoneMatch="*")
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert jfs.client.get_object(Bucket=jfs.name, Key="k")["Body"].read() == b"second"


@pytest.mark.parametrize("mode", ["md5", "crc32", "none"])
async def test_the_condition_and_the_checksum_are_sent(make_s3_store, mode: str) -> None:
    store = make_s3_store(checksum=mode)
    seen = await record_requests(store)
    assert await store.put_if_absent("c", b"conditional body") is True
    [headers] = [h for method, _, h in seen if method == "PUT"]
    assert headers["if-none-match"] == "*"
    sent = {h for h in headers if h.startswith("x-amz-checksum-") or h == "content-md5"}
    assert sent == ({CHECKSUM_HEADER[mode]} if mode != "none" else set())
    if mode != "none":
        assert headers[CHECKSUM_HEADER[mode]] == expected_checksum(mode, b"conditional body")
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"  # as put: no hashing on the loop


async def test_sse_is_requested(moto_bucket: S3Bucket) -> None:
    async with moto_bucket.storage("", sse="sse-s3") as store:
        assert await store.put_if_absent("enc", b"secret weights") is True
        assert await store.put_if_absent("enc", b"other") is False
    head = moto_bucket.client.head_object(Bucket=moto_bucket.name, Key="enc")
    assert head["ServerSideEncryption"] == "AES256"


async def test_a_501_for_another_header_is_not_taken_for_no_conditions(juicefs_bucket: S3Bucket) -> None:
    """The JuiceFS gateway answers SSE with the very 501 NotImplemented a store without conditional
    writes gives, naming no header. The plain put that follows fails the same way, so the error is
    the caller's and the store is not marked as lacking conditional writes."""
    async with juicefs_bucket.storage(sse="sse-s3") as store:
        seen = await record_requests(store)
        with capture_logs() as logged, pytest.raises(StorageError) as err:
            await store.put_if_absent("k", b"x")
        assert (err.value.code, err.value.http_status, err.value.transient) == ("NotImplemented", 501, False)
        assert store.conditional_writes is None
        assert not [e for e in logged if e["log_level"] == "warning"]
    puts = [h for m, _, h in seen if m == "PUT"]
    assert ["if-none-match" in h for h in puts] == [True, False]  # conditional, then the plain check


async def test_a_corrupted_body_is_refused_not_created(juicefs_bucket: S3Bucket, monkeypatch) -> None:
    """The same Content-MD5 as `put`: JuiceFS verifies it, so a body that differs is refused."""

    async def wrong_digests(body, algorithms):
        return {name: hashlib.new(name, b"not the body").digest() for name in algorithms}

    monkeypatch.setattr(s3_module, "digests", wrong_digests)
    async with juicefs_bucket.storage(checksum="md5") as store:
        with pytest.raises(StorageError) as err:
            await store.put_if_absent("k", b"payload")
        assert err.value.code in DIGEST_MISMATCH
        assert (err.value.op, err.value.transient) == ("put_if_absent", False)
        assert await store.head("k") is None


async def test_a_store_known_without_conditions_gets_a_plain_put(moto_bucket: S3Bucket) -> None:
    """Once a store has said it cannot do conditional writes (501), the header is no longer sent
    and every call is the documented plain put."""
    async with moto_bucket.storage() as store:
        store.conditional_writes = False  # what a 501 NotImplemented answer leaves behind
        seen = await record_requests(store)
        assert await store.put_if_absent("k", b"one") is True
        assert await store.put_if_absent("k", b"two") is True
        assert await store.get("k") == b"two"
    assert all("if-none-match" not in h for m, _, h in seen if m == "PUT")


async def test_s3_errors_keep_their_mapping(s3_bucket: S3Bucket) -> None:
    async with S3Storage(servers.unique_bucket(), "p", s3_bucket.options()) as store:
        with pytest.raises(StorageError) as err:
            await store.put_if_absent("k", b"x")
    assert (err.value.op, err.value.key, err.value.code, err.value.transient) == (
        "put_if_absent",
        "k",
        "NoSuchBucket",
        False,
    )


# -- local directory ----------------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> LocalStorage:
    async with LocalStorage(tmp_path / "store") as store:
        yield store


def debris(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".ckptd-*"))


async def test_local_object_is_durable_with_puts_etag(local: LocalStorage) -> None:
    etag = await local.put("by-put", b"same bytes")
    assert await local.put_if_absent("by-create", b"same bytes") is True
    assert (await local.head("by-create")).etag == etag  # md5, stored with the file as put does
    assert (local.root / "by-create").stat().st_nlink == 1  # the temporary name is gone
    assert debris(local.root) == []


async def test_local_two_stores_on_one_folder_race(tmp_path: Path) -> None:
    """Two processes' worth of stores on one shared folder (each its own threads)."""
    async with LocalStorage(tmp_path / "shared") as a, LocalStorage(tmp_path / "shared") as b:
        for round_ in range(20):
            key = f"r/{round_}"
            won = await asyncio.gather(*(s.put_if_absent(key, bytes([i])) for i, s in enumerate([a, b] * 4)))
            assert won.count(True) == 1, won
            assert await a.get(key) == bytes([won.index(True)])
        assert debris(tmp_path / "shared") == []


async def test_local_refuses_a_folder_or_link_at_the_key(local: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    await local.put("dir/inner", b"x")
    (local.root / "link").symlink_to(outside)
    for key in ("dir", "link"):
        with pytest.raises(StorageError) as err:
            await local.put_if_absent(key, b"new")
        assert (err.value.code, err.value.transient) == ("KeyConflict", False)
    assert outside.read_bytes() == b"secret" and (local.root / "link").is_symlink()
    assert debris(local.root) == []


async def test_local_never_writes_through_a_linked_folder(local: LocalStorage, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    local.root.mkdir(parents=True, exist_ok=True)
    (local.root / "job").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StorageError) as err:
        await local.put_if_absent("job/manifest.json", b"x")
    assert (err.value.code, err.value.transient) == ("KeyConflict", False)
    assert os.listdir(elsewhere) == []


async def test_local_refuses_bad_keys(local: LocalStorage) -> None:
    for key in ("../escape", "/abs", "a/./b", ".ckptd-tmp-x"):
        with pytest.raises(StorageError) as err:
            await local.put_if_absent(key, b"x")
        assert err.value.code == "InvalidKey"


async def test_local_without_hard_links_degrades_to_a_plain_put(local: LocalStorage, monkeypatch) -> None:
    """A FUSE mount without hard links (s3fs, vfat) answers link() with EPERM. None of those can be
    mounted here, so that one answer of the file system is simulated; the store is the real one."""

    def no_links(src, dst, **_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with capture_logs() as logged:
        assert await local.put_if_absent("k", b"one") is True
        assert await local.put_if_absent("k", b"two") is True
    assert await local.get("k") == b"two"
    assert local.conditional_writes is False
    assert LocalStorage.conditional_writes is True  # only this store learned it
    assert [e["event"] for e in logged if e["log_level"] == "warning"] == [
        "the store's file system has no hard links: create-if-absent is a plain put"
    ]
    assert debris(local.root) == []
