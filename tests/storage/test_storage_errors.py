"""Pure rules: error classification, translation of client errors, storage URLs, client options."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
import pytest
from botocore import exceptions as bx

from daemon.storage import FileRange, S3Options, StorageURL, open_storage
from daemon.storage.bodies import RangeReader, digests_sync
from daemon.storage.errors import PERMANENT_CODES, TRANSIENT_CODES, StorageError, is_transient
from daemon.storage.retry import Deadline
from daemon.storage.s3 import S3Storage
from daemon.storage.s3client import client_config, translate

KIND = "unit"

# The truth table of is_transient's docstring, row by row.
TRUTH_TABLE = (
    [(code, status, True) for code in sorted(TRANSIENT_CODES) for status in (None, 400, 503)]
    + [("NetworkError", None, True)]
    + [(code, status, False) for code in sorted(PERMANENT_CODES) for status in (None, 403, 500)]
    + [("SomethingNew", status, True) for status in (500, 502, 503, 504, 599)]
    + [("SomethingNew", 429, True), ("SomethingNew", 408, True)]
    + [("BadDigest", 400, False)]
    + [("SomethingNew", status, False) for status in (400, 403, 404, 409, 416)]
    + [("SomethingNew", None, True)]
)


@pytest.mark.parametrize(("code", "status", "transient"), TRUTH_TABLE)
def test_is_transient_truth_table(code: str, status: int | None, transient: bool) -> None:
    assert is_transient(code, status) is transient
    assert StorageError("put", "k", code, "m", http_status=status).transient is transient


def test_explicit_verdict_wins() -> None:
    assert StorageError("put", "k", "SlowDown", "m", transient=False).transient is False
    assert "put 'k': SlowDown: m" in str(StorageError("put", "k", "SlowDown", "m"))


def client_error(code: str, status: int, message: str = "msg") -> bx.ClientError:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return bx.ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("exc", "code", "transient"),
    [
        (client_error("SlowDown", 503), "SlowDown", True),
        (client_error("InternalError", 500), "InternalError", True),
        (client_error("AccessDenied", 403), "AccessDenied", False),
        (client_error("403", 403, ""), "AccessDenied", False),  # HEAD errors carry no body
        (client_error("404", 404, ""), "NotFound", False),
        (client_error("BadDigest", 400), "BadDigest", False),
        (bx.NoCredentialsError(), "NoCredentials", False),
        (bx.EndpointConnectionError(endpoint_url="http://h/b/k?uploadId=x"), "NetworkError", True),
        (bx.ConnectTimeoutError(endpoint_url="http://h"), "NetworkError", True),
        (bx.ReadTimeoutError(endpoint_url="http://h"), "NetworkError", True),
        (bx.ConnectionClosedError(endpoint_url="http://h"), "NetworkError", True),
        (aiohttp.ServerDisconnectedError(), "NetworkError", True),
        (TimeoutError(), "NetworkError", True),
        (bx.SSLError(endpoint_url="http://h", error="CERTIFICATE_VERIFY_FAILED"), "TLSVerifyFailed", False),
        (bx.ParamValidationError(report="bad"), "InvalidArgument", False),
    ],
)
def testtranslate(exc: Exception, code: str, transient: bool) -> None:
    err = translate("put", "k", exc)
    assert (err.code, err.transient, err.op, err.key) == (code, transient, "put", "k")


def test_translate_keeps_query_strings_out() -> None:
    url = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef"
    leaky = [
        client_error("AccessDenied", 403, f"denied for {url}"),
        bx.EndpointConnectionError(endpoint_url=url),
    ]
    for exc in leaky:
        message = str(translate("get", "k", exc))
        assert "X-Amz-Signature" not in message and "deadbeef" not in message
        assert "https://b.s3.amazonaws.com/k" in message


@pytest.mark.parametrize(
    ("checksum", "signing", "expected"),
    [
        ("crc32", "auto", False),
        ("md5", "auto", False),
        ("sha256", "auto", False),
        ("none", "auto", True),
        ("crc32", "on", True),
        ("none", "off", False),
    ],
)
def testclient_config(checksum: str, signing: str, expected: bool) -> None:
    config = client_config(S3Options(checksum=checksum, payload_signing=signing, addressing_style="path"))
    assert config.s3 == {"addressing_style": "path", "payload_signing_enabled": expected}
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.region_name == "us-east-1"
    assert config.retries["total_max_attempts"] <= 2


async def test_bad_endpoint_is_a_permanent_setup_error(aws_env) -> None:
    async with S3Storage("bucket", "", S3Options(endpoint_url="not a url")) as store:
        with pytest.raises(StorageError) as err:
            await store.put("k", b"x")
    assert err.value.transient is False


@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "prefix"),
    [
        ("s3://bucket", "s3", "bucket", ""),
        ("s3://bucket/", "s3", "bucket", ""),
        ("s3://my.bucket-1/team/ckpts/", "s3", "my.bucket-1", "team/ckpts"),
        ("file:///data/store", "file", "", "/data/store"),
        ("file:///data/store/", "file", "", "/data/store"),
        ("file://localhost/srv/x", "file", "", "/srv/x"),
        ("file:///", "file", "", "/"),
    ],
)
def test_storage_url_parse(url: str, scheme: str, bucket: str, prefix: str) -> None:
    parsed = StorageURL.parse(url)
    assert (parsed.scheme, parsed.bucket, parsed.prefix) == (scheme, bucket, prefix)
    assert StorageURL.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "",
        "bucket/path",
        "http://host/x",
        "s3://",
        "s3:///prefix",
        "s3://ab",
        "s3://user:pw@bucket",
        "s3://bucket?versionId=1",
        "s3://bucket#frag",
        "s3://Bad_Bucket!",
        "s3://bucket/a//b",
        "s3://bucket/a/../b",
        "s3://bucket/./a",
        "file://host/path",
        "file:relative",
        "file:///a/../b",
    ],
)
def test_storage_url_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError, match=r"expected|bucket|prefix|path|credentials|absolute"):
        StorageURL.parse(url)


def test_open_storage_builds_s3_backend() -> None:
    store = open_storage("s3://bucket/team/ckpts", S3Options(region="eu-west-1"))
    assert isinstance(store, S3Storage)
    assert (store.bucket, store.prefix, store.url) == ("bucket", "team/ckpts", "s3://bucket/team/ckpts")


def test_range_reader_streams_only_its_range(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    with open(path, "rb") as f:
        reader = RangeReader(FileRange(f.fileno(), 1000, 600_000))
        assert len(reader) == 600_000 and reader.seekable()
        first = reader.read(1 << 20)
        assert len(first) == 256 << 10  # bounded reads: never the whole part at once
        rest = reader.read()
        assert first + rest == path.read_bytes()[1000:601_000]
        assert reader.read(10) == b""
        reader.seek(0)  # botocore rewinds a body before a retry
        assert reader.read(5) == path.read_bytes()[1000:1005]
        assert reader.seek(0, io.SEEK_END) == 600_000
        with pytest.raises(OSError):
            reader.fileno()  # aiohttp would otherwise size the body from the whole file
        truncated = RangeReader(FileRange(f.fileno(), (1 << 20) - 10, 100))
        with pytest.raises(OSError, match="shrank"):
            truncated.read()
        assert digests_sync(FileRange(f.fileno(), 0, 3), ("md5",)) == digests_sync(b"\x00\x01\x02", ("md5",))


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), -1.0], ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("method", ["start", "shorten", "grace"])
def test_a_deadline_refuses_a_number_of_seconds_it_could_never_reach(method, seconds):
    """A NaN deadline never passes: a drain would never end (defence in depth behind the config)."""
    deadline = Deadline()
    with pytest.raises(ValueError, match="finite"):
        getattr(deadline, method)(seconds)
    deadline.start(0)
    assert deadline.passed()
