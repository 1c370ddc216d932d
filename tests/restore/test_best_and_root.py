"""Restore by a manifest metric (best of a job, best of a project) and the root files ('.') that come
with every restored checkpoint, against a real store on every backend."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta

import pytest
from test_resolve import T0
from test_restorer import run, tree

from daemon.catalog import layout
from daemon.catalog.jobmeta import ensure_job
from daemon.catalog.jsonio import json_bytes
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.config.refs import BEST, LATEST, NAMED, CheckpointRef
from daemon.restore.resolve import BadManifest, Unmatched, resolve
from daemon.restore.restorer import RestoreConflict, RestoreFailed

KIND = "unit"
HOUR = timedelta(hours=1)


async def save(store, job: str, rank: int, checkpoint: str, files: dict[str, bytes], at, **metrics) -> None:
    """Store a checkpoint's files and its commit manifest with `metrics`, as ckptd does."""
    stored = []
    for name, data in files.items():
        relpath = name if checkpoint == layout.ROOT_CHECKPOINT else f"{checkpoint}/{name}"
        key = layout.file_key("proj", job, rank, relpath)
        etag = await store.put(key, data)
        stored.append(StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, etag))
    await write_manifest(
        store, build_manifest("proj", job, rank, checkpoint, stored, "marker", metrics, committed_at=at)
    )


def weights(job: str, rank: int, checkpoint: str) -> dict[str, bytes]:
    return {"model.bin": f"{job}/{rank}/{checkpoint}".encode(), "trainer_state.json": b"{}"}


def tokenizer(job: str, rank: int) -> dict[str, bytes]:
    return {
        "tokenizer.json": b'{"model": "bpe"}',
        "tokenizer_config.json": f'{{"job": "{job}", "rank": {rank}}}'.encode(),
    }


@pytest.fixture
async def sweep(store):
    """proj/job-a (older): rank 0 logs eval_loss/eval_acc, rank 1 logs nothing; both saved a tokenizer.
    proj/job-b (newer): eval_loss only, a tie between its two checkpoints; no root files.
    proj/job-c (newest): one checkpoint without metrics."""
    # Two nodes of an earlier ckptd, each committing its own checkpoints: no global_commit in job.json.
    job_a = {"project": "proj", "job_id": "job-a", "created_at": T0.isoformat(), "group_size": 2}
    await store.put(layout.job_metadata_key("proj", "job-a"), json_bytes(job_a))
    for n, (loss, acc) in enumerate([(0.9, 0.1), (0.5, 0.3), (0.7, 0.2)], 1):
        name = f"checkpoint-{n * 10}"
        await save(store, "job-a", 0, name, weights("job-a", 0, name), T0 + n * HOUR, eval_loss=loss, eval_acc=acc)
        await save(store, "job-a", 1, name, weights("job-a", 1, name), T0 + n * HOUR)
    for rank in (0, 1):
        await save(store, "job-a", rank, ".", tokenizer("job-a", rank), T0)
    await ensure_job(store, "proj", "job-b", 1, created_at=T0 + 10 * HOUR)
    await save(store, "job-b", 0, "checkpoint-5", weights("job-b", 0, "checkpoint-5"), T0 + 11 * HOUR, eval_loss=0.3)
    await save(store, "job-b", 0, "checkpoint-7", weights("job-b", 0, "checkpoint-7"), T0 + 12 * HOUR, eval_loss=0.3)
    await ensure_job(store, "proj", "job-c", 1, created_at=T0 + 20 * HOUR)
    await save(store, "job-c", 0, "checkpoint-1", weights("job-c", 0, "checkpoint-1"), T0 + 21 * HOUR)
    return store


def best(metric: str, mode: str = "min", *, job: str | None = None, project: str | None = None, **kw) -> CheckpointRef:
    return CheckpointRef(BEST, project_name=project, job_id=job, metric=metric, mode=mode, **kw)


