"""The store under test: a JuiceFS gateway (MinIO-derived S3 server) on 127.0.0.1, buckets that are
emptied as soon as a round is measured (the data of a full run would not fit the disk otherwise),
and the peers' binaries and environment.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .procs import Tree

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the test servers: one way to start the gateway, not two
import servers  # noqa: E402

PEERS_BIN = REPO / ".venv-peers" / "bin"


class Store:
    def __init__(self, work: Path, peers_bin: Path = PEERS_BIN) -> None:
        self.work = work
        self.peers_bin = peers_bin
        self.process = servers.start_juicefs(work / "juicefs")
        self.server = self.process.server
        self.endpoint = self.server.endpoint_url
        self.admin = servers.admin_client(self.server)
        self.tree = Tree(self.process.proc.pid)
        self.buckets: set[str] = set()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "BT_", "AWS_"))}
        self.env = {**base, **self.server.env(), "AWS_ENDPOINT_URL": self.endpoint, "PYTHONPATH": str(REPO)}

    def peer(self, name: str) -> str:
        path = self.peers_bin / name
        if not path.exists():
            found = shutil.which(name)
            if not found:
                raise SystemExit(f"{name} not found in {self.peers_bin}: run `bash scripts/setup.sh`")
            return found
        return str(path)

    def new_bucket(self) -> str:
        bucket = servers.unique_bucket().replace("ckptd-test", "ckptd-bench")
        self.admin.create_bucket(Bucket=bucket)
        self.buckets.add(bucket)
        return bucket

    def drop_bucket(self, bucket: str) -> None:
        servers.empty_and_delete_bucket(self.admin, bucket)
        self.buckets.discard(bucket)

    def sizes(self, bucket: str, prefix: str) -> dict[str, int]:
        """relpath under `prefix` -> size of every stored object."""
        out = {}
        for page in self.admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"][len(prefix) :]] = item["Size"]
        return out

    def stop(self) -> None:
        for bucket in list(self.buckets):
            try:
                self.drop_bucket(bucket)
            except Exception as e:  # the store may be the thing that failed; its folder goes anyway
                print(f"could not empty {bucket}: {e}", file=sys.stderr)
        self.process.stop()
        shutil.rmtree(self.work / "juicefs", ignore_errors=True)
