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


def test_userinfo_and_nested_values_are_redacted():
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    url = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/p"
    logs.get().info(
        "store unreachable",
        url=url,
        tried=[url, {"endpoint": "https://u:hunter2hunter2@s3.example.com/"}],
        detail={"presigned": "https://b/k?X-Amz-Signature=deadbeefcafe", "nested": {"password": "pw-secret"}},
    )
    text = stream.getvalue()
    for secret in ("AKIAEXAMPLE", "wJalrXUtnFEMI", "hunter2hunter2", "deadbeefcafe", "pw-secret"):
        assert secret not in text
    event = json.loads(text)
    assert event["url"] == "s3://[redacted]@bucket/p"
    assert event["tried"][1]["endpoint"] == "https://[redacted]@s3.example.com/"


def test_exception_tracebacks_in_log_lines_are_redacted():
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        raise ValueError("GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef")
    except ValueError:
        logs.get().exception("request failed")
    text = stream.getvalue()
    assert "ValueError" in text and "AKIAEXAMPLE" not in text and "deadbeef" not in text


def test_redact_url_keeps_the_shape_and_drops_every_value():
    url = "https://acct:pw@b.example.com/k?X-Amz-Date=20260101&sig=abc&plain=1#frag"
    assert logs.redact_url(url) == (
        "https://[redacted]@b.example.com/k?X-Amz-Date=[redacted]&sig=[redacted]&plain=[redacted]#[redacted]"
    )
    assert logs.redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    assert logs.redact_url("http://[::1") == "[redacted]"  # unparseable: nothing of it


def test_presigned_urls_are_recognised_by_their_credential_parameters():
    assert logs.is_presigned("https://b.s3.amazonaws.com/k?X-Amz-Signature=x&X-Amz-Credential=y")
    assert logs.is_presigned("https://b.s3.amazonaws.com/k?AWSAccessKeyId=x&Signature=y&Expires=1")
    assert logs.is_presigned("https://storage.googleapis.com/b/k?X-Goog-Signature=x")
    assert logs.is_presigned("https://a.blob.core.windows.net/c/k?sv=1&sig=x")
    assert not logs.is_presigned("s3://bucket/prefix")
    assert not logs.is_presigned("https://b.example.com/k?versionId=3")
