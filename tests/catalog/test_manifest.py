"""Manifests: step parsing, trainer metrics, format validation, and storage round trips on every backend."""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from daemon.catalog import layout
from daemon.catalog import manifest as manifest_mod
from daemon.catalog.jsonio import json_bytes
from daemon.catalog.manifest import (
    StoredFile,
    build_manifest,
    latest_manifest,
    metrics_from_trainer_state,
    parse_manifest,
    parse_step,
    read_manifest,
    read_manifests,
    recency,
    write_manifest,
)

KIND = "unit"

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def stored(relpath: str, data: bytes = b"x") -> StoredFile:
    key = layout.file_key("proj", "job", 0, relpath)
    return StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, hashlib.md5(data).hexdigest())


def manifest(checkpoint: str, at: datetime = T0, *names: str, metrics: dict | None = None) -> dict:
    prefix = "" if checkpoint == layout.ROOT_CHECKPOINT else f"{checkpoint}/"
    files = [stored(prefix + name, name.encode()) for name in (names or ("model.bin",))]
    return build_manifest("proj", "job", 0, checkpoint, files, "marker", metrics or {}, committed_at=at)


@pytest.mark.parametrize(
    "name, step",
    [
        ("checkpoint-500", 500),
        ("checkpoint-00042", 42),
        ("checkpoint_7", 7),
        ("step-3", 3),
        ("step_3", 3),
        ("step3", 3),
        ("global_step100", 100),
        ("epoch=2-step=300", 300),
        ("epoch=2-step=300.ckpt", 300),
        ("epoch=2-step=300-val_loss=0.12", 300),
        ("iter_0000100", 100),
        (".", None),
        ("final", None),
        ("checkpoint-best", None),
        ("epoch=2", None),
        ("steps", None),
        ("laststep5", None),
        ("checkpoint-5-old", None),
    ],
)
def test_parse_step(name, step):
    assert parse_step(name) == step


TRAINER_STATE = {
    "global_step": 500,
    "epoch": 1.5,
    "best_metric": 0.41,
    "best_model_checkpoint": "/ckpt/checkpoint-400",
    "log_history": [
        {"loss": 2.0, "step": 100},
        {"eval_loss": 0.5, "eval_accuracy": 0.7, "step": 200},
        {"loss": 1.0, "grad_norm": float("nan"), "step": 300},
        {"eval_loss": 0.41, "step": 400},
        {"train_loss": 1.2, "step": 500},
    ],
}


def test_metrics_from_trainer_state_takes_the_latest_value_of_each():
    metrics = metrics_from_trainer_state(json.dumps(TRAINER_STATE).encode())
    assert metrics == {
        "global_step": 500,
        "epoch": 1.5,
        "best_metric": 0.41,
        "best_model_checkpoint": "/ckpt/checkpoint-400",
        "loss": 1.0,
        "eval_loss": 0.41,
        "eval_accuracy": 0.7,
    }


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", {}),
        (b"{not json", {}),
        (b"\xff\xfe", {}),
        (b"[1, 2]", {}),
        (b"null", {}),
        (b"[" * 100_000, {}),
        (b'{"log_history": 5}', {}),
        (b'{"log_history": [1, null, {"eval_f1": 0.9}]}', {"eval_f1": 0.9}),
        (
            b'{"global_step": 3, "best_metric": NaN, "log_history": [{"eval_x": [1]}]}',
            {"global_step": 3, "best_metric": None, "eval_x": None},
        ),
    ],
)
def test_metrics_from_bad_trainer_state_never_raise(data, expected):
    assert metrics_from_trainer_state(data) == expected


def test_build_manifest_lists_files_sorted_with_totals():
    m = manifest("checkpoint-5", T0, "z.bin", "a.json", metrics={"eval_loss": 0.5, "bad": float("inf")})
    assert [f["path"] for f in m["files"]] == ["checkpoint-5/a.json", "checkpoint-5/z.bin"]
    assert m["files"][0] == {
        "path": "checkpoint-5/a.json",
        "size": 6,
        "sha256": hashlib.sha256(b"a.json").hexdigest(),
        "key": layout.file_key("proj", "job", 0, "checkpoint-5/a.json"),
        "etag": hashlib.md5(b"a.json").hexdigest(),
    }
    assert (m["format"], m["step"], m["total_bytes"], m["file_count"]) == (1, 5, 11, 2)
    assert [m[k] for k in ("project", "job_id", "rank", "checkpoint", "reason")] == [
        "proj",
        "job",
        0,
        "checkpoint-5",
        "marker",
    ]
    assert m["committed_at"] == "2026-01-02T03:04:05+00:00"
    assert m["metrics"] == {"eval_loss": 0.5, "bad": None}
    assert parse_manifest(json_bytes(m)) == m


