"""docs/cli.md stays true: every `--json` field it documents is printed, and every field printed is
documented, for ls (four levels), inspect (a file and a checkpoint), urls, download, prune (plan,
--yes, --all) and restore, run against one job made through `ckptd run` (tests/commands/trained.py)
on an S3 server.

The job takes most of the time, and `trained_job` and `s3_bucket` are function-scoped: one test
makes it once and checks every command on it, in an order where nothing deletes what a later
command reads (prune --yes after download, prune --all last)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

KIND = "integration"
DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
FIELD = re.compile(r"^\|\s*`([^`]+)`")  # the first backtick span of a table row's first column


def documented(heading: str) -> set[str]:
    """The field paths in column 1 of the table under the heading `### {heading}`."""
    lines = DOC.read_text().splitlines()
    assert f"### {heading}" in lines, f"no heading {heading!r} in {DOC}"
    fields: set[str] = set()
    in_table = False
    for line in lines[lines.index(f"### {heading}") + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            in_table = True
            if m := FIELD.match(line):
                fields.add(m.group(1))
        elif in_table and not line.strip():
            break
    assert fields, f"no field table under {heading!r} in {DOC}"
    return fields


def printed(value: Any, prefix: str = "", opaque: frozenset[str] = frozenset()) -> set[str]:
    """Every field path of a JSON value (`a.b`, `a[].b`), every element of a list counted.

    An empty list of objects is a leaf: its documented fields then count as not printed, so the
    check cannot pass vacuously. `opaque` paths are maps keyed by data (metrics, dtypes): leaves."""
    if isinstance(value, dict) and prefix not in opaque:
        paths: set[str] = set()
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else k
            paths |= {path} | printed(v, path, opaque)
        return paths
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value) and prefix not in opaque:
        return set().union(*(printed(e, f"{prefix}[]", opaque) for e in value))
    return set()


def leaves(paths: set[str]) -> set[str]:
    """The paths that lead to no other one (`job.id`, not `job`)."""
    return {p for p in paths if not any(q.startswith((f"{p}.", f"{p}[].")) for q in paths)}


def check(out: dict, heading: str, opaque: frozenset[str] = frozenset(), extra: frozenset[str] = frozenset()) -> None:
    docs = documented(heading) | extra
    got = leaves(printed(out, opaque=opaque))
    shown = json.dumps(out)[:3000]
    assert not docs - got, f"{heading}: documented but not printed: {sorted(docs - got)}\n{shown}"
    assert not got - docs, f"{heading}: printed but not documented: {sorted(got - docs)}\n{shown}"


def run_json(job, *args: str, code: int = 0, cwd: Path | None = None) -> dict:
    """`ckptd ARGS --json` on the job's store and project (TrainedJob.cli adds both)."""
    r = job.cli(*args, "--json", cwd=cwd)
    assert r.returncode == code, f"ckptd {' '.join(args)} exited {r.returncode}, not {code}:\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.mark.parametrize("s3_bucket", ["moto"], indirect=True)
def test_every_documented_json_field_is_printed_and_every_printed_one_documented(
    s3_bucket, trained_job, tmp_path: Path
) -> None:
    job = trained_job(s3_bucket)  # ranks 0 and 1, checkpoint-10..40, eval_loss 0.9 0.5 0.7 0.6
    on_job = ("--job", job.job_id)

    # ls, at its four levels; the projects level is asked without --project (job.cli always names it)
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "ls", *job.storage_args, "--json"],
        env=job.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    check(json.loads(r.stdout), "`ckptd ls --json` (projects)")
    check(run_json(job, "ls"), "`ckptd ls --json` (jobs of a project)")
    listed = run_json(job, "ls", *on_job)
    assert {c["name"] for c in listed["checkpoints"]} >= {f"checkpoint-{s}" for s in job.steps}, listed
    check(listed, "`ckptd ls --json` (checkpoints of a job)", opaque=frozenset({"checkpoints[].metrics"}))
    check(run_json(job, "ls", *on_job, "--checkpoint", "latest"), "`ckptd ls --json` (files of a checkpoint)")

    # inspect: a checkpoint on every rank, and one file
    dtypes = frozenset({"totals.by_dtype", "files[].totals.by_dtype", "files[].metadata"})
    whole = run_json(job, "inspect", *on_job, "checkpoint-10")
    assert {f["rank"] for f in whole["files"]} == {0, 1}, whole
    check(whole, "`ckptd inspect --json`", opaque=dtypes)
    one = run_json(job, "inspect", *on_job, "rank-0/checkpoint-10/model.safetensors")
    check(one, "`ckptd inspect --json`", opaque=dtypes)

    # urls (written to the current folder too)
    check(run_json(job, "urls", *on_job, "--expires", "1h", cwd=tmp_path), "`ckptd urls --json`")

    # download
    got = run_json(job, "download", *on_job, "--path", "rank-*/checkpoint-10/", "--to", str(tmp_path / "dl"))
    assert got["files"] > 0 and got["downloaded_files"] == got["files"], got
    check(got, "`ckptd download --json`")

    # restore, before prune deletes anything
    report = run_json(
        job,
        "restore",
        "--load",
        f"job={job.job_id},metric=eval_loss,mode=min",
        "--restore-dir",
        str(tmp_path / "restored"),
    )
    assert [r["checkpoint"] for r in report["restored"]] == ["checkpoint-20"], report
    check(report, "`ckptd restore --json`")

    # prune: the plan (exit 5), then --yes; `interrupted` lists earlier prunes (none here): a leaf
    rules = ("--keep-last", "1", "--keep-best", "2", "--metric", "eval_loss", "--mode", "min")
    interrupted = frozenset({"interrupted"})
    plan = run_json(job, "prune", *on_job, *rules, code=5)
    # the last (40) and the best two (20 at 0.5, 40 at 0.6) stay: 10 and 30 go
    assert plan["dry_run"] is True and plan["to_delete"] == 2, plan
    check(plan, "`ckptd prune --json` (the plan)", opaque=interrupted)
    done = run_json(job, "prune", *on_job, *rules, "--yes")
    assert done["dry_run"] is False, done
    assert {d["checkpoint"] for d in done["deleted"]} == {"checkpoint-10", "checkpoint-30"}, done
    plan_fields = frozenset(documented("`ckptd prune --json` (the plan)"))
    check(done, "`ckptd prune --json --yes` (what was deleted)", opaque=interrupted, extra=plan_fields)

    # prune --all: the plan (exit 5), then the whole job goes
    whole_job = run_json(job, "prune", *on_job, "--all", code=5)
    assert whole_job["all"] is True and whole_job["files"] > 0, whole_job
    check(whole_job, "`ckptd prune --all --json` (a whole job)")
    gone = run_json(job, "prune", *on_job, "--all", "--yes")
    all_fields = frozenset(documented("`ckptd prune --all --json` (a whole job)"))
    check(gone, "`ckptd prune --all --json --yes`", extra=all_fields)
    assert gone["deleted_files"] == whole_job["files"], gone
