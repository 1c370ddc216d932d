"""The refusals of issue 10 as users meet them: `python -m daemon run ... -- touch MARKER` as a real
process, which must exit 2 with one line naming the setting, never start the trainer, and never
print a credential.

Before the fix: `drain_timeout: .nan` started the trainer and then hung in the drain (15 minutes,
through two SIGTERMs); `settle_time: .inf` started it and never completed a file; `bandwidth_limit:
.inf` died in an OverflowError traceback; a presigned storage URL was echoed with its signature;
a FIFO as the config path blocked forever; argparse echoed a URL's password in its usage error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from refusals import KEY_ID, PRESIGNED, SECRET_KEY, SECRETS

KIND = "integration"

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def ckptd(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "BT_", "AWS_"))}
    try:
        return subprocess.run(
            [*prefix, sys.executable, "-m", "daemon", *args],
            env={**base, **(env or {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ckptd {' '.join(args)[:200]} did not exit within 30 s: {(e.stderr or b'')[-500:]!r}")


def run_with(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    marker = tmp_path / "trainer-ran"
    common = ["--storage", f"file://{tmp_path}/store", "--checkpoint-dir", str(tmp_path / "ckpt")]
    out = ckptd("run", *common, "--metrics-addr", "127.0.0.1:0", *args, "--", "touch", str(marker), env=env)
    return out, marker


def assert_refused(out: subprocess.CompletedProcess, marker: Path, setting: str) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"ckptd: invalid {re.escape(setting)}[ :]", lines[0]), out.stderr[-2000:]
    assert not marker.exists(), "the trainer ran"
    for secret in SECRETS:
        assert secret not in out.stderr + out.stdout
    return lines[0]


@pytest.mark.parametrize(
    "text, setting",
    [
        ("drain_timeout: .nan\n", "drain_timeout"),
        ("upload: {settle_time: .inf}\ndrain_timeout: 5\n", "upload.settle_time"),
        ("upload: {bandwidth_limit: .inf}\n", "upload.bandwidth_limit"),
    ],
    ids=["nan-drain_timeout", "inf-settle_time", "inf-bandwidth_limit"],
)
def test_non_finite_yaml_setting_is_refused_before_the_trainer_runs(tmp_path, text, setting):
    (tmp_path / "c.yaml").write_text(text)
    out, marker = run_with(tmp_path, "--config", str(tmp_path / "c.yaml"))
    line = assert_refused(out, marker, setting)
    assert "must be a finite" in line and f"(from config file {tmp_path / 'c.yaml'})" in line
    assert "Traceback" not in out.stderr


def test_nan_from_the_environment_names_the_variable(tmp_path):
    out, marker = run_with(tmp_path, env={"CKPTD_DRAIN_TIMEOUT": "nan"})
    assert "(from $CKPTD_DRAIN_TIMEOUT)" in assert_refused(out, marker, "drain_timeout")


def test_presigned_storage_url_is_refused_without_its_signature(tmp_path):
    out, marker = run_with(tmp_path, "--storage", PRESIGNED)
    line = assert_refused(out, marker, "storage.url")
    assert "presigned URL" in line and "X-Amz-Signature=[redacted]" in line


def test_credentials_in_a_url_are_not_echoed_by_usage_errors(tmp_path):
    # A mistyped flag: argparse quotes the arguments it did not recognise.
    out = ckptd("restore", "--storage-url", f"s3://{KEY_ID}:{SECRET_KEY}@bucket/p?X-Amz-Signature=abc123")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
    assert KEY_ID not in out.stderr and SECRET_KEY not in out.stderr and "abc123" not in out.stderr


def test_a_fifo_as_config_path_is_refused_instead_of_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "c.yaml")
    out, marker = run_with(tmp_path, env={"CKPTD_CONFIG": str(tmp_path / "c.yaml")})
    assert "not a regular file" in assert_refused(out, marker, "config")


@pytest.fixture
def open_folder():
    """A folder user nobody can reach (pytest's tmp_path lies under a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="ckptd-config-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_unreadable_config_file_is_refused_as_non_root(open_folder):
    # As root every file is readable (FIELD-NOTES §7): run ckptd as nobody.
    config = open_folder / "c.yaml"
    config.write_text("project: p\n")
    config.chmod(0o600)  # root's only
    home = open_folder / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    marker = home / "trainer-ran"
    nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    out = ckptd(
        "run", "--config", str(config), "--storage", f"file://{home}/store", "--checkpoint-dir", str(home / "ckpt"),
        "--metrics-addr", "127.0.0.1:0", "--", "touch", str(marker), env={"HOME": str(home)}, prefix=nobody,
    )  # fmt: skip
    line = assert_refused(out, marker, "config")
    assert f"cannot read {config}: Permission denied" in line
