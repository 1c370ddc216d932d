"""Run `ckptd` as users do — a real subprocess — and read what it logged and stored."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servers import S3Bucket

PREFIX = "ckptd"
PROJECT, JOB = "proj", "job-1"


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "BT_", "AWS_"))}


def s3_args(bucket: S3Bucket) -> list[str]:
    return [
        "--storage",
        f"s3://{bucket.name}/{PREFIX}",
        "--s3-endpoint-url",
        bucket.server.endpoint_url,
        "--s3-addressing-style",
        "path",
    ]


def watch_args(bucket: S3Bucket, ckpt: Path, exit_file: Path, drain_timeout: float = 60) -> list[str]:
    """`ckptd watch` of one folder for the test job, quick to settle, on a free metrics port."""
    return [
        "watch",
        *s3_args(bucket),
        "--checkpoint-dir",
        str(ckpt),
        "--project",
        PROJECT,
        "--job-id",
        JOB,
        "--settle-time",
        "0.1",
        "--metrics-addr",
        "127.0.0.1:0",
        "--exit-when",
        str(exit_file),
        "--drain-timeout",
        str(drain_timeout),
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until `condition()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """A `ckptd` subprocess whose JSON-lines log goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, ignoring: tuple[int, ...] = ()) -> None:
        """`ignoring`: signals ckptd starts with ignored, as under nohup or as a script's background job."""
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait()

        def inherit_ignored() -> None:  # in the child, before exec: SIG_IGN survives exec
            for sig in ignoring:
                signal.signal(sig, signal.SIG_IGN)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", *args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            preexec_fn=inherit_ignored if ignoring else None,
        )

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def wait_event(self, name: str, timeout: float = 30, where: Callable[[dict], bool] = lambda e: True) -> dict:
        def found() -> dict | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"ckptd exited {self.proc.returncode} before {name!r}:\n{self.tail()}")
            return next((e for e in self.events(name) if where(e)), None)

        return wait_for(found, timeout, f"log event {name!r}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"ckptd did not exit within {timeout}s:\n{self.tail()}") from None
        finally:
            self._out.close()

    def peak_rss(self) -> int:
        """Peak resident memory (VmHWM) in bytes, read while the process is alive."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def objects(bucket: S3Bucket, prefix: str) -> dict[str, bytes]:
    """Key (without `prefix`) -> content of every object under `prefix`."""
    client = bucket.client
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix) :]] = client.get_object(Bucket=bucket.name, Key=item["Key"])["Body"].read()
    return out


def stored_objects(bucket: S3Bucket, job: str = JOB, rank: int = 0) -> dict[str, bytes]:
    """relpath -> content of every checkpoint file stored for the rank."""
    return objects(bucket, f"{PREFIX}/training_projects/{PROJECT}/jobs/{job}/rank-{rank}/")


def manifests(bucket: S3Bucket, job: str = JOB, rank: int = 0) -> dict[str, dict]:
    found = objects(bucket, f"{PREFIX}/training_projects/{PROJECT}/jobs/{job}/manifests/rank-{rank}/")
    return {m["checkpoint"]: m for m in map(json.loads, found.values())}


def incomplete_uploads(bucket: S3Bucket) -> list[dict]:
    return bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
