"""Restore against hostile store contents (issue 10, bad-input matrix), on a real S3 server (moto)
and the file:// store: every case ends in a clear error naming the manifest or key, or, for
"latest", in the newest valid checkpoint; never a traceback, a write outside the restore folder,
a huge allocation, a wrong byte handed over or a folder holding its marker but missing files.

The rule for each case is the truth tables of resolve.py and restorer.py."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from invariants import marked_but_incomplete
from test_resolve import T0, commit
from test_restorer import tree

from daemon.catalog import layout, manifest
from daemon.config.refs import LATEST, NAMED, CheckpointRef
from daemon.restore.restorer import RestoreFailed, restore
from daemon.storage.local import LocalStorage

KIND = "unit"  # the moto cases count as integration (conftest)

CHUNK = 1 << 20
CAP = 4096  # manifests read at most this many bytes here: the 64 MiB rule, without 64 MiB
NEW = {
    "model.safetensors": random.Random(1).randbytes(2 * CHUNK + 123),  # three ranged GETs
    "config.json": b'{"hidden": 8}',
    "trainer_state.json": b'{"global_step": 20}',
}
OLD = {"model.safetensors": b"older weights", "trainer_state.json": b'{"global_step": 10}'}
MANIFEST = layout.manifest_key("proj", "src", 0, "checkpoint-20")
CONFIG = layout.file_key("proj", "src", 0, "checkpoint-20/config.json")
MODEL = layout.file_key("proj", "src", 0, "checkpoint-20/model.safetensors")


@pytest.fixture(params=["local", "moto"])
async def store(request, tmp_path):
    """checkpoint-10 (older) and checkpoint-20 of proj/src, committed; checkpoint-20 of job `other`
    and of rank 1 too."""
    if request.param == "local":
        ctx = LocalStorage(tmp_path / "store")
    else:
        ctx = request.getfixturevalue("moto_bucket").storage()
    async with ctx as s:
        await commit(s, "proj", "src", 0, "checkpoint-10", OLD, T0)
        await commit(s, "proj", "src", 0, "checkpoint-20", NEW, T0 + timedelta(hours=1))
        await commit(s, "proj", "other", 0, "checkpoint-20", {"x.bin": b"another job's"}, T0)
        await commit(s, "proj", "src", 1, "checkpoint-20", {"y.bin": b"another rank's"}, T0)
        yield s


async def _manifest(s, key: str = MANIFEST) -> dict:
    return json.loads(await s.get(key))


def _edit(change: Callable[[dict], object]) -> Callable[..., Awaitable[None]]:
    """A case that rewrites checkpoint-20's manifest with `change` applied (totals kept consistent)."""

    async def apply(s, _tmp: Path) -> None:
        m = await _manifest(s)
        change(m)
        if isinstance(m.get("files"), list) and all(isinstance(f.get("size"), int) for f in m["files"]):
            m["total_bytes"], m["file_count"] = sum(f["size"] for f in m["files"]), len(m["files"])
        await s.put(MANIFEST, json.dumps(m).encode())

    return apply


def _raw(data: bytes) -> Callable[..., Awaitable[None]]:
    async def apply(s, _tmp: Path) -> None:
        await s.put(MANIFEST, data)

    return apply


def _copy_from(key: str) -> Callable[..., Awaitable[None]]:
    async def apply(s, _tmp: Path) -> None:
        await s.put(MANIFEST, await s.get(key))

    return apply


def _object(key: str, data: bytes | None) -> Callable[..., Awaitable[None]]:
    async def apply(s, _tmp: Path) -> None:
        await (s.delete(key) if data is None else s.put(key, data))

    return apply


def _file(m: dict, name: str) -> dict:
    return next(f for f in m["files"] if f["path"] == f"checkpoint-20/{name}")


def _set(name: str, **fields) -> Callable[[dict], None]:
    return lambda m: _file(m, name).update(fields)