@pytest.mark.parametrize(
    "ref, rank, expected",
    [
        (best("eval_loss", job="job-a"), 0, ("job-a", 0, "checkpoint-20")),
        (best("eval_loss", "max", job="job-a"), 0, ("job-a", 0, "checkpoint-10")),
        (best("eval_acc", "max", job="job-a"), 0, ("job-a", 0, "checkpoint-20")),
        (best("eval_acc", "min", project="proj", job="job-a"), 0, ("job-a", 0, "checkpoint-10")),
        # rank 1 logs no metrics: it ranks by rank 0's, so both nodes restore the same checkpoint
        (best("eval_loss", job="job-a"), 1, ("job-a", 1, "checkpoint-20")),
        (best("eval_loss", job="job-a"), 3, ("job-a", 0, "checkpoint-20")),  # no rank 3: rank 0's
        # a project: across all its jobs; a tie goes to the later checkpoint
        (best("eval_loss", project="proj"), 0, ("job-b", 0, "checkpoint-7")),
        (best("eval_loss", "max", project="proj"), 0, ("job-a", 0, "checkpoint-10")),
        (best("eval_acc", "max", project="proj"), 0, ("job-a", 0, "checkpoint-20")),  # job-b has no eval_acc
        # nothing to rank
        (best("eval_loss", job="nope"), 0, None),
        (best("eval_loss", project="empty"), 0, None),
    ],
)
async def test_best_by_metric(sweep, ref, rank, expected):
    found = await resolve(sweep, ref, default_project="proj", rank=rank)
    assert (found and (found.job_id, found.source_rank, found.checkpoint)) == expected
    if found is not None:
        assert found.manifest["checkpoint"] == found.checkpoint and found.manifest["rank"] == found.source_rank


@pytest.mark.parametrize(
    "ref, message",
    [
        (
            best("eval_loss", job="job-c"),
            "no committed checkpoint records the metric 'eval_loss'; none records any metric",
        ),
        (
            best("eval_bleu", job="job-a"),
            "no committed checkpoint records the metric 'eval_bleu'; recorded: eval_acc, eval_loss",
        ),
        (
            best("eval_bleu", project="proj"),
            "no committed checkpoint records the metric 'eval_bleu'; recorded: eval_acc, eval_loss",
        ),
    ],
)
async def test_a_metric_no_checkpoint_records_matches_nothing_and_says_which(sweep, ref, message):
    with pytest.raises(Unmatched, match=re.escape(f"{ref.describe()} matches nothing: ") + message):
        await resolve(sweep, ref, default_project="proj", rank=0)


@pytest.mark.parametrize(
    "ref, rank, root",
    [
        (best("eval_loss", job="job-a"), 1, tokenizer("job-a", 1)),  # the source rank's root files
        (CheckpointRef(NAMED, job_id="job-a", checkpoint_name="checkpoint-10"), 0, tokenizer("job-a", 0)),
        (CheckpointRef(LATEST, job_id="job-a"), 5, tokenizer("job-a", 0)),
        (CheckpointRef(LATEST, job_id="job-b"), 0, None),  # job-b saved nothing at the top
    ],
)
async def test_every_resolved_checkpoint_brings_its_jobs_root_files(sweep, ref, rank, root):
    found = await resolve(sweep, ref, default_project="proj", rank=rank)
    got = found.root and {f["path"]: f["sha256"] for f in found.root["files"]}
    assert got == (root and {k: hashlib.sha256(v).hexdigest() for k, v in root.items()})


async def test_restore_best_puts_the_checkpoint_and_its_root_files_under_the_rank(sweep, tmp_path):
    out = tmp_path / "out"
    report = await run(sweep, [best("eval_loss", job="job-a", required=True)], out, rank=1)
    expected = {f"checkpoint-20/{k}": v for k, v in weights("job-a", 1, "checkpoint-20").items()}
    assert tree(out / "rank-1") == {**expected, **tokenizer("job-a", 1)}
    (entry,) = report.restored
    assert (entry["checkpoint"], entry["source_rank"], entry["files"], entry["root_files"]) == (
        "checkpoint-20",
        1,
        2,
        2,
    )
    assert report.files == 4


