"""The two kinds of store a trial uploads to, seen from outside the daemon.

`LocalStore` is a file:// store (cheap scenarios). `S3Store` is a fresh bucket on a real S3 server
(moto, or the JuiceFS gateway for multi-GiB files) with the daemon pointed at a `FaultProxy` in
front of it; the trial reads the bucket directly, never through the proxy. Objects are hashed as
they stream in, so a 2 GiB object is verified without holding it in memory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import servers
from faults import FaultProxy
from servers import S3Server

PREFIX = "ckptd"  # the S3 key prefix of the store (file:// stores use their folder)
RESERVED = ".ckptd-"  # the local store's own temporary and multipart names
READ = 1 << 20


@dataclass(frozen=True)
class Blob:
    size: int
    sha256: str
    has_secret: bool


def _digest(chunks: Iterator[bytes], secret: bytes) -> Blob:
    sha, size, tail, found = hashlib.sha256(), 0, b"", False
    for chunk in chunks:
        sha.update(chunk)
        size += len(chunk)
        found = found or (bool(secret) and secret in tail + chunk)
        tail = chunk[-len(secret) :] if secret else b""
    return Blob(size, sha.hexdigest(), found)


class LocalStore:
    kind = "file"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.proxy: FaultProxy | None = None

    def args(self) -> list[str]:
        return ["--storage", f"file://{self.root}"]

    def env(self) -> dict[str, str]:
        return {}

    def scan(self, prefix: str, secret: bytes = b"") -> dict[str, Blob]:
        """relative key (after `prefix`) -> what the object holds, for every object under `prefix`."""
        found = {}
        for dirpath, dirnames, names in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED)]
            for name in names:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if name.startswith(RESERVED) or not key.startswith(prefix):
                    continue
                try:
                    with open(Path(dirpath, name), "rb") as f:
                        found[key[len(prefix) :]] = _digest(iter(lambda f=f: f.read(READ), b""), secret)
                except FileNotFoundError:
                    continue  # deleted since it was listed (a withdrawn manifest)
        return found

    def read(self, key: str) -> bytes | None:
        """An object's bytes, None if it is gone (deleted since it was listed)."""
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def incomplete_uploads(self) -> list[str]:
        folder = self.root / ".ckptd-multipart"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class S3Store:
    kind = "s3"

    def __init__(self, server: S3Server, seed: int = 0) -> None:
        self.server = server
        self.bucket = servers.unique_bucket()
        self.client = servers.admin_client(server)
        self.client.create_bucket(Bucket=self.bucket)
        self.proxy = FaultProxy(int(server.endpoint_url.rsplit(":", 1)[1]), seed=seed)

    def args(self, direct: bool = False) -> list[str]:
        endpoint = self.server.endpoint_url if direct else self.proxy.endpoint
        return [
            "--storage",
            f"s3://{self.bucket}/{PREFIX}",
            "--s3-endpoint-url",
            endpoint,
            "--s3-addressing-style",
            "path",
        ]

    def env(self) -> dict[str, str]:
        return self.server.env()

    def _keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{PREFIX}/{prefix}")
        for page in pages:
            yield from (item["Key"] for item in page.get("Contents", []))

    def scan(self, prefix: str, secret: bytes = b"") -> dict[str, Blob]:
        found = {}
        for key in self._keys(prefix):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except self.client.exceptions.NoSuchKey:
                continue  # deleted since it was listed (a withdrawn manifest)
            found[key[len(PREFIX) + 1 + len(prefix) :]] = _digest(body.iter_chunks(READ), secret)
        return found

    def read(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"{PREFIX}/{key}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def incomplete_uploads(self) -> list[str]:
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return sorted(u["Key"] for u in uploads)

    def sent_bytes(self) -> int:
        """Body bytes the daemon sent to store objects (whole or in parts), failed attempts included."""
        return sum(r.sent for r in self.proxy.requests("PutObject", "UploadPart") if "/rank-" in r.key)

    def close(self) -> None:
        self.proxy.close()
        try:
            servers.empty_and_delete_bucket(self.client, self.bucket)
        except Exception:
            pass
