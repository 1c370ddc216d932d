"""The invariant checks themselves: a store that holds exactly what the writer completed passes, and
each way of getting it wrong (lost, stale, corrupt, torn commit, leaked, secret, orphaned upload,
excused only inside a blind window) is caught. Real files, a real file:// store layout; no daemon."""

from __future__ import annotations

import collections
import hashlib
import json
import time

import pytest

from reliability.checks import MANIFESTS, RANK, verify
from reliability.harness import Trial
from reliability.record import Recorder
from reliability.stores import LocalStore

KIND = "unit"
FILES = {"checkpoint-1/model.bin": b"weights v1", "checkpoint-1/trainer_state.json": b"{}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def world(tmp_path):
    """A trial whose writer completed FILES, stored and committed as a correct daemon would."""
    store = LocalStore(tmp_path / "store")
    t = Trial("unit", 0, 1, tmp_path / "trial", store, budget=60)
    rec = Recorder(t.record)
    for path, data in FILES.items():
        rec.emit("begin", path=path)
        rec.emit("done", path=path, sha=sha(data), size=len(data))
        put(store, RANK + path, data)
    rec.emit("complete", checkpoint="checkpoint-1")
    commit(store, "checkpoint-1", FILES)
    t.exit_codes.append(0)
    yield t, store, rec
    rec.close()
    t.finish()


def put(store: LocalStore, key: str, data: bytes) -> None:
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def commit(store: LocalStore, checkpoint: str, files: dict[str, bytes]) -> None:
    listed = [{"path": p, "size": len(d), "sha256": sha(d), "key": RANK + p, "etag": ""} for p, d in files.items()]
    manifest = {"checkpoint": checkpoint, "reason": "marker", "step": 1, "committed_at": "2026-01-01T00:00:00+00:00",
                "files": listed}  # fmt: skip
    put(store, f"{MANIFESTS}{checkpoint}.json", json.dumps(manifest).encode())


def check(t: Trial) -> tuple[list[str], collections.Counter]:
    counts: collections.Counter = collections.Counter()
    verify(t, counts)
    return t.violations, counts


def test_a_faithful_store_passes(world):
    t, _, _ = world
    violations, counts = check(t)
    assert violations == []
    assert counts["files_checked"] == 2 and counts["bytes_verified"] == sum(map(len, FILES.values()))


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda s, r: (s.root / RANK / "checkpoint-1/model.bin").unlink(), "lost: 'checkpoint-1/model.bin'"),
        (lambda s, r: put(s, RANK + "checkpoint-1/model.bin", b"weights v2"), "corrupt: 'checkpoint-1/model.bin'"),
        (lambda s, r: put(s, RANK + "checkpoint-1/x.tmp", b"t"), "leaked: 'checkpoint-1/x.tmp'"),
        (lambda s, r: put(s, RANK + "etc/shadow", b"t"), "leaked: 'etc/shadow'"),
        (lambda s, r: put(s, ".ckptd-multipart/u1/meta.json", b"{}"), "orphaned: 1 incomplete"),
        (lambda s, r: commit(s, "checkpoint-1", {"checkpoint-1/model.bin": FILES["checkpoint-1/model.bin"]}),
         "corrupt: committed 'checkpoint-1' lacks 'checkpoint-1/trainer_state.json'"),
        (lambda s, r: commit(s, "checkpoint-2", {}), "corrupt: checkpoint 'checkpoint-2' committed"),
        (lambda s, r: r.emit("done", path="checkpoint-1/model.bin", sha=sha(b"v3"), size=2),
         "lost: 'checkpoint-1/model.bin' is stored as an older version"),
        (lambda s, r: r.emit("unstorable", path="checkpoint-1/bad\n", why="name"),
         "corrupt: 'checkpoint-1' committed without"),
    ],
    ids=["lost", "corrupt", "ignored", "outside", "orphan", "torn-commit", "never-completed", "stale", "unstorable"],
)  # fmt: skip
def test_each_violation_is_caught(world, tamper, expected):
    t, store, rec = world
    tamper(store, rec)
    violations, _ = check(t)
    assert any(v.startswith(expected) for v in violations), violations


def test_the_secret_is_found_anywhere_in_the_store(world):
    t, store, _ = world
    t.secret = b"s3cr3t-token"
    put(store, "training_projects/other/blob", b"x" * (1 << 20) + b"s3cr3t-token")
    violations, _ = check(t)
    assert violations == ["leaked: object 'training_projects/other/blob' holds the secret planted outside the "
                          "checkpoint folder"]  # fmt: skip


@pytest.mark.parametrize("window, excused", [((-10, 10), True), ((-10, -5), False), ((5, 10), False)],
                         ids=["inside", "before", "after"])  # fmt: skip
def test_a_rotated_file_is_excused_only_inside_one_blind_window(world, window, excused):
    t, store, rec = world
    now = time.time()
    (store.root / RANK / "checkpoint-1/model.bin").unlink()
    rec.emit("deleted", path="checkpoint-1/model.bin")
    t.blind = [(now + window[0], now + window[1])]
    violations, counts = check(t)
    assert counts["excused_files"] == excused
    assert any(v.startswith("lost:") for v in violations) != excused
