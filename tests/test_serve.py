"""/metrics, /healthz, /readyz and /status of running daemons, as Prometheus and Kubernetes see them."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemons import PROJECT, Daemon, base_env, s3_args, wait_for
from servers import free_port

KIND = "integration"

TRAINER = str(Path(__file__).resolve().parent / "trainers" / "fake_trainer.py")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, bytes]:
    try:
        with _DIRECT.open(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str) -> tuple[int, dict]:
    status, body = get(url)
    return status, json.loads(body)


def sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def daemon(tmp_path):
    started: list[Daemon] = []

    def start(bucket, command: str, *extra: str, env: dict | None = None) -> tuple[Daemon, str]:
        port = free_port()
        restore = ["--restore-dir", str(tmp_path / "loaded")] if command == "run" else []
        args = [
            command,
            *s3_args(bucket),
            "--project",
            PROJECT,
            "--job-id",
            "job-s",
            "--settle-time",
            "0.05",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            *restore,
            "--metrics-addr",
            f"127.0.0.1:{port}",
            "--drain-timeout",
            "10",
            *extra,
        ]
        d = Daemon(
            args, {**base_env(), **bucket.server.env(), **(env or {})}, tmp_path / f"{command}-{len(started)}.log"
        )
        started.append(d)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: d.proc.poll() is not None or get_or_none(base + "/healthz"), 30, "the status server")
        return d, base

    yield start
    for d in started:
        d.kill()


def get_or_none(url: str) -> tuple[int, bytes] | None:
    try:
        return get(url)
    except OSError:
        return None


def test_metrics_of_a_running_daemon_pass_promtool(daemon, moto_bucket, tmp_path):
    d, base = daemon(moto_bucket, "watch")
    (tmp_path / "ckpt" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "ckpt" / "checkpoint-1" / "model.bin").write_bytes(b"x" * 1000)
    (tmp_path / "ckpt" / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (tmp_path / "ckpt" / "ignored.tmp").write_text("temporary")
    d.wait_event("checkpoint committed")
    status, body = get(base + "/metrics")
    assert status == 200
    text = body.decode()
    for name in (
        "ckptd_info",
        "ckptd_upload_lag_seconds_bucket",
        "ckptd_oldest_pending_age_seconds",
        "ckptd_pending_files",
        "ckptd_pending_bytes",
        "ckptd_uploaded_files_total",
        "ckptd_uploaded_bytes_total",
        "ckptd_files_skipped_total",
        "ckptd_rescan_found_files_total",
        "ckptd_checkpoints_committed_total",
        "ckptd_last_commit_timestamp_seconds",
        "ckptd_last_committed_step",
        "ckptd_restore_bytes_total",
        "ckptd_restore_files_total",
        "ckptd_restore_duration_seconds",
        "ckptd_checkpoint_dir_free_bytes",
        "ckptd_trainer_running",
    ):
        assert sample(text, name) is not None, name
    assert sample(text, "ckptd_uploaded_bytes_total") == 1000 + len('{"global_step": 1}')
    assert 'ckptd_info{job_id="job-s",project="proj",rank="0",version=' in text
    check = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"], input=body, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    code, info = get_json(base + "/status")
    assert code == 200 and info["uploaded_files"] == 2 and info["pending_files"] == 0
    assert info["last_commit"] == {"checkpoint": "checkpoint-1", "reason": "marker"}
    assert get_json(base + "/readyz") == (200, {"ready": True, "not_ready": []})
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0


def test_a_taken_port_is_a_clear_configuration_error(daemon, moto_bucket, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d, _ = daemon(moto_bucket, "watch", "--metrics-addr", f"127.0.0.1:{port}")
        assert d.wait(30) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in d.events("metrics address unusable")[0]["error"]


def test_not_ready_until_restore_is_done(daemon, moto_bucket, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # the store is unreachable: restore keeps retrying
    config = tmp_path / "c.yaml"
    config.write_text(
        "load_checkpoint_config:\n  enabled: true\n  checkpoints:\n"
        "    - {typ: baseten_latest_checkpoint, job_id: earlier}\n"
    )
    d, base = daemon(
        moto_bucket,
        "run",
        "--config",
        str(config),
        "--s3-endpoint-url",
        dead,
        "--",
        sys.executable,
        TRAINER,
        env={"TRAINER_RECORD": str(tmp_path / "record.json")},
    )
    code, ready = get_json(base + "/readyz")
    assert code == 503 and "restore not finished" in ready["not_ready"]
    assert get_json(base + "/healthz")[0] == 200
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 128 + signal.SIGTERM
    assert not (tmp_path / "record.json").exists()


def test_not_ready_while_credentials_are_rejected(daemon, juicefs_bucket, tmp_path):
    d, base = daemon(juicefs_bucket, "watch", env={"AWS_SECRET_ACCESS_KEY": "wrong-secret-key"})
    d.wait_event("storage not usable at start")
    code, ready = get_json(base + "/readyz")
    assert code == 503 and any("storage refuses requests" in r for r in ready["not_ready"]), ready
    code, info = get_json(base + "/status")
    assert info["last_errors"][0]["code"] in ("SignatureDoesNotMatch", "InvalidAccessKeyId")
    assert "wrong-secret-key" not in json.dumps(info)


def test_trainer_running_while_the_trainer_runs(daemon, moto_bucket, tmp_path):
    d, base = daemon(
        moto_bucket,
        "run",
        "--",
        sys.executable,
        TRAINER,
        env={
            "TRAINER_RECORD": str(tmp_path / "record.json"),
            "TRAINER_WAIT": "yes",
            "TRAINER_READY": str(tmp_path / "ready"),
        },
    )
    wait_for(lambda: (tmp_path / "ready").exists(), 30, "the trainer")
    text = get(base + "/metrics")[1].decode()
    assert sample(text, "ckptd_trainer_running") == 1
    assert get_json(base + "/status")[1]["trainer_running"] is True
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 128 + signal.SIGTERM
