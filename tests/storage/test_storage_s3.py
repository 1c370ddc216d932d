"""S3 backend specifics against real servers: checksum modes, payload signing, prefixes, error
classification, and proof that the harness includes a store that really checks what it receives.

What the servers verify (asserted below where it matters):
- JuiceFS gateway (MinIO-derived): rejects a wrong Content-MD5 (BadDigest) and bad credentials,
  verifies a signed payload's SHA-256, but accepts wrong x-amz-checksum-crc32/sha256 values.
- moto: verifies no checksum at all and, in server mode, accepts any credentials; so tests of
  rejection run against JuiceFS, never only against moto.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import zlib
from urllib.parse import urlsplit

import pytest
import servers
from botocore.exceptions import ClientError
from servers import S3Bucket

from daemon.storage import FileRange, S3Options, StorageError
from daemon.storage import s3 as s3_module
from daemon.storage.s3 import S3Storage

KIND = "integration"

MiB = 1 << 20
CHECKSUM_HEADER = {
    "crc32": "x-amz-checksum-crc32",
    "crc32c": "x-amz-checksum-crc32c",
    "md5": "content-md5",
    "sha256": "x-amz-checksum-sha256",
}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def expected_checksum(mode: str, data: bytes) -> str:
    if mode == "crc32":
        return b64(zlib.crc32(data).to_bytes(4, "big"))
    if mode == "crc32c":  # RFC 3720's CRC32C, by hand: an independent check of the hardware one
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
        return b64((crc ^ 0xFFFFFFFF).to_bytes(4, "big"))
    return b64(hashlib.new(mode, data).digest())


async def record_requests(store: S3Storage) -> list[tuple[str, str, dict[str, str]]]:
    """Capture (method, path, headers) of every request the store's client sends from now on."""
    seen: list[tuple[str, str, dict[str, str]]] = []

    def record(request, **_: object) -> None:
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        seen.append((request.method, urlsplit(request.url).path, headers))

    client = await store._get_client()
    client.meta.events.register("before-send.s3", record)
    return seen


