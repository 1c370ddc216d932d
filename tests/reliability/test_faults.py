"""The fault proxy itself: each fault, seen by a raw HTTP client and by a real boto3 client, against
moto; the request names and the schedule's matching rules as tables."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import random
import socket
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from faults import FaultProxy, Rule
from servers import S3Bucket, admin_client

from reliability.wire import Message, Wire, body_framing, operation, pieces

KIND = "integration"


@pytest.fixture
def proxy(moto_bucket: S3Bucket):
    port = int(moto_bucket.server.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, seed=7) as p:
        yield p


def client(bucket: S3Bucket, proxy: FaultProxy, read_timeout: float = 60):
    if read_timeout == 60:
        return admin_client(dataclasses.replace(bucket.server, endpoint_url=proxy.endpoint))
    s = bucket.server
    return boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        region_name=s.region,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, read_timeout=read_timeout),
    )


def stored(bucket: S3Bucket, key: str) -> bytes | None:
    try:
        return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    except ClientError:
        return None


def raw(proxy: FaultProxy, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("fault, status, code", [("error500", 500, "InternalError"), ("slowdown503", 503, "SlowDown")])
def test_error_bursts_answer_s3_xml_then_pass(proxy, moto_bucket, fault, status, code):
    proxy.schedule([Rule(fault, ops=("PutObject",), nth=(1, 2))])
    s3 = client(moto_bucket, proxy)
    for _ in range(2):
        with pytest.raises(ClientError) as err:
            s3.put_object(Bucket=moto_bucket.name, Key="k", Body=b"v1")
        assert err.value.response["Error"]["Code"] == code
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert stored(moto_bucket, "k") is None  # the server never saw them
    s3.put_object(Bucket=moto_bucket.name, Key="k", Body=b"v2")
    assert stored(moto_bucket, "k") == b"v2"
    assert proxy.injected == {fault: 2}
    # A raw client reads the same body: the request's own body was consumed, the connection lives on.
    proxy.schedule([Rule(fault, ops=("PutObject",))])
    got, body = raw(proxy, "PUT", f"/{moto_bucket.name}/raw", b"x" * 1000)
    assert got == status and f"<Code>{code}</Code>".encode() in body


def test_reset_mid_request_body_stores_nothing(proxy, moto_bucket):
    proxy.schedule([Rule("reset_request", ops=("PutObject",), fraction=0.25)])
    with pytest.raises((BotoCoreError, ClientError)):
        client(moto_bucket, proxy).put_object(Bucket=moto_bucket.name, Key="k", Body=b"x" * 400_000)
    assert [(r.op, r.sent, r.status) for r in proxy.requests()] == [("PutObject", 100_000, None)]
    assert stored(moto_bucket, "k") is None
    assert proxy.injected == {"reset_request": 1}


def test_reset_of_the_answer_leaves_the_object_stored(proxy, moto_bucket):
    proxy.schedule([Rule("reset_response", ops=("PutObject",))])
    with pytest.raises((BotoCoreError, ClientError)):
        client(moto_bucket, proxy).put_object(Bucket=moto_bucket.name, Key="k", Body=b"done")
    assert stored(moto_bucket, "k") == b"done"  # the ambiguous failure: done, but the client cannot know


def test_reset_mid_response_body_of_a_get(proxy, moto_bucket):
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key="k", Body=b"y" * 50_000)
    proxy.schedule([Rule("reset_response", ops=("GetObject",))])
    with pytest.raises((BotoCoreError, ClientError)):
        client(moto_bucket, proxy).get_object(Bucket=moto_bucket.name, Key="k")["Body"].read()


def test_truncated_get_body_is_short_of_its_content_length(proxy, moto_bucket):
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key="k", Body=b"z" * 100_000)
    proxy.schedule([Rule("truncate", ops=("GetObject",), fraction=0.3, times=1)])
    s3 = client(moto_bucket, proxy)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": moto_bucket.name, "Key": "k"})
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("GET", url.split(proxy.endpoint, 1)[1])
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == "100000"
    with pytest.raises(http.client.IncompleteRead) as short:
        resp.read()
    conn.close()
    assert len(short.value.partial) == 30_000
    body = s3.get_object(Bucket=moto_bucket.name, Key="k")["Body"].read()
    assert body == b"z" * 100_000  # times=1: the next one is whole
    assert proxy.injected == {"truncate": 1}


def test_stall_outlasts_the_client_timeout_and_the_server_did_the_work(proxy, moto_bucket):
    proxy.schedule([Rule("stall", ops=("PutObject",), seconds=30)])
    started = time.monotonic()
    with pytest.raises(BotoCoreError, match=r"(?i)timeout"):
        client(moto_bucket, proxy, read_timeout=1).put_object(Bucket=moto_bucket.name, Key="k", Body=b"held")
    assert time.monotonic() - started < 10  # the client gave up; the proxy noticed and let go
    assert stored(moto_bucket, "k") == b"held"
    assert proxy.requests("PutObject")[0].status is None


def test_outage_refuses_connections_then_ends(proxy, moto_bucket):
    proxy.outage(1.0)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", proxy.port), timeout=2):
        pass
    deadline = time.monotonic() + 10
    while True:
        try:
            client(moto_bucket, proxy).head_bucket(Bucket=moto_bucket.name)
            break
        except BotoCoreError:
            assert time.monotonic() < deadline, "the proxy did not come back"
            time.sleep(0.1)
    # As a rule: the first matching request starts it and is itself cut.
    proxy.schedule([Rule("outage", ops=("ListObjects",), seconds=0.5)])
    with pytest.raises(BotoCoreError):
        client(moto_bucket, proxy).list_objects_v2(Bucket=moto_bucket.name)
    assert proxy.injected == {"outage": 2}


def test_wrong_etag_on_put_and_upload_part(proxy, moto_bucket):
    proxy.schedule([Rule("bad_etag", ops=("PutObject", "UploadPart"))])
    s3 = client(moto_bucket, proxy)
    etag = s3.put_object(Bucket=moto_bucket.name, Key="k", Body=b"data")["ETag"]
    assert etag.strip('"') != hashlib.md5(b"data").hexdigest() and len(etag.strip('"')) == 32
    upload = s3.create_multipart_upload(Bucket=moto_bucket.name, Key="m")["UploadId"]
    part = s3.upload_part(Bucket=moto_bucket.name, Key="m", UploadId=upload, PartNumber=1, Body=b"p" * 1000)
    with pytest.raises(ClientError, match="InvalidPart"):
        s3.complete_multipart_upload(
            Bucket=moto_bucket.name,
            Key="m",
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
        )
    assert proxy.injected == {"bad_etag": 2}


def test_multipart_requests_are_named_and_their_bytes_counted(proxy, moto_bucket):
    s3 = client(moto_bucket, proxy)
    upload = s3.create_multipart_upload(Bucket=moto_bucket.name, Key="a b/m")["UploadId"]
    parts = [
        {"PartNumber": n, "ETag": s3.upload_part(Bucket=moto_bucket.name, Key="a b/m", UploadId=upload,
                                                 PartNumber=n, Body=bytes([n]) * (5 << 20))["ETag"]}
        for n in (1, 2)
    ]  # fmt: skip
    s3.list_parts(Bucket=moto_bucket.name, Key="a b/m", UploadId=upload)
    s3.complete_multipart_upload(
        Bucket=moto_bucket.name, Key="a b/m", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    log = [(r.op, r.key, r.query.get("partNumber"), r.sent, r.status) for r in proxy.requests()]
    assert log[:4] == [
        ("CreateMultipartUpload", "a b/m", None, 0, 200),
        ("UploadPart", "a b/m", "1", 5 << 20, 200),
        ("UploadPart", "a b/m", "2", 5 << 20, 200),
        ("ListParts", "a b/m", None, 0, 200),
    ]
    assert log[4][0] == "CompleteMultipartUpload" and log[4][4] == 200
    assert stored(moto_bucket, "a b/m") == b"\1" * (5 << 20) + b"\2" * (5 << 20)


@pytest.mark.parametrize(
    "method, target, op, key",
    [
        ("PUT", "/b/k/x.bin", "UploadPart", "k/x.bin"),
        ("PUT", "/b/k", "PutObject", "k"),
        ("PUT", "/b", "CreateBucket", ""),
        ("POST", "/b/k?uploads", "CreateMultipartUpload", "k"),
        ("POST", "/b/k?uploadId=u", "CompleteMultipartUpload", "k"),
        ("POST", "/b?delete", "DeleteObjects", ""),
        ("GET", "/b/k?uploadId=u", "ListParts", "k"),
        ("GET", "/b/a%20b", "GetObject", "a b"),
        ("GET", "/b?uploads&prefix=p", "ListMultipartUploads", ""),
        ("GET", "/b?list-type=2&prefix=p", "ListObjects", ""),
        ("HEAD", "/b/k", "HeadObject", "k"),
        ("HEAD", "/b", "HeadBucket", ""),
        ("DELETE", "/b/k?uploadId=u", "AbortMultipartUpload", "k"),
        ("DELETE", "/b/k", "DeleteObject", "k"),
        ("OPTIONS", "/b/k", "OptionsOther", "k"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.isalpha() else None,
)
@pytest.mark.unit
def test_request_names(method, target, op, key):
    if op == "UploadPart":
        target += "?partNumber=3&uploadId=u"
    assert operation(method, target)[:2] == (op, key)


@pytest.mark.parametrize(
    "rule, requests, fired",
    [
        (Rule("error500"), ["PutObject", "GetObject"], [True, True]),
        (Rule("error500", ops=("UploadPart",)), ["PutObject", "UploadPart"], [False, True]),
        (Rule("error500", nth=(2,)), ["PutObject"] * 3, [False, True, False]),
        (Rule("error500", times=1), ["PutObject"] * 3, [True, False, False]),
        (Rule("error500", start=10), ["PutObject"], [False]),
        (Rule("error500", key="rank-0/*"), ["PutObject"], [False]),
        (Rule("error500", probability=0), ["PutObject"] * 3, [False] * 3),
    ],
    ids=["any", "by-op", "nth", "times", "window", "key-glob", "never"],
)
@pytest.mark.unit
def test_rule_matching(rule, requests, fired):
    rng = random.Random(0)
    got = []
    for op in requests:
        hit = rule.wants(op, "k", 0.0, rng)
        rule.fired += hit
        got.append(hit)
    assert got == fired


@pytest.mark.unit
def test_probability_is_seeded():
    def draw(seed: int) -> list[bool]:
        rule, rng = Rule("stall", probability=0.5), random.Random(seed)
        return [rule.wants("GetObject", "k", 0.0, rng) for _ in range(32)]

    assert draw(3) == draw(3) and draw(3) != draw(4) and 4 < sum(draw(3)) < 28


@pytest.mark.unit
def test_unknown_fault_is_refused():
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        Rule("explode")


@pytest.mark.unit
def test_chunked_bodies_are_relayed_with_their_framing_and_trailers():
    body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nx-amz-checksum-crc32: AAAA\r\n\r\n"
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"PUT /b/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"GET /b/k HTTP/1.1\r\n\r\n")
        wire = Wire(b)
        req = Message.read(wire)
        assert b"".join(pieces(wire, body_framing(req, response=False))) == body
        assert Message.read(wire).start == "GET /b/k HTTP/1.1"  # the next request is intact
