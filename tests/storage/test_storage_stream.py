"""`Storage.get_stream`, run against every backend (local directory, moto, the JuiceFS gateway):
the bytes of a range as they arrive, never the whole range at once, with `get`'s errors; on S3 a
connection cut mid-body is a transient error, and an abandoned body does not spoil the pool."""

from __future__ import annotations

import contextlib
import dataclasses
import random

import pytest
from proxy import Proxy
from servers import S3_PREFIX

from daemon.storage import Storage, StorageError
from daemon.storage.s3 import S3Storage

KIND = "unit"  # the moto and JuiceFS cases count as integration (conftest)

MiB = 1 << 20
DATA = random.Random(11).randbytes(3 * MiB + 5)


async def chunks(store: Storage, key: str, start: int, end: int) -> list[bytes]:
    return [chunk async for chunk in store.get_stream(key, start, end)]


@pytest.mark.parametrize(
    "start, end",
    [(0, len(DATA)), (10, 20), (len(DATA) - 5, len(DATA)), (MiB - 1, 2 * MiB + 1), (7, 7)],
    ids=["whole", "small", "tail", "across-pieces", "empty"],
)
async def test_a_stream_is_the_range_in_order(store: Storage, start: int, end: int) -> None:
    await store.put("s/obj", DATA)
    got = await chunks(store, "s/obj", start, end)
    assert b"".join(got) == DATA[start:end] == await store.get("s/obj", start, end)
    assert all(got)  # no empty chunks


async def test_a_big_range_arrives_in_pieces(store: Storage) -> None:
    await store.put("s/obj", DATA)
    got = await chunks(store, "s/obj", 0, len(DATA))
    assert len(got) > 1 and max(map(len, got)) <= 2 * MiB  # never the whole range in one piece


async def test_a_range_past_the_end_is_clipped_or_refused(store: Storage) -> None:
    await store.put("s/obj", DATA[:100])
    assert b"".join(await chunks(store, "s/obj", 50, 500)) == DATA[50:100]
    with pytest.raises(StorageError) as err:
        await chunks(store, "s/obj", 200, 300)
    assert (err.value.code, err.value.transient) == ("InvalidRange", False)


async def test_a_missing_object_is_no_such_key(store: Storage) -> None:
    with pytest.raises(StorageError) as err:
        await chunks(store, "s/missing", 0, 10)
    assert (err.value.code, err.value.transient) == ("NoSuchKey", False)


async def test_abandoned_streams_leave_the_store_usable(store: Storage) -> None:
    await store.put("s/obj", DATA)
    for _ in range(12):  # more than the connection pool holds
        async with contextlib.aclosing(store.get_stream("s/obj", 0, len(DATA))) as stream:
            assert await anext(stream)
    assert b"".join(await chunks(store, "s/obj", 0, len(DATA))) == DATA


async def test_a_connection_cut_mid_body_is_transient(moto_bucket) -> None:
    big = random.Random(12).randbytes(64 * MiB)  # far more than the socket buffers hold
    async with moto_bucket.storage() as direct:
        await direct.put("s/big", big)
    proxy = Proxy(int(moto_bucket.server.endpoint_url.rsplit(":", 1)[1]))
    try:
        got = [0]

        async def read(s3: S3Storage) -> None:
            async for chunk in s3.get_stream("s/big", 0, len(big)):
                if not got[0]:
                    proxy.down()  # the first chunk is in: cut the connection under the body
                got[0] += len(chunk)

        options = dataclasses.replace(moto_bucket.options(), endpoint_url=proxy.endpoint)
        async with S3Storage(moto_bucket.name, S3_PREFIX, options) as s3:
            with pytest.raises(StorageError) as err:
                await read(s3)
        assert err.value.transient and 0 < got[0] < len(big)
    finally:
        proxy.down()