def _unrelated_objects() -> Callable[..., Awaitable[None]]:
    async def apply(s, _tmp: Path) -> None:
        job = layout.job_prefix("proj", "src")
        for key, data in {
            layout.manifest_prefix("proj", "src", 0) + "notes.txt": b"not a manifest",
            layout.manifest_prefix("proj", "src", 0) + "sub/checkpoint-99.json": json.dumps(
                await _manifest(s)
            ).encode(),
            layout.manifest_prefix("proj", "src", 0) + "zzz.json": b"\xff\xfe garbage",
            layout.rank_prefix("proj", "src", 0) + "checkpoint-99/model.safetensors": b"uncommitted",
            job + "random.bin": b"junk",
            f"{layout.ROOT}/proj/jobs/junk job/manifests/rank-0/checkpoint-1.json": b"[]",
            "outside-the-layout.json": b"{}",
        }.items():
            await s.put(key, data)

    return apply


async def _too_big(s, _tmp: Path) -> None:
    await s.put(MANIFEST, b" " * CAP + json.dumps(await _manifest(s)).encode())  # valid JSON, too long


@dataclass(frozen=True)
class Case:
    mutate: Callable[..., Awaitable[None]]
    ref: str  # "named" | "latest"
    outcome: str  # "fails" | "checkpoint-20" | "checkpoint-10"
    match: str = ""  # the error (regex), which must name the manifest's key or the object's


BAD = f"{MANIFEST}: bad manifest: "
OTHER_SHA = hashlib.sha256(b"something else").hexdigest()
CASES = {
    # The manifest a named reference points at is unusable: exit 3 naming its key.
    "not-json": Case(_raw(b"{not json"), "named", "fails", BAD + "not JSON"),
    "empty-object": Case(_raw(b""), "named", "fails", BAD + "not JSON"),
    "not-utf8": Case(_raw(b'{"format": 1, "\xff": 1}'), "named", "fails", BAD + "not JSON"),
    "json-array": Case(_raw(b"[]"), "named", "fails", BAD + "not a JSON object"),
    "json-null": Case(_raw(b"null"), "named", "fails", BAD + "not a JSON object"),
    "deeply-nested": Case(_raw(b"[" * (CAP - 1)), "named", "fails", BAD + "not JSON"),
    "missing-files": Case(_edit(lambda m: m.pop("files")), "named", "fails", BAD + "files missing"),
    "future-format": Case(_edit(lambda m: m.update(format=2)), "named", "fails", BAD + "unsupported format"),
    "size-is-a-string": Case(_edit(_set("config.json", size="13")), "named", "fails", r"files\[0\]\.size missing"),
    "size-is-nan": Case(_edit(_set("config.json", size=float("nan"))), "named", "fails", r"files\[0\]\.size missing"),
    "path-with-dotdot": Case(_edit(_set("config.json", path="checkpoint-20/../../../x")), "named", "fails", "unsafe"),
    "absolute-path": Case(_edit(_set("config.json", path="/etc/passwd")), "named", "fails", "unsafe path"),
    "path-in-another-folder": Case(
        _edit(_set("config.json", path="checkpoint-10/config.json")), "named", "fails", "outside"
    ),
    "key-with-dotdot": Case(
        _edit(_set("config.json", key=CONFIG + "/../../../../x")), "named", "fails", "is not the key"
    ),
    "absolute-key": Case(_edit(_set("config.json", key="/etc/passwd")), "named", "fails", "is not the key"),
    "key-of-another-job": Case(
        _edit(_set("config.json", key=layout.file_key("proj", "other", 0, "checkpoint-20/x.bin"))),
        "named",
        "fails",
        "is not the key",
    ),
    "huge-size": Case(_edit(_set("config.json", size=2**62)), "named", "fails", "larger than any object"),
    "negative-size": Case(_edit(_set("config.json", size=-1)), "named", "fails", "negative"),
    "duplicate-path": Case(_edit(lambda m: m["files"].append(dict(m["files"][0]))), "named", "fails", "listed twice"),
    "project-escapes": Case(_edit(lambda m: m.update(project="..")), "named", "fails", "not a single folder name"),
    "manifest-of-another-job": Case(
        _copy_from(layout.manifest_key("proj", "other", 0, "checkpoint-20")), "named", "fails", "it describes"
    ),
    "manifest-of-another-rank": Case(
        _copy_from(layout.manifest_key("proj", "src", 1, "checkpoint-20")), "named", "fails", "it describes"
    ),
    "manifest-of-another-checkpoint": Case(
        _copy_from(layout.manifest_key("proj", "src", 0, "checkpoint-10")), "named", "fails", "it describes"
    ),
    "manifest-too-large": Case(_too_big, "named", "fails", f"larger than {CAP} bytes"),
    # It parses but lies about the objects: exit 3 whatever the reference, nothing handed over.
    "sha256-lies": Case(
        _edit(_set("config.json", sha256=OTHER_SHA)), "named", "fails", f"checksum mismatch for {CONFIG}"
    ),
    "object-shorter": Case(_object(CONFIG, b'{"h": 8}'), "named", "fails", f"checksum mismatch for {CONFIG}"),
    "object-longer": Case(_object(MODEL, NEW["model.safetensors"] + b"!"), "named", "fails", f"{MODEL} is .* bytes"),
    "object-missing": Case(_object(CONFIG, None), "named", "fails", f"cannot download {CONFIG}"),
    "size-beyond-the-disk": Case(_edit(_set("model.safetensors", size=2**49)), "named", "fails", "not enough space"),
    "latest-sha256-lies": Case(_edit(_set("config.json", sha256=OTHER_SHA)), "latest", "fails", "checksum mismatch"),
    # "latest": a bad manifest is skipped with a warning, the newest valid one serves.
    "latest-skips-not-json": Case(_raw(b"{not json"), "latest", "checkpoint-10"),
    "latest-skips-another-jobs": Case(
        _copy_from(layout.manifest_key("proj", "other", 0, "checkpoint-20")), "latest", "checkpoint-10"
    ),
    "latest-skips-foreign-key": Case(_edit(_set("config.json", key="/etc/passwd")), "latest", "checkpoint-10"),
    "latest-skips-huge-size": Case(_edit(_set("config.json", size=2**62)), "latest", "checkpoint-10"),
    "unrelated-objects-are-ignored": Case(_unrelated_objects(), "latest", "checkpoint-20"),
}


