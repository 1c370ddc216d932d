"""`ckptd download` (SPEC §7) on a job made through `ckptd run` (two ranks, checkpoints 10..40),
against moto and the JuiceFS gateway: the files a pattern selects, byte for byte, in
DIR/{job_id}/rank-N/...; `latest`; the reference's serving config verbatim; bad input refused."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemons import PREFIX, wait_for
from faults import FaultProxy, Rule

from daemon.restore.fetch import TMP_PREFIX

KIND = "integration"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def got(folder: Path) -> dict[str, str]:
    """relpath below `folder` -> sha256 of every file there."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def expected(job, ranks, checkpoint: str) -> dict[str, str]:
    return {
        f"{job.job_id}/rank-{r}/{path}": digest
        for r in ranks
        for path, digest in job.written[r].items()
        if path.startswith(checkpoint + "/")
    }


def test_folder_of_every_rank_byte_for_byte_then_kept(s3_bucket, trained_job, tmp_path: Path) -> None:
    job = trained_job(s3_bucket)
    out = tmp_path / "out"
    r = job.cli("download", "--job", job.job_id, "--path", "rank-*/checkpoint-10/", "--to", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert got(out) == expected(job, (0, 1), "checkpoint-10")
    assert len(got(out)) == 6  # model, optimizer, trainer_state of both ranks
    summary = json.loads(r.stdout)
    assert summary["files"] == summary["downloaded_files"] == 6 and summary["kept_files"] == 0
    assert summary["folder"] == str(out)
    assert summary["bytes"] == sum((out / p).stat().st_size for p in got(out))
    assert summary["references"] == [
        {
            "job_id": "trained",
            "project": "proj",
            "paths": ["rank-*/checkpoint-10/"],
            "files": 6,
            "bytes": summary["bytes"],
            "unverified": [],
        }
    ]
    again = job.cli("download", "--job", job.job_id, "--path", "rank-*/checkpoint-10/", "--to", str(out), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["kept_files"] == 6


def test_latest_and_the_serving_config_verbatim(moto_bucket, trained_job, tmp_path: Path) -> None:
    job = trained_job(moto_bucket)
    out = tmp_path / "latest"
    r = job.cli("download", "--job", job.job_id, "--path", "rank-0/latest/", "--to", str(out))
    assert r.returncode == 0, r.stderr
    assert got(out) == expected(job, (0,), "checkpoint-40")
    assert "3 files" in r.stdout and "3 downloaded" in r.stdout

    serving = tmp_path / "serving"
    config = tmp_path / "config.yaml"  # the reference's block, as its docs print it
    config.write_text(
        "training_checkpoints:\n"
        f"  download_folder: {serving}\n"
        "  artifact_references:\n"
        f"    - training_job_id: {job.job_id}\n"
        "      paths:\n"
        "        - rank-*/checkpoint-10/ # Pull in all the files for checkpoint-10 across all nodes\n"
    )
    r = job.cli("download", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert got(serving) == expected(job, (0, 1), "checkpoint-10")
    # the reference's documented place for a file
    assert (serving / job.job_id / "rank-1" / "checkpoint-10" / "model.safetensors").is_file()


def test_several_patterns_and_root_files(moto_bucket, trained_job, tmp_path: Path) -> None:
    job = trained_job(moto_bucket, steps=(10, 20), losses=(0.5, 0.4))
    out = tmp_path / "out"
    paths = ["rank-1/tokenizer*.json", "rank-0/checkpoint-2?/model.safetensors", "rank-*/*trainer_state.json"]
    r = job.cli("download", "--job", job.job_id, "--path", *paths, "--to", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(got(out)) == [
        "trained/rank-0/checkpoint-10/trainer_state.json",
        "trained/rank-0/checkpoint-20/model.safetensors",
        "trained/rank-0/checkpoint-20/trainer_state.json",
        "trained/rank-1/checkpoint-10/trainer_state.json",
        "trained/rank-1/checkpoint-20/trainer_state.json",
        "trained/rank-1/tokenizer.json",
        "trained/rank-1/tokenizer_config.json",
    ]
    assert got(out)["trained/rank-1/tokenizer_config.json"] == job.written[1]["tokenizer_config.json"]


def test_files_without_a_manifest_are_fetched_size_checked_with_a_warning(moto_bucket, trained_job, tmp_path) -> None:
    job = trained_job(moto_bucket, steps=(10,), losses=(0.5,))
    # A checkpoint whose save was interrupted: stored, never committed.
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key=job.key(0, "checkpoint-50/partial.bin"), Body=b"half")
    out = tmp_path / "out"
    r = job.cli("download", "--job", job.job_id, "--path", "rank-0/checkpoint-50/", "--to", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert (out / "trained/rank-0/checkpoint-50/partial.bin").read_bytes() == b"half"
    assert json.loads(r.stdout)["references"][0]["unverified"] == ["rank-0/checkpoint-50"]
    assert "uncommitted checkpoints" in r.stderr and "trained:rank-0/checkpoint-50" in r.stderr


def test_a_file_that_differs_from_its_manifest_fails_and_does_not_land(moto_bucket, trained_job, tmp_path) -> None:
    job = trained_job(moto_bucket, steps=(10,), losses=(0.5,))
    path = job.key(1, "checkpoint-10/optimizer.pt")
    body = moto_bucket.client.get_object(Bucket=moto_bucket.name, Key=path)["Body"].read()
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key=path, Body=bytes(b ^ 1 for b in body))
    out = tmp_path / "out"
    r = job.cli("download", "--job", job.job_id, "--path", "rank-1/checkpoint-10/optimizer.pt", "--to", str(out))
    assert r.returncode == 1
    assert "does not match after 3 downloads" in r.stderr and "optimizer.pt" in r.stderr
    assert not (out / "trained/rank-1/checkpoint-10/optimizer.pt").exists()


def test_a_checkpoint_whose_manifest_cannot_be_read_is_not_fetched_unverified(moto_bucket, trained_job, tmp_path):
    job = trained_job(moto_bucket, ranks=1, steps=(10, 20), losses=(0.5, 0.4))
    manifest = f"{PREFIX}/training_projects/{job.project}/jobs/{job.job_id}/manifests/rank-0/checkpoint-20.json"
    body = moto_bucket.client.get_object(Bucket=moto_bucket.name, Key=manifest)["Body"].read()
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key=manifest, Body=body[:100])  # torn
    out = tmp_path / "out"
    r = job.cli("download", "--job", job.job_id, "--path", "rank-0/checkpoint-20/", "--to", str(out))
    assert r.returncode == 1, r.stderr
    assert "the manifest of rank-0/checkpoint-20 cannot be read" in r.stderr
    assert not out.exists() or got(out) == {}
    r = job.cli("download", "--job", job.job_id, "--path", "rank-0/latest/", "--to", str(out))
    assert r.returncode == 0, r.stderr  # as restore sees it: checkpoint-20 is not committed, 10 is the latest
    assert got(out) == expected(job, (0,), "checkpoint-10")


def test_what_a_killed_download_leaves_the_next_one_removes(moto_bucket, trained_job, tmp_path: Path) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    out, ask = tmp_path / "out", ["--job", job.job_id, "--path", "rank-0/checkpoint-10/"]
    # The data, not the manifests: the files are open under temporary names and no byte comes.
    stall = Rule("stall", ops=("GetObject",), key="*/rank-0/checkpoint-10/*", seconds=60)
    with FaultProxy(int(moto_bucket.server.endpoint_url.rsplit(":", 1)[1]), [stall]) as proxy:
        through = [proxy.endpoint if a == moto_bucket.server.endpoint_url else a for a in job.storage_args]
        argv = [sys.executable, "-m", "daemon", "download", *through, "--project", job.project, *ask, "--to", str(out)]
        killed = subprocess.Popen(argv, env=job.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            left = wait_for(lambda: list(out.rglob(f"{TMP_PREFIX}*")), 60, "the download to open its files")
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.wait(30)
    assert all(p.exists() for p in left)  # a kill runs no cleanup
    r = job.cli("download", *ask, "--to", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert got(out) == expected(job, (0,), "checkpoint-10")  # the leftovers are gone, only real files remain
    assert "removed what a killed download left" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_download_cleans_up_and_says_so_in_one_line(moto_bucket, trained_job, tmp_path: Path, sig) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    out = tmp_path / "out"
    stall = Rule("stall", ops=("GetObject",), key="*/rank-0/checkpoint-10/*", seconds=60)
    with FaultProxy(int(moto_bucket.server.endpoint_url.rsplit(":", 1)[1]), [stall]) as proxy:
        through = [proxy.endpoint if a == moto_bucket.server.endpoint_url else a for a in job.storage_args]
        argv = [sys.executable, "-m", "daemon", "download", *through, "--project", job.project, "--job", job.job_id,
                "--path", "rank-0/checkpoint-10/", "--to", str(out)]  # fmt: skip
        stopped = subprocess.Popen(
            argv,
            env=job.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, not a script
        )
        try:
            wait_for(lambda: list(out.rglob(f"{TMP_PREFIX}*")), 60, "the download to open its files")
            stopped.send_signal(sig)
            _, err = stopped.communicate(timeout=30)
        finally:
            stopped.kill()
    assert stopped.returncode == 128 + sig, err
    assert err.splitlines()[-1] == "ckptd: download interrupted" and "Traceback" not in err, err
    assert not list(out.rglob(f"{TMP_PREFIX}*"))


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--job", "trained", "--path", "rank-*/checkpoint-99/"], 1, "'rank-*/checkpoint-99/' matches no stored file"),
        (["--job", "nope", "--path", "rank-*/checkpoint-10/"], 1, "no job 'nope'"),
        (
            ["--project", "elsewhere", "--job", "trained", "--path", "rank-0/"],
            1,
            "no job 'trained' in project 'elsewhere'",
        ),
        (["--job", "trained", "--path", "rank-0/../x"], 2, "'..' segment"),
        (["--job", "trained", "--path", "/rank-0/x"], 2, "absolute"),
        (["--job", "trained", "--path", "checkpoint-10/"], 2, "must start with a rank folder"),
        (["--path", "rank-*/checkpoint-10/"], 2, "--path needs --job"),
        ([], 2, "nothing to download"),
        (["--job", "trained", "--path", "rank-0/checkpoint-10/", "rank-0/nothing*"], 1, "'rank-0/nothing*' matches"),
    ],
)
def test_bad_input(moto_bucket, trained_job, tmp_path: Path, args, code, message) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    out = tmp_path / "out"
    r = job.cli("download", *args, "--to", str(out))
    assert (r.returncode, r.stdout) == (code, ""), r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists() or got(out) == {}


def test_bad_config_input(moto_bucket, trained_job, tmp_path: Path) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    refs = {"training_checkpoints": {"artifact_references": [{"training_job_id": "trained", "paths": ["rank-0/"]}]}}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(refs))
    r = job.cli("download", "--config", str(good), "--job", "trained", "--path", "rank-0/", "--to", str(tmp_path / "o"))
    assert r.returncode == 2 and "not both" in r.stderr
    bad = tmp_path / "bad.yaml"
    refs["training_checkpoints"]["artifact_references"][0]["paths"] = ["rank-0/x//y"]
    bad.write_text(yaml.safe_dump(refs))
    r = job.cli("download", "--config", str(bad), "--to", str(tmp_path / "o"))
    assert r.returncode == 2 and "artifact_references[0]: paths[0]" in r.stderr and "empty segment" in r.stderr
    assert not (tmp_path / "o").exists()


def test_config_file_with_storage_and_references_only(moto_bucket, trained_job, tmp_path: Path) -> None:
    """What the chart's serving ConfigMap holds: storage settings and the serving block, no flags."""
    job = trained_job(moto_bucket, ranks=1, steps=(10, 20), losses=(0.5, 0.4))
    config = {
        "project": "proj",
        "storage": {
            "url": f"s3://{moto_bucket.name}/{PREFIX}",
            "endpoint_url": moto_bucket.server.endpoint_url,
            "addressing_style": "path",
        },
        "training_checkpoints": {
            "download_folder": str(tmp_path / "models"),
            "artifact_references": [{"training_job_id": job.job_id, "paths": ["rank-0/latest/"]}],
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "download", "--config", str(tmp_path / "c.yaml")],
        env=job.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert got(tmp_path / "models") == expected(job, (0,), "checkpoint-20")
