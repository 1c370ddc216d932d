"""Resolving checkpoint references from commit manifests, on every backend."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from daemon.catalog import layout
from daemon.catalog.browse import job_order_key
from daemon.catalog.jobmeta import ensure_job
from daemon.catalog.jsonio import json_bytes
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.config.refs import LATEST, NAMED, CheckpointRef
from daemon.restore.plan import Conflict, Item, UnsafeManifest, plan
from daemon.restore.resolve import AmbiguousJob, BadManifest, Resolved, pick_rank, resolve

KIND = "unit"

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


async def commit(
    storage,
    project: str,
    job: str,
    rank: int,
    checkpoint: str,
    files: dict[str, bytes],
    at: datetime,
    *,
    upload: bool = True,
) -> dict:
    """Store a checkpoint's files (unless `upload` is off) and its commit manifest, as ckptd does."""
    stored = []
    for name, data in files.items():
        relpath = name if checkpoint == layout.ROOT_CHECKPOINT else f"{checkpoint}/{name}"
        key = layout.file_key(project, job, rank, relpath)
        etag = await storage.put(key, data) if upload else hashlib.md5(data).hexdigest()
        stored.append(StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, etag))
    manifest = build_manifest(project, job, rank, checkpoint, stored, "marker", {}, committed_at=at)
    await write_manifest(storage, manifest)
    return manifest


async def manifest_only(storage, project: str, job: str, rank: int, checkpoint: str, at: datetime) -> None:
    await commit(storage, project, job, rank, checkpoint, {"model.bin": checkpoint.encode()}, at, upload=False)


@pytest.fixture
async def history(store):
    """proj: job-a (older, rank 0 only), job-b (newer, ranks 0 and 1, each its own commits), job-c (newest,
    nothing committed).
    other: job-d. Which of a job's checkpoints is its latest is manifest.latest_manifest's business."""
    hour = timedelta(hours=1)
    await ensure_job(store, "proj", "job-a", 1, created_at=T0)
    await manifest_only(store, "proj", "job-a", 0, "checkpoint-20", T0 + hour)
    await manifest_only(store, "proj", "job-a", 0, "checkpoint-100", T0 + 2 * hour)
    # Stored but never committed (a save cut short): never a candidate.
    await store.put(layout.file_key("proj", "job-a", 0, "checkpoint-300/model.bin"), b"partial")
    # Two nodes of an earlier ckptd, each committing its own checkpoints (no global_commit):
    job_b = {"project": "proj", "job_id": "job-b", "created_at": (T0 + 10 * hour).isoformat(), "group_size": 2}
    await store.put(layout.job_metadata_key("proj", "job-b"), json_bytes(job_b))
    await manifest_only(store, "proj", "job-b", 0, "checkpoint-5", T0 + 11 * hour)
    await manifest_only(store, "proj", "job-b", 0, "checkpoint-7", T0 + 12 * hour)
    await manifest_only(store, "proj", "job-b", 1, "checkpoint-5", T0 + 11 * hour)
    await ensure_job(store, "proj", "job-c", 1, created_at=T0 + 20 * hour)
    await store.put(layout.file_key("proj", "job-c", 0, "checkpoint-1/model.bin"), b"partial")
    await ensure_job(store, "other", "job-d", 1, created_at=T0)
    await manifest_only(store, "other", "job-d", 0, "step-3", T0)
    return store


@pytest.mark.parametrize(
    "rank, ranks, expected",
    [
        (0, {0}, 0),
        (0, {0, 1}, 0),
        (1, {0, 1}, 1),
        (1, {1}, 1),
        (1, {0}, 0),
        (2, {0, 1}, 0),
        (0, set(), None),
        (1, set(), None),
        (1, {2}, None),
    ],
)
def test_pick_rank(rank, ranks, expected):
    assert pick_rank(rank, ranks) == expected