def _outside(tmp_path: Path) -> list[str]:
    """Files written anywhere but the restore folder and the local store."""
    return [str(p) for p in tmp_path.rglob("*") if p.is_file() and p.parts[len(tmp_path.parts)] not in ("out", "store")]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_hostile_store(store, tmp_path, monkeypatch, case):
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", CAP)
    await case.mutate(store, tmp_path)
    if case.ref == "named":
        ref = CheckpointRef(NAMED, job_id="src", checkpoint_name="checkpoint-20", required=True)
    else:
        ref = CheckpointRef(LATEST, job_id="src", required=True)
    out = tmp_path / "out"

    async def go():
        return await restore(
            store, refs=[ref], restore_dir=str(out), rank=0, default_project="proj", chunk_size=CHUNK, retry_window=5
        )

    files = OLD if case.outcome == "checkpoint-10" else NEW
    if case.outcome == "fails":
        with pytest.raises(RestoreFailed, match=case.match):
            await go()
        assert not (out / "rank-0" / "checkpoint-20").exists()
    else:
        report = await go()
        assert tree(out / "rank-0") == {f"{case.outcome}/{k}": v for k, v in files.items()}
        assert report.restored[0]["checkpoint"] == case.outcome
    assert marked_but_incomplete(out, set(files)) == []
    assert _outside(tmp_path) == []


async def test_optional_reference_to_a_bad_manifest_starts_from_scratch(store, tmp_path):
    await store.put(MANIFEST, b"{not json")
    ref = CheckpointRef(NAMED, job_id="src", checkpoint_name="checkpoint-20")
    report = await restore(store, refs=[ref], restore_dir=str(tmp_path / "out"), rank=0, default_project="proj")
    assert report.missing == [ref.describe()] and report.restored == []
    assert list((tmp_path / "out" / "rank-0").iterdir()) == []