@pytest.fixture
def source_fd(tmp_path):
    path = tmp_path / "source.bin"
    data = os.urandom(5 * MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize("mode", ["crc32", "crc32c", "md5", "sha256", "none"])
async def test_checksum_modes_put_and_multipart(make_s3_store, source_fd, mode: str) -> None:
    fd, data = source_fd
    store = make_s3_store(checksum=mode)
    seen = await record_requests(store)
    await store.put("put/small", b"small object")
    await store.put("put/big", FileRange(fd, 0, 2 * MiB))  # above the inline limit: hashed in a thread
    upload = await store.create_multipart("mp/obj")
    part1 = await store.upload_part("mp/obj", upload, 1, FileRange(fd, 0, len(data)))
    part2 = await store.upload_part("mp/obj", upload, 2, b"tail")
    assert (part1.checksum is not None) == (mode in ("crc32", "crc32c", "sha256"))
    await store.complete_multipart("mp/obj", upload, [part1, part2])
    assert await store.get("put/small") == b"small object"
    assert await store.get("put/big") == data[: 2 * MiB]
    assert await store.get("mp/obj") == data + b"tail"

    writes = [(path, headers) for method, path, headers in seen if method == "PUT"]
    assert len(writes) == 4
    for path, headers in writes:
        sent = {h for h in headers if h.startswith("x-amz-checksum-") or h == "content-md5"}
        assert sent == ({CHECKSUM_HEADER[mode]} if mode != "none" else set()), path
        # A checksum covers the body, so nothing hashes it again on the event loop.
        assert (headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD") == (mode != "none")
    small = next(h for p, h in writes if p.endswith("/put/small"))
    if mode != "none":
        assert small[CHECKSUM_HEADER[mode]] == expected_checksum(mode, b"small object")
    create = next(h for m, p, h in seen if m == "POST" and p.endswith("/mp/obj"))
    assert create.get("x-amz-checksum-algorithm") == {"crc32": "CRC32", "crc32c": "CRC32C", "sha256": "SHA256"}.get(
        mode
    )


@pytest.mark.parametrize(
    ("checksum", "signing", "signed"),
    [("crc32", "auto", False), ("none", "auto", True), ("md5", "on", True), ("none", "off", False)],
)
async def test_payload_signing(make_s3_store, source_fd, checksum: str, signing: str, signed: bool) -> None:
    fd, data = source_fd
    store = make_s3_store(checksum=checksum, payload_signing=signing)
    seen = await record_requests(store)
    await store.put("signed", FileRange(fd, 100, MiB))  # signing reads the stream, then rewinds it
    assert await store.get("signed") == data[100 : 100 + MiB]
    content_sha = next(h for m, _, h in seen if m == "PUT")["x-amz-content-sha256"]
    expected = hashlib.sha256(data[100 : 100 + MiB]).hexdigest() if signed else "UNSIGNED-PAYLOAD"
    assert content_sha == expected


async def test_prefix_is_applied_and_stripped(s3_bucket: S3Bucket, make_s3_store) -> None:
    prefixed, bare = make_s3_store("team/ckpts"), make_s3_store("", addressing_style="path")
    seen = await record_requests(bare)
    await prefixed.put("job/a", b"1")
    raw = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]
    assert [o["Key"] for o in raw] == ["team/ckpts/job/a"]
    assert [i.key async for i in prefixed.list("")] == ["job/a"]
    assert [i.key async for i in bare.list("team/")] == ["team/ckpts/job/a"]
    assert await bare.list_dirs("team/") == ["ckpts"]
    assert seen[-1][1].startswith(f"/{s3_bucket.name}")  # path-style addressing
    upload = await prefixed.create_multipart("job/b")
    pending = await prefixed.list_multipart_uploads("job/")
    assert [(u.key, u.upload_id) for u in pending] == [("job/b", upload)]
    await prefixed.abort_multipart("job/b", upload)


async def test_missing_bucket_is_permanent(s3_bucket: S3Bucket) -> None:
    async with S3Storage(servers.unique_bucket(), "p", s3_bucket.options()) as store:
        for attempt in (store.put("k", b"x"), store.get("k"), store.create_multipart("k")):
            with pytest.raises(StorageError) as err:
                await attempt
            assert (err.value.code, err.value.transient) == ("NoSuchBucket", False)
        with pytest.raises(StorageError) as err:
            [info async for info in store.list("")]
        assert (err.value.code, err.value.transient) == ("NoSuchBucket", False)


@pytest.mark.parametrize("wrong", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
async def test_wrong_credentials_are_permanent(juicefs_bucket: S3Bucket, aws_env, wrong: str) -> None:
    aws_env.setenv(wrong, "not-the-right-value")
    async with juicefs_bucket.storage() as store:
        with pytest.raises(StorageError) as err:
            await store.put("k", b"x")
    assert err.value.code in ("SignatureDoesNotMatch", "InvalidAccessKeyId")
    assert (err.value.http_status, err.value.transient) == (403, False)
    assert "not-the-right-value" not in str(err.value)


async def test_no_credentials_is_permanent(aws_env) -> None:
    endpoint = f"http://127.0.0.1:{servers.free_port()}"
    async with S3Storage("bucket", "", S3Options(endpoint_url=endpoint)) as store:
        with pytest.raises(StorageError) as err:
            await store.put("k", b"x")
    assert (err.value.code, err.value.transient) == ("NoCredentials", False)


async def test_connection_refused_is_transient(aws_env) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", "id")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    endpoint = f"http://127.0.0.1:{servers.free_port()}"  # nothing listens there
    async with S3Storage("bucket", "", S3Options(endpoint_url=endpoint)) as store:
        for attempt in (store.put("k", b"x"), store.head("k"), store.get("k")):
            with pytest.raises(StorageError) as err:
                await attempt
            assert (err.value.code, err.value.transient) == ("NetworkError", True)


async def test_juicefs_rejects_wrong_content_md5_moto_does_not(juicefs_bucket: S3Bucket, moto_bucket: S3Bucket) -> None:
    """The harness includes a store that checks: a corrupted body is caught by the JuiceFS gateway."""
    wrong_md5 = b64(hashlib.md5(b"something else").digest())
    jfs = juicefs_bucket
    with pytest.raises(ClientError) as err:
        jfs.client.put_object(Bucket=jfs.name, Key="k", Body=b"payload", ContentMD5=wrong_md5)
    assert err.value.response["Error"]["Code"] == "BadDigest"
    # moto stores it regardless: a passing test against moto alone proves nothing about integrity.
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key="k", Body=b"payload", ContentMD5=wrong_md5)
    assert moto_bucket.client.get_object(Bucket=moto_bucket.name, Key="k")["Body"].read() == b"payload"


async def test_corrupted_body_is_reported_as_bad_digest(juicefs_bucket: S3Bucket, monkeypatch) -> None:
    async def wrong_digests(body, algorithms):
        return {name: hashlib.new(name, b"not the body").digest() for name in algorithms}

    monkeypatch.setattr(s3_module, "digests", wrong_digests)
    async with juicefs_bucket.storage(checksum="md5") as store:
        with pytest.raises(StorageError) as err:
            await store.put("k", b"payload")
    assert (err.value.code, err.value.http_status, err.value.transient) == ("BadDigest", 400, False)


async def test_sse_s3_is_requested(moto_bucket: S3Bucket) -> None:
    async with moto_bucket.storage("", sse="sse-s3") as store:
        await store.put("enc", b"secret weights")
        upload = await store.create_multipart("enc-mp")
        part = await store.upload_part("enc-mp", upload, 1, b"x")
        await store.complete_multipart("enc-mp", upload, [part])
    for key in ("enc", "enc-mp"):
        head = moto_bucket.client.head_object(Bucket=moto_bucket.name, Key=key)
        assert head["ServerSideEncryption"] == "AES256"


async def test_cancellation_propagates_untouched(juicefs_bucket: S3Bucket, source_fd) -> None:
    fd, data = source_fd
    async with juicefs_bucket.storage() as store:
        sending = asyncio.Event()
        client = await store._get_client()
        client.meta.events.register("before-send.s3", lambda **_: sending.set())
        task = asyncio.create_task(store.put("cancelled", FileRange(fd, 0, len(data))))
        await asyncio.wait_for(sending.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.put("after", b"still usable") is not None