@pytest.mark.parametrize(
    "older, newer",
    [
        (("b", "2026-01-01T00:00:00+00:00"), ("a", "2026-01-02T00:00:00+00:00")),  # created_at beats the id
        (("a", "2026-01-01T01:00:00+01:00"), ("b", "2026-01-01T00:30:00+00:00")),  # zones compared in UTC
        (("20260101t000000-aaaaaa", None), ("20260102t000000-000000", None)),  # time in generated ids
        (("20260103t000000-aaaaaa", None), ("x", "2026-01-04T00:00:00+00:00")),  # id time vs created_at
        (("zzz", None), ("20200101t000000-aaaaaa", None)),  # unknown time is oldest
        (("zzz", "not a time"), ("aaa", "2020-01-01T00:00:00")),  # naive read as UTC, junk as unknown
        (("a", None), ("b", None)),  # both unknown: by id
    ],
)
def test_job_order_key(older, newer):
    assert job_order_key(*older) < job_order_key(*newer)


def latest(project: str | None = None, job: str | None = None, **kw) -> CheckpointRef:
    return CheckpointRef(LATEST, project_name=project, job_id=job, **kw)


def named(checkpoint: str, job: str, project: str | None = None) -> CheckpointRef:
    return CheckpointRef(NAMED, project_name=project, job_id=job, checkpoint_name=checkpoint)


@pytest.mark.parametrize(
    "ref, rank, expected",
    [
        # latest of a project: newest job with a commit (job-c has none), its latest commit
        (latest("proj"), 0, ("proj", "job-b", 0, "checkpoint-7")),
        (latest("proj"), 1, ("proj", "job-b", 1, "checkpoint-5")),  # rank 1's own commits
        (latest("proj"), 3, ("proj", "job-b", 0, "checkpoint-7")),  # no rank-3 commits: rank 0's
        (latest("other"), 0, ("other", "job-d", 0, "step-3")),
        # latest of a job: never the uncommitted checkpoint-300
        (latest(job="job-a"), 0, ("proj", "job-a", 0, "checkpoint-100")),
        (latest("proj", "job-a"), 0, ("proj", "job-a", 0, "checkpoint-100")),
        (latest(job="job-a"), 1, ("proj", "job-a", 0, "checkpoint-100")),  # rank 0 fallback
        (latest(job="job-b"), 1, ("proj", "job-b", 1, "checkpoint-5")),
        (latest(job="job-d"), 0, ("other", "job-d", 0, "step-3")),  # found in another project
        # named
        (named("checkpoint-20", "job-a"), 0, ("proj", "job-a", 0, "checkpoint-20")),
        (named("checkpoint-20", "job-a", "proj"), 1, ("proj", "job-a", 0, "checkpoint-20")),
        (named("checkpoint-5", "job-b"), 1, ("proj", "job-b", 1, "checkpoint-5")),
        (named("step-3", "job-d"), 0, ("other", "job-d", 0, "step-3")),
        # nothing matches
        (named("checkpoint-7", "job-b"), 1, None),  # rank 1 has commits of its own, not this one
        (named("checkpoint-300", "job-a"), 0, None),  # stored, never committed
        (named("checkpoint-20", "job-a", "other"), 0, None),
        (latest(job="job-c"), 0, None),
        (latest(job="nope"), 0, None),
        (latest("proj", "job-d"), 0, None),
        (latest("empty"), 0, None),
    ],
)
async def test_resolve(history, ref, rank, expected):
    found = await resolve(history, ref, default_project="proj", rank=rank)
    got = found and (found.project, found.job_id, found.source_rank, found.checkpoint)
    assert got == expected
    if found is not None:
        assert found.ref == ref
        assert found.manifest["checkpoint"] == found.checkpoint
        assert (found.manifest["job_id"], found.manifest["rank"]) == (found.job_id, found.source_rank)


async def test_default_project_wins_over_others(history):
    await manifest_only(history, "other", "job-a", 0, "checkpoint-999", T0 + 100 * timedelta(hours=1))
    found = await resolve(history, latest(job="job-a"), default_project="proj", rank=0)
    assert (found.project, found.checkpoint) == ("proj", "checkpoint-100")


async def test_job_in_several_other_projects_is_ambiguous(history):
    for project in ("p1", "p2"):
        await manifest_only(history, project, "twin", 0, "checkpoint-1", T0)
    with pytest.raises(AmbiguousJob, match=r"p1, p2.*project_name"):
        await resolve(history, latest(job="twin"), default_project="proj", rank=0)
    found = await resolve(history, latest("p2", "twin"), default_project="proj", rank=0)
    assert found.project == "p2"


