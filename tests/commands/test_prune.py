"""`ckptd prune` as users run it — a subprocess — on a two-rank job made by `ckptd run`, against
moto and the JuiceFS gateway; what is left is checked with boto3 listings, and restore still works."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from daemons import PREFIX
from trained import TrainedJob

KIND = "integration"

ACCEPTANCE = ("--keep-best", "2", "--metric", "eval_loss", "--mode", "min", "--keep-last", "1")


def listing(job: TrainedJob, under: str = "") -> dict[str, int]:
    """key (below the job's prefix) -> size, of everything stored for the job."""
    prefix = f"{PREFIX}/training_projects/{job.project}/jobs/{job.job_id}/{under}"
    client, found = job.bucket.client, {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=job.bucket.name, Prefix=prefix):
        found.update({item["Key"][len(prefix) :]: item["Size"] for item in page.get("Contents", [])})
    return found


def checkpoints_stored(job: TrainedJob, rank: int) -> set[str]:
    return {k.split("/")[0] if "/" in k else "." for k in listing(job, f"rank-{rank}/")}


def committed(job: TrainedJob, rank: int) -> set[str]:
    return {k.removesuffix(".json") or "." for k in listing(job, f"manifests/rank-{rank}/")}


def prune(job: TrainedJob, *args: str) -> tuple[int, dict | str, str]:
    out = job.cli("prune", "--job", job.job_id, *args)
    data = json.loads(out.stdout) if "--json" in args and out.stdout.strip() else out.stdout
    return out.returncode, data, out.stderr


def test_keep_best_and_last_plans_then_deletes_and_restore_still_works(trained_job, s3_bucket, tmp_path):
    job = trained_job(s3_bucket)
    before = listing(job)
    code, plan, err = prune(job, *ACCEPTANCE, "--json")
    assert code == 5, err
    assert listing(job) == before  # a plan deletes nothing
    rows = {r["checkpoint"]: r for r in plan["checkpoints"]}
    assert {n: r["action"] for n, r in rows.items()} == {
        ".": "keep",
        "checkpoint-10": "delete",
        "checkpoint-20": "keep",
        "checkpoint-30": "delete",
        "checkpoint-40": "keep",
    }
    assert rows["checkpoint-40"]["reasons"] == ["latest", "keep_last", "keep_best"]
    assert rows["checkpoint-20"]["reasons"] == ["keep_best"]
    assert (rows["checkpoint-10"]["metric"], rows["checkpoint-10"]["step"], rows["checkpoint-10"]["ranks"]) == (
        0.9,
        10,
        [0, 1],
    )
    doomed = {k: s for k, s in before.items() if k.split("/")[1:2] in (["checkpoint-10"], ["checkpoint-30"])}
    assert plan["to_delete"] == 2 and plan["bytes_to_free"] == sum(doomed.values())
    assert plan["dry_run"] is True and plan["rules"]["keep_best"] == 2

    code, done, err = prune(job, *ACCEPTANCE, "--yes", "--json")
    assert code == 0, err
    assert sorted((d["checkpoint"], d["ranks"], d["interrupted"]) for d in done["deleted"]) == [
        ("checkpoint-10", [0, 1], False),
        ("checkpoint-30", [0, 1], False),
    ]
    assert done["bytes_freed"] == sum(doomed.values())
    for rank in (0, 1):
        assert checkpoints_stored(job, rank) == {".", "checkpoint-20", "checkpoint-40"}
        assert committed(job, rank) == {".", "checkpoint-20", "checkpoint-40"}
    assert not listing(job, "pruning/")

    code, again, _ = prune(job, *ACCEPTANCE, "--json")  # nothing more to delete: exit 0
    assert (code, again["to_delete"]) == (0, 0)

    config = tmp_path / "restore.yaml"
    refs = [{"typ": "baseten_latest_checkpoint", "job_id": job.job_id}]
    config.write_text(yaml.safe_dump({"load_checkpoint_config": {"enabled": True, "checkpoints": refs}}))
    out = job.cli("restore", "--config", str(config), "--restore-dir", str(tmp_path / "restored"))
    assert out.returncode == 0, out.stderr
    restored = tmp_path / "restored" / "rank-0"
    got = {str(p.relative_to(restored)) for p in restored.rglob("*") if p.is_file()}
    wanted = {k for k in job.written[0] if k.startswith("checkpoint-40/")}
    assert wanted <= got and not [g for g in got if g.startswith(("checkpoint-10", "checkpoint-30"))]
    for relpath in wanted:
        assert hashlib.sha256((restored / relpath).read_bytes()).hexdigest() == job.written[0][relpath]


def test_bad_input_is_refused_and_deletes_nothing(trained_job, moto_bucket):
    job = trained_job(moto_bucket)
    before = listing(job)
    cases = [
        (["prune", "--job", "nope", "--keep-last", "1", "--yes"], 1, "job 'nope' not found"),
        (["prune", "--job", "trained", "--keep-best", "1", "--metric", "accuracy", "--yes"], 1, "'accuracy'"),
        (["prune", "--all", "--yes"], 2, "--all needs --job"),
        (["prune", "--job", "trained", "--all", "--keep-last", "1", "--yes"], 2, "takes no --keep-* rule"),
        (["prune", "--job", "trained", "--yes"], 2, "no retention rule"),
        (["prune", "--keep-last", "1", "--yes"], 2, "prune needs --job"),
        (["prune", "--job", "trained", "--keep-best", "1", "--yes"], 2, "retention.metric"),
        (["prune", "--job", "trained", "--keep-last", "0", "--yes"], 2, "keep-last"),
    ]
    for args, code, message in cases:
        out = job.cli(*args)
        assert (out.returncode, message in out.stderr) == (code, True), (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert listing(job) == before


def test_a_checkpoint_uncommitted_on_a_rank_is_kept_and_an_interrupted_prune_is_finished(trained_job, s3_bucket):
    job = trained_job(s3_bucket)
    client, bucket = job.bucket.client, job.bucket.name
    manifest = f"{PREFIX}/training_projects/proj/jobs/trained/manifests/rank-1/checkpoint-10.json"
    client.delete_object(Bucket=bucket, Key=manifest)  # rank 1 stored checkpoint-10 but never committed it

    code, text, err = prune(job, "--keep-last", "1")  # the table a person reads
    assert code == 5, err
    assert "would delete 2 checkpoint(s)" in text
    line = next(x for x in text.splitlines() if x.startswith("checkpoint-10 "))
    assert "keep" in line and "uncommitted" in line

    code, done, err = prune(job, "--keep-last", "1", "--yes", "--json")
    assert code == 0, err
    assert sorted(d["checkpoint"] for d in done["deleted"]) == ["checkpoint-20", "checkpoint-30"]
    for rank in (0, 1):
        assert checkpoints_stored(job, rank) == {".", "checkpoint-10", "checkpoint-40"}

    # An interrupted prune of rank 1's checkpoint-10: its record written, the manifest already gone.
    record = f"{PREFIX}/training_projects/proj/jobs/trained/pruning/rank-1/checkpoint-10.json"
    client.put_object(Bucket=bucket, Key=record, Body=json.dumps({"checkpoint": "checkpoint-10", "rank": 1}).encode())
    code, plan, err = prune(job, "--keep-last", "1", "--json")
    rank1 = sum(listing(job, "rank-1/checkpoint-10/").values())  # stored before the record
    assert code == 5 and plan["interrupted"] == [
        {
            "checkpoint": "checkpoint-10",
            "rank": 1,
            "committed_at": None,
            "action": "finish",
            "bytes": rank1,
        }
    ]
    assert plan["bytes_to_free"] == rank1  # nothing else to delete: counted as --yes frees it
    code, done, err = prune(job, "--keep-last", "1", "--yes", "--json")
    assert code == 0, err
    assert [(d["checkpoint"], d["ranks"], d["interrupted"]) for d in done["deleted"]] == [("checkpoint-10", [1], True)]
    assert done["bytes_freed"] == plan["bytes_to_free"]
    assert checkpoints_stored(job, 1) == {".", "checkpoint-40"}
    assert checkpoints_stored(job, 0) == {".", "checkpoint-10", "checkpoint-40"}  # committed there, and latest-1
    assert not listing(job, "pruning/")


def test_all_deletes_the_whole_job_only_with_yes(trained_job, s3_bucket, tmp_path: Path):
    job = trained_job(s3_bucket)
    other = trained_job(s3_bucket, "trained-2", ranks=1, steps=(10,), losses=(0.5,))
    before = listing(job)
    code, plan, err = prune(job, "--all", "--json")
    assert code == 5, err
    assert (plan["files"], plan["bytes"]) == (len(before), sum(before.values()))
    assert listing(job) == before
    code, done, err = prune(job, "--all", "--yes", "--json")
    assert code == 0, err
    assert (done["deleted_files"], done["bytes_freed"]) == (len(before), sum(before.values()))
    assert listing(job) == {}
    assert listing(other)  # a job whose id starts alike is untouched
    out = job.cli("prune", "--job", job.job_id, "--all", "--yes")
    assert out.returncode == 1 and "not found" in out.stderr


@pytest.mark.parametrize("flag", ["--keep-every-steps"])
def test_keep_every_steps(trained_job, moto_bucket, flag):
    job = trained_job(moto_bucket, ranks=1)
    code, done, err = prune(job, flag, "20", "--yes", "--json")
    assert code == 0, err
    assert sorted(d["checkpoint"] for d in done["deleted"]) == ["checkpoint-10", "checkpoint-30"]
    assert checkpoints_stored(job, 0) == {".", "checkpoint-20", "checkpoint-40"}
