"""`ckptd urls` (SPEC §7): the reference's JSON for a job made through `ckptd run`, whose URLs a
plain HTTP client (urllib) downloads the right bytes from, against moto and the JuiceFS gateway;
the local backend's file paths; expiry bounds; unknown jobs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from daemons import base_env

from daemon.catalog import jobmeta
from daemon.storage.local import LocalStorage

KIND = "integration"

JOB_FIELDS = {
    "id",
    "created_at",
    "current_status",
    "error_message",
    "instance_type",
    "updated_at",
    "training_project_id",
    "training_project",
}
ARTIFACT_FIELDS = {"url", "relative_file_name", "node_rank", "size_bytes", "last_modified"}


def test_reference_json_and_urls_download_the_right_bytes(s3_bucket, trained_job, tmp_path: Path) -> None:
    job = trained_job(s3_bucket, steps=(10, 20), losses=(0.5, 0.4))
    r = job.cli("urls", "--job", job.job_id, "--expires", "1h", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert json.loads((tmp_path / "ckptd-urls-trained.json").read_text()) == out  # written, and printed
    assert set(out["job"]) >= JOB_FIELDS and {"timestamp", "job", "checkpoint_artifacts"} <= set(out)
    assert out["job"]["id"] == "trained" and out["job"]["current_status"] == "TRAINING_JOB_COMPLETED"
    assert out["job"]["training_project"] == {"id": "proj", "name": "proj"}
    assert out["job"]["training_project_id"] == "proj" and out["job"]["instance_type"] is None
    assert out["job"]["error_message"] is None
    assert datetime.fromisoformat(out["job"]["created_at"]) <= datetime.fromisoformat(out["job"]["updated_at"])
    stamp = datetime.fromisoformat(out["timestamp"])
    assert abs(datetime.fromisoformat(out["expires_at"]) - stamp - timedelta(hours=1)) < timedelta(seconds=1)
    assert out["presigned"] is True
    found = {}
    for a in out["checkpoint_artifacts"]:
        assert set(a) == ARTIFACT_FIELDS
        with urllib.request.urlopen(a["url"], timeout=30) as resp:  # a plain HTTP client, no credentials
            data = resp.read()
        assert len(data) == a["size_bytes"]
        datetime.fromisoformat(a["last_modified"])
        found[(a["node_rank"], a["relative_file_name"])] = hashlib.sha256(data).hexdigest()
    assert found == {(r, p): d for r in (0, 1) for p, d in job.written[r].items()}
    assert ("checkpoint-10/model.safetensors" in {p for _, p in found}) and (0, "tokenizer_config.json") in found
    query = parse_qs(urlsplit(out["checkpoint_artifacts"][0]["url"]).query)
    assert query["X-Amz-Expires"] == ["3600"]  # SigV4: S3 refuses more than 7 days


def test_most_recent_job_when_none_is_named_and_output_file(moto_bucket, trained_job, tmp_path: Path) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    r = job.cli("urls", "--output", str(tmp_path / "u.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "u.json").read_text())["job"]["id"] == "trained"
    assert "URLs of job trained written to" in r.stderr

    async def newer() -> None:
        async with moto_bucket.storage("ckptd") as store:
            later = datetime.now(UTC) + timedelta(hours=1)
            await jobmeta.ensure_job(store, "proj", "newer", 1, created_at=later)
            await jobmeta.write_rank_status(store, "proj", "newer", 0, status=jobmeta.FAILED, exit_code=3)

    asyncio.run(newer())
    r = job.cli("urls", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["job"]["id"] == "newer" and out["checkpoint_artifacts"] == []
    assert out["job"]["current_status"] == "TRAINING_JOB_FAILED"
    assert out["job"]["error_message"] == "rank 0 failed (exit code 3)"
    assert (tmp_path / "ckptd-urls-newer.json").is_file()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--job", "trained", "--expires", "8d"], 2, "at most 7 days"),
        (["--job", "trained", "--expires", "604801"], 2, "between 1s and 7d"),
        (["--job", "trained", "--expires", "soon"], 2, "--expires"),
        (["--job", "nope"], 1, "no job 'nope'"),
        (["--project", "elsewhere", "--job", "trained"], 1, "no job 'trained' in project 'elsewhere'"),
        (["--project", "nothing-here"], 1, "project 'nothing-here' has no jobs"),
    ],
)
def test_refused_and_nothing_written(moto_bucket, trained_job, tmp_path: Path, args, code, message) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = job.cli("urls", *args, cwd=cwd)
    assert (r.returncode, r.stdout) == (code, ""), r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert list(cwd.iterdir()) == []


def test_local_backend_gives_paths_and_says_so(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    files = {(0, "checkpoint-10/model.bin"): b"weights", (1, "tok en/ü.json"): b"{}"}

    async def make() -> None:
        async with LocalStorage(store_dir) as store:
            await jobmeta.ensure_job(store, "proj", "run-1", 2)
            for (rank, path), data in files.items():
                await store.put(f"training_projects/proj/jobs/run-1/rank-{rank}/{path}", data)

    asyncio.run(make())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "urls",
            "--storage",
            f"file://{store_dir}",
            "--project",
            "proj",
            "--job",
            "run-1",
        ],
        env=base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "has no presigned URLs" in r.stderr
    out = json.loads(r.stdout)
    assert out["presigned"] is False and out["expires_at"] is None
    assert out["job"]["current_status"] == "TRAINING_JOB_RUNNING"  # no rank has reported yet
    got = {}
    for a in out["checkpoint_artifacts"]:
        assert set(a) == ARTIFACT_FIELDS | {"path"} and a["url"].startswith("file://")
        with urllib.request.urlopen(a["url"]) as resp:
            assert resp.read() == Path(a["path"]).read_bytes()
        got[(a["node_rank"], a["relative_file_name"])] = Path(a["path"]).read_bytes()
    assert got == files
    assert json.loads((tmp_path / "ckptd-urls-run-1.json").read_text()) == out