async def test_job_without_metadata_sorts_by_its_generated_id(history):
    # No job.json: the time in ckptd's generated id says it is the newest job.
    await manifest_only(history, "proj", "20990101t000000-abcdef", 0, "checkpoint-1", T0)
    found = await resolve(history, latest("proj"), default_project="proj", rank=0)
    assert found.job_id == "20990101t000000-abcdef"


async def test_unreadable_named_manifest_is_an_error_naming_its_key(history):
    key = layout.manifest_key("proj", "job-a", 0, "checkpoint-100")
    await history.put(key, b"{not json")
    with pytest.raises(BadManifest, match=f"{key}: bad manifest: not JSON") as caught:
        await resolve(history, named("checkpoint-100", "job-a"), default_project="proj", rank=0)
    assert caught.value.key == key


def listing(job: str, checkpoint: str, paths: tuple[str, ...], sha: str = "0") -> dict:
    files = [{"path": p, "key": f"k/{job}/{p}", "size": len(p), "sha256": sha * 64} for p in paths]
    return {"checkpoint": checkpoint, "files": files, "step": None}


def resolved(
    job: str, checkpoint: str, *paths: str, source_rank: int = 0, sha: str = "0", root: tuple[str, ...] = ()
) -> Resolved:
    """A resolved reference whose manifest lists `paths`, and its job's root manifest `root` (if
    any), unvalidated: plan must not rely on parse_manifest. `sha`: the digit every SHA-256 repeats."""
    ref = CheckpointRef(NAMED, job_id=job, checkpoint_name=checkpoint)
    tops = listing(job, ".", root, sha) if root else None
    return Resolved(ref, "proj", job, source_rank, checkpoint, listing(job, checkpoint, paths, sha), tops)


def test_plan_puts_files_under_this_nodes_rank(tmp_path):
    # Files from rank 0 of the source job land under this node's own rank folder.
    ref = resolved("a", "checkpoint-20", "checkpoint-20/m.bin", "checkpoint-20/d/x")
    units, restored = plan([ref], str(tmp_path), rank=3)
    folder = tmp_path / "rank-3" / "checkpoint-20"
    assert [(u.name, u.folder, u.required) for u in units] == [("checkpoint-20", str(folder), False)]
    assert units[0].items == [
        Item("k/a/checkpoint-20/m.bin", str(folder / "m.bin"), 19, "0" * 64, "m.bin"),
        Item("k/a/checkpoint-20/d/x", str(folder / "d" / "x"), 17, "0" * 64, "d/x"),
    ]
    assert [(r["source_rank"], r["target"], r["files"], r["bytes"]) for r in restored] == [(0, str(folder), 2, 36)]


@pytest.mark.parametrize(
    "checkpoint, path",
    [
        ("checkpoint-1", "../../etc/x"),
        ("checkpoint-1", "checkpoint-1/../../x"),
        ("checkpoint-1", "checkpoint-1/../checkpoint-2/x"),
        ("checkpoint-1", "/etc/x"),
        ("checkpoint-1", "checkpoint-1//x"),
        ("checkpoint-1", "checkpoint-2/x"),  # outside its own checkpoint
        ("checkpoint-1", "x"),
        (".", "checkpoint-1/x"),
        ("..", "../x"),
        ("/etc", "/etc/x"),
    ],
)
def test_plan_refuses_escaping_paths(tmp_path, checkpoint, path):
    with pytest.raises(UnsafeManifest, match="refusing"):
        plan([resolved("a", checkpoint, path)], str(tmp_path), 0)


def test_plan_refuses_a_path_listed_twice(tmp_path):
    with pytest.raises(UnsafeManifest, match="twice"):
        plan([resolved("a", "c", "c/x", "c/x")], str(tmp_path), 0)


