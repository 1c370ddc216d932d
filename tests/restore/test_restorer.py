"""Restore: byte-identical, parallel ranged downloads, verification, refusals, on every backend."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from test_resolve import T0, commit

from daemon import metrics
from daemon.catalog import layout
from daemon.config.refs import LATEST, NAMED, CheckpointRef
from daemon.restore import restorer as restore_mod
from daemon.restore.resolve import Resolved
from daemon.restore.restorer import STAGING_PREFIX, SUMMARY, MiB, RestoreConflict, RestoreFailed, restore
from daemon.storage import StorageError

KIND = "unit"

CHUNK = MiB


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


FILES = {
    "model.safetensors": payload(5 * MiB + 123, 1),  # > CHUNK: six ranged GETs
    "config.json": b'{"hidden": 8}',
    "trainer_state.json": b'{"global_step": 20}',
    "sub/dir/optimizer.pt": payload(CHUNK, 2),  # exactly one chunk
    "empty.txt": b"",
}


class Spy:
    """The store, recording every GET and how many were in flight at once."""

    def __init__(self, inner, fail_once: set[tuple[str, int]] = frozenset()) -> None:
        self.inner, self.gets, self.in_flight, self.max_in_flight = inner, [], 0, 0
        self.fail_once = set(fail_once)  # (key, start) answered once with a transient error

    def file_keys(self) -> set[str]:
        """Keys of checkpoint files fetched (manifests excluded)."""
        return {k for k, _, _ in self.gets if layout.parse_file_key(k)}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def get(self, key, start=0, end=None):
        self.gets.append((key, start, end))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let the others start: concurrency is what is measured
            if (key, start) in self.fail_once:
                self.fail_once.discard((key, start))
                raise StorageError("get", key, "SlowDown", "injected", http_status=503)
            return await self.inner.get(key, start, end)
        finally:
            self.in_flight -= 1

    async def get_stream(self, key, start, end):
        """What restore downloads files with: recorded and failed as `get` is."""
        self.gets.append((key, start, end))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)
            if (key, start) in self.fail_once:
                self.fail_once.discard((key, start))
                raise StorageError("get", key, "SlowDown", "injected", http_status=503)
            async for chunk in self.inner.get_stream(key, start, end):
                yield chunk
        finally:
            self.in_flight -= 1


def ref(checkpoint: str = "checkpoint-20", job: str = "src", **kw) -> CheckpointRef:
    return CheckpointRef(NAMED, job_id=job, checkpoint_name=checkpoint, **kw)


@pytest.fixture
def out(tmp_path) -> Path:
    """The restore folder (tmp_path itself also holds the local backend's store)."""
    return tmp_path / "out"


@pytest.fixture
async def source(store):
    """Committed checkpoint-20 of proj/src, rank 0."""
    await commit(store, "proj", "src", 0, "checkpoint-20", FILES, T0)
    return store


async def run(storage, refs, restore_dir: Path, rank: int = 0, **kw):
    return await restore(
        storage, refs=refs, restore_dir=str(restore_dir), rank=rank, default_project="proj", chunk_size=CHUNK, **kw
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Staging folders and files left behind (none may be, once restore returned or raised)."""
    return [p.name for p in folder.rglob(f"{STAGING_PREFIX}*")] + [p.name for p in folder.rglob("*.ckptd-part")]


def sample(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


async def test_restores_byte_identical_with_ranged_gets(source, out):
    spy, seen = Spy(source), []
    files_before, bytes_before = sample("ckptd_restore_files_total"), sample("ckptd_restore_bytes_total")
    report = await run(spy, [ref()], out, concurrency=3, progress=lambda d, t: seen.append((d, t)))

    assert tree(out / "rank-0") == {f"checkpoint-20/{k}": v for k, v in FILES.items()}
    total = sum(map(len, FILES.values()))
    assert (report.files, report.bytes, report.downloaded_files, report.downloaded_bytes, report.kept_files) == (
        5,
        total,
        5,
        total,
        0,
    )
    big = layout.file_key("proj", "src", 0, "checkpoint-20/model.safetensors")
    ranges = sorted((s, e) for k, s, e in spy.gets if k == big)
    assert ranges == [(i * CHUNK, min((i + 1) * CHUNK, len(FILES["model.safetensors"]))) for i in range(6)]
    assert spy.max_in_flight <= 3  # bounded memory: at most `concurrency` chunks at once
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert leftovers(out) == []
    assert sample("ckptd_restore_files_total") - files_before == 5
    assert sample("ckptd_restore_bytes_total") - bytes_before == total
    assert sample("ckptd_restore_duration_seconds") == report.seconds


async def test_summary_file(source, out):
    report = await run(source, [ref(), ref("checkpoint-99")], out)
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["missing"] == report.missing == [ref("checkpoint-99").describe()]
    assert (
        summary["restored"]
        == report.restored
        == [
            {
                "ref": ref().describe(),
                "project": "proj",
                "job_id": "src",
                "source_rank": 0,
                "checkpoint": "checkpoint-20",
                "step": 20,
                "committed_at": T0.isoformat(),
                "target": str(out / "rank-0" / "checkpoint-20"),
                "files": 5,
                "bytes": sum(map(len, FILES.values())),
                "root_files": 0,
                "merged_ranks": [],
            }
        ]
    )
    assert (summary["files"], summary["downloaded_files"], summary["seconds"]) == (5, 5, report.seconds)
    assert summary["links"] == report.links == ["checkpoint-20"]
    assert summary["finished_at"].endswith("+00:00")


async def test_matching_files_are_kept(source, out):
    await run(source, [ref()], out)
    folder = out / "rank-0" / "checkpoint-20"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    changed = folder / "config.json"
    changed.write_bytes(b'{"hidden": 9}')  # same size, other bytes: must be fetched again

    spy = Spy(source)
    report = await run(spy, [ref()], out)

    assert (report.downloaded_files, report.kept_files) == (1, 4)
    assert spy.file_keys() == {layout.file_key("proj", "src", 0, "checkpoint-20/config.json")}
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    del before["config.json"], after["config.json"]
    assert after == before
    assert changed.read_bytes() == FILES["config.json"]


@pytest.mark.parametrize(
    "name, size_delta, error, gets",
    [
        ("model.safetensors", 0, "checksum mismatch for {key} after 3", 3),  # same size, other bytes
        ("config.json", -3, "checksum mismatch for {key} after 3", 3),  # small: one GET, short body
        ("config.json", +3, "checksum mismatch for {key} after 3", 3),  # small: the range cuts it
        ("model.safetensors", -1000, "{key} is .* bytes, its manifest says", 0),  # big: one HEAD, no GET
    ],
    ids=["same-size", "small-shorter", "small-longer", "big-shorter"],
)
async def test_corrupt_object_fails_and_leaves_nothing(source, out, name, size_delta, error, gets):
    key = layout.file_key("proj", "src", 0, f"checkpoint-20/{name}")
    await source.put(key, payload(len(FILES[name]) + size_delta, 99))  # wrong bytes
    spy, seen = Spy(source), []
    with pytest.raises(RestoreFailed, match=error.format(key=key)):
        await run(spy, [ref()], out, concurrency=2, progress=lambda d, t: seen.append((d, t)))
    assert all(0 <= d <= t for d, t in seen)  # each failed attempt's bytes are taken back
    assert not (out / "rank-0" / "checkpoint-20").exists()  # nothing of it is visible, marker or not
    assert leftovers(out) == []
    assert sum(k == key and s == 0 for k, s, _ in spy.gets) == gets  # three downloads, then it gives up
    assert not (out / SUMMARY).exists()


async def test_transient_errors_are_retried(source, out):
    big = layout.file_key("proj", "src", 0, "checkpoint-20/model.safetensors")
    small = layout.file_key("proj", "src", 0, "checkpoint-20/config.json")
    spy = Spy(source, fail_once={(big, 0), (big, 3 * CHUNK), (small, 0)})
    report = await run(spy, [ref()], out)
    assert spy.fail_once == set() and report.downloaded_files == 5
    assert tree(out / "rank-0") == {f"checkpoint-20/{k}": v for k, v in FILES.items()}


async def test_vanished_object_fails_naming_the_key(source, out):
    key = layout.file_key("proj", "src", 0, "checkpoint-20/sub/dir/optimizer.pt")
    await source.delete(key)
    with pytest.raises(RestoreFailed, match=f"cannot download {key}"):
        await run(source, [ref()], out)
    assert leftovers(out) == []


async def test_required_missing_fails_before_any_download(source, out):
    spy = Spy(source)
    with pytest.raises(RestoreFailed, match="required named checkpoint of job=src checkpoint=checkpoint-99"):
        await run(spy, [ref(), ref("checkpoint-99", required=True)], out)
    assert spy.file_keys() == set()
    assert not out.exists()


async def test_optional_missing_is_reported(source, out):
    refs = [CheckpointRef(LATEST, project_name="nobody"), ref("checkpoint-99")]
    report = await run(source, refs, out)
    assert report.missing == [r.describe() for r in refs]
    assert (report.files, report.restored) == (0, [])
    assert list((out / "rank-0").iterdir()) == []  # there, empty: get_last_checkpoint() finds nothing
    assert json.loads((out / SUMMARY).read_text())["missing"] == report.missing


async def test_rank_fallback_lands_under_own_rank(source, out):
    report = await run(source, [CheckpointRef(LATEST, job_id="src")], out, rank=3)
    assert report.restored[0]["source_rank"] == 0
    assert tree(out / "rank-3") == {f"checkpoint-20/{k}": v for k, v in FILES.items()}


def crafted(path: str, key: str, checkpoint: str = "checkpoint-1") -> Resolved:
    manifest = {"checkpoint": checkpoint, "files": [{"path": path, "key": key, "size": 1, "sha256": "0" * 64}]}
    return Resolved(ref(checkpoint), "proj", "src", 0, checkpoint, manifest)


async def test_escaping_manifest_entry_writes_nothing_outside(source, out, monkeypatch):
    # Resolving validates manifests; restore refuses escaping paths on its own all the same.
    key = layout.file_key("proj", "src", 0, "checkpoint-20/model.safetensors")

    async def fake_resolve(storage, r, **kw):
        return crafted("../../escaped", key)

    monkeypatch.setattr(restore_mod, "resolve", fake_resolve)
    with pytest.raises(RestoreFailed, match=f"refusing key {key!r}"):
        await run(source, [ref("checkpoint-1")], out / "a" / "b")
    assert not out.exists()


async def test_unparseable_manifest_is_never_restored(store, out):
    # A manifest that fails validation (here: an escaping path) names no checkpoint at all.
    entry = {"path": "../../escaped", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest(), "key": "k", "etag": "e"}
    bad = {
        "format": 1,
        "project": "proj",
        "job_id": "src",
        "rank": 0,
        "checkpoint": "checkpoint-1",
        "step": 1,
        "committed_at": T0.isoformat(),
        "reason": "marker",
        "total_bytes": 1,
        "file_count": 1,
        "files": [entry],
        "metrics": {},
    }
    await store.put(layout.manifest_key("proj", "src", 0, "checkpoint-1"), json.dumps(bad).encode())
    await store.put("k", b"x")
    key = layout.manifest_key("proj", "src", 0, "checkpoint-1")
    with pytest.raises(RestoreFailed, match=f"required .*unusable manifest {key}: .*unsafe path"):
        await run(store, [ref("checkpoint-1", required=True)], out / "a" / "b")
    report = await run(store, [CheckpointRef(LATEST, job_id="src")], out / "a" / "b")
    assert report.missing and [p.name for p in out.rglob("*") if p.is_file()] == [SUMMARY]


async def test_two_references_on_one_folder_conflict(source, out):
    await commit(source, "proj", "other", 0, "checkpoint-20", {"x.bin": b"other"}, T0)
    with pytest.raises(RestoreConflict, match="rank-0/checkpoint-20"):
        await run(source, [ref(), ref(job="other")], out)
    assert not out.exists()
    assert issubclass(RestoreConflict, RestoreFailed)


async def test_two_references_to_the_same_checkpoint_are_one(source, out):
    report = await run(source, [ref(), CheckpointRef(LATEST, project_name="proj")], out)
    assert (report.files, report.downloaded_files, len(report.restored)) == (5, 5, 2)
    assert os.listdir(out / "rank-0") == ["checkpoint-20"]


async def test_root_pseudo_checkpoint_and_several_references(source, out):
    await commit(source, "proj", "final", 0, ".", {"model.bin": b"final model", "config.json": b"{}"}, T0)
    report = await run(source, [ref(), CheckpointRef(LATEST, job_id="final")], out)
    assert tree(out / "rank-0") == {
        "model.bin": b"final model",
        "config.json": b"{}",
        **{f"checkpoint-20/{k}": v for k, v in FILES.items()},
    }
    assert [r["target"] for r in report.restored] == [str(out / "rank-0" / "checkpoint-20"), str(out / "rank-0")]
