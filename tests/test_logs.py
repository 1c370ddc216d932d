"""Logging: JSON lines off a terminal, ISO UTC timestamps, secrets never written."""

from __future__ import annotations

import io
import json

from daemon import logs

KIND = "unit"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_with_utc_iso_timestamps():
    stream = io.StringIO()
    logs.configure("info", "auto", stream)
    logs.get(job_id="j1").info("uploaded", key="a/b", bytes=3)
    logs.get().debug("hidden")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "uploaded" and event["job_id"] == "j1" and event["level"] == "info"
    assert event["timestamp"].endswith("Z") and "T" in event["timestamp"]


def test_console_output_on_a_terminal():
    stream = Tty()
    logs.configure("debug", "auto", stream)
    logs.get().debug("hello", n=1)
    text = stream.getvalue()
    assert "hello" in text and not text.lstrip().startswith("{")


def test_secrets_are_redacted():
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    url = (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F2026"
        "&X-Amz-Signature=deadbeefcafe&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE"
    )
    logs.get().info("presigned", url=url, aws_secret_access_key="wJalrXUtnFEMI", session_token="tok")
    text = stream.getvalue()
    for secret in ("AKIAEXAMPLE", "deadbeefcafe", "FQoGZXIvYXdzEXAMPLE", "wJalrXUtnFEMI", '"tok"'):
        assert secret not in text
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in text  # the harmless parts stay readable
