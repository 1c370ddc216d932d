"""catalog.browse: choosing among checkpoints (latest, best by a metric) as pure rules, and finding
projects, jobs and checkpoints in a real store (a local folder, moto and the JuiceFS gateway)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from daemon.catalog import browse, layout
from daemon.catalog.browse import AmbiguousJob, Checkpoint, MissingMetric
from daemon.catalog.jsonio import json_bytes
from daemon.catalog.manifest import StoredFile, build_manifest

KIND = "unit"

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
P, J = "proj", "job"


def manifest(name: str, at: int = 0, rank: int = 0, metrics: dict | None = None, job: str = J, size: int = 10):
    """A manifest of `name` on `rank`, committed `at` seconds after T0, with one file of `size` bytes."""
    rel = "model.bin" if name == layout.ROOT_CHECKPOINT else f"{name}/model.bin"
    data = bytes(size)
    stored = StoredFile(
        rel, size, hashlib.sha256(data).hexdigest(), layout.file_key(P, job, rank, rel), hashlib.md5(data).hexdigest()
    )
    when = T0 + timedelta(seconds=at)
    return build_manifest(P, job, rank, name, [stored], "marker", metrics or {}, committed_at=when)


def ckpt(name: str, at: int = 0, **metrics) -> Checkpoint:
    return Checkpoint(name, {0: manifest(name, at, metrics=metrics)})


@pytest.mark.parametrize(
    "found, latest",
    [
        ([ckpt("checkpoint-3", 1), ckpt("checkpoint-2", 2)], "checkpoint-3"),  # out-of-order commits
        ([ckpt("step-30"), ckpt("step-9")], "step-30"),  # numbers, not text ("step-9" > "step-30")
        ([ckpt(".", 10), ckpt("checkpoint-1", 0)], "checkpoint-1"),  # a named step beats the root files
        ([ckpt(".", 10)], "."),  # ... which are the latest only when alone
        ([ckpt("final", 10), ckpt("best", 5)], "final"),  # no steps: the later commit
        ([ckpt("checkpoint-5", 1), ckpt("final", 9)], "checkpoint-5"),  # a step beats no step
        ([], None),
    ],
)
def test_latest(found: list[Checkpoint], latest: str | None) -> None:
    chosen = browse.latest(found)
    assert (chosen.name if chosen else None) == latest


BEST = [
    ckpt("checkpoint-10", 1, eval_loss=0.9),
    ckpt("checkpoint-20", 2, eval_loss=0.5),
    ckpt("checkpoint-30", 3, eval_loss=0.7, eval_acc=0.1),
    ckpt("checkpoint-40", 4, eval_loss=0.5),  # ties with 20: the later one first
    ckpt("checkpoint-50", 5, eval_loss="n/a"),  # not a number: cannot be ranked
    ckpt("checkpoint-60", 6),  # no value: cannot be ranked
    ckpt(".", 7, eval_loss=0.0),  # shared files, never a candidate
]


@pytest.mark.parametrize(
    "metric, mode, order",
    [
        ("eval_loss", "min", ["checkpoint-40", "checkpoint-20", "checkpoint-30", "checkpoint-10"]),
        ("eval_loss", "max", ["checkpoint-10", "checkpoint-30", "checkpoint-40", "checkpoint-20"]),
        ("eval_acc", "max", ["checkpoint-30"]),
    ],
)
def test_best(metric: str, mode: str, order: list[str]) -> None:
    assert [c.name for c in browse.best(BEST, metric, mode)] == order


def test_best_without_the_metric_names_the_recorded_ones_and_a_bad_mode_is_refused() -> None:
    with pytest.raises(MissingMetric, match="'bleu'; recorded: eval_acc, eval_loss"):
        browse.best(BEST, "bleu", "max")
    with pytest.raises(MissingMetric, match="none records any metric"):
        browse.best([ckpt("checkpoint-1")], "eval_loss", "min")
    with pytest.raises(ValueError, match="mode must be min or max"):
        browse.best(BEST, "eval_loss", "lowest")


def test_a_checkpoint_merges_its_ranks() -> None:
    c = Checkpoint(
        "checkpoint-7",
        {
            1: manifest("checkpoint-7", 9, rank=1, metrics={"eval_loss": 2.0, "rank1_only": 1}, size=5),
            0: manifest("checkpoint-7", 3, rank=0, metrics={"eval_loss": 1.0}, size=7),
        },
    )
    assert (c.ranks, c.step, c.total_bytes, c.file_count) == ([0, 1], 7, 12, 2)
    assert c.committed_at == (T0 + timedelta(seconds=9)).isoformat()  # the last rank's commit
    assert c.metrics == {"eval_loss": 1.0, "rank1_only": 1}  # the lowest rank wins, others complete it
    assert c.metric("eval_loss") == 1.0


@pytest.mark.parametrize(
    "job_id, created_at, key",
    [
        ("anything", "2026-03-01T12:00:00+00:00", (1, T0, "anything")),
        ("anything", "2026-03-01T12:00:00", (1, T0, "anything")),  # no zone: UTC
        ("20260301t120000-abc123", None, (1, T0, "20260301t120000-abc123")),  # ckptd's generated ids
        ("20260301t120000-abc123", "garbage", (1, T0, "20260301t120000-abc123")),
        ("20261399t999999-abc123", None, (0, datetime.min.replace(tzinfo=UTC), "20261399t999999-abc123")),
        ("run-42", None, (0, datetime.min.replace(tzinfo=UTC), "run-42")),
    ],
)
def test_job_order_key(job_id: str, created_at: str | None, key: tuple) -> None:
    assert browse.job_order_key(job_id, created_at) == key


async def put_manifest(store, m: dict, key: str | None = None) -> None:
    await store.put(key or layout.manifest_key(m["project"], m["job_id"], m["rank"], m["checkpoint"]), json_bytes(m))


async def test_checkpoints_across_ranks_skip_damaged_and_misplaced_manifests(store) -> None:
    await put_manifest(store, manifest("checkpoint-10", rank=0))
    await put_manifest(store, manifest("checkpoint-10", rank=1))
    await put_manifest(store, manifest("checkpoint-20", rank=0))
    await store.put(layout.manifest_key(P, J, 1, "checkpoint-20"), b"{damaged")  # rank 1's: unreadable
    # another job's valid manifest copied here names nothing of this job
    await put_manifest(store, manifest("checkpoint-30", job="other"), layout.manifest_key(P, J, 0, "checkpoint-30"))
    await put_manifest(store, manifest(".", rank=1))
    await store.put(layout.job_prefix(P, J) + "manifests/rank-01/checkpoint-40.json", b"{}")  # not a rank name
    await store.put(layout.job_prefix(P, J) + "manifests/rank-0/notes.txt", b"hello")

    found = await browse.checkpoints(store, P, J)
    assert [(c.name, c.ranks) for c in found] == [(".", [1]), ("checkpoint-10", [0, 1]), ("checkpoint-20", [0])]
    only_1 = await browse.checkpoints(store, P, J, ranks=[1])
    assert [(c.name, c.ranks) for c in only_1] == [(".", [1]), ("checkpoint-10", [1])]
    assert browse.checkpoint_named(found, "checkpoint-20").ranks == [0]
    assert browse.checkpoint_named(found, "checkpoint-30") is None


async def test_jobs_newest_first_latest_job_and_projects(store) -> None:
    await store.put(layout.job_metadata_key(P, "old"), json_bytes({"created_at": "2026-01-01T00:00:00+00:00"}))
    await store.put(layout.job_metadata_key(P, "new"), json_bytes({"created_at": "2026-06-01T00:00:00+00:00"}))
    await store.put(layout.file_key(P, "20260301t000000-aaaa", 0, "a/x"), b"x")  # a generated id, no job.json
    await store.put(layout.file_key(P, "undated", 0, "a/x"), b"x")
    await store.put(layout.file_key("second", "j", 0, "a/x"), b"x")
    jobs = await browse.jobs_newest_first(store, P)
    assert jobs == [
        ("new", "2026-06-01T00:00:00+00:00"),
        ("20260301t000000-aaaa", None),
        ("old", "2026-01-01T00:00:00+00:00"),
        ("undated", None),
    ]
    assert await browse.latest_job(store, P) == "new"
    assert await browse.projects(store) == [P, "second"]
    with pytest.raises(browse.NotFound, match="project 'none' has no jobs"):
        await browse.latest_job(store, "none")


async def test_project_of_finds_the_one_project_holding_a_job(store) -> None:
    await store.put(layout.file_key("a", "shared", 0, "c/x"), b"x")
    await store.put(layout.job_metadata_key("b", "shared"), b"{}")  # job.json alone is enough
    await store.put(layout.file_key("b", "only-b", 0, "c/x"), b"x")
    assert await browse.project_of(store, "shared", "a") == "a"  # the default project wins when it has it
    assert await browse.project_of(store, "only-b", "a") == "b"
    assert await browse.project_of(store, "nowhere", "a") is None
    with pytest.raises(AmbiguousJob, match="several projects \\(a, b\\)"):
        await browse.project_of(store, "shared", "default")


async def test_stored_folders_and_job_usage_see_uncommitted_folders(store) -> None:
    for rank, rel, size in [(0, "checkpoint-1/a", 3), (0, "checkpoint-2/a", 4), (1, "checkpoint-1/b", 5), (0, "t", 6)]:
        await store.put(layout.file_key(P, J, rank, rel), bytes(size))
    await put_manifest(store, manifest("checkpoint-1"))
    await store.put(layout.job_metadata_key(P, J), b"{}")
    await store.put(layout.job_prefix(P, J) + "rank-x/checkpoint-9/a", b"x")  # not a rank folder
    assert await browse.stored_folders(store, P, J) == {0: ["checkpoint-1", "checkpoint-2"], 1: ["checkpoint-1"]}
    assert await browse.job_usage(store, P, J) == {"ranks": [0, 1], "files": 4, "bytes": 18, "checkpoints": 1}
    assert await browse.stored_folders(store, P, "nope") == {}
