"""Shared by the bad-input matrices of tests/config: secrets to look for, and `ckptd run` as
`cli.main` parses it, with the command itself replaced by a recorder.

The recorder is what makes "before anything starts" testable in-process: a case that wrongly passes
validation shows up as a started command instead of launching a daemon inside the test process.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from daemon import cli

KEY_ID, SECRET_KEY = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
SIGNATURE, TOKEN = "deadbeefcafe0123456789abcdef", "FQoGZXIvYXdzEXAMPLETOKEN"
SECRETS = (KEY_ID, SECRET_KEY, SIGNATURE, TOKEN)
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/ckpt/model.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential={KEY_ID}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
    f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}&X-Amz-Security-Token={TOKEN}"
)
FILE, CONFIG = "config file", "config"


def case(id: str, setting: str, *, args=(), env=None, config=None, source=None):
    """One row: what is given (flags, variables, a config file's text or a function making its path),
    the setting the error must name, and the source it must name (None: the file itself is bad)."""
    return pytest.param(list(args), env or {}, config, setting, source, id=id)


def config_args(tmp_path: Path, config) -> list[str]:
    if config is None:
        return []
    if callable(config):
        return ["--config", config(tmp_path)]
    path = tmp_path / "ckptd.yaml"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    return ["--config", str(path)]


def assert_refused(tmp_path, monkeypatch, capsys, args, env, config, setting, source) -> str:
    """Run `ckptd run ... -- true`; assert exit 2, nothing started, one line naming the setting and
    its source, no traceback and no secret. Returns that line."""
    for name in [n for n in os.environ if n.startswith(("CKPTD_", "BT_", "AWS_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setitem(cli.HANDLERS, "run", lambda c, a: started.append(c) or 0)

    code = cli.main(["run", *config_args(tmp_path, config), *args, "--", "true"])

    err = capsys.readouterr().err
    assert code == 2, err
    assert started == []
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(rf"ckptd: invalid {re.escape(setting)}[ :]", lines[0]), err
    if source:
        assert f"(from {source}" in lines[0], err
    assert "Traceback" not in err
    for secret in SECRETS:
        assert secret not in err
    return lines[0]
