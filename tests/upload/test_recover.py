"""Start-up recovery: pins left in staging, stale multipart uploads, a new pod reconciling with the
store, and a store that fails at start. Real journal, real staging folder, a real store."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from engines import config
from servers import free_port

from daemon.catalog import layout
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.commands.common import storage_for
from daemon.storage import Storage
from daemon.storage.local import LocalStorage
from daemon.upload import journal as jr
from daemon.upload.complete import Identity
from daemon.upload.health import StoreHealth
from daemon.upload.pin import Staging
from daemon.upload.recover import Rank, recover
from daemon.upload.statedir import journal_path, staging_dir

KIND = "unit"

RANK = Rank("proj", "job-1", 0)


@dataclass
class Node:
    """One rank's checkpoint folder and state, as a (re)starting daemon finds them."""

    root: Path
    journal: jr.Journal
    staging: Staging
    opened: list[jr.Journal]

    def write(self, relpath: str, data: bytes) -> Path:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def restart(self) -> Node:
        """What the next run sees: the same folders, its journal replayed, no pins held."""
        self.journal.close()
        again = Node(self.root, jr.Journal(self.journal.path), Staging(self.staging.folder), self.opened)
        again.journal.open()
        self.opened.append(again.journal)
        return again

    async def recover(self, storage: Storage, health: StoreHealth | None = None):
        return await recover(
            root=str(self.root),
            journal=self.journal,
            staging=self.staging,
            storage=storage,
            health=health or StoreHealth(),
            rank=RANK,
        )


@pytest.fixture
def node(tmp_path: Path):
    root = tmp_path / "ckpt"
    os.makedirs(staging_dir(str(root), RANK.rank))
    journal = jr.Journal(journal_path(str(root), RANK.rank))
    journal.open()
    opened = [journal]
    yield Node(root, journal, Staging(staging_dir(str(root), RANK.rank)), opened)
    for each in opened:
        each.close()


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    async with LocalStorage(tmp_path / "store") as store:
        yield store


def pin_and_journal(node: Node, relpath: str) -> str:
    """What the engine does for a completed file: pin it and journal the pin; returns the stage."""
    pin = node.staging.pin(str(node.root / relpath), relpath)
    assert pin is not None and pin.stage is not None
    node.journal.record("pinned", jr.Pinned(relpath, pin.identity, pin.stage))
    return pin.stage


def read(pin) -> bytes:
    fd = pin.open()
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


async def test_journaled_pins_are_adopted_and_returned(node: Node, local: LocalStorage):
    node.write("checkpoint-1/model.bin", b"weights")
    stage = pin_and_journal(node, "checkpoint-1/model.bin")
    os.unlink(node.root / "checkpoint-1/model.bin")  # rotated away after the crash: only the pin holds it
    node = node.restart()
    found = await node.recover(local)
    [pin] = found.pins
    assert (pin.relpath, pin.stage) == ("checkpoint-1/model.bin", stage)
    assert read(pin) == b"weights"
    assert stage in node.staging.names() and stage in node.journal.state.pinned


async def test_a_staging_link_without_a_journal_line_is_deleted(node: Node, local: LocalStorage):
    node.write("checkpoint-1/model.bin", b"weights")
    stray = node.staging.pin(str(node.root / "checkpoint-1/model.bin"), "checkpoint-1/model.bin")
    assert stray is not None and stray.stage in node.staging.names()  # linked, then a crash before the journal
    node = node.restart()
    found = await node.recover(local)
    assert found.pins == []
    assert node.staging.names() == []
    assert (node.root / "checkpoint-1/model.bin").read_bytes() == b"weights"  # only the link went


async def test_a_journaled_pin_whose_link_vanished_is_journaled_unpinned(node: Node, local: LocalStorage):
    node.write("checkpoint-1/model.bin", b"weights")
    stage = pin_and_journal(node, "checkpoint-1/model.bin")
    os.unlink(node.staging.path(stage))
    node = node.restart()
    found = await node.recover(local)
    assert found.pins == []
    assert stage not in node.journal.state.pinned
    assert stage not in node.restart().journal.state.pinned  # durable: the next run replays it too


async def test_unknown_multipart_uploads_of_this_rank_are_aborted_known_ones_kept(node: Node, local: LocalStorage):
    path = node.write("checkpoint-1/big.bin", b"x" * 100)
    known_key = layout.file_key("proj", "job-1", 0, "checkpoint-1/big.bin")
    known = await local.create_multipart(known_key)
    stale = await local.create_multipart(layout.file_key("proj", "job-1", 0, "checkpoint-1/other.bin"))
    others = await local.create_multipart(layout.file_key("proj", "job-1", 1, "checkpoint-1/big.bin"))
    identity = Identity.stat(str(path))
    node.journal.record("multipart", jr.Multipart("checkpoint-1/big.bin", identity, known_key, known, 5 << 20))
    node = node.restart()
    await node.recover(local)
    left = {u.upload_id for u in await local.list_multipart_uploads(layout.job_prefix("proj", "job-1"))}
    assert known in left  # resumable: the file is unchanged and the journal knows the upload
    assert stale not in left
    assert others in left  # rank 1's uploads are rank 1's business
    assert "checkpoint-1/big.bin" in node.journal.state.multipart


