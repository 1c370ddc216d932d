"""`ckptd ls` on a job made through `ckptd run` (two ranks, checkpoints 10..40 with eval_loss), as a
user runs it: a subprocess against moto and the JuiceFS gateway, `--json` parsed and checked."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime

import pytest
from daemons import PREFIX, base_env

from daemon.commands import show
from daemon.commands.ls import level_of
from daemon.config import load

KIND = "integration"

NAMES_LATEST_FIRST = ["checkpoint-40", "checkpoint-30", "checkpoint-20", "checkpoint-10", "."]


@pytest.mark.unit
@pytest.mark.parametrize(
    "checkpoint, flags, env, level",
    [
        ("latest", {"job_id": "j", "project": "p"}, {}, "files"),
        ("checkpoint-10", {}, {}, "files"),
        (None, {"job_id": "j"}, {}, "checkpoints"),
        (None, {}, {"BT_TRAINING_JOB_ID": "j"}, "checkpoints"),  # inside a job's container: that job
        (None, {"job_id": "j", "project": "p"}, {}, "checkpoints"),
        (None, {"project": "p"}, {}, "jobs"),
        (None, {}, {"CKPTD_PROJECT": "p"}, "jobs"),
        (None, {"storage": "file:///tmp/x"}, {}, "projects"),
        (None, {}, {}, "projects"),
    ],
)
def test_level_of(checkpoint: str | None, flags: dict, env: dict, level: str) -> None:
    config = load(flags, env)
    assert level_of(config, argparse.Namespace(checkpoint=checkpoint)) == level


ROWS = [{"n": "a", "v": 3}, {"n": "b", "v": None}, {"n": "c", "v": 1}, {"n": "d", "v": 1}, {"n": "e", "v": "x"}]


@pytest.mark.unit
@pytest.mark.parametrize(
    "field, reverse, order",
    [
        ("v", False, "cdaeb"),  # ascending, ties (c, d) kept, text after numbers, missing last
        ("v", True, "eacdb"),  # descending, ties still kept in order, missing still last
        ("n", True, "edcba"),
        (None, False, "abcde"),  # the default order
        (None, True, "edcba"),
    ],
)
def test_sort_rows(field: str | None, reverse: bool, order: str) -> None:
    rows = show.sort_rows(ROWS, field, ["n", "v"], reverse=reverse)
    assert "".join(r["n"] for r in rows) == order


@pytest.mark.unit
def test_sort_rows_refuses_an_unknown_field_naming_the_accepted_ones() -> None:
    with pytest.raises(show.UnknownField, match="--sort 'w': unknown field; accepted: n, v"):
        show.sort_rows(ROWS, "w", ["n", "v"])


def ls(job, *args: str) -> dict:
    done = job.cli("ls", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def local_sizes(job, tmp_path, rank: int) -> dict[str, int]:
    ckpt = tmp_path / "jobs" / f"{job.job_id}-rank-{rank}" / "ckpt"
    return {rel: (ckpt / rel).stat().st_size for rel in job.written[rank]}


def put(job, rank: int, relpath: str, body: bytes, project: str | None = None) -> None:
    key = f"{PREFIX}/training_projects/{project or job.project}/jobs/{job.job_id}/rank-{rank}/{relpath}"
    job.bucket.client.put_object(Bucket=job.bucket.name, Key=key, Body=body)


def test_every_level_lists_what_ckptd_run_stored(s3_bucket, trained_job, tmp_path) -> None:
    job = trained_job(s3_bucket)
    sizes = {rank: local_sizes(job, tmp_path, rank) for rank in (0, 1)}
    everything = sum(sum(s.values()) for s in sizes.values())

    projects = subprocess.run(
        [sys.executable, "-m", "daemon", "ls", *job.storage_args, "--json"],
        env=job.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(projects.stdout) == {"projects": [{"project": "proj", "jobs": 1}]}

    jobs = ls(job)
    assert jobs["project"] == "proj"
    (row,) = jobs["jobs"]
    assert datetime.fromisoformat(row.pop("created_at")).tzinfo is not None
    assert row == {
        "job_id": "trained",
        "status": "COMPLETED",
        "sync_status": "COMPLETED",
        "nodes": 2,
        "checkpoints": 5,  # four checkpoint-N and the tokenizer files at the top ('.')
        "files": sum(len(w) for w in job.written.values()),
        "size": everything,
    }

    listed = ls(job, "--job", "trained")
    assert (listed["project"], listed["job_id"]) == ("proj", "trained")
    rows = listed["checkpoints"]
    assert [r["name"] for r in rows] == NAMES_LATEST_FIRST
    for r in rows[:4]:
        step = int(r["name"].split("-")[1])
        files = [rel for rel in sizes[0] if rel.startswith(f"{r['name']}/")]
        assert r["step"] == step
        assert r["files"] == 2 * len(files) == 6
        assert r["size"] == sum(sizes[rank][rel] for rank in (0, 1) for rel in files)
        assert r["metrics"]["eval_loss"] == job.losses[job.steps.index(step)]
        assert (r["ranks"], r["committed"], r["uncommitted_ranks"]) == ([0, 1], True, [])
        assert datetime.fromisoformat(r["committed_at"]).tzinfo is not None
    assert sum(r["size"] for r in rows) == everything

    files = ls(job, "--job", "trained", "--checkpoint", "latest")
    assert files["checkpoint"] == "checkpoint-40"
    expected = [
        {"rank": rank, "path": rel, "size": sizes[rank][rel], "sha256": sha, "committed": True, "stored": True}
        for rank in (0, 1)
        for rel, sha in sorted(job.written[rank].items())
        if rel.startswith("checkpoint-40/")
    ]
    assert files["files"] == expected
    top = ls(job, "--job", "trained", "--checkpoint", ".")["files"]
    assert {(f["rank"], f["path"], f["sha256"]) for f in top} == {
        (rank, rel, sha) for rank in (0, 1) for rel, sha in job.written[rank].items() if "/" not in rel
    }


def test_sort_reverse_and_limit_work_on_columns_and_metrics(moto_bucket, trained_job) -> None:
    job = trained_job(moto_bucket)

    def names(*args: str) -> list[str]:
        return [r["name"] for r in ls(job, "--job", "trained", *args)["checkpoints"]]

    assert names("--sort", "eval_loss", "--limit", "2") == ["checkpoint-20", "checkpoint-40"]  # 0.5, 0.6
    assert names("--sort", "eval_loss", "--reverse", "--limit", "1") == ["checkpoint-10"]  # 0.9
    assert names("--sort", "step") == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40", "."]
    assert names("--reverse") == list(reversed(NAMES_LATEST_FIRST))
    assert names("--limit", "1") == ["checkpoint-40"]

    bad = job.cli("ls", "--job", "trained", "--sort", "loudness")
    assert bad.returncode == 2
    assert "--sort 'loudness': unknown field" in bad.stderr
    assert "eval_loss" in bad.stderr and "size" in bad.stderr and "committed_at" in bad.stderr
    assert bad.stdout == ""


def test_uncommitted_folders_and_damaged_manifests_are_shown_not_hidden(s3_bucket, trained_job) -> None:
    job = trained_job(s3_bucket)
    put(job, 0, "checkpoint-50/model.safetensors", b"x" * 1000)  # a save cut short: no manifest
    put(job, 0, "checkpoint-50/optimizer.pt", b"y" * 24)
    put(job, 2, "checkpoint-40/model.safetensors", b"z" * 7)  # a third rank that never committed it
    manifest = f"{PREFIX}/training_projects/proj/jobs/trained/manifests/rank-0/checkpoint-30.json"
    job.bucket.client.put_object(Bucket=job.bucket.name, Key=manifest, Body=b"{not json")

    rows = {r["name"]: r for r in ls(job, "--job", "trained")["checkpoints"]}
    assert [*rows][:2] == ["checkpoint-50", "checkpoint-40"]  # still latest first
    assert rows["checkpoint-50"] | {"metrics": None} == {
        "name": "checkpoint-50",
        "step": 50,
        "size": 1024,
        "files": 2,
        "ranks": [0],
        "committed_at": None,
        "committed": False,
        "uncommitted_ranks": [0],
        "metrics": None,
        # `ckptd run` on two nodes makes a multi-node job: no part and no global manifest of it yet
        "global_commit": "waiting",
        "part_ranks": [],
        "missing_ranks": [0, 1],
    }
    assert (rows["checkpoint-40"]["committed"], rows["checkpoint-40"]["uncommitted_ranks"]) == (True, [2])
    assert rows["checkpoint-40"]["ranks"] == [0, 1, 2]
    # rank 0's manifest of checkpoint-30 is damaged: only rank 1 committed it, rank 0's files still show
    assert (rows["checkpoint-30"]["ranks"], rows["checkpoint-30"]["uncommitted_ranks"]) == ([0, 1], [0])

    files = ls(job, "--job", "trained", "--checkpoint", "checkpoint-50")["files"]
    assert files == [
        {"rank": 0, "path": "checkpoint-50/model.safetensors", "size": 1000, "sha256": None}
        | {"committed": False, "stored": True},
        {"rank": 0, "path": "checkpoint-50/optimizer.pt", "size": 24, "sha256": None}
        | {"committed": False, "stored": True},
    ]
    table = job.cli("ls", "--job", "trained")
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if x.startswith("checkpoint-50 "))
    assert "NO" in line.split()
    assert "partial (not rank 2)" in next(x for x in table.stdout.splitlines() if x.startswith("checkpoint-40 "))


def test_unknown_project_job_and_checkpoint_exit_1_with_a_clear_message(moto_bucket, trained_job) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    cases = [
        (["--project", "nope"], "no project 'nope'"),
        (["--job", "nope"], "no job 'nope' in project 'proj'"),
        (["--job", "trained", "--checkpoint", "checkpoint-99"], "no checkpoint 'checkpoint-99' in job 'trained'"),
    ]
    for args, message in cases:
        done = job.cli("ls", *args)
        assert done.returncode == 1, (args, done.stderr)
        assert message in done.stderr
        assert done.stdout == ""
    anywhere = subprocess.run(
        [sys.executable, "-m", "daemon", "ls", *job.storage_args, "--job", "nope"],
        env=job.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert anywhere.returncode == 1
    assert "no job 'nope' in any project" in anywhere.stderr


def test_a_job_found_without_its_project_and_one_in_two_projects(moto_bucket, trained_job) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))

    def ls_any(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "daemon", "ls", *job.storage_args, *args]
        return subprocess.run(argv, env=job.env, capture_output=True, text=True, timeout=60)

    found = ls_any("--job", "trained", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["project"] == "proj"
    put(job, 0, "checkpoint-1/x.bin", b"x", project="other")
    twice = ls_any("--job", "trained")
    assert twice.returncode == 2
    assert "exists in several projects (other, proj)" in twice.stderr


def test_json_reaches_a_slow_reader_whole_through_an_unbuffered_non_blocking_pipe(tmp_path) -> None:
    # PYTHONUNBUFFERED=1 makes sys.stdout drop what a short write leaves over; ckptd writes it all.
    child = (
        "import os, sys\n"
        "from daemon.commands import show\n"
        "os.set_blocking(1, False)\n"
        "show.print_json({'rows': [{'name': 'x' * 100, 'n': i} for i in range(30000)]})\n"
        "show.print_table([{'a': 'y' * 50}] * 30000, [('a', 'a')])\n"
    )
    env = {**base_env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    document, table = out.split(b"\n}\n", 1)
    assert len(json.loads(document + b"}")["rows"]) == 30000
    assert table.splitlines() == [b"a"] + [b"y" * 50] * 30000
