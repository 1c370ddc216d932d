"""Pinning a checkpoint subfolder that is another file system (issue 10, lesser finding).

A real tmpfs is mounted inside the checkpoint folder (the tests run as root), so the staging hard
link fails with a real EXDEV. Small files are copied into staging, journaled like links and
adopted after a crash with the original's identity; large ones are held by a descriptor, said
so in the log and counted.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from engines import counter
from structlog.testing import capture_logs

from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline
from daemon.upload import journal as jr
from daemon.upload.complete import Identity
from daemon.upload.health import StoreHealth
from daemon.upload.pin import COPY_LIMIT, Pin, Staging
from daemon.upload.recover import Rank, recover
from daemon.upload.settle import Settler
from daemon.upload.statedir import journal_path, staging_dir
from daemon.upload.throttle import Throttle
from daemon.upload.transfer import Transfer

KIND = "integration"

MiB = 1 << 20
FALLBACKS = "ckptd_pin_fallbacks_total"


@dataclass
class Folder:
    root: Path  # the checkpoint folder, on the test's file system
    sub: Path  # root/checkpoint-1, a tmpfs of its own
    staging: Staging


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Folder]:
    root = tmp_path / "ckpt"
    sub = root / "checkpoint-1"
    sub.mkdir(parents=True)
    os.makedirs(staging_dir(str(root), 0))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(sub)], check=True)
    try:
        assert os.stat(sub).st_dev != os.stat(root).st_dev
        yield Folder(root, sub, Staging(staging_dir(str(root), 0)))
    finally:
        if subprocess.run(["umount", str(sub)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(sub)], check=True)


def read(pin: Pin) -> bytes:
    fd = pin.open()
    try:
        return os.pread(fd, 1 << 30, 0)
    finally:
        os.close(fd)


def test_a_small_file_is_copied_and_behaves_like_a_link(folder: Folder):
    data = os.urandom(3 * MiB)
    path = folder.sub / "model.bin"
    path.write_bytes(data)
    original = Identity.stat(str(path))
    before = counter(FALLBACKS, how="copied")
    with capture_logs() as logs:
        pin = folder.staging.pin(str(path), "checkpoint-1/model.bin")
        (folder.sub / "other.bin").write_bytes(b"second file, same file system")
        other = folder.staging.pin(str(folder.sub / "other.bin"), "checkpoint-1/other.bin")
    assert pin is not None and other is not None
    assert pin.fd is None and pin.stage in folder.staging.names() and pin.copied is not None
    assert pin.identity == original  # the original's, not the copy's
    assert pin.current() == original  # the copy being another inode is no change
    fd = pin.open()
    try:
        assert pin.identity_of(fd) == original
    finally:
        os.close(fd)
    assert counter(FALLBACKS, how="copied") - before == 2
    said = [e for e in logs if e["event"].startswith("cannot hard-link")]
    assert len(said) == 1 and said[0]["how"] == "copied" and said[0]["errno"] == "EXDEV"  # once, not per file
    os.unlink(path)  # rotation: the copy keeps the content
    assert read(pin) == data
    assert pin.release() is True and other.release() is True
    assert folder.staging.names() == []


async def test_a_copied_pin_is_journaled_and_adopted_after_a_crash(folder: Folder, tmp_path: Path):
    data = os.urandom(MiB)
    path = folder.sub / "model.bin"
    path.write_bytes(data)
    journal = jr.Journal(journal_path(str(folder.root), 0))
    await asyncio.to_thread(journal.open)
    pin = folder.staging.pin(str(path), "checkpoint-1/model.bin")
    assert pin is not None and pin.stage is not None
    journal.record("pinned", jr.Pinned(pin.relpath, pin.identity, pin.stage))  # as Intake does
    await asyncio.to_thread(journal.close)  # the crash: nothing released
    os.unlink(path)  # and rotation deletes the original meanwhile
    again = jr.Journal(journal.path)
    await asyncio.to_thread(again.open)
    try:
        async with LocalStorage(tmp_path / "store") as store:
            found = await recover(
                root=str(folder.root),
                journal=again,
                staging=Staging(folder.staging.folder),
                storage=store,
                health=StoreHealth(),
                rank=Rank("proj", "job-1", 0),
            )
    finally:
        await asyncio.to_thread(again.close)
    [adopted] = found.pins
    assert (adopted.relpath, adopted.stage, adopted.identity) == (pin.relpath, pin.stage, pin.identity)
    assert adopted.current() == pin.identity
    assert read(adopted) == data


def test_a_large_file_is_held_by_descriptor_and_says_so(folder: Folder):
    path = folder.sub / "big.bin"
    with open(path, "wb") as f:
        f.truncate(COPY_LIMIT + 1)  # sparse: no memory needed
        f.write(b"head")
    before = counter(FALLBACKS, how="descriptor")
    with capture_logs() as logs:
        pin = folder.staging.pin(str(path), "checkpoint-1/big.bin")
    assert pin is not None and pin.fd is not None and pin.stage is None
    assert counter(FALLBACKS, how="descriptor") - before == 1
    [said] = [e for e in logs if e["event"].startswith("cannot hard-link")]
    assert said["how"] == "descriptor" and "crash" in said["event"]
    assert folder.staging.names() == []
    pin.release()


def test_a_file_changing_while_it_is_copied_is_not_staged(folder: Folder):
    path = folder.sub / "growing.bin"
    path.write_bytes(os.urandom(48 * MiB))
    done = threading.Event()

    def append() -> None:  # a writer still at work: each append changes size and mtime
        with open(path, "ab") as f:
            while not done.is_set():
                f.write(b"x")
                f.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        with capture_logs() as logs:
            pin = folder.staging.pin(str(path), "checkpoint-1/growing.bin")
    finally:
        done.set()
        writer.join()
    assert pin is None
    assert "file changed while being copied into staging; copy discarded" in [e["event"] for e in logs]
    assert folder.staging.names() == []  # neither the copy nor its temporary file


async def test_a_copy_superseded_by_an_in_place_rewrite_is_copied_again(folder: Folder):
    # A link shares the inode and sees the rewrite; a copy does not: the settler compares the path.
    path = folder.sub / "state.json"
    path.write_bytes(b"v1")
    done: list[Pin] = []
    settler = Settler(str(folder.root), folder.staging, 0.2, (), lambda r: None, done.append, lambda r, why: None)
    settler.notice(str(path), closed=True)
    first = settler.candidates["checkpoint-1/state.json"].pin
    assert first is not None and first.copied is not None
    with open(path, "r+b") as f:  # same inode, new content
        f.write(b"v2-longer")
    task = asyncio.create_task(settler.run())
    try:
        async with asyncio.timeout(10):
            while not done:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    [pin] = done
    assert read(pin) == b"v2-longer" and pin.identity == Identity.stat(str(path))
    assert folder.staging.names() == [pin.stage]  # the superseded copy is gone
    pin.release()


async def test_a_copied_pin_uploads(folder: Folder, tmp_path: Path):
    data = os.urandom(2 * MiB)
    (folder.sub / "model.bin").write_bytes(data)
    pin = folder.staging.pin(str(folder.sub / "model.bin"), "checkpoint-1/model.bin")
    assert pin is not None and pin.copied is not None
    journal = jr.Journal(str(tmp_path / "state" / "journal.jsonl"))
    await asyncio.to_thread(journal.open)
    try:
        transfer = Transfer(
            LocalStorage(str(tmp_path / "store")),
            journal,
            asyncio.Semaphore(2),
            Throttle(0),
            threshold=8 * MiB,
            part_size=5 * MiB,
            deadline=Deadline(),
            health=StoreHealth(),
        )
        stored = await transfer.upload(pin, "k/model.bin")
    finally:
        await asyncio.to_thread(journal.close)
    assert stored.identity == pin.identity
    assert (tmp_path / "store" / "k" / "model.bin").read_bytes() == data