async def test_two_checkpoints_of_one_job_bring_its_root_files_once(sweep, tmp_path):
    out = tmp_path / "out"
    refs = [CheckpointRef(NAMED, job_id="job-a", checkpoint_name="checkpoint-10"), best("eval_loss", job="job-a")]
    report = await run(sweep, refs, out)
    assert sorted(tree(out / "rank-0")) == [
        "checkpoint-10/model.bin",
        "checkpoint-10/trainer_state.json",
        "checkpoint-20/model.bin",
        "checkpoint-20/trainer_state.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert report.files == 6 and [e["root_files"] for e in report.restored] == [2, 2]


async def test_the_same_root_file_with_the_same_bytes_from_two_jobs_is_fine(sweep, tmp_path):
    await save(sweep, "job-b", 0, ".", {"tokenizer.json": b'{"model": "bpe"}'}, T0)  # as job-a's
    out = tmp_path / "out"
    await run(sweep, [CheckpointRef(LATEST, job_id="job-a"), CheckpointRef(LATEST, job_id="job-b")], out)
    assert tree(out / "rank-0")["tokenizer.json"] == b'{"model": "bpe"}'
    assert {"checkpoint-30", "checkpoint-7"} <= {p.name for p in (out / "rank-0").iterdir()}


async def test_root_files_that_clash_are_a_configuration_error_and_nothing_is_written(sweep, tmp_path):
    await save(sweep, "job-b", 0, ".", {"tokenizer.json": b'{"model": "wordpiece"}'}, T0)
    out = tmp_path / "out"
    refs = [CheckpointRef(LATEST, job_id="job-a"), CheckpointRef(LATEST, job_id="job-b")]
    with pytest.raises(RestoreConflict, match=r"job=job-a \(root files\) and .*job=job-b \(root files\) would both "
                       r"restore .*rank-0/tokenizer.json with different bytes"):  # fmt: skip
        await run(sweep, refs, out)
    assert not out.exists()


async def test_a_required_best_reference_whose_metric_nobody_records_fails(sweep, tmp_path):
    with pytest.raises(RestoreFailed, match=r"required best checkpoint by eval_bleu .*recorded: eval_acc, eval_loss"):
        await run(sweep, [best("eval_bleu", job="job-a", required=True)], tmp_path / "out")


async def test_an_optional_one_is_a_warning_and_the_others_are_restored(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    report = await run(sweep, [best("eval_bleu", job="job-a"), CheckpointRef(LATEST, job_id="job-b")], out)
    assert report.missing == [best("eval_bleu", job="job-a").describe()]
    assert [e["checkpoint"] for e in report.restored] == ["checkpoint-7"]
    logged = capsys.readouterr().out
    assert "matches nothing" in logged and "eval_bleu" in logged and "recorded: eval_acc, eval_loss" in logged
    assert json.loads((out / "ckptd-restore.json").read_text())["missing"] == report.missing


async def test_an_unusable_root_manifest_fails_a_required_reference_naming_its_key(sweep, tmp_path):
    key = layout.manifest_key("proj", "job-a", 0, ".")
    await sweep.put(key, b"{garbage")
    with pytest.raises(BadManifest, match=f"{key}: bad manifest: not JSON"):
        await resolve(sweep, CheckpointRef(LATEST, job_id="job-a"), default_project="proj", rank=0)
    with pytest.raises(RestoreFailed, match=f"required latest checkpoint of job=job-a: unusable manifest {key}"):
        await run(sweep, [CheckpointRef(LATEST, job_id="job-a", required=True)], tmp_path / "out")
    report = await run(sweep, [CheckpointRef(LATEST, job_id="job-a")], tmp_path / "out")
    assert report.restored == [] and len(report.missing) == 1