@pytest.mark.parametrize(
    "refs, conflict",
    [
        ([resolved("a", "c", "c/x"), resolved("b", "c", "c/y")], True),  # other job, same folder
        ([resolved("a", "c", "c/x"), resolved("a", "c", "c/x", source_rank=1)], True),  # other rank
        ([resolved("a", ".", "x"), resolved("b", ".", "x", sha="1")], True),  # one root file, other bytes
        ([resolved("a", "c", "c/x", root=("t",)), resolved("b", "d", "d/x", root=("t",), sha="1")], True),
        ([resolved("a", "c", "c/x", root=("d",)), resolved("b", "d", "d/x")], True),  # root file named like a folder
        ([resolved("a", ".", "c"), resolved("b", "c", "c/x")], True),  # a top file named like a folder
        ([resolved("a", "c", "c/x"), resolved("a", "c", "c/x")], False),  # the very same checkpoint: one
        ([resolved("a", "c", "c/x"), resolved("b", "d", "d/x")], False),
        ([resolved("a", ".", "x"), resolved("b", "c", "c/x")], False),
        ([resolved("a", ".", "x"), resolved("b", ".", "y")], False),  # two root files
        ([resolved("a", ".", "x"), resolved("b", ".", "x")], False),  # one root file, the same bytes
        ([resolved("a", "c", "c/x", root=("t",)), resolved("b", "d", "d/x", root=("t", "u"))], False),
    ],
)
def test_plan_conflicts(tmp_path, refs, conflict):
    if conflict:
        with pytest.raises(Conflict, match="would both restore"):
            plan(refs, str(tmp_path), 0)
    else:
        units, restored = plan(refs, str(tmp_path), 0)
        items = [i for u in units for i in u.items]
        assert len(restored) == 2 and len(items) == len({i.target for i in items})


@pytest.mark.parametrize(
    "job_id, created_at, key",
    [
        # valid ISO time | any -> (1, created_at, id)
        ("job-x", "2026-01-02T03:04:05+00:00", (1, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "job-x")),
        (
            "20200101t000000-abcdef",
            "2026-01-02T03:04:05+00:00",
            (1, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "20200101t000000-abcdef"),
        ),
        # missing or invalid | generated by ckptd -> (1, time in the id, id)
        (
            "20250607t080910-abcdef",
            None,
            (1, datetime(2025, 6, 7, 8, 9, 10, tzinfo=UTC), "20250607t080910-abcdef"),
        ),
        (
            "20250607t080910-abcdef",
            "yesterday",
            (1, datetime(2025, 6, 7, 8, 9, 10, tzinfo=UTC), "20250607t080910-abcdef"),
        ),
        # missing or invalid | not generated -> (0, datetime.min, id)
        ("job-x", None, (0, datetime.min.replace(tzinfo=UTC), "job-x")),
        ("job-x", "not a time", (0, datetime.min.replace(tzinfo=UTC), "job-x")),
        ("job-x", 12345, (0, datetime.min.replace(tzinfo=UTC), "job-x")),
        # shaped like a generated id, but no time ckptd could have written (month 13): not generated
        ("20261301t000000-abcdef", None, (0, datetime.min.replace(tzinfo=UTC), "20261301t000000-abcdef")),
    ],
)
def test_job_order_key_table(job_id, created_at, key):
    assert job_order_key(job_id, created_at) == key


async def test_latest_of_a_project_survives_a_job_id_that_only_looks_generated(tmp_path):
    from daemon.storage.local import LocalStorage

    async with LocalStorage(tmp_path / "store") as store:
        # A user-named job (a valid name) with files but no job.json: its id decides its age.
        await store.put(layout.file_key("proj", "20261301t000000-abcdef", 0, "checkpoint-1/model.bin"), b"x")
        await ensure_job(store, "proj", "job-ok", 1, created_at=T0)
        await manifest_only(store, "proj", "job-ok", 0, "checkpoint-5", T0)
        found = await resolve(store, latest(project="proj"), default_project="proj", rank=0)
    assert found is not None and (found.job_id, found.checkpoint) == ("job-ok", "checkpoint-5")


def test_plan_one_folder_named_twice_is_required_if_either_reference_is(tmp_path):
    optional = resolved("a", "c", "c/x")
    required = dataclasses.replace(optional, ref=CheckpointRef(NAMED, job_id="a", checkpoint_name="c", required=True))
    (unit,), restored = plan([optional, required], str(tmp_path), 0)
    assert unit.required and unit.refs == [optional.ref.describe(), required.ref.describe()] and len(restored) == 2