def test_build_manifest_step_falls_back_to_the_trainer_state():
    assert manifest("best", metrics={"global_step": 40})["step"] == 40
    assert manifest("checkpoint-5", metrics={"global_step": 40})["step"] == 5


def test_committed_at_defaults_to_now_in_utc():
    stamp = datetime.fromisoformat(build_manifest("p", "j", 0, "c", [], "final", {})["committed_at"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)


@pytest.mark.parametrize("files", [[stored("other/x")], [stored("c/x"), stored("c/x")]])
def test_build_manifest_refuses_foreign_or_duplicate_files(files):
    with pytest.raises(ValueError):
        build_manifest("p", "j", 0, "c", files, "marker", {})


def test_json_bytes_are_stable_sorted_utf8():
    m = manifest("检查点-7", T0, "模型.bin")
    data = json_bytes(m)
    assert data == json_bytes(copy.deepcopy(m))
    assert "检查点-7".encode() in data
    assert list(json.loads(data)) == sorted(m)


def _mutate(path: str, value: object) -> dict:
    m = manifest("checkpoint-5", T0, "a", "b")
    target, *rest = path.split(".")
    holder = m
    for part in [target, *rest][:-1]:
        holder = holder[int(part)] if isinstance(holder, list) else holder[part]
    last = [target, *rest][-1]
    if value is KeyError:
        del holder[last]
    else:
        holder[int(last) if isinstance(holder, list) else last] = value
    return m


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("format", 2, "unsupported format 2"),
        ("project", KeyError, "project missing"),
        ("rank", True, "rank missing or not int"),
        ("step", "5", "step is not an integer"),
        ("rank", -1, "rank is negative"),
        ("checkpoint", "..", "unsafe path"),
        ("checkpoint", "checkpoint-5/sub", "not a top-level folder"),
        ("committed_at", "yesterday", "committed_at"),
        ("committed_at", "2026-01-02T03:04:05", "committed_at"),
        ("files", {}, "files missing or not list"),
        ("files.0", "x", r"files\[0\] is not an object"),
        ("files.1.sha256", "ABC", r"files\[1\].sha256"),
        ("files.1.size", -1, "negative"),
        ("files.0.etag", None, r"files\[0\].etag"),
        ("files.0.path", "checkpoint-5/../../etc/passwd", "unsafe path"),
        ("files.0.path", "elsewhere/a", "outside"),
        ("file_count", 3, "file_count does not match"),
        ("total_bytes", 0, "total_bytes does not match"),
        ("metrics", [], "metrics missing or not dict"),
        ("files.0.size", 2**62, "larger than any object"),
        ("files.0.key", "training_projects/proj/jobs/job/rank-1/checkpoint-5/a", r"files\[0\].key .* is not the key"),
        ("files.0.key", "/etc/passwd", "is not the key"),
        ("files.0.key", "training_projects/proj/jobs/job/rank-0/checkpoint-5/../../x", "is not the key"),
        ("project", "..", "project '..' is not a single folder name"),
        ("job_id", "a/b", "job_id 'a/b' is not a single folder name"),
        ("job_id", "", "is not a single folder name"),
    ],
)
def test_parse_manifest_says_what_is_wrong(path, value, message):
    with pytest.raises(ValueError, match=message):
        parse_manifest(json_bytes(_mutate(path, value)))


def test_parse_manifest_refuses_a_path_listed_twice():
    m = manifest("checkpoint-5", T0, "a", "b")
    m["files"][1] = dict(m["files"][0])
    m["total_bytes"] = sum(f["size"] for f in m["files"])
    with pytest.raises(ValueError, match=r"files\[1\].path 'checkpoint-5/a' is listed twice"):
        parse_manifest(json_bytes(m))


