"""Helpers for tests that run the upload engine in-process, where its metrics can be read."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import time
from pathlib import Path

from daemon import metrics
from daemon.catalog import layout
from daemon.catalog.manifest import StoredFile
from daemon.config import load


def config(tmp_path: Path, storage: str, **flags: str):
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    base = {
        "storage": storage,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "project": "proj",
        "job_id": "job-1",
        "settle_time": "0.05",
        "drain_timeout": "60",
    }
    return load({**base, **flags}, {**env, "HOME": str(tmp_path)})


def s3_flags(bucket) -> dict[str, str]:
    return {
        "storage": f"s3://{bucket.name}/ckptd",
        "s3_endpoint_url": bucket.server.endpoint_url,
        "s3_addressing_style": "path",
    }


async def until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition()` (plain or async) until it is truthy, and return that value; fail naming
    `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


async def stored_here(
    tmp_path: Path, store, tracker, relpath: str, data: bytes, project: str = "proj", job: str = "job-1"
):
    """A file of the checkpoint folder stored by "an earlier run": in the store and in the tracker."""
    path = tmp_path / "ckpt" / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    key = layout.file_key(project, job, 0, relpath)
    f = StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, await store.put(key, data))
    tracker.stored(f, time.monotonic())
    return f
