"""docs/cli.md stays true: every `--json` field it documents is printed, and every field printed is
documented, for ls (four levels), inspect, urls, download, prune (plan and --yes) and restore, run
against one job made through `ckptd run` (tests/commands/trained.py) on an S3 server."""

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
FIELD = re.compile(r"^\|\s*`([^`]+)`")


def documented(heading: str) -> set[str]:
    """The field paths in column 1 of the table under `### {heading}`."""
    lines = DOC.read_text().splitlines()
    at = lines.index(f"### {heading}")
    fields, seen_table = set(), False
    for line in lines[at + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            seen_table = True
            if m := FIELD.match(line):
                fields.add(m.group(1))
        elif seen_table and not line.strip():
            break
    assert fields, f"no field table under {heading!r} in {DOC}"
    return fields


def printed(value: Any, prefix: str = "", opaque: frozenset[str] = frozenset()) -> set[str]:
    """The field paths of a JSON value; lists must be non-empty (else the doc is checked against
    nothing) and every element counts; `opaque` paths are maps keyed by data (metrics, dtypes)."""
    if isinstance(value, dict) and prefix not in opaque:
        paths = set()
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else k
            paths |= {path} | printed(v, path, opaque)
        return paths
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        element = [printed(e, f"{prefix}[]", opaque) for e in value]
        return set().union(*element)
    return set()


def leaves(paths: set[str]) -> set[str]:
    """Drop the paths that only lead to documented children (`job` when `job.id` is there)."""
    return {p for p in paths if not any(q.startswith((p + ".", p + "[].")) for q in paths)}


def check(out: dict, heading: str, opaque: frozenset[str] = frozenset(), extra: set[str] = frozenset()) -> None:
    docs = documented(heading) | set(extra)
    got = leaves(printed(out, opaque=opaque))
    assert not docs - got, f"{heading}: documented but not printed: {sorted(docs - got)}\n{json.dumps(out)[:2000]}"
    assert not got - docs, f"{heading}: printed but not documented: {sorted(got - docs)}"


def run_json(job, *args: str, code: int = 0, cwd: Path | None = None) -> dict:
    r = job.cli(*args, "--json", cwd=cwd)  # with --project: job.cli always names it
    assert r.returncode == code, f"ckptd {' '.join(args)} exited {r.returncode}:\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.mark.parametrize("s3_bucket", ["moto"], indirect=True)
def test_every_documented_json_field_is_printed_and_every_printed_one_documented(
    s3_bucket, trained_job, tmp_path: Path
) -> None:
    job = trained_job(s3_bucket)
    on_job = ("--project", job.project, "--job", job.job_id)

    every = [sys.executable, "-m", "daemon", "ls", *job.storage_args, "--json"]  # no --project: the projects
    r = subprocess.run(every, env=job.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    check(json.loads(r.stdout), "`ckptd ls --json` (projects)")
    check(run_json(job, "ls", "--project", job.project), "`ckptd ls --json` (jobs of a project)")
    check(
        run_json(job, "ls", *on_job),
        "`ckptd ls --json` (checkpoints of a job)",
        opaque=frozenset({"checkpoints[].metrics"}),
    )
    check(run_json(job, "ls", *on_job, "--checkpoint", "latest"), "`ckptd ls --json` (files of a checkpoint)")

    dtypes = frozenset({"totals.by_dtype", "files[].totals.by_dtype", "files[].metadata"})
    check(run_json(job, "inspect", *on_job, "checkpoint-10"), "`ckptd inspect --json`", opaque=dtypes)
    check(run_json(job, "inspect", *on_job, "rank-0/checkpoint-10/model.safetensors"), "`ckptd inspect --json`", dtypes)

    check(run_json(job, "urls", *on_job, "--expires", "1h", cwd=tmp_path), "`ckptd urls --json`")

    got = run_json(job, "download", *on_job, "--path", "rank-*/checkpoint-10/", "--to", str(tmp_path / "dl"))
    check(got, "`ckptd download --json`")
    assert got["files"] > 0 and got["downloaded_files"] == got["files"]

    rules = ("--keep-last", "1", "--keep-best", "2", "--metric", "eval_loss", "--mode", "min")
    plan_fields = documented("`ckptd prune --json` (the plan)")
    plan = run_json(job, "prune", *on_job, *rules, code=5)
    # eval_loss 0.9 0.5 0.7 0.6 at steps 10..40: the last (40) and the best two (20, 40) stay
    assert plan["dry_run"] is True and plan["to_delete"] == 2, plan
    check(plan, "`ckptd prune --json` (the plan)")
    done = run_json(job, "prune", *on_job, *rules, "--yes")
    assert done["dry_run"] is False and {d["checkpoint"] for d in done["deleted"]} == {"checkpoint-10", "checkpoint-30"}
    check(done, "`ckptd prune --json --yes` (what was deleted)", extra=plan_fields)

    report = run_json(
        job,
        "restore",
        "--project",
        job.project,
        "--load",
        f"job={job.job_id},metric=eval_loss,mode=min",
        "--restore-dir",
        str(tmp_path / "restored"),
    )
    assert report["restored"] and report["restored"][0]["checkpoint"] == "checkpoint-20", report
    check(report, "`ckptd restore --json`")