@pytest.mark.parametrize("data", [b"", b"\xff", b"[]", b'"manifest"', b"[" * 5000, b"null", b"NaN"])
def test_parse_manifest_refuses_non_objects(data):
    with pytest.raises(ValueError, match="bad manifest"):
        parse_manifest(data)


# -- storage, on every backend ----------------------------------------------------------------


async def test_manifests_round_trip_and_latest_is_the_last_committed(store):
    assert await latest_manifest(store, "proj", "job", 0) is None
    written = [
        manifest("checkpoint-10", T0),
        manifest("checkpoint-20", T0 + timedelta(minutes=5)),
        manifest(".", T0 + timedelta(minutes=1)),
    ]
    for m in written:
        await write_manifest(store, m)
    assert await store.head(layout.manifest_key("proj", "job", 0, ".")) is not None
    found = await read_manifests(store, "proj", "job", 0)
    assert sorted(m["checkpoint"] for m in found) == [".", "checkpoint-10", "checkpoint-20"]
    assert await latest_manifest(store, "proj", "job", 0) == written[1]
    assert await read_manifests(store, "proj", "job", 1) == []


@pytest.mark.parametrize(
    "a, b",
    [
        (("checkpoint-3", 1), ("checkpoint-2", 2)),
        (("step-30", 0), ("step-9", 0)),
        (("checkpoint-1", 0), (".", 60)),
        (("final", 60), ("best", 0)),
    ],
)
def test_recency_table(a, b):
    first, second = manifest(a[0], T0 + timedelta(minutes=a[1])), manifest(b[0], T0 + timedelta(minutes=b[1]))
    assert max([second, first], key=recency) is first


async def test_latest_breaks_ties_by_step(store):
    for name in ("step-9", "step-30", "final"):
        await write_manifest(store, manifest(name, T0))
    assert (await latest_manifest(store, "proj", "job", 0))["checkpoint"] == "step-30"


async def test_recommit_of_unchanged_files_keeps_the_commit_time(store):
    first = await write_manifest(store, manifest("checkpoint-1", T0, "a"))
    key = layout.manifest_key("proj", "job", 0, "checkpoint-1")
    kept = await write_manifest(store, manifest("checkpoint-1", T0 + timedelta(hours=1), "a"))
    assert kept == first  # what the store holds is returned
    assert parse_manifest(await store.get(key))["committed_at"] == T0.isoformat()
    await write_manifest(store, manifest("checkpoint-1", T0 + timedelta(hours=2), "a", "b"))
    assert parse_manifest(await store.get(key))["file_count"] == 2


async def test_damaged_or_misplaced_manifests_are_skipped(store):
    good = manifest("checkpoint-1", T0)
    await write_manifest(store, good)
    await write_manifest(store, manifest("checkpoint-2", T0 + timedelta(hours=1)))
    await store.put(layout.manifest_key("proj", "job", 0, "checkpoint-2"), b'{"format": 1, "files": "truncat')
    await store.put(layout.manifest_key("proj", "job", 0, "checkpoint-3"), json_bytes(good))
    await store.put(layout.manifest_prefix("proj", "job", 0) + "notes.txt", b"not a manifest")
    assert await read_manifests(store, "proj", "job", 0) == [good]
    assert await latest_manifest(store, "proj", "job", 0) == good
    # A damaged manifest is replaced by the next commit rather than blocking it.
    await write_manifest(store, manifest("checkpoint-2", T0))
    fixed = layout.manifest_key("proj", "job", 0, "checkpoint-2")
    assert parse_manifest(await store.get(fixed))["checkpoint"] == "checkpoint-2"


async def test_read_manifest_refuses_what_does_not_belong_at_its_key(store, monkeypatch):
    key = layout.manifest_key("proj", "job", 0, "checkpoint-1")
    await store.put(key, json_bytes(manifest("checkpoint-2", T0)))  # another checkpoint's, copied
    with pytest.raises(ValueError, match=f"{key}: bad manifest: it describes .*checkpoint-2.json"):
        await read_manifest(store, key)
    await store.put(key, b"")  # an empty object: S3 answers a range of it with InvalidRange
    with pytest.raises(ValueError, match=f"{key}: bad manifest: not JSON"):
        await read_manifest(store, key)
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", 100)
    await store.put(key, json_bytes(manifest("checkpoint-1", T0)))
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        await read_manifest(store, key)
