"""Pure rules of the transfer step: part sizes and retry-or-give-up."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from daemon.storage import StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline, backoff, should_retry
from daemon.upload.health import StoreHealth
from daemon.upload.journal import Journal
from daemon.upload.pin import Staging
from daemon.upload.throttle import Throttle
from daemon.upload.transfer import MAX_PARTS, Transfer, part_size_for

KIND = "unit"

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    "size, configured, part",
    [
        (100 * MiB, None, 16 * MiB),
        (100 * MiB, 64 * MiB, 64 * MiB),
        (TiB, None, 105 * MiB),
        (TiB, 8 * MiB, 105 * MiB),
        (5 * TiB, None, 525 * MiB),
    ],
)
def test_part_size_table(size, configured, part):
    assert part_size_for(size, configured) == part
    assert -(-size // part) <= MAX_PARTS


@pytest.mark.parametrize(
    "attempt, rand, delay",
    [(1, 0.0, 0.1), (1, 1.0, 0.2), (3, 0.5, 0.6), (20, 0.0, 10.0), (20, 1.0, 20.0)],
)
def test_backoff_table(attempt, rand, delay):
    assert backoff(attempt, rand) == pytest.approx(delay)


@pytest.mark.parametrize(
    "code, deadline, retry",
    [
        ("AccessDenied", None, False),
        ("SlowDown", None, True),
        ("SlowDown", 100.0, True),  # now 10 + delay 1 < 100
        ("SlowDown", 10.5, False),  # now 10 + delay 1 >= 10.5
    ],
)
def test_should_retry_table(code, deadline, retry):
    assert should_retry(StorageError("put", "k", code, "m"), 1.0, 10.0, deadline) is retry


async def test_starting_a_multipart_upload_never_fsyncs_on_the_event_loop(tmp_path, monkeypatch):
    """The journal records the new upload durably before any part is sent, and the fsync that takes
    runs in a thread: the loop that serves /healthz and every other upload must not wait on the disk."""
    loop_thread = threading.get_ident()
    on_loop: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if threading.get_ident() == loop_thread:
            on_loop.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    journal = Journal(str(tmp_path / "state" / "journal.jsonl"))
    await asyncio.to_thread(journal.open)
    (tmp_path / "staging").mkdir()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * MiB))
    pin = Staging(str(tmp_path / "staging")).pin(str(big), "big.bin")
    transfer = Transfer(
        LocalStorage(str(tmp_path / "store")),
        journal,
        asyncio.Semaphore(2),
        Throttle(0),
        threshold=5 * MiB,
        part_size=5 * MiB,
        deadline=Deadline(),
        health=StoreHealth(),
    )
    stored = await transfer.upload(pin, "k/big.bin")
    await asyncio.to_thread(journal.close)
    assert stored.identity.size == 12 * MiB
    assert on_loop == []
    assert (tmp_path / "store" / "k" / "big.bin").read_bytes() == big.read_bytes()


async def test_only_small_bodies_upload_without_a_parts_slot(tmp_path):
    """Files read into memory above HELD take one of the `parts` slots, which bound memory whatever
    the number of small-lane workers; tiny files never wait for one."""
    journal = Journal(str(tmp_path / "state" / "journal.jsonl"))
    await asyncio.to_thread(journal.open)
    (tmp_path / "staging").mkdir()
    staging = Staging(str(tmp_path / "staging"))
    parts = asyncio.Semaphore(1)
    transfer = Transfer(
        LocalStorage(str(tmp_path / "store")), journal, parts, Throttle(0), threshold=16 * MiB,
        part_size=None, deadline=Deadline(), health=StoreHealth(),
    )  # fmt: skip
    for name, size in (("tiny.json", 64 << 10), ("shard.bin", 2 * MiB)):
        (tmp_path / name).write_bytes(os.urandom(size))
    await parts.acquire()  # every slot busy, as with big files in flight
    tiny = await asyncio.wait_for(transfer.upload(staging.pin(str(tmp_path / "tiny.json"), "tiny.json"), "k/tiny"), 10)
    assert tiny.identity.size == 64 << 10
    shard = asyncio.ensure_future(transfer.upload(staging.pin(str(tmp_path / "shard.bin"), "shard.bin"), "k/shard"))
    await asyncio.sleep(0.2)
    assert not shard.done()  # waits for a slot
    parts.release()
    assert (await asyncio.wait_for(shard, 10)).identity.size == 2 * MiB
    assert (tmp_path / "store" / "k" / "shard").read_bytes() == (tmp_path / "shard.bin").read_bytes()
    await asyncio.to_thread(journal.close)
