"""The `ckptd` program as users run it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from daemon.cli import COMMANDS

KIND = "integration"


def ckptd(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "BT_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_every_command():
    out = ckptd("--help")
    assert out.returncode == 0
    for command in ("run", "watch", "restore", "ls", "inspect", "urls", "download", "prune", "version"):
        assert f"    {command} " in out.stdout
    assert "Exit codes" in out.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_help(command):
    out = ckptd(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: ckptd " + command in out.stdout


def test_run_help_shows_settings_with_environment_and_defaults():
    out = ckptd("run", "--help").stdout
    assert "--checkpoint-dir" in out and "BT_CHECKPOINT_DIR" in out
    assert "--storage" in out and "CKPTD_STORAGE" in out
    assert "--stop-timeout" in out and "(default: 30.0)" in out


def test_version():
    out = ckptd("version")
    assert out.returncode == 0 and out.stdout.startswith("ckptd 0.")
    data = json.loads(ckptd("version", "--json").stdout)
    assert data["version"].startswith("0.") and data["dependencies"]["aiobotocore"]


@pytest.mark.parametrize(
    "args, env, config, setting",
    [
        ([], {}, "upload: {part_sise: 8MiB}\n", "upload.part_sise"),  # unknown key
        ([], {}, "upload: {concurrency: many}\n", "upload.concurrency"),  # wrong type
        ([], {}, "start_commands: 7\n", "start_commands"),  # wrong type
        (["--storage", "s3:/bucket"], {}, "", "storage.url"),  # malformed URL
        ([], {"CKPTD_STORAGE": "gs://bucket"}, "", "storage.url"),
        (["--checkpoint-dir", "relative/ckpts"], {}, "", "checkpointing_config.checkpoint_path"),
        ([], {"BT_CHECKPOINT_DIR": "relative"}, "", "checkpointing_config.checkpoint_path"),
        (["--part-size=-8MiB"], {}, "", "upload.part_size"),  # negative size
        ([], {}, "upload: {multipart_threshold: -1}\n", "upload.multipart_threshold"),
        (["--group-size", "2"], {}, "", "job_id"),  # multi-node without a job id
        ([], {"BT_GROUP_SIZE": "3"}, "", "job_id"),
        (["--project", "my/project"], {}, "", "project"),  # unsafe in keys
        ([], {"BT_TRAINING_JOB_ID": "../../escape"}, "", "job_id"),
        ([], {"CKPTD_METRICS_ADDR": "nope"}, "", "metrics_addr"),
    ],
)
def test_bad_input_exits_2_naming_the_setting_and_runs_nothing(tmp_path, args, env, config, setting):
    marker = tmp_path / "trainer-ran"
    config_args = []
    if config:
        (tmp_path / "c.yaml").write_text(config)
        config_args = ["--config", str(tmp_path / "c.yaml")]
    out = ckptd("run", *config_args, *args, "--", "touch", str(marker), env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"ckptd: invalid {re.escape(setting)}[ :]", lines[0]), out.stderr
    assert not marker.exists()


@pytest.mark.parametrize("command", ["watch", "restore", "ls", "prune"])
def test_every_command_validates_settings_first(command):
    out = ckptd(command, "--storage", "http://not-a-store")
    assert out.returncode == 2 and "invalid storage.url" in out.stderr


def test_flag_usage_errors_exit_2():
    out = ckptd("prune", "--mode", "sideways")
    assert out.returncode == 2 and "--mode" in out.stderr