async def test_a_journaled_multipart_whose_file_is_gone_is_aborted(node: Node, local: LocalStorage):
    path = node.write("checkpoint-1/big.bin", b"x" * 100)
    key = layout.file_key("proj", "job-1", 0, "checkpoint-1/big.bin")
    upload = await local.create_multipart(key)
    node.journal.record("multipart", jr.Multipart("checkpoint-1/big.bin", Identity.stat(str(path)), key, upload, 5))
    os.unlink(path)
    node = node.restart()
    await node.recover(local)
    assert await local.list_multipart_uploads(layout.rank_prefix("proj", "job-1", 0)) == []
    assert node.journal.state.multipart == {}


async def store_checkpoint(storage: Storage, checkpoint: str, files: dict[str, bytes]) -> None:
    """A checkpoint an earlier pod of this job stored and committed."""
    stored = []
    for name, data in files.items():
        relpath = f"{checkpoint}/{name}"
        key = layout.file_key("proj", "job-1", 0, relpath)
        etag = await storage.put(key, data)
        stored.append(StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, etag))
    await write_manifest(storage, build_manifest("proj", "job-1", 0, checkpoint, stored, "marker", {}))


async def test_a_new_pod_reconciles_identical_local_files_with_stored_manifests(node: Node, local: LocalStorage):
    await store_checkpoint(local, "checkpoint-1", {"model.bin": b"m1", "trainer_state.json": b"{}"})
    await store_checkpoint(local, "checkpoint-2", {"model.bin": b"m2"})
    await store_checkpoint(local, "checkpoint-3", {"model.bin": b"m3"})
    node.write("checkpoint-1/model.bin", b"m1")
    node.write("checkpoint-1/trainer_state.json", b"{}")
    node.write("checkpoint-2/model.bin", b"XX")  # same size, other bytes: not what the store holds
    # checkpoint-3 is not on this pod's disk at all
    found = await node.recover(local)
    assert found.reconciled == 2
    assert sorted(node.journal.state.stored) == ["checkpoint-1/model.bin", "checkpoint-1/trainer_state.json"]
    stored = node.journal.state.stored["checkpoint-1/model.bin"]
    assert stored.sha256 == hashlib.sha256(b"m1").hexdigest()
    assert stored.key == layout.file_key("proj", "job-1", 0, "checkpoint-1/model.bin")
    assert found.committed == ["checkpoint-1"]
    assert found.pins == []


async def test_a_journal_that_knows_its_files_is_not_reconciled_again(node: Node, local: LocalStorage):
    await store_checkpoint(local, "checkpoint-1", {"model.bin": b"m1"})
    node.write("checkpoint-1/model.bin", b"m1")
    first = await node.recover(local)
    assert first.reconciled == 1
    node = node.restart()
    again = await node.recover(local)
    assert again.reconciled == 0  # the same pod restarting: its journal already says stored
    assert again.committed == ["checkpoint-1"]


async def test_a_store_refusing_requests_does_not_raise_and_is_a_permanent_error(node: Node, tmp_path: Path):
    node.write("checkpoint-1/model.bin", b"weights")
    pin_and_journal(node, "checkpoint-1/model.bin")
    node = node.restart()
    not_a_folder = tmp_path / "store-is-a-file"
    not_a_folder.write_bytes(b"")
    health = StoreHealth()
    found = await node.recover(LocalStorage(not_a_folder), health)
    assert [p.relpath for p in found.pins] == ["checkpoint-1/model.bin"]  # staging does not need the store
    assert found.committed == [] and found.reconciled == 0
    assert health.permanent is not None and not health.permanent.transient
    assert health.permanent.code == "KeyConflict"
    assert health.reachable is True  # the store answered; it refused
    assert health.not_ready() == ["storage refuses requests: KeyConflict (list_multipart_uploads)"]


async def test_a_store_nobody_listens_on_does_not_raise_and_is_unreachable(node: Node, tmp_path: Path, aws_env):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "ckptdtest")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "ckptdtestsecret")
    c = config(
        tmp_path,
        "s3://nobody-home/ckptd",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        s3_addressing_style="path",
    )
    health = StoreHealth()
    async with storage_for(c) as storage:
        found = await node.recover(storage, health)
    assert found.committed == [] and found.reconciled == 0
    assert health.reachable is False
    assert health.permanent is None  # a network error is weather, not a refusal
    assert [e["code"] for e in health.recent] == ["NetworkError"]
    assert health.not_ready() == ["storage not reachable"]
