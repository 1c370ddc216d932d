"""The upload queue: lanes, one entry per path, never two uploads of one path at once."""

from __future__ import annotations

import asyncio

from daemon.upload.complete import Identity
from daemon.upload.pin import Pin
from daemon.upload.queue import LARGE, SMALL, Job, UploadQueue

KIND = "unit"


def job(relpath: str, size: int) -> Job:
    return Job(Pin(relpath, Identity(1, hash(relpath) & 0xFFFF, size, 1), None, None), relpath)


async def test_small_files_have_their_own_lane():
    q = UploadQueue(threshold=100)
    q.put(job("big", 1000))
    q.put(job("small", 10))
    assert (await q.get(SMALL)).relpath == "small"
    assert (await q.get(LARGE)).relpath == "big"


async def test_newer_version_replaces_queued_one():
    q = UploadQueue(threshold=100)
    old = job("a", 10)
    q.put(old)
    assert q.put(job("a", 20)) is old
    assert (await q.get(SMALL)).size == 20


async def test_same_path_waits_for_the_upload_in_flight():
    q = UploadQueue(threshold=100)
    q.put(job("a", 10))
    first = await q.get(SMALL)
    q.put(job("a", 11))
    q.put(job("b", 12))
    assert (await q.get(SMALL)).relpath == "b"  # 'a' is skipped while its older version uploads
    waiter = asyncio.create_task(q.get(SMALL))
    await asyncio.sleep(0)
    assert not waiter.done()
    q.done(first)
    assert (await asyncio.wait_for(waiter, 5)).size == 11
    assert q.queued("a") and not q.empty()
