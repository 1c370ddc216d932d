"""Uploaded → recorded, against hostile writers: a committed file rewritten in place never leaves
a manifest naming bytes it does not describe, and a file that cannot be stored keeps its
checkpoint from committing. Real inotify, real files, real stores (local directory, moto)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from engines import config, s3_flags, until

from daemon.catalog import layout
from daemon.commands.common import storage_for
from daemon.upload.engine import Engine

KIND = "integration"


def manifest_path(store: Path, checkpoint: str) -> Path:
    return store / layout.manifest_key("proj", "job-1", 0, checkpoint)


class ManifestWatch:
    """Checks, over and over from a thread, that the committed manifest matches the objects it
    names. A mismatch only counts if the manifest read before it is still there, byte for byte,
    after it: a manifest withdrawn or rewritten meanwhile was not lying."""

    def __init__(self, store: Path, checkpoint: str) -> None:
        self.store, self.path = store, manifest_path(store, checkpoint)
        self.lies: list[str] = []
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                before = self.path.read_bytes()
            except FileNotFoundError:
                continue
            for f in json.loads(before)["files"]:
                try:
                    digest = hashlib.sha256((self.store / f["key"]).read_bytes()).hexdigest()
                except FileNotFoundError:
                    digest = "missing"
                if digest != f["sha256"] and self.path.exists() and self.path.read_bytes() == before:
                    self.lies.append(f["path"])
            self.checks += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


async def test_a_committed_file_rewritten_in_place_never_leaves_a_lying_manifest(tmp_path):
    store = tmp_path / "store"
    c = config(tmp_path, f"file://{store}")
    folder = tmp_path / "ckpt" / "checkpoint-1"
    folder.mkdir(parents=True)
    model = folder / "model.bin"
    model.write_bytes(os.urandom(256 << 10))
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        await until(lambda: engine.tracker.is_committed("checkpoint-1"), 30, "the first commit")
        watch = ManifestWatch(store, "checkpoint-1")
        try:
            for _ in range(15):
                content = os.urandom(256 << 10)
                with open(model, "r+b") as f:  # in place: same inode, same size, other bytes
                    f.write(content)
                want = hashlib.sha256(content).hexdigest()

                def recommitted(want: str = want) -> bool:
                    files = {f.relpath: f.sha256 for f in engine.tracker.files("checkpoint-1")}
                    return files.get("checkpoint-1/model.bin") == want and engine.tracker.is_committed("checkpoint-1")

                await until(recommitted, 30, "the rewrite to be stored and committed")
        finally:
            watch.stop()
        report = await engine.shutdown(success=True)
    assert report.ok
    assert watch.checks > 0 and watch.lies == []
    final = json.loads(manifest_path(store, "checkpoint-1").read_bytes())
    for f in final["files"]:
        assert hashlib.sha256((store / f["key"]).read_bytes()).hexdigest() == f["sha256"]


async def test_a_file_that_cannot_be_stored_keeps_its_checkpoint_uncommitted(tmp_path):
    store = tmp_path / "store"
    c = config(tmp_path, f"file://{store}")
    ckpt = tmp_path / "ckpt"
    for step in (1, 2):
        (ckpt / f"checkpoint-{step}").mkdir(parents=True)
        (ckpt / f"checkpoint-{step}" / "model.bin").write_bytes(os.urandom(1000))
    bad = os.path.join(os.fsencode(ckpt / "checkpoint-1"), b"optimizer-\xff.bin")  # not UTF-8: no key names it
    with open(bad, "wb") as f:
        f.write(b"state the restore would lack")
    for step in (1, 2):
        (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        await until(lambda: engine.tracker.is_committed("checkpoint-2"), 30, "checkpoint-2 to commit")
        await until(lambda: engine.uploader.stored_count == 4, 30, "the storable files to be stored")
        assert engine.status.status()["unstorable"] == ["checkpoint-1/optimizer-\\xff.bin"]
        report = await engine.shutdown(success=True)
    assert not report.ok  # the drain exits 4
    assert "checkpoint-1/optimizer-\\xff.bin" in report.not_stored
    assert report.uncommitted == ["checkpoint-1"]
    assert not manifest_path(store, "checkpoint-1").exists()
    assert manifest_path(store, "checkpoint-2").exists()


async def test_a_name_the_store_refuses_keeps_its_checkpoint_uncommitted_loudly(tmp_path, moto_bucket):
    c = config(tmp_path, **s3_flags(moto_bucket))
    folder = tmp_path / "ckpt" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(os.urandom(1000))
    (folder / "odd\nname.bin").write_bytes(b"moto answers 404 for a newline in a key")
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        await until(lambda: engine.queue.failures(), 30, "the store to refuse the odd name")
        assert not engine.tracker.is_committed("checkpoint-1")
        report = await engine.shutdown(success=True)
    assert not report.ok
    assert report.not_stored == ["checkpoint-1/odd\nname.bin"]
    assert report.uncommitted == ["checkpoint-1"]


async def test_a_new_pod_withdraws_a_stored_manifest_before_overwriting_a_file_it_names(tmp_path):
    """No journal (a new pod of the same job), and a file of a committed checkpoint changed since:
    the manifest in the store still names the old object, so it must go before the object does."""
    store = tmp_path / "store"
    c = config(tmp_path, f"file://{store}")
    folder = tmp_path / "ckpt" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(os.urandom(64 << 10))
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    async with storage_for(c) as storage:
        first = Engine(c, storage)
        await first.startup()
        await until(lambda: first.tracker.is_committed("checkpoint-1"), 30, "the first commit")
        assert (await first.shutdown(success=True)).ok
    shutil.rmtree(tmp_path / "ckpt" / ".ckptd")
    content = os.urandom(64 << 10)
    (folder / "model.bin").write_bytes(content)
    watch = ManifestWatch(store, "checkpoint-1")
    try:
        async with storage_for(c) as storage:
            second = Engine(c, storage)
            await second.startup()
            want = hashlib.sha256(content).hexdigest()
            await until(
                lambda: (
                    second.tracker.is_committed("checkpoint-1")
                    and {f.relpath: f.sha256 for f in second.tracker.files("checkpoint-1")}.get(
                        "checkpoint-1/model.bin"
                    )
                    == want
                ),
                30,
                "the changed file to be stored and committed",
            )
            assert (await second.shutdown(success=True)).ok
    finally:
        watch.stop()
    assert watch.checks > 0 and watch.lies == []
