"""entrypoint.sh: maps the container's command and environment onto `ckptd run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KIND = "integration"

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def entry(tmp_path):
    """Run entrypoint.sh with a `ckptd` that is this checkout, and a private embedded store."""
    wrapper = tmp_path / "ckptd"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m daemon "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "BT_", "AWS_"))}
    env.update(
        CKPTD_BIN=str(wrapper),
        PYTHONPATH=str(REPO),
        XDG_DATA_HOME=str(tmp_path / "data"),
        BT_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        BT_LOAD_CHECKPOINT_DIR=str(tmp_path / "loaded"),
        CKPTD_METRICS_ADDR="127.0.0.1:0",
    )

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(REPO / "entrypoint.sh"), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def test_ckptd_commands_pass_through(entry):
    out = entry("version")
    assert out.returncode == 0 and out.stdout.startswith("ckptd "), out.stderr


def test_the_container_command_is_the_training_command(entry):
    out = entry("sh", "-c", 'echo "trainer sees $BT_CHECKPOINT_DIR"; exit 3')
    assert out.returncode == 3, out.stderr
    assert "trainer sees " in out.stdout


def test_options_then_command(entry, tmp_path):
    out = entry("--job-id", "from-entrypoint", "--", "sh", "-c", 'echo "job=$BT_TRAINING_JOB_ID"')
    assert out.returncode == 0, out.stderr
    assert "job=from-entrypoint" in out.stdout


def test_secrets_come_from_files_and_aws_file_variables_stay(entry, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    probe = (
        "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
        "('AWS_SECRET_ACCESS_KEY', 'AWS_SECRET_ACCESS_KEY_FILE', 'AWS_WEB_IDENTITY_TOKEN_FILE')}))"
    )
    out = entry(
        sys.executable,
        "-c",
        probe,
        AWS_SECRET_ACCESS_KEY_FILE=str(secret),
        AWS_WEB_IDENTITY_TOKEN_FILE="/var/run/token",
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_SECRET_ACCESS_KEY_FILE": None,
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token",
    }
    assert "s3cr3t-value" not in out.stderr


def test_a_secret_given_twice_is_refused(entry, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    out = entry("version", AWS_SECRET_ACCESS_KEY="a", AWS_SECRET_ACCESS_KEY_FILE=str(secret))
    assert out.returncode == 2 and "both AWS_SECRET_ACCESS_KEY and AWS_SECRET_ACCESS_KEY_FILE" in out.stderr
    out = entry("version", CKPTD_STORAGE_FILE=str(tmp_path / "absent"))
    assert out.returncode == 2 and "cannot be read" in out.stderr
